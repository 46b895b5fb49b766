//! The OAuth values that are secrets in transit, as types whose `Debug` says nothing
//! (the oauth2-rs habit): a `{:?}` of a struct holding one cannot leak it into a log.
//! Access and refresh tokens and client secrets are `secrecy::SecretString` already.

use std::fmt;

use serde::{Deserialize, Serialize};

macro_rules! secret_text {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub fn new(value: impl Into<String>) -> $name {
                $name(value.into())
            }

            /// The value itself, for the one place that must send it.
            pub fn secret(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(concat!(stringify!($name), "([redacted])"))
            }
        }
    };
}

secret_text!(
    /// An authorization code (RFC 6749 §4.1.2): single use, exchanged once.
    AuthorizationCode
);
secret_text!(
    /// A PKCE code verifier (RFC 7636 §4.1), kept sealed until the code exchange.
    PkceVerifier
);
secret_text!(
    /// The `state` we issued for one authorization: whoever holds it can complete it.
    State
);

impl PkceVerifier {
    /// 32 random octets, base64url: 43 characters (RFC 7636 §4.1).
    pub fn random() -> PkceVerifier {
        PkceVerifier(crate::support::crypto::random_token::<32>())
    }

    /// The S256 challenge sent in the authorization URL.
    pub fn challenge(&self) -> String {
        crate::support::crypto::pkce_challenge(&self.0)
    }
}

/// An OAuth error code: RFC 6749 §4.1.2.1 (authorization) and §5.2 (token), RFC 7009
/// §2.2.1 (revocation), or a provider's own extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorCode {
    InvalidRequest,
    InvalidClient,
    InvalidGrant,
    UnauthorizedClient,
    UnsupportedGrantType,
    InvalidScope,
    AccessDenied,
    UnsupportedResponseType,
    ServerError,
    TemporarilyUnavailable,
    UnsupportedTokenType,
    Extension(String),
}

impl ErrorCode {
    pub fn parse(code: &str) -> ErrorCode {
        match code {
            "invalid_request" => ErrorCode::InvalidRequest,
            "invalid_client" => ErrorCode::InvalidClient,
            "invalid_grant" => ErrorCode::InvalidGrant,
            "unauthorized_client" => ErrorCode::UnauthorizedClient,
            "unsupported_grant_type" => ErrorCode::UnsupportedGrantType,
            "invalid_scope" => ErrorCode::InvalidScope,
            "access_denied" => ErrorCode::AccessDenied,
            "unsupported_response_type" => ErrorCode::UnsupportedResponseType,
            "server_error" => ErrorCode::ServerError,
            "temporarily_unavailable" => ErrorCode::TemporarilyUnavailable,
            "unsupported_token_type" => ErrorCode::UnsupportedTokenType,
            other => ErrorCode::Extension(other.to_string()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::InvalidClient => "invalid_client",
            ErrorCode::InvalidGrant => "invalid_grant",
            ErrorCode::UnauthorizedClient => "unauthorized_client",
            ErrorCode::UnsupportedGrantType => "unsupported_grant_type",
            ErrorCode::InvalidScope => "invalid_scope",
            ErrorCode::AccessDenied => "access_denied",
            ErrorCode::UnsupportedResponseType => "unsupported_response_type",
            ErrorCode::ServerError => "server_error",
            ErrorCode::TemporarilyUnavailable => "temporarily_unavailable",
            ErrorCode::UnsupportedTokenType => "unsupported_token_type",
            ErrorCode::Extension(code) => code,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_do_not_show_in_debug() {
        let code = AuthorizationCode::new("c0de-value");
        assert_eq!(format!("{code:?}"), "AuthorizationCode([redacted])");
        assert_eq!(code.secret(), "c0de-value");
        assert!(!format!("{:?}", Some(State::new("st4te"))).contains("st4te"));
    }

    #[test]
    fn error_codes_round_trip() {
        for code in ["invalid_grant", "access_denied", "unsupported_token_type", "consent_required"] {
            assert_eq!(ErrorCode::parse(code).as_str(), code);
        }
        assert_eq!(ErrorCode::parse("invalid_grant"), ErrorCode::InvalidGrant);
    }
}

//! Bringing in a connection that another token keeper holds: its refresh token and, if
//! known, the access token and its expiry. A customer moving to this product must not
//! have to ask every user to authorize again.
//!
//! The imported refresh token is trusted only once the provider accepted it: the record is
//! written first (so a rotating provider's new refresh token lands on a record that
//! exists, through the same leased, version-checked refresh as every other), then
//! refreshed once. When the provider refuses it (`invalid_grant`) the record is removed
//! and the caller told; when the provider cannot be reached, the record stays and the
//! timer verifies it later, because the provider may have rotated the token already.

use secrecy::SecretString;

use super::refresh::apply_tokens;
use super::{CachedToken, ConnectionError, Connections, InvalidInput};
use crate::oauth::TokenSet;
use crate::store::{Connection, Status};

/// What a caller brings.
#[derive(Debug)]
pub struct Import {
    pub provider: String,
    pub connection_id: Option<String>,
    pub owner: Option<String>,
    pub scopes: Option<Vec<String>>,
    pub refresh_token: SecretString,
    pub access_token: Option<SecretString>,
    /// Unix seconds; only with `access_token`.
    pub expires_at: Option<i64>,
}

/// The imported connection after its verifying refresh, and the token it got.
#[derive(Debug)]
pub struct Imported {
    pub connection: Connection,
    pub token: CachedToken,
}

impl Connections {
    pub async fn import(&self, req: Import) -> Result<Imported, ConnectionError> {
        use secrecy::ExposeSecret;
        let (provider, id, scopes) =
            self.new_record(&req.provider, req.connection_id, req.owner.as_deref(), req.scopes)?;
        let invalid = |why: &str| ConnectionError::Invalid(InvalidInput::ImportedTokens, why.into());
        let refresh = req.refresh_token.expose_secret();
        if refresh.is_empty() || refresh.len() > 8192 || refresh.chars().any(char::is_control) {
            return Err(invalid("refresh_token must be the provider's refresh token (1-8192 printable characters)."));
        }
        if req.expires_at.is_some() && req.access_token.is_none() {
            return Err(invalid("expires_at describes an access_token; send both or neither."));
        }
        let t = self.deps.clock.now();
        // A known access token is kept as what it is; without one the record is due at once.
        let tokens = TokenSet {
            access_token: req.access_token.unwrap_or_else(|| SecretString::from(String::new())),
            token_type: "Bearer".into(),
            refresh_token: Some(req.refresh_token),
            expires_at: req.expires_at.unwrap_or(0),
            scope: None,
        };
        let mut conn = Connection::new(&id, &provider.name, req.owner, scopes, Status::Active, t);
        apply_tokens(&mut conn, &tokens, &self.deps.keys, t);
        // Not obtained by us: the first refresh must happen whatever the expiry says.
        conn.refreshed_at = None;
        conn.status_detail = Some("Imported; not verified with the provider yet.".into());
        self.insert_new(&mut conn).await?;
        match self.access_token(&id, true).await {
            Ok(token) => {
                tracing::info!(connection = %id, provider = %provider.name, "connection imported and verified");
                let connection = self.get(&id).await?;
                self.status_changed(&connection, None);
                Ok(Imported { connection, token })
            }
            Err(ConnectionError::NeedsReauth { detail, .. }) => {
                // Refused for good: take the record away again, and say so to whoever heard
                // it fall into needs_reauth.
                if let Ok(c) = self.get(&id).await
                    && self.deps.store.delete(&id, &c.version).await.is_ok()
                {
                    self.deleted(&c);
                }
                self.cache.remove(&id);
                tracing::warn!(connection = %id, provider = %provider.name, "import refused by the provider");
                Err(ConnectionError::ImportRefused { detail })
            }
            Err(e) => Err(e),
        }
    }
}

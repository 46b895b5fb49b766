//! The bottom layer: everything about calling out that is not about *what* is called.
//!
//! - [`client`]: the one pooled HTTPS client (no redirects, bounded timeouts);
//! - [`timing`]: how long the current request waited on upstreams (`Server-Timing`);
//! - [`backoff`]: the one retry-delay policy every retry loop uses;
//! - [`dependency`]: one traced span per call, `traceparent` sent along ([`send`]);
//! - [`cache`]: the one TTL + single-fetch cache every cache uses;
//! - [`gate`]: a concurrency limit and a shared `Retry-After` pause for one upstream;
//! - [`error_text`] and [`retry_after`]: reading a failed call.
//!
//! Nothing here knows about providers, Dataverse or the web layer: those sit above and
//! import from here, never the other way.

pub mod backoff;
pub mod dependency;
pub mod gate;
pub mod timing;
mod tls;

use std::time::Duration;

use reqwest::header::{HeaderMap, RETRY_AFTER};

pub use backoff::Backoff;
pub use dependency::send;
pub use gate::Gate;
pub use timing::upstream;

/// Why the outbound client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the HTTPS client could not be built: {0}")]
    Client(#[from] reqwest::Error),
    #[error("the TLS configuration could not be built: {0}")]
    Tls(#[from] rustls::Error),
}

/// The one pooled client for every outbound call; clones share the connection pool. The
/// TLS roots are loaded by the first handshake of any client ([`tls`]), not here.
///
/// It follows no redirects: a redirecting token endpoint is a misconfiguration, and
/// following it would send credentials somewhere unchecked. Idle connections are dropped
/// after 4 s: servers commonly close idle keep-alive connections after 5 s (Node's
/// default), and a request written to a connection the server is closing fails without
/// reaching it, which for a single-use code is not something to retry blindly.
pub fn client(timeout: Duration) -> Result<reqwest::Client, ClientError> {
    Ok(reqwest::Client::builder()
        .tls_backend_preconfigured(tls::config()?)
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(10).min(timeout))
        .timeout(timeout)
        .pool_idle_timeout(Duration::from_secs(4))
        .user_agent(concat!("dynamics-companion/", env!("CARGO_PKG_VERSION")))
        .build()?)
}

/// A client that never reuses a connection: for token-endpoint calls, which carry what can
/// be spent once (an authorization code, a rotating refresh token). A request written to a
/// pooled connection just as the server closes it for idleness fails without an answer, and
/// whether the server read it cannot be known, so it cannot be retried; a fresh connection
/// has no such race (a failed connect is retried, nothing having been sent). Measured: a
/// server with a 1 s keep-alive (the test provider) lost a code exchange this way under load.
/// The cost is one connection set-up per token call, which are rare next to API calls.
pub fn unpooled_client(timeout: Duration) -> Result<reqwest::Client, ClientError> {
    Ok(reqwest::Client::builder()
        .tls_backend_preconfigured(tls::config()?)
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(10).min(timeout))
        .timeout(timeout)
        .pool_max_idle_per_host(0)
        .user_agent(concat!("dynamics-companion/", env!("CARGO_PKG_VERSION")))
        .build()?)
}

/// A reqwest error as one readable phrase, without the URL (which could carry a query
/// secret).
pub fn error_text(e: reqwest::Error) -> String {
    if e.is_timeout() {
        return "timed out".into();
    }
    if e.is_connect() {
        return "connection failed".into();
    }
    let e = e.without_url();
    match std::error::Error::source(&e) {
        Some(src) => format!("{e}: {src}"),
        None => e.to_string(),
    }
}

/// `Retry-After` in delta-seconds, the form Dataverse, F&O and Entra send.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
}

/// Text from a service as one line: Entra and the Azure SDK put `\r\n` in messages,
/// and the host turns every line of ours into its own log record.
pub fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// An error with its causes, on one line: `retry policy expired: error sending request:
/// dns error: failed to lookup address`, where the outer error alone says only the first
/// part. A cause already contained in the text so far is not repeated.
pub fn with_causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = one_line(&e.to_string());
    let mut next = e.source();
    while let Some(cause) = next {
        let c = one_line(&cause.to_string());
        if !c.is_empty() && !text.contains(&c) {
            text.push_str(": ");
            text.push_str(&c);
        }
        next = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_are_said_once() {
        #[derive(Debug)]
        struct Outer(std::io::Error);
        impl std::fmt::Display for Outer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("retry policy expired")
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let e = Outer(std::io::Error::other("dns error: failed to lookup address"));
        assert_eq!(with_causes(&e), "retry policy expired: dns error: failed to lookup address");
    }

    #[test]
    fn retry_after_reads_delta_seconds_only() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert(RETRY_AFTER, " 7 ".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        h.insert(RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn one_line_folds_white_space() {
        assert_eq!(one_line("AADSTS700016: app\r\nnot found \n"), "AADSTS700016: app not found");
    }
}

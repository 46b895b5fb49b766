//! What one request, connection or client address may take (`MAX_*`, `*_TIMEOUT_SECONDS`,
//! `CALLBACK_RATE_PER_MINUTE`).

use std::time::Duration;

use super::{ConfigError, Settings};

#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request body accepted, chunked or not.
    pub max_body_bytes: usize,
    /// Largest single OAuth callback parameter (`code`, `state`, ...).
    pub max_param_bytes: usize,
    /// How long a connection may take to send a request's headers.
    pub header_read_timeout: Duration,
    /// How long a request's body may take to arrive.
    pub body_read_timeout: Duration,
    /// Requests without an `Authorization` header served at once; past it, 503.
    pub max_anonymous_requests: usize,
    /// Callback hits one client address may make per minute (and in one burst).
    pub callbacks_per_minute: u32,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_body_bytes: 1024 * 1024,
            max_param_bytes: 8 * 1024,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            max_anonymous_requests: 64,
            callbacks_per_minute: 300,
        }
    }
}

impl Limits {
    pub(super) fn from_settings(s: &Settings) -> Result<Limits, ConfigError> {
        let d = Limits::default();
        let limits = Limits {
            max_body_bytes: s.parse("MAX_BODY_BYTES", d.max_body_bytes, "a number of bytes")?,
            max_param_bytes: s.parse("MAX_PARAM_BYTES", d.max_param_bytes, "a number of bytes")?,
            header_read_timeout: s.seconds("HEADER_READ_TIMEOUT_SECONDS", d.header_read_timeout.as_secs())?,
            body_read_timeout: s.seconds("BODY_READ_TIMEOUT_SECONDS", d.body_read_timeout.as_secs())?,
            max_anonymous_requests: s.parse("MAX_ANONYMOUS_REQUESTS", d.max_anonymous_requests, "a number")?,
            callbacks_per_minute: s.parse("CALLBACK_RATE_PER_MINUTE", d.callbacks_per_minute, "a number")?,
        };
        for (setting, zero) in [
            ("HEADER_READ_TIMEOUT_SECONDS", limits.header_read_timeout.is_zero()),
            ("BODY_READ_TIMEOUT_SECONDS", limits.body_read_timeout.is_zero()),
            ("MAX_ANONYMOUS_REQUESTS", limits.max_anonymous_requests == 0),
            ("CALLBACK_RATE_PER_MINUTE", limits.callbacks_per_minute == 0),
        ] {
            if zero {
                return Err(ConfigError::new(setting, "must be at least 1"));
            }
        }
        Ok(limits)
    }
}

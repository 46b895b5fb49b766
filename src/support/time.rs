//! Wall-clock time. Stored times are Unix seconds (they must compare across processes
//! and survive restarts); leases use milliseconds; API responses show RFC 3339.
//!
//! The connection rules take their time from a [`Clock`] passed in, so the refresh state
//! machine can be tested in milliseconds with a clock that jumps ([`ManualClock`]) rather
//! than by waiting out leases and back-offs.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;

/// Seconds since the Unix epoch, now.
pub fn now() -> i64 {
    now_millis().div_euclid(1000)
}

/// Milliseconds since the Unix epoch, now.
pub fn now_millis() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Formats Unix seconds as RFC 3339 UTC (`2026-11-22T10:00:00Z`).
pub fn rfc3339(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| secs.to_string())
}

/// Where the domain gets the time, and how it waits.
#[async_trait]
pub trait Clock: Send + Sync {
    /// Unix milliseconds.
    fn now_millis(&self) -> i64;

    /// Unix seconds.
    fn now(&self) -> i64 {
        self.now_millis().div_euclid(1000)
    }

    async fn sleep(&self, d: Duration);
}

/// The real clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

#[async_trait]
impl Clock for SystemClock {
    fn now_millis(&self) -> i64 {
        now_millis()
    }

    async fn sleep(&self, d: Duration) {
        tokio::time::sleep(d).await;
    }
}

/// A clock that only moves when told to, or when someone sleeps on it (the sleeper's
/// time passes at once). For tests.
#[derive(Debug)]
pub struct ManualClock {
    millis: AtomicI64,
}

impl ManualClock {
    pub fn at(unix_seconds: i64) -> ManualClock {
        ManualClock { millis: AtomicI64::new(unix_seconds * 1000) }
    }

    pub fn advance(&self, d: Duration) {
        self.millis.fetch_add(d.as_millis() as i64, Ordering::SeqCst);
    }
}

#[async_trait]
impl Clock for ManualClock {
    fn now_millis(&self) -> i64 {
        self.millis.load(Ordering::SeqCst)
    }

    async fn sleep(&self, d: Duration) {
        self.advance(d);
        tokio::task::yield_now().await;
    }
}

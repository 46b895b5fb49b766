//! The one retry-delay policy: exponential from a base, capped, optionally jittered,
//! and overridden by the server's `Retry-After` when it sends one.
//!
//! Every retry loop uses it (Dataverse, F&O delivery, provider calls, the store's
//! `modify`, the refresh lease wait, and the per-connection refresh back-off), each with
//! its own constants, so the shape of waiting is decided in one place.

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The first delay.
    pub base: Duration,
    /// No delay is longer, `Retry-After` included.
    pub max: Duration,
    /// Adds up to a quarter of the delay again, so instances that were throttled
    /// together do not come back together.
    pub jitter: bool,
}

impl Backoff {
    pub const fn new(base: Duration, max: Duration) -> Backoff {
        Backoff { base, max, jitter: false }
    }

    pub const fn jittered(self) -> Backoff {
        Backoff { jitter: true, ..self }
    }

    /// The delay before retry number `attempt` (1 for the first retry): base × 2^(attempt-1),
    /// capped at `max`, without jitter.
    pub fn delay(&self, attempt: u32) -> Duration {
        self.base.saturating_mul(1u32 << attempt.saturating_sub(1).min(20)).min(self.max)
    }

    /// The wait before retry `attempt`: the server's `Retry-After` when given, else
    /// [`Backoff::delay`]; capped at `max`; then jittered when the policy says so.
    pub fn wait(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let d = retry_after.unwrap_or_else(|| self.delay(attempt)).min(self.max);
        if self.jitter { d + jitter(d) } else { d }
    }

    /// Sleeps for [`Backoff::wait`].
    pub async fn sleep(&self, attempt: u32, retry_after: Option<Duration>) {
        tokio::time::sleep(self.wait(attempt, retry_after)).await;
    }
}

/// Up to a quarter of `delay`, at random.
fn jitter(delay: Duration) -> Duration {
    let r = u16::from_le_bytes(crate::support::crypto::random_bytes::<2>()) as u64;
    Duration::from_millis(delay.as_millis() as u64 / 4 * r / u16::MAX as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_from_the_base_up_to_the_cap() {
        let b = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
        assert_eq!(b.delay(1), Duration::from_millis(250));
        assert_eq!(b.delay(3), Duration::from_millis(1000));
        assert_eq!(b.delay(40), Duration::from_secs(30));
        assert_eq!(b.wait(2, Some(Duration::from_secs(90))), Duration::from_secs(30), "Retry-After is capped too");
        assert_eq!(b.wait(2, Some(Duration::from_secs(3))), Duration::from_secs(3));
    }

    #[test]
    fn jitter_stays_within_a_quarter() {
        let b = Backoff::new(Duration::from_secs(4), Duration::from_secs(4)).jittered();
        for _ in 0..100 {
            let w = b.wait(1, None);
            assert!(w >= Duration::from_secs(4) && w <= Duration::from_secs(5), "{w:?}");
        }
    }
}

//! A gate in front of one upstream: at most `limit` requests in flight, and when the
//! upstream says "slow down" (429 with `Retry-After`) every caller waits, not only the one
//! that was told.
//!
//! Dataverse's service protection counts per application user and web server: 52
//! concurrent requests, and a 429 means the whole client is over a limit, so a burst must
//! queue here rather than draw more 429s, and the pause must hold for everyone: a request
//! that was already queued for a place when the pause began waits it out too (the pause is
//! checked again once it has its place), and the request that drew the 429 sets the pause
//! before it gives its place back.
//!
//! Dataverse's `Retry-After` is in seconds with no documented upper bound (its windows are
//! 300 s long: "Service protection API limits", Microsoft Learn), so a pause is honoured
//! as sent up to [`MAX_PAUSE`]. A caller that would have to wait longer than it is willing
//! to is told how long instead ([`Gate::enter`]'s `Err`), so an HTTP caller can get a 503
//! with `Retry-After` rather than a request that hangs for minutes.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Semaphore, SemaphorePermit};
use tokio::time::Instant;

/// The longest pause honoured: Dataverse's service-protection window.
pub const MAX_PAUSE: Duration = Duration::from_secs(300);

pub struct Gate {
    permits: Semaphore,
    limit: usize,
    paused_until: Mutex<Option<Instant>>,
    in_flight: AtomicUsize,
    /// The most requests ever in flight at once, for health and the benchmarks.
    peak: AtomicUsize,
}

/// One request's place; the place is given back when it is dropped.
pub struct Pass<'a> {
    gate: &'a Gate,
    /// `None` only if the semaphore were closed, which `Gate` never does.
    _permit: Option<SemaphorePermit<'a>>,
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        self.gate.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Gate {
    pub fn new(limit: usize) -> Gate {
        let limit = limit.max(1);
        Gate {
            permits: Semaphore::new(limit),
            limit,
            paused_until: Mutex::new(None),
            in_flight: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::SeqCst)
    }

    /// How much longer the current pause lasts, if one does.
    pub fn paused_for(&self) -> Option<Duration> {
        let until = (*self.paused_until.lock().unwrap_or_else(|e| e.into_inner()))?;
        let left = until.saturating_duration_since(Instant::now());
        (!left.is_zero()).then_some(left)
    }

    /// Waits out any pause, then for a place, then (the pause may have begun while it
    /// queued) out any pause again, without holding its place. A pause longer than
    /// `max_wait` is not waited for: `Err` says how long it still lasts.
    pub async fn enter(&self, max_wait: Duration) -> Result<Pass<'_>, Duration> {
        loop {
            if let Some(left) = self.paused_for() {
                if left > max_wait {
                    return Err(left);
                }
                tokio::time::sleep(left).await;
                continue;
            }
            let permit = self.permits.acquire().await.ok();
            if self.paused_for().is_some() {
                drop(permit);
                continue;
            }
            let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.peak.fetch_max(now, Ordering::SeqCst);
            return Ok(Pass { gate: self, _permit: permit });
        }
    }

    /// Holds every caller back for `d` (the upstream's `Retry-After`), at most
    /// [`MAX_PAUSE`]; returns the pause applied.
    pub fn pause(&self, d: Duration) -> Duration {
        let d = d.min(MAX_PAUSE);
        let until = Instant::now() + d;
        let mut paused = self.paused_until.lock().unwrap_or_else(|e| e.into_inner());
        if paused.is_none_or(|p| p < until) {
            *paused = Some(until);
        }
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn never_more_than_the_limit_in_flight() {
        let gate = Arc::new(Gate::new(3));
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let gate = gate.clone();
                tokio::spawn(async move {
                    let _pass = gate.enter(Duration::MAX).await;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(gate.peak(), 3);
    }

    #[tokio::test]
    async fn a_pause_holds_every_caller() {
        let gate = Gate::new(4);
        let wait = Duration::from_secs(10);
        gate.pause(Duration::from_millis(200));
        let t = std::time::Instant::now();
        drop(gate.enter(wait).await);
        drop(gate.enter(wait).await);
        assert!(t.elapsed() >= Duration::from_millis(190), "{:?}", t.elapsed());
        // A shorter pause does not cut a longer one short.
        gate.pause(Duration::from_millis(300));
        gate.pause(Duration::from_millis(10));
        let t = std::time::Instant::now();
        drop(gate.enter(wait).await);
        assert!(t.elapsed() >= Duration::from_millis(290), "{:?}", t.elapsed());
    }

    /// A request queued for a place when the pause begins waits it out too.
    #[tokio::test(start_paused = true)]
    async fn a_queued_request_waits_out_a_pause_that_began_while_it_queued() {
        let gate = Arc::new(Gate::new(1));
        let holder = gate.enter(Duration::MAX).await.unwrap();
        let queued = {
            let gate = gate.clone();
            tokio::spawn(async move {
                let _pass = gate.enter(Duration::from_secs(100)).await.unwrap();
                Instant::now()
            })
        };
        tokio::task::yield_now().await;
        let paused_at = Instant::now();
        // The holder drew a 429: it pauses, then gives its place back.
        gate.pause(Duration::from_secs(90));
        drop(holder);
        let entered = queued.await.unwrap();
        assert!(entered - paused_at >= Duration::from_secs(90), "{:?}", entered - paused_at);
    }

    /// A pause longer than the caller will wait is said, not waited; it is capped at 300 s.
    #[tokio::test(start_paused = true)]
    async fn a_long_pause_is_said_not_waited() {
        let gate = Gate::new(2);
        assert_eq!(gate.pause(Duration::from_secs(3600)), MAX_PAUSE);
        let left = gate.enter(Duration::from_secs(10)).await.err().unwrap();
        assert!(left > Duration::from_secs(299) && left <= MAX_PAUSE, "{left:?}");
        tokio::time::advance(Duration::from_secs(295)).await;
        assert!(gate.enter(Duration::from_secs(10)).await.is_ok(), "5 s left: waited");
    }
}

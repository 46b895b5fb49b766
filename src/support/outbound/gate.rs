//! A gate in front of one upstream: at most `limit` requests in flight, and when the
//! upstream says "slow down" (429 with `Retry-After`) every caller waits, not only the one
//! that was told.
//!
//! Dataverse's service protection counts per application user and web server: 52
//! concurrent requests, and a 429 means the whole client is over a limit, so a burst must
//! queue here rather than draw more 429s, and the pause must hold for everyone.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Semaphore, SemaphorePermit};
use tokio::time::Instant;

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

    /// Waits out any pause, then for a place.
    pub async fn enter(&self) -> Pass<'_> {
        loop {
            let until = *self.paused_until.lock().unwrap_or_else(|e| e.into_inner());
            match until {
                Some(t) if t > Instant::now() => tokio::time::sleep_until(t).await,
                _ => break,
            }
        }
        let permit = self.permits.acquire().await.ok();
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        Pass { gate: self, _permit: permit }
    }

    /// Holds every caller back for `d` (the upstream's `Retry-After`).
    pub fn pause(&self, d: Duration) {
        let until = Instant::now() + d;
        let mut paused = self.paused_until.lock().unwrap_or_else(|e| e.into_inner());
        if paused.is_none_or(|p| p < until) {
            *paused = Some(until);
        }
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
                    let _pass = gate.enter().await;
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
        gate.pause(Duration::from_millis(200));
        let t = std::time::Instant::now();
        drop(gate.enter().await);
        drop(gate.enter().await);
        assert!(t.elapsed() >= Duration::from_millis(190), "{:?}", t.elapsed());
        // A shorter pause does not cut a longer one short.
        gate.pause(Duration::from_millis(300));
        gate.pause(Duration::from_millis(10));
        let t = std::time::Instant::now();
        drop(gate.enter().await);
        assert!(t.elapsed() >= Duration::from_millis(290), "{:?}", t.elapsed());
    }
}

//! Token buckets by key: `per_minute` requests a minute, with a burst of as many, for
//! each of up to `MAX_KEYS` keys (the least recently seen go first, so a flood of
//! addresses cannot grow the map).

use std::hash::Hash;
use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lru::LruCache;

const MAX_KEYS: usize = 10_000;

pub struct Throttle<K: Hash + Eq> {
    per_minute: f64,
    buckets: Mutex<LruCache<K, (f64, Instant)>>,
}

impl<K: Hash + Eq> Throttle<K> {
    pub fn new(per_minute: u32) -> Throttle<K> {
        let cap = NonZeroUsize::new(MAX_KEYS).unwrap_or(NonZeroUsize::MIN);
        Throttle { per_minute: f64::from(per_minute.max(1)), buckets: Mutex::new(LruCache::new(cap)) }
    }

    /// Takes one token for `key`, or says how long until one is there.
    pub fn take(&self, key: K) -> Result<(), Duration> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let (tokens, at) = buckets.get(&key).copied().unwrap_or((self.per_minute, now));
        let refilled = (tokens + now.duration_since(at).as_secs_f64() * self.per_minute / 60.0).min(self.per_minute);
        if refilled >= 1.0 {
            buckets.put(key, (refilled - 1.0, now));
            Ok(())
        } else {
            buckets.put(key, (refilled, now));
            Err(Duration::from_secs_f64((1.0 - refilled) * 60.0 / self.per_minute))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_refusals_per_key() {
        let t = Throttle::new(3);
        for _ in 0..3 {
            assert!(t.take("a").is_ok());
        }
        let wait = t.take("a").unwrap_err();
        assert!(wait > Duration::from_secs(15) && wait <= Duration::from_secs(20), "{wait:?}");
        assert!(t.take("b").is_ok(), "another key has its own bucket");
    }
}

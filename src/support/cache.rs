//! The one cache type: entries that expire, a bound on their number, and one fetch at
//! a time per key.
//!
//! Every cache of the handler is one of these: Azure resource tokens, Key Vault
//! secrets, issuer signing keys, the Power Pages key, portal contacts, verified bearer
//! tokens and connection tokens. Two properties matter everywhere:
//! - **bounded**: a cache whose keys come from traffic (bearer tokens, contacts,
//!   connection ids) holds at most `capacity` entries and evicts the least recently
//!   used one, rather than growing without end or being cleared whole when full (which
//!   would turn one burst of junk into a storm of re-verifications);
//! - **single fetch**: when an entry is missing or stale, one caller fetches and the
//!   others for that key wait for its result instead of fetching too
//!   ([`Cache::get_or_try_insert_with`], [`Cache::exclusive`]).
//!
//! A std `Mutex` guards the map: it is held for a lookup or an insert, never across an
//! await, which is cheaper than an async lock (the mini-redis reasoning).

use std::borrow::Borrow;
use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lru::LruCache;

struct Entry<V> {
    value: V,
    fresh_until: Instant,
    stored_at: Instant,
}

/// A value kept past its freshness, for callers that prefer it to an error.
#[derive(Debug, Clone)]
pub struct Stale<V> {
    pub value: V,
    /// Time since it was stored.
    pub age: Duration,
}

pub struct Cache<K, V> {
    entries: Mutex<LruCache<K, Entry<V>>>,
    flights: Mutex<HashMap<K, Arc<tokio::sync::Mutex<()>>>>,
}

impl<K: Hash + Eq + Clone, V: Clone> Cache<K, V> {
    /// A cache of at most `capacity` entries (at least one).
    pub fn new(capacity: usize) -> Cache<K, V> {
        let cap = NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN);
        Cache { entries: Mutex::new(LruCache::new(cap)), flights: Mutex::new(HashMap::new()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LruCache<K, Entry<V>>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The value, if it is still fresh.
    pub fn get<Q: Hash + Eq + ?Sized>(&self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
    {
        self.get_if(key, |_| true)
    }

    /// The value, if it is still fresh and `accept` takes it.
    pub fn get_if<Q: Hash + Eq + ?Sized>(&self, key: &Q, accept: impl FnOnce(&V) -> bool) -> Option<V>
    where
        K: Borrow<Q>,
    {
        let mut entries = self.lock();
        let entry = entries.get(key)?;
        (entry.fresh_until > Instant::now() && accept(&entry.value)).then(|| entry.value.clone())
    }

    /// The value whether fresh or not, with its age.
    pub fn get_stale<Q: Hash + Eq + ?Sized>(&self, key: &Q) -> Option<Stale<V>>
    where
        K: Borrow<Q>,
    {
        let mut entries = self.lock();
        entries.get(key).map(|e| Stale { value: e.value.clone(), age: e.stored_at.elapsed() })
    }

    /// Keeps `value` fresh for `ttl`; a zero `ttl` stores nothing.
    pub fn insert(&self, key: K, value: V, ttl: Duration) {
        if ttl.is_zero() {
            return;
        }
        let now = Instant::now();
        // An absurd TTL (a provider's "expires in 10^16 s") must not overflow the clock.
        let fresh_until = now.checked_add(ttl).unwrap_or(now + Duration::from_secs(10 * 365 * 24 * 3600));
        self.lock().put(key, Entry { value, fresh_until, stored_at: now });
    }

    pub fn remove<Q: Hash + Eq + ?Sized>(&self, key: &Q)
    where
        K: Borrow<Q>,
    {
        self.lock().pop(key);
    }

    /// Drops every entry for which `gone` is true (a change feed naming what changed).
    pub fn remove_where(&self, mut gone: impl FnMut(&K) -> bool) {
        let mut entries = self.lock();
        let keys: Vec<K> = entries.iter().filter(|(k, _)| gone(k)).map(|(k, _)| k.clone()).collect();
        for k in keys {
            entries.pop(&k);
        }
    }

    pub fn clear(&self) {
        self.lock().clear();
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Runs `f` while holding this key's turn: callers for the same key run one after
    /// another, callers for other keys are not held up.
    pub async fn exclusive<T, F, Fut>(&self, key: &K, f: F) -> T
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = T>,
    {
        let flight = {
            let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
            flights.entry(key.clone()).or_default().clone()
        };
        let out = {
            let _turn = flight.lock().await;
            f().await
        };
        let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
        // The map's handle and ours: nobody else is waiting, so the turn can go.
        if Arc::strong_count(&flight) <= 2 {
            flights.remove(key);
        }
        out
    }

    /// The fresh value, or the one `fetch` returns (kept for the TTL it returns). One
    /// caller per key fetches; the others wait and take its result. A failed fetch
    /// stores nothing.
    pub async fn get_or_try_insert_with<E, F, Fut>(&self, key: &K, fetch: F) -> Result<V, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(V, Duration), E>>,
    {
        if let Some(v) = self.get(key) {
            return Ok(v);
        }
        self.exclusive(key, || async {
            // Whoever held the turn before us may have done the work.
            if let Some(v) = self.get(key) {
                return Ok(v);
            }
            let (value, ttl) = fetch().await?;
            self.insert(key.clone(), value.clone(), ttl);
            Ok(value)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn entries_expire_and_stale_ones_stay_readable() {
        let c: Cache<&str, u32> = Cache::new(4);
        c.insert("a", 1, Duration::from_millis(20));
        assert_eq!(c.get(&"a"), Some(1));
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(c.get(&"a"), None);
        assert_eq!(c.get_stale(&"a").map(|s| s.value), Some(1));
        c.insert("z", 9, Duration::ZERO);
        assert!(c.get_stale(&"z").is_none(), "a zero TTL stores nothing");
    }

    #[test]
    fn a_full_cache_evicts_the_least_recently_used_entry_only() {
        let c: Cache<u32, u32> = Cache::new(3);
        for k in 0..3 {
            c.insert(k, k, Duration::from_secs(60));
        }
        assert_eq!(c.get(&0), Some(0)); // 0 is now the most recently used
        c.insert(3, 3, Duration::from_secs(60));
        assert_eq!(c.len(), 3);
        assert_eq!(c.get(&1), None, "the least recently used entry went");
        assert_eq!((c.get(&0), c.get(&2), c.get(&3)), (Some(0), Some(2), Some(3)));
    }

    #[tokio::test]
    async fn concurrent_misses_fetch_once() {
        let c: Arc<Cache<&str, u32>> = Arc::new(Cache::new(4));
        let fetches = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let (c, fetches) = (c.clone(), fetches.clone());
            tasks.push(tokio::spawn(async move {
                c.get_or_try_insert_with(&"k", || async {
                    fetches.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    Ok::<_, ()>((7, Duration::from_secs(60)))
                })
                .await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), Ok(7));
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
        assert!(c.flights.lock().unwrap().is_empty(), "turns are cleaned up");
    }

    #[tokio::test]
    async fn a_failed_fetch_stores_nothing() {
        let c: Cache<&str, u32> = Cache::new(4);
        let r = c.get_or_try_insert_with(&"k", || async { Err::<(u32, Duration), _>("down") }).await;
        assert_eq!(r, Err("down"));
        assert!(c.get_stale(&"k").is_none());
    }
}

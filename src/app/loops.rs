//! What runs beside the server for as long as the app serves: warming what a cold
//! instance's first requests need, following the store's change feed, re-reading the
//! token encryption keys, and checking that no configured-away key still seals anything.

use std::sync::Arc;
use std::time::Instant;

use secrecy::ExposeSecret;

use super::{App, build};
use crate::domain::Changes;
use crate::support::outbound::Backoff;

/// How long a cached token is trusted while the change feed runs: the refresh margin
/// decides long before this.
const FEED_TRUST: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
/// Retries of a feed whose requests fail (the store unreachable, throttled): 1 s
/// doubling to a minute.
const FEED_RETRY_DOWN: Backoff = Backoff::new(std::time::Duration::from_secs(1), std::time::Duration::from_secs(60));
/// Retries of a feed the store refuses (change tracking off): five intervals, doubling
/// to 15 minutes (25 s, 50 s, ... with the default 5 s interval).
fn feed_retry_unavailable(every: std::time::Duration) -> Backoff {
    Backoff::new(every * 5, std::time::Duration::from_secs(900))
}

/// How long one answer of the feed vouches for the cache: two intervals and one feed
/// request's timeout. Past it, an instance serves a connection deleted elsewhere for at
/// most `TOKEN_CACHE_SECONDS` more.
pub fn feed_bound(every: std::time::Duration, request_timeout: std::time::Duration) -> std::time::Duration {
    every * 2 + request_timeout
}

impl App {
    /// Starts what runs beside the server: the prefetch (the issuer's keys, the Dataverse
    /// token and connection, in the background without holding readiness back), the
    /// change feed, the keys-in-use check where the store cannot count at start-up, and,
    /// with Key Vault, the key reload.
    pub fn start_background(self: &Arc<App>) {
        tokio::spawn(self.clone().prefetch());
        tokio::spawn(self.clone().follow_changes());
        if self.organisations.home().store().kind() != "sqlite" || self.organisations.tenants().is_some() {
            let app = self.clone();
            tokio::spawn(async move { app.check_keys_in_use().await });
        }
        if self.config.secrets.key_vault.is_some() {
            let app = self.clone();
            let every = app.config.secrets.cache_ttl.max(std::time::Duration::from_secs(1));
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    app.reload_keys().await;
                }
            });
        }
    }

    /// Loads, in the background and all at once, what a cold instance's first requests
    /// would otherwise fetch one after another: the back-office issuer's signing keys
    /// (discovery, then JWKS), and the Dataverse token with a warm connection (WhoAmI).
    /// Failures are only logged: the requests fetch again when they need to.
    pub async fn prefetch(self: Arc<App>) {
        let started = Instant::now();
        let keys = async {
            if let Some(v) = &self.verifier
                && let Err(e) = v.load_keys().await
            {
                tracing::warn!("prefetch: the back-office issuer's keys: {e}");
            }
        };
        let dataverse = async {
            if let Some(dv) = &self.dataverse
                && let Err(e) = dv.who_am_i().await
            {
                tracing::warn!("prefetch: Dataverse: {e}");
            }
        };
        futures_util::join!(keys, dataverse);
        tracing::info!(ms = started.elapsed().as_millis() as u64, "prefetch done");
    }

    /// Follows what other instances change in the store (`CHANGE_FEED_SECONDS`): one
    /// request per interval whatever the number of connections, and every cached token
    /// another instance changed or deleted is dropped. While the feed answers, a cached
    /// token is trusted until it is due; once it has not answered for
    /// [`feed_bound`] (an outage, a request stuck in retries), for `TOKEN_CACHE_SECONDS`.
    ///
    /// It never stops for good. An error on a delta link (Dataverse answers an expired
    /// change-tracking token with `0x80044352`, "perform a full sync", and a link can be
    /// `410 Gone`) starts a fresh initial sync at once, as Microsoft's change-tracking
    /// guidance says; an initial sync the store refuses (change tracking off on the
    /// table) is tried again every few minutes, so turning it on later takes effect
    /// without a restart; an unreachable store is retried with back-off. `/api/health`
    /// shows its state.
    pub async fn follow_changes(self: Arc<App>) {
        let every = self.config.oauth.change_feed;
        let record = self.services.health.feed.clone();
        if every.is_zero() {
            return;
        }
        let bound = feed_bound(every, self.config.oauth.upstream_timeout);
        let home = self.organisations.home().clone();
        let store = self.feed.clone();
        let mut cursor: Option<String> = None;
        let mut failures: u32 = 0;
        record.set("starting", None);
        loop {
            let fresh = cursor.is_none();
            let wait = match store.connection_changes(cursor.as_deref()).await {
                Ok(None) => {
                    record.set("off", None);
                    return;
                }
                Ok(Some((changes, next))) => {
                    home.feed_answered(bound);
                    if fresh {
                        home.forget(&Changes::All);
                        home.follow(Some(FEED_TRUST));
                        tracing::info!(every_ms = every.as_millis() as u64, "following the connections' changes");
                    } else {
                        home.forget(&changes);
                    }
                    cursor = Some(next);
                    failures = 0;
                    record.set("following", None);
                    record.update(|s| s.last_answer_at = Some(crate::support::time::now()));
                    every
                }
                Err(e) => {
                    failures += 1;
                    let error = crate::support::logging::clip(&e.to_string(), 300).into_owned();
                    if !e.is_transient() && !fresh {
                        // The delta link is refused (expired, gone): a fresh initial sync,
                        // which forgets everything cached when it answers.
                        cursor = None;
                        record.set("restarting", Some(error.clone()));
                        record.update(|s| s.restarts += 1);
                        tracing::warn!(
                            "the change feed's link was refused ({error}); starting it again with a full sync"
                        );
                        std::time::Duration::ZERO
                    } else if !e.is_transient() {
                        // No feed at all: cached tokens are trusted for TOKEN_CACHE_SECONDS.
                        home.follow(None);
                        if failures == 1 {
                            tracing::warn!(
                                "no change feed ({error}): is change tracking on for the connections table? (`handler provision` turns it on for new tables; in the maker portal: the table's properties, Advanced options, Track changes). Tried again every few minutes; cached tokens are trusted for TOKEN_CACHE_SECONDS meanwhile"
                            );
                        }
                        record.set("unavailable", Some(error));
                        feed_retry_unavailable(every).delay(failures)
                    } else {
                        // The link is kept: when the store answers again, it names what
                        // changed meanwhile. Until then the cache's trust lapses by itself
                        // (`feed_bound` after the last answer).
                        if failures == 1 {
                            tracing::warn!(
                                "the change feed failed ({error}); it is retried, and cached tokens are trusted for TOKEN_CACHE_SECONDS once its last answer is {} s old",
                                bound.as_secs()
                            );
                        }
                        record.set("down", Some(error));
                        FEED_RETRY_DOWN.delay(failures).max(every)
                    }
                }
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// The keys that still seal something in any organisation and are not configured, by
    /// organisation (`None` for the deployment's own store). Logged as errors: tokens
    /// sealed with them cannot be read until the key is listed again.
    pub async fn check_keys_in_use(&self) -> Vec<(Option<String>, Vec<(String, u64)>)> {
        let mut found = Vec::new();
        let orgs = match self.organisations.all().await {
            Ok(orgs) => orgs,
            Err(e) => {
                tracing::warn!("could not list the organisations to check the keys in use: {e}");
                vec![(None, self.organisations.home().clone())]
            }
        };
        for (org, connections) in orgs {
            match connections.store().sealed_key_counts().await {
                Ok(counts) => {
                    let missing = build::missing_keys(&self.keys, &counts);
                    if !missing.is_empty() {
                        tracing::error!(
                            organisation = org.as_deref().unwrap_or("own store"),
                            "{} still seal values there but are not in TOKEN_ENCRYPTION_KEYS: list them again and run `handler reseal`",
                            build::describe_missing(&missing)
                        );
                        found.push((org, missing));
                    }
                }
                Err(e) => tracing::warn!(
                    organisation = org.as_deref().unwrap_or("own store"),
                    "could not count the keys in use: {e}"
                ),
            }
        }
        found
    }

    /// Re-reads the token encryption keys (a key rotated in Key Vault is used without a
    /// restart). A new list that drops a key still sealing something in any organisation
    /// is not applied: the current keys stay, and the error says where the key is used.
    pub async fn reload_keys(&self) {
        let name = &self.config.secrets.token_keys_secret;
        match self.secrets.get(name).await {
            Ok(spec) => match self.guarded_reload(spec.expose_secret()).await {
                Ok(true) => tracing::info!(current = %self.keys.current_id(), "token encryption keys reloaded"),
                Ok(false) => {}
                Err(e) => {
                    tracing::error!("the token encryption keys in {name} are malformed ({e}); keeping the current ones")
                }
            },
            Err(e) => tracing::warn!("could not re-read the token encryption keys: {e}"),
        }
    }

    async fn guarded_reload(&self, spec: &str) -> Result<bool, crate::support::crypto::KeyFormatError> {
        let dropped = self.keys.dropped_by(spec).unwrap_or_default();
        if !dropped.is_empty() {
            let orgs =
                self.organisations.all().await.unwrap_or_else(|_| vec![(None, self.organisations.home().clone())]);
            for (org, connections) in orgs {
                let counts = match connections.store().sealed_key_counts().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::error!(
                            "the new token encryption keys drop {}, and whether it still seals anything could not be read ({e}); keeping the current keys",
                            dropped.join(", ")
                        );
                        return Ok(false);
                    }
                };
                let in_use: Vec<(String, u64)> =
                    dropped.iter().filter_map(|k| counts.get(k).map(|n| (k.clone(), *n))).collect();
                if !in_use.is_empty() {
                    tracing::error!(
                        organisation = org.as_deref().unwrap_or("own store"),
                        "the new token encryption keys drop {}, which still seal values there; keeping the current keys: run `handler reseal` first",
                        build::describe_missing(&in_use)
                    );
                    return Ok(false);
                }
            }
        }
        self.keys.reload(spec)
    }
}

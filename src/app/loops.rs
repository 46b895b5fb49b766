//! What runs beside the server for as long as the app serves: warming what a cold
//! instance's first requests need, following the store's change feed, re-reading the
//! token encryption keys, and checking that no configured-away key still seals anything.

use std::sync::Arc;
use std::time::Instant;

use secrecy::ExposeSecret;

use super::{App, build};
use crate::domain::Changes;

/// How long a cached token is trusted while the change feed runs: the refresh margin
/// decides long before this.
const FEED_TRUST: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

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
    /// another instance changed or deleted is dropped. While it runs, a cached token is
    /// trusted until it is due; when the feed breaks, for `TOKEN_CACHE_SECONDS` again and
    /// everything cached is dropped, since changes may have been missed.
    pub async fn follow_changes(self: Arc<App>) {
        let every = self.config.oauth.change_feed;
        if every.is_zero() {
            return;
        }
        let home = self.organisations.home().clone();
        let store = self.feed.clone();
        let mut cursor: Option<String> = None;
        loop {
            match store.connection_changes(cursor.as_deref()).await {
                Ok(None) => return,
                Ok(Some((changes, next))) => {
                    if cursor.is_none() {
                        home.forget(&Changes::All);
                        home.follow(Some(FEED_TRUST));
                        tracing::info!(every_ms = every.as_millis() as u64, "following the connections' changes");
                    } else {
                        home.forget(&changes);
                    }
                    cursor = Some(next);
                }
                Err(e) => {
                    if cursor.take().is_some() {
                        home.follow(None);
                        home.forget(&Changes::All);
                    }
                    if !e.is_transient() {
                        // Change tracking is off on the table (provisioned by an earlier
                        // version) or refused: say so once and rely on TOKEN_CACHE_SECONDS.
                        tracing::warn!(
                            "no change feed ({e}); turn on change tracking for the connections table (handler provision does for new tables); cached tokens are trusted for TOKEN_CACHE_SECONDS"
                        );
                        return;
                    }
                    tracing::warn!(
                        "the change feed failed ({e}); cached tokens are trusted for TOKEN_CACHE_SECONDS until it is back"
                    );
                }
            }
            tokio::time::sleep(every).await;
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

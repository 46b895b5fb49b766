//! A connection's last use (`last_used_at`, `last_used_by`): noted when its token serves a
//! caller (handed out, proxied, an agent's call), at most once a minute per connection in
//! each process, so a busy connection costs its store one small write a minute per
//! instance, not one per call (the Dataverse budget: BENCHMARKS.md). The write runs in the
//! background: the caller never waits on it, and a failed write is only logged.

use std::collections::HashMap;
use std::sync::Mutex;

use super::Connections;
use crate::support::audit;

/// How often one process records a connection's use, in seconds.
pub const EVERY: i64 = 60;
/// Past this many connections noted, the notes older than [`EVERY`] are dropped.
const PRUNE_AT: usize = 10_000;

/// When this process last recorded each connection's use, by the token cache's key (the
/// id without case).
#[derive(Default)]
pub(super) struct Uses(Mutex<HashMap<String, i64>>);

impl Uses {
    /// Whether a use at `now` is to be recorded (and if so, notes it).
    fn due(&self, id: &str, now: i64) -> bool {
        let mut seen = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if seen.get(id).is_some_and(|&at| now - at < EVERY) {
            return false;
        }
        if seen.len() >= PRUNE_AT {
            seen.retain(|_, at| now - *at < EVERY);
        }
        seen.insert(id.to_string(), now);
        true
    }
}

impl Connections {
    /// Notes that the connection's token served `actor`, or when none is given the current
    /// task's actor (the audit record's). The timer's refreshes are not uses.
    pub(super) fn note_use(&self, id: &str, actor: Option<&audit::Actor>) {
        // Checked before the actor is copied: most calls within the minute stop here.
        if actor.map_or_else(audit::current_kind, |a| a.kind) == "timer" {
            return;
        }
        let now = self.deps.clock.now();
        if !self.uses.due(&super::cache::key(id), now) {
            return;
        }
        let store = self.deps.store.clone();
        let by = actor.map_or_else(|| audit::current().to_string(), audit::Actor::to_string);
        let id = id.to_string();
        tokio::spawn(async move {
            if let Err(e) = store.record_use(&id, now, &by).await {
                tracing::warn!(connection = %id, error = %e, "the connection's last use could not be recorded");
            }
        });
    }
}

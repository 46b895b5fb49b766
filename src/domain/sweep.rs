//! The timer's work, one run: refresh what would expire before the next run (plus the
//! margin), keep idle refresh tokens alive for providers that expire them, clear
//! expired authorizations, deliver pending captures to F&O, and purge old captures.
//! Every step runs even when an earlier one failed; the report says what happened.

use futures_util::StreamExt;

use crate::domain::Due;
use crate::domain::captures::Captures;
use crate::domain::connections::refresh::Want;
use crate::domain::connections::{ConnectionError, Connections};

/// How many refreshes run at once (each is a few store requests and one provider call;
/// the Dataverse gate bounds the store side whatever this says).
const CONCURRENCY: usize = 8;
/// How many rows one query takes; the refresh pages on, the other steps take one batch.
const BATCH: usize = 500;
/// The refresh part of one run stops starting pages after half the time until the next
/// run, within these bounds.
const MIN_BUDGET_MS: i64 = 10_000;
const MAX_BUDGET_MS: i64 = 240_000;
/// The furthest ahead a run refreshes, whatever the payload's `ScheduleStatus.Next` says:
/// a forged or broken `Next` must not refresh every connection at once.
const MAX_LOOKAHEAD_SECS: i64 = 3600;
/// Records one run seals again with the current key after a rotation; the rest wait for
/// the next run (or `handler reseal`). A run after a pass that left nothing under an
/// older key, with the same current key, does not scan at all.
const RESEAL_BATCH: usize = 200;

/// Everything the timer did, for its invocation logs.
#[derive(Debug, Default)]
pub struct SweepReport {
    pub due: usize,
    pub refreshed: usize,
    pub needs_reauth: usize,
    pub failed: usize,
    pub expired_states: usize,
    pub purged_captures: u64,
    pub captures_delivered: usize,
    pub captures_pending: usize,
    /// The key-rotation pass, when one ran (see [`RESEAL_BATCH`]).
    pub reseal: Option<crate::domain::connections::reseal::ResealReport>,
    pub errors: Vec<String>,
}

impl SweepReport {
    pub fn lines(&self) -> Vec<String> {
        let mut lines = vec![format!(
            "refresh: {} due, {} refreshed, {} need re-authorization, {} failed; {} expired authorizations cleared; {} old captures purged",
            self.due, self.refreshed, self.needs_reauth, self.failed, self.expired_states, self.purged_captures
        )];
        if self.captures_delivered + self.captures_pending > 0 {
            lines.push(format!(
                "captures: {} delivered to F&O, {} still pending",
                self.captures_delivered, self.captures_pending
            ));
        }
        if let Some(r) = &self.reseal {
            lines.push(r.line());
        }
        lines.extend(self.errors.iter().cloned());
        lines
    }
}

/// One timer run. `next_run` is the schedule's next occurrence (Unix seconds), when the
/// host said. `captures` is `None` for a customer tenant's connections (captures live in
/// the deployment's own store).
pub async fn run(connections: &Connections, captures: Option<&Captures>, next_run: Option<i64>) -> SweepReport {
    let mut report = SweepReport::default();
    let cfg = connections.config();
    let clock = connections.clock();
    let t = clock.now();
    let margin = cfg.refresh_margin.as_secs() as i64;
    let next = next_run.unwrap_or(t + cfg.timer_lookahead.as_secs() as i64).clamp(t, t + MAX_LOOKAHEAD_SECS);
    // Page through what is due until nothing is left or the run's time is spent: a share
    // of the time until the next run, so runs do not pile up.
    let budget_ms = (next.saturating_sub(t).saturating_mul(1000) / 2).clamp(MIN_BUDGET_MS, MAX_BUDGET_MS);
    refresh_due(connections, t, next + margin, clock.now_millis() + budget_ms, &mut report).await;
    match connections.store().expired_pending(t, BATCH).await {
        Ok(expired) => {
            for c in expired {
                let id = c.id.clone();
                if connections.update(&id, Some(c), |c| c.pending = None).await.is_ok() {
                    report.expired_states += 1;
                }
            }
        }
        Err(e) => report.errors.push(format!("could not list expired authorizations: {e}")),
    }
    if let Some(captures) = captures {
        // The deliveries' own share of the run: a quarter of its budget, 5-60 s.
        let deadline = clock.now_millis() + (budget_ms / 4).clamp(5_000, 60_000);
        sweep_captures(captures, t - cfg.capture_retention.as_secs() as i64, deadline, &mut report).await;
    }
    let settled = connections.last_reseal().is_some_and(|r| r.done() && r.current_key == connections.current_key());
    if !settled {
        match connections.reseal(RESEAL_BATCH).await {
            Ok(r) => report.reseal = Some(r),
            Err(e) => report.errors.push(format!("could not seal records again with the current key: {e}")),
        }
    }
    report
}

/// Refreshes what expires before `horizon` (and keeps idle refresh tokens alive), page
/// by page, until nothing is left or `deadline` (Unix ms) has passed.
async fn refresh_due(connections: &Connections, t: i64, horizon: i64, deadline: i64, report: &mut SweepReport) {
    let clock = connections.clock();
    let catalog = connections.catalog();
    let keepalive = catalog.min_keepalive();
    let idle_before = keepalive.map(|k| t - k.as_secs() as i64).unwrap_or(i64::MIN);
    let mut seen = std::collections::HashSet::new();
    loop {
        let due = Due { before: horizon, idle_before, ready_at: t, limit: BATCH };
        let page = match connections.store().due_for_refresh(&due).await {
            Ok(page) => page,
            Err(e) => {
                report.errors.push(format!("could not list connections due for refresh: {e}"));
                break;
            }
        };
        let full = page.len() == BATCH;
        // A row that failed stays due (a non-transient provider error): never twice a run.
        let fresh: Vec<_> = page.into_iter().filter(|c| seen.insert(c.id.to_ascii_lowercase())).collect();
        if fresh.is_empty() {
            break;
        }
        report.due += fresh.len();
        let results: Vec<_> = futures_util::stream::iter(fresh)
            .map(|c| async move {
                let keep = catalog.get(&c.provider).and_then(|p| p.refresh_keepalive);
                let idle = keep.is_some_and(|k| c.refreshed_at.unwrap_or(c.created_at) < t - k.as_secs() as i64);
                let want = if idle { Want::RefreshedAfter(clock.now_millis()) } else { Want::ValidUntil(horizon) };
                let id = c.id.clone();
                // The row just read is the first read: two store requests per refresh.
                (id.clone(), connections.refresh_single_flight(&id, want, Some(c)).await)
            })
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        for (id, r) in results {
            match r {
                Ok(_) => report.refreshed += 1,
                Err(ConnectionError::NeedsReauth { .. }) => report.needs_reauth += 1,
                Err(e) => {
                    report.failed += 1;
                    report.errors.push(format!("connection {id}: {e}"));
                }
            }
        }
        if !full {
            break;
        }
        if clock.now_millis() > deadline {
            report.errors.push("the run's time was spent; the rest is refreshed by the next run".into());
            break;
        }
    }
}

/// Capture mode's share of a run: deliver what waits for F&O, purge what is old.
async fn sweep_captures(captures: &Captures, purge_before: i64, deadline_ms: i64, report: &mut SweepReport) {
    if captures.delivers() {
        match captures.deliver_pending(deadline_ms).await {
            Ok(pass) => {
                report.captures_delivered = pass.delivered;
                report.captures_pending = pass.pending;
            }
            Err(e) => report.errors.push(format!("could not deliver pending captures: {e}")),
        }
    }
    match captures.purge(purge_before).await {
        Ok(n) => report.purged_captures = n,
        Err(e) => report.errors.push(format!("could not purge captures: {e}")),
    }
    if let Err(e) = captures.purge_expectations().await {
        report.errors.push(format!("could not purge expired capture registrations: {e}"));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use crate::domain::captures::Captures;
    use crate::domain::connections::testing::{Answer, T0, fixture};
    use crate::support::config::CapturePolicy;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_run_pages_through_everything_due_with_two_store_writes_per_refresh() {
        let fx = fixture();
        let due = super::BATCH + 100;
        for i in 0..due {
            fx.seed_as(&format!("due-{i:04}"), "at-0", Some("rt-0"), T0 - 3500, T0 + 100).await;
            fx.endpoint.answer(Answer::Tokens { access: "at-1", refresh: None, expires_in: 3600 });
        }
        // Not due: expires well after the horizon.
        fx.seed_as("later", "at-0", Some("rt-0"), T0, T0 + 7200).await;
        let captures = Captures {
            store: fx.racing.clone(),
            expectations: fx.racing.clone(),
            keys: fx.keys.clone(),
            clock: fx.clock.clone(),
            policy: CapturePolicy { any_state: false, state_key_secret: None, max_pending: 10 },
            state_key: None,
            fno: None,
        };
        let (gets, updates) = (fx.racing.gets.load(Ordering::SeqCst), fx.racing.updates.load(Ordering::SeqCst));
        let report = super::run(&fx.conns, Some(&captures), Some(T0 + 300)).await;
        assert_eq!((report.due, report.refreshed, report.failed), (due, due, 0), "{:?}", report.errors);
        assert_eq!(fx.endpoint.sent().len(), due);
        let gets = fx.racing.gets.load(Ordering::SeqCst) - gets;
        let updates = fx.racing.updates.load(Ordering::SeqCst) - updates;
        assert_eq!(gets, 0, "the due query's rows are the first read");
        assert_eq!(updates, 2 * due as i64, "the lease, then the tokens");
        // A second run finds nothing due.
        let again = super::run(&fx.conns, Some(&captures), Some(T0 + 300)).await;
        assert_eq!(again.due, 0);
    }
}

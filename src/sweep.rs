//! The timer's work, one run: refresh what would expire before the next run (plus the
//! margin), keep idle refresh tokens alive for providers that expire them, clear
//! expired authorizations, deliver pending captures to F&O, and purge old captures.
//! Every step runs even when an earlier one failed; the report says what happened.

use futures_util::StreamExt;

use crate::captures::Captures;
use crate::connections::refresh::Want;
use crate::connections::{ConnectionError, Connections};

/// How many refreshes run at once.
const CONCURRENCY: usize = 4;
/// How many rows one run takes of each kind.
const BATCH: usize = 500;
/// The furthest ahead a run refreshes, whatever the payload's `ScheduleStatus.Next` says:
/// a forged or broken `Next` must not refresh every connection at once.
const MAX_LOOKAHEAD_SECS: i64 = 3600;

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
        lines.extend(self.errors.iter().cloned());
        lines
    }
}

/// One timer run. `next_run` is the schedule's next occurrence (Unix seconds), when the
/// host said.
pub async fn run(connections: &Connections, captures: &Captures, next_run: Option<i64>) -> SweepReport {
    let mut report = SweepReport::default();
    let cfg = connections.config();
    let clock = connections.clock();
    let t = clock.now();
    let margin = cfg.refresh_margin.as_secs() as i64;
    let next = next_run.unwrap_or(t + cfg.timer_lookahead.as_secs() as i64);
    let horizon = next.clamp(t, t + MAX_LOOKAHEAD_SECS) + margin;
    let catalog = connections.catalog();
    let keepalive = catalog.iter().filter_map(|p| p.refresh_keepalive).min();
    let idle_before = keepalive.map(|k| t - k.as_secs() as i64).unwrap_or(i64::MIN);
    match connections.store().due_for_refresh(horizon, idle_before, BATCH).await {
        Ok(due) => {
            report.due = due.len();
            let results: Vec<_> = futures_util::stream::iter(due)
                .map(|c| async move {
                    let keep = catalog.get(&c.provider).and_then(|p| p.refresh_keepalive);
                    let idle = keep.is_some_and(|k| c.refreshed_at.unwrap_or(c.created_at) < t - k.as_secs() as i64);
                    let want = if idle { Want::RefreshedAfter(clock.now_millis()) } else { Want::ValidUntil(horizon) };
                    (c.id.clone(), connections.refresh_single_flight(&c.id, want).await)
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
        }
        Err(e) => report.errors.push(format!("could not list connections due for refresh: {e}")),
    }
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
    if captures.delivers() {
        match captures.deliver_pending().await {
            Ok((delivered, failed)) => {
                report.captures_delivered = delivered;
                report.captures_pending = failed;
            }
            Err(e) => report.errors.push(format!("could not deliver pending captures: {e}")),
        }
    }
    match captures.purge(t - cfg.capture_retention.as_secs() as i64).await {
        Ok(n) => report.purged_captures = n,
        Err(e) => report.errors.push(format!("could not purge captures: {e}")),
    }
    if let Err(e) = captures.purge_expectations().await {
        report.errors.push(format!("could not purge expired capture registrations: {e}"));
    }
    report
}

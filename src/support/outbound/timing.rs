//! Upstream time of the current request, for `Server-Timing`.
//!
//! A task-local counter rather than a value threaded through every call: the time is
//! spent deep in the Dataverse client, the token client or the Key Vault SDK, and each
//! of them only has to wrap its await in [`upstream`]. Outside a [`measure`] scope
//! (the timer, sub-commands) counting is a no-op.

use std::cell::Cell;
use std::future::Future;
use std::time::Instant;

tokio::task_local! {
    static UPSTREAM_NANOS: Cell<u64>;
}

/// Runs `f`, counting its duration as upstream time of the current request.
pub async fn upstream<F: Future>(f: F) -> F::Output {
    let t = Instant::now();
    let out = f.await;
    let _ = UPSTREAM_NANOS.try_with(|c| c.set(c.get() + t.elapsed().as_nanos() as u64));
    out
}

/// Runs a request's work and returns its output with the nanoseconds spent upstream.
pub async fn measure<F: Future>(f: F) -> (F::Output, u64) {
    UPSTREAM_NANOS
        .scope(Cell::new(0), async {
            let out = f.await;
            (out, UPSTREAM_NANOS.with(Cell::get))
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn counts_only_inside_a_scope() {
        // Outside a scope: no panic, nothing counted.
        upstream(async {}).await;
        let ((), nanos) = measure(async {
            upstream(tokio::time::sleep(std::time::Duration::from_millis(2))).await;
        })
        .await;
        assert!(nanos >= 2_000_000, "{nanos}");
    }
}

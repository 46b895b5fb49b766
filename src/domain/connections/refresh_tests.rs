//! The refresh state machine against the real SQLite store on a temporary file, with a
//! scripted token endpoint and a clock that jumps. No process, no provider, no waiting:
//! each test runs in milliseconds.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

use super::{REFRESH_BACKOFF, apply_tokens};
use crate::domain::connections::ConnectionError;
use crate::domain::connections::testing::{Answer, Fx, ID, T0, fixture, tokens};
use crate::domain::oauth::{ErrorCode, OAuthError};
use crate::domain::{Connection, ConnectionStore, Lease, Status};
use crate::support::time::Clock;

fn secret(s: &Option<SecretString>) -> Option<String> {
    s.as_ref().map(|s| s.expose_secret().to_string())
}

/// Obtained an hour ago, an hour-long token expiring within the 300 s margin: due.
async fn seed_due(fx: &Fx) -> Connection {
    fx.seed("at-0", Some("rt-0"), T0 - 3500, T0 + 100).await
}

#[tokio::test]
async fn a_fresh_token_is_served_without_calling_the_provider() {
    let fx = fixture();
    fx.seed("at-0", Some("rt-0"), T0 - 60, T0 + 3540).await;
    assert_eq!(fx.token().await.unwrap(), "at-0");
    assert_eq!(fx.token().await.unwrap(), "at-0");
    assert!(fx.endpoint.sent().is_empty());
}

#[tokio::test]
async fn a_due_token_is_refreshed_under_our_lease_and_the_lease_is_released() {
    let fx = fixture();
    seed_due(&fx).await;
    let sqlite = fx.sqlite.clone();
    let seen_lease: Arc<Mutex<Option<Lease>>> = Arc::default();
    let seen = seen_lease.clone();
    *fx.endpoint.during.lock().unwrap() = Some(Box::new(move || {
        Box::pin(async move {
            *seen.lock().unwrap() = sqlite.get(ID).await.unwrap().unwrap().lease;
        })
    }));
    fx.endpoint.answer(Answer::Tokens { access: "at-1", refresh: Some("rt-1"), expires_in: 3600 });

    assert_eq!(fx.token().await.unwrap(), "at-1");
    let lease = seen_lease.lock().unwrap().clone().expect("the record was leased during the call");
    assert_eq!(lease.owner, fx.conns.instance);
    assert_eq!(lease.until_ms, T0 * 1000 + 60_000);
    let rec = fx.record().await;
    assert_eq!((rec.lease, rec.failures, rec.refreshed_at), (None, 0, Some(T0)));
    assert_eq!(fx.endpoint.sent(), vec!["rt-0"]);
}

#[tokio::test]
async fn losing_the_lease_race_to_an_instance_that_refreshed_serves_its_token() {
    let fx = fixture();
    seed_due(&fx).await;
    // Just before we write our lease, another instance completes its own refresh.
    let (sqlite, keys) = (fx.sqlite.clone(), fx.keys.clone());
    *fx.racing.before_update.lock().unwrap() = Some(Box::new(move || {
        Box::pin(async move {
            let mut c = sqlite.get(ID).await.unwrap().unwrap();
            let expected = c.version.clone();
            apply_tokens(&mut c, &tokens("at-other", Some("rt-other"), T0 + 3600), &keys, T0);
            sqlite.update(&c, &expected).await.unwrap();
        })
    }));

    assert_eq!(fx.token().await.unwrap(), "at-other");
    assert!(fx.endpoint.sent().is_empty(), "our copy of the rotated refresh token was never sent");
}

#[tokio::test]
async fn a_crashed_instances_lease_is_waited_out_then_taken_over() {
    let fx = fixture();
    seed_due(&fx).await;
    fx.other_instance_writes(|c| c.lease = Some(Lease { owner: "other".into(), until_ms: T0 * 1000 + 2_000 })).await;
    fx.endpoint.answer(Answer::Tokens { access: "at-1", refresh: Some("rt-1"), expires_in: 3600 });

    assert_eq!(fx.token().await.unwrap(), "at-1");
    assert!(fx.clock.now_millis() >= T0 * 1000 + 2_000, "we waited for the lease to lapse");
    assert_eq!(fx.endpoint.sent(), vec!["rt-0"]);
}

#[tokio::test]
async fn a_lease_held_beyond_our_patience_answers_retry_later_without_a_call() {
    let fx = fixture();
    fx.seed("at-0", Some("rt-0"), T0 - 3600, T0 - 1).await; // expired: nothing to fall back on
    fx.other_instance_writes(|c| c.lease = Some(Lease { owner: "other".into(), until_ms: T0 * 1000 + 600_000 })).await;

    let err = fx.token().await.unwrap_err();
    assert!(matches!(err, ConnectionError::Backoff { retry_after: 1, .. }), "{err:?}");
    assert!(fx.endpoint.sent().is_empty());
}

#[tokio::test]
async fn newer_tokens_stored_by_another_instance_win_over_ours() {
    let fx = fixture();
    seed_due(&fx).await;
    // Our refresh call outlives our lease; meanwhile another instance refreshes and stores.
    let (sqlite, keys, clock) = (fx.sqlite.clone(), fx.keys.clone(), fx.clock.clone());
    *fx.endpoint.during.lock().unwrap() = Some(Box::new(move || {
        Box::pin(async move {
            clock.advance(Duration::from_secs(61));
            let mut c = sqlite.get(ID).await.unwrap().unwrap();
            let expected = c.version.clone();
            apply_tokens(&mut c, &tokens("at-other", Some("rt-other"), clock.now() + 3600), &keys, clock.now());
            sqlite.update(&c, &expected).await.unwrap();
        })
    }));
    fx.endpoint.answer(Answer::Tokens { access: "at-ours", refresh: Some("rt-ours"), expires_in: 3600 });

    assert_eq!(fx.token().await.unwrap(), "at-other");
    assert_eq!(secret(&fx.stored_tokens().await.refresh_token).as_deref(), Some("rt-other"));
}

#[tokio::test]
async fn a_rotated_refresh_token_replaces_the_old_one() {
    let fx = fixture();
    seed_due(&fx).await;
    fx.endpoint.answer(Answer::Tokens { access: "at-1", refresh: Some("rt-1"), expires_in: 3600 });
    fx.conns.access_token(ID, true).await.unwrap();
    fx.endpoint.answer(Answer::Tokens { access: "at-2", refresh: None, expires_in: 3600 });
    fx.clock.advance(Duration::from_millis(5));
    fx.conns.access_token(ID, true).await.unwrap();
    assert_eq!(fx.endpoint.sent(), vec!["rt-0", "rt-1"], "the second refresh used the rotated token");
}

#[tokio::test]
async fn a_refresh_without_rotation_keeps_the_refresh_token() {
    let fx = fixture();
    seed_due(&fx).await;
    fx.endpoint.answer(Answer::Tokens { access: "at-1", refresh: None, expires_in: 3600 });
    assert_eq!(fx.token().await.unwrap(), "at-1");
    let stored = fx.stored_tokens().await;
    assert_eq!(secret(&stored.refresh_token).as_deref(), Some("rt-0"));
    assert!(fx.record().await.has_refresh_token);
}

#[tokio::test]
async fn invalid_grant_marks_the_connection_needs_reauth_for_good() {
    let fx = fixture();
    seed_due(&fx).await;
    fx.endpoint.answer(Answer::Fail(OAuthError::Rejected {
        error: ErrorCode::InvalidGrant,
        description: Some("refresh token revoked".into()),
        status: 400,
    }));

    assert!(matches!(fx.token().await, Err(ConnectionError::NeedsReauth { .. })));
    let rec = fx.record().await;
    assert_eq!(rec.status, Status::NeedsReauth);
    assert!(rec.status_detail.unwrap().contains("invalid_grant"));
    assert_eq!(rec.lease, None);
    // No further call reaches the provider: only a person can fix this.
    assert!(matches!(fx.token().await, Err(ConnectionError::NeedsReauth { .. })));
    assert_eq!(fx.endpoint.sent().len(), 1);
}

#[tokio::test]
async fn a_transient_failure_backs_off_and_serves_the_still_valid_token() {
    let fx = fixture();
    seed_due(&fx).await;
    fx.endpoint.answer(Answer::Fail(OAuthError::Transient("the provider answered 503".into())));

    assert_eq!(fx.token().await.unwrap(), "at-0");
    let rec = fx.record().await;
    assert_eq!((rec.failures, rec.next_attempt_at, rec.lease), (1, Some(T0 + 30), None));
    // During the back-off the old token keeps being served, with no call.
    fx.clock.advance(Duration::from_secs(10));
    assert_eq!(fx.token().await.unwrap(), "at-0");
    assert_eq!(fx.endpoint.sent().len(), 1);
}

#[tokio::test]
async fn back_off_doubles_and_is_capped_then_clears_on_success() {
    let fx = fixture();
    // Expired: every failure surfaces, and the back-off is the only thing between calls.
    fx.seed("at-0", Some("rt-0"), T0 - 3600, T0 - 1).await;
    let mut waits = Vec::new();
    for _ in 0..8 {
        fx.endpoint.answer(Answer::Fail(OAuthError::Transient("down".into())));
        let err = fx.token().await.unwrap_err();
        let ConnectionError::Backoff { retry_after, .. } = err else { panic!("{err:?}") };
        waits.push(retry_after);
        // Inside the back-off: refused at once, no call.
        assert!(matches!(fx.token().await, Err(ConnectionError::Backoff { .. })));
        fx.clock.advance(Duration::from_secs(retry_after));
    }
    assert_eq!(waits, vec![30, 60, 120, 240, 480, 960, 1800, 1800]);
    assert_eq!(REFRESH_BACKOFF.delay(100), Duration::from_secs(1800));
    fx.endpoint.answer(Answer::Tokens { access: "at-1", refresh: None, expires_in: 3600 });
    assert_eq!(fx.token().await.unwrap(), "at-1");
    let rec = fx.record().await;
    assert_eq!((rec.failures, rec.next_attempt_at, rec.status_detail), (0, None, None));
}

#[tokio::test]
async fn a_token_shorter_than_the_margin_is_not_refreshed_on_every_call() {
    let fx = fixture();
    // A 120 s token: the 300 s margin shrinks to half its lifetime.
    fx.seed("at-0", Some("rt-0"), T0, T0 + 120).await;
    assert_eq!(fx.token().await.unwrap(), "at-0");
    fx.clock.advance(Duration::from_secs(59));
    assert_eq!(fx.token().await.unwrap(), "at-0");
    assert!(fx.endpoint.sent().is_empty());
    fx.clock.advance(Duration::from_secs(2)); // past half its life
    fx.endpoint.answer(Answer::Tokens { access: "at-1", refresh: None, expires_in: 120 });
    assert_eq!(fx.token().await.unwrap(), "at-1");
    assert_eq!(fx.endpoint.sent().len(), 1);
}

#[tokio::test]
async fn force_refresh_gets_a_new_token_even_when_the_old_one_is_fresh() {
    let fx = fixture();
    fx.seed("at-0", Some("rt-0"), T0 - 60, T0 + 3540).await;
    fx.endpoint.answer(Answer::Tokens { access: "at-1", refresh: None, expires_in: 3600 });
    let t = fx.conns.access_token(ID, true).await.unwrap();
    assert_eq!(t.secret(), "at-1");
    assert_eq!(fx.endpoint.sent(), vec!["rt-0"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_callers_share_one_refresh() {
    let fx = Arc::new(fixture());
    seed_due(&fx).await;
    fx.endpoint.answer(Answer::Tokens { access: "at-1", refresh: Some("rt-1"), expires_in: 3600 });
    let calls: Vec<_> = (0..16)
        .map(|_| {
            let fx = fx.clone();
            tokio::spawn(async move { fx.token().await.unwrap() })
        })
        .collect();
    for c in calls {
        assert_eq!(c.await.unwrap(), "at-1");
    }
    assert_eq!(fx.endpoint.sent(), vec!["rt-0"]);
}

#[tokio::test]
async fn an_expired_token_without_a_refresh_token_needs_reauth() {
    let fx = fixture();
    fx.seed("at-0", None, T0 - 3600, T0 - 1).await;
    assert!(matches!(fx.token().await, Err(ConnectionError::NeedsReauth { .. })));
    assert_eq!(fx.record().await.status, Status::NeedsReauth);
}

#[tokio::test]
async fn the_change_feed_drops_other_instances_changes_but_not_our_own_writes() {
    use crate::domain::{Changes, Version};
    use std::sync::atomic::Ordering;
    let fx = fixture();
    seed_due(&fx).await;
    fx.endpoint.answer(Answer::Tokens { access: "at-1", refresh: Some("rt-1"), expires_in: 3600 });
    assert_eq!(fx.token().await.unwrap(), "at-1");
    let ours = fx.record().await.version;
    let reads = fx.racing.gets.load(Ordering::SeqCst);
    // Our own refresh comes back through the feed with the version we wrote: kept.
    fx.conns.forget(&Changes::Ids(vec![(ID.into(), Some(ours.clone()))]));
    assert_eq!(fx.token().await.unwrap(), "at-1");
    assert_eq!(fx.racing.gets.load(Ordering::SeqCst), reads, "served from the cache");
    // Another instance's write (another version), or a deletion: dropped, read again.
    fx.conns.forget(&Changes::Ids(vec![(ID.into(), Some(Version("W/\"other\"".into())))]));
    assert_eq!(fx.token().await.unwrap(), "at-1");
    assert_eq!(fx.racing.gets.load(Ordering::SeqCst), reads + 1);
    fx.conns.forget(&Changes::Ids(vec![(ID.into(), None)]));
    assert_eq!(fx.token().await.unwrap(), "at-1");
    assert_eq!(fx.racing.gets.load(Ordering::SeqCst), reads + 2);
}

/// Lets the background write of a noted use land.
async fn settle(fx: &Fx, uses: i64) {
    for _ in 0..200 {
        if fx.racing.uses.load(std::sync::atomic::Ordering::SeqCst) >= uses && fx.record().await.last_used_at.is_some()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A caller that names itself (`access_token_for`, outside any actor scope, as the back
/// office and the agents' tools ask) is who the use is recorded for, on a cached token too.
#[tokio::test]
async fn a_use_asked_for_an_actor_is_recorded_as_that_actor() {
    use crate::support::audit::Actor;
    let fx = fixture();
    fx.seed("at-0", Some("rt-0"), T0 - 60, T0 + 3540).await;
    let app = Actor { app_id: Some("app-2".into()), ..Default::default() };
    assert_eq!(fx.conns.access_token_for(ID, false, &app).await.unwrap().secret(), "at-0");
    settle(&fx, 1).await;
    assert_eq!(fx.record().await.last_used_by.as_deref(), Some("app app-2"));
}

#[tokio::test]
async fn a_use_is_recorded_once_a_minute_with_who_used_it_and_a_refresh_keeps_it() {
    use crate::support::audit::{Actor, acting};
    use std::sync::atomic::Ordering;
    let fx = fixture();
    fx.seed("at-0", Some("rt-0"), T0 - 60, T0 + 3540).await;
    let app = Actor { app_id: Some("app-1".into()), ..Default::default() };
    for _ in 0..5 {
        assert_eq!(acting(app.clone(), fx.token()).await.unwrap(), "at-0");
    }
    settle(&fx, 1).await;
    let rec = fx.record().await;
    assert_eq!((rec.last_used_at, rec.last_used_by.as_deref()), (Some(T0), Some("app app-1")));
    assert_eq!(fx.racing.uses.load(Ordering::SeqCst), 1, "five uses within a minute: one write");

    // The timer's refreshes are not uses; a minute later, the next caller's use is.
    acting(Actor::timer(), fx.token()).await.unwrap();
    fx.clock.advance(Duration::from_secs(59));
    acting(app.clone(), fx.token()).await.unwrap();
    assert_eq!(fx.racing.uses.load(Ordering::SeqCst), 1);
    fx.clock.advance(Duration::from_secs(1));
    let portal = Actor { contact: Some("c-1".into()), ..Default::default() };
    acting(portal, fx.token()).await.unwrap();
    for _ in 0..200 {
        if fx.record().await.last_used_by.as_deref() == Some("contact c-1") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rec = fx.record().await;
    assert_eq!((rec.last_used_at, rec.last_used_by.as_deref()), (Some(T0 + 60), Some("contact c-1")));
    assert_eq!(fx.racing.uses.load(Ordering::SeqCst), 2);

    // A refresh writes the whole record: the last use stays as it was.
    fx.clock.advance(Duration::from_secs(3300));
    fx.endpoint.answer(Answer::Tokens { access: "at-1", refresh: Some("rt-1"), expires_in: 3600 });
    assert_eq!(acting(Actor::timer(), fx.token()).await.unwrap(), "at-1");
    let rec = fx.record().await;
    assert_eq!((rec.refreshed_at, rec.last_used_at), (Some(T0 + 3360), Some(T0 + 60)));
    assert_eq!(rec.last_used_by.as_deref(), Some("contact c-1"));
}

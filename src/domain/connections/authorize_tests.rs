//! Completing an authorization when the store fails after the code was spent (issue
//! [2/7] item 6): nothing may be left alive at the provider, and the connection must
//! say what happened once the store answers again.

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::domain::connections::testing::{Answer, fixture};
use crate::domain::connections::{CallbackFailure, NewConnection};
use crate::domain::oauth::{AuthorizationCode, TokenHint};
use crate::domain::{ConnectionStore, Status};
use crate::support::time::Clock;

#[tokio::test]
async fn tokens_that_cannot_be_stored_are_revoked_and_the_failure_recorded_later() {
    let fx = fixture();
    let new = NewConnection { provider: "p".into(), connection_id: Some("c1".into()), ..Default::default() };
    let started = fx.conns.start(new).await.unwrap();
    let state = started.authorization_url.query_pairs().find(|(k, _)| k == "state").unwrap().1.into_owned();
    let verified = fx.keys.verify_state(&state, fx.clock.now()).unwrap();

    // The consume of the state goes through; every write after it finds the store locked.
    fx.racing.updates_before_outage.store(1, Ordering::SeqCst);
    fx.endpoint.answer(Answer::Tokens { access: "at-1", refresh: Some("rt-1"), expires_in: 3600 });
    let outcome = fx.conns.complete(&verified, Some(&AuthorizationCode::new("code-1")), None, None, None).await;
    assert!(matches!(outcome, Err(CallbackFailure::NotSaved { revoked: true })), "{outcome:?}");
    assert_eq!(
        *fx.endpoint.revoked.lock().unwrap(),
        vec![("rt-1".to_string(), TokenHint::RefreshToken)],
        "the grant was withdrawn at the provider"
    );
    let rec = fx.sqlite.get("c1").await.unwrap().unwrap();
    assert_eq!((rec.status, rec.tokens.is_none(), rec.pending.is_none()), (Status::Pending, true, true));

    // The store comes back: the connection says what happened.
    fx.racing.updates_before_outage.store(-1, Ordering::SeqCst);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let rec = fx.sqlite.get("c1").await.unwrap().unwrap();
        if rec.status == Status::Failed {
            let detail = rec.status_detail.unwrap();
            assert!(detail.contains("could not be stored") && detail.contains("revoked at the provider"), "{detail}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the failure was never recorded");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The store stays down and the provider's revocation endpoint answers 503 once: the
/// revocation is tried again until it goes through, and the record says so truthfully
/// (never that the provider has no revocation endpoint).
#[tokio::test]
async fn a_revocation_that_fails_once_is_retried_and_recorded_as_it_went() {
    let fx = fixture();
    let new = NewConnection { provider: "p".into(), connection_id: Some("c2".into()), ..Default::default() };
    let started = fx.conns.start(new).await.unwrap();
    let state = started.authorization_url.query_pairs().find(|(k, _)| k == "state").unwrap().1.into_owned();
    let verified = fx.keys.verify_state(&state, fx.clock.now()).unwrap();
    fx.racing.updates_before_outage.store(1, Ordering::SeqCst);
    fx.endpoint.revocations_failing.store(1, Ordering::SeqCst);
    fx.endpoint.answer(Answer::Tokens { access: "at-1", refresh: Some("rt-1"), expires_in: 3600 });
    let outcome = fx.conns.complete(&verified, Some(&AuthorizationCode::new("code-1")), None, None, None).await;
    assert!(matches!(outcome, Err(CallbackFailure::NotSaved { revoked: false })), "{outcome:?}");

    // The revocation is retried until it goes through, and the record ends up saying so.
    fx.racing.updates_before_outage.store(-1, Ordering::SeqCst);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let rec = fx.sqlite.get("c2").await.unwrap().unwrap();
        let detail = rec.status_detail.clone().unwrap_or_default();
        if rec.status == Status::Failed && detail.contains("revoked at the provider") {
            assert!(!detail.contains("no revocation endpoint"), "{detail}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never recorded as revoked: {detail:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let revoked = fx.endpoint.revoked.lock().unwrap().clone();
    assert_eq!(revoked.len(), 2, "refused once, then revoked: {revoked:?}");
    assert!(revoked.iter().all(|r| *r == ("rt-1".to_string(), TokenHint::RefreshToken)));
}

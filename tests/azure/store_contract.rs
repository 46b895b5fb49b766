//! One behavioural suite for every store: the embedded SQLite file and Dataverse (the
//! Web API double, provisioned by the real `provision` code). Whatever the connections
//! code relies on (versions that conflict, single-use states, captures kept once, the
//! timer's scans) must hold the same way in both.

use crate::support;

use std::sync::Arc;
use std::time::Duration;

use dynamics_companion::clients::azure::StaticToken;
use dynamics_companion::clients::dataverse::Dataverse;
use dynamics_companion::clients::dataverse::provision::{Schema, provision};
use dynamics_companion::clients::store::dataverse::DataverseStore;
use dynamics_companion::clients::store::sqlite::SqliteStore;
use dynamics_companion::domain::{
    Capture, Connection, Due, Lease, ListFilter, PendingAuth, Status, Store, StoreError, Tenant, TenantStatus,
};
use secrecy::SecretString;
use support::dataverse::DataverseDouble;

fn connection(id: &str, provider: &str, owner: &str) -> Connection {
    let scopes = vec!["offline_access".into(), "api.read".into()];
    let mut c = Connection::new(id, provider, Some(owner.into()), scopes, Status::Pending, 1_000);
    c.pending = Some(PendingAuth { state_hash: format!("hash-{id}"), sealed: "v1.k.sealed".into(), expires_at: 2_000 });
    c
}

fn same_data(a: &Connection, b: &Connection) {
    let mut a = a.clone();
    a.version = b.version.clone();
    assert_eq!(&a, b);
}

async fn contract(store: Arc<dyn Store>) {
    store.ping().await.unwrap();

    // Insert and read back, field for field.
    let mut a = connection("erp-a", "acme", "account:1");
    a.version = store.insert(&a).await.unwrap();
    let got = store.get("erp-a").await.unwrap().expect("inserted");
    same_data(&a, &got);
    assert_eq!(got.version, a.version);
    // Ids are case-insensitive, in both stores.
    assert!(store.get("ERP-A").await.unwrap().is_some());
    assert!(matches!(store.insert(&connection("ERP-A", "acme", "x")).await, Err(StoreError::Conflict(_))));
    assert!(store.get("missing").await.unwrap().is_none());

    // Updates name the version they read; a stale version conflicts and changes nothing.
    let v1 = a.version.clone();
    let mut b = a.clone();
    b.status = Status::Active;
    b.tokens = Some("v1.k.ciphertext".into());
    b.access_expires_at = Some(1_500);
    b.has_refresh_token = true;
    b.pending = None;
    b.lease = Some(Lease { owner: "instance-1".into(), until_ms: 1_700_000_000_000 });
    b.refreshed_at = Some(1_100);
    let v2 = store.update(&b, &v1).await.unwrap();
    assert_ne!(v2, v1);
    let mut stale = a.clone();
    stale.status_detail = Some("should not land".into());
    assert!(matches!(store.update(&stale, &v1).await, Err(StoreError::Conflict(_))));
    let got = store.get("erp-a").await.unwrap().unwrap();
    b.version = v2.clone();
    same_data(&b, &got);
    assert_eq!(got.version, v2);

    // Racing writers from one version: exactly one wins.
    let results = futures_util::future::join_all((0..8).map(|i| {
        let store = store.clone();
        let mut c = got.clone();
        let v = got.version.clone();
        c.failures = i;
        async move { store.update(&c, &v).await }
    }))
    .await;
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1, "{results:?}");
    assert!(results.iter().filter(|r| r.is_err()).all(|r| matches!(r, Err(StoreError::Conflict(_)))));

    // A pending authorization is found by its state hash, exactly.
    let mut p = connection("erp-p", "acme", "account:2");
    p.version = store.insert(&p).await.unwrap();
    assert_eq!(store.find_by_state("hash-erp-p").await.unwrap().map(|c| c.id), Some("erp-p".to_string()));
    assert!(store.find_by_state("HASH-ERP-P").await.unwrap().is_none(), "state hashes match exactly");
    assert!(store.find_by_state("hash-nothing").await.unwrap().is_none());

    // Lists filter by provider, owner and status.
    store.insert(&connection("other-1", "globex", "account:1")).await.unwrap();
    let by_provider = store.list(&ListFilter { provider: Some("acme".into()), ..Default::default() }).await.unwrap();
    assert_eq!(ids(&by_provider), ["erp-a", "erp-p"]);
    let by_owner = store.list(&ListFilter { owner: Some("account:1".into()), ..Default::default() }).await.unwrap();
    assert_eq!(ids(&by_owner), ["erp-a", "other-1"]);
    let active = store.list(&ListFilter { status: Some(Status::Active), ..Default::default() }).await.unwrap();
    assert_eq!(ids(&active), ["erp-a"]);

    // The timer's scans.
    let due = store
        .due_for_refresh(&Due { before: 1_600, idle_before: i64::MIN, ready_at: i64::MAX, limit: 100 })
        .await
        .unwrap();
    assert_eq!(ids(&due), ["erp-a"], "active, refreshable, expiring before 1600");
    assert!(
        store
            .due_for_refresh(&Due { before: 1_400, idle_before: i64::MIN, ready_at: i64::MAX, limit: 100 })
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        ids(&store
            .due_for_refresh(&Due { before: 1_400, idle_before: 1_200, ready_at: i64::MAX, limit: 100 })
            .await
            .unwrap()),
        ["erp-a"],
        "idle since 1100"
    );
    // Backing off until 1500: not due at 1450, due again at 1500.
    let mut backing = store.get("erp-a").await.unwrap().unwrap();
    let expected = backing.version.clone();
    backing.next_attempt_at = Some(1_500);
    backing.version = store.update(&backing, &expected).await.unwrap();
    assert!(
        store
            .due_for_refresh(&Due { before: 1_600, idle_before: i64::MIN, ready_at: 1_450, limit: 100 })
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        ids(&store
            .due_for_refresh(&Due { before: 1_600, idle_before: i64::MIN, ready_at: 1_500, limit: 100 })
            .await
            .unwrap()),
        ["erp-a"]
    );
    let expired = store.expired_pending(2_001, 100).await.unwrap();
    assert_eq!(ids(&expired), ["erp-p", "other-1"]);
    assert!(store.expired_pending(2_000, 100).await.unwrap().is_empty());

    // Deletes name the version too.
    let current = store.get("erp-a").await.unwrap().unwrap();
    assert!(matches!(store.delete("erp-a", &v1).await, Err(StoreError::Conflict(_))));
    store.delete("erp-a", &current.version).await.unwrap();
    assert!(store.get("erp-a").await.unwrap().is_none());
    assert!(matches!(store.delete("erp-a", &current.version).await, Err(StoreError::NotFound(_))));

    // Captures: once per key, read back by exact state, purged by age.
    let cap = |key: &str, state: &str, at: i64| Capture {
        key: key.into(),
        state: state.into(),
        code: Some(format!("v1.k.{key}")),
        iss: Some("https://erp.example".into()),
        error: None,
        error_description: None,
        received_at: at,
        delivered_at: Some(at),
        claim_until_ms: None,
        attempts: 0,
    };
    assert!(store.insert_capture(&cap("k1", "State-1", 100)).await.unwrap());
    assert!(!store.insert_capture(&cap("k1", "State-1", 101)).await.unwrap(), "the same code is not a second record");
    assert!(store.insert_capture(&cap("k2", "State-1", 102)).await.unwrap());
    assert!(store.insert_capture(&cap("k3", "state-1", 103)).await.unwrap());
    let got = store.captures_by_state("State-1").await.unwrap();
    assert_eq!(got.iter().map(|c| c.key.as_str()).collect::<Vec<_>>(), ["k1", "k2"]);
    assert_eq!(got[0], cap("k1", "State-1", 100));
    // Not yet delivered (F&O unreachable): listed, kept by the purge until delivered.
    let mut pending = cap("k4", "state-4", 90);
    pending.delivered_at = None;
    assert!(store.insert_capture(&pending).await.unwrap());
    let undelivered = store.undelivered_captures(10, None).await.unwrap();
    assert_eq!(undelivered.iter().map(|c| c.key.as_str()).collect::<Vec<_>>(), ["k4"]);
    // Claims: one of any number of claimants wins; a held claim hides it from the ready
    // list until it ends; a released one waits for its next attempt.
    let now_ms = 1_000_000;
    let claims = futures_util::future::join_all((0..6).map(|_| store.claim_capture("k4", now_ms, now_ms + 5000))).await;
    assert_eq!(claims.iter().filter(|c| matches!(c, Ok(true))).count(), 1, "{claims:?}");
    assert!(store.undelivered_captures(10, Some(now_ms + 4999)).await.unwrap().is_empty());
    assert_eq!(store.undelivered_captures(10, Some(now_ms + 5000)).await.unwrap().len(), 1);
    assert!(!store.claim_capture("k4", now_ms + 100, now_ms + 9000).await.unwrap(), "held");
    store.release_capture("k4", now_ms + 8000, 1).await.unwrap();
    let released = &store.undelivered_captures(10, None).await.unwrap()[0];
    assert_eq!((released.claim_until_ms, released.attempts), (Some(now_ms + 8000), 1));
    assert!(!store.claim_capture("k4", now_ms + 7999, now_ms + 20_000).await.unwrap(), "not before its next attempt");
    assert!(store.claim_capture("k4", now_ms + 8000, now_ms + 20_000).await.unwrap());
    assert!(!store.claim_capture("nope", now_ms, now_ms + 1).await.unwrap(), "no such capture");
    assert_eq!(store.purge_captures(103).await.unwrap(), 2);
    assert!(store.captures_by_state("State-1").await.unwrap().is_empty());
    assert_eq!(store.captures_by_state("state-1").await.unwrap().len(), 1);
    assert_eq!(store.captures_by_state("state-4").await.unwrap().len(), 1, "undelivered captures are not purged");
    store.mark_capture_delivered("k4", 150).await.unwrap();
    assert!(store.undelivered_captures(10, None).await.unwrap().is_empty());
    assert!(!store.claim_capture("k4", i64::MAX - 1, i64::MAX).await.unwrap(), "a delivered capture is not claimed");
    assert_eq!(store.captures_by_state("state-4").await.unwrap()[0].delivered_at, Some(150));
    assert_eq!(store.purge_captures(103).await.unwrap(), 1);

    // Expected states (capture mode keeps only these): registered, extended, purged.
    let (h1, h2) = ("aa11".repeat(16), "bb22".repeat(16));
    assert_eq!(store.expected_until(&h1).await.unwrap(), None);
    store.expect_state(&h1, 500).await.unwrap();
    store.expect_state(&h2, 100).await.unwrap();
    assert_eq!(store.expected_until(&h1).await.unwrap(), Some(500));
    store.expect_state(&h1, 700).await.unwrap();
    assert_eq!(store.expected_until(&h1).await.unwrap(), Some(700), "registering again extends");
    assert_eq!(store.purge_expectations(200).await.unwrap(), 1);
    assert_eq!(store.expected_until(&h2).await.unwrap(), None);
    assert_eq!(store.expected_until(&h1).await.unwrap(), Some(700));

    // Paging the list: after a cursor (created at, id), in that order, nothing twice.
    let all = store.list(&ListFilter { limit: 100, ..Default::default() }).await.unwrap();
    assert!(all.len() >= 2, "the contract left connections to page over");
    let first = store.list(&ListFilter { limit: 1, ..Default::default() }).await.unwrap();
    let after = first.last().map(|c| (c.created_at, c.id.clone()));
    let rest = store.list(&ListFilter { limit: 100, after, ..Default::default() }).await.unwrap();
    let paged: Vec<&str> = first.iter().chain(rest.iter()).map(|c| c.id.as_str()).collect();
    let whole: Vec<&str> = all.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(paged, whole);

    // A use is recorded alone: the record's own fields are untouched, a writer holding
    // the version it read either still wins (SQLite) or re-reads (Dataverse's ETag moves),
    // and its write keeps the use. An id that is gone is nothing to note.
    let mut fresh = connection("erp-use", "acme", "account:9");
    fresh.version = store.insert(&fresh).await.unwrap();
    let before = store.get("erp-use").await.unwrap().unwrap();
    assert_eq!((before.last_used_at, before.last_used_by.as_deref()), (None, None));
    store.record_use("ERP-USE", 1_234, "app 11111111-2222-3333-4444-555555555555").await.unwrap();
    let used = store.get("erp-use").await.unwrap().unwrap();
    assert_eq!(used.last_used_at, Some(1_234));
    assert_eq!(used.last_used_by.as_deref(), Some("app 11111111-2222-3333-4444-555555555555"));
    let mut written = used.clone();
    written.status_detail = Some("a refresh's write".into());
    written.last_used_at = None;
    written.last_used_by = None;
    let version = match store.update(&written, &before.version).await {
        Ok(v) => v,
        Err(StoreError::Conflict(_)) => store.update(&written, &used.version).await.unwrap(),
        Err(e) => panic!("{e}"),
    };
    let after = store.get("erp-use").await.unwrap().unwrap();
    assert_eq!(after.version, version);
    assert_eq!(after.status_detail.as_deref(), Some("a refresh's write"));
    assert_eq!((after.last_used_at, after.last_used_by), (Some(1_234), used.last_used_by));
    store.record_use("never-there", 1_234, "app x").await.unwrap();
    assert!(store.get("never-there").await.unwrap().is_none(), "a use creates no record");

    tenant_contract(store.as_ref()).await;
}

/// Customer tenants (multi-tenant deployments): the same rules as connections.
async fn tenant_contract(store: &dyn Store) {
    let mut t = Tenant {
        id: "aaaaaaaa-1111-4111-8111-aaaaaaaaaaaa".into(),
        org_url: Some("https://contoso.crm4.dynamics.com".into()),
        status: TenantStatus::ConsentPending,
        status_detail: None,
        state_hash: Some("h".repeat(64)),
        state_expires_at: Some(9_000),
        started_by: Some("ops-client".into()),
        consented_at: None,
        onboarded_at: None,
        created_at: 1_000,
        updated_at: 1_000,
        version: Default::default(),
    };
    assert!(store.get_tenant(&t.id).await.unwrap().is_none());
    let v1 = store.insert_tenant(&t).await.unwrap();
    assert!(matches!(store.insert_tenant(&t).await, Err(StoreError::Conflict(_))));
    let got = store.get_tenant(&t.id.to_uppercase()).await.unwrap().expect("inserted, case-insensitive id");
    t.version = got.version.clone();
    assert_eq!(got, t);
    let mut next = t.clone();
    next.status = TenantStatus::Consented;
    next.state_hash = None;
    next.state_expires_at = None;
    next.consented_at = Some(1_200);
    let v2 = store.update_tenant(&next, &v1).await.unwrap();
    assert!(matches!(store.update_tenant(&t, &v1).await, Err(StoreError::Conflict(_))), "a stale version conflicts");
    next.version = v2;
    let mut other = t.clone();
    other.id = "bbbbbbbb-2222-4222-8222-bbbbbbbbbbbb".into();
    store.insert_tenant(&other).await.unwrap();
    let list = store.list_tenants().await.unwrap();
    assert_eq!(list.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(), [t.id.as_str(), other.id.as_str()]);
    assert_eq!(list[0], next);
    assert!(store.delete_tenant(&other.id).await.unwrap());
    assert!(!store.delete_tenant(&other.id).await.unwrap());
    assert_eq!(store.list_tenants().await.unwrap().len(), 1);
}

fn ids(list: &[Connection]) -> Vec<&str> {
    let mut v: Vec<&str> = list.iter().map(|c| c.id.as_str()).collect();
    v.sort();
    v
}

#[tokio::test]
async fn the_sqlite_store_keeps_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("contract.db")).unwrap();
    contract(Arc::new(store)).await;
}

async fn dataverse_store(double: &DataverseDouble) -> (Arc<Dataverse>, Arc<dyn Store>) {
    let url = url::Url::parse(&double.url).unwrap();
    let token = Arc::new(StaticToken(SecretString::from("test-s2s-token".to_string())));
    let dv = Arc::new(Dataverse::new(&url, reqwest::Client::new(), token, None));
    let schema = Schema::new("dc");
    provision(&dv, &schema, &dynamics_companion::clients::dataverse::provision::TABLES, Duration::from_secs(30))
        .await
        .unwrap();
    let store: Arc<dyn Store> = Arc::new(DataverseStore::new(dv.clone(), schema));
    (dv, store)
}

#[tokio::test]
async fn the_dataverse_store_keeps_the_contract() {
    let double = DataverseDouble::start();
    let (_, store) = dataverse_store(&double).await;
    contract(store).await;
}

#[tokio::test]
async fn the_dataverse_store_keeps_the_contract_while_throttled() {
    let double = DataverseDouble::start();
    let (dv, store) = dataverse_store(&double).await;
    double
        .faults(serde_json::json!({ "rate": 0.3, "statuses": [429, 503], "retry_after_seconds": 0, "seed": 7 }))
        .await;
    contract(store).await;
    let stats = double.stats().await;
    assert!(stats["faults_injected"].as_u64().unwrap() > 5, "faults were injected: {stats}");
    assert!(dv.requests.load(std::sync::atomic::Ordering::Relaxed) > stats["faults_injected"].as_u64().unwrap());
}

/// Issue [3/7]: one limit on concurrent Dataverse requests per client, whatever asks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_dataverse_requests_never_exceed_the_limit() {
    let double = DataverseDouble::start();
    dataverse_store(&double).await; // provisioned
    let url = url::Url::parse(&double.url).unwrap();
    let token = Arc::new(StaticToken(SecretString::from("test-s2s-token".to_string())));
    let dv = Arc::new(Dataverse::new(&url, reqwest::Client::new(), token, None).with_concurrency(4));
    let store: Arc<dyn Store> = Arc::new(DataverseStore::new(dv.clone(), Schema::new("dc")));
    double.reset().await;
    double.faults(serde_json::json!({ "rate": 0.0, "delay_ms": 40 })).await;
    let reads = (0..40).map(|i| {
        let store = store.clone();
        async move { store.get(&format!("missing-{i}")).await.unwrap() }
    });
    let got = futures_util::future::join_all(reads).await;
    assert!(got.iter().all(Option::is_none));
    let stats = double.stats().await;
    assert_eq!(stats["peak_in_flight"], 4, "{stats}");
    assert_eq!(dv.concurrency(), (4, 4));
}

/// Issue [3/7]: a 429 pauses the whole client for its `Retry-After`, not only the
/// request that got it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_pauses_every_request_of_the_client() {
    let double = DataverseDouble::start();
    let (_, store) = dataverse_store(&double).await;
    double.reset().await;
    double.faults(serde_json::json!({ "rate": 1.0, "statuses": [429], "retry_after_seconds": 2, "count": 1 })).await;
    let started = std::time::Instant::now();
    let first = {
        let store = store.clone();
        tokio::spawn(async move { store.get("first").await.unwrap() })
    };
    tokio::time::sleep(Duration::from_millis(300)).await; // the 429 has been answered
    let later = (0..9).map(|i| {
        let store = store.clone();
        async move {
            store.get(&format!("later-{i}")).await.unwrap();
            started.elapsed()
        }
    });
    let took = futures_util::future::join_all(later).await;
    first.await.unwrap();
    let stats = double.stats().await;
    assert_eq!(stats["faults_by_status"]["429"], 1, "{stats}");
    for t in &took {
        assert!(*t >= Duration::from_millis(1900), "a request went out during the pause: {took:?}");
    }
    assert_eq!(stats["requests"], 11, "the throttled one twice, the others once: {stats}");
}

/// Issue [3b/7]: requests already queued for a place when a 429 arrives wait out its
/// pause too; a pause longer than a request waits (10 s) is said at once (`Busy` with the
/// time left, a 503 with `Retry-After` to an HTTP caller) and nothing reaches Dataverse
/// during it, for a `Retry-After` beyond the old 30 s cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_requests_wait_out_a_pause_and_a_long_one_is_said_at_once() {
    let double = DataverseDouble::start();
    dataverse_store(&double).await; // provisioned
    let url = url::Url::parse(&double.url).unwrap();
    let token = Arc::new(StaticToken(SecretString::from("test-s2s-token".to_string())));
    let dv = Arc::new(Dataverse::new(&url, reqwest::Client::new(), token, None).with_concurrency(2));
    let store: Arc<dyn Store> = Arc::new(DataverseStore::new(dv.clone(), Schema::new("dc")));
    double.reset().await;
    double.faults(serde_json::json!({ "rate": 1.0, "statuses": [429], "retry_after_seconds": 3, "count": 1, "delay_ms": 200 })).await;
    let started = std::time::Instant::now();
    let reads = (0..10).map(|i| {
        let store = store.clone();
        async move {
            store.get(&format!("queued-{i}")).await.unwrap();
            started.elapsed()
        }
    });
    let watcher = async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        double.stats().await["requests"].as_u64().unwrap()
    };
    let (took, sent_during_pause) = tokio::join!(futures_util::future::join_all(reads), watcher);
    assert!(
        sent_during_pause <= 3,
        "{sent_during_pause} requests went out while paused (2 in flight when the 429 came)"
    );
    let late = took.iter().filter(|t| **t >= Duration::from_millis(3000)).count();
    assert!(late >= 7, "the queued ones waited out the 3 s pause: {took:?}");
    assert_eq!(double.stats().await["requests"], 11, "the throttled one twice, the others once");

    // Retry-After: 120, beyond any request's patience: said at once, nothing sent.
    double.reset().await;
    double.faults(serde_json::json!({ "rate": 1.0, "statuses": [429], "retry_after_seconds": 120, "count": 1 })).await;
    let t = std::time::Instant::now();
    let first = store.get("first").await;
    assert!(
        matches!(&first, Err(dynamics_companion::domain::StoreError::Busy { retry_after, .. })
            if *retry_after > Duration::from_secs(110) && *retry_after <= Duration::from_secs(120)),
        "{first:?}"
    );
    for i in 0..5 {
        let r = store.get(&format!("during-{i}")).await;
        assert!(matches!(r, Err(dynamics_companion::domain::StoreError::Busy { .. })), "{r:?}");
    }
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert_eq!(double.stats().await["requests"], 1, "only the one that drew the 429");
}

#[tokio::test]
async fn provision_creates_everything_once() {
    let double = DataverseDouble::start();
    let url = url::Url::parse(&double.url).unwrap();
    let token = Arc::new(StaticToken(SecretString::from("t".to_string())));
    let dv = Dataverse::new(&url, reqwest::Client::new(), token, Some("DynamicsCompanion".into()));
    let schema = Schema::new("dc");
    let first =
        provision(&dv, &schema, &dynamics_companion::clients::dataverse::provision::TABLES, Duration::from_secs(30))
            .await
            .unwrap();
    assert!(first.changes >= 6, "{:?}", first.lines);
    let writes = double.stats().await["metadata_writes"].as_u64().unwrap();
    assert!(writes > 0);
    let second =
        provision(&dv, &schema, &dynamics_companion::clients::dataverse::provision::TABLES, Duration::from_secs(30))
            .await
            .unwrap();
    assert_eq!(second.changes, 0, "{:?}", second.lines);
    assert_eq!(double.stats().await["metadata_writes"].as_u64().unwrap(), writes, "the second run wrote nothing");
    let tables = double.rows("dc_connections").await;
    assert!(tables.is_empty());
}

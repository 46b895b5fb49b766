//! The figures at scale (issue [3/7]): 10,000 connections on the Dataverse double, the
//! timer with 10% of them due, token requests spread over all of them from 128 clients,
//! how soon a change made by another instance is seen, and a cold instance's first
//! request. Rows are written straight into the double through the product's own
//! `DataverseStore` (the same columns and sealing the handler uses), playing "another
//! instance", so nothing here depends on 10,000 OAuth consents.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dynamics_companion::clients::azure::StaticToken;
use dynamics_companion::clients::dataverse::Dataverse;
use dynamics_companion::clients::dataverse::provision::Schema;
use dynamics_companion::clients::store::dataverse::DataverseStore;
use dynamics_companion::domain::{Connection, ConnectionStore, Status};
use futures_util::StreamExt;
use reqwest::Method;
use secrecy::SecretString;
use serde_json::{Value, json};

pub use super::support::seed::connection;
use super::support::seed::now;
use super::support::{self, Handler, HandlerBuilder};
use super::{World, percentile};

pub const CONNECTIONS: usize = 10_000;
pub const DUE: usize = 1_000;
const CLIENTS: usize = 128;
const WARM_SECS: u64 = 20;
const LATENCY_MS: u64 = 10;

/// "Another instance": the product's Dataverse store pointed at the double.
pub fn other_instance(dataverse_url: &str) -> DataverseStore {
    let url = url::Url::parse(dataverse_url).unwrap();
    let dv = Dataverse::new(&url, reqwest::Client::new(), Arc::new(StaticToken(SecretString::from("seed"))), None);
    DataverseStore::new(Arc::new(dv), Schema::new("dc"))
}

pub async fn insert_all(store: &dyn ConnectionStore, rows: Vec<Connection>) {
    futures_util::stream::iter(rows)
        .map(|c| async move { store.insert(&c).await.expect("seed a connection") })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
}

struct Spread {
    requests: u64,
    errors: u64,
    rps: f64,
    p50: f64,
    p99: f64,
}

/// `CLIENTS` clients asking for tokens of `ids`: each id once in turn (`once`), or ids
/// picked pseudo-randomly for `secs`.
async fn spread(h: &Handler, bearer: &str, ids: Arc<Vec<String>>, once: bool, secs: u64) -> Spread {
    let client = reqwest::Client::builder().pool_max_idle_per_host(CLIENTS).build().unwrap();
    let next = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let started = Instant::now();
    let tasks = (0..CLIENTS).map(|c| {
        let (client, ids, next, errors) = (client.clone(), ids.clone(), next.clone(), errors.clone());
        let (base, auth) = (h.base.clone(), format!("Bearer {bearer}"));
        tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ (c as u64 + 1);
            loop {
                let i = if once {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= ids.len() {
                        break;
                    }
                    i
                } else {
                    if Instant::now() >= deadline {
                        break;
                    }
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x % ids.len() as u64) as usize
                };
                let t = Instant::now();
                let ok = client
                    .post(format!("{base}/api/connections/{}/token", ids[i]))
                    .header("Authorization", &auth)
                    .header("Content-Type", "application/json")
                    .body("{}")
                    .send()
                    .await
                    .map(|r| r.status().is_success())
                    .unwrap_or(false);
                if !ok {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            lat
        })
    });
    let mut all: Vec<f64> = futures_util::future::join_all(tasks).await.into_iter().flat_map(|r| r.unwrap()).collect();
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Spread {
        requests: all.len() as u64,
        errors: errors.load(Ordering::Relaxed),
        rps: all.len() as f64 / elapsed,
        p50: percentile(&all, 0.50),
        p99: percentile(&all, 0.99),
    }
}

/// Zeroes the double's counters, and has it answer after `LATENCY_MS` (one of the faults
/// it can inject; real Dataverse takes tens of milliseconds), so that the requests of
/// concurrent callers overlap there and the limit on them shows.
async fn fresh_counters(w: &World) {
    w.dataverse.reset().await;
    w.dataverse.faults(json!({ "delay_ms": LATENCY_MS })).await;
}

/// Loads rows in bulk through the double's control API (same validation as the Web API,
/// without one HTTP request per row).
async fn bulk_load(w: &World, store: &DataverseStore, rows: &[Connection]) {
    let http = reqwest::Client::new();
    for chunk in rows.chunks(500) {
        let body = json!({ "rows": chunk.iter().map(|c| store.connection_row(c)).collect::<Vec<_>>() });
        let r = http
            .post(format!("{}/__control/tables/{}", w.dataverse.url, store.connections_set()))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.text().await.unwrap_or_default());
    }
}

/// The double's figures we report: requests, the peak of concurrent requests, 429s.
async fn figures(w: &World) -> (u64, u64, u64) {
    let s = w.dataverse.stats().await;
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    (n(&s["requests"]), n(&s["peak_in_flight"]), n(&s["by_status"]["429"]))
}

/// Polls the token endpoint until it no longer answers `ok_status`; the time it took.
async fn seen_after(h: &Handler, bearer: &str, id: &str, ok_status: u16) -> (f64, u16) {
    let t = Instant::now();
    loop {
        let r = h.json(Method::POST, &format!("/api/connections/{id}/token"), Some(bearer), &json!({})).await;
        if r.status != ok_status || t.elapsed() > Duration::from_secs(30) {
            return (t.elapsed().as_secs_f64() * 1000.0, r.status);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn section(w: &World) -> String {
    let mut r = String::new();
    let seeder = other_instance(&w.dataverse.url);
    let t = now();
    let rows: Vec<Connection> = (0..CONNECTIONS)
        .map(|i| {
            let id = format!("bulk-{i:05}");
            // The first DUE are due within the refresh margin; the rest in one to two hours.
            let exp = if i < DUE { t + 120 } else { t + 3600 + (i as i64 % 3600) };
            connection(&w.keys, "fast", &id, exp)
        })
        .collect();
    let seeding = Instant::now();
    bulk_load(w, &seeder, &rows).await;
    let seed_s = seeding.elapsed().as_secs_f64();
    // Let the handler's change feed take in the 10,000 new rows before counting.
    tokio::time::sleep(Duration::from_secs(6)).await;
    fresh_counters(w).await;

    r.push_str(&format!(
        "\n### At scale: {CONNECTIONS} connections on the Dataverse double\n\n\
         Rows written as the product's Dataverse store writes them, loaded in bulk in {seed_s:.1} s. \
         The double answers every request after {LATENCY_MS} ms and allows 52 concurrent requests; \
         the handler runs with `DATAVERSE_MAX_CONCURRENCY` 16 and `CHANGE_FEED_SECONDS` 5.\n\n\
         | measure | figure | in-run reference |\n|---|---|---|\n"
    ));

    // The timer: 1,000 of 10,000 due.
    let (before, _, _) = figures(w).await;
    let started = Instant::now();
    let reply = w.h.invoke_timer(&support::timer_payload(false)).await;
    let timer_ms = started.elapsed().as_secs_f64() * 1000.0;
    let (after, peak, throttled) = figures(w).await;
    let logs: Vec<String> = serde_json::from_str::<Value>(&reply.body)
        .ok()
        .and_then(|v| v["Logs"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|l| l.as_str().map(str::to_string))
        .collect();
    let line = logs.iter().find(|l| l.starts_with("refresh:")).cloned().unwrap_or_else(|| reply.body.clone());
    let refreshed: u64 =
        line.split(", ").find_map(|p| p.strip_suffix(" refreshed").and_then(|n| n.trim().parse().ok())).unwrap_or(0);
    let calls = after - before;
    r.push_str(&format!(
        "| one timer run, {DUE} of {CONNECTIONS} due | {refreshed} refreshed in {:.2} s; {calls} Dataverse requests = {:.3} per refresh (the due query's pages and the change feed's polls included); peak {peak} concurrent, {throttled} × 429 | timer log: `{line}` |\n",
        timer_ms / 1000.0,
        calls as f64 / refreshed.max(1) as f64
    ));

    // Token requests spread over all connections: first each id once (every one a cache
    // miss), then random ids for WARM_SECS over all 10,000, then over 1,000 of them.
    let ids: Arc<Vec<String>> = Arc::new((0..CONNECTIONS).map(|i| format!("bulk-{i:05}")).collect());
    fresh_counters(w).await;
    let cold = spread(&w.h, &w.bearer, ids.clone(), true, 0).await;
    let (cold_calls, cold_peak, cold_429) = figures(w).await;
    r.push_str(&format!(
        "| {CLIENTS} clients, each of the {CONNECTIONS} ids once (cold cache) | {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, {} errors; {cold_calls} Dataverse requests; **peak {cold_peak} concurrent** (limit 16); {cold_429} × 429 | one store read per cache miss |\n",
        cold.rps, cold.p50, cold.p99, cold.errors
    ));
    for (label, n) in [("all 10,000", CONNECTIONS), ("1,000 of them", 1_000)] {
        let subset = Arc::new(ids[..n].to_vec());
        fresh_counters(w).await;
        let warm = spread(&w.h, &w.bearer, subset, false, WARM_SECS).await;
        let (calls, peak, throttled) = figures(w).await;
        r.push_str(&format!(
            "| {CLIENTS} clients, random ids over {label}, warm, {WARM_SECS} s | {:.0} req/s ({} requests), p50 {:.2} ms, p99 {:.2} ms, {} errors; **{calls} Dataverse requests = {:.1} per minute**; peak {peak} concurrent; {throttled} × 429 | the feed alone: 12 per minute |\n",
            warm.rps,
            warm.requests,
            warm.p50,
            warm.p99,
            warm.errors,
            calls as f64 * 60.0 / WARM_SECS as f64
        ));
    }

    // A change by another instance: needs_reauth and a delete, seen through the feed.
    let mut c = seeder.get("bulk-09998").await.unwrap().unwrap();
    let version = c.version.clone();
    c.status = Status::NeedsReauth;
    c.tokens = None;
    seeder.update(&c, &version).await.unwrap();
    let (reauth_ms, reauth_status) = seen_after(&w.h, &w.bearer, "bulk-09998", 200).await;
    let gone = seeder.get("bulk-09999").await.unwrap().unwrap();
    seeder.delete("bulk-09999", &gone.version).await.unwrap();
    let (delete_ms, delete_status) = seen_after(&w.h, &w.bearer, "bulk-09999", 200).await;
    r.push_str(&format!(
        "| a cached connection set to `needs_reauth` by another instance | seen after {reauth_ms:.0} ms (answer {reauth_status}) | feed interval 5,000 ms |\n\
         | a cached connection deleted by another instance | seen after {delete_ms:.0} ms (answer {delete_status}) | feed interval 5,000 ms |\n"
    ));

    // A cold instance: once its prefetch is done, how many upstream calls its first token
    // request makes (each would be a round trip in series).
    let mut cold_h = HandlerBuilder::sharing(&w.h).env("LOG_LEVEL", "info").start().await;
    let prefetched = cold_h.logs.wait_for_line(|l| l.contains("prefetch done")).is_some();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let dv0 = w.dataverse.requests().await;
    let entra0 = entra_requests(w).await;
    let jwks0 = w.issuer.jwks_requests.load(Ordering::SeqCst) as u64;
    let first = Instant::now();
    let reply = cold_h.json(Method::POST, "/api/connections/bulk-00500/token", Some(&w.bearer), &json!({})).await;
    let first_ms = first.elapsed().as_secs_f64() * 1000.0;
    let dv = w.dataverse.requests().await - dv0;
    let entra = entra_requests(w).await - entra0;
    let jwks = w.issuer.jwks_requests.load(Ordering::SeqCst) as u64 - jwks0;
    r.push_str(&format!(
        "| a cold instance's first token request, after its prefetch (logged: {prefetched}) | {} in {first_ms:.1} ms; upstream calls: {dv} Dataverse, {entra} Entra, {jwks} issuer keys = **{} round trip(s) in series** | before the prefetch: discovery, keys, Entra token, Dataverse (4 in series) |\n",
        reply.status,
        dv + entra + jwks
    ));
    cold_h.terminate();
    r
}

async fn entra_requests(w: &World) -> u64 {
    let s = w.azure.stats().await;
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    n(&s["entra"]["token_requests"]) + n(&s["entra"]["discovery_requests"]) + n(&s["identity"]["token_requests"])
}

//! The benchmark suite: `scripts/bench` (or `cargo bench --bench companion`).
//!
//! Builds in release mode, starts the local peers (oidc-provider, the Dataverse and Entra
//! doubles, a Power Pages double) and the release `handler` as the Functions host does,
//! and measures on this machine, as medians of several runs where it makes sense:
//! start-up and idle memory; the OAuth callback end to end and the handler's own share of
//! it (from its `Server-Timing`); the token endpoint and `/api/portal/me` at 64
//! concurrent connections, each next to a minimal warp server answering a fixed JSON body
//! in the same run; the proxy next to calling the same fast upstream directly, on both
//! stores; a refresh storm; Dataverse calls per 1000 token requests; and, in `scale`,
//! 10,000 connections on the Dataverse double (the timer, 128 clients spread over them,
//! changes made by another instance, a cold instance's first request).
//!
//! It prints a Markdown report (also written to `target/bench-report.md`). It is a
//! measurement, not a test: it asserts nothing beyond the runs working at all.

#[path = "companion/scale.rs"]
mod scale;
#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};
use support::azure::AzureDoubles;
use support::dataverse::DataverseDouble;
use support::issuer::Issuer;
use support::oidc::{CLIENT_SECRET, OidcPeer};
use support::portal::{CLIENT_ID, CONTACT_A, PortalDouble};
use support::{Handler, HandlerBuilder};

const BASELINE_ENV: &str = "DC_BENCH_BASELINE_PORT";
/// Milliseconds the baseline waits before answering: an upstream API with latency.
const BASELINE_DELAY_ENV: &str = "DC_BENCH_BASELINE_DELAY_MS";
/// The minimal forwarding proxy's port and upstream (the proxy's floor).
const FORWARDER_ENV: &str = "DC_BENCH_FORWARDER_PORT";
const FORWARDER_UPSTREAM_ENV: &str = "DC_BENCH_FORWARDER_UPSTREAM";
const CONCURRENCY: usize = 64;
const LOAD_SECS: u64 = 5;
const PUBLIC: &str = "http://localhost:7071";

fn main() {
    if let (Ok(port), Ok(upstream)) = (std::env::var(FORWARDER_ENV), std::env::var(FORWARDER_UPSTREAM_ENV)) {
        forwarder(port.parse().expect("a port"), upstream);
        return;
    }
    if let Ok(port) = std::env::var(BASELINE_ENV) {
        let delay = std::env::var(BASELINE_DELAY_ENV).ok().and_then(|d| d.parse().ok()).unwrap_or(0);
        baseline(port.parse().expect("a port"), delay);
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    match std::env::var("DC_BENCH_ONLY").as_deref() {
        Ok("audit") => return println!("{}", rt.block_on(async { audit_cost(&world().await).await })),
        Ok("proxy") => return println!("{}", rt.block_on(async { proxy_section(&world().await).await.0 })),
        Ok("token") => return println!("{}", rt.block_on(async { token_section(&world().await).await.0 })),
        _ => {}
    }
    let report = rt.block_on(run());
    println!("{report}");
    let path = format!("{}/target/bench-report.md", env!("CARGO_MANIFEST_DIR"));
    let _ = std::fs::write(&path, &report);
    eprintln!("(written to {path})");
}

/// Section 3: the token endpoint for valid tokens, next to the minimal warp handler, 64
/// sockets, one connection id. The table's head and two rows, the load, and the Dataverse
/// requests made meanwhile.
async fn token_section(w: &World) -> (String, Load, u64) {
    let mut r = String::new();
    for i in 0..16 {
        let cb = w.start_and_consent(&w.peer, "test", &format!("load-{i}")).await;
        assert_eq!(w.h.get(&cb, &[]).await.status, 200);
    }
    let base = start_baseline();
    let auth = vec![
        ("Authorization".to_string(), format!("Bearer {}", w.bearer)),
        ("Content-Type".into(), "application/json".into()),
    ];
    let dv_before = w.dataverse.requests().await;
    let (baseline_token, token, ratio) = paired(
        &format!("{}/api/connections/load-0/token", base.url),
        &format!("{}/api/connections/load-0/token", w.h.base),
        Method::POST,
        auth.clone(),
        Some("{}".into()),
        (base.child.id(), w.h.pid()),
    )
    .await;
    let dv_calls = w.dataverse.requests().await - dv_before;
    r.push_str("\n| load (64 sockets, one connection id, median of 3 × 5 s) | requests/s | ratio to minimal warp (median of adjacent pairs) | p50 | p99 | errors | peak RSS | CPU per request (the server's, all threads) |\n|---|---|---|---|---|---|---|---|\n");
    r.push_str(&load_row("minimal warp handler (fixed JSON)", &baseline_token, "1.00", false));
    r.push_str(&load_row("`POST /api/connections/{id}/token`, valid token", &token, &ratio, true));

    drop(base);
    (r, token, dv_calls)
}

/// 4b. The proxy with a cached token, next to calling the same fast upstream (the minimal
/// warp handler) directly and to the minimal forwarder, on both stores: the table's rows,
/// and the Dataverse requests during the Dataverse runs with the proxied calls they served.
async fn proxy_section(w: &World) -> (String, (u64, u64)) {
    let mut r = String::new();
    let seeder = scale::other_instance(&w.dataverse.url);
    let far = 1_900_000_000;
    scale::insert_all(
        &seeder,
        vec![scale::connection(&w.keys, "fast", "px", far), scale::connection(&w.keys, "slow", "px10", far)],
    )
    .await;
    let sqlite_h = {
        let b = HandlerBuilder::new()
            .file("providers.toml", &w.catalog)
            .env("PUBLIC_BASE_URL", PUBLIC)
            .env("TEST_PROVIDER_SECRET", CLIENT_SECRET)
            .env("TOKEN_ENCRYPTION_KEYS", &w.key_spec)
            .env("LOG_LEVEL", "warn")
            .envs(w.issuer.settings());
        std::fs::create_dir_all(b.root().join(".data")).unwrap();
        let store = dynamics_companion::clients::store::sqlite::SqliteStore::open(&b.root().join(".data/companion.db"))
            .unwrap();
        scale::insert_all(&store, vec![scale::connection(&w.keys, "fast", "px", far)]).await;
        drop(store);
        b.start().await
    };
    let caller = vec![("Authorization".to_string(), format!("Bearer {}", w.bearer))];
    let mut proxy_dv = (0, 0);
    let runs = [
        ("Dataverse", &w.h, &w.api, "px", "upstream without latency"),
        ("SQLite", &sqlite_h, &w.api, "px", "upstream without latency"),
        ("Dataverse", &w.h, &w.api10, "px10", "upstream answering in 10 ms"),
    ];
    for (label, h, api, id, upstream) in runs {
        let probe = h
            .get(&format!("/api/connections/{id}/proxy/items"), &[("Authorization", &format!("Bearer {}", w.bearer))])
            .await;
        assert_eq!(probe.status, 200, "{}", probe.body);
        let dv_before = w.dataverse.requests().await;
        let forwarder = start_forwarder(&api.url);
        // Interleaved: direct, then the minimal forwarder and ours in adjacent windows, in
        // alternating order; the median of each, and ours against the forwarder as the
        // median of the adjacent pairs' ratios (see the audit table).
        let (mut d, mut f, mut o) = (Vec::new(), Vec::new(), Vec::new());
        for rep in 0..RUNS {
            d.push(load(&format!("{}/items", api.url), Method::GET, vec![], None, Some(api.child.id())).await);
            for ours in pair_order(rep) {
                // The forwarder gets the same request as ours, caller's bearer included (it
                // ignores it): any token-injecting proxy receives the caller's credential.
                let (url, pid) = if ours {
                    (format!("{}/api/connections/{id}/proxy/items", h.base), h.pid())
                } else {
                    (format!("{}/proxy/items", forwarder.url), forwarder.child.id())
                };
                let l = load(&url, Method::GET, caller.clone(), None, Some(pid)).await;
                if ours { o.push(l) } else { f.push(l) }
            }
        }
        drop(forwarder);
        let (over_floor, shown) = pair_ratios(&f, &o, |l| l.rps);
        let (direct, floor, proxied) = (median_load(&d), median_load(&f), median_load(&o));
        if label == "Dataverse" {
            let (calls, requests) = proxy_dv;
            proxy_dv = (calls + w.dataverse.requests().await - dv_before, requests + proxied.requests);
        }
        r.push_str(&load_row(&format!("the same {upstream} called directly (reference)"), &direct, "1.00", false));
        r.push_str(&load_row(
            "a minimal forwarding proxy (warp + one pooled reqwest client, fixed bearer) to it",
            &floor,
            &format!("{:.2}", floor.rps / direct.rps),
            false,
        ));
        r.push_str(&load_row(
            &format!("`GET /api/connections/{{id}}/proxy/items`, token cached, {label} store, {upstream}"),
            &proxied,
            &format!("{:.2} ({over_floor:.2} × the forwarder; pairs {shown})", proxied.rps / direct.rps),
            true,
        ));
    }
    drop(sqlite_h);
    (r, proxy_dv)
}

/// The minimal warp handler: a fixed JSON body for any request, as a reference point;
/// after `delay_ms` (without using the CPU) when it stands for an API with latency.
fn baseline(port: u16, delay_ms: u64) {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async move {
        use warp::Filter;
        let body = r#"{"connection_id":"c","access_token":"fixed","token_type":"Bearer","expires_in":3600}"#;
        let route = warp::any().then(move || async move {
            if delay_ms > 0 {
                tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            }
            warp::http::Response::builder().header("content-type", "application/json").body(body).unwrap()
        });
        warp::serve(route).run(([127, 0, 0, 1], port)).await;
    });
}

/// The minimal forwarding proxy: warp takes the request, one pooled reqwest client sends
/// it to `upstream` plus the path after `/proxy/` with a fixed `Authorization: Bearer`
/// header, and the status, content type and body come back. The floor for any
/// token-injecting proxy on this machine.
fn forwarder(port: u16, upstream: String) {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async move {
        use warp::Filter;
        let client = reqwest::Client::new();
        let route = warp::path("proxy").and(warp::path::tail()).and(warp::method()).then(
            move |tail: warp::path::Tail, method: warp::http::Method| {
                let (client, url) = (client.clone(), format!("{upstream}/{}", tail.as_str()));
                async move {
                    let resp =
                        client.request(method, url).header("authorization", "Bearer fixed-token").send().await.unwrap();
                    let status = resp.status();
                    let ct = resp.headers().get("content-type").cloned();
                    let body = resp.bytes().await.unwrap_or_default();
                    let mut out = warp::http::Response::builder().status(status);
                    if let Some(ct) = ct {
                        out = out.header("content-type", ct);
                    }
                    out.body(body).unwrap()
                }
            },
        );
        warp::serve(route).run(([127, 0, 0, 1], port)).await;
    });
}

fn start_forwarder(upstream: &str) -> Baseline {
    let port = support::free_port();
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .env(FORWARDER_ENV, port.to_string())
        .env(FORWARDER_UPSTREAM_ENV, upstream)
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the forwarder did not start");
        std::thread::sleep(Duration::from_millis(5));
    }
    Baseline { child, url }
}

struct Baseline {
    child: std::process::Child,
    url: String,
}

impl Drop for Baseline {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_baseline() -> Baseline {
    start_baseline_with_delay(0)
}

fn start_baseline_with_delay(delay_ms: u64) -> Baseline {
    let port = support::free_port();
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .env(BASELINE_ENV, port.to_string())
        .env(BASELINE_DELAY_ENV, delay_ms.to_string())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the baseline server did not start");
        std::thread::sleep(Duration::from_millis(5));
    }
    Baseline { child, url }
}

fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p).ceil() as usize).saturating_sub(1).min(sorted.len() - 1)]
}

/// A process's CPU time so far (user and system, all threads), in seconds: fields 14 and 15
/// of `/proc/PID/stat`, in clock ticks of 1/100 s (`USER_HZ`, 100 on Linux/x86-64).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let ticks: f64 = after.split_whitespace().skip(11).take(2).filter_map(|f| f.parse::<f64>().ok()).sum();
    ticks / 100.0
}

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .unwrap_or(0.0)
        / 1024.0
}

/// Exec to first answer on `GET /`, polling every 0.2 ms, and RSS once idle.
fn startup(runs: usize) -> (Vec<f64>, Vec<f64>) {
    let root = tempfile::tempdir().unwrap();
    let keys = support::test_keys();
    let (mut times, mut rss) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let port = support::free_port();
        let t0 = Instant::now();
        let mut child = std::process::Command::new(support::BIN)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("FUNCTIONS_CUSTOMHANDLER_PORT", port.to_string())
            .env("FUNCTIONS_CUSTOMHANDLER_WORKER_ID", format!("bench-{i}"))
            .env("FUNCTIONS_APP_ROOT_PATH", root.path())
            .env("TOKEN_ENCRYPTION_KEYS", &keys)
            .current_dir(root.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        loop {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
                let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
                let mut buf = [0u8; 16];
                if s.read(&mut buf).is_ok_and(|n| n > 0) {
                    break;
                }
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "no answer");
            std::thread::sleep(Duration::from_micros(200));
        }
        times.push(t0.elapsed().as_secs_f64() * 1000.0);
        if i < 5 {
            std::thread::sleep(Duration::from_secs(1));
            rss.push(rss_mib(child.id()));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    (times, rss)
}

#[derive(Clone, Copy)]
struct Load {
    requests: u64,
    errors: u64,
    rps: f64,
    p50: f64,
    p99: f64,
    peak_rss: f64,
    /// The loaded server's CPU time (user and system, all its threads) per request while
    /// measuring, in µs; NaN when its process was not given.
    cpu_us: f64,
}

const RUNS: usize = 3;

/// Adjacent off / on windows in the audit-cost table.
const AUDIT_PAIRS: usize = 6;

/// One row of a load table: what was loaded, requests/s, the ratio cell as given, p50, p99,
/// errors, the peak RSS (`—` for a reference server, whose memory is not ours) and the CPU
/// per request (`—` when not measured).
fn load_row(label: &str, l: &Load, ratio: &str, with_rss: bool) -> String {
    let rss = if with_rss { format!("{:.1} MiB", l.peak_rss) } else { "—".to_string() };
    let cpu = if l.cpu_us.is_nan() { "—".to_string() } else { format!("{:.1} µs", l.cpu_us) };
    format!("| {label} | {:.0} | {ratio} | {:.2} ms | {:.2} ms | {} | {rss} | {cpu} |\n", l.rps, l.p50, l.p99, l.errors)
}

/// The median run of several, figure by figure (requests and errors are summed).
fn median_load(runs: &[Load]) -> Load {
    let med = |f: fn(&Load) -> f64| median(&mut runs.iter().map(f).collect::<Vec<_>>());
    Load {
        requests: runs.iter().map(|l| l.requests).sum(),
        errors: runs.iter().map(|l| l.errors).sum(),
        rps: med(|l| l.rps),
        p50: med(|l| l.p50),
        p99: med(|l| l.p99),
        peak_rss: runs.iter().map(|l| l.peak_rss).fold(0.0, f64::max),
        cpu_us: med(|l| l.cpu_us),
    }
}

/// `RUNS` pairs of adjacent windows, the baseline and the handler in alternating order
/// ([`pair_order`]), so drift on a noisy machine affects both; the ratio is the median of
/// the pairs' ratios, with every pair's in words ([`pair_ratios`]).
async fn paired(
    baseline_url: &str,
    handler_url: &str,
    method: Method,
    headers: Vec<(String, String)>,
    body: Option<String>,
    (baseline_pid, pid): (u32, u32),
) -> (Load, Load, String) {
    let (mut base, mut ours) = (Vec::new(), Vec::new());
    for rep in 0..RUNS {
        for handler in pair_order(rep) {
            let (url, pid) = if handler { (handler_url, pid) } else { (baseline_url, baseline_pid) };
            let l = load(url, method.clone(), headers.clone(), body.clone(), Some(pid)).await;
            if handler { ours.push(l) } else { base.push(l) }
        }
    }
    let (ratio, shown) = pair_ratios(&base, &ours, |l| l.rps);
    (median_load(&base), median_load(&ours), format!("{ratio:.2} (pairs {shown})"))
}

/// Which of a pair of adjacent windows goes first: the reference (`false`) in even pairs,
/// the measured server (`true`) in odd ones. On two shared cores one server's throughput
/// moves by a fifth between windows a minute apart; two adjacent windows share most of it.
fn pair_order(pair: usize) -> [bool; 2] {
    if pair.is_multiple_of(2) { [false, true] } else { [true, false] }
}

/// The median over adjacent pairs of `f(measured) / f(reference)`, and every pair's ratio
/// in words.
fn pair_ratios(reference: &[Load], measured: &[Load], f: fn(&Load) -> f64) -> (f64, String) {
    let mut ratios: Vec<f64> = reference.iter().zip(measured).map(|(r, m)| f(m) / f(r)).collect();
    let shown = ratios.iter().map(|x| format!("{x:.2}")).collect::<Vec<_>>().join(", ");
    (median(&mut ratios), shown)
}

/// `CONCURRENCY` connections sending requests back to back for `LOAD_SECS`, after a
/// one-second warm-up. Latency is measured per request, client side.
async fn load(
    url: &str,
    method: Method,
    headers: Vec<(String, String)>,
    body: Option<String>,
    pid: Option<u32>,
) -> Load {
    let client = reqwest::Client::builder().pool_max_idle_per_host(CONCURRENCY).http1_only().build().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let peak = Arc::new(std::sync::Mutex::new(0.0f64));
    let sampler = pid.map(|pid| {
        let (stop, peak) = (stop.clone(), peak.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let r = rss_mib(pid);
                {
                    let mut p = peak.lock().unwrap();
                    *p = p.max(r);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    });
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENCY {
        let (client, url, method, headers, body) =
            (client.clone(), url.to_string(), method.clone(), headers.clone(), body.clone());
        let (stop, measuring, errors) = (stop.clone(), measuring.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(20_000);
            while !stop.load(Ordering::Relaxed) {
                let mut req = client.request(method.clone(), &url);
                for (k, v) in &headers {
                    req = req.header(k, v);
                }
                if let Some(b) = &body {
                    req = req.body(b.clone());
                }
                let t = Instant::now();
                let ok = match req.send().await {
                    Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                    Err(_) => false,
                };
                if measuring.load(Ordering::Relaxed) {
                    latencies.push(t.elapsed().as_secs_f64() * 1000.0);
                    if !ok {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            latencies
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cpu0 = pid.map(cpu_seconds);
    measuring.store(true, Ordering::Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(LOAD_SECS)).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu = pid.zip(cpu0).map(|(pid, cpu0)| cpu_seconds(pid) - cpu0);
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    if let Some(s) = sampler {
        let _ = s.await;
    }
    all.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Load {
        requests: all.len() as u64,
        errors: errors.load(Ordering::Relaxed),
        rps: all.len() as f64 / elapsed,
        p50: percentile(&all, 0.50),
        p99: percentile(&all, 0.99),
        peak_rss: *peak.lock().unwrap(),
        cpu_us: cpu.map_or(f64::NAN, |cpu| cpu * 1e6 / all.len().max(1) as f64),
    }
}

struct World {
    azure: AzureDoubles,
    dataverse: DataverseDouble,
    peer: OidcPeer,
    storm_peer: OidcPeer,
    issuer: Issuer,
    portal: PortalDouble,
    h: Handler,
    bearer: String,
    /// The handler's encryption keys, so the bench can seal rows as another instance would.
    keys: dynamics_companion::support::crypto::Keyring,
    key_spec: String,
    catalog: String,
    /// A fast upstream (the minimal warp handler) that the `fast` provider's token
    /// endpoint and API point at, for the proxy reference and the timer's refreshes.
    api: Baseline,
    /// The same answering after 10 ms: the `slow` provider's API.
    api10: Baseline,
}

/// The `fast` provider: its token endpoint and API are the minimal warp handler, which
/// answers every request with a token response (so refreshes succeed) and a fixed body.
fn fast_catalog(name: &str, api: &str) -> String {
    format!(
        r#"
[providers.{name}]
display_name = "Fast upstream"
authorization_url = "{api}/auth"
token_url = "{api}/token"
client_id = "{CLIENT_ID}"
client_secret = "test-provider-secret"
scopes = ["api.read"]
api_base_url = "{api}/"
"#
    )
}

async fn world() -> World {
    let api = start_baseline();
    let api10 = start_baseline_with_delay(10);
    let key_spec = support::test_keys();
    let keys = dynamics_companion::support::crypto::Keyring::parse(&key_spec).unwrap();
    let azure = AzureDoubles::start(json!({}));
    let dataverse = DataverseDouble::with_config(json!({
        "key_activation_ms": 50,
        "tables": [{ "logical_name": "contact", "entity_set": "contacts", "primary_id": "contactid", "primary_name": "fullname",
                     "columns": ["firstname", "lastname", "emailaddress1"] }]
    }));
    let rows =
        json!({ "rows": [{ "contactid": CONTACT_A, "fullname": "Ada Lovelace", "emailaddress1": "ada@example.com" }] });
    reqwest::Client::new()
        .post(format!("{}/__control/tables/contacts", dataverse.url))
        .json(&rows)
        .send()
        .await
        .unwrap();
    let callback = format!("{PUBLIC}/api/oauth/callback");
    let peer = OidcPeer::start(&callback, json!({}));
    let storm_peer = OidcPeer::start(&callback, json!({ "access_token_ttl": 3 }));
    let issuer = Issuer::start().await;
    let portal = PortalDouble::start().await;
    let catalog = format!(
        "{}\n{}\n{}\n{}",
        peer.catalog("test", "[providers.test.portal]\nenabled = true\n"),
        storm_peer.catalog("storm", ""),
        fast_catalog("fast", &api.url),
        fast_catalog("slow", &api10.url)
    );
    let settings = |b: HandlerBuilder| {
        let mut b = b
            .file("providers.toml", &catalog)
            .env("PUBLIC_BASE_URL", PUBLIC)
            .env("TEST_PROVIDER_SECRET", CLIENT_SECRET)
            .env("STORE", "dataverse")
            .env("DATAVERSE_URL", &dataverse.url)
            .env("PORTAL_URL", &portal.url)
            .env("PORTAL_CLIENT_ID", CLIENT_ID)
            .env("TOKEN_ENCRYPTION_KEYS", &key_spec)
            .env("LOG_LEVEL", "warn");
        for (k, v) in azure.dataverse_client_secret_settings().into_iter().chain(issuer.settings()) {
            b = b.env(k, v);
        }
        b
    };
    let b = settings(HandlerBuilder::new());
    let (code, out, err) = settings(HandlerBuilder::in_root(b.root())).args(&["provision"]).run_to_exit();
    assert_eq!(code, Some(0), "provision: {out}{err}");
    let h = b.start().await;
    let bearer = issuer.token();
    World { azure, dataverse, peer, storm_peer, issuer, portal, h, bearer, keys, key_spec, catalog, api, api10 }
}

impl World {
    async fn start_and_consent(&self, peer: &OidcPeer, provider: &str, id: &str) -> String {
        let r = self
            .h
            .json(
                Method::POST,
                "/api/connections",
                Some(&self.bearer),
                &json!({ "provider": provider, "connection_id": id }),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.body);
        let location = peer.consent(r.json()["authorization_url"].as_str().unwrap(), false).await;
        location.strip_prefix(PUBLIC).unwrap().to_string()
    }
}

/// The token endpoint with the audit record on (`LOG_LEVEL=info`, the default: a request
/// line and an audit line per token handed out) and off (`info,audit=off`: the request
/// line only), SQLite store, interleaved in one run.
async fn audit_cost(w: &World) -> String {
    let far = 1_900_000_000;
    let start = |level: &'static str| {
        let b = HandlerBuilder::new()
            .file("providers.toml", &w.catalog)
            .env("PUBLIC_BASE_URL", PUBLIC)
            .env("TEST_PROVIDER_SECRET", CLIENT_SECRET)
            .env("TOKEN_ENCRYPTION_KEYS", &w.key_spec)
            .env("LOG_LEVEL", level)
            .envs(w.issuer.settings())
            .counting_lines("token_handed_out");
        std::fs::create_dir_all(b.root().join(".data")).unwrap();
        let store = dynamics_companion::clients::store::sqlite::SqliteStore::open(&b.root().join(".data/companion.db"))
            .unwrap();
        (b, store)
    };
    let mut handlers = Vec::new();
    for level in ["info,audit=off", "info"] {
        let (b, store) = start(level);
        scale::insert_all(&store, vec![scale::connection(&w.keys, "fast", "au", far)]).await;
        drop(store);
        handlers.push(b.start().await);
    }
    let auth = vec![
        ("Authorization".to_string(), format!("Bearer {}", w.bearer)),
        ("Content-Type".into(), "application/json".into()),
    ];
    // Adjacent windows in alternating order (off-on, on-off, ...), and the medians of the
    // pairs' ratios.
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for pair in 0..AUDIT_PAIRS {
        for audited in pair_order(pair) {
            let h = &handlers[usize::from(audited)];
            let url = format!("{}/api/connections/au/token", h.base);
            let l = load(&url, Method::POST, auth.clone(), Some("{}".into()), Some(h.pid())).await;
            if audited { on.push(l) } else { off.push(l) }
        }
    }
    let (rps_ratio, rps_pairs) = pair_ratios(&off, &on, |l| l.rps);
    let (cpu_ratio, cpu_pairs) = pair_ratios(&off, &on, |l| l.cpu_us);
    let (off, on) = (median_load(&off), median_load(&on));
    let audited = handlers[1].logs.counted();
    format!(
        "| audit record | requests/s | ratio (median of {AUDIT_PAIRS} pairs) | p50 | p99 | handler CPU per request | ratio (median of pairs) |\n|---|---|---|---|---|---|---|\n| token endpoint, audit off (`LOG_LEVEL=info,audit=off`: request lines only) | {:.0} | 1.00 | {:.2} ms | {:.2} ms | {:.1} µs | 1.00 |\n| token endpoint, audit on (`LOG_LEVEL=info`, the default: {audited} audit lines too) | {:.0} | {rps_ratio:.2} | {:.2} ms | {:.2} ms | {:.1} µs | {cpu_ratio:.2} |\n\nPairs (on / off, adjacent windows): throughput {rps_pairs}; handler CPU per request {cpu_pairs}.\n",
        off.rps, off.p50, off.p99, off.cpu_us, on.rps, on.p50, on.p99, on.cpu_us,
    )
}

fn server_timing(reply: &support::Reply, name: &str) -> f64 {
    reply
        .header("server-timing")
        .split(',')
        .find_map(|part| part.trim().strip_prefix(&format!("{name};dur=")).and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}

async fn run() -> String {
    let mut r = String::new();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    r.push_str(&format!(
        "## Results ({} cores, {} {}, release build)\n\n",
        cores,
        std::env::consts::OS,
        std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim()
    ));

    // 1. Start-up and idle memory.
    let (mut times, mut rss) = tokio::task::spawn_blocking(|| startup(21)).await.unwrap();
    r.push_str("| measure | median | other |\n|---|---|---|\n");
    let (min, max) = (times.iter().cloned().fold(f64::MAX, f64::min), times.iter().cloned().fold(0.0, f64::max));
    r.push_str(&format!(
        "| start-up, exec to first answer on `GET /` | {:.1} ms | min {min:.1}, max {max:.1} (21 runs) |\n",
        median(&mut times)
    ));
    r.push_str(&format!("| resident memory, idle | {:.1} MiB | 5 runs, 1 s after ready |\n", median(&mut rss)));

    let w = world().await;

    // 2. The callback end to end, and the handler's own share.
    let (mut totals, mut own, mut upstream) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..21 {
        let cb = w.start_and_consent(&w.peer, "test", &format!("cb-{i}")).await;
        let t = Instant::now();
        let page = w.h.get(&cb, &[]).await;
        totals.push(t.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(page.status, 200, "{}", page.body);
        own.push(server_timing(&page, "app"));
        upstream.push(server_timing(&page, "upstream"));
    }
    r.push_str(&format!(
        "| callback end to end (client-side) | {:.2} ms | 21 callbacks: find state, consume it, exchange the code, store the tokens |\n",
        median(&mut totals)
    ));
    r.push_str(&format!(
        "| — of which upstreams (provider, Dataverse) | {:.2} ms | from `Server-Timing` |\n",
        median(&mut upstream)
    ));
    r.push_str(&format!(
        "| — the handler's own share | {:.2} ms | p90 {:.2} ms |\n",
        median(&mut own),
        percentile(&own, 0.9)
    ));

    // 3. The token endpoint for valid tokens, next to the baseline.
    let (token_rows, token, dv_calls) = token_section(&w).await;
    r.push_str(&token_rows);
    let base = start_baseline();

    // 4. The portal's /me with token verification.
    let portal_auth = vec![("Authorization".to_string(), format!("Bearer {}", w.portal.token(CONTACT_A)))];
    let (baseline_me, me, ratio) = paired(
        &format!("{}/api/portal/me", base.url),
        &format!("{}/api/portal/me", w.h.base),
        Method::GET,
        portal_auth,
        None,
        (base.child.id(), w.h.pid()),
    )
    .await;
    r.push_str(&load_row("minimal warp handler (fixed JSON), alongside", &baseline_me, "1.00", false));
    r.push_str(&load_row("`GET /api/portal/me`, Power Pages token", &me, &ratio, true));
    drop(base);

    let (proxy_rows, (proxy_dv_calls, proxied_requests)) = proxy_section(&w).await;
    r.push_str(&proxy_rows);

    // 5. Dataverse calls per 1000 token requests (during the token load above).
    let per_1000 = dv_calls as f64 * 1000.0 / token.requests.max(1) as f64;
    r.push_str(&format!(
        "\n| other | figure |\n|---|---|\n| Dataverse calls per 1000 token requests (valid tokens) | {per_1000:.2} ({dv_calls} calls for {} requests) |\n",
        token.requests
    ));
    r.push_str(&format!(
        "| Dataverse calls per 1000 proxied calls (token cached) | {:.2} ({proxy_dv_calls} calls for {} proxied calls) |\n",
        proxy_dv_calls as f64 * 1000.0 / proxied_requests.max(1) as f64,
        proxied_requests
    ));

    // 6. The refresh storm: 1000 concurrent requests on an expired token.
    let cb = w.start_and_consent(&w.storm_peer, "storm", "storm").await;
    assert_eq!(w.h.get(&cb, &[]).await.status, 200);
    tokio::time::sleep(Duration::from_millis(3300)).await;
    let before = w.storm_peer.refresh_grants().await;
    let client = reqwest::Client::builder().pool_max_idle_per_host(1000).build().unwrap();
    let t = Instant::now();
    let replies = futures_util::future::join_all((0..1000).map(|_| {
        client
            .post(format!("{}/api/connections/storm/token", w.h.base))
            .header("Authorization", format!("Bearer {}", w.bearer))
            .send()
    }))
    .await;
    let drain = t.elapsed().as_secs_f64() * 1000.0;
    let mut ok = 0;
    let mut tokens = HashSet::new();
    for reply in replies.into_iter().flatten() {
        if reply.status().is_success()
            && let Ok(v) = reply.json::<Value>().await
        {
            ok += 1;
            tokens.insert(v["access_token"].as_str().unwrap_or_default().to_string());
        }
    }
    let refreshes = w.storm_peer.refresh_grants().await - before;
    r.push_str(&format!(
        "| refresh storm: 1000 concurrent requests on an expired token | {refreshes} refresh at the provider; {ok} answered 200 with {} distinct token(s); drained in {drain:.0} ms |\n",
        tokens.len()
    ));

    // 7. The timer's due query on the embedded store: 50,000 connections, none due.
    let (rows, due_ms) = sqlite_due_query(50_000).await;
    r.push_str(&format!(
        "| SQLite due query, {rows} active connections, none due | {due_ms:.2} ms median of 21 (indexed; a full scan before) |\n"
    ));

    // 8. At scale on the Dataverse double.
    r.push_str(&scale::section(&w).await);
    r
}

/// Median time of the timer's due query over `n` active connections that are not due.
async fn sqlite_due_query(n: usize) -> (usize, f64) {
    use dynamics_companion::clients::store::sqlite::SqliteStore;
    use dynamics_companion::domain::{ConnectionStore, Due};
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("due.db")).unwrap();
    let now = 1_800_000_000;
    let keys = dynamics_companion::support::crypto::Keyring::parse(&support::test_keys()).unwrap();
    let rows = (0..n).map(|i| {
        let mut c = scale::connection(&keys, "test", &format!("bulk-{i:06}"), now + 7200 + (i as i64 % 3600));
        (c.created_at, c.updated_at, c.refreshed_at) = (now - 86_400, now, Some(now));
        c
    });
    scale::insert_all(&store, rows.collect()).await;
    let mut times = Vec::new();
    for _ in 0..21 {
        let t = Instant::now();
        let query = Due { before: now + 1200, idle_before: now - 86_400, ready_at: now, limit: 500 };
        let due = store.due_for_refresh(&query).await.unwrap();
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        assert!(due.is_empty());
    }
    (n, median(&mut times))
}

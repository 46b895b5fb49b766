//! Test support: drives the built `handler` binary the way the Azure Functions host
//! does (see `shared/reference/functions-host.md`):
//! - spawns it with the host's environment (`FUNCTIONS_CUSTOMHANDLER_PORT`, worker id,
//!   `FUNCTIONS_APP_ROOT_PATH`, app settings) and nothing else from ours;
//! - polls `GET /` every 25 ms until any answer;
//! - forwards HTTP with the host's query-string rebuilding (repeated keys joined with
//!   commas, re-encoded), its `X-Azure-Functions-*` headers, no redirects followed, and a
//!   body only when `Content-Length` > 0;
//! - invokes the timer with a chunked JSON payload.
//!
//! Everything the process prints is kept so tests can assert on the logs.

#![allow(dead_code)]

pub mod azure;
pub mod dataverse;
pub mod flow;
pub mod fno;
pub mod issuer;
pub mod oidc;
pub mod peer;
pub mod portal;
pub mod seed;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_handler");

/// A fresh, valid token encryption key list for a test.
pub fn test_keys() -> String {
    use base64::Engine;
    let mut k = [0u8; 32];
    getrandom::fill(&mut k).unwrap();
    format!("t1:{}", base64::engine::general_purpose::STANDARD.encode(k))
}

/// Serves `filter` on `listener` in the background until the returned sender is dropped
/// (every in-test double and peer keeps it as `_shutdown`).
pub fn serve_on<F>(listener: tokio::net::TcpListener, filter: F) -> tokio::sync::oneshot::Sender<()>
where
    F: warp::Filter + Clone + Send + Sync + 'static,
    F::Extract: warp::Reply,
{
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(
        warp::serve(filter)
            .incoming(listener)
            .graceful(async {
                let _ = rx.await;
            })
            .run(),
    );
    tx
}

/// [`serve_on`] a fresh loopback port; returns `http://127.0.0.1:{port}` and the sender.
pub async fn serve<F>(filter: F) -> (String, tokio::sync::oneshot::Sender<()>)
where
    F: warp::Filter + Clone + Send + Sync + 'static,
    F::Extract: warp::Reply,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://127.0.0.1:{}", listener.local_addr().unwrap().port());
    (url, serve_on(listener, filter))
}

/// Whether this process runs as root (uid 0), from /proc: no libc call needed.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false)
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// What the handler printed, by stream.
#[derive(Clone, Default)]
pub struct Logs(Arc<Mutex<Vec<(bool, String)>>>, Arc<std::sync::atomic::AtomicU64>);

impl Logs {
    /// Lines that held the marker, for a handler started [`HandlerBuilder::counting_lines`].
    pub fn counted(&self) -> u64 {
        self.1.load(std::sync::atomic::Ordering::Relaxed)
    }
    fn push(&self, stderr: bool, line: String) {
        self.0.lock().unwrap().push((stderr, line));
    }
    pub fn all(&self) -> String {
        self.0.lock().unwrap().iter().map(|(_, l)| l.as_str()).collect::<Vec<_>>().join("\n")
    }
    /// Waits (up to 5 s) for a stdout line matching `pred`: lines travel through a pipe
    /// and a reader thread, so they can arrive just after the response they describe.
    pub fn wait_for_line(&self, pred: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(l) = self.stdout().into_iter().find(|l| pred(l)) {
                return Some(l);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    pub fn stderr(&self) -> Vec<String> {
        self.0.lock().unwrap().iter().filter(|(e, _)| *e).map(|(_, l)| l.clone()).collect()
    }
    pub fn stdout(&self) -> Vec<String> {
        self.0.lock().unwrap().iter().filter(|(e, _)| !*e).map(|(_, l)| l.clone()).collect()
    }
}

/// A shared record of every log line of every handler a test binary ran, so a test can
/// check that no secret ever reached the logs.
pub static ALL_LOGS: std::sync::LazyLock<Logs> = std::sync::LazyLock::new(Logs::default);

/// How the Functions host hands HTTP requests to the handler (host.json `customHandler`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostMode {
    /// `enableProxyingHttpRequest` (what host.json sets): YARP forwards the request as it
    /// came, raw query and streamed body, and sets `X-Forwarded-For/Host/Proto` and the
    /// invocation id headers.
    Proxying,
    /// `enableForwardingHttpRequest`, the legacy mode: the request is rebuilt, repeated
    /// query keys joined with commas, values re-encoded, a body without Content-Length
    /// dropped.
    Forwarding,
}

pub struct HandlerBuilder {
    env: BTreeMap<String, String>,
    args: Vec<String>,
    root: PathBuf,
    under_host: bool,
    mode: HostMode,
    /// Another `handler` binary to run (the packaged one), and whether to drop root's
    /// privileges for it so that a read-only folder is read-only to it.
    program: Option<PathBuf>,
    unprivileged: bool,
    port: u16,
    /// Keep no lines, only count those holding this (a benchmark's handler: see
    /// [`HandlerBuilder::counting_lines`]).
    counting: Option<&'static str>,
    _tmp: Option<Arc<tempfile::TempDir>>,
}

impl HandlerBuilder {
    /// A handler in a fresh app root (a temp dir), with a test encryption key.
    pub fn new() -> HandlerBuilder {
        let tmp = Arc::new(tempfile::tempdir().unwrap());
        let mut b = HandlerBuilder {
            env: BTreeMap::new(),
            args: Vec::new(),
            root: tmp.path().to_path_buf(),
            under_host: true,
            mode: HostMode::Proxying,
            program: None,
            unprivileged: false,
            port: free_port(),
            counting: None,
            _tmp: Some(tmp),
        };
        b.env.insert("TOKEN_ENCRYPTION_KEYS".into(), test_keys());
        b
    }

    /// Reads the handler's output without keeping it, counting the lines that hold
    /// `marker` ([`Logs::counted`]). For load runs: keeping every line (two copies, a
    /// `String` each) runs on the cores the handler runs on. With lines counted instead, the
    /// audit-cost handler served about 63,000 requests/s instead of 50,000 (BENCHMARKS.md,
    /// fifth sitting).
    pub fn counting_lines(mut self, marker: &'static str) -> HandlerBuilder {
        self.counting = Some(marker);
        self
    }

    /// A handler in a given app root, with no settings yet.
    pub fn in_root(root: &Path) -> HandlerBuilder {
        HandlerBuilder {
            env: BTreeMap::new(),
            args: Vec::new(),
            root: root.to_path_buf(),
            under_host: true,
            mode: HostMode::Proxying,
            program: None,
            unprivileged: false,
            port: free_port(),
            counting: None,
            _tmp: None,
        }
    }

    /// Shares another handler's app root (same SQLite file, same keys).
    pub fn sharing(other: &Handler) -> HandlerBuilder {
        HandlerBuilder {
            env: other.env.clone(),
            args: Vec::new(),
            root: other.root.clone(),
            under_host: true,
            mode: other.mode,
            program: None,
            unprivileged: false,
            port: free_port(),
            counting: None,
            _tmp: other._tmp.clone(),
        }
    }

    /// Runs this binary instead of the one cargo built for the tests; as an unprivileged
    /// user (nobody) when the tests run as root, who would ignore file permissions.
    pub fn program(mut self, path: &Path, unprivileged: bool) -> Self {
        self.program = Some(path.to_path_buf());
        self.unprivileged = unprivileged;
        self
    }

    /// Drives the handler as a host in the legacy forwarding mode does.
    pub fn legacy_forwarding(mut self) -> Self {
        self.mode = HostMode::Forwarding;
        self
    }

    pub fn env(mut self, k: &str, v: impl Into<String>) -> Self {
        self.env.insert(k.into(), v.into());
        self
    }

    /// A sub-command and its arguments (`provision`, `check`, ...).
    pub fn envs(mut self, settings: Vec<(&str, String)>) -> Self {
        for (k, v) in settings {
            self.env.insert(k.to_string(), v);
        }
        self
    }

    pub fn args(mut self, args: &[&str]) -> Self {
        self.args = args.iter().map(|a| a.to_string()).collect();
        self.under_host = false;
        self
    }

    pub fn without_env(mut self, k: &str) -> Self {
        self.env.remove(k);
        self
    }

    /// Runs the handler on its own (no `FUNCTIONS_CUSTOMHANDLER_PORT`), as `cargo run` does.
    pub fn standalone(mut self) -> Self {
        self.under_host = false;
        self
    }

    pub fn file(self, name: &str, contents: &str) -> Self {
        std::fs::write(self.root.join(name), contents).unwrap();
        self
    }

    /// Where the handler will listen once started under the host.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn command(&self) -> Command {
        let program = self.program.clone().unwrap_or_else(|| PathBuf::from(BIN));
        let mut cmd = if self.unprivileged && is_root() {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups"]).arg(&program);
            c
        } else {
            Command::new(&program)
        };
        cmd.args(&self.args).env_clear().current_dir(&self.root);
        for var in ["PATH", "HOME", "SSL_CERT_FILE", "LLVM_PROFILE_FILE"] {
            if let Some(v) = std::env::var_os(var) {
                cmd.env(var, v);
            }
        }
        if self.under_host {
            let worker = format!("{:08x}-0000-4000-8000-{:012x}", std::process::id(), self.port);
            cmd.env("FUNCTIONS_CUSTOMHANDLER_PORT", self.port.to_string())
                .env("FUNCTIONS_HTTPWORKER_PORT", self.port.to_string())
                .env("FUNCTIONS_CUSTOMHANDLER_WORKER_ID", &worker)
                .env("FUNCTIONS_HTTPWORKER_ID", &worker)
                .env("FUNCTIONS_APP_ROOT_PATH", &self.root)
                .env("FUNCTIONS_WORKER_RUNTIME", "custom")
                .env("AzureWebJobsScriptRoot", &self.root);
        }
        cmd.envs(&self.env);
        cmd
    }

    /// Runs the handler to completion (for start-up failures).
    pub fn run_to_exit(self) -> (Option<i32>, String, String) {
        let out = self.command().stdin(Stdio::null()).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
    }

    /// Spawns the handler and waits for readiness as the host does.
    pub async fn start(self) -> Handler {
        let started = Instant::now();
        let mut child = self
            .command()
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the handler binary starts");
        let logs = Logs::default();
        for (stderr, pipe) in [
            (false, Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>),
            (true, Box::new(child.stderr.take().unwrap())),
        ] {
            let logs = logs.clone();
            let counting = self.counting;
            std::thread::spawn(move || {
                let mut pipe = pipe;
                if let Some(marker) = counting {
                    // Big reads, and the marker counted in them (it appears once a line);
                    // what could be the start of a marker cut by a read is kept for the next.
                    let finder = memchr::memmem::Finder::new(marker.as_bytes());
                    let keep = marker.len() - 1;
                    let (mut buf, mut held) = (vec![0u8; 256 * 1024], 0);
                    while let Ok(n) = pipe.read(&mut buf[held..]) {
                        if n == 0 {
                            break;
                        }
                        let end = held + n;
                        let found = finder.find_iter(&buf[..end]).count() as u64;
                        logs.1.fetch_add(found, std::sync::atomic::Ordering::Relaxed);
                        held = keep.min(end);
                        buf.copy_within(end - held..end, 0);
                    }
                    return;
                }
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    ALL_LOGS.push(stderr, line.clone());
                    logs.push(stderr, line);
                }
            });
        }
        let port = if self.under_host {
            self.port
        } else {
            self.env.get("LOCAL_HTTP_PORT").and_then(|p| p.parse().ok()).unwrap_or(7071)
        };
        let base = format!("http://127.0.0.1:{port}");
        let probe = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().unwrap();
        let ready_after = loop {
            if probe.get(format!("{base}/")).send().await.is_ok() {
                break started.elapsed();
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("the handler exited during start-up with {status}:\n{}", logs.all());
            }
            assert!(started.elapsed() < Duration::from_secs(30), "the handler did not become ready:\n{}", logs.all());
            tokio::time::sleep(Duration::from_millis(25)).await;
        };
        Handler {
            child,
            mode: self.mode,
            port,
            base,
            logs,
            ready_after,
            env: self.env,
            root: self.root,
            _tmp: self._tmp,
            http: reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap(),
        }
    }
}

pub struct Handler {
    child: Child,
    pub mode: HostMode,
    pub port: u16,
    pub base: String,
    pub logs: Logs,
    /// Exec to first answer on `GET /`.
    pub ready_after: Duration,
    pub env: BTreeMap<String, String>,
    pub root: PathBuf,
    _tmp: Option<Arc<tempfile::TempDir>>,
    http: reqwest::Client,
}

impl Drop for Handler {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The response as a test sees it.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
    }
    pub fn content_type(&self) -> &str {
        self.header("content-type")
    }
    /// Asserts an RFC 9457 problem with this status and type slug.
    pub fn assert_problem(&self, status: u16, code: &str) -> Value {
        assert_eq!(self.status, status, "{}", self.body);
        assert_eq!(self.content_type(), "application/problem+json", "{}", self.body);
        let p = self.json();
        assert_eq!(p["type"], format!("urn:dynamics-companion:problem:{code}"), "{}", self.body);
        assert!(p["detail"].as_str().is_some_and(|d| !d.is_empty()));
        p
    }
    pub fn assert_html(&self, status: u16) {
        assert_eq!(self.status, status, "{}", self.body);
        assert!(self.content_type().starts_with("text/html"), "{}", self.content_type());
    }
}

/// Encodes like .NET's `UrlEncoder.Default` as used by `QueryHelpers.AddQueryString`:
/// everything but ASCII letters, digits and `-._~` is percent-encoded.
fn dotnet_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The query string the host forwards: parsed, repeated keys joined with commas,
/// re-encoded, in first-seen key order.
pub fn host_rebuilt_query(query: &str) -> String {
    let mut keys: Vec<String> = Vec::new();
    let mut values: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        if !values.contains_key(k.as_ref()) {
            keys.push(k.to_string());
        }
        values.entry(k.to_string()).or_default().push(v.to_string());
    }
    keys.iter()
        .map(|k| format!("{}={}", dotnet_encode(k), dotnet_encode(&values[k].join(","))))
        .collect::<Vec<_>>()
        .join("&")
}

impl Handler {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends SIGTERM and waits for the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            assert!(Instant::now() < deadline, "the handler did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends a request as the host does in this handler's [`HostMode`]. In proxying mode
    /// an `X-Forwarded-For` among `headers` stands for the client address the host writes
    /// (YARP sets the header, replacing what the client sent); without one it is 127.0.0.1.
    pub async fn forward(
        &self,
        method: Method,
        path_and_query: &str,
        headers: &[(&str, &str)],
        body: Option<Vec<u8>>,
    ) -> Reply {
        // The host writes the invocation id; a test may choose it to look for it later.
        let chosen = headers.iter().find(|(k, _)| k.eq_ignore_ascii_case("x-azure-functions-invocationid"));
        let id = chosen.map(|(_, v)| v.to_string()).unwrap_or_else(invocation_id);
        let mut req = match self.mode {
            HostMode::Proxying => {
                let mut req = self.http.request(method, format!("{}{}", self.base, path_and_query));
                if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("x-forwarded-for")) {
                    req = req.header("X-Forwarded-For", "127.0.0.1");
                }
                if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("user-agent")) {
                    req = req.header("User-Agent", "test-browser/1.0");
                }
                req.header("X-Forwarded-Host", "localhost:7071")
                    .header("X-Forwarded-Proto", "http")
                    .header("X-Azure-Functions-HostVersion", "4.1044.400.0")
                    .header("X-Azure-Functions-InvocationId", &id)
                    .header("x-ms-invocation-id", &id)
            }
            HostMode::Forwarding => {
                let (path, query) = path_and_query.split_once('?').unwrap_or((path_and_query, ""));
                let mut url = format!("{}{}", self.base, path);
                let rebuilt = host_rebuilt_query(query);
                if !rebuilt.is_empty() {
                    url = format!("{url}?{rebuilt}");
                }
                self.http
                    .request(method, url)
                    .header("X-Azure-Functions-HostVersion", "4.1040.300.0")
                    .header("X-Azure-Functions-InvocationId", &id)
                    .header("User-Agent", "test-browser/1.0 Azure-Functions-Host/4.1040.300.0")
            }
        };
        for (k, v) in headers.iter().filter(|(k, _)| !k.eq_ignore_ascii_case("x-azure-functions-invocationid")) {
            req = req.header(*k, *v);
        }
        // The legacy mode copies a body only when Content-Length > 0; proxying streams it.
        if let Some(body) = body.filter(|b| !b.is_empty() || self.mode == HostMode::Proxying) {
            req = req.body(body);
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                // No answer at all (the process died, a connection cut): what it said last,
                // after a moment for its final lines to come through the pipe.
                tokio::time::sleep(Duration::from_millis(300)).await;
                panic!("the handler did not answer: {e}\nits output:\n{}", self.logs.all())
            }
        };
        Reply {
            status: resp.status().as_u16(),
            headers: resp.headers().clone(),
            body: resp.text().await.unwrap_or_default(),
        }
    }

    /// `GET path` with no headers, owning its path (for futures gathered in a list).
    pub async fn get_owned(&self, path: String) -> Reply {
        self.get(&path, &[]).await
    }

    pub async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        self.forward(Method::GET, path, headers, None).await
    }

    /// A JSON request through the host.
    pub async fn json(&self, method: Method, path: &str, bearer: Option<&str>, body: &Value) -> Reply {
        let auth = bearer.map(|t| format!("Bearer {t}"));
        let mut headers = vec![("Content-Type", "application/json")];
        if let Some(a) = &auth {
            headers.push(("Authorization", a.as_str()));
        }
        self.forward(method, path, &headers, Some(serde_json::to_vec(body).unwrap())).await
    }

    /// Invokes the `refresh` timer with the payload protocol: chunked JSON, no length.
    /// Registers a capture-mode state as Dynamics does before sending a person away.
    pub async fn expect_state(&self, bearer: &str, state: &str) {
        let r = self.json(Method::POST, "/api/captures", Some(bearer), &serde_json::json!({ "state": state })).await;
        assert_eq!(r.status, 201, "{}", r.body);
    }

    pub async fn invoke_timer(&self, payload: &Value) -> Reply {
        let bytes = serde_json::to_vec(payload).unwrap();
        self.post_chunked("/refresh", bytes, "application/json; charset=utf-8").await
    }

    /// POSTs a body with `Transfer-Encoding: chunked` (split in 8 KiB chunks).
    pub async fn post_chunked(&self, path: &str, bytes: Vec<u8>, content_type: &str) -> Reply {
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> = bytes.chunks(8192).map(|c| Ok(c.to_vec())).collect();
        let body = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
        let resp = self
            .http
            .post(format!("{}{}", self.base, path))
            .header("Content-Type", content_type)
            .header("X-Azure-Functions-HostVersion", "4.1040.300.0")
            .header("X-Azure-Functions-InvocationId", invocation_id())
            .header("User-Agent", "Azure-Functions-Host/4.1040.300.0")
            .body(body)
            .send()
            .await
            .expect("the handler answers");
        Reply {
            status: resp.status().as_u16(),
            headers: resp.headers().clone(),
            body: resp.text().await.unwrap_or_default(),
        }
    }
}

fn invocation_id() -> String {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).unwrap();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The timer payload as the host sends it (host 4.x, observed shape).
pub fn timer_payload(past_due: bool) -> Value {
    serde_json::json!({
        "Data": { "timer": { "Schedule": { "AdjustForDST": true }, "ScheduleStatus": null, "IsPastDue": past_due } },
        "Metadata": { "sys": { "MethodName": "refresh", "UtcNow": "2026-11-22T10:00:00.0000000Z", "RandGuid": "35e6e68c-0000-4000-8000-000000000000" } }
    })
}

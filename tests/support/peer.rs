//! A Node.js test peer (tests/peers/*.mjs): spawned with its config in an environment
//! variable, ready when it prints its one JSON line, stopped when dropped (it also exits
//! when its stdin closes, so a crashed test leaves no orphan).

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdin, Command, Stdio};

use serde_json::Value;

pub struct NodePeer {
    child: Child,
    _stdin: ChildStdin,
    /// The ready line.
    pub ready: Value,
    http: reqwest::Client,
}

impl Drop for NodePeer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn peers_dir() -> String {
    format!("{}/tests/peers", env!("CARGO_MANIFEST_DIR"))
}

impl NodePeer {
    pub fn start(script: &str, config_var: &str, config: &Value) -> NodePeer {
        let dir = peers_dir();
        assert!(
            std::path::Path::new(&format!("{dir}/node_modules")).exists(),
            "tests/peers has no node_modules: run `npm ci --prefix tests/peers` (tests/run does)"
        );
        let mut child = Command::new("node")
            .arg(format!("{dir}/{script}"))
            .env(config_var, config.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("node starts");
        let stdin = child.stdin.take().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let ready: Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("{script} did not start ({e}): {line:?}"));
        // No idle pooling: Node closes idle keep-alive sockets after 5 s, and a request
        // sent on one just as it closes is reset (a known Node/client race).
        let http = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
        NodePeer { child, _stdin: stdin, ready, http }
    }

    pub fn field(&self, name: &str) -> String {
        self.ready[name].as_str().unwrap_or_else(|| panic!("no {name} in {}", self.ready)).to_string()
    }

    /// A control call: `base` is the listener that serves `/__control/`.
    pub async fn control(&self, base: &str, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}/__control/{path}", base.trim_end_matches('/'));
        let mut attempt = 0;
        let resp = loop {
            attempt += 1;
            let mut req = self.http.request(method.clone(), &url);
            if let Some(b) = &body {
                req = req.json(b);
            }
            match req.send().await {
                Ok(resp) => break resp,
                // A loaded peer may drop a connection; the control calls are safe to repeat.
                Err(e) if attempt < 3 && (e.is_connect() || e.is_request()) => {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                Err(e) => panic!("control {path}: {e}"),
            }
        };
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        assert!(status.is_success(), "control {path}: {status} {v}");
        v
    }
}

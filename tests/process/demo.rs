//! `scripts/demo`, the README's "Try it": run headless (the provider's control plays the
//! person), it must end with an active connection, a token and a proxied call.

use crate::support;

use std::process::Command;

#[test]
fn the_demo_completes_headless() {
    let port = support::free_port();
    let out = Command::new("node")
        .arg(format!("{}/scripts/demo.mjs", env!("CARGO_MANIFEST_DIR")))
        .arg("--headless")
        .env("DEMO_HANDLER", env!("CARGO_BIN_EXE_handler"))
        .env("DEMO_PORT", port.to_string())
        .output()
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    for expected in [
        "Connection demo-1: active",
        "Access token: ",
        "Proxied call GET /api/connections/demo-1/proxy/hello: HTTP 200",
        "saw GET /__api/hello?from=demo",
        "Demo done.",
    ] {
        assert!(stdout.contains(expected), "missing {expected:?} in:\n{stdout}{stderr}");
    }
}

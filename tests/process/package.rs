//! The deployable package (`scripts/package`, issue [5/7]): exactly the function app in
//! the zip, a static `handler` that keeps its executable bit, `.funcignore` in step with
//! it, and the handler running from the unpacked package mounted read-only, as Flex
//! Consumption runs it.
//!
//! `tests/run` builds the package first; run alone, this test builds it (in its own
//! target folder, so it does not wait on the build lock of the running `cargo test`).

use crate::support;

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use support::HandlerBuilder;
use support::issuer::Issuer;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn package() -> PathBuf {
    let zip = repo().join("dist/dynamics-companion.zip");
    if !zip.is_file() {
        let status = Command::new("bash")
            .arg(repo().join("scripts/package"))
            .env("CARGO_TARGET_DIR", repo().join("target/package"))
            .status()
            .expect("scripts/package runs");
        assert!(status.success(), "scripts/package failed");
    }
    zip
}

/// What the package must hold: host.json, providers.toml, the handler, and every
/// function folder with its function.json.
fn expected() -> BTreeSet<String> {
    let mut want: BTreeSet<String> = ["host.json", "providers.toml", "handler"].map(String::from).into();
    for entry in std::fs::read_dir(repo()).unwrap() {
        let dir = entry.unwrap().path();
        if dir.join("function.json").is_file() {
            let name = dir.file_name().unwrap().to_string_lossy().to_string();
            want.insert(format!("{name}/"));
            want.insert(format!("{name}/function.json"));
        }
    }
    want
}

fn listing(zip: &Path) -> BTreeSet<String> {
    let out = Command::new("unzip").arg("-Z1").arg(zip).output().expect("unzip is installed");
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().lines().map(str::to_string).collect()
}

#[test]
fn the_zip_holds_exactly_the_function_app() {
    let zip = package();
    assert_eq!(listing(&zip), expected());
    // The Unix mode is in the archive itself: -rwxr-xr-x for handler, no write bits
    // beyond the owner's for the rest.
    let info = Command::new("unzip").arg("-Z").arg(&zip).output().unwrap();
    let info = String::from_utf8(info.stdout).unwrap();
    let handler_line = info.lines().find(|l| l.ends_with(" handler")).expect("handler listed");
    assert!(handler_line.starts_with("-rwxr-xr-x"), "{handler_line}");
    assert!(handler_line.contains(" unx "), "made with Unix attributes: {handler_line}");
}

/// gitignore-style patterns without slashes: each matches any path component.
fn ignored(patterns: &[String], path: &str) -> bool {
    fn glob(p: &[u8], s: &[u8]) -> bool {
        match (p.first(), s.first()) {
            (None, None) => true,
            (Some(b'*'), _) => glob(&p[1..], s) || (!s.is_empty() && glob(p, &s[1..])),
            (Some(a), Some(b)) if a == b => glob(&p[1..], &s[1..]),
            _ => false,
        }
    }
    path.split('/').any(|part| patterns.iter().any(|p| glob(p.as_bytes(), part.as_bytes())))
}

#[test]
fn funcignore_leaves_exactly_the_package_contents() {
    let patterns: Vec<String> = std::fs::read_to_string(repo().join(".funcignore"))
        .unwrap()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect();
    assert!(patterns.iter().all(|p| !p.contains('/') && !p.starts_with('!')), "plain names only: {patterns:?}");
    let tracked = Command::new("git").args(["ls-files"]).current_dir(repo()).output().expect("git");
    let mut kept: BTreeSet<String> = String::from_utf8(tracked.stdout)
        .unwrap()
        .lines()
        .filter(|f| !ignored(&patterns, f))
        .map(String::from)
        .collect();
    // The binary is built, not tracked; a publish from the repository takes it too.
    kept.insert("handler".into());
    let files: BTreeSet<String> = expected().into_iter().filter(|f| !f.ends_with('/')).collect();
    assert_eq!(kept, files);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_packaged_handler_is_static_and_runs_from_a_read_only_folder() {
    let zip = package();
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let app = tmp.path().join("app");
    let unzipped = Command::new("unzip").arg("-q").arg(&zip).arg("-d").arg(&app).status().unwrap();
    assert!(unzipped.success());
    let handler = app.join("handler");
    let mode = std::fs::metadata(&handler).unwrap().permissions().mode();
    assert_eq!(mode & 0o111, 0o111, "executable after unzip: {mode:o}");
    let file = Command::new("file").arg(&handler).output().expect("file is installed");
    let file = String::from_utf8_lossy(&file.stdout).to_string();
    assert!(file.contains("statically linked") || file.contains("static-pie linked"), "{file}");
    assert!(file.contains(", stripped"), "the package's handler carries no symbols: {file}");

    // Read-only, as the mounted package is (for root, the handler runs as nobody).
    let lock = |writable: bool| {
        let m = if writable { "u+w" } else { "a-w" };
        assert!(Command::new("chmod").args(["-R", m]).arg(&app).status().unwrap().success());
    };
    lock(false);
    let writable = tmp.path().join("scratch");
    std::fs::create_dir(&writable).unwrap();
    std::fs::set_permissions(&writable, std::fs::Permissions::from_mode(0o1777)).unwrap();

    // The embedded SQLite default cannot live there: start-up stops with one line.
    let (code, _out, err) = HandlerBuilder::in_root(&app).program(&handler, true).run_to_exit();
    assert_ne!(code, Some(0));
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line: {err}");
    assert!(lines[0].contains("read-only") && lines[0].contains("SQLITE_PATH"), "{err}");

    // Told where to write, it starts and serves, with nothing written to the package.
    let issuer = Issuer::start().await;
    let h = HandlerBuilder::in_root(&app)
        .program(&handler, true)
        .env("SQLITE_PATH", writable.join("companion.db").to_string_lossy())
        .envs(issuer.settings())
        .start()
        .await;
    let health = h.get("/api/health", &[("Authorization", &format!("Bearer {}", issuer.token()))]).await;
    assert_eq!(health.status, 200, "{}", health.body);
    assert_eq!(health.json()["dependencies"]["store"]["ready"], true);
    assert!(writable.join("companion.db").is_file());
    let mut found: BTreeSet<String> = BTreeSet::new();
    for entry in walk(&app) {
        found.insert(entry.strip_prefix(&app).unwrap().to_string_lossy().to_string());
    }
    assert_eq!(found, expected().into_iter().map(|f| f.trim_end_matches('/').to_string()).collect());
    drop(h);
    lock(true);
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

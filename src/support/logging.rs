//! Logging to stdout and stderr, which the Functions host collects.
//!
//! The host records every stderr line as an error in Application Insights, so only
//! `ERROR` events go to stderr; everything else goes to stdout.
//!
//! Secrets are kept out of the logs in two layers. First, tokens and secrets are held in
//! [`secrecy::SecretString`], whose `Debug` prints nothing, and request logs carry the
//! route, never the query string. Second, every formatted line passes through
//! [`redact`] before it is written: bearer values, JWTs and `name=value` / `"name":"value"`
//! pairs for OAuth secrets are masked whatever code produced them. (The audit line passes
//! part by part: its span prefix and each of its values; see `plain.rs`.)

mod audit_line;
mod plain;

use std::io::{self, Write};
use std::sync::LazyLock;

use regex::Regex;
use tracing::Level;
use tracing_subscriber::filter::FilterExt;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

/// How each line is written (`LOG_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// One human-readable line per event: the default, and what the Functions host shows.
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `message`, the event's fields and
    /// its spans), for log pipelines that parse lines. Redacted like text.
    Json,
}

/// Installs the global subscriber. Safe to call once; later calls are ignored.
/// `export` is the telemetry layer ([`crate::clients::telemetry::Telemetry::layer`]) when
/// Application Insights export is on; the console lines are written either way.
pub fn init(level: &str, format: LogFormat, export: Option<Box<dyn Layer<Registry> + Send + Sync>>) {
    let _ = subscriber(level, format, export).try_init();
}

/// The subscriber [`init`] installs. Without export there is no export layer at all: an
/// absent `Option` layer counts as a layer that wants every span and event, so the
/// registry created every span at every `LOG_LEVEL` (`perf`: the request's span and each
/// outbound call's entered, recorded and closed on every proxied call at `warn`, for no
/// line).
fn subscriber(
    level: &str,
    format: LogFormat,
    export: Option<Box<dyn Layer<Registry> + Send + Sync>>,
) -> Box<dyn tracing::Subscriber + Send + Sync> {
    match export {
        Some(export) => {
            crate::support::trace_context::activate();
            Box::new(tracing_subscriber::registry().with(export).with(console(level, format)))
        }
        None => Box::new(tracing_subscriber::registry().with(console(level, format))),
    }
}

/// The console's layers: every line but the audit record's through tracing-subscriber's
/// formatter, and the audit record's through [`audit_line`]; both follow `level`.
fn console<S>(level: &str, format: LogFormat) -> Box<dyn Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a> + Send + Sync,
{
    let filter = with_directives(
        EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info")),
        // The audit record follows LOG_LEVEL (info by default; `warn,audit=info` keeps it
        // alone), written by a layer of its own (below), which keeps the spans the console
        // keeps and only the audit events. The Application Insights twin is never a line.
        &["appinsights_event=off", "audit=off"],
    );
    let audit_filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    // The audit layer redacts its line part by part (see `plain.rs`) and hands it
    // over as it is.
    let audit =
        audit_line::AuditLines::new(format, |to_stderr, line: String| sink::write(to_stderr, line.into_bytes()))
            .with_filter(audit_filter.and(audit_line::SpansAndAudit));
    let lines = tracing_subscriber::fmt::layer().with_writer(SplitWriter).with_ansi(false);
    let lines = match format {
        LogFormat::Text => lines.with_target(false).with_filter(filter).boxed(),
        LogFormat::Json => {
            lines.json().flatten_event(true).with_current_span(false).with_span_list(true).with_filter(filter).boxed()
        }
    };
    lines.and_then(audit).boxed()
}

/// `filter` with `directives` added (each a valid directive).
pub fn with_directives(mut filter: EnvFilter, directives: &[&str]) -> EnvFilter {
    for d in directives {
        if let Ok(d) = d.parse() {
            filter = filter.add_directive(d);
        }
    }
    filter
}

/// Names whose values are secret wherever they appear in a line.
const SECRET_NAMES: [&str; 14] = [
    "access_token",
    "refresh_token",
    "id_token",
    "client_secret",
    "code_verifier",
    "code",
    "assertion",
    "client_assertion",
    "password",
    "token",
    "secret",
    "state",
    "key",
    "authorization",
];

/// Whether a field or property of this name holds a secret (exact name, any case).
/// Asked for every word before a `=` or a quote of every line (see [`may_hold_secret`]), so
/// it compares lengths before letters: `perf` put splitting a `|`-joined list here at 7 %
/// of the audited token endpoint's cycles, and its comparisons at 3 % more.
pub fn is_secret_name(name: &str) -> bool {
    SECRET_NAMES.iter().any(|n| n.len() == name.len() && n.eq_ignore_ascii_case(name))
}

static PATTERNS: LazyLock<Vec<(Regex, &'static str)>> = LazyLock::new(|| {
    let compile = |p: &str| Regex::new(p).expect("redaction patterns are valid");
    let names = SECRET_NAMES.join("|");
    vec![
        // `Authorization: Bearer xyz`, `bearer xyz`
        (compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9\-._~+/=]+"), "$1 [redacted]"),
        // JWTs anywhere (three base64url segments, the first starting with a JSON `{"`).
        (compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"), "[redacted-jwt]"),
        // query-string or form pairs: `code=abc&state=...`. The value ends at a quote or a
        // backslash too: `"url":"/x?code=abc"` keeps its closing quote (a JSON line stays
        // JSON) and `\"` in Debug output its escape.
        (compile(&format!(r#"(?i)\b({names})=[^&\s;,"\\]+"#)), "$1=[redacted]"),
        // JSON pairs: `"refresh_token": "abc"`, also with escaped quotes inside Debug output.
        (compile(&format!(r#"(?i)(\\?"(?:{names})\\?"\s*:\s*\\?")[^"\\]*"#)), "$1[redacted]"),
    ]
});

/// Whether any of [`PATTERNS`] could match `line`, without running them: most lines hold
/// nothing a pattern needs, and this says so in a few SIMD scans. Every match of a pattern
/// contains `eyJ`, or `bearer` / `basic` in some case, or a secret name (in some case) as
/// the whole word right before `=` and a value, or quoted right before `"` or `\"` and a
/// `:`; this looks for exactly those. The patterns fold case by Unicode (U+212A KELVIN SIGN
/// is a `k` to them), so a line with any non-ASCII byte goes to the patterns unchecked. It
/// replaced an Aho-Corasick pass over the same literals, which `perf` put at 7 % of the
/// token endpoint's cycles (it read every byte of two lines per request through its
/// automaton).
fn may_hold_secret(line: &str) -> bool {
    let bytes = line.as_bytes();
    if !line.is_ascii() || memchr::memmem::find(bytes, b"eyJ").is_some() {
        return true;
    }
    let starts_with =
        |at: usize, word: &[u8]| bytes.get(at..at + word.len()).is_some_and(|b| b.eq_ignore_ascii_case(word));
    if memchr::memchr2_iter(b'b', b'B', bytes).any(|at| starts_with(at + 1, b"earer") || starts_with(at + 1, b"asic")) {
        return true;
    }
    memchr::memchr2_iter(b'=', b'"', bytes).any(|at| {
        // What must follow, looked at first since it rules out most candidates: after
        // `name=` a value (a byte other than `&`, `;`, `,` or a space); after a quoted name,
        // optional spaces and a `:`. (`\s` in the patterns, for ASCII: these six bytes.)
        let space = |b: u8| matches!(b, b' ' | b'\t' | b'\n' | b'\x0B' | b'\x0C' | b'\r');
        let followed = match bytes[at] {
            b'=' => bytes.get(at + 1).is_some_and(|&b| !(space(b) || matches!(b, b'&' | b';' | b',' | b'"' | b'\\'))),
            _ => bytes[at + 1..].iter().find(|&&b| !space(b)) == Some(&b':'),
        };
        if !followed {
            return false;
        }
        // `name\"`: the name ends before the backslash.
        let end = if bytes[at] == b'"' && at > 0 && bytes[at - 1] == b'\\' { at - 1 } else { at };
        // The whole word before it, looked at no further back than the longest name.
        let from = end.saturating_sub(LONGEST_SECRET_NAME + 1);
        let start = bytes[from..end]
            .iter()
            .rposition(|b| !(b.is_ascii_alphanumeric() || *b == b'_'))
            .map_or(from, |p| from + p + 1);
        let word = &bytes[start..end];
        // Before `"`, the name is quoted (`"token"`), not the end of a path (`/token"`).
        let quoted = bytes[at] != b'"' || (start > 0 && bytes[start - 1] == b'"');
        quoted && (start > from || from == 0) && std::str::from_utf8(word).is_ok_and(is_secret_name)
    })
}

/// The length of the longest of [`SECRET_NAMES`].
const LONGEST_SECRET_NAME: usize = 16;

/// One pass over a line that says whether any pattern could apply.
static ANY: LazyLock<regex::RegexSet> = LazyLock::new(|| {
    regex::RegexSet::new(PATTERNS.iter().map(|(re, _)| re.as_str())).expect("redaction patterns are valid")
});

/// Masks secret-looking values in one log line.
pub fn redact(line: &str) -> std::borrow::Cow<'_, str> {
    if !may_hold_secret(line) || !ANY.is_match(line) {
        return std::borrow::Cow::Borrowed(line);
    }
    let mut out = std::borrow::Cow::Borrowed(line);
    for (re, replacement) in PATTERNS.iter() {
        if re.is_match(&out) {
            out = std::borrow::Cow::Owned(re.replace_all(&out, *replacement).into_owned());
        }
    }
    out
}

/// Chooses stderr for errors and stdout for the rest, per event.
struct SplitWriter;

impl<'a> MakeWriter<'a> for SplitWriter {
    type Writer = LineWriter;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter { buf: Vec::new(), to_stderr: false }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Self::Writer {
        LineWriter { buf: Vec::with_capacity(256), to_stderr: *meta.level() == Level::ERROR }
    }
}

/// Buffers one formatted event, redacts it, and writes it in one call on drop.
struct LineWriter {
    buf: Vec<u8>,
    to_stderr: bool,
}

impl Write for LineWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        if !self.buf.is_empty() {
            emit(self.to_stderr, std::mem::take(&mut self.buf));
        }
    }
}

/// Redacts one formatted line and hands it to the writer thread.
fn emit(to_stderr: bool, buf: Vec<u8>) {
    match String::from_utf8(buf) {
        Ok(text) => emit_text(to_stderr, text),
        Err(e) => sink::write(to_stderr, redact(&String::from_utf8_lossy(e.as_bytes())).into_owned().into_bytes()),
    }
}

/// [`emit`] for a line known to be UTF-8. Most lines have nothing to mask and are handed
/// over as they are.
fn emit_text(to_stderr: bool, line: String) {
    let masked = match redact(&line) {
        std::borrow::Cow::Borrowed(_) => None,
        std::borrow::Cow::Owned(clean) => Some(clean),
    };
    sink::write(to_stderr, masked.unwrap_or(line).into_bytes());
}

/// The console lines, written by a thread of their own: a request formats its line and
/// hands it over, and the writer sends whatever has queued in one write per stream, so a
/// busy instance pays one system call per batch, not per line. Measured: one audit line
/// per token request cost 45 % of the token endpoint's throughput written in place.
/// When the queue is full a line is written in place (slower, never lost); [`flush`]
/// waits for what is queued (the process calls it before it exits).
mod sink {
    use std::io::{self, BufWriter, Write};
    use std::sync::OnceLock;
    use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
    use std::time::Duration;

    enum Msg {
        Line(bool, Vec<u8>),
        Flush(std::sync::mpsc::Sender<()>),
    }

    const QUEUE: usize = 16_384;
    const BATCH_PAUSE: Duration = Duration::from_millis(1);
    static SINK: OnceLock<Option<SyncSender<Msg>>> = OnceLock::new();

    fn sender() -> Option<&'static SyncSender<Msg>> {
        SINK.get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
            std::thread::Builder::new().name("log-writer".into()).spawn(move || run(rx)).ok().map(|_| tx)
        })
        .as_ref()
    }

    fn run(rx: Receiver<Msg>) {
        let (mut out, mut err) = (BufWriter::with_capacity(64 * 1024, io::stdout()), BufWriter::new(io::stderr()));
        let handle = |m: Msg, out: &mut BufWriter<io::Stdout>, err: &mut BufWriter<io::Stderr>| match m {
            // A closed pipe must not take the process down; the line is lost either way.
            Msg::Line(true, line) => drop(err.write_all(&line)),
            Msg::Line(false, line) => drop(out.write_all(&line)),
            Msg::Flush(ack) => {
                let _ = (out.flush(), err.flush());
                let _ = ack.send(());
            }
        };
        while let Ok(m) = rx.recv() {
            handle(m, &mut out, &mut err);
            while let Ok(m) = rx.try_recv() {
                handle(m, &mut out, &mut err);
            }
            let _ = (out.flush(), err.flush());
            // A pause before the next batch: lines queued meanwhile wait at most this long,
            // and a busy instance's requests hand their lines over without waking this
            // thread (when it waited on an empty queue after every batch, most lines cost a
            // `futex` wake and a context switch). Idle, it waits in `recv` and costs nothing.
            std::thread::sleep(BATCH_PAUSE);
        }
    }

    pub fn write(to_stderr: bool, line: Vec<u8>) {
        let direct = |line: Vec<u8>| {
            let _ = if to_stderr { io::stderr().lock().write_all(&line) } else { io::stdout().lock().write_all(&line) };
        };
        match sender() {
            Some(tx) => match tx.try_send(Msg::Line(to_stderr, line)) {
                Ok(()) => {}
                Err(TrySendError::Full(Msg::Line(_, line)) | TrySendError::Disconnected(Msg::Line(_, line))) => {
                    direct(line)
                }
                Err(_) => {}
            },
            None => direct(line),
        }
    }

    /// Waits (a second at most) until every queued line is written.
    pub fn flush() {
        let Some(tx) = SINK.get().and_then(Option::as_ref) else { return };
        let (ack, done) = std::sync::mpsc::channel();
        if tx.send(Msg::Flush(ack)).is_ok() {
            let _ = done.recv_timeout(Duration::from_secs(1));
        }
    }
}

/// Waits until every console line queued so far is written (before the process exits).
pub fn flush() {
    sink::flush();
}

#[cfg(test)]
mod tests {
    use super::redact;

    /// A span below `LOG_LEVEL` is not created (no layer keeps it), with export off.
    #[test]
    fn spans_below_the_level_are_not_made() {
        use super::{LogFormat, subscriber};
        tracing::subscriber::with_default(subscriber("warn", LogFormat::Text, None), || {
            assert!(tracing::info_span!("request").is_disabled());
            assert!(!tracing::warn_span!("kept").is_disabled());
        });
        tracing::subscriber::with_default(subscriber("info", LogFormat::Json, None), || {
            assert!(!tracing::info_span!("request").is_disabled());
            assert!(tracing::debug_span!("detail").is_disabled());
        });
    }

    #[test]
    fn masks_bearer_values_jwts_and_named_pairs() {
        let line = r#"GET /x?code=abc123&state=s1 Authorization: Bearer tok.en "refresh_token":"rt-1" eyJhbGciOi.eyJzdWIiOi.sig"#;
        let out = redact(line);
        for secret in ["abc123", "s1", "tok.en", "rt-1", "eyJhbGciOi"] {
            assert!(!out.contains(secret), "{secret} survived in {out}");
        }
        assert!(out.contains("code=[redacted]"));
        assert!(out.contains("Bearer [redacted]"));
    }

    /// A JSON line whose value holds a secret pair is still JSON once masked (the pair's
    /// value ended at the end of the line's value, taking the closing quote with it).
    #[test]
    fn a_masked_json_line_stays_json() {
        let line = r#"{"message":"call","url.full":"https://p/x?code=abc&x=1","path":"/a?state=s2","q":"token=t3\"x"}"#;
        let out = redact(line);
        let parsed: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
        assert_eq!(parsed["url.full"], "https://p/x?code=[redacted]&x=1");
        assert_eq!(parsed["path"], "/a?state=[redacted]");
        assert_eq!(parsed["q"], "token=[redacted]\"x");
    }

    #[test]
    fn masks_escaped_json_in_debug_output() {
        let out = redact(r#"body: "{\"access_token\":\"at-9\",\"expires_in\":3600}""#);
        assert!(!out.contains("at-9"), "{out}");
        assert!(out.contains("3600"));
    }

    /// The pre-check never lets through a line a pattern would change: each line
    /// below is redacted exactly as the patterns alone redact it.
    #[test]
    fn the_pre_check_passes_every_line_a_pattern_matches() {
        use super::{PATTERNS, SECRET_NAMES};
        let by_patterns = |line: &str| {
            let mut out = line.to_string();
            for (re, replacement) in PATTERNS.iter() {
                out = re.replace_all(&out, *replacement).into_owned();
            }
            out
        };
        let mut lines = vec![
            "Authorization: BEARER abc.def".to_string(),
            "basic   dXNlcjpwdw==".to_string(),
            "id eyJhbGciOi.eyJzdWIiOi.sig end".to_string(),
            "plain line route=/api/x status=200 ms=0.4 action=token_handed_out".to_string(),
            r#"request{otel.name=POST}: audit connection=c1 who="app a" outcome=ok"#.to_string(),
            r#"INFO request{otel.kind="server"}: POST /api/connections/{id}/token 200 0.12 ms route="/api/connections/{id}/token""#.to_string(),
            "Authorization: \u{212A}EY=v".to_string(),
            "x TO\u{212A}EN=v9".to_string(),
            "x client_assertion=v8 y".to_string(),
            "x=1 &code=v7".to_string(),
            "code=v6".to_string(),
            "x my_code=v5 xcode=v4".to_string(),
            r#"{\"token\": \"v3\"}"#.to_string(),
            "x \"token\" \t\x0B: \"v\" \"token\" \"v\"".to_string(),
            "x token= v token=&v token=;v token=\x0Bv token=,v token=\"v\"".to_string(),
            "x \"token\"".to_string(),
            "x token=".to_string(),
        ];
        for name in SECRET_NAMES {
            let upper = name.to_ascii_uppercase();
            lines.push(format!("x {name}=v1&y=2"));
            lines.push(format!("x {upper}=v1"));
            lines.push(format!(r#"body {{"{name}": "v2", "n": 1}}"#));
            lines.push(format!(r#"debug "{{\"{upper}\":\"v3\"}}""#));
            lines.push(format!("no match {name}_x {name} : v"));
        }
        for line in &lines {
            assert_eq!(redact(line), by_patterns(line), "{line}");
        }
    }

    /// The lines every request writes hold nothing a pattern needs and are not scanned by
    /// the patterns (the token endpoint's route ends in `token"`, not `"token"`).
    #[test]
    fn the_pre_check_lets_ordinary_lines_through() {
        use super::{LONGEST_SECRET_NAME, SECRET_NAMES, may_hold_secret};
        assert_eq!(SECRET_NAMES.iter().map(|n| n.len()).max(), Some(LONGEST_SECRET_NAME));
        for line in [
            r#"2026-12-03T15:40:00.123456Z  INFO request{otel.kind="server" otel.name=POST}: POST /api/connections/{id}/token 200 0.12 ms route="/api/connections/{id}/token" status=200"#,
            r#"INFO request{otel.kind="server"}: audit action="token_handed_out" connection="au" who=app x actor="" outcome="ok""#,
            "x access_tokens=1 mytoken=2 tokenx=3",
        ] {
            assert!(!may_hold_secret(line), "{line}");
        }
        for line in ["a \"client_assertion\":", "bEaReR x", "a eyJ b", "x Token=1", "caf\u{e9}"] {
            assert!(may_hold_secret(line), "{line}");
        }
    }

    #[test]
    fn leaves_ordinary_lines_alone() {
        let line = "request method=GET route=/api/health status=200 ms=0.4";
        assert_eq!(redact(line), line);
    }
}

/// At most `max` characters of `text` (cut at a character boundary, with `…` when cut):
/// for echoing caller-sent values in messages without echoing a megabyte.
pub fn clip(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    match text.char_indices().nth(max) {
        None => std::borrow::Cow::Borrowed(text),
        Some((at, _)) => std::borrow::Cow::Owned(format!("{}…", &text[..at])),
    }
}

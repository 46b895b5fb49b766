//! Logging to stdout and stderr, which the Functions host collects.
//!
//! The host records every stderr line as an error in Application Insights, so only
//! `ERROR` events go to stderr; everything else goes to stdout.
//!
//! Secrets are kept out of the logs in two layers. First, tokens and secrets are held in
//! [`secrecy::SecretString`], whose `Debug` prints nothing, and request logs carry the
//! route, never the query string. Second, every formatted line passes through
//! [`redact`] before it is written: bearer values, JWTs and `name=value` / `"name":"value"`
//! pairs for OAuth secrets are masked whatever code produced them.

use std::io::{self, Write};
use std::sync::LazyLock;

use regex::Regex;
use tracing::Level;
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
pub fn init(filter: &str, format: LogFormat, export: Option<Box<dyn Layer<Registry> + Send + Sync>>) {
    let filter = with_directives(
        EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info")),
        // The audit record whatever the level; its Application Insights twin never here.
        &["audit=info", "appinsights_event=off"],
    );
    let console = tracing_subscriber::fmt::layer().with_writer(SplitWriter).with_ansi(false);
    let console = match format {
        LogFormat::Text => console.with_target(false).with_filter(filter).boxed(),
        LogFormat::Json => {
            console.json().flatten_event(true).with_current_span(false).with_span_list(true).with_filter(filter).boxed()
        }
    };
    let _ = tracing_subscriber::registry().with(export).with(console).try_init();
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
const SECRET_NAMES: &str = "access_token|refresh_token|id_token|client_secret|code_verifier|code|\
assertion|client_assertion|password|token|secret|state|key|authorization";

/// Whether a field or property of this name holds a secret (exact name, any case).
pub fn is_secret_name(name: &str) -> bool {
    SECRET_NAMES.split('|').any(|n| n.eq_ignore_ascii_case(name))
}

static PATTERNS: LazyLock<Vec<(Regex, &'static str)>> = LazyLock::new(|| {
    let compile = |p: &str| Regex::new(p).expect("redaction patterns are valid");
    vec![
        // `Authorization: Bearer xyz`, `bearer xyz`
        (compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9\-._~+/=]+"), "$1 [redacted]"),
        // JWTs anywhere (three base64url segments, the first starting with a JSON `{"`).
        (compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"), "[redacted-jwt]"),
        // query-string or form pairs: `code=abc&state=...`
        (compile(&format!(r"(?i)\b({SECRET_NAMES})=[^&\s;,]+")), "$1=[redacted]"),
        // JSON pairs: `"refresh_token": "abc"`, also with escaped quotes inside Debug output.
        (compile(&format!(r#"(?i)(\\?"(?:{SECRET_NAMES})\\?"\s*:\s*\\?")[^"\\]*"#)), "$1[redacted]"),
    ]
});

/// Masks secret-looking values in one log line.
pub fn redact(line: &str) -> std::borrow::Cow<'_, str> {
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
        if self.buf.is_empty() {
            return;
        }
        let text = String::from_utf8_lossy(&self.buf);
        let clean = redact(&text);
        // A closed pipe must not take the process down; the line is lost either way.
        let _ = if self.to_stderr {
            io::stderr().lock().write_all(clean.as_bytes())
        } else {
            io::stdout().lock().write_all(clean.as_bytes())
        };
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

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

    #[test]
    fn masks_escaped_json_in_debug_output() {
        let out = redact(r#"body: "{\"access_token\":\"at-9\",\"expires_in\":3600}""#);
        assert!(!out.contains("at-9"), "{out}");
        assert!(out.contains("3600"));
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

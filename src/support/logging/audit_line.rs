//! The audit record's console line, written by a formatter of its own.
//!
//! A token handed out writes two lines: the request's and the audit record's. Through
//! tracing-subscriber's formatter the audit line cost about 4 µs of the token endpoint's
//! 28 µs of CPU (perf: the formatter's `on_event` was 24 % of the endpoint's cycles for the
//! two lines): a thread-local buffer copied into the writer's, the fields through
//! `fmt::Write` one piece at a time, the span list re-parsed from JSON. This layer writes
//! the same line straight into the buffer the writer keeps, and the console layer leaves
//! `target: "audit"` events to it. It redacts the line part by part (see [`super::plain`]):
//! each value, and the span prefix unless every value on the span was plain. Callgrind: the
//! line costs 5,365 instructions per token handed out, 4.7 % of the endpoint's (BENCHMARKS.md,
//! fifth sitting).
//!
//! The line is the one tracing-subscriber would write, byte for byte in text (the span
//! prefix is the console layer's own formatted span fields, read from the span), and the
//! same JSON object in JSON (its `spans` entries keep the fields' recorded order rather than
//! sorted). `tests::lines_match_tracing_subscribers` holds both to the library's output.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::subscriber::Interest;
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::fmt::FormattedFields;
use tracing_subscriber::fmt::format::{DefaultFields, JsonFields, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::layer::{Context, Filter, Layer};
use tracing_subscriber::registry::LookupSpan;

use super::LogFormat;
use super::plain::{AllPlain, plain};

/// Formats `target: "audit"` events and hands each line to `out` (`is_error`, line).
pub struct AuditLines<W> {
    format: LogFormat,
    out: W,
    /// Set by the first audit event: until then (and for good at `audit=off`) spans are not
    /// looked at.
    auditing: AtomicBool,
}

impl<W: Fn(bool, String) + Send + Sync + 'static> AuditLines<W> {
    pub fn new(format: LogFormat, out: W) -> Self {
        AuditLines { format, out, auditing: AtomicBool::new(false) }
    }
}

/// The target this layer writes (and the console layer leaves alone).
pub const TARGET: &str = "audit";

/// What the layer looks at: spans (for the line's span prefix, as the console keeps them)
/// and audit events. Decided per callsite, once, rather than asked on every event.
pub struct SpansAndAudit;

impl SpansAndAudit {
    fn wants(meta: &Metadata<'_>) -> bool {
        meta.is_span() || meta.target() == TARGET
    }
}

impl<S> Filter<S> for SpansAndAudit {
    fn enabled(&self, meta: &Metadata<'_>, _: &Context<'_, S>) -> bool {
        Self::wants(meta)
    }

    fn callsite_enabled(&self, meta: &'static Metadata<'static>) -> Interest {
        if Self::wants(meta) { Interest::always() } else { Interest::never() }
    }
}

impl<S, W> Layer<S> for AuditLines<W>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: Fn(bool, String) + Send + Sync + 'static,
{
    /// Notes that the span's values are plain, with the console layer's text of them (it
    /// runs before this one), so an audit line inside the span need not put that text
    /// through the patterns. A value recorded later changes the text (appended in text,
    /// replaced in JSON): text other than the noted, or a span without the note, goes
    /// through the patterns.
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        if !self.auditing.load(Ordering::Relaxed) {
            return;
        }
        let mut all = AllPlain(true);
        attrs.record(&mut all);
        let Some(span) = ctx.span(id).filter(|_| all.0) else { return };
        let mut extensions = span.extensions_mut();
        let text = match self.format {
            LogFormat::Text => extensions.get_mut::<FormattedFields<DefaultFields>>().map(|f| f.fields.clone()),
            LogFormat::Json => extensions.get_mut::<FormattedFields<JsonFields>>().map(|f| f.fields.clone()),
        };
        if let Some(text) = text {
            extensions.insert(PlainFields(text));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        if event.metadata().target() != TARGET {
            return;
        }
        if !self.auditing.load(Ordering::Relaxed) {
            self.auditing.store(true, Ordering::Relaxed);
        }
        let mut line = String::with_capacity(512);
        match self.format {
            LogFormat::Text => text(&mut line, event, &ctx),
            LogFormat::Json => json(&mut line, event, &ctx),
        }
        (self.out)(*event.metadata().level() == Level::ERROR, line);
    }
}

/// `2026-12-03T15:40:00.123456Z  INFO request{otel.kind="server" ...}: audit action="..." ...`
fn text<S: Subscriber + for<'a> LookupSpan<'a>>(line: &mut String, event: &Event<'_>, ctx: &Context<'_, S>) {
    timestamp(line);
    line.push(' ');
    line.push_str(padded_level(event.metadata().level()));
    line.push(' ');
    if let Some(leaf) = ctx.event_span(event) {
        // Most audit events are in one span (the request's): it needs no list of spans.
        if leaf.parent().is_none() {
            span_prefix(line, &leaf);
        } else {
            for span in leaf.scope().from_root() {
                span_prefix(line, &span);
            }
        }
        line.push(' ');
    }
    event.record(&mut TextFields { line, first: true });
    line.push('\n');
}

/// `name{fields}:`, one span's part of the text line's prefix.
fn span_prefix<'a, R: tracing_subscriber::registry::LookupSpan<'a>>(
    line: &mut String,
    span: &tracing_subscriber::registry::SpanRef<'a, R>,
) {
    line.push_str(span.metadata().name());
    let extensions = span.extensions();
    if let Some(fields) = extensions.get::<FormattedFields<DefaultFields>>()
        && !fields.is_empty()
    {
        line.push('{');
        line.push_str(&prefix_part(fields, fields, extensions.get::<PlainFields>()));
        line.push('}');
    }
    line.push(':');
}

/// `{"timestamp":...,"level":"INFO","message":"audit",<fields>,"target":"audit","spans":[...]}`
fn json<S: Subscriber + for<'a> LookupSpan<'a>>(line: &mut String, event: &Event<'_>, ctx: &Context<'_, S>) {
    line.push_str("{\"timestamp\":\"");
    timestamp(line);
    line.push_str("\",\"level\":");
    json_str(line, event.metadata().level().as_str());
    event.record(&mut JsonFieldsOut { line });
    line.push_str(",\"target\":");
    json_str(line, event.metadata().target());
    let current = event.parent().and_then(|id| ctx.span(id)).or_else(|| ctx.lookup_current());
    if let Some(current) = current {
        line.push_str(",\"spans\":[");
        for (i, span) in current.scope().from_root().enumerate() {
            if i > 0 {
                line.push(',');
            }
            line.push('{');
            // The console layer's JSON of the span's fields: an object, spliced in.
            let extensions = span.extensions();
            if let Some(fields) = extensions.get::<FormattedFields<JsonFields>>() {
                let inner = fields.trim().trim_start_matches('{').trim_end_matches('}').trim();
                if !inner.is_empty() {
                    line.push_str(&prefix_part(fields, inner, extensions.get::<PlainFields>()));
                    line.push(',');
                }
            }
            line.push_str("\"name\":");
            json_str(line, span.metadata().name());
            line.push('}');
        }
        line.push(']');
    }
    line.push_str("}\n");
}

/// The time as tracing-subscriber's default timer writes it (RFC 3339, microseconds, UTC:
/// `2026-12-03T15:40:00.123456Z`). The date and time of day change once a second, so each
/// thread keeps the current second's text and writes only the microseconds (callgrind: the
/// library's timer took 1,500 instructions a line, most of them formatting the date).
fn timestamp(line: &mut String) {
    use std::cell::RefCell;
    thread_local! {
        /// The second's Unix time and its text, `YYYY-MM-DDTHH:MM:SS.`.
        static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let Ok(since) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) else {
        return library_timestamp(line);
    };
    let secs = since.as_secs();
    let known = SECOND.with_borrow_mut(|(cached, text)| {
        if *cached != secs {
            let formatted = i64::try_from(secs).map(crate::support::time::rfc3339).unwrap_or_default();
            // `YYYY-MM-DDTHH:MM:SSZ`; any other year (the library writes those its own
            // way) goes to the library.
            let Some(date) = formatted.strip_suffix('Z').filter(|d| d.len() == 19) else { return false };
            text.clear();
            text.push_str(date);
            text.push('.');
            *cached = secs;
        }
        line.push_str(text);
        true
    });
    if !known {
        return library_timestamp(line);
    }
    let micros = since.subsec_micros();
    for scale in [100_000, 10_000, 1_000, 100, 10, 1] {
        line.push(char::from(b'0' + (micros / scale % 10) as u8));
    }
    line.push('Z');
}

/// tracing-subscriber's own timer.
fn library_timestamp(line: &mut String) {
    if SystemTime.format_time(&mut Writer::new(line)).is_err() {
        line.push_str("<unknown time>");
    }
}

fn padded_level(level: &Level) -> &'static str {
    match *level {
        Level::TRACE => "TRACE",
        Level::DEBUG => "DEBUG",
        Level::INFO => " INFO",
        Level::WARN => " WARN",
        Level::ERROR => "ERROR",
    }
}

/// A value as the line shows it: as it is where [`super::redact`] would leave it so
/// ([`plain`]), else redacted.
fn masked(value: &str) -> Cow<'_, str> {
    if plain(value) { Cow::Borrowed(value) } else { super::redact(value) }
}

/// A span's formatted fields when all its values were plain (noted when the span was made).
struct PlainFields(String);

/// `part` of a span's formatted `fields` as the line shows it: as it is when the fields are
/// still the plain ones noted, else through the patterns.
fn prefix_part<'a>(fields: &str, part: &'a str, note: Option<&PlainFields>) -> Cow<'a, str> {
    if note.is_some_and(|n| n.0 == fields) { Cow::Borrowed(part) } else { super::redact(part) }
}

/// A JSON string literal.
fn json_str(line: &mut String, value: &str) {
    // Writing JSON into a String cannot fail.
    let _ = serde_json::to_writer(StringBytes(line), value);
}

/// `io::Write` into a `String`, for serde_json, which writes only whole UTF-8 strings.
struct StringBytes<'a>(&'a mut String);

impl std::io::Write for StringBytes<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let text = std::str::from_utf8(data).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        self.0.push_str(text);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The event's fields as tracing-subscriber's default visitor writes them: the message
/// bare, then ` name=value` with strings quoted and escaped as `Debug` does.
struct TextFields<'a> {
    line: &'a mut String,
    first: bool,
}

impl TextFields<'_> {
    fn pad(&mut self) {
        if !std::mem::take(&mut self.first) {
            self.line.push(' ');
        }
    }
}

impl Visit for TextFields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.pad();
        if field.name() == "message" {
            self.line.push_str(&masked(value));
        } else if plain(value) {
            // What `Debug` writes for a string with nothing to escape, without its machinery.
            self.line.push_str(field.name());
            self.line.push_str("=\"");
            self.line.push_str(value);
            self.line.push('"');
        } else {
            let _ = write!(self.line, "{}={:?}", field.name(), super::redact(value));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.pad();
        if field.name() != "message" {
            self.line.push_str(field.name());
            self.line.push('=');
        }
        let start = self.line.len();
        let _ = write!(self.line, "{value:?}");
        if let Cow::Owned(redacted) = masked(&self.line[start..]) {
            self.line.truncate(start);
            self.line.push_str(&redacted);
        }
    }
}

/// The event's fields as tracing-serde's map visitor writes them, each after a comma.
struct JsonFieldsOut<'a> {
    line: &'a mut String,
}

impl Visit for JsonFieldsOut<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.line.push(',');
        json_str(self.line, field.name());
        self.line.push(':');
        json_str(self.line, &masked(value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let mut text = String::new();
        let _ = write!(text, "{value:?}");
        self.record_str(field, &text);
    }

    // Numbers and booleans stay JSON numbers and booleans, as tracing-serde writes them.
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.record_raw(field, value);
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.record_raw(field, value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.record_raw(field, value);
    }
}

impl JsonFieldsOut<'_> {
    fn record_raw(&mut self, field: &Field, value: impl std::fmt::Display) {
        self.line.push(',');
        json_str(self.line, field.name());
        let _ = write!(self.line, ":{value}");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::{Layer, filter};

    use super::{AuditLines, LogFormat, TARGET};
    use crate::support::audit::{Action, Actor};

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(data);
            Ok(data.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    /// What the product records, inside a request span like the server's, with values that
    /// need escaping.
    fn emit() {
        let span = tracing::info_span!(
            "request",
            otel.kind = "server",
            otel.name = %"POST",
            http.route = tracing::field::Empty,
            faas.trigger = "http",
        );
        let _in = span.enter();
        span.record("http.route", "/api/connections/{id}/token");
        let inner = tracing::info_span!("tool", name = "call \"provider\"");
        let _inner = inner.enter();
        let actor = Actor {
            tenant: Some("t-1".into()),
            app_id: Some("app\u{e9} \"x\"".into()),
            object_id: None,
            contact: None,
            kind: "",
        };
        crate::support::audit::record(Action::TokenHandedOut, "conn\"1\\\n\u{1F600}", "fast", &actor, "ok");
        crate::support::audit::record(Action::Refresh, "c2", "-", &Actor::timer(), "refused: invalid_grant");
        drop(_inner);
        drop(_in);
        crate::support::audit::record(Action::Deletion, "c3", "p", &Actor::default(), "ok");
    }

    /// Twice: the first time the audit layer has not looked at the spans (no event had come
    /// yet), the second time it has, and their prefixes are written as they are.
    fn twice() {
        emit();
        emit();
    }

    /// The line each way: tracing-subscriber's formatter alone, and ours beside a console
    /// layer that leaves audit events alone (as `logging::init` builds it).
    fn both(format: LogFormat) -> (String, String) {
        let theirs = Captured::default();
        let fmt = {
            let w = theirs.clone();
            tracing_subscriber::fmt::layer().with_writer(move || w.clone()).with_ansi(false)
        };
        let fmt = match format {
            LogFormat::Text => fmt.with_target(false).boxed(),
            LogFormat::Json => fmt.json().flatten_event(true).with_current_span(false).with_span_list(true).boxed(),
        };
        // As the product's console: the Application Insights twin is never a console line.
        let fmt = fmt.with_filter(filter::filter_fn(|m| m.target() != "appinsights_event"));
        tracing::subscriber::with_default(tracing_subscriber::registry().with(fmt), twice);

        let ours = Captured::default();
        let console = tracing_subscriber::fmt::layer().with_writer(std::io::sink).with_ansi(false);
        let console = match format {
            LogFormat::Text => console.with_target(false).boxed(),
            LogFormat::Json => console.json().boxed(),
        };
        let console = console.with_filter(filter::filter_fn(|m| m.target() != TARGET));
        let out = ours.clone();
        let audit =
            AuditLines::new(format, move |_, line: String| out.0.lock().unwrap().extend_from_slice(line.as_bytes()))
                .with_filter(super::SpansAndAudit);
        tracing::subscriber::with_default(tracing_subscriber::registry().with(console).with(audit), twice);
        (theirs.text(), ours.text())
    }

    /// Everything after the timestamp (the two are taken at different moments).
    fn after_time(line: &str) -> &str {
        line.split_once(' ').map(|(_, rest)| rest).unwrap_or("")
    }

    #[test]
    fn lines_match_tracing_subscribers() {
        let (theirs, ours) = both(LogFormat::Text);
        assert_eq!(theirs.lines().count(), 6, "{theirs}");
        assert_eq!(ours.lines().count(), 6, "{ours}");
        for (t, o) in theirs.lines().zip(ours.lines()) {
            assert_eq!(after_time(o), after_time(t));
            let (t_time, o_time) = (t.split(' ').next().unwrap(), o.split(' ').next().unwrap());
            assert_eq!(t_time.len(), o_time.len(), "{t_time} / {o_time}");
            assert!(o_time.ends_with('Z'), "{o_time}");
        }
        assert!(ours.contains("request{otel.kind=\"server\""), "{ours}");

        let (theirs, ours) = both(LogFormat::Json);
        assert_eq!(ours.lines().count(), 6, "{ours}");
        for (t, o) in theirs.lines().zip(ours.lines()) {
            let mut t: serde_json::Value = serde_json::from_str(t).unwrap();
            let mut o: serde_json::Value = serde_json::from_str(o).unwrap();
            let (t_time, o_time) = (t["timestamp"].take(), o["timestamp"].take());
            assert_eq!(t_time.as_str().map(str::len), o_time.as_str().map(str::len));
            assert_eq!(o, t);
        }
        assert!(ours.contains("\"spans\":[{"), "{ours}");
    }

    /// The attacker's values: a secret in a connection id, an app id, a contact, and in the
    /// request span's invocation id (a header anyone can send). The audit line, written
    /// part by part, masks each, in text and in JSON, and stays one line.
    #[test]
    fn secrets_in_any_part_of_the_audit_line_are_masked() {
        for format in [LogFormat::Text, LogFormat::Json] {
            let ours = Captured::default();
            let out = ours.clone();
            let audit = AuditLines::new(format, move |_, line: String| {
                out.0.lock().unwrap().extend_from_slice(line.as_bytes())
            })
            .with_filter(super::SpansAndAudit);
            let console = tracing_subscriber::fmt::layer().with_writer(std::io::sink).with_ansi(false);
            let console = match format {
                LogFormat::Text => console.boxed(),
                LogFormat::Json => console.json().boxed(),
            };
            tracing::subscriber::with_default(tracing_subscriber::registry().with(console).with(audit), || {
                let actor = Actor {
                    tenant: Some("t".into()),
                    app_id: Some("Bearer SECRET-TWO".into()),
                    object_id: Some("eyJhbGciOiJI.eyJzdWIiOiJ4.U0VDUkVULVRIUkVF".into()),
                    contact: None,
                    kind: "",
                };
                let record = || {
                    crate::support::audit::record(
                        Action::TokenHandedOut,
                        "c access_token=SECRET-FOUR",
                        "p",
                        &actor,
                        "ok",
                    )
                };
                // Before the first audit event, after it (the span's values noted when it
                // is made), with the secret recorded on the span later, and recorded over a
                // plain value of the same length (JSON replaces it: the text keeps its
                // length).
                for round in 0..4 {
                    let secret = if round >= 2 { "plain-at-first" } else { "Bearer SECRET-ONE" };
                    let route = if round == 3 { "aaaaaaaaaaaaaaaa" } else { "" };
                    let span = tracing::info_span!("request", faas.invocation_id = secret, http.route = route);
                    let _in = span.enter();
                    match round {
                        2 => span.record("http.route", "/x?code=SECRET-FIVE"),
                        3 => span.record("http.route", "Bearer SECRET-6X"),
                        _ => &span,
                    };
                    record();
                }
                // A span whose values are all plain keeps its prefix as it is.
                let span = tracing::info_span!("request", otel.kind = "server", http.route = "/api/{id}/token");
                let _in = span.enter();
                crate::support::audit::record(Action::Deletion, "c", "p", &Actor::timer(), "ok");
            });
            let text = ours.text();
            assert_eq!(text.lines().count(), 5, "{text}");
            for secret in ["SECRET-ONE", "SECRET-TWO", "U0VDUkVULVRIUkVF", "SECRET-FOUR", "SECRET-FIVE", "SECRET-6X"] {
                assert!(!text.contains(secret), "{secret} in {text}");
            }
            assert!(text.contains("[redacted]") && text.contains("[redacted-jwt]"), "{text}");
            let last = text.lines().last().unwrap_or_default();
            match format {
                LogFormat::Text => {
                    assert!(last.contains("request{otel.kind=\"server\" http.route=\"/api/{id}/token\"}:"), "{last}")
                }
                LogFormat::Json => {
                    for line in text.lines() {
                        let line: serde_json::Value = serde_json::from_str(line).unwrap();
                        assert_eq!(line["connection"].as_str().unwrap_or("c"), line["connection"].as_str().unwrap());
                    }
                    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
                    assert_eq!(first["connection"], "c access_token=[redacted]");
                    let last: serde_json::Value = serde_json::from_str(last).unwrap();
                    assert_eq!(last["spans"][0]["http.route"], "/api/{id}/token");
                }
            }
        }
    }

    /// The cached second and the written microseconds give the library's timestamp: taken
    /// between two of the library's, ours has the same form and lies between them.
    #[test]
    fn timestamps_are_the_librarys() {
        for _ in 0..200 {
            let (mut before, mut ours, mut after) = (String::new(), String::new(), String::new());
            super::library_timestamp(&mut before);
            super::timestamp(&mut ours);
            super::library_timestamp(&mut after);
            assert_eq!(ours.len(), before.len(), "{ours} / {before}");
            assert!(ours.ends_with('Z') && ours.as_bytes()[19] == b'.', "{ours}");
            assert!(before <= ours && ours <= after, "{before} <= {ours} <= {after}");
        }
    }
}

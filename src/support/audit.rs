//! The record of every use of a credential: one audit event per token handed out, proxied
//! call, MCP tool call, refresh (by a caller or the timer), revocation, import, deletion
//! and authorization, with who did it. Never a token or a code.
//!
//! Each event is a log line of its own kind (`target: "audit"`, a JSON line with
//! `LOG_FORMAT=json`), and, with Application Insights export on, a custom event named
//! `DynamicsCompanion.Audit` (a span event named `ai.custom` is what the exporter turns into
//! one), carrying the request's operation id: `customEvents | where name ==
//! "DynamicsCompanion.Audit"`.

use std::sync::Arc;
/// What was done with a connection's credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    TokenHandedOut,
    ProxiedCall,
    McpToolCall,
    Refresh,
    Revocation,
    Import,
    Deletion,
    Authorization,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::TokenHandedOut => "token_handed_out",
            Action::ProxiedCall => "proxied_call",
            Action::McpToolCall => "mcp_tool_call",
            Action::Refresh => "refresh",
            Action::Revocation => "revocation",
            Action::Import => "import",
            Action::Deletion => "deletion",
            Action::Authorization => "authorization",
        }
    }
}

/// Who did it: a back-office or agent caller (tenant, app id, object id), a portal
/// contact, a person's browser at the callback, or the timer.
#[derive(Debug, Clone, Default)]
pub struct Actor {
    pub tenant: Option<Arc<str>>,
    pub app_id: Option<Arc<str>>,
    pub object_id: Option<Arc<str>>,
    pub contact: Option<Arc<str>>,
    /// `timer`, `callback`, or empty for a caller with a token.
    pub kind: &'static str,
}

impl Actor {
    pub fn timer() -> Actor {
        Actor { kind: "timer", ..Default::default() }
    }
}

/// The actor in words (`contact …`, `app …`, `timer`, `a caller`): the log line's `who`
/// and a connection's `last_used_by`.
impl std::fmt::Display for Actor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Pieces rather than `write!`: written once per token handed out.
        match (&self.contact, &self.app_id, self.kind) {
            (Some(c), _, _) => f.write_str("contact ").and_then(|()| f.write_str(c)),
            (None, Some(a), _) => f.write_str("app ").and_then(|()| f.write_str(a)),
            (None, None, "") => f.write_str("a caller"),
            (None, None, k) => f.write_str(k),
        }
    }
}

/// Records one audit event: a console line (`target: "audit"`) with the fields that are
/// set, and its Application Insights twin when exporting. Kept lean, since a token handed
/// out is recorded on every call: the fields a reader needs and no message formatting.
pub fn record(action: Action, connection: &str, provider: &str, actor: &Actor, outcome: &str) {
    // The field values are computed only for an event some layer keeps (`tracing` builds
    // them after its enabled check), so a record nobody keeps costs a callsite check.
    tracing::info!(
        target: "audit",
        action = action.as_str(),
        connection,
        provider,
        who = %actor,
        tenant = actor.tenant.as_deref(),
        app_id = actor.app_id.as_deref(),
        object_id = actor.object_id.as_deref(),
        contact = actor.contact.as_deref(),
        actor = actor.kind,
        outcome,
        trace_id = current_trace_id().as_deref(),
        "audit"
    );
    tracing::info!(
        target: "appinsights_event",
        action = action.as_str(),
        ai.customEvent.name = "DynamicsCompanion.Audit",
        connection,
        provider,
        who = %actor,
        tenant = actor.tenant.as_deref(),
        app_id = actor.app_id.as_deref(),
        contact = actor.contact.as_deref(),
        outcome,
        "ai.custom"
    );
}

/// The current span's trace id (none without the telemetry layer or a span). Without the
/// layer no span has one, and asking would clone and drop the current span per record.
fn current_trace_id() -> Option<String> {
    if !crate::support::trace_context::active() {
        return None;
    }
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let context = tracing::Span::current().context();
    let span = context.span();
    let id = span.span_context().trace_id();
    (id != opentelemetry::trace::TraceId::INVALID).then(|| id.to_string())
}

tokio::task_local! {
    static ACTOR: Actor;
}

/// Runs `f` on behalf of `actor`: what it records deeper down (a refresh it causes)
/// names that actor.
pub async fn acting<F: std::future::Future>(actor: Actor, f: F) -> F::Output {
    ACTOR.scope(actor, f).await
}

/// Who the current task acts for (empty when nobody said).
pub fn current() -> Actor {
    ACTOR.try_with(Actor::clone).unwrap_or_default()
}

/// The kind of the current actor (`timer`, `callback`, or empty), without copying it.
pub fn current_kind() -> &'static str {
    ACTOR.try_with(|a| a.kind).unwrap_or_default()
}

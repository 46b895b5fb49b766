//! The MCP tools: the kept connections as an agent uses them, never their tokens.
//!
//! - `list_connections`: the connections this caller may use (its tenant's; providers
//!   whose `agents` allow it), statuses only;
//! - `get_connection`: one connection's status;
//! - `call_provider_api`: the provider's API through a connection (method, path, query,
//!   JSON body), within the provider's API base and the proxy's path checks; the answer's
//!   status, content type and body, cut at [`MAX_BODY`];
//! - `start_connection`: an authorization link for a person to open (returned as text:
//!   a stateless server has no stream on which to ask the client to open it).
//!
//! Which agent may use which provider is the provider entry's `agents` (client ids or
//! app roles); a refusal, a missing connection or a provider's failure is a tool error
//! (`isError`), which the agent reads, not a protocol error.

use std::sync::Arc;

use futures_util::StreamExt;
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use warp::http::header;

use super::RpcCode;
use crate::app::services::Agents;
use crate::clients::auth::Caller;
use crate::domain::connections::{ConnectionError, Connections};
use crate::domain::oauth::catalog::Provider;
use crate::domain::{ListFilter, Status};
use crate::support::audit::{self, Action};
use crate::support::outbound;
use crate::web::proxy;

/// The agent as the audit record names it.
fn agent(caller: &Caller) -> audit::Actor {
    audit::Actor {
        tenant: caller.tenant.clone(),
        app_id: caller.client_id.clone(),
        object_id: caller.subject.clone(),
        contact: None,
        kind: "agent",
    }
}

/// The most of a provider's answer a tool result carries.
pub const MAX_BODY: usize = 256 * 1024;

type ToolResult = Result<Value, (RpcCode, String)>;

/// The tools, with JSON Schema inputs and outputs.
pub fn list() -> Value {
    let id = json!({ "type": "string", "description": "The connection's id, e.g. erp-1." });
    json!([
        {
            "name": "list_connections",
            "title": "List connections",
            "description": "The OAuth connections you may use (to ERP, payroll, e-signature and other systems), with their status. A connection is usable when its status is active; needs_reauth means a person must connect it again (start_connection).",
            "inputSchema": { "type": "object", "properties": {
                "provider": { "type": "string", "description": "Only this provider's connections." },
                "status": { "type": "string", "enum": ["pending", "active", "needs_reauth", "failed"] },
            }, "additionalProperties": false },
            "outputSchema": { "type": "object", "properties": { "connections": { "type": "array", "items": { "$ref": "#/$defs/connection" } } },
                "required": ["connections"], "$defs": { "connection": connection_schema() } },
            "annotations": { "readOnlyHint": true, "openWorldHint": false },
        },
        {
            "name": "get_connection",
            "title": "Get a connection's status",
            "description": "One connection's status (never its tokens).",
            "inputSchema": { "type": "object", "properties": { "connection_id": id }, "required": ["connection_id"], "additionalProperties": false },
            "outputSchema": connection_schema(),
            "annotations": { "readOnlyHint": true, "openWorldHint": false },
        },
        {
            "name": "call_provider_api",
            "title": "Call the provider's API",
            "description": "Sends a request to the connection's provider API (its api_base_url plus path) with the connection's access token, refreshed as needed. You get the status, content type and body; never the token.",
            "inputSchema": { "type": "object", "properties": {
                "connection_id": id,
                "method": { "type": "string", "enum": ["GET", "POST", "PUT", "PATCH", "DELETE"], "default": "GET" },
                "path": { "type": "string", "description": "The API path after the provider's base URL, e.g. invoices/123." },
                "query": { "type": "string", "description": "The query string, e.g. status=open&limit=10." },
                "body": { "description": "A JSON body for POST, PUT or PATCH." },
            }, "required": ["connection_id", "path"], "additionalProperties": false },
            "outputSchema": { "type": "object", "properties": {
                "status": { "type": "integer" },
                "content_type": { "type": ["string", "null"] },
                "body": { "description": "JSON when the provider answered JSON, else text." },
                "truncated": { "type": "boolean", "description": "The body was cut at 256 KiB." },
            }, "required": ["status", "body", "truncated"] },
            "annotations": { "readOnlyHint": false, "openWorldHint": true },
        },
        {
            "name": "start_connection",
            "title": "Start a connection",
            "description": "Starts connecting an account at a provider, or reconnecting one whose status is needs_reauth, and returns the authorization link a person must open in a browser and approve.",
            "inputSchema": { "type": "object", "properties": {
                "provider": { "type": "string", "description": "The provider's name in the catalog." },
                "connection_id": { "type": "string", "description": "An id for the new connection (generated when absent)." },
                "owner": { "type": "string", "description": "Who the connection belongs to, for your records." },
            }, "required": ["provider"], "additionalProperties": false },
            "outputSchema": { "type": "object", "properties": {
                "connection_id": { "type": "string" },
                "authorization_url": { "type": "string", "format": "uri" },
                "expires_at": { "type": "string" },
            }, "required": ["connection_id", "authorization_url"] },
            "annotations": { "readOnlyHint": false, "openWorldHint": true },
        },
    ])
}

fn connection_schema() -> Value {
    json!({ "type": "object", "properties": {
        "connection_id": { "type": "string" },
        "provider": { "type": "string" },
        "owner": { "type": ["string", "null"] },
        "status": { "type": "string" },
        "status_detail": { "type": ["string", "null"] },
    }, "required": ["connection_id", "provider", "status"] })
}

/// `tools/call`.
pub async fn call(svc: &Agents, caller: &Caller, params: &Value) -> ToolResult {
    let name = params.get("name").and_then(Value::as_str).ok_or((RpcCode::InvalidParams, "name is required".into()))?;
    let args = params.get("arguments").cloned().unwrap_or_else(|| json!({}));
    if !args.is_object() {
        return Err((RpcCode::InvalidParams, "arguments must be an object".into()));
    }
    if !["list_connections", "get_connection", "call_provider_api", "start_connection"].contains(&name) {
        return Err((RpcCode::InvalidParams, format!("no tool {name:?}")));
    }
    let who = caller.client_id.as_deref().unwrap_or("-").to_string();
    let Some(_place) = svc.place(&format!("{}/{who}", caller.tenant.as_deref().unwrap_or(""))) else {
        return Ok(tool_error(&format!(
            "too many tool calls of yours are in flight ({} at most); try again when one has finished",
            Agents::CALLS_PER_CALLER
        )));
    };
    let connections = match svc.organisations.for_caller(caller.home, caller.tenant.as_deref()).await {
        Ok(c) => c,
        Err(e) => return Ok(tool_error(&e.to_string())),
    };
    let text = |k: &str| args.get(k).and_then(Value::as_str).map(str::to_string);
    let outcome = match name {
        "list_connections" => list_connections(&connections, caller, text("provider"), text("status")).await,
        "get_connection" => {
            let id = text("connection_id").ok_or((RpcCode::InvalidParams, "connection_id is required".into()))?;
            get_connection(&connections, caller, &id).await
        }
        "call_provider_api" => {
            let id = text("connection_id").ok_or((RpcCode::InvalidParams, "connection_id is required".into()))?;
            let path = text("path").ok_or((RpcCode::InvalidParams, "path is required".into()))?;
            let method = text("method").unwrap_or_else(|| "GET".into()).to_ascii_uppercase();
            if !["GET", "POST", "PUT", "PATCH", "DELETE"].contains(&method.as_str()) {
                return Err((
                    RpcCode::InvalidParams,
                    format!("method {method:?} is not GET, POST, PUT, PATCH or DELETE"),
                ));
            }
            let request = ApiCall { method, path, query: text("query"), body: args.get("body").cloned() };
            call_provider_api(svc, &connections, caller, &id, request).await
        }
        _ => start_connection(&connections, caller, text("provider"), text("connection_id"), text("owner")).await,
    };
    let (ok, result) = match outcome {
        Ok(structured) => (true, tool_result(structured)),
        Err(e) => (false, tool_error(&e.to_string())),
    };
    let connection = args.get("connection_id").and_then(|v| v.as_str()).unwrap_or("-");
    let actor = agent(caller);
    let outcome = if ok { format!("{name}: ok") } else { format!("{name}: refused") };
    audit::record(Action::McpToolCall, connection, "-", &actor, &outcome);
    Ok(result)
}

fn tool_result(structured: Value) -> Value {
    let text = serde_json::to_string(&structured).unwrap_or_default();
    json!({ "content": [{ "type": "text", "text": text }], "structuredContent": structured, "isError": false })
}

fn tool_error(message: &str) -> Value {
    json!({ "content": [{ "type": "text", "text": message }], "isError": true })
}

/// Whether this caller may use connections of `provider`.
fn allowed(provider: &Provider, caller: &Caller) -> bool {
    provider.agents.as_ref().is_some_and(|a| a.allows(caller.client_id.as_deref(), &caller.roles))
}

/// Why a tool did not do its work: the agent reads it as the tool's error result
/// (`isError`), not as a protocol error.
#[derive(Debug, thiserror::Error)]
enum ToolError {
    #[error("{0} is required")]
    Missing(&'static str),
    #[error("status {0:?} is not pending, active, needs_reauth or failed")]
    Status(String),
    #[error("there is no connection {0:?} you can reach")]
    NoConnection(String),
    #[error("provider {0:?} is not configured")]
    NotConfigured(String),
    #[error("there is no provider {0:?}")]
    NoProvider(String),
    #[error(
        "you may not use connections of provider {0:?}: its providers.toml entry lists the agents that may ([providers.{0}.agents] callers or roles)"
    )]
    Refused(String),
    /// A connection that needs a person: what the agent should do about it.
    #[error("{0}: ask a person to connect it again (start_connection gives the link)")]
    Reconnect(ConnectionError),
    #[error(transparent)]
    Connection(ConnectionError),
    /// The request the agent asked for cannot be sent (path, method): the proxy's words.
    #[error("{0}")]
    Request(String),
    #[error("the provider's API did not answer: {0}")]
    Unreachable(String),
    #[error("the provider's answer broke off: {0}")]
    BrokeOff(String),
}

impl From<ConnectionError> for ToolError {
    fn from(e: ConnectionError) -> ToolError {
        match e {
            ConnectionError::NeedsReauth { .. } | ConnectionError::NotAuthorized { .. } => ToolError::Reconnect(e),
            other => ToolError::Connection(other),
        }
    }
}

fn view(c: &crate::domain::Connection) -> Value {
    json!({
        "connection_id": c.id, "provider": c.provider, "owner": c.owner,
        "status": c.status.as_str(), "status_detail": c.status_detail,
    })
}

async fn list_connections(
    connections: &Arc<Connections>,
    caller: &Caller,
    provider: Option<String>,
    status: Option<String>,
) -> Result<Value, ToolError> {
    let status = match status {
        Some(s) => Some(Status::parse(&s).ok_or(ToolError::Status(s))?),
        None => None,
    };
    let filter = ListFilter { provider, status, limit: 500, ..Default::default() };
    let list = connections.list(&filter).await?;
    let catalog = connections.catalog();
    let usable: Vec<Value> =
        list.iter().filter(|c| catalog.get(&c.provider).is_some_and(|p| allowed(&p, caller))).map(view).collect();
    Ok(json!({ "connections": usable }))
}

/// The connection and its provider, if this caller may use it; else why not.
async fn usable(
    connections: &Connections,
    caller: &Caller,
    id: &str,
) -> Result<(crate::domain::Connection, Arc<Provider>), ToolError> {
    let c = connections.get(id).await.map_err(|e| match e {
        ConnectionError::NotFound(_) => ToolError::NoConnection(id.to_string()),
        other => other.into(),
    })?;
    let provider =
        connections.catalog().get(&c.provider).ok_or_else(|| ToolError::NotConfigured(c.provider.clone()))?;
    if !allowed(&provider, caller) {
        return Err(ToolError::Refused(c.provider));
    }
    Ok((c, provider))
}

async fn get_connection(connections: &Connections, caller: &Caller, id: &str) -> Result<Value, ToolError> {
    usable(connections, caller, id).await.map(|(c, _)| view(&c))
}

struct ApiCall {
    method: String,
    path: String,
    query: Option<String>,
    body: Option<Value>,
}

async fn call_provider_api(
    svc: &Agents,
    connections: &Connections,
    caller: &Caller,
    id: &str,
    call: ApiCall,
) -> Result<Value, ToolError> {
    let (c, provider) = usable(connections, caller, id).await?;
    let base = proxy::api_base(&provider).map_err(|e| ToolError::Request(e.detail))?;
    let query = call.query.as_deref().map(|q| format!("query={}", urlencoding(q)));
    let target = proxy::call_target(base, &call.path, query.as_deref()).map_err(|e| ToolError::Request(e.detail))?;
    let method = reqwest::Method::from_bytes(call.method.as_bytes()).map_err(|e| ToolError::Request(e.to_string()))?;
    let agent = agent(caller);
    let token = connections.access_token_for(&c.id, false, &agent).await?;
    let request = || {
        let out = svc.http.request(method.clone(), target.clone()).header(header::ACCEPT, "application/json");
        match &call.body {
            Some(body) => out.json(body),
            None => out,
        }
    };
    let sent = proxy::send_authorized(connections, &c.id, token, &agent, request).await;
    let (resp, token) = sent.map_err(|e| match e {
        proxy::Unanswered::Token(e) => e.into(),
        proxy::Unanswered::Unreachable(why) => ToolError::Unreachable(why.to_string()),
    })?;
    let status = resp.status();
    let content_type = resp.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_string);
    let (bytes, truncated) = bounded(resp).await?;
    // The token never reaches the agent, even when the provider echoes the request.
    let bytes = redact(bytes, token.access_token.expose_secret().as_bytes());
    let body = match serde_json::from_slice::<Value>(&bytes) {
        Ok(v) if !truncated => v,
        _ => Value::String(String::from_utf8_lossy(&bytes).into_owned()),
    };
    audit::record(Action::ProxiedCall, &c.id, &c.provider, &agent, &proxy::answered(status));
    Ok(json!({ "status": status.as_u16(), "content_type": content_type, "body": body, "truncated": truncated }))
}

/// The answer's body, up to [`MAX_BODY`].
async fn bounded(resp: reqwest::Response) -> Result<(Vec<u8>, bool), ToolError> {
    let mut stream = resp.bytes_stream();
    let mut out = Vec::new();
    while let Some(chunk) = outbound::upstream(stream.next()).await {
        let chunk = chunk.map_err(|e| ToolError::BrokeOff(outbound::error_text(e).to_string()))?;
        let room = MAX_BODY - out.len();
        if chunk.len() > room {
            out.extend_from_slice(&chunk[..room]);
            return Ok((out, true));
        }
        out.extend_from_slice(&chunk);
    }
    Ok((out, false))
}

/// `bytes` with every occurrence of `secret` replaced by `[redacted]`.
fn redact(bytes: Vec<u8>, secret: &[u8]) -> Vec<u8> {
    if secret.len() < 8 || !bytes.windows(secret.len()).any(|w| w == secret) {
        return bytes;
    }
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i..].starts_with(secret) {
            out.extend_from_slice(b"[redacted]");
            i += secret.len();
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    out
}

async fn start_connection(
    connections: &Connections,
    caller: &Caller,
    provider: Option<String>,
    connection_id: Option<String>,
    owner: Option<String>,
) -> Result<Value, ToolError> {
    let name = provider.ok_or(ToolError::Missing("provider"))?;
    let p = connections.catalog().get(&name).ok_or_else(|| ToolError::NoProvider(name.clone()))?;
    if !allowed(&p, caller) {
        return Err(ToolError::Refused(name));
    }
    let started = match &connection_id {
        Some(id) if connections.get(id).await.is_ok() => {
            usable(connections, caller, id).await?;
            connections.reconnect(id, None, Default::default()).await
        }
        _ => {
            let new = crate::domain::connections::NewConnection {
                provider: name,
                connection_id,
                owner,
                scopes: None,
                return_url: None,
                params: Default::default(),
                portal: Default::default(),
            };
            connections.start(new).await
        }
    }?;
    Ok(json!({
        "connection_id": started.connection.id,
        "authorization_url": started.authorization_url.as_str(),
        "expires_at": crate::support::time::rfc3339(started.expires_at),
    }))
}

fn urlencoding(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

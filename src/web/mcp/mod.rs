//! `/api/mcp`: the Model Context Protocol's Streamable HTTP transport, stateless, over the
//! kept connections, for Dynamics' AI agents (Copilot Studio, Microsoft Foundry).
//!
//! Each POST carries one JSON-RPC message and gets one JSON answer (no session, no event
//! stream: the specification lets a server answer a request with `application/json`, and
//! a notification or response with `202`). GET, which would open a server-to-client
//! stream, is `405`. Protocol revisions: the latest the official SDKs speak
//! ([`SUPPORTED`]'s first), older ones negotiated as the specification says (the server
//! answers `initialize` with the client's revision when it supports it, else its latest);
//! a request naming an unsupported `MCP-Protocol-Version` is `400`.
//!
//! Authorization is the specification's: this is an OAuth 2.1 resource server. Without a
//! valid token the answer is `401` with `WWW-Authenticate: Bearer resource_metadata="…"`
//! pointing at the protected-resource metadata (RFC 9728), which names the resource and
//! the authorization server the back-office API trusts (`AUTH_ISSUER`). Tokens are
//! verified as the back-office API verifies them (audience, allow-lists, tenant scope);
//! a caller outside `MCP_ALLOWED_ROLES` (when set) is `403` with
//! `error="insufficient_scope"`. Under the Functions host every route lives under `/api`,
//! so the metadata is served at `/api/mcp/.well-known/oauth-protected-resource` and named
//! by the header (and at RFC 9728's own path when the handler is reached directly).
//!
//! A browser's `Origin` other than the deployment's own is `403` (DNS rebinding, as the
//! transport's security warning asks).

pub mod tools;

use serde_json::{Value, json};
use warp::http::{HeaderValue, Method, StatusCode, header};

use super::{ApiError, Request, Response, response};
use crate::app::services::Agents;

/// Protocol revisions, newest first.
pub const SUPPORTED: [&str; 3] = ["2025-11-25", "2025-06-18", "2025-03-26"];

/// JSON-RPC error codes (JSON-RPC 2.0 §5.1).
#[derive(Debug, Clone, Copy)]
pub enum RpcCode {
    ParseError = -32700,
    InvalidRequest = -32600,
    MethodNotFound = -32601,
    InvalidParams = -32602,
}

/// `/api/mcp/.well-known/oauth-protected-resource` (and RFC 9728's own path).
pub fn metadata(svc: &Agents) -> Response {
    let mut doc = json!({
        "resource": svc.resource.as_str(),
        "bearer_methods_supported": ["header"],
        "resource_name": "Dynamics Companion",
    });
    if let Some(v) = &svc.verifier {
        doc["authorization_servers"] = json!([v.issuer()]);
    }
    if !svc.scopes.is_empty() {
        doc["scopes_supported"] = json!(svc.scopes);
    }
    response::json(StatusCode::OK, &doc)
}

/// `/api/mcp`.
pub async fn handle(svc: &Agents, mut req: Request) -> Result<Response, ApiError> {
    if let Some(origin) = req.header(header::ORIGIN)
        && !svc.origin_allowed(origin)
    {
        return Err(ApiError::forbidden(format!("Origin {origin} may not call the MCP endpoint.")));
    }
    if req.method != Method::POST {
        return Err(ApiError::method_not_allowed(&["POST"]));
    }
    let caller = caller(svc, &req).await?;
    if let Some(v) = req.header("mcp-protocol-version")
        && !SUPPORTED.contains(&v)
    {
        return Err(ApiError::bad_request(
            "unsupported-protocol-version",
            format!("MCP-Protocol-Version {v:?} is not supported; this server speaks {}.", SUPPORTED.join(", ")),
        ));
    }
    let bytes = req.body_bytes().await?;
    let message: Value = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        Err(e) => return Ok(rpc_error(Value::Null, RpcCode::ParseError, &format!("not JSON: {e}"))),
    };
    if message.is_array() {
        return Ok(rpc_error(Value::Null, RpcCode::InvalidRequest, "batches are not supported: send one message"));
    }
    let Some(method) = message.get("method").and_then(Value::as_str) else {
        // A response to a request of ours (we send none) or junk: accepted, nothing to say.
        return Ok(response::empty(StatusCode::ACCEPTED));
    };
    let Some(id) = message.get("id").cloned().filter(|id| id.is_string() || id.is_number()) else {
        // A notification (`notifications/initialized`, `notifications/cancelled`).
        return Ok(response::empty(StatusCode::ACCEPTED));
    };
    let params = message.get("params").cloned().unwrap_or(Value::Null);
    let answer = match method {
        "initialize" => Ok(initialize(&params)),
        "ping" => Ok(json!({})),
        "tools/list" => Ok(json!({ "tools": tools::list() })),
        "tools/call" => tools::call(svc, &caller, &params).await,
        other => Err((RpcCode::MethodNotFound, format!("no method {other:?}"))),
    };
    Ok(match answer {
        Ok(result) => response::json(StatusCode::OK, &json!({ "jsonrpc": "2.0", "id": id, "result": result })),
        Err((code, message)) => rpc_error(id, code, &message),
    })
}

/// The server's side of `initialize`: the client's revision when supported, else the
/// latest; tools only; instructions an agent can use.
fn initialize(params: &Value) -> Value {
    let asked = params.get("protocolVersion").and_then(Value::as_str).unwrap_or("");
    let version = SUPPORTED.iter().find(|v| **v == asked).copied().unwrap_or(SUPPORTED[0]);
    json!({
        "protocolVersion": version,
        "capabilities": { "tools": { "listChanged": false } },
        "serverInfo": { "name": "dynamics-companion", "title": "Dynamics Companion", "version": env!("CARGO_PKG_VERSION") },
        "instructions": "Calls external systems (ERP, payroll, e-signature) through OAuth connections kept in Dynamics 365. list_connections shows the connections you may use; call_provider_api calls a provider's API with a connection (you never see its token); start_connection returns a link a person opens to connect a new account.",
    })
}

fn rpc_error(id: Value, code: RpcCode, message: &str) -> Response {
    response::json(
        StatusCode::OK,
        &json!({ "jsonrpc": "2.0", "id": id, "error": { "code": code as i32, "message": message } }),
    )
}

/// The back-office caller, or the MCP specification's answers: `401` naming the resource
/// metadata, `403` `insufficient_scope` outside `MCP_ALLOWED_ROLES`.
pub(crate) async fn caller(svc: &Agents, req: &Request) -> Result<crate::clients::auth::Caller, ApiError> {
    use crate::clients::auth::AuthError;
    let Some(verifier) = &svc.verifier else {
        return Err(ApiError::unavailable(
            "back-office-closed",
            "The MCP endpoint needs the back-office API's issuer: set AUTH_ISSUER, AUTH_AUDIENCE and an allow-list.",
            None,
        ));
    };
    let with_challenge = |mut e: ApiError, error: Option<&str>| {
        e.headers.retain(|(name, _)| name != header::WWW_AUTHENTICATE);
        e.headers.push((header::WWW_AUTHENTICATE, challenge(&svc.metadata_url, error)));
        e
    };
    let caller = match verifier.verify(req.header(header::AUTHORIZATION)).await {
        Ok(c) => c,
        Err(AuthError::Unauthenticated(m)) => {
            let error = req.header(header::AUTHORIZATION).map(|_| "invalid_token");
            return Err(with_challenge(ApiError::unauthorized(m), error));
        }
        Err(e) => return Err(e.into()),
    };
    if !svc.allowed_roles.is_empty() && !caller.roles.iter().any(|r| svc.allowed_roles.contains(r)) {
        let e = ApiError::new(
            StatusCode::FORBIDDEN,
            "insufficient-scope",
            format!("The MCP endpoint needs one of the app roles {}.", svc.allowed_roles.join(", ")),
        );
        return Err(with_challenge(e, Some("insufficient_scope")));
    }
    Ok(caller)
}

/// The `WWW-Authenticate` value of a `401`: where the resource's metadata is.
pub fn challenge(metadata_url: &str, error: Option<&str>) -> HeaderValue {
    let value = match error {
        Some(e) => format!("Bearer error=\"{e}\", resource_metadata=\"{metadata_url}\""),
        None => format!("Bearer resource_metadata=\"{metadata_url}\""),
    };
    HeaderValue::from_str(&value).unwrap_or_else(|_| HeaderValue::from_static("Bearer"))
}

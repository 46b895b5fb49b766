//! `GET /api/openapi.json`: the API as a Swagger 2.0 document (Power Platform custom
//! connectors accept only 2.0), written from [`super::routes::ROUTES`], the table the
//! router matches, with `x-ms-summary` and `x-ms-visibility` so the actions read well in
//! the connector designer. `handler openapi --host HOST` prints the same document for
//! `connector/apiDefinition.swagger.json`.

use serde_json::{Map, Value, json};
use warp::http::StatusCode;

use super::response::{self, Response};
use super::routes::{Op, ROUTES, Route, Visibility};

/// The document for the deployment's public address.
pub fn serve(url: &url::Url) -> Response {
    let host = match url.port() {
        Some(p) => format!("{}:{p}", url.host_str().unwrap_or("localhost")),
        None => url.host_str().unwrap_or("localhost").to_string(),
    };
    response::json(StatusCode::OK, &document(&host, url.scheme()))
}

/// The whole document for `host` (`contoso-dc.azurewebsites.net`).
pub fn document(host: &str, scheme: &str) -> Value {
    let mut paths = Map::new();
    for route in ROUTES {
        let mut item = Map::new();
        for op in route.ops {
            item.insert(op.method.to_ascii_lowercase(), operation(route, op));
        }
        paths.insert(route.template.replace("{*path}", "{path}"), Value::Object(item));
    }
    json!({
        "swagger": "2.0",
        "info": {
            "title": "Dynamics Companion",
            "description": "OAuth connections kept for Dynamics 365: start a connection, get a valid access token, call the provider's API through the proxy.",
            "version": env!("CARGO_PKG_VERSION"),
        },
        "host": host,
        "basePath": "/",
        "schemes": [scheme],
        "consumes": ["application/json"],
        "produces": ["application/json"],
        "securityDefinitions": {
            "oauth2_auth": {
                "type": "oauth2",
                "flow": "accessCode",
                "authorizationUrl": "https://login.microsoftonline.com/common/oauth2/authorize",
                "tokenUrl": "https://login.microsoftonline.com/common/oauth2/token",
                "scopes": {},
            }
        },
        "paths": paths,
        "definitions": definitions(),
    })
}

fn operation(route: &Route, op: &Op) -> Value {
    let mut params = Vec::new();
    for part in route.template.split('/') {
        let name = match part.strip_prefix("{*").or_else(|| part.strip_prefix('{')) {
            Some(rest) => rest.trim_end_matches('}'),
            None => continue,
        };
        let (summary, description) = match name {
            "id" if route.template.starts_with("/api/tenants") => ("Tenant id", "The customer's Entra tenant id."),
            "id" => ("Connection id", "The connection's id."),
            _ if route.template.contains("/call/") => (
                "API path",
                "What follows the provider's api_base_url, e.g. invoices/123; the query string goes in Query.",
            ),
            _ => ("API path", "The rest of the path, appended to the provider's api_base_url."),
        };
        params.push(json!({
            "name": name, "in": "path", "required": true, "type": "string",
            "x-ms-summary": summary, "description": description, "x-ms-url-encoding": "single",
        }));
    }
    for q in op.query {
        params.push(json!({ "name": q.name, "in": "query", "required": false, "type": q.kind, "x-ms-summary": q.summary, "description": q.summary }));
    }
    if let Some(definition) = op.body {
        params.push(json!({
            "name": "body", "in": "body", "required": true,
            "schema": { "$ref": format!("#/definitions/{definition}") }, "x-ms-summary": "Request",
        }));
    }
    let mut ok = json!({ "description": status_text(op.ok.0) });
    if let Some(definition) = op.ok.1 {
        ok["schema"] = json!({ "$ref": format!("#/definitions/{definition}") });
    }
    let mut out = json!({
        "operationId": op.operation_id,
        "summary": op.summary,
        "description": op.description,
        "x-ms-visibility": match op.visibility {
            Visibility::Important => "important",
            Visibility::Normal => "advanced",
            Visibility::Internal => "internal",
        },
        "parameters": params,
        "responses": {
            op.ok.0.to_string(): ok,
            "default": { "description": "A problem (RFC 9457)", "schema": { "$ref": "#/definitions/Problem" } },
        },
    });
    if route.back_office {
        out["security"] = json!([{ "oauth2_auth": [] }]);
    }
    if route.audience == super::Audience::Browser || route.template == "/" {
        out["produces"] = json!(["text/html", "text/plain"]);
    }
    out
}

fn status_text(status: u16) -> &'static str {
    match status {
        201 => "Created",
        204 => "No content",
        _ => "OK",
    }
}

/// A string property with its designer label.
fn s(summary: &str) -> Value {
    json!({ "type": "string", "x-ms-summary": summary, "description": summary })
}

fn definitions() -> Value {
    let status = json!({ "type": "string", "enum": ["pending", "active", "needs_reauth", "failed"], "x-ms-summary": "Status", "description": "Status" });
    let scopes =
        json!({ "type": "array", "items": { "type": "string" }, "x-ms-summary": "Scopes", "description": "Scopes" });
    json!({
        "StartRequest": { "type": "object", "required": ["provider"], "properties": {
            "provider": s("Provider"), "connection_id": s("Connection id"), "owner": s("Owner"),
            "scopes": scopes, "return_url": s("Return URL"),
            "params": { "type": "object", "additionalProperties": { "type": "string" }, "x-ms-summary": "Provider parameters",
                "description": "Values for the provider entry's per-connection parameters (an account, an instance)" },
        }},
        "Started": { "type": "object", "properties": {
            "connection_id": s("Connection id"), "provider": s("Provider"), "status": status,
            "authorization_url": s("Authorization URL"), "authorization_expires_at": s("Link expires at"),
        }},
        "Connection": { "type": "object", "properties": {
            "connection_id": s("Connection id"), "provider": s("Provider"), "owner": s("Owner"), "scopes": scopes,
            "status": status, "status_detail": s("Status detail"),
            "authorization_pending": { "type": "boolean", "x-ms-summary": "Authorization pending" },
            "has_refresh_token": { "type": "boolean", "x-ms-summary": "Has refresh token" },
            "access_token_expires_at": s("Access token expires at"), "last_refreshed_at": s("Last refreshed at"),
            "last_used_at": s("Last used at"), "last_used_by": s("Last used by"),
            "created_at": s("Created at"), "updated_at": s("Updated at"),
        }},
        "ConnectionList": { "type": "object", "properties": {
            "connections": { "type": "array", "items": { "$ref": "#/definitions/Connection" }, "x-ms-summary": "Connections" },
            "next": s("Next page"),
        }},
        "ImportRequest": { "type": "object", "required": ["provider", "refresh_token"], "properties": {
            "provider": s("Provider"), "connection_id": s("Connection id"), "owner": s("Owner"), "scopes": scopes,
            "refresh_token": s("Refresh token"), "access_token": s("Access token"),
            "expires_at": { "type": "integer", "format": "int64", "x-ms-summary": "Access token expires at (Unix seconds)" },
        }},
        "TokenRequest": { "type": "object", "properties": {
            "force_refresh": { "type": "boolean", "x-ms-summary": "Force a refresh", "default": false },
        }},
        "Token": { "type": "object", "properties": {
            "connection_id": s("Connection id"),
            "access_token": { "type": "string", "x-ms-summary": "Access token", "x-ms-visibility": "important" },
            "token_type": s("Token type"), "expires_at": s("Expires at"),
            "expires_in": { "type": "integer", "x-ms-summary": "Expires in (seconds)" }, "scope": s("Scope"),
        }},
        "ReconnectRequest": { "type": "object", "properties": { "return_url": s("Return URL") } },
        "ExpectRequest": { "type": "object", "required": ["state"], "properties": {
            "state": s("State"), "expires_in": { "type": "integer", "x-ms-summary": "Keep for (seconds)" },
        }},
        "Expected": { "type": "object", "properties": { "state": s("State"), "expires_at": s("Expires at") } },
        "CaptureList": { "type": "object", "properties": { "captures": { "type": "array", "x-ms-summary": "Captures", "items": {
            "type": "object", "properties": {
                "state": s("State"), "code": s("Code"), "iss": s("Issuer"), "error": s("Error"),
                "error_description": s("Error description"), "received_at": s("Received at"), "delivered_at": s("Delivered at"),
            }
        }}}},
        "StartTenant": { "type": "object", "required": ["tenant_id"], "properties": {
            "tenant_id": s("Tenant id"), "org_url": s("Organisation URL"),
        }},
        "Tenant": { "type": "object", "properties": {
            "tenant_id": s("Tenant id"), "org_url": s("Organisation URL"),
            "status": { "type": "string", "enum": ["consent_pending", "consented", "onboarded", "failed"], "x-ms-summary": "Status" },
            "status_detail": s("Status detail"), "started_by": s("Started by"), "consented_at": s("Consented at"),
            "onboarded_at": s("Onboarded at"), "created_at": s("Created at"), "updated_at": s("Updated at"),
        }},
        "TenantList": { "type": "object", "properties": { "tenants": { "type": "array", "items": { "$ref": "#/definitions/Tenant" }, "x-ms-summary": "Tenants" } } },
        "TenantStarted": { "type": "object", "properties": { "tenant": { "$ref": "#/definitions/Tenant" }, "consent_url": s("Consent link") } },
        "OnboardingLink": { "type": "object", "properties": { "onboarding_url": s("Onboarding link") } },
        "Health": { "type": "object", "properties": {
            "status": s("Status"), "version": s("Version"),
        }, "additionalProperties": true },
        "Problem": { "type": "object", "properties": {
            "type": s("Type"), "title": s("Title"), "status": { "type": "integer", "x-ms-summary": "Status" },
            "detail": s("Detail"), "instance": s("Instance"),
        }},
        "Any": { "type": "object", "additionalProperties": true, "x-ms-summary": "Body" },
    })
}

//! The route table's rows: every path, its methods and what each operation does.

use super::{Query, Route, body, important, internal, ok, op, query};
use crate::web::error::Audience;

const PROXY_SUMMARY: &str = "Call the provider's API";
const PROXY_DESCRIPTION: &str = "Sends the request to the provider's api_base_url plus the rest of this path, with the connection's access token; refreshes and retries once on 401.";
const RAW_PROXY_SUMMARY: &str = "Call the provider's API (raw path)";
const CALL_DESCRIPTION: &str = "Sends the request to the provider's api_base_url plus the API path (e.g. invoices/123), with the provider's query string from Query (e.g. status=open), using the connection's access token; refreshes and retries once on 401.";
const CALL_QUERY: &[Query] = &[Query {
    name: "query",
    summary: "Query: the provider's query string, e.g. status=open&limit=10",
    kind: "string",
}];

pub const ROUTES: &[Route] = &[
    Route {
        template: "/",
        audience: Audience::Api,
        back_office: false,
        ops: &[internal(op("GET", "Readiness", "Readiness", "The Functions host's readiness probe."))],
    },
    Route {
        template: "/refresh",
        audience: Audience::Api,
        back_office: false,
        ops: &[internal(op("POST", "TimerInvocation", "Timer", "The host's timer invocation (payload protocol)."))],
    },
    Route {
        template: "/api/openapi.json",
        audience: Audience::Api,
        back_office: false,
        ops: &[internal(op("GET", "OpenApi", "This document", "The API as Swagger 2.0, for custom connectors."))],
    },
    Route {
        template: "/api/health",
        audience: Audience::Api,
        back_office: false,
        ops: &[ok(
            op(
                "GET",
                "GetHealth",
                "Health",
                "Version, readiness of each dependency, key rotation and timer state; with a bearer token also the connection counts.",
            ),
            200,
            Some("Health"),
        )],
    },
    Route {
        template: "/api/oauth/callback",
        audience: Audience::Browser,
        back_office: false,
        ops: &[
            internal(op(
                "GET",
                "Callback",
                "OAuth callback",
                "The fixed redirect URI providers send the person's browser to.",
            )),
            internal(op(
                "POST",
                "CallbackFormPost",
                "OAuth callback (form post)",
                "The same, for response_mode=form_post.",
            )),
        ],
    },
    Route {
        template: "/api/oauth/bind",
        audience: Audience::Browser,
        back_office: false,
        ops: &[
            internal(op("GET", "BindPage", "Bind page", "Where a portal popup proves it belongs to the page.")),
            internal(op("POST", "Bind", "Bind", "The bind page's check.")),
        ],
    },
    Route {
        template: "/api/oauth/consent",
        audience: Audience::Browser,
        back_office: false,
        ops: &[internal(op(
            "GET",
            "AdminConsentAnswer",
            "Admin consent answer",
            "Where Entra sends a customer's administrator after admin consent.",
        ))],
    },
    Route {
        template: "/api/oauth/onboard",
        audience: Audience::Browser,
        back_office: false,
        ops: &[internal(op(
            "GET",
            "OnboardingSignIn",
            "Onboarding sign-in",
            "Where a customer administrator's sign-in returns to set their environment up.",
        ))],
    },
    Route {
        template: "/api/connections",
        audience: Audience::Api,
        back_office: true,
        ops: &[
            query(
                ok(
                    op(
                        "GET",
                        "ListConnections",
                        "List connections",
                        "Connections and their status, never tokens; pages of up to limit with a next link.",
                    ),
                    200,
                    Some("ConnectionList"),
                ),
                &[
                    Query { name: "provider", summary: "Provider", kind: "string" },
                    Query { name: "owner", summary: "Owner", kind: "string" },
                    Query { name: "status", summary: "Status (pending, active, needs_reauth, failed)", kind: "string" },
                    Query { name: "limit", summary: "Page size (1-1000)", kind: "integer" },
                    Query { name: "after", summary: "The cursor from the previous page's next link", kind: "string" },
                ],
            ),
            important(ok(
                body(
                    op(
                        "POST",
                        "StartConnection",
                        "Start a connection",
                        "Creates a connection and returns the authorization URL to send the person to.",
                    ),
                    "StartRequest",
                ),
                201,
                Some("Started"),
            )),
        ],
    },
    Route {
        template: "/api/connections/import",
        audience: Audience::Api,
        back_office: true,
        ops: &[ok(
            body(
                op(
                    "POST",
                    "ImportConnection",
                    "Import a connection",
                    "Takes over a refresh token from another token keeper; verified by one refresh.",
                ),
                "ImportRequest",
            ),
            201,
            Some("Connection"),
        )],
    },
    Route {
        template: "/api/connections/{id}",
        audience: Audience::Api,
        back_office: true,
        ops: &[
            important(ok(
                op(
                    "GET",
                    "GetConnection",
                    "Get a connection",
                    "The connection's status (pending, active, needs_reauth with the provider's message, failed).",
                ),
                200,
                Some("Connection"),
            )),
            query(
                ok(
                    op(
                        "DELETE",
                        "DeleteConnection",
                        "Delete a connection",
                        "Revokes the grant at the provider (RFC 7009) and deletes the connection.",
                    ),
                    204,
                    None,
                ),
                &[Query {
                    name: "skip_revocation",
                    summary: "Skip revocation (the provider is gone)",
                    kind: "boolean",
                }],
            ),
        ],
    },
    Route {
        template: "/api/connections/{id}/token",
        audience: Audience::Api,
        back_office: true,
        ops: &[important(ok(
            body(
                op(
                    "POST",
                    "GetAccessToken",
                    "Get an access token",
                    "A valid access token for the connection, refreshed when due (or when forced).",
                ),
                "TokenRequest",
            ),
            200,
            Some("Token"),
        ))],
    },
    Route {
        template: "/api/connections/{id}/reconnect",
        audience: Audience::Api,
        back_office: true,
        ops: &[ok(
            body(
                op(
                    "POST",
                    "ReconnectConnection",
                    "Reconnect",
                    "A new authorization URL for the connection; its tokens keep working until it completes.",
                ),
                "ReconnectRequest",
            ),
            200,
            Some("Started"),
        )],
    },
    Route {
        template: "/api/connections/{id}/proxy/{*path}",
        audience: Audience::Api,
        back_office: true,
        ops: &[
            internal(op("GET", "ProxyGet", RAW_PROXY_SUMMARY, PROXY_DESCRIPTION)),
            internal(body(op("POST", "ProxyPost", RAW_PROXY_SUMMARY, PROXY_DESCRIPTION), "Any")),
            internal(body(op("PUT", "ProxyPut", RAW_PROXY_SUMMARY, PROXY_DESCRIPTION), "Any")),
            internal(body(op("PATCH", "ProxyPatch", RAW_PROXY_SUMMARY, PROXY_DESCRIPTION), "Any")),
            internal(op("DELETE", "ProxyDelete", RAW_PROXY_SUMMARY, PROXY_DESCRIPTION)),
        ],
    },
    // The connector's form of the proxy: a custom connector URL-encodes a path parameter,
    // so the API path is one parameter, decoded once, and the query its own.
    Route {
        template: "/api/connections/{id}/call/{*path}",
        audience: Audience::Api,
        back_office: true,
        ops: &[
            important(query(op("GET", "CallGet", PROXY_SUMMARY, CALL_DESCRIPTION), CALL_QUERY)),
            query(body(op("POST", "CallPost", PROXY_SUMMARY, CALL_DESCRIPTION), "Any"), CALL_QUERY),
            query(body(op("PUT", "CallPut", PROXY_SUMMARY, CALL_DESCRIPTION), "Any"), CALL_QUERY),
            query(body(op("PATCH", "CallPatch", PROXY_SUMMARY, CALL_DESCRIPTION), "Any"), CALL_QUERY),
            query(op("DELETE", "CallDelete", PROXY_SUMMARY, CALL_DESCRIPTION), CALL_QUERY),
        ],
    },
    Route {
        template: "/api/mcp",
        audience: Audience::Api,
        back_office: true,
        ops: &[internal(op(
            "POST",
            "Mcp",
            "MCP",
            "The Model Context Protocol (Streamable HTTP, stateless): the kept connections as tools for AI agents.",
        ))],
    },
    Route {
        template: "/api/mcp/.well-known/oauth-protected-resource",
        audience: Audience::Api,
        back_office: false,
        ops: &[internal(op(
            "GET",
            "McpResourceMetadata",
            "MCP resource metadata",
            "RFC 9728 protected-resource metadata of /api/mcp: its authorization server.",
        ))],
    },
    Route {
        template: "/.well-known/oauth-protected-resource/api/mcp",
        audience: Audience::Api,
        back_office: false,
        ops: &[internal(op(
            "GET",
            "McpResourceMetadataWellKnown",
            "MCP resource metadata",
            "The same, at RFC 9728's own path (when the handler is reached directly).",
        ))],
    },
    Route {
        template: "/api/captures",
        audience: Audience::Api,
        back_office: true,
        ops: &[
            query(
                ok(
                    op(
                        "GET",
                        "GetCaptures",
                        "Get captured callbacks",
                        "What capture mode received for a state, with the code.",
                    ),
                    200,
                    Some("CaptureList"),
                ),
                &[Query { name: "state", summary: "The state Dynamics issued", kind: "string" }],
            ),
            ok(
                body(
                    op("POST", "ExpectState", "Register a state", "Capture mode keeps callbacks for this state."),
                    "ExpectRequest",
                ),
                201,
                Some("Expected"),
            ),
        ],
    },
    Route {
        template: "/api/tenants",
        audience: Audience::Api,
        back_office: true,
        ops: &[
            ok(
                op(
                    "GET",
                    "ListTenants",
                    "List customer tenants",
                    "Multi-tenant deployments: the customer tenants and their onboarding status.",
                ),
                200,
                Some("TenantList"),
            ),
            ok(
                body(
                    op(
                        "POST",
                        "StartTenant",
                        "Onboard a customer tenant",
                        "Records the tenant and returns the admin-consent link for its administrator.",
                    ),
                    "StartTenant",
                ),
                201,
                Some("TenantStarted"),
            ),
        ],
    },
    Route {
        template: "/api/tenants/{id}",
        audience: Audience::Api,
        back_office: true,
        ops: &[
            ok(op("GET", "GetTenant", "Get a customer tenant", "The tenant's onboarding status."), 200, Some("Tenant")),
            ok(
                op(
                    "DELETE",
                    "DeleteTenant",
                    "Off-board a customer tenant",
                    "Forgets the tenant; its callers are refused from then on.",
                ),
                204,
                None,
            ),
        ],
    },
    Route {
        template: "/api/tenants/{id}/onboard",
        audience: Audience::Api,
        back_office: true,
        ops: &[ok(
            op(
                "POST",
                "TenantOnboardingLink",
                "Onboarding link",
                "A new sign-in link for the customer's administrator to set their environment up.",
            ),
            200,
            Some("OnboardingLink"),
        )],
    },
    Route {
        template: "/api/tenants/{id}/check",
        audience: Audience::Api,
        back_office: true,
        ops: &[ok(
            op(
                "POST",
                "CheckTenant",
                "Check a customer tenant",
                "Checks the customer's organisation with the app's own token; onboarded when it lets the app in.",
            ),
            200,
            Some("Tenant"),
        )],
    },
    Route {
        template: "/api/portal/me",
        audience: Audience::Api,
        back_office: false,
        ops: &[internal(op("GET", "PortalMe", "Portal user", "The signed-in portal contact (portal token)."))],
    },
    Route {
        template: "/api/portal/connections",
        audience: Audience::Api,
        back_office: false,
        ops: &[
            internal(op(
                "GET",
                "PortalListConnections",
                "Portal: my connections",
                "The contact's connections (portal token).",
            )),
            internal(op(
                "POST",
                "PortalStartConnection",
                "Portal: connect",
                "Starts or re-authorizes one of the contact's connections (portal token).",
            )),
        ],
    },
    Route {
        template: "/api/portal/connections/{id}",
        audience: Audience::Api,
        back_office: false,
        ops: &[
            internal(op(
                "GET",
                "PortalGetConnection",
                "Portal: a connection",
                "One of the contact's connections (portal token).",
            )),
            internal(op(
                "DELETE",
                "PortalDeleteConnection",
                "Portal: disconnect",
                "Disconnects one of the contact's connections (portal token).",
            )),
        ],
    },
    Route {
        template: "/api/portal/connections/{id}/proxy/{*path}",
        audience: Audience::Api,
        back_office: false,
        ops: &[
            internal(op(
                "GET",
                "PortalProxyGet",
                PROXY_SUMMARY,
                "The provider's API for the contact, as the provider's portal.proxy rules allow.",
            )),
            internal(op(
                "POST",
                "PortalProxyPost",
                PROXY_SUMMARY,
                "The provider's API for the contact, as the provider's portal.proxy rules allow.",
            )),
            internal(op(
                "PUT",
                "PortalProxyPut",
                PROXY_SUMMARY,
                "The provider's API for the contact, as the provider's portal.proxy rules allow.",
            )),
            internal(op(
                "PATCH",
                "PortalProxyPatch",
                PROXY_SUMMARY,
                "The provider's API for the contact, as the provider's portal.proxy rules allow.",
            )),
            internal(op(
                "DELETE",
                "PortalProxyDelete",
                PROXY_SUMMARY,
                "The provider's API for the contact, as the provider's portal.proxy rules allow.",
            )),
        ],
    },
];

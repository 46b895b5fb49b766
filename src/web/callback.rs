//! The fixed redirect URI, `/api/oauth/callback`.
//!
//! An external system sends the person's browser here with `code` and `state` (RFC 6749
//! §4.1.2) or with `error` (§4.1.2.1), in the query string, a form post
//! (`response_mode=form_post`) or a JSON body. A `state` we issued (signed `dc1.`
//! states) completes a managed connection; any other state is captured for Dynamics to
//! exchange itself (capture mode). The person always gets a readable page, or a
//! redirect to the `return_url` given when the connection was started.

use warp::http::{Method, StatusCode, header};

use super::html::{self, Tone};
use super::request::{is_json, parse_json};
use super::{ApiError, Request, Response, response};
use crate::app::services::Callback;
use crate::domain::captures::{Outcome, Received};
use crate::domain::connections::{CallbackFailure, Completed};
use crate::domain::oauth::{AuthorizationCode, ErrorCode, OAuthError};
use crate::support::crypto::StateError;

/// The parameters an authorization response may carry.
#[derive(Debug, Default)]
struct Params {
    code: Option<AuthorizationCode>,
    state: Option<String>,
    iss: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

const NAMES: [&str; 6] = ["code", "state", "iss", "error", "error_description", "error_uri"];

pub async fn handle(svc: &Callback, mut req: Request) -> Result<Response, ApiError> {
    // Anyone can hit the callback: a bounded rate per client address.
    if let Some(ip) = client_address(svc, &req)
        && let Err(wait) = svc.rate.take(ip)
    {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too-many-callbacks",
            "Too many authorization responses came from your address; wait a moment and try again.",
        )
        .with_header(header::RETRY_AFTER, header::HeaderValue::from(wait.as_secs().max(1))));
    }
    if req.method == Method::HEAD {
        // Link scanners and mail filters probe links with HEAD: a probe must not spend
        // the one code an authorization produces.
        return Ok(html::page(
            StatusCode::OK,
            "Authorization callback",
            "Open this link in a browser to finish the authorization.",
            Tone::Success,
        ));
    }
    let params = read_params(svc, &mut req).await?;
    let Some(state) = params.state.as_deref() else {
        return Err(match &params.error {
            Some(error) => ApiError::bad_request(
                "provider-error",
                format!(
                    "The provider returned {error}{} and no state, so the connection it belongs to is unknown.",
                    in_parentheses(&params.error_description)
                ),
            ),
            None => ApiError::bad_request(
                "missing-state",
                "The callback has no state parameter, so it cannot be matched to a connection.",
            ),
        });
    };
    match svc.keys.verify_state(state, crate::support::time::now()) {
        Err(StateError::NotOurs) => capture(svc, state, &params).await,
        Err(StateError::Tampered) => Err(ApiError::bad_request(
            "state-tampered",
            "The state parameter was altered, or was signed with a key that is no longer configured. Start the connection again.",
        )),
        Err(StateError::Expired) => Err(ApiError::bad_request(
            "state-expired",
            "This authorization link has expired. Start the connection again to get a new one.",
        )),
        Ok(verified) => {
            let error = params.error.as_deref().map(ErrorCode::parse);
            let provider_error = error.as_ref().map(|e| (e, params.error_description.as_deref()));
            let presented = super::binding::presented(&svc.cookies, &req, &verified.hash);
            // A customer tenant's connection lives in that tenant's organisation.
            let connections = svc.organisations.for_scope(verified.scope.as_deref()).await?;
            let outcome = connections
                .complete(&verified, params.code.as_ref(), params.iss.as_deref(), provider_error, presented)
                .await;
            let mut resp = match outcome {
                Ok(done) => success(done),
                Err(failure) => failure_response(failure)?,
            };
            if presented.is_some()
                && let Some(clear) = super::binding::cleared(&svc.cookies, &verified.hash)
            {
                resp.headers_mut().append(header::SET_COOKIE, clear);
            }
            Ok(resp)
        }
    }
}

async fn read_params(svc: &Callback, req: &mut Request) -> Result<Params, ApiError> {
    let mut pairs = req.query_pairs();
    if req.method == Method::POST {
        let content_type = req.header(header::CONTENT_TYPE).unwrap_or("").to_ascii_lowercase();
        let body = req.body_bytes().await?;
        if is_json(&content_type) {
            let doc: serde_json::Map<String, serde_json::Value> = parse_json(&body)?;
            for (k, v) in doc {
                match v {
                    serde_json::Value::String(s) => pairs.push((k, s)),
                    serde_json::Value::Null => {}
                    _ => {
                        return Err(ApiError::bad_request(
                            "invalid-parameter",
                            format!("The JSON field {k:?} must be a string."),
                        ));
                    }
                }
            }
        } else if content_type.starts_with("application/x-www-form-urlencoded") || content_type.is_empty() {
            pairs.extend(url::form_urlencoded::parse(&body).into_owned());
        } else {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                format!("The callback accepts a form post or JSON, not {content_type}."),
            ));
        }
    }
    let limit = svc.max_param_bytes;
    let mut p = Params::default();
    for (name, value) in pairs {
        if !NAMES.contains(&name.as_str()) {
            continue;
        }
        if value.len() > limit {
            return Err(ApiError::bad_request(
                "parameter-too-long",
                format!("The {name} parameter is {} bytes long; the limit is {limit}.", value.len()),
            ));
        }
        if name == "code" {
            if p.code.as_ref().is_some_and(|existing| existing.secret() != value) {
                return Err(repeated(&name));
            }
            p.code = Some(value).filter(|v| !v.is_empty()).map(AuthorizationCode::new);
            continue;
        }
        let slot = match name.as_str() {
            "state" => &mut p.state,
            "iss" => &mut p.iss,
            "error" => &mut p.error,
            "error_description" => &mut p.error_description,
            _ => continue,
        };
        if slot.as_ref().is_some_and(|existing| existing != &value) {
            return Err(repeated(&name));
        }
        *slot = Some(value).filter(|v| !v.is_empty());
    }
    Ok(p)
}

/// The address the request came from. Under the Functions host every request comes from
/// the host on 127.0.0.1, and the host (YARP, in proxying mode) *sets* `X-Forwarded-For`
/// to the address it was called from, replacing whatever the client sent; where a front
/// end appends instead, the last entry is the one the nearest trusted hop added. Without
/// the host, the TCP peer is the client and the header is not trusted.
fn client_address(svc: &Callback, req: &Request) -> Option<std::net::IpAddr> {
    if svc.under_host
        && let Some(last) = req.header("x-forwarded-for").and_then(|v| v.rsplit(',').next())
    {
        let last = last.trim();
        // `1.2.3.4:5678` and `[::1]:5678` carry a port; a bare address does not.
        let bare = last.parse::<std::net::SocketAddr>().map(|a| a.ip()).ok();
        return bare.or_else(|| last.trim_start_matches('[').trim_end_matches(']').parse().ok());
    }
    req.remote.map(|r| r.ip())
}

/// RFC 6749 §3.1: parameters must not be sent more than once.
fn repeated(name: &str) -> ApiError {
    ApiError::bad_request("repeated-parameter", format!("The {name} parameter was sent twice with different values."))
}

/// Capture mode: keep what the provider sent, once per code, for Dynamics.
async fn capture(svc: &Callback, state: &str, p: &Params) -> Result<Response, ApiError> {
    if !svc.capturing {
        return Err(ApiError::bad_request(
            "unknown-state",
            "This state was not issued by this service, and capture mode is off.",
        ));
    }
    if p.code.is_none() && p.error.is_none() {
        return Err(ApiError::bad_request("missing-code", "The callback has neither a code nor an error."));
    }
    let received = Received {
        state,
        code: p.code.as_ref(),
        iss: p.iss.as_deref(),
        error: p.error.as_deref(),
        error_description: p.error_description.as_deref(),
    };
    let outcome = svc.captures.capture(received).await?;
    let (title, message, tone) = match &p.error {
        Some(error) => (
            "Authorization not granted",
            format!(
                "The provider returned {error}{}. Dynamics has been told; you can close this window.",
                in_parentheses(&p.error_description)
            ),
            Tone::Error,
        ),
        None if outcome == Outcome::New => (
            "Authorization received",
            "Dynamics will finish connecting. You can close this window.".to_string(),
            Tone::Success,
        ),
        None => (
            "Authorization already received",
            "This authorization was already received. You can close this window.".to_string(),
            Tone::Success,
        ),
    };
    Ok(html::page(StatusCode::OK, title, &message, tone))
}

fn success(done: Completed) -> Response {
    // The person's browser completed the authorization: new tokens for this connection.
    let actor = crate::support::audit::Actor { kind: "callback", ..Default::default() };
    crate::support::audit::record(
        crate::support::audit::Action::Authorization,
        &done.connection_id,
        &done.provider_name,
        &actor,
        "active",
    );
    if let Some(mut url) = done.return_url {
        url.query_pairs_mut().append_pair("connection_id", &done.connection_id).append_pair("status", "active");
        return response::redirect(url.as_str());
    }
    let script = notify_opener(&done, "active", None);
    html::page_with_script(
        StatusCode::OK,
        &format!("Connected to {}", done.provider),
        &format!("The connection {} is active. You can close this window.", done.connection_id),
        Tone::Success,
        script.as_deref(),
    )
}

/// Tells the portal page that opened the flow in a popup how it ended, by `postMessage`
/// to that page's origin only (recorded when the flow started). Nothing secret is sent:
/// the connection id, fixed status words and the provider's error code.
fn notify_opener(done: &Completed, status: &str, error: Option<&str>) -> Option<String> {
    let origin = done.opener_origin.as_deref()?;
    let msg = serde_json::json!({
        "type": "dynamics-companion:connection",
        "connection_id": done.connection_id,
        "status": status,
        "error": error,
    });
    // JSON is valid JavaScript; `<` is escaped so the text cannot close the script element.
    let js = |v: &serde_json::Value| v.to_string().replace('<', "\\u003c");
    Some(format!(
        "if(window.opener){{window.opener.postMessage({},{});}}setTimeout(function(){{window.close();}},300);",
        js(&msg),
        js(&serde_json::Value::String(origin.to_string()))
    ))
}

fn failure_response(failure: CallbackFailure) -> Result<Response, ApiError> {
    Err(match failure {
        CallbackFailure::StateUsed => ApiError::bad_request(
            "state-used",
            "This authorization link was already used, or a newer one replaced it. Start the connection again.",
        ),
        CallbackFailure::StateExpired => ApiError::bad_request(
            "state-expired",
            "This authorization link has expired. Start the connection again to get a new one.",
        ),
        CallbackFailure::StateForOtherConnection => ApiError::bad_request(
            "state-mismatch",
            "This state belongs to another connection than the one it was presented for.",
        ),
        CallbackFailure::UnknownProvider(p) => {
            ApiError::internal(format!("the connection's provider {p} is no longer in the catalog"))
        }
        CallbackFailure::WrongIssuer { expected, got } => ApiError::bad_request(
            "issuer-mismatch",
            format!(
                "The response came from issuer {got:?}, but this connection's provider is {expected:?} (RFC 9207). Nothing was changed."
            ),
        ),
        CallbackFailure::MissingIssuer { expected } => ApiError::bad_request(
            "issuer-missing",
            format!(
                "The response carries no iss parameter, but provider {expected:?} must send one (RFC 9207). Nothing was changed."
            ),
        ),
        CallbackFailure::BindingMissing => ApiError::bad_request(
            "binding-missing",
            "This authorization was started from a portal page in another browser, so it cannot be completed here. Nothing was changed: start the connection from your own portal page.",
        ),
        CallbackFailure::BindingMismatch => ApiError::bad_request(
            "binding-mismatch",
            "This authorization belongs to another portal session. Nothing was changed: start the connection again from the portal.",
        ),
        CallbackFailure::MissingCode => {
            ApiError::bad_request("missing-code", "The callback has neither a code nor an error.")
        }
        CallbackFailure::Crypto => ApiError::internal("the pending authorization could not be decrypted"),
        CallbackFailure::ProviderError { error, description, completed } => {
            return Ok(provider_refused(&error, description, completed));
        }
        CallbackFailure::Exchange { error, completed } => {
            let detail = format!("{} did not accept the authorization code: {error}", completed.provider);
            match error {
                OAuthError::Rejected { .. } => ApiError::bad_request("code-rejected", detail),
                OAuthError::Config(_) => ApiError::internal(detail),
                _ => ApiError::bad_gateway("provider-unavailable", format!("{detail}. Start the connection again.")),
            }
        }
        CallbackFailure::NotSaved { revoked } => ApiError::unavailable(
            "not-saved",
            if revoked {
                "The provider granted access, but it could not be saved here, so it was withdrawn at the provider. Nothing was kept: please start the connection again in a little while."
            } else {
                "The provider granted access, but it could not be saved here. Nothing was kept: please start the connection again in a little while."
            },
            None,
        ),
        CallbackFailure::Store(e) => e.into(),
    })
}

/// The person's answer when the provider refused (`error` on the callback): back to the
/// return URL, or a page that also tells a portal opener.
fn provider_refused(error: &ErrorCode, description: Option<String>, completed: Completed) -> Response {
    if let Some(mut url) = completed.return_url {
        url.query_pairs_mut()
            .append_pair("connection_id", &completed.connection_id)
            .append_pair("status", "failed")
            .append_pair("error", error.as_str());
        return response::redirect(url.as_str());
    }
    let script = notify_opener(&completed, "failed", Some(error.as_str()));
    let mut resp = html::page_with_script(
        StatusCode::BAD_REQUEST,
        "Authorization not granted",
        &format!(
            "{} returned {error}{}. The connection {} was not authorized.",
            completed.provider,
            in_parentheses(&description),
            completed.connection_id
        ),
        Tone::Error,
        script.as_deref(),
    );
    resp.headers_mut().insert("x-problem-type", header::HeaderValue::from_static("provider-error"));
    resp
}

fn in_parentheses(description: &Option<String>) -> String {
    description.as_deref().map(|d| format!(" ({d})")).unwrap_or_default()
}

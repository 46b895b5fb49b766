//! Binding a portal flow to the browser that started it (RFC 9700 §4.7.1, login CSRF).
//!
//! Without it, portal user A could start a connection, send the authorization link to a
//! victim, and once the victim consents, A's proxy calls would run with the victim's
//! account. PKCE does not help: the verifier belongs to the connection, not to a browser.
//!
//! 1. The portal page makes a random secret and registers only its SHA-256 when it starts
//!    the connection (an authenticated call with the user's portal token).
//! 2. The popup opens on our origin first, at `GET /api/oauth/bind`. That page tells the
//!    opener it is ready (only portal origins can hear it), takes the secret and the
//!    authorization URL from the opener's `postMessage` (its origin checked against the
//!    portal origins), and posts them here.
//! 3. `POST /api/oauth/bind` accepts only what the bind page itself posts: the request's
//!    own `Origin` must be this handler's public origin (and `Sec-Fetch-Site`, when the
//!    browser sends it, `same-origin`), and the form must echo the one-time value the page
//!    was served with, which the page's response also set as a `SameSite=Strict` cookie
//!    (double submit). A form another site auto-submits carries that site's `Origin`, no
//!    such cookie and no such value: without these checks it could make a victim's browser
//!    hold the attacker's secret, and the attacker's connection would be authorized with
//!    the victim's account (login CSRF). The `origin` form field is only what the page read
//!    from its opener's message, never evidence of where the request came from.
//!    It then checks the secret against the hash registered for the URL's
//!    state, sets a first-party cookie holding the secret on our origin, and sends the
//!    popup on to the provider. The secret reaches our origin before any provider page
//!    loads, so a provider page that severs `window.opener` cannot break the flow.
//! 4. The callback refuses a bound state whose cookie is missing or different, before it
//!    spends anything.
//!
//! The cookie is `__Host-` prefixed, `Secure`, `HttpOnly`, `Path=/`, `SameSite=Lax` (or
//! `None` for providers that answer with `response_mode=form_post`, a cross-site POST);
//! on a plain-http loopback address (local work) it drops `Secure` and with it the
//! prefix, which requires `Secure`, and stays `Lax`.

use warp::http::{HeaderValue, Method, StatusCode, header};

use super::html::{self, Tone};
use super::{ApiError, Request, Response};
use crate::app::services::{BindCookies, Callback};
use crate::domain::connections::BindFailure;
use crate::support::crypto::StateError;

/// `GET /api/oauth/bind` (the page) and `POST /api/oauth/bind` (the check).
pub async fn handle(svc: &Callback, mut req: Request) -> Result<Response, ApiError> {
    if req.method != Method::POST {
        return Ok(page(&svc.cookies));
    }
    same_origin(&svc.cookies, &req)?;
    let body = req.body_bytes().await?;
    let form: Vec<(String, String)> = url::form_urlencoded::parse(&body).into_owned().collect();
    let field = |name: &str| form.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str()).unwrap_or("");
    let refused = |detail: &str| ApiError::bad_request("binding-refused", detail.to_string());
    let page_value = field("page");
    if !page_value_matches(&svc.cookies, &req, page_value) {
        return Err(cross_site("The form did not come from this service's own connect page."));
    }
    let (secret, target, origin) = (field("secret"), field("authorization_url"), field("origin"));
    // Random and base64url in the portal client; nothing else may reach a cookie header.
    let well_formed = secret.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if secret.len() < 32 || secret.len() > 256 || !well_formed {
        return Err(refused(
            "The portal page did not hand over its secret. Start the connection again from the portal.",
        ));
    }
    let target = url::Url::parse(target).map_err(|_| refused("The authorization link is not a URL."))?;
    let state = target.query_pairs().find(|(k, _)| k == "state").map(|(_, v)| v.into_owned()).unwrap_or_default();
    let verified = match svc.keys.verify_state(&state, crate::support::time::now()) {
        Ok(v) => v,
        Err(StateError::Expired) => {
            return Err(ApiError::bad_request(
                "state-expired",
                "This authorization link has expired. Start the connection again from the portal.",
            ));
        }
        Err(_) => return Err(refused("The authorization link was not issued by this service.")),
    };
    let connections = svc.organisations.for_scope(verified.scope.as_deref()).await?;
    let bound = connections.bind(&verified, secret).await.map_err(|e| match e {
        BindFailure::UnknownState => {
            refused("This authorization was already used or replaced. Start the connection again from the portal.")
        }
        BindFailure::WrongSecret => refused("This authorization was started by another page. Nothing was changed."),
    })?;
    let endpoint = &bound.authorization_endpoint;
    if target.origin() != endpoint.origin() || target.path() != endpoint.path() {
        return Err(refused("The link does not lead to this connection's provider."));
    }
    if bound.opener_origin.as_deref().is_some_and(|o| o != origin) {
        return Err(refused("The secret came from another page than the one that started the connection."));
    }
    let max_age = bound.expires_at.saturating_sub(crate::support::time::now()).max(1);
    let cookie = format!(
        "{}={secret}; Max-Age={max_age}{}",
        cookie_name(&svc.cookies, &verified.hash),
        attributes(&svc.cookies, bound.form_post)
    );
    let mut resp = super::response::redirect(target.as_str());
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
    // The page's one-time value is spent.
    let spent =
        format!("{}=; Max-Age=0{}", page_cookie_name(&svc.cookies, page_value), page_cookie_attributes(&svc.cookies));
    if let Ok(v) = HeaderValue::from_str(&spent) {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
    Ok(resp)
}

/// How long the bind page's one-time value lives: the popup posts within a second.
const PAGE_VALUE_SECONDS: u32 = 600;

/// The request must be the bind page's own form post: `Origin` (which browsers send on
/// every POST, and which a page cannot forge) is this handler's public origin, and a
/// `Sec-Fetch-Site` that is sent says `same-origin`. Refused before the body is read.
fn same_origin(c: &BindCookies, req: &Request) -> Result<(), ApiError> {
    let ours = c.redirect_uri.origin().ascii_serialization();
    match req.header(header::ORIGIN) {
        Some(origin) if origin == ours => {}
        Some(_) => return Err(cross_site("The form was posted from another site.")),
        None => return Err(cross_site("The request does not say where it came from (no Origin header).")),
    }
    match req.header("sec-fetch-site") {
        None | Some("same-origin") => Ok(()),
        Some(_) => Err(cross_site("The form was posted from another site.")),
    }
}

fn cross_site(detail: &str) -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "cross-site-bind",
        format!("{detail} Nothing was changed: start the connection again from the portal."),
    )
}

/// Whether the form echoes the value the bind page was served with, and the browser holds
/// it in the page's cookie (double submit: another site can neither read the value nor
/// make the browser send a `SameSite=Strict` cookie with its own form).
fn page_value_matches(c: &BindCookies, req: &Request, value: &str) -> bool {
    if value.len() != 32 || !value.bytes().all(|b| b.is_ascii_hexdigit()) {
        return false;
    }
    cookie(req, &page_cookie_name(c, value))
        .is_some_and(|held| crate::support::crypto::constant_time_eq(held.as_bytes(), value.as_bytes()))
}

/// One cookie per page (several popups may be open), named after its value's first part.
fn page_cookie_name(c: &BindCookies, value: &str) -> String {
    let short = value.get(..8).unwrap_or(value);
    if secure(c) { format!("__Host-dcbp-{short}") } else { format!("dcbp-{short}") }
}

fn page_cookie_attributes(c: &BindCookies) -> &'static str {
    if secure(c) { "; Path=/; HttpOnly; Secure; SameSite=Strict" } else { "; Path=/; HttpOnly; SameSite=Strict" }
}

/// The value of the cookie `name` the request carries, if any.
fn cookie<'a>(req: &'a Request, name: &str) -> Option<&'a str> {
    req.headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// The secret the browser presents for a state, from its cookie.
pub fn presented<'a>(c: &BindCookies, req: &'a Request, state_hash: &str) -> Option<&'a str> {
    cookie(req, &cookie_name(c, state_hash))
}

/// A `Set-Cookie` value that removes the binding cookie once the flow is done.
pub fn cleared(c: &BindCookies, state_hash: &str) -> Option<HeaderValue> {
    HeaderValue::from_str(&format!("{}=; Max-Age=0{}", cookie_name(c, state_hash), attributes(c, false))).ok()
}

/// One cookie per flow (a browser may run two at once), named after the state's hash.
fn cookie_name(c: &BindCookies, state_hash: &str) -> String {
    let short = state_hash.get(..16).unwrap_or(state_hash);
    if secure(c) { format!("__Host-dcb-{short}") } else { format!("dcb-{short}") }
}

fn secure(c: &BindCookies) -> bool {
    c.redirect_uri.scheme() == "https"
}

fn attributes(c: &BindCookies, form_post: bool) -> &'static str {
    match (secure(c), form_post) {
        (true, true) => "; Path=/; HttpOnly; Secure; SameSite=None",
        (true, false) => "; Path=/; HttpOnly; Secure; SameSite=Lax",
        (false, _) => "; Path=/; HttpOnly; SameSite=Lax",
    }
}

/// The page: says it is ready to the portal origins only, takes one message from its
/// opener on one of them, and posts it here as a form (a top-level navigation, so the
/// cookie is first-party), with the page's one-time value. Its referrer policy is
/// `same-origin`, so that post carries the real `Origin` (under `no-referrer` a browser
/// sends `Origin: null`).
fn page(c: &BindCookies) -> Response {
    let value = crate::support::crypto::random_hex::<16>();
    let origins: Vec<String> = c.portal_origins.iter().map(|o| o.ascii_serialization()).collect();
    let origins = serde_json::to_string(&origins).unwrap_or_else(|_| "[]".into()).replace('<', "\\u003c");
    let script = format!(
        "(function(){{var origins={origins};var done=false;\
window.addEventListener('message',function(e){{\
if(done||e.source!==window.opener||origins.indexOf(e.origin)<0)return;\
var d=e.data;if(!d||d.type!=='dynamics-companion:bind'||typeof d.secret!=='string'||typeof d.authorization_url!=='string')return;\
done=true;var f=document.createElement('form');f.method='POST';f.action='/api/oauth/bind';\
[['secret',d.secret],['authorization_url',d.authorization_url],['origin',e.origin],['page',{value:?}]].forEach(function(p){{\
var i=document.createElement('input');i.type='hidden';i.name=p[0];i.value=p[1];f.appendChild(i);}});\
document.body.appendChild(f);f.submit();}});\
if(window.opener){{origins.forEach(function(o){{window.opener.postMessage({{type:'dynamics-companion:bind-ready'}},o);}});}}\
}})();"
    );
    let mut resp = html::page_with_script(
        StatusCode::OK,
        "Connecting",
        "Taking you to the provider. If nothing happens, close this window and start again from the portal.",
        Tone::Success,
        Some(&script),
    );
    let h = resp.headers_mut();
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    let cookie =
        format!("{}={value}; Max-Age={PAGE_VALUE_SECONDS}{}", page_cookie_name(c, &value), page_cookie_attributes(c));
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        h.append(header::SET_COOKIE, v);
    }
    resp
}

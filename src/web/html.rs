//! The small HTML pages a person sees at the OAuth callback.
//!
//! The callback URL carries the authorization `code`, so the page loads nothing from
//! anywhere (strict CSP), sends no referrer and is never cached (RFC 9700 §4.2.4).

use warp::http::{HeaderValue, StatusCode, header};

use super::response::Response;

#[derive(Debug, Clone, Copy)]
pub enum Tone {
    Success,
    Error,
}

/// Escapes text for HTML element content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A complete page with a heading and a message; both are escaped here.
pub fn page(status: StatusCode, title: &str, message: &str, tone: Tone) -> Response {
    page_with_script(status, title, message, tone, None)
}

/// Like [`page`], with an optional `<script>` element whose hash is allowed by the CSP
/// (used to tell a portal page that opened us as a popup how the flow ended).
pub fn page_with_script(status: StatusCode, title: &str, message: &str, tone: Tone, script: Option<&str>) -> Response {
    render(status, title, message, tone, "", script)
}

/// Like [`page`], with a list of items under the message and a link to go on with (for
/// the onboarding pages: what was done, and the next step). Everything is escaped.
pub fn page_with_link(
    status: StatusCode,
    title: &str,
    message: &str,
    tone: Tone,
    items: &[String],
    link: Option<(&str, &str)>,
) -> Response {
    let mut extra = String::new();
    if !items.is_empty() {
        extra.push_str("<ul>");
        for item in items {
            extra.push_str(&format!("<li>{}</li>", escape(item)));
        }
        extra.push_str("</ul>");
    }
    if let Some((text, href)) = link {
        extra.push_str(&format!("<p><a href=\"{}\">{}</a></p>", escape(href), escape(text)));
    }
    render(status, title, message, tone, &extra, None)
}

fn render(status: StatusCode, title: &str, message: &str, tone: Tone, extra: &str, script: Option<&str>) -> Response {
    let accent = match tone {
        Tone::Success => "#107c10",
        Tone::Error => "#a4262c",
    };
    let script_tag = script.map(|s| format!("<script>{s}</script>")).unwrap_or_default();
    let body = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
<title>{title}</title><style>body{{font-family:system-ui,sans-serif;max-width:36rem;margin:4rem auto;padding:0 1rem;color:#222}}\
h1{{font-size:1.4rem;color:{accent}}}p{{line-height:1.5}}</style></head>\
<body><h1>{title}</h1><p>{message}</p>{extra}{script_tag}</body></html>\n",
        title = escape(title),
        message = escape(message),
    );
    let csp = match script {
        Some(s) => format!("default-src 'none'; style-src 'unsafe-inline'; script-src '{}'", csp_hash(s)),
        None => "default-src 'none'; style-src 'unsafe-inline'".to_string(),
    };
    let mut resp = Response::new(body.into());
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if let Ok(v) = HeaderValue::from_str(&csp) {
        h.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    resp
}

fn csp_hash(script: &str) -> String {
    use base64::Engine;
    use sha2::Digest;
    let digest = sha2::Sha256::digest(script.as_bytes());
    format!("sha256-{}", base64::engine::general_purpose::STANDARD.encode(digest))
}

#[cfg(test)]
mod tests {
    #[test]
    fn escapes_markup() {
        assert_eq!(super::escape("<b a=\"1\">&'"), "&lt;b a=&quot;1&quot;&gt;&amp;&#39;");
    }
}

//! The exporter's HTTP client: uploads with the managed identity's token, redacted.
//!
//! The OpenTelemetry SDK exports from its own threads and waits on the upload with a
//! plain executor, while reqwest needs tokio: each upload is therefore spawned on the
//! handler's runtime and its result awaited from there.
//!
//! Before anything is sent, the gzip-compressed JSON payload is opened and every string
//! in it goes through [`crate::support::logging::redact`], and every property named like a secret
//! (`code`, `state`, `token`, ...) loses its value, whichever span, event or log produced
//! it. One choke point, like the console's line writer, rather than a rule every call
//! site must remember.

use std::io::{Read, Write};
use std::sync::Arc;

use async_trait::async_trait;
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use secrecy::ExposeSecret;
use serde_json::Value;

use crate::clients::azure::TokenSource;

#[derive(Clone)]
pub struct IngestionClient {
    http: reqwest::Client,
    runtime: tokio::runtime::Handle,
    token: Option<Arc<dyn TokenSource>>,
}

impl std::fmt::Debug for IngestionClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IngestionClient").field("entra", &self.token.is_some()).finish_non_exhaustive()
    }
}

impl IngestionClient {
    pub fn new(
        http: reqwest::Client,
        runtime: tokio::runtime::Handle,
        token: Option<Arc<dyn TokenSource>>,
    ) -> IngestionClient {
        IngestionClient { http, runtime, token }
    }
}

#[async_trait]
impl HttpClient for IngestionClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let http = self.http.clone();
        let token = self.token.clone();
        let upload = async move {
            let (parts, body) = request.into_parts();
            let gzip = parts.headers.get(reqwest::header::CONTENT_ENCODING).is_some_and(|v| v == "gzip");
            let body = redact_payload(&body, gzip)?;
            let mut req = http.request(parts.method, parts.uri.to_string()).headers(parts.headers).body(body);
            if let Some(token) = token {
                req = req.bearer_auth(token.token().await?.expose_secret());
            }
            let resp = req.send().await.map_err(crate::support::outbound::error_text)?;
            let status = resp.status();
            let bytes = resp.bytes().await.map_err(crate::support::outbound::error_text)?;
            Ok::<_, HttpError>(Response::builder().status(status).body(bytes)?)
        };
        self.runtime.spawn(upload).await?
    }
}

/// The payload with every string redacted, compressed again when it came compressed.
fn redact_payload(body: &[u8], gzip: bool) -> Result<Vec<u8>, HttpError> {
    let json = if gzip {
        let mut out = Vec::with_capacity(body.len() * 4);
        flate2::read::GzDecoder::new(body).read_to_end(&mut out)?;
        out
    } else {
        body.to_vec()
    };
    let mut value: Value = serde_json::from_slice(&json)?;
    redact_value(&mut value);
    let json = serde_json::to_vec(&value)?;
    if !gzip {
        return Ok(json);
    }
    let mut encoder = flate2::write::GzEncoder::new(Vec::with_capacity(json.len() / 4), flate2::Compression::fast());
    encoder.write_all(&json)?;
    Ok(encoder.finish()?)
}

fn redact_value(value: &mut Value) {
    match value {
        Value::String(s) => {
            if let std::borrow::Cow::Owned(clean) = crate::support::logging::redact(s) {
                *s = clean;
            }
        }
        Value::Array(items) => items.iter_mut().for_each(redact_value),
        Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                if crate::support::logging::is_secret_name(key) && !v.is_null() {
                    *v = Value::String("[redacted]".into());
                } else {
                    redact_value(v);
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_strings_and_secret_named_properties_in_a_gzip_payload() {
        let envelopes = serde_json::json!([{
            "iKey": "ik", "name": "Microsoft.ApplicationInsights.Message",
            "data": { "baseData": {
                "message": "exchanging code=abc123 with Bearer tok.en",
                "properties": { "state": "st-1", "route": "/api/oauth/callback", "refresh_token": "rt-9" }
            }}
        }]);
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&serde_json::to_vec(&envelopes).unwrap()).unwrap();
        let out = redact_payload(&enc.finish().unwrap(), true).unwrap();
        let mut text = String::new();
        flate2::read::GzDecoder::new(&out[..]).read_to_string(&mut text).unwrap();
        for secret in ["abc123", "tok.en", "st-1", "rt-9"] {
            assert!(!text.contains(secret), "{secret} survived: {text}");
        }
        assert!(text.contains("/api/oauth/callback"), "{text}");
        assert!(text.contains(r#""iKey":"ik""#), "{text}");
    }
}

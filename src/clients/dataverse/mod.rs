//! A client for the Dataverse Web API (v9.2), as much of it as the product uses:
//! records by alternate key, conditional writes with ETags, queries with paging, and the
//! metadata calls `handler provision` makes.
//!
//! Every request carries the Web API headers (`OData-MaxVersion`, `OData-Version`,
//! `Accept`, `If-None-Match: null` on reads) and an S2S bearer token from
//! [`crate::clients::azure::TokenSource`]. Service-protection throttling (429) and transient
//! failures (502, 503, 504, lost connections) are retried, honouring `Retry-After` with
//! a capped, jittered backoff; a write is retried only where repeating it is harmless.
//! Errors name the table, the operation and Dataverse's own message.

pub mod organisations;
pub mod provision;
pub mod setup;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode};
use secrecy::ExposeSecret;
use serde_json::{Map, Value};
use url::Url;

use crate::clients::azure::TokenSource;
use crate::support::outbound::{self, Backoff, Gate};

mod types;

pub use types::{Condition, DataverseError, Delta, Key, Record};

/// Up to ten attempts; waits double from 250 ms, honour `Retry-After`, never exceed
/// 30 s, and are jittered so instances throttled together do not return together.
const MAX_ATTEMPTS: u32 = 10;
const RETRY: Backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30)).jittered();
/// The longest a request waits out a service-protection pause; past it the caller is told
/// how long the pause lasts (an HTTP caller gets a 503 with `Retry-After`).
const MAX_WAIT: Duration = Duration::from_secs(10);
/// Well under the 52 concurrent requests Dataverse allows an application user, leaving
/// room for the other instances of the app that share it.
pub const DEFAULT_CONCURRENCY: usize = 16;

pub struct Dataverse {
    /// `https://org.crm.dynamics.com/api/data/v9.2/`
    api: Url,
    http: reqwest::Client,
    tokens: Arc<dyn TokenSource>,
    /// Every request of this client passes here: a limit on concurrent requests and the
    /// pause a 429 imposes on all of them.
    gate: Gate,
    /// Requests sent (including retries), for health and the benchmarks.
    pub requests: AtomicU64,
    solution: Option<String>,
}

enum Body<'a> {
    None,
    Json(&'a Value),
}

impl Dataverse {
    /// `org_url` is the environment URL (`https://org.crm.dynamics.com`).
    pub fn new(
        org_url: &Url,
        http: reqwest::Client,
        tokens: Arc<dyn TokenSource>,
        solution: Option<String>,
    ) -> Dataverse {
        let mut api = org_url.clone();
        api.set_path("/api/data/v9.2/");
        api.set_query(None);
        Dataverse { api, http, tokens, gate: Gate::new(DEFAULT_CONCURRENCY), requests: AtomicU64::new(0), solution }
    }

    /// At most `limit` requests in flight at once (`DATAVERSE_MAX_CONCURRENCY`).
    pub fn with_concurrency(mut self, limit: usize) -> Dataverse {
        self.gate = Gate::new(limit);
        self
    }

    /// The gate's figures: (limit, most requests ever in flight at once).
    pub fn concurrency(&self) -> (usize, usize) {
        (self.gate.limit(), self.gate.peak())
    }

    pub fn api_url(&self) -> &Url {
        &self.api
    }

    /// `WhoAmI`: proves the token and the application user work.
    pub async fn who_am_i(&self) -> Result<Value, DataverseError> {
        let (_, _, body) =
            self.send("WhoAmI", Method::GET, "WhoAmI", "whoami", Body::None, HeaderMap::new(), true).await?;
        Ok(body.unwrap_or(Value::Null))
    }

    /// Reads one record; `None` when it does not exist.
    pub async fn get(&self, set: &str, key: &Key<'_>, select: &[&str]) -> Result<Option<Record>, DataverseError> {
        let mut path = format!("{set}{}", key.segment());
        if !select.is_empty() {
            path.push_str(&format!("?$select={}", select.join(",")));
        }
        let mut headers = HeaderMap::new();
        headers.insert(header::IF_NONE_MATCH, HeaderValue::from_static("null"));
        match self.send(set, Method::GET, &path, "retrieve", Body::None, headers, true).await {
            Ok((_, etag, Some(Value::Object(fields)))) => Ok(Some(Record::from_body(fields, etag))),
            Ok(_) => Ok(None),
            Err(e) if e.status() == Some(404) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes a record by key with a condition; returns the record as stored (with its
    /// new ETag). A failed condition is a [`DataverseError::Service`] with status 412
    /// (version or existence) or 404 (`Condition::Exists` on a missing record).
    pub async fn write(
        &self,
        set: &str,
        key: &Key<'_>,
        fields: &Value,
        condition: Condition<'_>,
        select: &[&str],
    ) -> Result<Record, DataverseError> {
        let mut path = format!("{set}{}", key.segment());
        if !select.is_empty() {
            path.push_str(&format!("?$select={}", select.join(",")));
        }
        let mut headers = HeaderMap::new();
        headers.insert("Prefer", HeaderValue::from_static("return=representation"));
        let operation = match condition {
            Condition::None => "upsert",
            Condition::Exists => {
                headers.insert(header::IF_MATCH, HeaderValue::from_static("*"));
                "update"
            }
            Condition::NotExists => {
                headers.insert(header::IF_NONE_MATCH, HeaderValue::from_static("*"));
                "create"
            }
            Condition::Version(etag) => {
                let v = HeaderValue::from_str(etag).map_err(|_| DataverseError::Service {
                    table: set.into(),
                    operation: "update",
                    status: 400,
                    code: String::new(),
                    message: format!("the ETag {etag:?} is not a valid header value"),
                })?;
                headers.insert(header::IF_MATCH, v);
                "update"
            }
        };
        // Conditional writes are safe to repeat: a repeat of an applied write fails its
        // condition instead of applying twice. An unconditional upsert is idempotent.
        let (_, etag, body) =
            self.send(set, Method::PATCH, &path, operation, Body::Json(fields), headers, true).await?;
        match body {
            Some(Value::Object(map)) => Ok(Record::from_body(map, etag)),
            _ => Ok(Record { fields: Map::new(), etag: etag.unwrap_or_default() }),
        }
    }

    /// Deletes a record, optionally only at a version. `Ok(false)` when it did not exist.
    pub async fn delete(&self, set: &str, key: &Key<'_>, etag: Option<&str>) -> Result<bool, DataverseError> {
        let mut headers = HeaderMap::new();
        if let Some(e) = etag.and_then(|e| HeaderValue::from_str(e).ok()) {
            headers.insert(header::IF_MATCH, e);
        }
        let path = format!("{set}{}", key.segment());
        match self.send(set, Method::DELETE, &path, "delete", Body::None, headers, true).await {
            Ok(_) => Ok(true),
            Err(e) if e.status() == Some(404) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Queries a table, following `@odata.nextLink` until `limit` records.
    /// How many rows of `set` match `filter`: Dataverse counts up to 5,000 (`$count`), so
    /// 5,000 means "5,000 or more".
    pub async fn count(&self, set: &str, filter: &str, key: &str) -> Result<u64, DataverseError> {
        let path = {
            let mut q = url::form_urlencoded::Serializer::new(String::new());
            if !filter.is_empty() {
                q.append_pair("$filter", filter);
            }
            q.append_pair("$select", key).append_pair("$top", "1").append_pair("$count", "true");
            format!("{set}?{}", q.finish())
        };
        let (_, _, body) = self.send(set, Method::GET, &path, "count", Body::None, HeaderMap::new(), true).await?;
        Ok(body.as_ref().and_then(|b| b.get("@odata.count")).and_then(Value::as_u64).unwrap_or(0))
    }

    pub async fn query(
        &self,
        set: &str,
        filter: &str,
        select: &[&str],
        orderby: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Record>, DataverseError> {
        let query = {
            let mut q = url::form_urlencoded::Serializer::new(String::new());
            if !filter.is_empty() {
                q.append_pair("$filter", filter);
            }
            if !select.is_empty() {
                q.append_pair("$select", &select.join(","));
            }
            if let Some(o) = orderby {
                q.append_pair("$orderby", o);
            }
            q.finish()
        };
        let page_size = limit.clamp(1, 5000);
        let mut next = Some(format!("{set}?{query}"));
        let mut out = Vec::new();
        while let Some(path) = next.take() {
            let mut headers = HeaderMap::new();
            headers.insert(header::IF_NONE_MATCH, HeaderValue::from_static("null"));
            if let Ok(v) = HeaderValue::from_str(&format!("odata.maxpagesize={page_size}")) {
                headers.insert("Prefer", v);
            }
            let (_, _, body) = self.send(set, Method::GET, &path, "query", Body::None, headers, true).await?;
            let Some(Value::Object(mut page)) = body else { break };
            if let Some(Value::Array(rows)) = page.remove("value") {
                for row in rows {
                    if let Value::Object(fields) = row {
                        out.push(Record::from_body(fields, None));
                    }
                }
            }
            if out.len() >= limit {
                out.truncate(limit);
                break;
            }
            next = page
                .get("@odata.nextLink")
                .and_then(Value::as_str)
                .map(|link| link.strip_prefix(self.api.as_str()).unwrap_or(link).to_string());
        }
        Ok(out)
    }

    /// Change tracking (the table must have it on): with `link` `None`, every row now and
    /// a delta link; with the last delta link, what changed since and the next link.
    /// Deleted rows come back by primary id.
    pub async fn changes(&self, set: &str, select: &[&str], link: Option<&str>) -> Result<Delta, DataverseError> {
        let mut next = Some(match link {
            Some(l) => l.strip_prefix(self.api.as_str()).unwrap_or(l).to_string(),
            None => format!("{set}?$select={}", select.join(",")),
        });
        let mut delta = Delta::default();
        while let Some(path) = next.take() {
            let mut headers = HeaderMap::new();
            headers.insert("Prefer", HeaderValue::from_static("odata.track-changes,odata.maxpagesize=5000"));
            let (_, _, body) = self.send(set, Method::GET, &path, "track changes", Body::None, headers, true).await?;
            let Some(Value::Object(mut page)) = body else { break };
            if let Some(Value::Array(rows)) = page.remove("value") {
                for row in rows {
                    let Value::Object(fields) = row else { continue };
                    let deleted = fields
                        .get("@odata.context")
                        .and_then(Value::as_str)
                        .is_some_and(|c| c.ends_with("$deletedEntity"));
                    if deleted {
                        if let Some(id) = fields.get("id").and_then(Value::as_str) {
                            delta.deleted.push(id.to_string());
                        }
                    } else {
                        delta.changed.push(Record::from_body(fields, None));
                    }
                }
            }
            let link = |name: &str| page.get(name).and_then(Value::as_str).map(str::to_string);
            match (link("@odata.nextLink"), link("@odata.deltaLink")) {
                (Some(more), _) => next = Some(more.strip_prefix(self.api.as_str()).unwrap_or(&more).to_string()),
                (None, Some(done)) => delta.link = done,
                (None, None) => {}
            }
        }
        Ok(delta)
    }

    /// A metadata or other call, for `provision`: `Ok(None)` on 404.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        what: &'static str,
    ) -> Result<Option<Value>, DataverseError> {
        let mut headers = HeaderMap::new();
        if let Some(sol) = self.solution.as_deref().and_then(|s| HeaderValue::from_str(s).ok()) {
            headers.insert("MSCRM.SolutionUniqueName", sol);
        }
        headers.insert("Consistency", HeaderValue::from_static("Strong"));
        if method == Method::PUT {
            // A metadata update replaces the definition; keep the labels in other languages.
            headers.insert("MSCRM.MergeLabels", HeaderValue::from_static("true"));
        }
        let body = match body {
            Some(b) => Body::Json(b),
            None => Body::None,
        };
        // Metadata writes are not repeated blindly: provision re-reads before retrying.
        let retry = method == Method::GET;
        match self.send("metadata", method, path, what, body, headers, retry).await {
            Ok((_, _, v)) => Ok(Some(v.unwrap_or(Value::Null))),
            Err(e) if e.status() == Some(404) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Sends one logical request with retries. Returns status, ETag header and JSON body.
    #[allow(clippy::too_many_arguments)]
    async fn send(
        &self,
        table: &str,
        method: Method,
        path: &str,
        operation: &'static str,
        body: Body<'_>,
        headers: HeaderMap,
        retry: bool,
    ) -> Result<(StatusCode, Option<String>, Option<Value>), DataverseError> {
        let url = self.api.join(path).map_err(|e| DataverseError::Unreachable {
            table: table.into(),
            operation,
            reason: format!("bad request path {path:?}: {e}"),
        })?;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let token = self.tokens.token().await.map_err(DataverseError::Token)?;
            let mut req = self
                .http
                .request(method.clone(), url.clone())
                .header(header::ACCEPT, "application/json")
                .header("OData-MaxVersion", "4.0")
                .header("OData-Version", "4.0")
                .header(header::AUTHORIZATION, format!("Bearer {}", token.expose_secret()))
                .headers(headers.clone());
            if let Body::Json(v) = &body {
                req = req.header(header::CONTENT_TYPE, "application/json; charset=utf-8").json(v);
            }
            let pass = match outbound::upstream(self.gate.enter(MAX_WAIT)).await {
                Ok(pass) => pass,
                Err(retry_after) => {
                    return Err(DataverseError::Throttled { table: table.into(), operation, retry_after });
                }
            };
            self.requests.fetch_add(1, Ordering::Relaxed);
            let outcome = outbound::upstream(outbound::send(req)).await;
            let (wait, error) = match outcome {
                Ok(resp) => {
                    let status = resp.status();
                    let etag = resp.headers().get(header::ETAG).and_then(|v| v.to_str().ok()).map(str::to_string);
                    let retry_after = outbound::retry_after(resp.headers());
                    let bytes = outbound::upstream(resp.bytes()).await.unwrap_or_default();
                    let mut retry_after = retry_after;
                    if status == StatusCode::TOO_MANY_REQUESTS {
                        // Service protection is per client: everyone waits, not only us, and
                        // the pause is set before this place is given back.
                        let asked = retry_after.unwrap_or_else(|| RETRY.delay(attempt));
                        let paused = self.gate.pause(asked);
                        if paused < asked {
                            tracing::warn!(
                                table,
                                operation,
                                retry_after_s = asked.as_secs(),
                                "Dataverse asked for a pause of {} s; pausing {} s",
                                asked.as_secs(),
                                paused.as_secs()
                            );
                        }
                        retry_after = Some(paused);
                    }
                    drop(pass);
                    if status.is_success() {
                        let json = if bytes.is_empty() { None } else { serde_json::from_slice(&bytes).ok() };
                        return Ok((status, etag, json));
                    }
                    let err = service_error(table, operation, status, &bytes);
                    if !err.is_transient() {
                        return Err(err);
                    }
                    (retry_after, err)
                }
                Err(e) => {
                    drop(pass);
                    let reason = outbound::error_text(e);
                    (None, DataverseError::Unreachable { table: table.into(), operation, reason })
                }
            };
            if !retry || attempt >= MAX_ATTEMPTS {
                return Err(error);
            }
            // A pause longer than a request waits: said now, not after the wait.
            if let Some(left) = self.gate.paused_for().filter(|left| *left > MAX_WAIT) {
                return Err(DataverseError::Throttled { table: table.into(), operation, retry_after: left });
            }
            let delay = RETRY.wait(attempt, wait).min(MAX_WAIT);
            tracing::debug!(
                table,
                operation,
                attempt,
                delay_ms = delay.as_millis() as u64,
                "Dataverse: {error}; retrying"
            );
            outbound::upstream(tokio::time::sleep(delay)).await;
        }
    }
}

fn service_error(table: &str, operation: &'static str, status: StatusCode, body: &[u8]) -> DataverseError {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let error = parsed.as_ref().and_then(|v| v.get("error"));
    let code = error.and_then(|e| e.get("code")).and_then(Value::as_str).unwrap_or("").to_string();
    let message = error
        .and_then(|e| e.get("message"))
        .or_else(|| parsed.as_ref().and_then(|v| v.get("message")))
        .and_then(Value::as_str)
        .map(|m| m.chars().take(500).collect())
        .unwrap_or_else(|| status.canonical_reason().unwrap_or("error").to_string());
    DataverseError::Service { table: table.into(), operation, status: status.as_u16(), code, message }
}

/// An OData string literal for `$filter`.
pub fn literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_literals_are_escaped() {
        assert_eq!(Key::Alternate("dc_name", "o'brien").segment(), "(dc_name='o%27%27brien')");
        assert_eq!(Key::Id("00000000-0000-0000-0000-000000000001").segment(), "(00000000-0000-0000-0000-000000000001)");
        assert_eq!(literal("it's"), "'it''s'");
    }

    #[test]
    fn errors_carry_table_operation_and_message() {
        let e = service_error(
            "dc_connections",
            "update",
            StatusCode::PRECONDITION_FAILED,
            br#"{"error":{"code":"0x80060882","message":"The version of the existing record doesn't match the RowVersion property provided."}}"#,
        );
        let text = e.to_string();
        assert!(
            text.contains("update on dc_connections") && text.contains("RowVersion") && text.contains("0x80060882"),
            "{text}"
        );
        assert!(!e.is_transient());
        assert!(service_error("t", "query", StatusCode::TOO_MANY_REQUESTS, b"").is_transient());
    }
}

//! The Azure Functions custom-handler protocol for invocations the host does not
//! forward: the `refresh` timer, whose work is [`crate::domain::sweep`].
//!
//! The host `POST`s `{"Data": {...}, "Metadata": {...}}` to `/{FunctionName}`, chunked
//! and without `Content-Length`. Plain string values arrive JSON-encoded a second time
//! (`"\"text\""`), so every string value that is itself JSON is decoded once more. The
//! reply must be `200` with a JSON content type and the shape
//! `{"Outputs": {}, "Logs": [...], "ReturnValue": null}`: a non-2xx or non-JSON reply
//! fails the invocation, and an empty body hangs it until the function timeout.

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use warp::http::StatusCode;

use super::request::parse_json;
use super::{ApiError, Request, Response, response};
use crate::app::services::{Timer, TimerRun};

/// The invocation payload the host sends.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Invocation {
    #[serde(default)]
    pub data: serde_json::Map<String, Value>,
    #[serde(default)]
    pub metadata: serde_json::Map<String, Value>,
}

/// The reply the host expects.
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct InvocationResult {
    pub outputs: serde_json::Map<String, Value>,
    pub logs: Vec<String>,
    pub return_value: Value,
}

/// The timer binding's value (`TimerInfo`).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct TimerInfo {
    #[serde(default)]
    pub is_past_due: bool,
    #[serde(default)]
    pub schedule_status: Option<ScheduleStatus>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ScheduleStatus {
    pub next: Option<String>,
    pub last: Option<String>,
}

impl Invocation {
    /// The first timer binding in `Data`, whatever its binding name.
    pub fn timer(&self) -> TimerInfo {
        self.data
            .values()
            .map(unwrap_double_encoded)
            .find_map(|v| {
                if v.get("Schedule").is_some() || v.get("IsPastDue").is_some() {
                    serde_json::from_value(v).ok()
                } else {
                    None
                }
            })
            .unwrap_or_default()
    }
}

/// Decodes a string that holds JSON (the host's second encoding); other values pass.
pub fn unwrap_double_encoded(v: &Value) -> Value {
    match v {
        Value::String(s) => match serde_json::from_str::<Value>(s) {
            Ok(inner @ (Value::Object(_) | Value::Array(_) | Value::String(_))) => inner,
            _ => v.clone(),
        },
        other => other.clone(),
    }
}

/// `POST /refresh`: runs the refresh timer's work and reports it in `Logs`.
pub async fn invoke(svc: &Timer, mut req: Request) -> Result<Response, ApiError> {
    if !may_invoke(svc.under_host, req.remote) {
        return Err(ApiError::forbidden("The timer is invoked by the Functions host, or from this machine only."));
    }
    let body = req.body_bytes().await?;
    let invocation: Invocation = parse_json(&body)?;
    let info = invocation.timer();
    let next_run = info
        .schedule_status
        .as_ref()
        .and_then(|s| s.next.as_deref())
        .and_then(|n| time::OffsetDateTime::parse(n, &time::format_description::well_known::Rfc3339).ok())
        .map(|t| t.unix_timestamp());
    let mut logs = Vec::new();
    if info.is_past_due {
        logs.push("The timer is past due; running now.".to_string());
    }
    let started = std::time::Instant::now();
    use crate::support::audit::{Actor, acting};
    let report =
        acting(Actor::timer(), crate::domain::sweep::run(svc.organisations.home(), Some(&svc.captures), next_run))
            .await;
    let (mut refreshed, mut needs_reauth, mut failed) = (report.refreshed, report.needs_reauth, report.failed);
    let mut tenants_failing = std::collections::BTreeMap::new();
    logs.extend(report.lines());
    // Each onboarded customer's organisation, a few at a time: each has its own
    // service-protection budget, so they do not slow one another.
    match svc.organisations.onboarded().await {
        Ok(scopes) => {
            let runs: Vec<_> = futures_util::stream::iter(scopes)
                .map(|(tenant, connections)| async move {
                    let run = crate::domain::sweep::run(&connections, None, next_run);
                    let actor = Actor { tenant: Some(tenant.as_str().into()), ..Actor::timer() };
                    (tenant, acting(actor, run).await)
                })
                .buffer_unordered(crate::domain::tenants::scope::TENANTS_AT_ONCE)
                .collect()
                .await;
            for (tenant, r) in runs {
                if let Some(first) = r.errors.first() {
                    tenants_failing.insert(tenant.clone(), first.clone());
                }
                refreshed += r.refreshed;
                needs_reauth += r.needs_reauth;
                failed += r.failed;
                logs.extend(r.lines().into_iter().map(|l| format!("tenant {tenant}: {l}")));
            }
        }
        Err(e) => logs.push(format!("could not list the onboarded tenants: {e}")),
    }
    crate::support::metrics::timer_run(started.elapsed().as_secs_f64());
    svc.record.record(TimerRun {
        at: crate::support::time::now(),
        ms: started.elapsed().as_millis() as u64,
        refreshed,
        needs_reauth,
        failed,
        tenants_failing,
    });
    for line in &logs {
        tracing::info!(target: "timer", "{line}");
    }
    let result = InvocationResult { outputs: serde_json::Map::new(), logs, return_value: Value::Null };
    Ok(response::json(StatusCode::OK, &result))
}

/// Under the host only the host can reach us (it binds us to 127.0.0.1); standalone, the
/// handler may listen on other addresses, and the timer answers this machine only.
fn may_invoke(under_host: bool, remote: Option<std::net::SocketAddr>) -> bool {
    under_host || remote.is_some_and(|r| r.ip().is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standalone_the_timer_answers_loopback_callers_only() {
        let from = |ip: &str| Some(std::net::SocketAddr::new(ip.parse().unwrap(), 50_000));
        assert!(may_invoke(false, from("127.0.0.1")));
        assert!(may_invoke(false, from("::1")));
        assert!(!may_invoke(false, from("192.0.2.10")));
        assert!(!may_invoke(false, None));
        assert!(may_invoke(true, from("192.0.2.10")), "under the host the host is the only caller");
    }

    #[test]
    fn reads_the_timer_whatever_its_binding_name_and_encoding() {
        let direct: Invocation = serde_json::from_str(
            r#"{"Data":{"myTimer":{"Schedule":{"AdjustForDST":true},"ScheduleStatus":null,"IsPastDue":true}},"Metadata":{}}"#,
        )
        .unwrap();
        assert!(direct.timer().is_past_due);

        let doubled: Invocation = serde_json::from_str(
            r#"{"Data":{"timer":"{\"Schedule\":{},\"ScheduleStatus\":{\"Next\":\"2026-11-22T10:05:00+00:00\"},\"IsPastDue\":false}"}}"#,
        )
        .unwrap();
        let t = doubled.timer();
        assert_eq!(t.schedule_status.unwrap().next.as_deref(), Some("2026-11-22T10:05:00+00:00"));
    }
}

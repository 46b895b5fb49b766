//! A Finance & Operations endpoint double: a custom service and a data entity that
//! record what they receive and require a bearer token, and that fail as F&O does when
//! told to: `429 Too Many Requests` with `Retry-After` in seconds (F&O's resource-based
//! service protection, learn.microsoft.com/dynamics365/fin-ops-core/dev-itpro/
//! data-entities/service-protection-api-limits), `503`, or an answer that takes its time
//! (a slow or hanging environment). Every arrival is logged with its time, accepted or
//! not, so a test can tell whether anything was sent inside a `Retry-After` window.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use warp::Filter;
use warp::http::StatusCode;

#[derive(Default)]
pub struct State {
    /// Accepted deliveries: (path, bearer token, body).
    pub received: Vec<(String, String, Value)>,
    /// Every request as it arrived: when, and the status it got.
    pub arrivals: Vec<(Instant, u16)>,
    /// Fail the next requests: status, how many, and the `Retry-After` seconds sent.
    pub fail: Option<(u16, usize, Option<u64>)>,
    /// Each answer waits this long first.
    pub delay: Duration,
    /// Requests that arrived, counted before any delay (so a hanging one counts).
    pub started: usize,
}

pub struct FnoDouble {
    pub url: String,
    pub state: Arc<Mutex<State>>,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

impl FnoDouble {
    pub async fn start() -> FnoDouble {
        let state = Arc::new(Mutex::new(State::default()));
        let s = state.clone();
        let route = warp::post()
            .and(warp::path::full())
            .and(warp::header::optional::<String>("authorization"))
            .and(warp::body::json())
            .then(move |path: warp::path::FullPath, auth: Option<String>, body: Value| {
                let s = s.clone();
                async move {
                    let delay = {
                        let mut st = s.lock().unwrap();
                        st.started += 1;
                        st.delay
                    };
                    tokio::time::sleep(delay).await;
                    answer(&s, path.as_str(), auth, body)
                }
            });
        let (url, tx) = super::serve(route).await;
        FnoDouble { url, state, _shutdown: tx }
    }

    pub fn received(&self) -> Vec<(String, String, Value)> {
        self.state.lock().unwrap().received.clone()
    }

    pub fn started(&self) -> usize {
        self.state.lock().unwrap().started
    }

    pub fn arrivals(&self) -> Vec<(Instant, u16)> {
        self.state.lock().unwrap().arrivals.clone()
    }

    /// The next `count` requests get `status`, with `Retry-After: 1` (as the double always did).
    pub fn fail_next(&self, status: u16, count: usize) {
        self.fail_next_with(status, count, Some(1));
    }

    pub fn fail_next_with(&self, status: u16, count: usize, retry_after: Option<u64>) {
        self.state.lock().unwrap().fail = Some((status, count, retry_after));
    }

    pub fn delay(&self, d: Duration) {
        self.state.lock().unwrap().delay = d;
    }
}

fn answer(s: &Mutex<State>, path: &str, auth: Option<String>, body: Value) -> warp::reply::Response {
    let mut st = s.lock().unwrap();
    let Some(token) = auth.and_then(|a| a.strip_prefix("Bearer ").map(str::to_string)) else {
        st.arrivals.push((Instant::now(), 401));
        return reply(StatusCode::UNAUTHORIZED, &json!({"error": "unauthorized"}), None);
    };
    if let Some((status, left, retry_after)) = st.fail
        && left > 0
    {
        st.fail = Some((status, left - 1, retry_after));
        st.arrivals.push((Instant::now(), status));
        let body = json!({"error": {"code": "", "message": "This request could not be processed at this time due to system experiencing high resource utilization."}});
        return reply(StatusCode::from_u16(status).unwrap(), &body, retry_after);
    }
    let created = if path.starts_with("/data/") { StatusCode::CREATED } else { StatusCode::OK };
    st.arrivals.push((Instant::now(), created.as_u16()));
    st.received.push((path.to_string(), token, body));
    reply(created, &Value::Null, None)
}

fn reply(status: StatusCode, body: &Value, retry_after: Option<u64>) -> warp::reply::Response {
    use warp::Reply;
    let mut r = warp::reply::with_status(warp::reply::json(body), status).into_response();
    if let Some(s) = retry_after {
        r.headers_mut().insert("retry-after", s.into());
    }
    r
}

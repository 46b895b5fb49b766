//! A Finance & Operations endpoint double: a custom service and a data entity that
//! record what they receive, require a bearer token, and can be made to fail
//! (429 with Retry-After as F&O throttling answers, or 503).

use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use warp::Filter;
use warp::http::StatusCode;

#[derive(Default)]
pub struct State {
    pub received: Vec<(String, String, Value)>,
    /// Fail the next requests with this status.
    pub fail: Option<(u16, usize)>,
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
            .map(move |path: warp::path::FullPath, auth: Option<String>, body: Value| {
                let mut st = s.lock().unwrap();
                let Some(token) = auth.and_then(|a| a.strip_prefix("Bearer ").map(str::to_string)) else {
                    return warp::reply::with_status(
                        warp::reply::json(&json!({"error": "unauthorized"})),
                        StatusCode::UNAUTHORIZED,
                    )
                    .into_response_with_retry(None);
                };
                if let Some((status, left)) = st.fail
                    && left > 0
                {
                    st.fail = Some((status, left - 1));
                    let code = StatusCode::from_u16(status).unwrap();
                    let body = json!({"error": {"code": "", "message": "Too many requests"}});
                    return warp::reply::with_status(warp::reply::json(&body), code).into_response_with_retry(Some(1));
                }
                st.received.push((path.as_str().to_string(), token, body));
                let created = if path.as_str().starts_with("/data/") { StatusCode::CREATED } else { StatusCode::OK };
                warp::reply::with_status(warp::reply::json(&Value::Null), created).into_response_with_retry(None)
            });
        let (url, tx) = super::serve(route).await;
        FnoDouble { url, state, _shutdown: tx }
    }

    pub fn received(&self) -> Vec<(String, String, Value)> {
        self.state.lock().unwrap().received.clone()
    }

    pub fn fail_next(&self, status: u16, count: usize) {
        self.state.lock().unwrap().fail = Some((status, count));
    }
}

trait RetryAfter {
    fn into_response_with_retry(self, secs: Option<u64>) -> warp::reply::Response;
}

impl<T: warp::Reply> RetryAfter for T {
    fn into_response_with_retry(self, secs: Option<u64>) -> warp::reply::Response {
        let mut r = self.into_response();
        if let Some(s) = secs {
            r.headers_mut().insert("retry-after", s.into());
        }
        r
    }
}

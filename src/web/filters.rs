//! The routes as warp filters, built from the one route table ([`ROUTES`], which also
//! writes the Swagger document): each template becomes a chain of warp's path filters
//! (`warp::path` for a literal segment, `param` for `{id}`, `tail` for `{*path}`, `end`
//! otherwise), tried in the table's order. A path that several templates match goes to
//! the first whose methods include the request's (`/api/connections/import` is `POST`
//! only; a `GET` on it reads a connection named "import"). Nothing is rejected to warp:
//! a path no template matches, or matches without the method, is answered by
//! [`super::server`] (`404`, or `405` with `Allow`), so the two cannot answer differently.
//!
//! The request itself is taken apart once, by [`request`], into the handlers' [`Request`]:
//! the body stays a stream, read later under the limits.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Buf;
use futures_util::StreamExt;
use warp::filters::BoxedFilter;
use warp::http::Method;
use warp::{Filter, Rejection};

use super::request::{BodyStream, Request};
use super::routes::{ROUTES, Route};
use crate::support::config::Limits;

/// The TCP peer, put on each request by the connection loop.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

/// A route the request's path and method matched, with its path parameters (still
/// percent-encoded as received; the first is the id).
#[derive(Debug, Clone)]
pub struct Matched {
    pub route: &'static Route,
    pub params: Vec<String>,
}

/// Every route of the table, in its order, each its own warp filter; `None` when no
/// route takes this path with this method.
pub fn routes() -> BoxedFilter<(Option<Matched>,)> {
    let mut all: Option<BoxedFilter<(Option<Matched>,)>> = None;
    for route in ROUTES {
        let one = route_filter(route);
        all = Some(match all {
            None => one,
            Some(before) => before.or(one).unify().boxed(),
        });
    }
    let unmatched = warp::any().map(|| None);
    match all {
        Some(all) => all.or(unmatched).unify().boxed(),
        None => unmatched.boxed(),
    }
}

/// One route: its template as warp path filters, then its methods.
fn route_filter(route: &'static Route) -> BoxedFilter<(Option<Matched>,)> {
    path_filter(route.template)
        .and(warp::method())
        .and_then(move |params: Vec<String>, method: Method| async move {
            if route.allows(method.as_str()) {
                Ok(Some(Matched { route, params }))
            } else {
                Err(warp::reject::not_found())
            }
        })
        .boxed()
}

/// A template as warp's path filters, extracting its parameters in order.
fn path_filter(template: &'static str) -> BoxedFilter<(Vec<String>,)> {
    let mut chain = warp::any().map(Vec::new).boxed();
    let mut open_ended = false;
    for segment in template.split('/').filter(|s| !s.is_empty()) {
        chain = if segment.starts_with("{*") {
            open_ended = true;
            chain
                .and(warp::path::tail())
                .map(|mut v: Vec<String>, tail: warp::path::Tail| {
                    v.push(tail.as_str().to_string());
                    v
                })
                .boxed()
        } else if segment.starts_with('{') {
            // As received: warp's `param` does not decode (the router decodes ids once).
            chain
                .and(warp::path::param::<String>())
                .map(|mut v: Vec<String>, p: String| {
                    v.push(p);
                    v
                })
                .boxed()
        } else {
            chain.and(warp::path(segment)).boxed()
        };
        if open_ended {
            break;
        }
    }
    if open_ended { chain } else { chain.and(warp::path::end()).boxed() }
}

/// The request's body as the handlers' stream of bytes, not read yet.
fn body_stream() -> impl Filter<Extract = (BodyStream,), Error = Rejection> + Clone {
    warp::body::stream().map(boxed_body)
}

fn boxed_body<S, B>(body: S) -> BodyStream
where
    S: futures_util::Stream<Item = Result<B, warp::Error>> + Send + Sync + 'static,
    B: Buf,
{
    Box::pin(body.map(|chunk| chunk.map(|mut b| b.copy_to_bytes(b.remaining())).map_err(Into::into)))
}

/// The handlers' view of the request: method, path as received, raw query, headers,
/// the peer, and the body as a stream under `limits`.
pub fn request(limits: Arc<Limits>) -> impl Filter<Extract = (Request,), Error = Rejection> + Clone {
    warp::method()
        .and(warp::path::full())
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(warp::header::headers_cloned())
        .and(warp::ext::optional::<Peer>())
        .and(body_stream())
        .map(move |method: Method, path: warp::path::FullPath, query: String, headers, peer: Option<Peer>, body| {
            let query = Some(query).filter(|q| !q.is_empty());
            let mut req = Request::new(method, path.as_str().to_string(), query, headers, body, &limits);
            req.remote = peer.map(|Peer(addr)| addr);
            req
        })
}

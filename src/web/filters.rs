//! The routes as a warp filter, built from the one route table ([`ROUTES`], which also
//! writes the Swagger document): each template is matched as warp's path filters would
//! match it (`warp::path` for a literal segment, `param` for `{id}`, `tail` for `{*path}`,
//! `end` otherwise), in the table's order. A path that several templates match goes to
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

/// The route of the table this request takes, with its path parameters; `None` when no
/// route takes this path with this method.
///
/// One filter walks the table ([`route_for`]) instead of one warp filter chain per route
/// tried in turn: the chains (28 routes, a boxed filter per segment) allocated a future
/// for each segment of each route tried before the one that matched, 6 % of the proxy's
/// cycles in `perf`. The matching is warp's own, segment for segment (the test below
/// holds the two to the same answers).
pub fn routes() -> impl Filter<Extract = (Option<Matched>,), Error = std::convert::Infallible> + Clone {
    warp::path::full()
        .and(warp::method())
        .map(|path: warp::path::FullPath, method: Method| route_for(path.as_str(), &method))
}

/// The first route whose template matches `path` and whose methods include `method`.
pub fn route_for(path: &str, method: &Method) -> Option<Matched> {
    // The path walked once, each template then comparing slices: walking it again for each
    // template tried was most of what matching cost.
    let walk = Walk::of(path);
    TEMPLATES.iter().find_map(|(route, parts)| {
        let params = walk.matches(parts)?;
        route.allows(method.as_str()).then_some(Matched { route, params })
    })
}

/// A path as received (still percent-encoded), walked as warp's path filters walk it: the
/// segment at each step and what remains after it (past the slash that ends it, as warp's
/// `set_unmatched_path` does).
struct Walk<'a> {
    /// `(segment, rest after it)` for each step while something remained.
    steps: [(&'a str, &'a str); WALK_STEPS],
    /// What remained before the first step: the path without its leading slash.
    first: &'a str,
    len: usize,
}

/// The most steps a walk takes: at least as many as the longest template has parts (a test
/// checks), so no template looks past them.
const WALK_STEPS: usize = 12;

impl<'a> Walk<'a> {
    fn of(path: &'a str) -> Walk<'a> {
        let first = path.strip_prefix('/').unwrap_or(path);
        let mut walk = Walk { steps: [("", ""); WALK_STEPS], first, len: 0 };
        let mut rest = first;
        while !rest.is_empty() && walk.len < WALK_STEPS {
            let segment = rest.split('/').next().unwrap_or_default();
            rest = rest.get(segment.len() + 1..).unwrap_or_default();
            walk.steps[walk.len] = (segment, rest);
            walk.len += 1;
        }
        walk
    }

    /// What remained before step `i` (nothing, past the end of a path walked to its end).
    fn rest_before(&self, i: usize) -> &'a str {
        match i {
            0 => self.first,
            i if i <= self.len => self.steps[i - 1].1,
            _ => "",
        }
    }

    /// A template against the path, as warp's path filters match it: a literal segment
    /// equals the path's next segment, `{id}` takes a non-empty one, `{*path}` takes
    /// whatever remains (possibly nothing), and otherwise nothing may remain but one
    /// trailing slash. Returns the parameters, as received. They stay slices of the path
    /// until the whole template matched: most templates tried fail after taking an id.
    fn matches(&self, parts: &[Part]) -> Option<Vec<String>> {
        let mut taken: [&str; MAX_PARAMS] = [""; MAX_PARAMS];
        let mut count = 0;
        for (i, part) in parts.iter().enumerate() {
            let segment = if i < self.len { self.steps[i].0 } else { "" };
            match part {
                Part::Tail => {
                    *taken.get_mut(count)? = self.rest_before(i);
                    return Some(taken[..=count].iter().map(|p| p.to_string()).collect());
                }
                Part::Param if segment.is_empty() => return None,
                Part::Param => {
                    *taken.get_mut(count)? = segment;
                    count += 1;
                }
                Part::Literal(literal) if segment != *literal => return None,
                Part::Literal(_) => {}
            }
        }
        self.rest_before(parts.len()).is_empty().then(|| taken[..count].iter().map(|p| p.to_string()).collect())
    }
}

/// One segment of a route's template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Literal(&'static str),
    /// `{id}`: one non-empty segment.
    Param,
    /// `{*path}`: whatever remains.
    Tail,
}

/// The route table's templates taken apart once, in the table's order.
static TEMPLATES: std::sync::LazyLock<Vec<(&'static Route, Vec<Part>)>> =
    std::sync::LazyLock::new(|| ROUTES.iter().map(|route| (route, parts(route.template))).collect());

fn parts(template: &'static str) -> Vec<Part> {
    let mut out = Vec::new();
    for part in template.split('/').filter(|s| !s.is_empty()) {
        if part.starts_with("{*") {
            out.push(Part::Tail);
            break;
        }
        out.push(if part.starts_with('{') { Part::Param } else { Part::Literal(part) });
    }
    out
}

/// The most parameters a template has (checked by a test over the route table).
const MAX_PARAMS: usize = 4;

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

#[cfg(test)]
mod tests {
    use super::*;
    use warp::filters::BoxedFilter;

    /// warp's own path filters for a template, as the routes were built before: the
    /// reference [`Walk::matches`] is held to.
    fn warp_chain(template: &'static str) -> BoxedFilter<(Vec<String>,)> {
        let mut chain = warp::any().map(Vec::new).boxed();
        for segment in template.split('/').filter(|s| !s.is_empty()) {
            if segment.starts_with("{*") {
                return chain
                    .and(warp::path::tail())
                    .map(|mut v: Vec<String>, tail: warp::path::Tail| {
                        v.push(tail.as_str().to_string());
                        v
                    })
                    .boxed();
            }
            chain = if segment.starts_with('{') {
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
        }
        chain.and(warp::path::end()).boxed()
    }

    #[tokio::test]
    async fn every_template_matches_as_warps_path_filters_do() {
        for (route, parts) in TEMPLATES.iter() {
            let params = parts.iter().filter(|p| !matches!(p, Part::Literal(_))).count();
            assert!(params <= MAX_PARAMS, "{} has {params} parameters, more than MAX_PARAMS", route.template);
            assert!(parts.len() <= WALK_STEPS, "{} has more parts than a walk takes steps", route.template);
        }
        let paths = [
            "/",
            // Longer than a walk goes: the templates look no further than its steps.
            "/api/connections/c/proxy/a/b/c/d/e/f/g/h/i/j/k",
            "/api/connections/c/proxy/a/b/c/d/e/f/g/h/",
            "//",
            "/refresh",
            "/refresh/",
            "/refresh//",
            "/api",
            "/api/",
            "/api/health",
            "/api/health/",
            "/api//health",
            "/api/health/x",
            "/api/connections",
            "/api/connections/",
            "/api/connections//",
            "/api/connections/import",
            "/api/connections/abc",
            "/api/connections/abc/",
            "/api/connections/a%2Fb",
            "/api/connections/%20/token",
            "/api/connections//token",
            "/api/connections/abc/token",
            "/api/connections/abc/token/",
            "/api/connections/abc/token/x",
            "/api/connections/abc/proxy",
            "/api/connections/abc/proxy/",
            "/api/connections/abc/proxy//",
            "/api/connections/abc/proxy/items/42",
            "/api/connections/abc/proxy/a/../b",
            "/api/connections/abc/proxy//evil.example/x",
            "/api/connections/proxy/proxy/items",
            "/api/connections/abc/call/invoices%2F123",
            "/api/portal/connections/c/proxy/items/",
            "/api/mcp",
            "/api/mcp/.well-known/oauth-protected-resource",
            "/.well-known/oauth-protected-resource/api/mcp",
            "/api/tenants/t1/check",
            "/api/oauth/callback",
            "/API/health",
            "/api/h%C3%A9alth",
        ];
        for route in ROUTES {
            let chain = warp_chain(route.template);
            for path in paths {
                let by_warp = warp::test::request().path(path).filter(&chain).await.ok();
                let template = parts(route.template);
                assert_eq!(Walk::of(path).matches(&template), by_warp, "{} against {path}", route.template);
            }
        }
    }

    #[test]
    fn the_first_route_with_the_method_wins() {
        let post = route_for("/api/connections/import", &Method::POST).unwrap();
        assert_eq!(post.route.template, "/api/connections/import");
        let get = route_for("/api/connections/import", &Method::GET).unwrap();
        assert_eq!((get.route.template, get.params), ("/api/connections/{id}", vec!["import".to_string()]));
        assert!(route_for("/api/connections/abc/token", &Method::GET).is_none(), "token is POST only");
        assert!(route_for("/nowhere", &Method::GET).is_none());
    }
}

//! The route table: every path the handler serves, the methods each accepts, who calls
//! it, and what each operation does. The router matches requests against it and the
//! OpenAPI document ([`super::openapi`]) is written from it, so the two cannot drift.

use super::error::Audience;

/// Who sees an operation in a Power Platform custom connector's designer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Visibility {
    /// Shown first.
    Important,
    /// Shown under "advanced".
    Normal,
    /// Not offered as an action (browser redirects, the host's own calls).
    Internal,
}

/// A query parameter of an operation.
#[derive(Debug, Clone, Copy)]
pub struct Query {
    pub name: &'static str,
    pub summary: &'static str,
    pub kind: &'static str,
}

/// One method on one route.
#[derive(Debug, Clone, Copy)]
pub struct Op {
    pub method: &'static str,
    /// Stable and unique: a connector's action name.
    pub operation_id: &'static str,
    pub summary: &'static str,
    pub description: &'static str,
    pub visibility: Visibility,
    /// The request body's definition (in [`super::openapi`]), if it takes JSON.
    pub body: Option<&'static str>,
    /// The success status and its body's definition.
    pub ok: (u16, Option<&'static str>),
    pub query: &'static [Query],
}

#[derive(Debug, Clone, Copy)]
pub struct Route {
    /// `/api/connections/{id}`; `{*path}` takes the rest of the path.
    pub template: &'static str,
    pub audience: Audience,
    /// Needs a back-office bearer token.
    pub back_office: bool,
    pub ops: &'static [Op],
}

impl Route {
    pub fn methods(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.ops.iter().map(|o| o.method)
    }

    pub fn allows(&self, method: &str) -> bool {
        self.methods().any(|m| m == method || (method == "HEAD" && m == "GET"))
    }

    /// The path parameters when `segments` match this template.
    pub fn matches<'a>(&self, segments: &[&'a str]) -> Option<Vec<&'a str>> {
        let parts: Vec<&str> = self.template.split('/').filter(|s| !s.is_empty()).collect();
        let mut params = Vec::new();
        for (i, part) in parts.iter().enumerate() {
            if part.starts_with("{*") {
                return Some(params);
            }
            let seg = segments.get(i)?;
            if part.starts_with('{') {
                params.push(*seg);
            } else if part != seg {
                return None;
            }
        }
        (segments.len() == parts.len()).then_some(params)
    }
}

// The table's row builders: an operation with the defaults, then one change each.

const fn op(method: &'static str, operation_id: &'static str, summary: &'static str, description: &'static str) -> Op {
    Op {
        method,
        operation_id,
        summary,
        description,
        visibility: Visibility::Normal,
        body: None,
        ok: (200, None),
        query: &[],
    }
}

const fn internal(op: Op) -> Op {
    Op { visibility: Visibility::Internal, ..op }
}

const fn important(op: Op) -> Op {
    Op { visibility: Visibility::Important, ..op }
}

const fn body(op: Op, definition: &'static str) -> Op {
    Op { body: Some(definition), ..op }
}

const fn ok(op: Op, status: u16, definition: Option<&'static str>) -> Op {
    Op { ok: (status, definition), ..op }
}

const fn query(op: Op, query: &'static [Query]) -> Op {
    Op { query, ..op }
}

mod table;

pub use table::ROUTES;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_match_their_own_paths_only() {
        let r = ROUTES.iter().find(|r| r.template == "/api/connections/{id}/proxy/{*path}").unwrap();
        assert_eq!(r.matches(&["api", "connections", "a", "proxy", "x", "y"]), Some(vec!["a"]));
        assert_eq!(r.matches(&["api", "connections", "a", "proxy"]), Some(vec!["a"]));
        assert_eq!(r.matches(&["api", "connections", "a"]), None);
        let item = ROUTES.iter().find(|r| r.template == "/api/connections/{id}").unwrap();
        assert_eq!(item.matches(&["api", "connections", "a", "token"]), None);
    }

    #[test]
    fn operation_ids_are_unique() {
        let mut ids: Vec<&str> = ROUTES.iter().flat_map(|r| r.ops.iter().map(|o| o.operation_id)).collect();
        let n = ids.len();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), n);
    }
}

//! The web layer, on top: the server and router, one handler file per audience, the
//! request and response view types, and the one place where a domain error becomes an
//! HTTP answer ([`mapping`]). Nothing below imports from here.
//!
//! - [`back_office`]: `/api/connections`, for Dynamics and scripts (bearer tokens);
//! - [`captures`]: `/api/captures`, capture mode's read side;
//! - [`callback`]: `/api/oauth/callback`, the fixed redirect URI a person's browser hits;
//! - [`binding`]: `/api/oauth/bind`, where a portal popup proves it is the page's own;
//! - [`portal`]: `/api/portal/...`, for Power Pages users across origins;
//! - [`proxy`]: the provider API proxy both of the above use;
//! - [`tenants`]: `/api/tenants` and `/api/oauth/consent`, onboarding other organisations;
//! - [`health`] and [`timer`]: `/api/health`, and `/refresh`, the host's timer invocation.

pub mod back_office;
pub mod binding;
pub mod callback;
pub mod captures;
pub mod cors;
pub mod error;
pub mod filters;
pub mod health;
pub mod html;
mod mapping;
pub mod mcp;
pub mod openapi;
pub mod portal;
pub mod proxy;
pub mod request;
pub mod response;
mod router;
pub mod routes;
mod server;
pub mod tenants;
pub mod timer;
pub mod views;

pub use error::{ApiError, Audience};
pub use request::Request;
pub use response::Response;
pub use server::{bind, filter, handle, serve};

//! The web layer's behaviour: the OAuth flow against a real provider, the attacker's
//! requests, the portal companion, the Swagger document, operations, capture mode towards
//! F&O and customer tenants, through the built binary as the host runs it; and the
//! in-process tier ([`in_process`]): the app built from a test's settings and served on
//! port 0 inside this process.

#[path = "../support/mod.rs"]
mod support;

mod fno_capture;
mod hardening;
mod in_process;
mod mcp;
mod oauth_flow;
mod openapi;
mod operations;
mod portal;
mod tenants;

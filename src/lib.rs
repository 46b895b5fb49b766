//! Dynamics Companion: an Azure Functions custom handler that gives Dynamics 365 a fixed
//! OAuth redirect URI, keeps the resulting tokens encrypted and fresh, and hands Dynamics
//! a valid access token (or makes the call for it).
//!
//! The folders are the layers, top to bottom; a module imports only from its own layer
//! or below:
//! - [`cli`]: the command line and its sub-commands (`check`, `provision`, `reseal`, ...);
//! - [`web`]: the HTTP server and its routes, one handler file per audience, the wire
//!   types, and the one place where a domain error becomes an HTTP answer;
//! - [`app`]: the composition root, which builds every long-lived part once from the
//!   configuration, and the background loops;
//! - [`domain`]: the model (connections, captures, tenants), the ports it needs (the
//!   store, the provider's token endpoint, the clock), and the rules: connections,
//!   captures, tenants, the portal, the timer's sweep, the provider catalog;
//! - [`clients`]: what implements the ports or talks outward: the stores (SQLite,
//!   Dataverse), Dataverse, F&O, Key Vault, Azure identities, bearer verification,
//!   webhooks, telemetry, the provider's token endpoint;
//! - [`support`]: leaves: the pooled HTTPS client, the one cache, back-off, sealing and
//!   state signing, typed configuration, logging, time.

pub mod app;
pub mod cli;
pub mod clients;
pub mod domain;
pub mod support;
pub mod web;

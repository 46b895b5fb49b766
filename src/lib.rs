//! Dynamics Companion: an Azure Functions custom handler that gives Dynamics 365 a fixed
//! OAuth redirect URI, keeps the resulting tokens encrypted and fresh, and hands Dynamics
//! a valid access token (or makes the call for it).
//!
//! The modules follow the product's boundaries:
//! - [`config`]: every setting, parsed once into typed structs.
//! - [`host`]: the Azure Functions custom-handler protocol (port, readiness, payloads).
//! - [`http`]: the HTTP server, the router and the one error model callers see.
//! - [`oauth`]: the provider catalog and the RFC 6749/7636/7009/9207 client.
//! - [`connections`]: the connection lifecycle, refresh single-flight and the token cache.
//! - [`store`]: where connections and captures live (embedded SQLite by default, Dataverse once deployed).
//! - [`dataverse`]: the Dataverse Web API client and `handler provision`.
//! - [`azure`]: which Azure identity the handler uses, and its cached tokens.
//! - [`crypto`]: AES-256-GCM sealing of tokens and the signed `state` parameter.
//! - [`auth`]: bearer-token verification for the back-office API.
//! - [`secrets`]: named secrets, resolved from Key Vault (or the settings).
//! - [`portal`]: the portal companion API, for Power Pages users.

pub mod app;
pub mod auth;
pub mod azure;
pub mod check;
pub mod cli;
pub mod config;
pub mod connections;
pub mod crypto;
pub mod dataverse;
pub mod fno;
pub mod health;
pub mod host;
pub mod http;
pub mod logging;
pub mod oauth;
pub mod portal;
pub mod secrets;
pub mod store;
pub mod time;

//! Dynamics Companion: an Azure Functions custom handler that gives Dynamics 365 a fixed
//! OAuth redirect URI, keeps the resulting tokens encrypted and fresh, and hands Dynamics
//! a valid access token (or makes the call for it).
//!
//! The modules are layers; a module imports only from its own layer or below:
//! - front ends: [`cli`] (the command line, [`check`]) and [`web`] (the HTTP server, the
//!   router, every route handler, the wire types and the HTTP form of every error);
//! - [`app`]: the composition root, which builds every long-lived part once;
//! - the domain: [`connections`] (lifecycle, authorization, the refresh state machine),
//!   [`captures`], [`sweep`] (the timer's work), [`oauth`] (the catalog, the token
//!   endpoint seam, secret types) and [`portal`] (who a portal user is);
//! - persistence and Azure clients: [`store`], [`dataverse`], [`fno`], [`secrets`],
//!   [`azure`], [`auth`], [`notify`], [`telemetry`] (the Application Insights export);
//! - leaves: [`outbound`] (the pooled HTTPS client, a traced span per call, upstream timing,
//!   back-off, the cache), [`trace_context`],
//!   [`crypto`], [`config`], [`logging`], [`time`], [`throttle`], [`window`].

pub mod app;
pub mod auth;
pub mod azure;
pub mod captures;
pub mod check;
pub mod cli;
pub mod config;
pub mod connections;
pub mod crypto;
pub mod dataverse;
pub mod fno;
pub mod logging;
pub mod notify;
pub mod oauth;
pub mod outbound;
pub mod portal;
pub mod secrets;
pub mod store;
pub mod sweep;
pub mod telemetry;
pub mod tenants;
pub mod throttle;
pub mod time;
pub mod trace_context;
pub mod web;
pub mod window;

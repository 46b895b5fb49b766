//! What talks to the world outside the process, and implements the domain's ports:
//! the stores, Dataverse and its provisioning, Finance & Operations, Key Vault, Azure
//! identities, bearer-token verification, webhooks, telemetry, and the providers' token
//! endpoints.

pub mod auth;
pub mod azure;
pub mod dataverse;
pub mod entra;
pub mod fno;
pub mod provider;
pub mod secrets;
pub mod store;
pub mod telemetry;
pub mod webhooks;

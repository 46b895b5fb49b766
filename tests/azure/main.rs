//! Against doubles of Microsoft's services as they document themselves: Dataverse as
//! the store (and its limits), Key Vault, Application Insights ingestion, the store
//! contract on both stores, scale.

#[path = "../support/mod.rs"]
mod support;

mod dataverse_flow;
mod keyvault;
mod scale;
mod store_contract;
mod telemetry;

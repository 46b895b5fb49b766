//! The domain: what the product is about, independent of HTTP and of any one store.
//!
//! - the model and the store's ports ([`store`], [`tenant`]): records, their ids and
//!   versions, and what a store must do (re-exported here: `domain::Connection`,
//!   `domain::Store`);
//! - [`connections`]: authorize, refresh (single-flight across instances), import,
//!   reseal;
//! - [`captures`]: capture mode, exactly once per state;
//! - [`tenants`]: customer tenants of a multi-tenant deployment (consent, sign-in);
//! - [`portal`]: who a portal user is;
//! - [`sweep`]: the timer's work over one organisation;
//! - [`oauth`]: the provider catalog, presets and the OAuth vocabulary.

pub mod captures;
pub mod connections;
pub mod ids;
pub mod model;
pub mod oauth;
pub mod portal;
pub mod store;
pub mod sweep;
pub mod tenant;
pub mod tenants;

pub use model::*;
pub use store::*;
pub use tenant::{Tenant, TenantStatus};

//! What the connection rules tell the outside world: a connection's status changed.
//!
//! Every status change passes through [`super::Connections::modify`] (or a deletion), so
//! the event is raised there, once per change that was actually stored. Who listens is
//! the app's choice (a signed webhook, see `crate::clients::webhooks`); the rules only say what
//! happened, and never wait for the listener.

use crate::domain::Status;

/// One stored status change. `to: None` is a deletion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusChange {
    pub connection_id: String,
    /// The customer tenant whose organisation keeps it; `None` for the deployment's own.
    pub tenant: Option<String>,
    pub provider: String,
    pub owner: Option<String>,
    pub from: Option<Status>,
    pub to: Option<Status>,
    /// The provider's message, for `needs_reauth` and `failed`.
    pub detail: Option<String>,
    /// Unix seconds.
    pub at: i64,
}

pub trait Events: Send + Sync {
    /// Called after the change is stored; must not block.
    fn status_changed(&self, change: StatusChange);
}

/// No listener.
pub struct NoEvents;

impl Events for NoEvents {
    fn status_changed(&self, _: StatusChange) {}
}

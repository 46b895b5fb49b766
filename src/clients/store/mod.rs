//! The stores: the embedded SQLite file (the default) and Dataverse tables (deployed).
//! Both implement [`crate::domain::Store`] with the same concurrency rule.

pub mod dataverse;
pub mod sqlite;

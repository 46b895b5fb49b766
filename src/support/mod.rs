//! Leaves every layer may use: nothing here imports from above.

pub mod audit;
pub mod cache;
pub mod config;
pub mod counters;
pub mod crypto;
pub mod logging;
pub mod metrics;
pub mod outbound;
pub mod throttle;
pub mod time;
pub mod trace_context;

//! What is about the process: the host's protocol and modes, start-up, the one-command
//! demo, the deployable package.

#[path = "../support/mod.rs"]
mod support;

mod demo;
mod host_protocol;
mod package;

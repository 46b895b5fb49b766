//! What only a browser decides, in headless Chromium.

#[path = "../support/mod.rs"]
mod support;

mod portal_browser;

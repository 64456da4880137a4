//! End-to-end tests: the real `keyward` binary on an ephemeral port with a temporary SQLite
//! file (or a fresh PostgreSQL database), spoken to over HTTP.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail loudly"
)]

mod bad_input;
mod cli;
mod gateway;
mod harness;
mod lifecycle;
mod limits;
// The store tests' fresh-database helper, shared rather than copied.
#[path = "../../../keyward-store/tests/it/pg.rs"]
mod pg;
mod postgres;
mod redis;
mod secrets;
mod serve;
mod tokens;
mod upstream;
mod verification;

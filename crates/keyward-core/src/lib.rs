//! keyward's domain logic: everything that decides, nothing that does I/O.
//!
//! - [`key_format`]: generating, parsing and hashing API key secrets.
//! - [`key`]: the API key record, its state, and the authorisation policy.
//! - [`ip`]: IP allow/block rules.
//! - [`errors`]: the one table of error codes (code → type → HTTP status).
//! - [`clock`]: time as a parameter.
//! - [`ids`]: prefixed ULID identifiers.

pub mod clock;
pub mod errors;
pub mod ids;
pub mod ip;
pub mod key;
pub mod key_format;
pub mod path;
pub mod ratelimit;

pub use clock::{Clock, SystemClock, Timestamp};
pub use errors::ErrorCode;

//! Load tests for distkv on top of Goose.
//!
//! The scenario logic (key choice, request mix, values, thresholds) lives in small pure
//! modules so it can be unit-tested without a server; `attack` and `prefill` do the I/O.

pub mod attack;
pub mod duration;
pub mod keys;
pub mod prefill;
pub mod scenario;
pub mod summary;
pub mod thresholds;

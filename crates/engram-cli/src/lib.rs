//! The `engram` command and the in-process cluster it runs.
//!
//! [`cluster`] starts all four services in one process on bound listeners; `engram up` and the
//! test sandbox both use it, so what tests exercise is what a developer runs.

pub mod cluster;

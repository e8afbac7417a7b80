//! The `engram` command and the in-process cluster it runs.
//!
//! [`cluster`] starts all four services in one process on bound listeners, and [`redis`] runs a
//! local `redis-server`; `engram up` and the test sandbox both use them, so what tests exercise
//! is what a developer runs.

pub mod cluster;
pub mod eval;
pub mod redis;

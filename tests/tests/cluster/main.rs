//! Cluster tests: all four services in this process over real gRPC (see `engram_tests::Sandbox`).
//! One test binary with a module per area, so the large binary is linked once.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod adversarial;
mod conversation;
mod embedding;
mod gateway;
mod ingestion;
mod loadtest;
mod operations;
mod retrieval;
mod spine;

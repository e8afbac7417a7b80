//! How engram's services run and reach each other: the gRPC server runtime (health,
//! reflection, the server-side layers, the admin port, draining), the gRPC adapters and
//! clients of the internal contracts in `engram_domain::api`, balanced peer channels,
//! deadlines, and the settings every service shares.
//!
//! A call between services: a caller holds an `Arc<dyn engram_domain::api::Index>` (say) that
//! is an [`rpc::IndexClient`] over a [`peers`] channel; the peer's [`rpc`] server adapter
//! validates the request again, calls its implementation, and converts the answer back.

pub mod cluster_auth;
pub mod config;
pub mod deadline;
pub mod peers;
pub mod rpc;
pub mod server;
pub mod session;
pub mod writes;

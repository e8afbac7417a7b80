//! engram's domain: what a memory is, how requests are validated and bounded, the one error
//! type and its gRPC status mapping, the contracts between the services, and the runtime every
//! service is served with.
//!
//! A request's path through this crate: the gateway's tonic handler hands the wire message to
//! [`validate`], which returns a domain request or an INVALID_ARGUMENT naming the field; the
//! handler calls a service contract from [`api`] through a client from [`rpc`]; the peer's
//! [`rpc`] server adapter validates again, calls its implementation, and [`convert`]s the
//! domain answer back to the wire.

pub mod api;
pub mod calendar;
pub mod config;
pub mod convert;
pub mod deadline;
pub mod entities;
pub mod error;
pub mod limits;
pub mod model;
pub mod peers;
pub mod privacy;
pub mod rpc;
pub mod server;
pub mod validate;

pub use error::{Error, Result};
pub use limits::Limits;

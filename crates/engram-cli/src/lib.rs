//! The `engram` command and the in-process cluster it runs.
//!
//! [`cluster`] starts all four services in one process on bound listeners, and [`redis`] runs a
//! local `redis-server`; `engram up` and the test sandbox both use them, so what tests exercise
//! is what a developer runs.

use engram_proto::tonic::service::interceptor::InterceptedService;
use engram_proto::tonic::transport::Channel;
use engram_proto::v1::memory_service_client::MemoryServiceClient;

pub mod cluster;
pub mod crossval;
pub mod eval;
pub mod loadtest;
pub mod redis;
pub mod stats;

/// A client of the public API that sends the caller's API key (if it has one).
pub type Client = MemoryServiceClient<InterceptedService<Channel, engram_runtime::rpc::BearerKey>>;

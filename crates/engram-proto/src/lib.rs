//! engram's gRPC API: the public `engram.v1` contract served by the gateway and the
//! `engram.internal.v1` service-to-service contract, compiled by `build.rs` from `proto/`.
//!
//! Re-exports `tonic` and `prost` so every crate of the workspace uses the versions the stubs
//! were generated with.

pub use prost;
pub use prost_types;
pub use tonic;

/// The public API (`proto/engram/v1`).
#[allow(clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("engram.v1");
}

/// The service-to-service API (`proto/engram/internal/v1`).
pub mod internal {
    #[allow(clippy::all, clippy::pedantic)]
    pub mod v1 {
        tonic::include_proto!("engram.internal.v1");
    }
}

/// Encoded `FileDescriptorSet` of every engram proto and the files they import, for gRPC
/// server reflection of the internal services.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("engram_descriptor");

/// Encoded `FileDescriptorSet` of the public API (`engram/v1`) and the files it imports: what
/// the gateway's reflection serves.
pub const PUBLIC_FILE_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("engram_public_descriptor");

//! Generated code for tokenfab's wire contract. The documentation of every message and
//! field lives in `proto/tokenfab/v1/*.proto`; this crate holds generated code only.

#![allow(clippy::all, missing_docs)]

/// `tokenfab.v1`: the batch (tenant), agent and SLA services.
pub mod v1 {
    tonic::include_proto!("tokenfab.v1");

    /// Encoded `FileDescriptorSet` of every tokenfab proto, for gRPC server reflection
    /// (so `grpcurl` works without the `.proto` files).
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("tokenfab_descriptor");
}

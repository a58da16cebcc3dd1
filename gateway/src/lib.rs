//! The brewmesh gateway: REST/JSON to gRPC, driven by the `google.api.http`
//! options in `proto/`.
//!
//! Not built yet: it is the subject of its own issue. The descriptor set it will
//! read is already produced by the root `build.rs` as
//! [`brewmesh::FILE_DESCRIPTOR_SET`], with the http options kept.

/// The encoded descriptor set the gateway will transcode from.
pub use brewmesh::FILE_DESCRIPTOR_SET;

//! brewmesh's contracts: the Rust code generated from `proto/` and the
//! encoded descriptor set, as `build.rs` makes them.
//!
//! # Layout
//!
//! - [`pb`]: the generated messages, clients and servers, one module per
//!   proto package.
//! - [`validate`]: the request rules written in the protos
//!   (`(brewmesh.validate.v1.rules)`), checked by a `Validate` impl that
//!   build.rs generates for each message with rules.
//! - [`FILE_DESCRIPTOR_SET`]: the encoded descriptors (with their
//!   `google.api.http` options) that reflection and the gateway read.
//! - [`SERVICE_CONFIG`]: the retry and hedging policies of brewmesh's
//!   clients, as a gRPC service config.
//!
//! What every process does with them — serving, discovery, telemetry — is
//! in `brewmesh-runtime` (`runtime/`); the services (`services/*`) and the
//! gateway build on both, and the `brewmesh` binary (`cli/`) wires flags to
//! them. ARCHITECTURE.md has the map.

pub mod pb;
pub mod validate;

/// The generated `Validate` impls (an int64 field goes through the same
/// `i64::from` as an int32 one).
#[allow(missing_docs, clippy::useless_conversion)]
mod rules {
    include!(concat!(env!("OUT_DIR"), "/validate_rules.rs"));
}

/// The encoded `google.protobuf.FileDescriptorSet` of every proto in
/// `proto/` and its imports, with source info and custom options kept.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/brewmesh_descriptor.bin"));

/// brewmesh's gRPC service config (gRFC A6 `methodConfig`s): the retry and
/// hedging policies every brewmesh client applies, where a method's
/// `idempotency_level` allows it (`brewmesh-runtime`'s
/// `discovery::policy`).
pub const SERVICE_CONFIG: &str = include_str!("../proto/service_config.json");

//! The brewmesh registry: which instances exist and whether they are healthy.
//!
//! Only the contract exists so far (`proto/brewmesh/registry/v1/registry.proto`,
//! generated into [`brewmesh::pb::registry::v1`]); the service itself is the
//! subject of its own issue. Until it lands, peers are given by flags.

pub use brewmesh::pb::registry::v1 as pb;

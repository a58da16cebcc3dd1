//! Code generated from `proto/` by the root `build.rs`, one module per
//! protobuf package. Nothing else in the workspace includes generated code.

#![allow(missing_docs, clippy::all)]

/// `brewmesh.*` packages.
pub mod brewmesh {
    /// `brewmesh.payment.*`.
    pub mod payment {
        /// `brewmesh.payment.v1`: the payments ledger.
        pub mod v1 {
            tonic::include_proto!("brewmesh.payment.v1");
        }
    }
    /// `brewmesh.barista.*`.
    pub mod barista {
        /// `brewmesh.barista.v1`: orders and the brewing stations.
        pub mod v1 {
            tonic::include_proto!("brewmesh.barista.v1");
        }
    }
    /// `brewmesh.station.*`.
    pub mod station {
        /// `brewmesh.station.v1`: the espresso and milk stations.
        pub mod v1 {
            tonic::include_proto!("brewmesh.station.v1");
        }
    }
    /// `brewmesh.validate.*`.
    pub mod validate {
        /// `brewmesh.validate.v1`: the request rules written beside the fields.
        pub mod v1 {
            tonic::include_proto!("brewmesh.validate.v1");
        }
    }
    /// `brewmesh.registry.*`.
    pub mod registry {
        /// `brewmesh.registry.v1`: registration and discovery.
        pub mod v1 {
            tonic::include_proto!("brewmesh.registry.v1");
        }
    }
}

/// `google.*` packages that are not well-known types.
pub mod google {
    /// `google.api`: the http annotations.
    pub mod api {
        tonic::include_proto!("google.api");
    }
    /// `google.rpc`: the status a batch entry fails with, and its details.
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
}

pub use brewmesh::{barista, payment, registry, station};

//! Mutual TLS between brewmesh processes, with an identity per role.
//!
//! Every process holds one certificate, issued by the mesh's CA, whose URI
//! SAN names its role the SPIFFE way: `spiffe://brewmesh.local/payment`.
//! Its directory is laid out as cert-manager writes a Secret (`tls.crt`,
//! `tls.key`, `ca.crt`); [`MeshTls`] reads it and reads it again, with no
//! restart, when those files change (checked at every new connection,
//! so a rotation reaches the next handshake; a half-written set is not
//! taken and the last good one stays).
//!
//! - A server ([`serve`]) takes TLS and answers the RPCs of the peers its
//!   [`Access`] allows: no certificate is UNAUTHENTICATED, a role the
//!   contract does not name is PERMISSION_DENIED, and a certificate from
//!   another CA fails the handshake. A plaintext connection is still
//!   accepted for `grpc.health.v1` and `/metrics` only — what a kubelet's
//!   probe and a Prometheus scrape send.
//! - A client ([`crate::client`]) presents its certificate and takes a
//!   server whose chain leads to the mesh's CA and that carries a brewmesh
//!   identity; the name it was dialled by is not checked, since peers are
//!   found by address (from the registry), as in Linkerd.
//!
//! The process's identity is installed once, at start ([`install`]); a
//! process with none speaks plaintext (`--insecure`, and the in-process
//! tests).
mod access;
mod connect;
mod identity;
mod issue;
mod material;
mod serve;

use std::path::PathBuf;

pub use access::{Access, AccessLayer};
pub use connect::Connector;
pub use identity::{Identity, TRUST_DOMAIN, role, role_of_service};
pub use issue::{Authority, IssueError};
pub use material::{MeshTls, TlsError, install, installed};
pub(crate) use serve::incoming;
pub use serve::{Conn, Peer};

/// The flags every process takes for its identity.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// This instance's certificate, key and the mesh's CA, as cert-manager
    /// writes a Secret: `tls.crt`, `tls.key` and `ca.crt` in one directory.
    /// Read again when the files change, without a restart.
    #[arg(long, global = true, env = "BREWMESH_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,

    /// Plaintext gRPC with no peer identities: anyone who reaches a port
    /// may call it. For debugging only; logged as a warning at start.
    #[arg(long, global = true, conflicts_with = "tls_dir")]
    pub insecure: bool,
}

/// The peer's identity on the connection a request came over, if it
/// presented one.
pub fn peer_identity<T>(request: &tonic::Request<T>) -> Option<&Identity> {
    request
        .extensions()
        .get::<Peer>()
        .and_then(|peer| peer.identity.as_ref())
}

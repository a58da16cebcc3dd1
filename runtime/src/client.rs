//! gRPC channels to one peer known by address, and the connection settings
//! every brewmesh client uses: with this process's identity installed
//! ([`crate::mtls::install`]) every connection is mutual TLS.

use std::sync::Arc;
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use crate::mtls::Connector;

/// A peer address that is not a valid URI authority.
#[derive(Debug, thiserror::Error)]
#[error("invalid peer address {address:?}")]
pub struct InvalidAddress {
    address: String,
    #[source]
    source: tonic::transport::Error,
}

/// A lazily connecting channel to one peer (`host:port` or a full
/// `http://` URI). To balance over several, or to follow the registry or
/// DNS, use [`crate::discovery::balanced`].
///
/// Must be called inside a Tokio runtime.
pub fn channel(address: &str) -> Result<Channel, InvalidAddress> {
    Ok(connect_lazy(&endpoint(address)?))
}

/// A lazily connecting channel to `endpoint`: mutual TLS when this process
/// has an identity, plaintext when not. Every brewmesh channel is made
/// here or by [`connect`].
pub fn connect_lazy(endpoint: &Endpoint) -> Channel {
    match crate::mtls::installed() {
        Some(tls) => endpoint.connect_with_connector_lazy(Connector::new(Arc::clone(tls))),
        None => endpoint.connect_lazy(),
    }
}

/// [`connect_lazy`], connected before it returns.
pub async fn connect(endpoint: &Endpoint) -> Result<Channel, tonic::transport::Error> {
    match crate::mtls::installed() {
        Some(tls) => {
            endpoint
                .connect_with_connector(Connector::new(Arc::clone(tls)))
                .await
        }
        None => endpoint.connect().await,
    }
}

/// The endpoint for one peer address (`host:port` or a full URI), with the
/// connection settings every brewmesh client uses.
pub fn endpoint(address: &str) -> Result<Endpoint, InvalidAddress> {
    let uri = if address.contains("://") {
        address.to_owned()
    } else {
        format!("http://{address}")
    };
    Endpoint::from_shared(uri)
        .map(|e| {
            e.connect_timeout(Duration::from_secs(2))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(30))
                .keep_alive_while_idle(true)
        })
        .map_err(|source| InvalidAddress {
            address: address.to_owned(),
            source,
        })
}

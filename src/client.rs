//! gRPC channels to peers known by address.
//!
//! Until discovery through the registry lands, peers are given by flags: one
//! address, or several that the channel balances over.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

/// A peer address that is not a valid URI authority.
#[derive(Debug, thiserror::Error)]
#[error("invalid peer address {address:?}")]
pub struct InvalidAddress {
    address: String,
    #[source]
    source: tonic::transport::Error,
}

/// A lazily connecting channel to `addresses` (`host:port`, or full
/// `http://` URIs), balanced when there are several.
///
/// Must be called inside a Tokio runtime.
pub fn channel(addresses: &[String]) -> Result<Channel, InvalidAddress> {
    let mut endpoints = addresses
        .iter()
        .map(|address| endpoint(address))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(match endpoints.len() {
        1 => endpoints.remove(0).connect_lazy(),
        _ => Channel::balance_list(endpoints.into_iter()),
    })
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

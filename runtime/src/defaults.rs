//! Where each role listens when no flag says otherwise (one machine, the
//! README's ports): the one place these addresses are written.

use brewmesh::pb::barista::v1::barista_server;
use brewmesh::pb::payment::v1::payments_server;
use brewmesh::pb::registry::v1::registry_server;
use brewmesh::pb::station::v1::{espresso_server, milk_server};

/// The registry's default address.
pub const REGISTRY_ADDR: &str = "127.0.0.1:50051";
/// The payment service's default address.
pub const PAYMENT_ADDR: &str = "127.0.0.1:50052";
/// The barista service's default address.
pub const BARISTA_ADDR: &str = "127.0.0.1:50053";
/// An espresso station's default address.
pub const ESPRESSO_ADDR: &str = "127.0.0.1:50054";
/// A milk station's default address.
pub const MILK_ADDR: &str = "127.0.0.1:50055";
/// The gateway's default address.
pub const GATEWAY_ADDR: &str = "127.0.0.1:8080";

/// The default address of the brewmesh gRPC service named `service`
/// (`brewmesh.payment.v1.Payments`), if it is one.
pub fn service_addr(service: &str) -> Option<&'static str> {
    match service {
        registry_server::SERVICE_NAME => Some(REGISTRY_ADDR),
        payments_server::SERVICE_NAME => Some(PAYMENT_ADDR),
        barista_server::SERVICE_NAME => Some(BARISTA_ADDR),
        espresso_server::SERVICE_NAME => Some(ESPRESSO_ADDR),
        milk_server::SERVICE_NAME => Some(MILK_ADDR),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_brewmesh_service_has_its_default_address() {
        assert_eq!(
            service_addr("brewmesh.payment.v1.Payments"),
            Some(PAYMENT_ADDR)
        );
        assert_eq!(
            service_addr("brewmesh.barista.v1.Barista"),
            Some(BARISTA_ADDR)
        );
        assert_eq!(
            service_addr("brewmesh.registry.v1.Registry"),
            Some(REGISTRY_ADDR)
        );
        assert_eq!(service_addr("echo.v1.Echo"), None);
    }
}

//! Who a workload is: its role, as a SPIFFE ID in its certificate.

use std::sync::Arc;

/// The SPIFFE trust domain of every brewmesh identity.
pub const TRUST_DOMAIN: &str = "brewmesh.local";

/// The roles of the mesh: one per process kind, and the operator's (the
/// CLI's `load` and `audit`, grpcurl).
pub mod role {
    /// The registry.
    pub const REGISTRY: &str = "registry";
    /// The ledger.
    pub const PAYMENT: &str = "payment";
    /// Orders and their sagas.
    pub const BARISTA: &str = "barista";
    /// A brewing station (espresso or milk).
    pub const STATION: &str = "station";
    /// The REST and browser edge.
    pub const GATEWAY: &str = "gateway";
    /// A person or tool operating the mesh.
    pub const OPERATOR: &str = "operator";
}

/// A workload's identity: its role in the mesh.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    role: Arc<str>,
}

impl Identity {
    /// The identity of `role` (`payment`, `barista`, `registry`,
    /// `gateway`, `operator`), if it is a valid path segment.
    pub fn of_role(role: &str) -> Option<Identity> {
        let valid = !role.is_empty()
            && role.len() <= 64
            && role
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        valid.then(|| Identity { role: role.into() })
    }

    /// The role, e.g. `payment`.
    pub fn role(&self) -> &str {
        &self.role
    }

    /// The SPIFFE ID, e.g. `spiffe://brewmesh.local/payment`.
    pub fn uri(&self) -> String {
        format!("spiffe://{TRUST_DOMAIN}/{}", self.role)
    }

    /// The brewmesh identity in a certificate's URI SANs, if it has one.
    pub fn of_certificate(der: &[u8]) -> Option<Identity> {
        let (_, certificate) = x509_parser::parse_x509_certificate(der).ok()?;
        let names = certificate.subject_alternative_name().ok()??;
        let prefix = format!("spiffe://{TRUST_DOMAIN}/");
        names
            .value
            .general_names
            .iter()
            .find_map(|name| match name {
                x509_parser::extensions::GeneralName::URI(uri) => {
                    Identity::of_role(uri.strip_prefix(prefix.as_str())?)
                }
                _ => None,
            })
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "spiffe://{TRUST_DOMAIN}/{}", self.role)
    }
}

/// The role a service name belongs to: `brewmesh.payment.v1.Payments` is
/// `payment`'s. What a registry lets an identity register.
pub fn role_of_service(service: &str) -> Option<&str> {
    let mut parts = service.split('.');
    (parts.next() == Some("brewmesh"))
        .then(|| parts.next())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_path_segments() {
        assert!(Identity::of_role("payment").is_some());
        assert!(Identity::of_role("barista-2").is_some());
        for bad in ["", "Payment", "a/b", "a.b", &"x".repeat(65)] {
            assert!(Identity::of_role(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn a_service_belongs_to_the_role_its_package_names() {
        assert_eq!(
            role_of_service("brewmesh.payment.v1.Payments"),
            Some("payment")
        );
        assert_eq!(role_of_service("grpc.health.v1.Health"), None);
        assert_eq!(role_of_service("brewmesh"), None);
    }
}

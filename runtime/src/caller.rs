//! Who a request is for: the end user the gateway authenticated, passed
//! upstream as metadata, or the calling service itself.
//!
//! The gateway checks a client's token and sends its subject and scopes
//! as [`SUBJECT`] and [`SCOPES`]; it drops those keys from whatever a
//! client sends, so they only ever carry what it verified. A service
//! believes them only from the gateway: over mutual TLS, from a peer whose
//! certificate names the gateway's role; a process with no identity of its
//! own (`--insecure`) has no way to tell, and takes them as they come.

use crate::mtls::{self, role};

/// The end user's subject (a JWT's `sub`).
pub const SUBJECT: &str = "x-brewmesh-subject";

/// The end user's scopes, space-separated (a JWT's `scope`).
pub const SCOPES: &str = "x-brewmesh-scopes";

/// Whether `name` (an HTTP header or a metadata key, lower case) is one
/// only the gateway may set.
pub fn reserved(name: &str) -> bool {
    name == SUBJECT || name == SCOPES
}

/// The scopes the gateway's routes ask for.
pub mod scope {
    /// Place orders; read, watch and cancel one's own.
    pub const ORDERS: &str = "orders";
    /// Read, watch and cancel everyone's orders: staff.
    pub const ALL_ORDERS: &str = "orders:all";
    /// Read payments, capture, refund and void them: staff.
    pub const PAYMENTS: &str = "payments";
    /// Read and change the registry: operators.
    pub const REGISTRY: &str = "registry";
}

/// Whom a request acts for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A service of the mesh, or an operator, calling for itself: not
    /// limited to anyone's orders.
    Service,
    /// An end user, as the gateway vouched for them.
    User {
        /// Their subject.
        subject: String,
        /// Their scopes.
        scopes: Vec<String>,
    },
}

impl Caller {
    /// The caller of `request`, as [the module](self) says.
    pub fn of<T>(request: &tonic::Request<T>) -> Caller {
        let vouched = match mtls::peer_identity(request) {
            Some(identity) => identity.role() == role::GATEWAY,
            None => mtls::installed().is_none(),
        };
        Caller::vouched_for(request, vouched)
    }

    /// The end user of `request` only if the gateway's certificate vouches
    /// for them, `--insecure` or not: for what a user may do that a
    /// service may not (the registry's writes, where a service shows its
    /// token instead).
    pub fn proven<T>(request: &tonic::Request<T>) -> Caller {
        let vouched =
            mtls::peer_identity(request).is_some_and(|identity| identity.role() == role::GATEWAY);
        Caller::vouched_for(request, vouched)
    }

    fn vouched_for<T>(request: &tonic::Request<T>, vouched: bool) -> Caller {
        let metadata = request.metadata();
        let Some(subject) = metadata.get(SUBJECT).and_then(|v| v.to_str().ok()) else {
            return Caller::Service;
        };
        if !vouched {
            return Caller::Service;
        }
        let scopes = metadata
            .get(SCOPES)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .split_ascii_whitespace()
            .map(str::to_owned)
            .collect();
        Caller::User {
            subject: subject.to_owned(),
            scopes,
        }
    }

    /// The subject whose orders alone this caller may see, or `None` when
    /// it may see all (a service, or a user with [`scope::ALL_ORDERS`]).
    pub fn confined_to(&self) -> Option<&str> {
        match self {
            Caller::Service => None,
            Caller::User { subject, scopes } => {
                (!scopes.iter().any(|s| s == scope::ALL_ORDERS)).then_some(subject.as_str())
            }
        }
    }

    /// Whether it is an end user holding `wanted`.
    pub fn has_scope(&self, wanted: &str) -> bool {
        match self {
            Caller::Service => false,
            Caller::User { scopes, .. } => scopes.iter().any(|s| s == wanted),
        }
    }

    /// The end user's subject, if there is one.
    pub fn subject(&self) -> Option<&str> {
        match self {
            Caller::Service => None,
            Caller::User { subject, .. } => Some(subject),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(subject: Option<&str>, scopes: &str) -> tonic::Request<()> {
        let mut request = tonic::Request::new(());
        if let Some(subject) = subject {
            request
                .metadata_mut()
                .insert(SUBJECT, subject.parse().unwrap());
            request
                .metadata_mut()
                .insert(SCOPES, scopes.parse().unwrap());
        }
        request
    }

    #[test]
    fn a_user_is_confined_to_their_orders_unless_staff() {
        // No identity installed in unit tests: the metadata is taken.
        let customer = Caller::of(&request(Some("ada"), "orders"));
        assert_eq!(customer.confined_to(), Some("ada"));
        let staff = Caller::of(&request(Some("bob"), "orders orders:all"));
        assert_eq!(staff.confined_to(), None);
        assert_eq!(staff.subject(), Some("bob"));
        let service = Caller::of(&request(None, ""));
        assert_eq!(service, Caller::Service);
        assert_eq!(service.confined_to(), None);
    }

    #[test]
    fn another_role_than_the_gateway_is_not_believed() {
        let mut request = request(Some("ada"), "orders");
        request.extensions_mut().insert(mtls::Peer {
            addr: "127.0.0.1:1".parse().unwrap(),
            identity: mtls::Identity::of_role(role::BARISTA),
        });
        assert_eq!(Caller::of(&request), Caller::Service);
        request.extensions_mut().insert(mtls::Peer {
            addr: "127.0.0.1:1".parse().unwrap(),
            identity: mtls::Identity::of_role(role::GATEWAY),
        });
        assert_eq!(Caller::of(&request).confined_to(), Some("ada"));
        assert_eq!(Caller::proven(&request).subject(), Some("ada"));
    }

    #[test]
    fn only_the_gateways_certificate_proves_a_user() {
        let plain = request(Some("ada"), "registry");
        assert!(Caller::of(&plain).has_scope("registry"));
        assert_eq!(Caller::proven(&plain), Caller::Service);
    }
}

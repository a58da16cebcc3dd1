//! Who may call what: each service names the roles its contract lets in,
//! and [`AccessLayer`] refuses every other caller before the call starts.
//!
//! - `grpc.health.v1.Health`: anyone, on TLS or plaintext (probes).
//! - Anything else needs a certificate from the mesh's CA:
//!   UNAUTHENTICATED without one.
//! - Reflection: any mesh identity.
//! - The rest: the roles [`Access::allow`] names for that service or
//!   method, PERMISSION_DENIED for any other (and for a service with no
//!   rule: nothing is open by default).
//!
//! `/metrics` and `/admin/*` are not RPCs and pass (the admin routes check
//! the registry token themselves).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::Code;
use tonic::body::Body;

use super::identity::{Identity, TRUST_DOMAIN};
use super::serve::Peer;

#[derive(Debug, Clone)]
struct Rule {
    /// `package.Service` or `package.Service/Method`.
    target: String,
    roles: Vec<String>,
}

/// The roles each service (or method) lets in.
#[derive(Debug, Clone, Default)]
pub struct Access {
    rules: Arc<Vec<Rule>>,
}

impl Access {
    /// Nothing but health and reflection.
    pub fn new() -> Access {
        Access::default()
    }

    /// Lets `roles` call `target`: every method of a `package.Service`, or
    /// one `package.Service/Method` (which then takes precedence over its
    /// service's rule).
    pub fn allow(self, target: &str, roles: &[&str]) -> Access {
        let mut rules = Arc::unwrap_or_clone(self.rules);
        rules.push(Rule {
            target: target.to_owned(),
            roles: roles.iter().map(|r| (*r).to_owned()).collect(),
        });
        Access {
            rules: Arc::new(rules),
        }
    }

    /// Whether `identity` (none: no certificate) may call `path`
    /// (`/package.Service/Method`).
    pub fn check(&self, path: &str, identity: Option<&Identity>) -> Result<(), tonic::Status> {
        let rpc = path.trim_start_matches('/');
        let (service, _) = rpc.split_once('/').unwrap_or((rpc, ""));
        if service == "grpc.health.v1.Health" {
            return Ok(());
        }
        let Some(identity) = identity else {
            return Err(refusal(
                Code::Unauthenticated,
                format!(
                    "{rpc} needs mutual TLS: present a certificate for \
                     spiffe://{TRUST_DOMAIN}/<role> from the mesh's CA \
                     (`brewmesh up` writes them under its data directory, in tls/)"
                ),
                "CERTIFICATE_REQUIRED",
                None,
            ));
        };
        if service.starts_with("grpc.reflection.") {
            return Ok(());
        }
        let rule = self
            .rules
            .iter()
            .find(|r| r.target == rpc)
            .or_else(|| self.rules.iter().find(|r| r.target == service));
        match rule {
            Some(rule) if rule.roles.iter().any(|r| r == identity.role()) => Ok(()),
            Some(rule) => Err(refusal(
                Code::PermissionDenied,
                format!(
                    "{identity} may not call {rpc}; its callers are {}",
                    rule.roles.join(", ")
                ),
                "ROLE_NOT_ALLOWED",
                Some(identity),
            )),
            None => Err(refusal(
                Code::PermissionDenied,
                format!("{identity} may not call {rpc}: no role may"),
                "ROLE_NOT_ALLOWED",
                Some(identity),
            )),
        }
    }
}

/// A refusal with its `ErrorInfo` (reason, domain, and the caller).
fn refusal(
    code: Code,
    message: String,
    reason: &str,
    identity: Option<&Identity>,
) -> tonic::Status {
    let metadata: std::collections::HashMap<String, String> = identity
        .map(|i| [("identity".to_owned(), i.uri())].into_iter().collect())
        .unwrap_or_default();
    let details = tonic_types::ErrorDetails::with_error_info(reason, TRUST_DOMAIN, metadata);
    use tonic_types::StatusExt as _;
    tonic::Status::with_error_details(code, message, details)
}

/// Checks every RPC against an [`Access`] (see the module); with `None`
/// every call passes (a plaintext server has no identities to check).
#[derive(Debug, Clone)]
pub struct AccessLayer(pub Option<Access>);

impl<S> tower::Layer<S> for AccessLayer {
    type Service = Guarded<S>;

    fn layer(&self, inner: S) -> Guarded<S> {
        Guarded {
            inner,
            access: self.0.clone(),
        }
    }
}

/// See [`AccessLayer`].
#[derive(Debug, Clone)]
pub struct Guarded<S> {
    inner: S,
    access: Option<Access>,
}

impl<S, B> tower::Service<http::Request<B>> for Guarded<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let path = request.uri().path();
        let Some(access) = &self.access else {
            return Box::pin(self.inner.call(request));
        };
        if path == "/metrics" || path.starts_with("/admin/") {
            return Box::pin(self.inner.call(request));
        }
        let identity = request
            .extensions()
            .get::<Peer>()
            .and_then(|p| p.identity.as_ref());
        match access.check(path, identity) {
            Ok(()) => Box::pin(self.inner.call(request)),
            Err(status) => Box::pin(async move { Ok(status.into_http()) }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn role(name: &str) -> Identity {
        Identity::of_role(name).unwrap()
    }

    #[test]
    fn each_caller_gets_what_its_rule_says() {
        let access = Access::new()
            .allow("brewmesh.payment.v1.Payments", &["barista", "operator"])
            .allow("brewmesh.payment.v1.Payments/GetPayment", &["gateway"]);
        let capture = "/brewmesh.payment.v1.Payments/Capture";
        assert!(access.check(capture, Some(&role("barista"))).is_ok());
        let denied = access.check(capture, Some(&role("gateway"))).unwrap_err();
        assert_eq!(denied.code(), Code::PermissionDenied);
        assert!(denied.message().contains("spiffe://brewmesh.local/gateway"));
        // A method's rule replaces its service's.
        let get = "/brewmesh.payment.v1.Payments/GetPayment";
        assert!(access.check(get, Some(&role("gateway"))).is_ok());
        assert!(access.check(get, Some(&role("barista"))).is_err());
        let anonymous = access.check(capture, None).unwrap_err();
        assert_eq!(anonymous.code(), Code::Unauthenticated);
    }

    #[test]
    fn health_is_open_reflection_takes_any_identity_and_the_rest_is_closed() {
        let access = Access::new();
        assert!(access.check("/grpc.health.v1.Health/Check", None).is_ok());
        let reflection = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo";
        assert!(access.check(reflection, None).is_err());
        assert!(access.check(reflection, Some(&role("operator"))).is_ok());
        let other = access
            .check(
                "/brewmesh.barista.v1.Barista/PlaceOrder",
                Some(&role("operator")),
            )
            .unwrap_err();
        assert_eq!(other.code(), Code::PermissionDenied);
    }
}

//! What the request path reads, built once at start: the descriptors, the
//! route table, a balanced channel per service, the cache, and the OpenAPI
//! document; and why building it can fail.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use brewmesh_runtime::discovery::policy::{self, Policies};
use brewmesh_runtime::discovery::{Balanced, Balancing, Source};
use brewmesh_runtime::health::HealthStatuses;
use bytes::Bytes;
use prost_reflect::DescriptorPool;
use tokio_util::sync::CancellationToken;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::config::Config;
use crate::errors::GatewayError;
use crate::routes::{self, Matched, MethodSettings, Route};
use crate::{cache, descriptors, openapi};

/// Why the gateway could not start or stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Descriptors could not be loaded.
    #[error(transparent)]
    Descriptors(#[from] descriptors::DescriptorError),
    /// The http rules do not form a route table.
    #[error(transparent)]
    Routes(#[from] routes::RouteError),
    /// The methods' retry policies could not be read from the descriptors.
    #[error("the retry and hedging policies: {0}")]
    Policies(String),
    /// The gateway's own reflection could not be built.
    #[error("reflection over the descriptors: {0}")]
    Reflection(#[from] prost_reflect::DescriptorError),
    /// A service has no backend.
    #[error("no backend for {0}: pass --backend {0}=host:port, --reflect or --registry")]
    NoBackend(String),
    /// A backend address is invalid.
    #[error(transparent)]
    Address(#[from] brewmesh_runtime::client::InvalidAddress),
    /// The shared cache is configured but cannot be reached.
    #[error(transparent)]
    Cache(#[from] cache::SharedError),
    /// The `--jwks` file cannot be read.
    #[error(transparent)]
    Keys(#[from] crate::auth::KeysError),
    /// The listener failed.
    #[error("serving HTTP")]
    Serve(#[from] std::io::Error),
}

/// Everything the request path reads; built once at start.
#[derive(Debug)]
pub struct Gateway {
    pub(crate) pool: DescriptorPool,
    /// How each answer's message is written as JSON, when a plan can.
    pub(crate) plans: Arc<crate::jsonplan::Plans>,
    pub(crate) routes: HashMap<http::Method, Vec<Arc<Route>>>,
    pub(crate) upstreams: BTreeMap<String, Balanced>,
    pub(crate) timeout: Duration,
    pub(crate) stream_timeout: Duration,
    pub(crate) max_body_bytes: usize,
    /// The rate limits and the in-flight cap.
    pub(crate) admission: crate::admission::Admission,
    /// How long a request's whole body may take to arrive.
    pub(crate) body_timeout: Duration,
    /// Below this, nothing is compressed.
    pub(crate) compress_min_bytes: u16,
    pub(crate) cache: cache::Store,
    pub(crate) openapi: Bytes,
    /// Each registry replica, for `/mesh` to check and scrape.
    pub(crate) registries: Vec<(String, tonic::transport::Channel)>,
    pub(crate) scraper: crate::scrape::Scraper,
    /// Where this gateway listens, once it does.
    pub(crate) address: std::sync::OnceLock<std::net::SocketAddr>,
    /// What the web page is told (`/web/config.json`).
    pub(crate) web: crate::config::PageConfig,
    /// The gateway's own gRPC services: health and reflection.
    pub(crate) local: tonic::service::Routes,
    /// The statuses its health service reports.
    pub(crate) health: HealthStatuses,
    /// Cancelled when the drain starts (health watchers hear of it).
    pub(crate) draining: CancellationToken,
    /// Which other origins may call it from a browser.
    pub(crate) cors: crate::cors::Cors,
    /// Who the clients are, and what they may call.
    pub(crate) auth: crate::auth::Auth,
}

impl Gateway {
    /// The balanced channel of `service`, once an instance of it is known:
    /// a second for the first to be found (just after start), else `None`.
    pub(crate) async fn known_upstream(&self, service: &str) -> Option<&Balanced> {
        let upstream = self.upstreams.get(service)?;
        upstream
            .known(Duration::from_secs(1))
            .await
            .then_some(upstream)
    }

    /// Loads the descriptors, builds the routes and the upstream channels.
    /// Must be called inside a Tokio runtime.
    pub async fn build(config: &Config) -> Result<Self, RunError> {
        let mut pool = DescriptorPool::new();
        // Always loaded: google.rpc types make error details readable.
        descriptors::add_set(&mut pool, brewmesh::FILE_DESCRIPTOR_SET, "brewmesh")?;
        // Health and reflection, which the gateway serves itself.
        brewmesh_runtime::reflection::add_own(&mut pool)?;
        let mut services: Vec<String> = Vec::new();
        if !config.no_builtin {
            services.extend(
                pool.services()
                    .map(|s| s.full_name().to_owned())
                    // The stations are internal: only the barista calls them.
                    .filter(|s| s.starts_with("brewmesh.") && !s.starts_with("brewmesh.station.")),
            );
        }
        for path in &config.descriptor_sets {
            let before: Vec<String> = pool.services().map(|s| s.full_name().to_owned()).collect();
            descriptors::add_file(&mut pool, path)?;
            services.extend(
                pool.services()
                    .map(|s| s.full_name().to_owned())
                    .filter(|s| !before.contains(s)),
            );
        }
        let mut reflected: Vec<(String, String)> = Vec::new();
        for address in &config.reflect {
            for service in descriptors::add_reflected(&mut pool, address).await? {
                reflected.push((service.clone(), address.clone()));
                services.push(service);
            }
        }
        services.sort();
        services.dedup();

        let settings = MethodSettings {
            created: config.created.clone(),
            cached: config.cached.clone(),
        };
        let table = routes::build(&pool, &services, &settings)?;

        let methods = {
            use prost::Message as _;
            let set = prost_types::FileDescriptorSet {
                file: pool.file_descriptor_protos().cloned().collect(),
            };
            policy::methods_of(&set.encode_to_vec())
                .map_err(|e| RunError::Policies(format!("the descriptors do not decode: {e}")))?
        };
        let mut upstreams = BTreeMap::new();
        for service in &services {
            let given: &[String] = match config.backends.iter().find(|(s, _)| s == service) {
                Some((_, addresses)) => addresses,
                None => match reflected.iter().find(|(s, _)| s == service) {
                    Some((_, address)) => std::slice::from_ref(address),
                    None => &[],
                },
            };
            let source = Source::pick(service, given, None, &config.registries)
                .ok_or_else(|| RunError::NoBackend(service.clone()))?;
            // brewmesh's retry and hedging policies, for every method the
            // gateway knows (reflected ones too), where its
            // idempotency_level allows them.
            let policies = Policies::new(
                policy::brewmesh_config(),
                &methods,
                policy::default_budget(),
            );
            upstreams.insert(
                service.clone(),
                brewmesh_runtime::discovery::balanced_with(source, Balancing::P2c, policies)?,
            );
        }

        // JSON plans for every answer the backends give.
        let outputs: Vec<String> = (services.iter())
            .filter_map(|s| pool.get_service_by_name(s))
            .flat_map(|s| {
                s.methods()
                    .map(|m| m.output().full_name().to_owned())
                    .collect::<Vec<_>>()
            })
            .collect();
        let plans = Arc::new(crate::jsonplan::Plans::build(
            &pool,
            outputs.iter().map(String::as_str),
        ));

        let health = HealthStatuses::new();
        health.set("", ServingStatus::Serving);
        let draining = CancellationToken::new();
        let names: Vec<&str> = services.iter().map(String::as_str).collect();
        let (reflection, reflection_alpha) =
            brewmesh_runtime::reflection::over_pool(pool.clone(), &names)?;
        let local = tonic::service::Routes::new(health.service(draining.clone()))
            .add_service(reflection)
            .add_service(reflection_alpha);

        let cache = match &config.redis_url {
            Some(url) => {
                cache::Store::Shared(cache::Shared::connect(url, config.redis_ca.as_deref()).await?)
            }
            None => cache::Store::Local(cache::Cache::new(config.cache_entries)),
        };
        let auth = match &config.jwks {
            Some(jwks) => crate::auth::Auth::new(crate::auth::AuthConfig {
                jwks: jwks.clone(),
                issuer: config.jwt_issuer.clone(),
                audience: config.jwt_audience.clone(),
                leeway: config.jwt_leeway,
            })?,
            None => crate::auth::Auth::off(),
        };
        let openapi = openapi::document(&pool, &table, config.stream_timeout, auth.on());
        let openapi = Bytes::from(openapi.to_string());
        let mut routes: HashMap<http::Method, Vec<Arc<Route>>> = HashMap::new();
        for route in table {
            routes
                .entry(route.method.clone())
                .or_default()
                .push(Arc::new(route));
        }
        Ok(Self {
            pool,
            plans,
            routes,
            upstreams,
            timeout: config.timeout,
            stream_timeout: config.stream_timeout,
            max_body_bytes: config.max_body_bytes,
            body_timeout: config.body_timeout,
            admission: crate::admission::Admission::new(
                config.rate_limit,
                config.rate_burst,
                config.max_in_flight,
                config.max_held_bytes,
            ),
            compress_min_bytes: config.compress_min_bytes,
            cache,
            openapi,
            registries: (config.registries.iter())
                .map(|a| Ok((a.clone(), brewmesh_runtime::client::channel(a)?)))
                .collect::<Result<_, RunError>>()?,
            scraper: crate::scrape::scraper(),
            address: std::sync::OnceLock::new(),
            web: crate::config::PageConfig {
                jaeger_url: config.jaeger_ui.clone(),
            },
            local,
            health,
            draining,
            cors: crate::cors::Cors::new(&config.cors_origins, config.cors_credentials),
            auth,
        })
    }
}

impl Gateway {
    /// Whether `service` is one the gateway calls (or serves itself).
    pub fn serves(&self, service: &str) -> bool {
        self.upstreams.contains_key(service) || crate::protocols::LOCAL.contains(&service)
    }

    /// The drain has started: health says NOT_SERVING.
    pub fn drain(&self) {
        self.draining.cancel();
        self.health.set("", ServingStatus::NotServing);
    }

    /// The first route of `method` whose template matches `path`.
    pub fn find(&self, method: &http::Method, path: &str) -> Option<Matched> {
        // HEAD is GET without the body (hyper leaves the body out).
        let method = if method == http::Method::HEAD {
            &http::Method::GET
        } else {
            method
        };
        self.routes.get(method)?.iter().find_map(|route| {
            let bound = route.template.matches(path)?;
            if self.verb_claims(route, path) {
                return None;
            }
            Some(Matched {
                route: Arc::clone(route),
                bindings: bound
                    .into_iter()
                    .map(|(field, value)| (field.to_owned(), value))
                    .collect(),
            })
        })
    }

    /// Whether `path`, which `route` (a template without a verb) matches
    /// with a ':' inside its last variable, is another route's custom verb:
    /// `/v1/orders/o1:cancel` is CancelOrder's, not GetOrder's with the id
    /// `o1:cancel`. A verb template names its path exactly, so it wins; a
    /// ':' that no route takes as its verb stays part of the variable.
    fn verb_claims(&self, route: &Route, path: &str) -> bool {
        let last = path.rsplit('/').next().unwrap_or_default();
        route.template.verb().is_none()
            && last.contains(':')
            && (self.routes.values().flatten())
                .any(|r| r.template.verb().is_some() && r.template.matches(path).is_some())
    }

    /// Why no route answers `method` on `path`: 405 with `Allow` when the
    /// path exists under other methods, else 404.
    pub fn no_route(&self, method: &http::Method, path: &str) -> GatewayError {
        let mut allowed: Vec<&str> = self
            .routes
            .iter()
            .filter(|(_, routes)| {
                (routes.iter())
                    .any(|r| r.template.matches(path).is_some() && !self.verb_claims(r, path))
            })
            .map(|(m, _)| m.as_str())
            .collect();
        let (method, path) = (method.clone(), path.to_owned());
        if allowed.is_empty() {
            return GatewayError::NoRoute { method, path };
        }
        allowed.sort_unstable();
        GatewayError::MethodNotAllowed {
            method,
            path,
            allow: allowed.join(", "),
        }
    }
}

//! The route table: every RPC with a `google.api.http` rule (and its
//! `additional_bindings`), compiled from the descriptors once at start.
//! RPCs without a rule are reachable as `POST /{service}/{method}` with the
//! whole request as the body, as grpc-gateway's `generate_unbound_methods`
//! does.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use brewmesh::pb::google::api::{HttpRule, http_rule::Pattern};
use http::Method;
use prost_reflect::{
    DescriptorPool, FieldDescriptor, Kind, MessageDescriptor, MethodDescriptor, Value,
};

use crate::template::{Template, TemplateError};

/// Where the HTTP request body goes.
#[derive(Debug, Clone)]
pub enum BodyRule {
    /// No body: every field not in the path comes from the query.
    None,
    /// `body: "*"`: the body is the request message.
    All,
    /// `body: "field"`: the body is that field; the rest from the query.
    Field(FieldDescriptor),
}

/// What a route calls, shared by all of its bindings.
#[derive(Debug)]
pub struct Rpc {
    /// The method's descriptor.
    pub method: MethodDescriptor,
    /// `/package.Service/Method`.
    pub path: http::uri::PathAndQuery,
    /// The service's full name.
    pub service: String,
    /// Answer 201 Created instead of 200.
    pub created: bool,
    /// Cache successful answers for this long (GET only).
    pub cache_ttl: Option<Duration>,
}

/// One HTTP binding of an RPC.
#[derive(Debug, Clone)]
pub struct Route {
    /// The HTTP method.
    pub method: Method,
    /// The path template.
    pub template: Template,
    /// Where the body goes.
    pub body: BodyRule,
    /// `response_body`: answer with this field of the response only.
    pub response_body: Option<FieldDescriptor>,
    /// The RPC.
    pub rpc: Arc<Rpc>,
}

/// The route a request matched, found once by `observe::layer` for its labels
/// and span, and read by the proxy from the request's extensions.
#[derive(Debug, Clone)]
pub struct Matched {
    /// The route.
    pub route: Arc<Route>,
    /// The path's values, by field path.
    pub bindings: Vec<(String, String)>,
}

/// Per-method settings that are not in the protos.
#[derive(Debug, Clone, Default)]
pub struct MethodSettings {
    /// RPCs (`package.Service.Method` or `/package.Service/Method`) that
    /// answer 201 Created.
    pub created: Vec<String>,
    /// RPCs whose GET answers are cached, and for how long.
    pub cached: Vec<(String, Duration)>,
}

impl MethodSettings {
    fn matches(name: &str, method: &MethodDescriptor) -> bool {
        let full = method.full_name();
        let slashed = format!("/{}/{}", method.parent_service().full_name(), method.name());
        name == full || name == slashed
    }
}

/// Why the route table could not be built.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// A template does not parse.
    #[error("{method}: {source}")]
    Template {
        /// The RPC.
        method: String,
        /// The cause.
        source: TemplateError,
    },
    /// A rule names a field that does not exist or cannot be bound.
    #[error("{method}: {reason}")]
    Field {
        /// The RPC.
        method: String,
        /// What is wrong.
        reason: String,
    },
    /// Two RPCs claim the same method and path.
    #[error("{method} {path} is bound by both {first} and {second}")]
    Conflict {
        /// The HTTP method.
        method: Method,
        /// The template.
        path: String,
        /// One RPC.
        first: String,
        /// The other.
        second: String,
    },
}

/// The routes of `services` (full names) found in `pool`, most specific
/// first within each HTTP method.
pub fn build(
    pool: &DescriptorPool,
    services: &[String],
    settings: &MethodSettings,
) -> Result<Vec<Route>, RouteError> {
    let http_ext = pool.get_extension_by_name("google.api.http");
    let mut routes = Vec::new();
    for service in pool
        .services()
        .filter(|s| services.iter().any(|n| n == s.full_name()))
    {
        for method in service.methods() {
            if method.is_client_streaming() {
                continue; // REST has no client streams
            }
            let rpc = Arc::new(Rpc {
                path: format!("/{}/{}", service.full_name(), method.name())
                    .parse()
                    .map_err(|_| RouteError::Field {
                        method: method.full_name().to_owned(),
                        reason: "not a valid gRPC path".to_owned(),
                    })?,
                service: service.full_name().to_owned(),
                created: settings
                    .created
                    .iter()
                    .any(|n| MethodSettings::matches(n, &method)),
                cache_ttl: settings
                    .cached
                    .iter()
                    .find(|(n, _)| MethodSettings::matches(n, &method))
                    .map(|(_, ttl)| *ttl),
                method: method.clone(),
            });
            let rule = http_ext.as_ref().and_then(|ext| {
                let options = method.options();
                if !options.has_extension(ext) {
                    return None;
                }
                match options.get_extension(ext).as_ref() {
                    Value::Message(m) => m.transcode_to::<HttpRule>().ok(),
                    _ => None,
                }
            });
            match rule {
                Some(rule) => {
                    let additional = rule.additional_bindings.clone();
                    routes.push(route(&rpc, &rule)?);
                    for binding in &additional {
                        routes.push(route(&rpc, binding)?);
                    }
                }
                None => routes.push(Route {
                    method: Method::POST,
                    template: template(&rpc, rpc.path.path())?,
                    body: BodyRule::All,
                    response_body: None,
                    rpc: Arc::clone(&rpc),
                }),
            }
        }
    }
    routes.sort_by_key(|r| std::cmp::Reverse(r.template.specificity()));
    let mut seen: HashMap<(Method, String), String> = HashMap::new();
    for r in &routes {
        let key = (r.method.clone(), r.template.openapi_path());
        if let Some(first) = seen.insert(key, r.rpc.method.full_name().to_owned()) {
            return Err(RouteError::Conflict {
                method: r.method.clone(),
                path: r.template.to_string(),
                first,
                second: r.rpc.method.full_name().to_owned(),
            });
        }
    }
    Ok(routes)
}

fn template(rpc: &Rpc, source: &str) -> Result<Template, RouteError> {
    Template::parse(source).map_err(|source| RouteError::Template {
        method: rpc.method.full_name().to_owned(),
        source,
    })
}

fn route(rpc: &Arc<Rpc>, rule: &HttpRule) -> Result<Route, RouteError> {
    let field_error = |reason: String| RouteError::Field {
        method: rpc.method.full_name().to_owned(),
        reason,
    };
    let (method, path) = match &rule.pattern {
        Some(Pattern::Get(p)) => (Method::GET, p),
        Some(Pattern::Put(p)) => (Method::PUT, p),
        Some(Pattern::Post(p)) => (Method::POST, p),
        Some(Pattern::Delete(p)) => (Method::DELETE, p),
        Some(Pattern::Patch(p)) => (Method::PATCH, p),
        Some(Pattern::Custom(c)) => (
            Method::from_bytes(c.kind.as_bytes())
                .map_err(|_| field_error(format!("bad custom method {:?}", c.kind)))?,
            &c.path,
        ),
        None => return Err(field_error("http rule without a pattern".to_owned())),
    };
    let template = template(rpc, path)?;
    let input = rpc.method.input();
    for field_path in template.field_paths() {
        let field = resolve(&input, field_path).map_err(field_error)?;
        if field.is_list()
            || field.is_map()
            || matches!(field.kind(), Kind::Message(_)) && !is_scalar_wrapper(&field)
        {
            return Err(field_error(format!(
                "{field_path}: a path variable must be a scalar field"
            )));
        }
    }
    let body = match rule.body.as_str() {
        "" => BodyRule::None,
        "*" => BodyRule::All,
        name => BodyRule::Field(
            input
                .get_field_by_name(name)
                .ok_or_else(|| field_error(format!("body field {name:?} does not exist")))?,
        ),
    };
    let response_body =
        match rule.response_body.as_str() {
            "" => None,
            name => Some(rpc.method.output().get_field_by_name(name).ok_or_else(|| {
                field_error(format!("response_body field {name:?} does not exist"))
            })?),
        };
    Ok(Route {
        method,
        template,
        body,
        response_body,
        rpc: Arc::clone(rpc),
    })
}

/// The field a dotted path names, through singular message fields; proto
/// or JSON names.
pub fn resolve(message: &MessageDescriptor, path: &str) -> Result<FieldDescriptor, String> {
    let mut current = message.clone();
    let mut parts = path.split('.').peekable();
    while let Some(part) = parts.next() {
        let field = current
            .get_field_by_name(part)
            .or_else(|| current.get_field_by_json_name(part))
            .ok_or_else(|| format!("{path}: no field {part:?} in {}", current.full_name()))?;
        if parts.peek().is_none() {
            return Ok(field);
        }
        match field.kind() {
            Kind::Message(inner) if !field.is_list() && !field.is_map() => current = inner,
            _ => return Err(format!("{path}: {part:?} is not a singular message")),
        }
    }
    Err(format!("{path}: empty field path"))
}

/// google.protobuf wrapper, timestamp and duration types take a plain
/// string in a path or query.
pub fn is_scalar_wrapper(field: &FieldDescriptor) -> bool {
    match field.kind() {
        Kind::Message(m) => matches!(
            m.full_name(),
            "google.protobuf.Timestamp"
                | "google.protobuf.Duration"
                | "google.protobuf.FieldMask"
                | "google.protobuf.StringValue"
                | "google.protobuf.BytesValue"
                | "google.protobuf.BoolValue"
                | "google.protobuf.Int32Value"
                | "google.protobuf.Int64Value"
                | "google.protobuf.UInt32Value"
                | "google.protobuf.UInt64Value"
                | "google.protobuf.FloatValue"
                | "google.protobuf.DoubleValue"
        ),
        _ => false,
    }
}

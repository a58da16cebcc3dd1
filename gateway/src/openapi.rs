//! The OpenAPI 3.1 document of the routes, written from the same
//! descriptors they are built from; proto comments become descriptions.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use prost_reflect::{
    DescriptorPool, EnumDescriptor, FieldDescriptor, FileDescriptor, Kind, MessageDescriptor,
};
use serde_json::{Map, Value, json};

use brewmesh::pb::brewmesh::validate::v1::FieldRules;

use crate::routes::{BodyRule, Route, is_scalar_wrapper};

/// How deep query parameters reach into nested messages.
const QUERY_DEPTH: usize = 3;

/// The document for `routes`; a server stream lasts `stream_timeout` unless
/// the client sends a longer `Grpc-Timeout`.
pub fn document(
    pool: &DescriptorPool,
    routes: &[Route],
    stream_timeout: Duration,
    auth: bool,
) -> Value {
    let mut schemas = Schemas::default();
    let status = schemas.message_ref("google.rpc.Status", pool);
    let mut paths: BTreeMap<String, Map<String, Value>> = BTreeMap::new();
    let mut operation_ids: BTreeSet<String> = BTreeSet::new();
    for route in routes {
        let method = &route.rpc.method;
        let input = method.input();
        let mut parameters = Vec::new();
        let bound: Vec<&str> = route.template.field_paths().collect();
        for field_path in &bound {
            if let Ok(field) = crate::routes::resolve(&input, field_path) {
                parameters.push(json!({
                    "name": field_path,
                    "in": "path",
                    "required": true,
                    "description": comment(&field.parent_file(), field.path()),
                    "schema": schemas.field(&field, pool),
                }));
            }
        }
        let excluded = match &route.body {
            BodyRule::All => None,
            BodyRule::Field(field) => Some(field.name().to_owned()),
            BodyRule::None => Some(String::new()),
        };
        if let Some(excluded) = excluded {
            query_parameters(
                &input,
                "",
                &bound,
                &excluded,
                0,
                &mut schemas,
                pool,
                &mut parameters,
            );
        }
        let mut operation = Map::new();
        let mut id = format!("{}_{}", method.parent_service().name(), method.name());
        // additional_bindings: one operation per binding, ids stay unique.
        let mut n = 1;
        while !operation_ids.insert(id.clone()) {
            n += 1;
            id = format!("{}_{}{n}", method.parent_service().name(), method.name());
        }
        operation.insert("operationId".into(), json!(id));
        operation.insert("tags".into(), json!([method.parent_service().full_name()]));
        let description = comment(&method.parent_file(), method.path());
        if let Some(first) = description.lines().next().filter(|l| !l.is_empty()) {
            operation.insert("summary".into(), json!(first));
        }
        let description = if method.is_server_streaming() {
            format!(
                "{description}\n\nA stream: one line per message (NDJSON, or Server-Sent Events with `Accept: text/event-stream`). It ends after {} unless the request's `Grpc-Timeout` header asks for another deadline; then its last line is an error with code 4 (DEADLINE_EXCEEDED), and the client asks again from where it was.",
                humantime::format_duration(stream_timeout)
            )
        } else {
            description
        };
        operation.insert("description".into(), json!(description));
        if !parameters.is_empty() {
            operation.insert("parameters".into(), Value::Array(parameters));
        }
        let body_schema = match &route.body {
            BodyRule::All if bound.is_empty() => Some(schemas.message(&input, pool)),
            // What the path binds is not in the body.
            BodyRule::All => Some(schemas.object(&input, &bound, pool)),
            BodyRule::Field(field) => Some(schemas.field(field, pool)),
            BodyRule::None => None,
        };
        if let Some(schema) = body_schema {
            operation.insert(
                "requestBody".into(),
                json!({"required": true, "content": {"application/json": {"schema": schema}}}),
            );
        }
        let output = match &route.response_body {
            Some(field) => schemas.field(field, pool),
            None => schemas.message(&method.output(), pool),
        };
        let content = if method.is_server_streaming() {
            json!({
                "application/x-ndjson": {"schema": {
                    "type": "object",
                    "description": "One line per message: {\"result\": …}, or {\"error\": …} when the stream fails.",
                    "properties": {"result": output, "error": status},
                }},
                "text/event-stream": {"schema": {
                    "type": "string",
                    "description": "With Accept: text/event-stream, one `data:` event per message (JSON), `event: error` when the stream fails.",
                }},
            })
        } else {
            json!({"application/json": {"schema": output}})
        };
        let code = if route.rpc.created { "201" } else { "200" };
        let links = links(route, routes);
        let mut success = json!({"description": "A successful response.", "content": content});
        if !links.is_empty() {
            success["links"] = Value::Object(links);
        }
        if auth {
            // Each operation's scope, as crate::auth asks for it.
            let security = match crate::auth::need(&route.rpc.service, method.name()) {
                crate::auth::Need::Nothing => json!([]),
                crate::auth::Need::Token => json!([{"bearer": []}]),
                crate::auth::Need::Scope(scope) => json!([{"bearer": [scope]}]),
            };
            operation.insert("security".into(), security);
        }
        operation.insert(
            "responses".into(),
            json!({
                code: success,
                "default": {
                    "description": "An error: a google.rpc.Status.",
                    "content": {"application/json": {"schema": status}},
                },
            }),
        );
        paths
            .entry(route.template.openapi_path())
            .or_default()
            .insert(
                route.method.as_str().to_ascii_lowercase(),
                Value::Object(operation),
            );
    }
    let mut tags: Vec<Value> = Vec::new();
    let mut seen = BTreeSet::new();
    for route in routes {
        let service = route.rpc.method.parent_service();
        if seen.insert(service.full_name().to_owned()) {
            tags.push(json!({
                "name": service.full_name(),
                "description": comment(&service.parent_file(), service.path()),
            }));
        }
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "brewmesh gateway",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "REST/JSON routes transcoded to gRPC from the google.api.http options.",
        },
        "tags": tags,
        "paths": paths,
        "components": components(schemas.done, auth),
    })
}

fn components(schemas: BTreeMap<String, Value>, auth: bool) -> Value {
    let mut components = json!({"schemas": schemas});
    if auth {
        components["securitySchemes"] = json!({"bearer": {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "JWT",
            "description": "An OAuth2/OIDC access token signed by a key of the gateway's --jwks; \
                            its `scope` claim holds the scopes each operation names.",
        }});
    }
    components
}

/// OpenAPI links from a method that creates a resource (a POST whose body
/// is the whole request, nothing bound in its path) to every route that
/// binds, as its one path variable, a field of the created resource:
/// PlaceOrder's `orderId` to GetOrder, CancelOrder and WatchOrder.
fn links(route: &Route, routes: &[Route]) -> Map<String, Value> {
    let mut links = Map::new();
    let creates = route.method == http::Method::POST
        && matches!(route.body, BodyRule::All)
        && route.template.field_paths().next().is_none()
        && route.response_body.is_none()
        && !route.rpc.method.is_server_streaming();
    if !creates {
        return links;
    }
    let output = route.rpc.method.output();
    for other in routes {
        let bound: Vec<&str> = other.template.field_paths().collect();
        let [field] = bound.as_slice() else { continue };
        let Some(source) = output.get_field_by_name(field) else {
            continue;
        };
        if other.rpc.method.parent_service() != route.rpc.method.parent_service() {
            continue;
        }
        let target = format!(
            "{}_{}",
            other.rpc.method.parent_service().name(),
            other.rpc.method.name()
        );
        links.insert(
            target.clone(),
            json!({
                "operationId": target,
                "parameters": {*field: format!("$response.body#/{}", source.json_name())},
            }),
        );
    }
    links
}

#[allow(clippy::too_many_arguments)]
fn query_parameters(
    message: &MessageDescriptor,
    prefix: &str,
    bound: &[&str],
    excluded: &str,
    depth: usize,
    schemas: &mut Schemas,
    pool: &DescriptorPool,
    out: &mut Vec<Value>,
) {
    for field in message.fields() {
        let name = format!("{prefix}{}", field.name());
        if bound.contains(&name.as_str()) || (depth == 0 && field.name() == excluded) {
            continue;
        }
        match field.kind() {
            _ if field.is_map() => {}
            Kind::Message(inner) if !is_scalar_wrapper(&field) => {
                if depth + 1 < QUERY_DEPTH && !field.is_list() {
                    query_parameters(
                        &inner,
                        &format!("{name}."),
                        bound,
                        excluded,
                        depth + 1,
                        schemas,
                        pool,
                        out,
                    );
                }
            }
            _ => out.push(json!({
                "name": name,
                "in": "query",
                "required": false,
                "description": comment(&field.parent_file(), field.path()),
                "schema": match field.kind() {
                    // A query value is text: an enum's name or its number.
                    Kind::Enum(e) if !field.is_list() => json!({
                        "type": "string",
                        "enum": e.values().map(|v| v.name().to_owned())
                            .chain(e.values().map(|v| v.number().to_string()))
                            .collect::<Vec<_>>(),
                    }),
                    _ => schemas.field(&field, pool),
                },
                "explode": true,
            })),
        }
    }
}

/// The leading comment of the element at `path` in `file`.
fn comment(file: &FileDescriptor, path: &[i32]) -> String {
    file.file_descriptor_proto()
        .source_code_info
        .as_ref()
        .and_then(|info| info.location.iter().find(|l| l.path == path))
        .and_then(|l| l.leading_comments.as_deref())
        .map(|c| {
            c.lines()
                .map(str::trim)
                .collect::<Vec<_>>()
                .join("\n")
                .trim()
                .to_owned()
        })
        .unwrap_or_default()
}

/// Component schemas, written once each, referenced everywhere else.
#[derive(Default)]
struct Schemas {
    done: BTreeMap<String, Value>,
}

impl Schemas {
    fn reference(name: &str) -> Value {
        json!({"$ref": format!("#/components/schemas/{name}")})
    }

    fn message_ref(&mut self, name: &str, pool: &DescriptorPool) -> Value {
        match pool.get_message_by_name(name) {
            Some(message) => self.message(&message, pool),
            None => json!({"type": "object"}),
        }
    }

    fn message(&mut self, message: &MessageDescriptor, pool: &DescriptorPool) -> Value {
        if let Some(known) = well_known(message.full_name()) {
            return known;
        }
        let name = message.full_name().to_owned();
        if !self.done.contains_key(&name) {
            // Placeholder first: recursive messages refer to themselves.
            self.done.insert(name.clone(), Value::Null);
            let schema = self.object(message, &[], pool);
            self.done.insert(name.clone(), schema);
        }
        Self::reference(&name)
    }

    /// `message` as an object schema, without the fields named in `skip`
    /// (those a route binds in its path); `required` lists the fields whose
    /// rules require them.
    fn object(
        &mut self,
        message: &MessageDescriptor,
        skip: &[&str],
        pool: &DescriptorPool,
    ) -> Value {
        let mut properties = Map::new();
        let mut required = Vec::new();
        for field in message.fields() {
            if skip.contains(&field.name()) {
                continue;
            }
            let mut schema = self.field(&field, pool);
            let description = comment(&field.parent_file(), field.path());
            if !description.is_empty() {
                schema = with_description(schema, description);
            }
            // A least value above 0 rules out the unset field (0) too.
            if Rules::of(&field, pool).is_some_and(|r| r.required || r.min.is_some_and(|m| m > 0)) {
                required.push(field.json_name().to_owned());
            } else {
                // proto3 JSON reads null as the field left unset.
                schema = or_null(schema);
            }
            properties.insert(field.json_name().to_owned(), schema);
        }
        let mut schema = json!({
            "type": "object",
            "description": comment(&message.parent_file(), message.path()),
            "properties": properties,
            "additionalProperties": false,
        });
        if !required.is_empty() {
            schema["required"] = json!(required);
        }
        schema
    }

    fn enumeration(&mut self, e: &EnumDescriptor) -> Value {
        let name = e.full_name().to_owned();
        if !self.done.contains_key(&name) {
            let values: Vec<String> = e.values().map(|v| v.name().to_owned()).collect();
            let descriptions: Vec<String> = e
                .values()
                .map(|v| format!("- {}: {}", v.name(), comment(&e.parent_file(), v.path())))
                .collect();
            let mut description = comment(&e.parent_file(), e.path());
            description.push_str("\n\n");
            description.push_str(&descriptions.join("\n"));
            // proto3 JSON takes an enum by name or by number.
            let mut accepted: Vec<Value> = values.iter().map(|v| json!(v)).collect();
            accepted.extend(e.values().map(|v| json!(v.number())));
            self.done.insert(
                name.clone(),
                json!({"type": ["string", "integer"], "enum": accepted, "description": description}),
            );
        }
        Self::reference(&name)
    }

    fn field(&mut self, field: &FieldDescriptor, pool: &DescriptorPool) -> Value {
        if field.is_map()
            && let Kind::Message(entry) = field.kind()
        {
            let value = entry.map_entry_value_field();
            return json!({"type": "object", "additionalProperties": self.field(&value, pool)});
        }
        let single = match field.kind() {
            Kind::Double | Kind::Float => json!({"type": "number"}),
            Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
                json!({"type": "integer", "format": "int32", "minimum": i32::MIN, "maximum": i32::MAX})
            }
            Kind::Uint32 | Kind::Fixed32 => {
                json!({"type": "integer", "format": "int64", "minimum": 0, "maximum": u32::MAX})
            }
            Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => int64(None),
            Kind::Uint64 | Kind::Fixed64 => json!({
                "type": ["string", "integer"],
                "format": "uint64",
                "pattern": format!("^(0|{})$", at_most(&u64::MAX.to_string())),
                "minimum": 0,
                "maximum": u64::MAX,
            }),
            Kind::Bool => json!({"type": "boolean"}),
            Kind::String => json!({"type": "string"}),
            Kind::Bytes => json!({"type": "string", "contentEncoding": "base64"}),
            Kind::Enum(e) => self.enumeration(&e),
            Kind::Message(m) => self.message(&m, pool),
        };
        if field.is_list() {
            let Some(rules) = Rules::of(field, pool) else {
                return json!({"type": "array", "items": single});
            };
            let mut array = json!({"type": "array"});
            if rules.required {
                array["minItems"] = json!(1);
            }
            if rules.max_items > 0 {
                array["maxItems"] = json!(rules.max_items);
            }
            array["items"] = Rules(rules).apply(field, single);
            array
        } else {
            match Rules::of(field, pool) {
                Some(rules) => Rules(rules).apply(field, single),
                None => single,
            }
        }
    }
}

/// An int64 in proto3 JSON: a string of digits or a number, in range; with
/// a least value of 0 or 1 (all the rules use), no minus sign or no zero.
fn int64(min: Option<i64>) -> Value {
    let positive = at_most(&i64::MAX.to_string());
    let pattern = match min {
        Some(0) => format!("^(0|{positive})$"),
        Some(1) => format!("^({positive})$"),
        _ => format!("^(0|{positive}|-({}))$", at_most("9223372036854775808")),
    };
    json!({
        "type": ["string", "integer"],
        "format": "int64",
        "pattern": pattern,
        "minimum": min.unwrap_or(i64::MIN),
        "maximum": i64::MAX,
    })
}

/// A regular expression for the decimal numbers from 1 to `max` (digits,
/// no leading zero), exactly: shorter numbers, then for each digit of `max`
/// the numbers that share its prefix and are smaller there.
fn at_most(max: &str) -> String {
    let digits: Vec<u32> = max.chars().filter_map(|c| c.to_digit(10)).collect();
    let n = digits.len();
    let mut alternatives = vec![format!("[1-9][0-9]{{0,{}}}", n.saturating_sub(2))];
    for (i, &d) in digits.iter().enumerate() {
        let low = if i == 0 { 1 } else { 0 };
        if d > low {
            let prefix: String = digits[..i].iter().map(|d| d.to_string()).collect();
            let rest = n - i - 1;
            alternatives.push(format!("{prefix}[{low}-{}][0-9]{{{rest}}}", d - 1));
        }
    }
    alternatives.push(max.to_owned());
    alternatives.join("|")
}

/// A field's `(brewmesh.validate.v1.rules)`, as the services enforce them
/// (build.rs generates their checks from the same options).
struct Rules(FieldRules);

impl Rules {
    fn of(field: &FieldDescriptor, pool: &DescriptorPool) -> Option<FieldRules> {
        let extension = pool.get_extension_by_name("brewmesh.validate.v1.rules")?;
        let options = field.options();
        if !options.has_extension(&extension) {
            return None;
        }
        options
            .get_extension(&extension)
            .as_message()?
            .transcode_to::<FieldRules>()
            .ok()
    }

    /// `schema`, the field's plain one, narrowed to what the rules accept.
    fn apply(&self, field: &FieldDescriptor, schema: Value) -> Value {
        let rules = &self.0;
        let Value::Object(mut schema) = schema else {
            return schema;
        };
        if rules.output_only {
            schema.insert("readOnly".into(), json!(true));
        }
        match field.kind() {
            Kind::String => {
                let pattern = if !rules.id_prefix.is_empty() {
                    Some(brewmesh::validate::id_pattern(&rules.id_prefix))
                } else if !rules.pattern.is_empty() {
                    Some(rules.pattern.clone())
                } else if rules.required {
                    Some(brewmesh::validate::NOT_BLANK_PATTERN.to_owned())
                } else {
                    None
                };
                if rules.max_len > 0 {
                    schema.insert("maxLength".into(), json!(rules.max_len));
                }
                match pattern {
                    Some(pattern) if rules.required => {
                        schema.insert("minLength".into(), json!(1));
                        schema.insert("pattern".into(), json!(pattern));
                    }
                    // Empty is allowed beside what the pattern matches.
                    Some(pattern) => {
                        schema.insert(
                            "anyOf".into(),
                            json!([{"maxLength": 0}, {"pattern": pattern}]),
                        );
                    }
                    None => {}
                }
            }
            Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 if rules.min.is_some() => {
                let narrowed = int64(rules.min);
                if let Value::Object(narrowed) = narrowed {
                    schema.extend(narrowed);
                }
            }
            Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 | Kind::Uint32 if rules.min.is_some() => {
                schema.insert("minimum".into(), json!(rules.min));
            }
            Kind::Message(m)
                if m.full_name() == "google.protobuf.Duration" && rules.min == Some(0) =>
            {
                schema.insert("pattern".into(), json!(DURATION_NOT_NEGATIVE));
            }
            _ => {}
        }
        Value::Object(schema)
    }
}

/// A Duration in proto3 JSON within its range (±315,576,000,000 s): at most
/// 11 digits of seconds, at most 9 of fractions.
const DURATION: &str = "^-?[0-9]{1,11}(\\.[0-9]{1,9})?s$";
const DURATION_NOT_NEGATIVE: &str = "^[0-9]{1,11}(\\.[0-9]{1,9})?s$";

/// `schema`, or null; the description stays outside.
fn or_null(schema: Value) -> Value {
    let mut schema = schema;
    let description = schema.as_object_mut().and_then(|m| m.remove("description"));
    let mut wrapped = json!({"anyOf": [schema, {"type": "null"}]});
    if let Some(description) = description {
        wrapped["description"] = description;
    }
    wrapped
}

fn with_description(schema: Value, description: String) -> Value {
    match schema {
        // A $ref with siblings is valid in 3.1; keep the reference whole.
        Value::Object(mut map) => {
            map.insert("description".into(), json!(description));
            Value::Object(map)
        }
        other => other,
    }
}

/// The JSON forms of the well-known types (proto3 JSON mapping).
fn well_known(name: &str) -> Option<Value> {
    Some(match name {
        "google.protobuf.Timestamp" => json!({"type": "string", "format": "date-time"}),
        "google.protobuf.Duration" => json!({"type": "string", "pattern": DURATION}),
        "google.protobuf.FieldMask" => json!({"type": "string"}),
        "google.protobuf.Empty" => json!({"type": "object", "additionalProperties": false}),
        "google.protobuf.Struct" => json!({"type": "object"}),
        "google.protobuf.Value" => json!({}),
        "google.protobuf.ListValue" => json!({"type": "array"}),
        "google.protobuf.Any" => json!({
            "type": "object",
            "properties": {"@type": {"type": "string"}},
            "required": ["@type"],
            "additionalProperties": true,
        }),
        "google.protobuf.StringValue" => json!({"type": ["string", "null"]}),
        "google.protobuf.BytesValue" => {
            json!({"type": ["string", "null"], "contentEncoding": "base64"})
        }
        "google.protobuf.BoolValue" => json!({"type": ["boolean", "null"]}),
        "google.protobuf.DoubleValue" | "google.protobuf.FloatValue" => {
            json!({"type": ["number", "null"]})
        }
        "google.protobuf.Int32Value" | "google.protobuf.UInt32Value" => {
            json!({"type": ["integer", "null"]})
        }
        "google.protobuf.Int64Value" | "google.protobuf.UInt64Value" => {
            json!({"type": ["string", "null"]})
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_int64_patterns_accept_exactly_the_range() {
        let i64_max =
            regex::Regex::new(&format!("^(0|{})$", at_most("9223372036854775807"))).unwrap();
        for inside in [
            "0",
            "1",
            "9",
            "10",
            "999999999999999999",
            "1000000000000000000",
            "9223372036854775807",
            "9223372036854775799",
            "8999999999999999999",
        ] {
            assert!(i64_max.is_match(inside), "{inside}");
        }
        for outside in [
            "00",
            "01",
            "-1",
            "9223372036854775808",
            "9223372036854775810",
            "9300000000000000000",
            "10000000000000000000",
            "",
        ] {
            assert!(!i64_max.is_match(outside), "{outside}");
        }
        let signed = regex::Regex::new(int64(None)["pattern"].as_str().unwrap()).unwrap();
        assert!(signed.is_match("-9223372036854775808"));
        assert!(!signed.is_match("-9223372036854775809"));
        assert!(!signed.is_match("-0"));
        let positive = regex::Regex::new(int64(Some(1))["pattern"].as_str().unwrap()).unwrap();
        assert!(positive.is_match("1") && !positive.is_match("0"));
    }
}

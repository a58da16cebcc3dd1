//! The OpenAPI 3.1 document of the routes, written from the same
//! descriptors they are built from; proto comments become descriptions.

use std::collections::{BTreeMap, BTreeSet};

use prost_reflect::{
    DescriptorPool, EnumDescriptor, FieldDescriptor, FileDescriptor, Kind, MessageDescriptor,
};
use serde_json::{Map, Value, json};

use crate::routes::{BodyRule, Route, is_scalar_wrapper};

/// How deep query parameters reach into nested messages.
const QUERY_DEPTH: usize = 3;

/// The document for `routes`.
pub fn document(pool: &DescriptorPool, routes: &[Route]) -> Value {
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
        operation.insert("description".into(), json!(description));
        if !parameters.is_empty() {
            operation.insert("parameters".into(), Value::Array(parameters));
        }
        let body_schema = match &route.body {
            BodyRule::All => Some(schemas.message(&input, pool)),
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
        operation.insert(
            "responses".into(),
            json!({
                code: {"description": "A successful response.", "content": content},
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
        "components": {"schemas": schemas.done},
    })
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
                "schema": schemas.field(&field, pool),
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
            let mut properties = Map::new();
            for field in message.fields() {
                let mut schema = self.field(&field, pool);
                let description = comment(&field.parent_file(), field.path());
                if !description.is_empty() {
                    schema = with_description(schema, description);
                }
                properties.insert(field.json_name().to_owned(), schema);
            }
            let schema = json!({
                "type": "object",
                "description": comment(&message.parent_file(), message.path()),
                "properties": properties,
                "additionalProperties": false,
            });
            self.done.insert(name.clone(), schema);
        }
        Self::reference(&name)
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
            self.done.insert(
                name.clone(),
                json!({"type": "string", "enum": values, "description": description}),
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
                json!({"type": "integer", "format": "int32"})
            }
            Kind::Uint32 | Kind::Fixed32 => {
                json!({"type": "integer", "format": "int64", "minimum": 0})
            }
            Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
                json!({"type": "string", "format": "int64"})
            }
            Kind::Uint64 | Kind::Fixed64 => json!({"type": "string", "format": "uint64"}),
            Kind::Bool => json!({"type": "boolean"}),
            Kind::String => json!({"type": "string"}),
            Kind::Bytes => json!({"type": "string", "contentEncoding": "base64"}),
            Kind::Enum(e) => self.enumeration(&e),
            Kind::Message(m) => self.message(&m, pool),
        };
        if field.is_list() {
            json!({"type": "array", "items": single})
        } else {
            single
        }
    }
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
        "google.protobuf.Duration" => {
            json!({"type": "string", "pattern": "^-?[0-9]+(\\.[0-9]+)?s$"})
        }
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

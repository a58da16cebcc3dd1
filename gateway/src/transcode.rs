//! JSON ⇄ protobuf by the proto3 JSON mapping, and the request message
//! assembled from the path, the query and the body as the http rule says.

use std::sync::OnceLock;

use prost::Message as _;
use prost_reflect::{
    DeserializeOptions, DynamicMessage, FieldDescriptor, Kind, MessageDescriptor,
    ReflectMessage as _, SerializeOptions,
};
use serde_json::{Map, Value as Json};

use crate::routes::{BodyRule, Route, is_scalar_wrapper, resolve};

/// A field violation: which field, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The field path (`order_id`, `item.size`), or `body`.
    pub field: String,
    /// What is wrong.
    pub description: String,
}

fn violation(field: impl Into<String>, description: impl Into<String>) -> Violation {
    Violation {
        field: field.into(),
        description: description.into(),
    }
}

/// How responses are written: lowerCamelCase names, 64-bit integers as
/// strings, enums by name, and unpopulated fields too (grpc-gateway v2's
/// default: a client sees `"amountMinor": "0"` rather than nothing).
pub fn serialize_options() -> &'static SerializeOptions {
    static OPTIONS: OnceLock<SerializeOptions> = OnceLock::new();
    OPTIONS.get_or_init(|| SerializeOptions::new().skip_default_fields(false))
}

/// Reads `body` as JSON into a `descriptor` message. Unknown fields are an
/// error; proto names and lowerCamelCase names are both accepted.
pub fn from_json(descriptor: MessageDescriptor, body: &[u8]) -> Result<DynamicMessage, Violation> {
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let options = DeserializeOptions::new().deny_unknown_fields(true);
    let message = DynamicMessage::deserialize_with_options(descriptor, &mut deserializer, &options)
        .map_err(|e| violation("body", json_error(&e)))?;
    deserializer
        .end()
        .map_err(|e| violation("body", json_error(&e)))?;
    Ok(message)
}

fn json_error(error: &serde_json::Error) -> String {
    match error.classify() {
        serde_json::error::Category::Eof => "the JSON body ends early".to_owned(),
        serde_json::error::Category::Syntax => format!("malformed JSON: {error}"),
        _ => error.to_string(),
    }
}

/// A message that serializes by the gateway's [`serialize_options`], for
/// serde's writers (`serde_json::to_vec`, `to_value`).
pub struct ProtoJson<'a>(pub &'a DynamicMessage);

impl serde::Serialize for ProtoJson<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0
            .serialize_with_options(serializer, serialize_options())
    }
}

/// Writes `message` as JSON.
pub fn to_json(message: &DynamicMessage) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    // Serializing a well-formed message into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut out, &ProtoJson(message));
    out
}

/// Builds the request message of `route`'s RPC: the body where the rule
/// puts it, then the path variables, then (unless the body is the whole
/// message) the query parameters.
pub fn request<F: AsRef<str>>(
    route: &Route,
    bindings: &[(F, String)],
    query: Option<&str>,
    body: &[u8],
) -> Result<DynamicMessage, Vec<Violation>> {
    let input = route.rpc.method.input();
    let blank = body.iter().all(u8::is_ascii_whitespace);
    let mut message = match &route.body {
        BodyRule::All if !blank => from_json(input.clone(), body).map_err(|v| vec![v])?,
        BodyRule::Field(field) if !blank => {
            // `{"field": <body>}`: the field's own JSON rules apply, whatever
            // its type.
            let mut wrapped = Vec::with_capacity(body.len() + field.name().len() + 6);
            wrapped.extend_from_slice(b"{\"");
            wrapped.extend_from_slice(field.name().as_bytes());
            wrapped.extend_from_slice(b"\":");
            wrapped.extend_from_slice(body);
            wrapped.push(b'}');
            from_json(input.clone(), &wrapped).map_err(|v| vec![v])?
        }
        _ => DynamicMessage::new(input.clone()),
    };

    let mut violations = Vec::new();
    let mut params = Map::new();
    let path_fields: Vec<&str> = bindings.iter().map(|(f, _)| f.as_ref()).collect();
    for (field_path, value) in bindings {
        if let Err(v) = set_param(&input, &mut params, field_path.as_ref(), value, false) {
            violations.push(v);
        }
    }
    if let (Some(query), false) = (query, matches!(route.body, BodyRule::All)) {
        for (key, value) in form_urlencoded(query) {
            let Ok(field) = resolve(&input, &key) else {
                violations.push(violation(key.clone(), "no such field"));
                continue;
            };
            if path_fields
                .iter()
                .any(|p| resolve(&input, p).ok().as_ref() == Some(&field))
            {
                violations.push(violation(key, "is set by the path"));
                continue;
            }
            if let BodyRule::Field(body_field) = &route.body {
                let top = key.split('.').next().unwrap_or_default();
                if input
                    .get_field_by_name(top)
                    .or_else(|| input.get_field_by_json_name(top))
                    .as_ref()
                    == Some(body_field)
                {
                    violations.push(violation(key, "is set by the body"));
                    continue;
                }
            }
            if let Err(v) = set_param(&input, &mut params, &key, &value, true) {
                violations.push(v);
            }
        }
    }
    if !violations.is_empty() {
        return Err(violations);
    }
    if !params.is_empty() {
        let options = DeserializeOptions::new().deny_unknown_fields(true);
        let from_params =
            DynamicMessage::deserialize_with_options(input, Json::Object(params), &options)
                .map_err(|e| vec![violation("query", e.to_string())])?;
        // Protobuf merge: what the path and query set overrides the body.
        message
            .merge(from_params.encode_to_vec().as_slice())
            .map_err(|e| vec![violation("query", e.to_string())])?;
    }
    Ok(message)
}

/// Query pairs, decoded (`+` is a space).
fn form_urlencoded(query: &str) -> impl Iterator<Item = (String, String)> + '_ {
    query.split('&').filter(|p| !p.is_empty()).map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (decode(k), decode(v))
    })
}

fn decode(s: &str) -> String {
    let spaced = s.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8_lossy()
        .into_owned()
}

/// Puts `value` at `field_path` in the JSON tree `params`, typed as the
/// field's JSON mapping wants it.
fn set_param(
    input: &MessageDescriptor,
    params: &mut Map<String, Json>,
    field_path: &str,
    value: &str,
    repeatable: bool,
) -> Result<(), Violation> {
    let field = resolve(input, field_path).map_err(|e| violation(field_path, e))?;
    if field.is_map() || matches!(field.kind(), Kind::Message(_)) && !is_scalar_wrapper(&field) {
        return Err(violation(
            field_path,
            "cannot be set from a path or query parameter",
        ));
    }
    let leaf = typed(&field, value).map_err(|e| violation(field_path, e))?;
    // Walk (and create) the nested objects, keyed by proto names so that
    // `a.b` and `a.c` land in the same `a`.
    let mut current = input.clone();
    let mut node = params;
    let parts: Vec<&str> = field_path.split('.').collect();
    for part in &parts[..parts.len() - 1] {
        let f = current
            .get_field_by_name(part)
            .or_else(|| current.get_field_by_json_name(part))
            .ok_or_else(|| violation(field_path, "no such field"))?;
        let Kind::Message(inner) = f.kind() else {
            return Err(violation(field_path, "not a message"));
        };
        current = inner;
        node = match node
            .entry(f.name().to_owned())
            .or_insert_with(|| Json::Object(Map::new()))
        {
            Json::Object(map) => map,
            _ => return Err(violation(field_path, "set twice")),
        };
    }
    let key = field.name().to_owned();
    if field.is_list() {
        match node.entry(key).or_insert_with(|| Json::Array(Vec::new())) {
            Json::Array(items) => items.push(leaf),
            _ => return Err(violation(field_path, "set twice")),
        }
    } else if node.insert(key, leaf).is_some() {
        let how = if repeatable {
            "given more than once"
        } else {
            "set twice"
        };
        return Err(violation(field_path, how));
    }
    Ok(())
}

/// A path or query string as the JSON value the field's mapping takes.
fn typed(field: &FieldDescriptor, value: &str) -> Result<Json, String> {
    let bool_value = |v: &str| match v {
        "true" => Ok(Json::Bool(true)),
        "false" => Ok(Json::Bool(false)),
        other => Err(format!("{other:?} is not true or false")),
    };
    match field.kind() {
        Kind::Bool => bool_value(value),
        Kind::Message(m) if m.full_name() == "google.protobuf.BoolValue" => bool_value(value),
        Kind::Enum(e) => match value.parse::<i32>() {
            Ok(n) if e.get_value(n).is_some() => Ok(Json::from(n)),
            _ if e.get_value_by_name(value).is_some() => Ok(Json::String(value.to_owned())),
            _ => Err(format!("{value:?} is not a value of {}", e.full_name())),
        },
        // Numbers as strings are valid proto3 JSON for every numeric type.
        _ => Ok(Json::String(value.to_owned())),
    }
}

/// The JSON of a response, or of its `response_body` field.
pub fn response_json(route: &Route, message: &DynamicMessage) -> Vec<u8> {
    match &route.response_body {
        Some(field) => {
            // A field's value serializes through a one-field message.
            let mut holder = DynamicMessage::new(message.descriptor());
            holder.set_field(field, message.get_field(field).into_owned());
            let json = serde_json::to_value(ProtoJson(&holder)).unwrap_or(Json::Null);
            serde_json::to_vec(json.get(field.json_name()).unwrap_or(&Json::Null))
                .unwrap_or_default()
        }
        None => to_json(message),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

    use super::*;

    #[test]
    fn an_integer_with_a_zero_fraction_is_read_as_an_integer() {
        let pool = prost_reflect::DescriptorPool::decode(brewmesh::FILE_DESCRIPTOR_SET).unwrap();
        let authorize = pool
            .get_message_by_name("brewmesh.payment.v1.AuthorizeRequest")
            .unwrap();
        // Integers with a zero fraction are integers to JSON Schema and to
        // the ProtoJSON spec; serde_json reads large ones exactly only with
        // its float_roundtrip feature (4501654041064538.0 otherwise comes
        // out as …537.5).
        for written in ["165", "165.0", "1.65e2", "\"165\"", "4501654041064538.0"] {
            let body =
                format!(r#"{{"amount": {{"currencyCode": "USD", "amountMinor": {written}}}}}"#);
            let message = from_json(authorize.clone(), body.as_bytes()).unwrap();
            let amount = message.get_field_by_name("amount").unwrap();
            let amount = amount.as_message().unwrap();
            let expected = if written.starts_with('4') {
                4501654041064538
            } else {
                165
            };
            assert_eq!(
                amount.get_field_by_name("amount_minor").unwrap().as_i64(),
                Some(expected),
                "{written}"
            );
        }
        let fraction = br#"{"amount": {"amountMinor": 165.5}}"#;
        assert!(from_json(authorize, fraction).is_err());
    }
}

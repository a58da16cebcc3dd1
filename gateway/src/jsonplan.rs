//! Protobuf → JSON without a `DynamicMessage`: for each proto3 message type
//! a plan made once at start (each field's number, its JSON key already
//! quoted, its kind, its JSON when absent), then each answer written
//! straight from its wire bytes. The output is byte for byte what
//! [`crate::transcode::to_json`] writes (fields in number order, unset
//! fields without presence at their defaults, 64-bit integers as strings,
//! enums by name); what a plan does not cover — maps, proto2, a message
//! holding an `Any`, a singular message sent in pieces, two members of one
//! oneof, anything malformed —
//! answers `None`, and the caller takes the reflective path. Well-known
//! types inside a planned message are written by prost-reflect's own
//! serializer (Timestamp by prost-types, as prost-reflect does).

use std::collections::HashMap;
use std::sync::Arc;

use base64::Engine as _;
use prost::Message as _;
use prost_reflect::{
    DescriptorPool, DynamicMessage, FieldDescriptor, Kind, MessageDescriptor, Syntax,
};

use bytes::Bytes;

use crate::routes::Route;
use crate::transcode::ProtoJson;

/// Every plan the gateway has, by message name.
#[derive(Debug, Default)]
pub struct Plans {
    messages: Vec<Plan>,
    by_name: HashMap<String, usize>,
}

#[derive(Debug)]
struct Plan {
    fields: Vec<Field>,
}

#[derive(Debug)]
struct Field {
    number: u32,
    /// `"jsonName":`.
    key: Box<[u8]>,
    kind: Value,
    repeated: bool,
    /// Written only when present (message fields, `optional`, oneofs).
    presence: bool,
    oneof: Option<usize>,
    /// The JSON of an absent field without presence.
    absent: Box<[u8]>,
}

#[derive(Debug, Clone)]
enum Value {
    Bool,
    Int32,
    Sint32,
    Sfixed32,
    Uint32,
    Fixed32,
    Int64,
    Sint64,
    Sfixed64,
    Uint64,
    Fixed64,
    Float,
    Double,
    String,
    Bytes,
    /// Names by number, sorted.
    Enum(Arc<[(i32, Box<[u8]>)]>),
    /// `google.protobuf.NullValue`: `null` whatever its number.
    Null,
    Message(usize),
    Timestamp,
    /// Written through prost-reflect (other well-known types).
    Reflect(MessageDescriptor),
}

/// prost's own limit on nested messages.
const RECURSION_LIMIT: u32 = 100;

const TIMESTAMP_SECONDS: std::ops::RangeInclusive<i64> = -62_135_596_800..=253_402_300_799;

impl Plans {
    /// Plans for `names` (message full names) and what they contain; a
    /// name that cannot be planned is left out.
    pub fn build<'a>(pool: &DescriptorPool, names: impl IntoIterator<Item = &'a str>) -> Self {
        let mut plans = Plans::default();
        for name in names {
            if let Some(message) = pool.get_message_by_name(name) {
                let _ = plans.plan(&message);
            }
        }
        plans
    }

    /// Whether `message` has a plan.
    pub fn covers(&self, message: &MessageDescriptor) -> bool {
        self.by_name.contains_key(message.full_name())
    }

    /// `bytes`, a `message`, as JSON; `None` where the plan does not
    /// cover it (see the module's description).
    pub fn to_json(&self, message: &MessageDescriptor, bytes: &[u8]) -> Option<Vec<u8>> {
        let index = *self.by_name.get(message.full_name())?;
        let mut out = Vec::with_capacity(bytes.len() * 2 + 16);
        self.write(index, bytes, &mut out, 0)?;
        Some(out)
    }

    /// A route's answer as JSON: by its plan when one covers it, else
    /// decoded and written through reflection (INTERNAL when it does not
    /// decode).
    pub fn answer(&self, route: &Route, bytes: &Bytes) -> Result<Vec<u8>, tonic::Status> {
        let output = route.rpc.method.output();
        let decoding =
            |e: prost::DecodeError| tonic::Status::internal(format!("decoding the response: {e}"));
        match &route.response_body {
            None => self.json(&output, bytes).map_err(decoding),
            Some(_) => {
                let message = DynamicMessage::decode(output, bytes.clone()).map_err(decoding)?;
                Ok(crate::transcode::response_json(route, &message))
            }
        }
    }

    /// `bytes`, a `message`, as JSON: by its plan when one covers it, else
    /// decoded and written through reflection.
    pub fn json(
        &self,
        message: &MessageDescriptor,
        bytes: &[u8],
    ) -> Result<Vec<u8>, prost::DecodeError> {
        if let Some(json) = self.to_json(message, bytes) {
            return Ok(json);
        }
        let decoded = DynamicMessage::decode(message.clone(), bytes)?;
        Ok(crate::transcode::to_json(&decoded))
    }

    fn plan(&mut self, message: &MessageDescriptor) -> Option<usize> {
        if let Some(index) = self.by_name.get(message.full_name()) {
            return Some(*index);
        }
        let plannable = message.parent_file().syntax() == Syntax::Proto3
            && !message.is_map_entry()
            && message.extension_ranges().next().is_none()
            && !message.full_name().starts_with("google.protobuf.")
            && message.fields().all(|f| !f.is_map() && !f.is_group())
            && !reaches_any(message, &mut Vec::new());
        if !plannable {
            return None;
        }
        // Placed first: a message that contains itself finds its index.
        let index = self.messages.len();
        self.messages.push(Plan { fields: Vec::new() });
        self.by_name.insert(message.full_name().to_owned(), index);
        let mut oneofs: Vec<String> = Vec::new();
        let mut fields: Vec<Field> = Vec::new();
        let mut all: Vec<FieldDescriptor> = message.fields().collect();
        all.sort_by_key(FieldDescriptor::number);
        for field in all {
            let kind = self.value(&field.kind());
            let oneof = field.containing_oneof().map(|o| {
                let name = o.full_name().to_owned();
                oneofs.iter().position(|n| *n == name).unwrap_or_else(|| {
                    oneofs.push(name);
                    oneofs.len() - 1
                })
            });
            let mut key = serde_json::to_vec(field.json_name()).unwrap_or_default();
            key.push(b':');
            fields.push(Field {
                number: field.number(),
                key: key.into(),
                absent: absent(&field, &kind).into(),
                kind,
                repeated: field.is_list(),
                presence: field.supports_presence(),
                oneof,
            });
        }
        self.messages[index].fields = fields;
        Some(index)
    }

    fn value(&mut self, kind: &Kind) -> Value {
        match kind {
            Kind::Bool => Value::Bool,
            Kind::Int32 => Value::Int32,
            Kind::Sint32 => Value::Sint32,
            Kind::Sfixed32 => Value::Sfixed32,
            Kind::Uint32 => Value::Uint32,
            Kind::Fixed32 => Value::Fixed32,
            Kind::Int64 => Value::Int64,
            Kind::Sint64 => Value::Sint64,
            Kind::Sfixed64 => Value::Sfixed64,
            Kind::Uint64 => Value::Uint64,
            Kind::Fixed64 => Value::Fixed64,
            Kind::Float => Value::Float,
            Kind::Double => Value::Double,
            Kind::String => Value::String,
            Kind::Bytes => Value::Bytes,
            Kind::Enum(e) if e.full_name() != "google.protobuf.NullValue" => {
                let mut names: Vec<(i32, Box<[u8]>)> = e
                    .values()
                    .map(|v| {
                        (
                            v.number(),
                            serde_json::to_vec(v.name()).unwrap_or_default().into(),
                        )
                    })
                    .collect();
                names.sort_by_key(|(n, _)| *n);
                names.dedup_by_key(|(n, _)| *n);
                Value::Enum(names.into())
            }
            Kind::Enum(_) => Value::Null,
            Kind::Message(m) if m.full_name() == "google.protobuf.Timestamp" => Value::Timestamp,
            Kind::Message(m) => match self.plan(m) {
                Some(index) => Value::Message(index),
                None => Value::Reflect(m.clone()),
            },
        }
    }

    fn write(&self, index: usize, bytes: &[u8], out: &mut Vec<u8>, depth: u32) -> Option<()> {
        // Deeper than prost decodes: left to it, and to its error.
        if depth >= RECURSION_LIMIT {
            return None;
        }
        let plan = &self.messages[index];
        // Every field's occurrences, as (field, wire type, payload), then
        // in field order (a stable sort keeps each field's wire order).
        let mut seen: Vec<(usize, u8, &[u8])> = Vec::new();
        let mut rest = bytes;
        while !rest.is_empty() {
            let tag = varint(&mut rest)?;
            let (number, wire) = (u32::try_from(tag >> 3).ok()?, (tag & 7) as u8);
            let payload = match wire {
                0 => {
                    let start = rest;
                    varint(&mut rest)?;
                    &start[..start.len() - rest.len()]
                }
                1 => take(&mut rest, 8)?,
                2 => {
                    let length = usize::try_from(varint(&mut rest)?).ok()?;
                    take(&mut rest, length)?
                }
                5 => take(&mut rest, 4)?,
                _ => return None,
            };
            // Unknown fields are not written, as prost-reflect does not.
            if let Ok(field) = plan.fields.binary_search_by_key(&number, |f| f.number) {
                seen.push((field, wire, payload));
            }
        }
        seen.sort_by_key(|(field, _, _)| *field);

        out.push(b'{');
        let mut first = true;
        let mut oneofs_set: u64 = 0;
        let mut cursor = 0;
        for (i, field) in plan.fields.iter().enumerate() {
            let start = cursor;
            while cursor < seen.len() && seen[cursor].0 == i {
                cursor += 1;
            }
            let occurrences = &seen[start..cursor];
            if occurrences.is_empty() && field.presence {
                continue;
            }
            if let (Some(oneof), false) = (field.oneof, occurrences.is_empty()) {
                let bit = 1u64.checked_shl(u32::try_from(oneof).ok()?)?;
                if oneofs_set & bit != 0 {
                    return None;
                }
                oneofs_set |= bit;
            }
            if !first {
                out.push(b',');
            }
            first = false;
            out.extend_from_slice(&field.key);
            if occurrences.is_empty() {
                out.extend_from_slice(&field.absent);
            } else if field.repeated {
                out.push(b'[');
                let mut first_item = true;
                for (_, wire, payload) in occurrences {
                    let packed = *wire == 2 && field.kind.is_scalar();
                    if packed {
                        let mut items = *payload;
                        while !items.is_empty() {
                            let one = field.kind.split_packed(&mut items)?;
                            comma(out, &mut first_item);
                            self.value_json(&field.kind, field.kind.wire(), one, out, depth)?;
                        }
                    } else {
                        comma(out, &mut first_item);
                        self.value_json(&field.kind, *wire, payload, out, depth)?;
                    }
                }
                out.push(b']');
            } else {
                if matches!(
                    field.kind,
                    Value::Message(_) | Value::Reflect(_) | Value::Timestamp
                ) && occurrences.len() > 1
                {
                    // Pieces of one message are merged: prost-reflect's.
                    return None;
                }
                let (_, wire, payload) = occurrences[occurrences.len() - 1];
                self.value_json(&field.kind, wire, payload, out, depth)?;
            }
        }
        out.push(b'}');
        Some(())
    }

    // Truncations as prost's decoders make them.
    #[allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap)]
    fn value_json(
        &self,
        kind: &Value,
        wire: u8,
        payload: &[u8],
        out: &mut Vec<u8>,
        depth: u32,
    ) -> Option<()> {
        if wire != kind.wire() {
            return None;
        }
        let number = |p: &[u8]| {
            let mut p = p;
            varint(&mut p)
        };
        let fixed32 = |p: &[u8]| p.try_into().ok().map(u32::from_le_bytes);
        let fixed64 = |p: &[u8]| p.try_into().ok().map(u64::from_le_bytes);
        match kind {
            Value::Bool => json(out, &(number(payload)? != 0)),
            Value::Int32 => json(out, &(number(payload)? as i32)),
            Value::Sint32 => json(out, &(zigzag(number(payload)?) as i32)),
            Value::Sfixed32 => json(out, &(fixed32(payload)? as i32)),
            Value::Uint32 => json(out, &(number(payload)? as u32)),
            Value::Fixed32 => json(out, &fixed32(payload)?),
            Value::Int64 => quoted(out, number(payload)? as i64),
            Value::Sint64 => quoted(out, zigzag(number(payload)?)),
            Value::Sfixed64 => quoted(out, fixed64(payload)? as i64),
            Value::Uint64 => quoted(out, number(payload)?),
            Value::Fixed64 => quoted(out, fixed64(payload)?),
            Value::Float => float(out, f32::from_bits(fixed32(payload)?)),
            Value::Double => double(out, f64::from_bits(fixed64(payload)?)),
            Value::String => json(out, std::str::from_utf8(payload).ok()?),
            Value::Bytes => {
                out.push(b'"');
                let encoded = base64::engine::general_purpose::STANDARD.encode(payload);
                out.extend_from_slice(encoded.as_bytes());
                out.push(b'"');
                Some(())
            }
            Value::Enum(names) => {
                let n = number(payload)? as i32;
                match names.binary_search_by_key(&n, |(k, _)| *k) {
                    Ok(i) => out.extend_from_slice(&names[i].1),
                    Err(_) => return json(out, &n),
                }
                Some(())
            }
            Value::Null => {
                number(payload)?;
                json(out, &())
            }
            Value::Message(index) => self.write(*index, payload, out, depth + 1),
            Value::Timestamp => {
                let timestamp = prost_types::Timestamp::decode(payload).ok()?;
                if !TIMESTAMP_SECONDS.contains(&timestamp.seconds) {
                    return None;
                }
                json(out, &timestamp.to_string())
            }
            Value::Reflect(descriptor) => {
                let message = DynamicMessage::decode(descriptor.clone(), payload).ok()?;
                serde_json::to_writer(&mut *out, &ProtoJson(&message)).ok()
            }
        }
    }
}

impl Value {
    /// The wire type of one value.
    fn wire(&self) -> u8 {
        match self {
            Value::Sfixed32 | Value::Fixed32 | Value::Float => 5,
            Value::Sfixed64 | Value::Fixed64 | Value::Double => 1,
            Value::String
            | Value::Bytes
            | Value::Message(_)
            | Value::Timestamp
            | Value::Reflect(_) => 2,
            _ => 0,
        }
    }

    fn is_scalar(&self) -> bool {
        self.wire() != 2
    }

    /// The next value of a packed run.
    fn split_packed<'a>(&self, items: &mut &'a [u8]) -> Option<&'a [u8]> {
        match self.wire() {
            5 => take(items, 4),
            1 => take(items, 8),
            _ => {
                let start = *items;
                varint(items)?;
                Some(&start[..start.len() - items.len()])
            }
        }
    }
}

/// An absent field's JSON, as prost-reflect writes its default value.
fn absent(field: &FieldDescriptor, kind: &Value) -> Vec<u8> {
    if field.is_list() {
        return b"[]".to_vec();
    }
    let mut out = Vec::new();
    let _ = match kind {
        Value::Bool => json(&mut out, &false),
        Value::Int64 | Value::Sint64 | Value::Sfixed64 | Value::Uint64 | Value::Fixed64 => {
            quoted(&mut out, 0)
        }
        Value::Float => float(&mut out, 0.0),
        Value::Double => double(&mut out, 0.0),
        Value::String | Value::Bytes => json(&mut out, ""),
        Value::Enum(names) => match names.binary_search_by_key(&0, |(k, _)| *k) {
            Ok(i) => {
                out.extend_from_slice(&names[i].1);
                Some(())
            }
            Err(_) => json(&mut out, &0),
        },
        // Message fields have presence: never absent-but-written.
        Value::Null | Value::Message(_) | Value::Timestamp | Value::Reflect(_) => {
            json(&mut out, &())
        }
        _ => json(&mut out, &0),
    };
    out
}

fn comma(out: &mut Vec<u8>, first: &mut bool) {
    if !*first {
        out.push(b',');
    }
    *first = false;
}

fn json<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) -> Option<()> {
    serde_json::to_writer(out, value).ok()
}

fn quoted(out: &mut Vec<u8>, value: impl std::fmt::Display) -> Option<()> {
    use std::io::Write as _;
    write!(out, "\"{value}\"").ok()
}

fn float(out: &mut Vec<u8>, value: f32) -> Option<()> {
    if value.is_finite() {
        json(out, &value)
    } else {
        json(out, non_finite(f64::from(value)))
    }
}

fn double(out: &mut Vec<u8>, value: f64) -> Option<()> {
    if value.is_finite() {
        json(out, &value)
    } else {
        json(out, non_finite(value))
    }
}

fn non_finite(value: f64) -> &'static str {
    if value.is_nan() {
        "NaN"
    } else if value > 0.0 {
        "Infinity"
    } else {
        "-Infinity"
    }
}

fn zigzag(n: u64) -> i64 {
    #[allow(clippy::cast_possible_wrap)]
    let half = (n >> 1) as i64;
    half ^ -((n & 1) as i64)
}

fn take<'a>(rest: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if rest.len() < n {
        return None;
    }
    let (head, tail) = rest.split_at(n);
    *rest = tail;
    Some(head)
}

/// Whether `message` holds a `google.protobuf.Any`, at any depth (a
/// google.rpc.Status's details): its JSON names the packed type, which
/// only reflection resolves, so such a message is left to it whole.
fn reaches_any(message: &MessageDescriptor, seen: &mut Vec<String>) -> bool {
    if message.full_name() == "google.protobuf.Any" {
        return true;
    }
    if seen.iter().any(|s| s == message.full_name()) {
        return false;
    }
    seen.push(message.full_name().to_owned());
    message.fields().any(|f| match f.kind() {
        Kind::Message(m) => reaches_any(&m, seen),
        _ => false,
    })
}

fn varint(rest: &mut &[u8]) -> Option<u64> {
    let mut value: u64 = 0;
    for i in 0..10 {
        let byte = *rest.get(i)?;
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            *rest = &rest[i + 1..];
            return Some(value);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transcode::to_json;
    use prost_reflect::{MapKey, Value as V};

    /// A small deterministic generator (no test may depend on the clock).
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            self.0 >> 11
        }
        fn pick(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap)]
    fn random_value(kind: &Kind, rng: &mut Lcg, depth: u32) -> V {
        match kind {
            Kind::Bool => V::Bool(rng.pick(2) == 1),
            Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => V::I32(rng.next() as i32),
            Kind::Uint32 | Kind::Fixed32 => V::U32(rng.next() as u32),
            Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
                V::I64([i64::MIN, -1, 0, i64::MAX, rng.next() as i64][rng.pick(5) as usize])
            }
            Kind::Uint64 | Kind::Fixed64 => V::U64([0, u64::MAX, rng.next()][rng.pick(3) as usize]),
            Kind::Float => {
                V::F32([0.5, -1.25e-7, f32::NAN, f32::INFINITY, 3.0e38][rng.pick(5) as usize])
            }
            Kind::Double => {
                V::F64([0.1, -2.5e300, f64::NAN, f64::NEG_INFINITY, 1.0][rng.pick(5) as usize])
            }
            Kind::String => V::String(
                ["", "latte", "quote \" and \\ back", "é☕\n\u{1}"][rng.pick(4) as usize]
                    .to_owned(),
            ),
            Kind::Bytes => V::Bytes(bytes::Bytes::from(vec![0xff; rng.pick(7) as usize])),
            Kind::Enum(e) => {
                let values: Vec<i32> = e.values().map(|v| v.number()).collect();
                // Now and then a number the enum does not name.
                if rng.pick(5) == 0 {
                    V::EnumNumber(99)
                } else {
                    V::EnumNumber(values[rng.pick(values.len() as u64) as usize])
                }
            }
            Kind::Message(m) => V::Message(random_message(m, rng, depth + 1)),
        }
    }

    fn random_message(descriptor: &MessageDescriptor, rng: &mut Lcg, depth: u32) -> DynamicMessage {
        let mut message = DynamicMessage::new(descriptor.clone());
        if depth > 3
            || descriptor.full_name().starts_with("google.protobuf.")
                && descriptor.full_name() != "google.protobuf.Timestamp"
        {
            return message;
        }
        for field in descriptor.fields() {
            if rng.pick(3) == 0 {
                continue;
            }
            if field.is_map() {
                let mut map = HashMap::new();
                map.insert(
                    MapKey::String("k".into()),
                    random_value(
                        &field
                            .kind()
                            .as_message()
                            .unwrap()
                            .map_entry_value_field()
                            .kind(),
                        rng,
                        depth,
                    ),
                );
                message.set_field(&field, V::Map(map));
            } else if field.is_list() {
                let n = rng.pick(4);
                let items = (0..n)
                    .map(|_| random_value(&field.kind(), rng, depth))
                    .collect();
                message.set_field(&field, V::List(items));
            } else if descriptor.full_name() == "google.protobuf.Timestamp" {
                let value = if field.name() == "seconds" {
                    V::I64(rng.pick(4_000_000_000) as i64)
                } else {
                    V::I32((rng.pick(1_000_000_000)) as i32)
                };
                message.set_field(&field, value);
            } else {
                message.set_field(&field, random_value(&field.kind(), rng, depth));
            }
        }
        message
    }

    fn pool() -> DescriptorPool {
        DescriptorPool::decode(brewmesh::FILE_DESCRIPTOR_SET).unwrap()
    }

    #[test]
    fn a_plan_writes_what_reflection_writes_byte_for_byte() {
        let pool = pool();
        let names: Vec<String> = pool
            .all_messages()
            .filter(|m| m.full_name().starts_with("brewmesh."))
            .map(|m| m.full_name().to_owned())
            .collect();
        let plans = Plans::build(&pool, names.iter().map(String::as_str));
        let mut rng = Lcg(7);
        let mut planned = 0;
        for name in &names {
            let descriptor = pool.get_message_by_name(name).unwrap();
            if !plans.covers(&descriptor) {
                continue;
            }
            planned += 1;
            for _ in 0..50 {
                let message = random_message(&descriptor, &mut rng, 0);
                let bytes = message.encode_to_vec();
                let expected =
                    to_json(&DynamicMessage::decode(descriptor.clone(), &bytes[..]).unwrap());
                let written = plans.to_json(&descriptor, &bytes).unwrap();
                assert_eq!(
                    String::from_utf8_lossy(&written),
                    String::from_utf8_lossy(&expected),
                    "{name}"
                );
            }
        }
        assert!(planned > 20, "only {planned} messages planned");
    }

    #[test]
    fn what_a_plan_does_not_cover_is_left_to_reflection() {
        let pool = pool();
        let order = pool
            .get_message_by_name("brewmesh.barista.v1.Order")
            .unwrap();
        let plans = Plans::build(&pool, ["brewmesh.barista.v1.Order"]);
        // Cut short, or a field with the wrong wire type.
        assert!(plans.to_json(&order, &[0x0a, 0x05, b'a']).is_none());
        assert!(plans.to_json(&order, &[0x08, 0x01]).is_none());
        // Unknown fields are skipped, as reflection skips them.
        let written = plans.to_json(&order, &[0xf8, 0x7f, 0x01]).unwrap();
        let expected =
            to_json(&DynamicMessage::decode(order.clone(), &[0xf8, 0x7f, 0x01][..]).unwrap());
        assert_eq!(written, expected);
        // A well-known type alone is not planned.
        let plans = Plans::build(&pool, ["google.protobuf.Timestamp"]);
        let timestamp = pool
            .get_message_by_name("google.protobuf.Timestamp")
            .unwrap();
        assert!(!plans.covers(&timestamp));
    }

    #[test]
    fn a_recursive_type_is_written_to_prosts_depth_and_no_deeper() {
        use prost_types::field_descriptor_proto::{Label, Type};
        let file = prost_types::FileDescriptorProto {
            name: Some("tree.proto".into()),
            package: Some("t".into()),
            syntax: Some("proto3".into()),
            message_type: vec![prost_types::DescriptorProto {
                name: Some("Node".into()),
                field: vec![prost_types::FieldDescriptorProto {
                    name: Some("child".into()),
                    json_name: Some("child".into()),
                    number: Some(1),
                    label: Some(Label::Optional as i32),
                    r#type: Some(Type::Message as i32),
                    type_name: Some(".t.Node".into()),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let pool = DescriptorPool::from_file_descriptor_set(prost_types::FileDescriptorSet {
            file: vec![file],
        })
        .unwrap();
        let node = pool.get_message_by_name("t.Node").unwrap();
        let plans = Plans::build(&pool, ["t.Node"]);
        let nested = |levels: usize| {
            let mut bytes: Vec<u8> = Vec::new();
            for _ in 0..levels {
                let mut outer = vec![0x0a];
                prost::encoding::encode_varint(bytes.len() as u64, &mut outer);
                outer.extend_from_slice(&bytes);
                bytes = outer;
            }
            bytes
        };
        let shallow = nested(50);
        let expected = to_json(&DynamicMessage::decode(node.clone(), &shallow[..]).unwrap());
        assert_eq!(plans.to_json(&node, &shallow).unwrap(), expected);
        // A backend's answer nested past prost's limit is not walked (no
        // stack is spent on it here); reflection refuses it.
        assert!(plans.to_json(&node, &nested(10_000)).is_none());
    }
}

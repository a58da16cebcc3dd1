//! Compiles `proto/` with protox (no system `protoc`) into Rust code, and
//! writes the encoded descriptor set that reflection and the gateway read.
//!
//! The descriptor set is written from `encode_file_descriptor_set()`, not by
//! re-encoding prost types: that keeps the `(google.api.http)` options, which
//! prost's `MethodOptions` does not model and would drop.

use std::path::PathBuf;

use prost_reflect::{
    DescriptorPool, ExtensionDescriptor, FieldDescriptor, Kind, MessageDescriptor, Value,
};

const PROTOS: &[&str] = &[
    "brewmesh/payment/v1/payment.proto",
    "brewmesh/barista/v1/barista.proto",
    "brewmesh/registry/v1/registry.proto",
    "brewmesh/station/v1/station.proto",
    "brewmesh/validate/v1/validate.proto",
    // Not used by the services' code: in the set so that the gateway can
    // write error details (BadRequest, RetryInfo, …) as JSON.
    "google/rpc/status.proto",
    "google/rpc/error_details.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);

    let mut compiler = protox::Compiler::new(["proto"])?;
    compiler.include_imports(true).include_source_info(true);
    compiler.open_files(PROTOS)?;

    std::fs::write(
        out_dir.join("brewmesh_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;

    std::fs::write(
        out_dir.join("validate_rules.rs"),
        validators(&compiler.descriptor_pool())?,
    )?;

    tonic_prost_build::configure()
        .emit_rerun_if_changed(false)
        .compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}

/// One field's `(brewmesh.validate.v1.rules)`.
#[derive(Default)]
struct Rules {
    required: bool,
    max_len: u32,
    id_prefix: String,
    pattern: String,
    min: Option<i64>,
    output_only: bool,
    max_items: u32,
}

fn rules(field: &FieldDescriptor, extension: &ExtensionDescriptor) -> Option<Rules> {
    let options = field.options();
    if !options.has_extension(extension) {
        return None;
    }
    let Value::Message(rules) = options.get_extension(extension).into_owned() else {
        return None;
    };
    let get = |name: &str| rules.get_field_by_name(name).map(|v| v.into_owned());
    Some(Rules {
        required: get("required").and_then(|v| v.as_bool()).unwrap_or(false),
        max_len: get("max_len").and_then(|v| v.as_u32()).unwrap_or(0),
        id_prefix: (get("id_prefix").and_then(|v| v.as_str().map(str::to_owned)))
            .unwrap_or_default(),
        pattern: (get("pattern").and_then(|v| v.as_str().map(str::to_owned))).unwrap_or_default(),
        min: rules
            .has_field_by_name("min")
            .then(|| get("min").and_then(|v| v.as_i64()))
            .flatten(),
        output_only: get("output_only")
            .and_then(|v| v.as_bool())
            .unwrap_or(false),
        max_items: get("max_items").and_then(|v| v.as_u32()).unwrap_or(0),
    })
    // Output only is for the document: the server ignores what is sent.
    .filter(|r| !r.output_only || r.required || r.max_len > 0 || r.min.is_some())
}

/// The Rust path of a message's generated type.
fn rust_type(message: &MessageDescriptor) -> Result<String, String> {
    if message.parent_message().is_some() {
        return Err(format!(
            "{}: rules on nested messages are not generated",
            message.full_name()
        ));
    }
    match message.package_name() {
        "google.protobuf" => Ok(format!("::prost_types::{}", message.name())),
        package => Ok(format!(
            "crate::pb::{}::{}",
            package.replace('.', "::"),
            message.name()
        )),
    }
}

/// Whether `message`, or a message it holds, has a field with rules (a
/// repeated field counts only with rules of its own).
fn has_rules(message: &MessageDescriptor, extension: &ExtensionDescriptor) -> bool {
    message.fields().filter(|f| !f.is_map() && !in_oneof(f)).any(|field| {
        rules(&field, extension).is_some()
            || (!field.is_list()
                && matches!(field.kind(), Kind::Message(m) if m.full_name() != message.full_name() && has_rules(&m, extension)))
    })
}

/// Whether `field` is a member of a (real, not synthetic) oneof, which the
/// rules do not reach.
fn in_oneof(field: &FieldDescriptor) -> bool {
    field.containing_oneof().is_some_and(|o| !o.is_synthetic())
}

/// The checks of the repeated field `name` with `rules`: its length, then
/// each entry's own rules under its index.
fn repeated(
    at: &str,
    name: &str,
    kind: Kind,
    r: &Rules,
    extension: &ExtensionDescriptor,
    patterns: &mut Vec<(String, String)>,
) -> Result<String, Box<dyn std::error::Error>> {
    let mut body = format!(
        "        v.items(at, {name:?}, self.{name}.len(), {}, {});\n",
        r.required, r.max_items
    );
    match kind {
        Kind::String => {
            let pattern = if r.pattern.is_empty() {
                "None".to_owned()
            } else {
                patterns.push((at.to_owned(), r.pattern.clone()));
                format!("Some(&PATTERN_{})", patterns.len() - 1)
            };
            body.push_str(&format!(
                "        for (i, entry) in self.{name}.iter().enumerate() {{ v.string(at, &format!(\"{name}[{{i}}]\"), entry, StringRules {{ required: {}, max_len: {}, id_prefix: {:?} }}, {pattern}); }}\n",
                r.required, r.max_len, r.id_prefix
            ));
        }
        Kind::Message(m)
            if r.max_len == 0
                && r.id_prefix.is_empty()
                && r.pattern.is_empty()
                && r.min.is_none() =>
        {
            if has_rules(&m, extension) {
                body.push_str(&format!(
                    "        for (i, entry) in self.{name}.iter().enumerate() {{ entry.validate_at(&format!(\"{{at}}{name}[{{i}}].\"), v); }}\n"
                ));
            }
        }
        _ if r.max_len == 0
            && r.id_prefix.is_empty()
            && r.pattern.is_empty()
            && r.min.is_none() => {}
        _ => return Err(format!("{at}: these rules do not apply to its entries").into()),
    }
    Ok(body)
}

/// `impl Validate` for every message whose fields carry rules, and the
/// table of patterns.
fn validators(pool: &DescriptorPool) -> Result<String, Box<dyn std::error::Error>> {
    use std::fmt::Write;
    let extension = pool
        .get_extension_by_name("brewmesh.validate.v1.rules")
        .ok_or("brewmesh.validate.v1.rules is not in the descriptor set")?;
    let mut patterns = Vec::new();
    let mut impls = String::new();
    for message in pool.all_messages() {
        if !message.package_name().starts_with("brewmesh.") || !has_rules(&message, &extension) {
            continue;
        }
        let mut body = String::new();
        for field in message.fields() {
            let rules = rules(&field, &extension);
            let name = field.name();
            let at = format!("{}.{name}", message.full_name());
            if field.is_map() || in_oneof(&field) {
                if rules.is_some() {
                    return Err(
                        format!("{at}: rules on map and oneof fields are not generated").into(),
                    );
                }
                continue;
            }
            if field.is_list() {
                if let Some(r) = rules {
                    body.push_str(&repeated(
                        &at,
                        name,
                        field.kind(),
                        &r,
                        &extension,
                        &mut patterns,
                    )?);
                }
                continue;
            }
            if rules.as_ref().is_some_and(|r| r.max_items > 0) {
                return Err(format!("{at}: max_items is for repeated fields").into());
            }
            match (field.kind(), rules) {
                (Kind::String, Some(r)) => {
                    let pattern = if r.pattern.is_empty() {
                        "None".to_owned()
                    } else {
                        patterns.push((at.clone(), r.pattern.clone()));
                        format!("Some(&PATTERN_{})", patterns.len() - 1)
                    };
                    writeln!(
                        body,
                        "        v.string(at, {name:?}, &self.{name}, StringRules {{ required: {}, max_len: {}, id_prefix: {:?} }}, {pattern});",
                        r.required, r.max_len, r.id_prefix
                    )?;
                }
                (
                    Kind::Int32 | Kind::Int64 | Kind::Uint32 | Kind::Sint32 | Kind::Sint64,
                    Some(r),
                ) => {
                    if let Some(min) = r.min {
                        writeln!(
                            body,
                            "        v.integer(at, {name:?}, i64::from(self.{name}), {min});"
                        )?;
                    }
                }
                (Kind::Message(m), rules) if m.full_name() == "google.protobuf.Duration" => {
                    let r = rules.unwrap_or_default();
                    if r.required {
                        writeln!(
                            body,
                            "        v.present(at, {name:?}, self.{name}.is_some());"
                        )?;
                    }
                    if let Some(min) = r.min {
                        writeln!(
                            body,
                            "        v.duration(at, {name:?}, self.{name}.as_ref(), {min});"
                        )?;
                    }
                }
                (Kind::Message(m), rules) if has_rules(&m, &extension) => {
                    let required = rules.is_some_and(|r| r.required);
                    writeln!(
                        body,
                        "        v.message(at, {name:?}, self.{name}.as_ref(), {required});"
                    )?;
                }
                (Kind::Message(_), Some(r)) if r.required => {
                    writeln!(
                        body,
                        "        v.present(at, {name:?}, self.{name}.is_some());"
                    )?;
                }
                (_, Some(_)) => {
                    return Err(format!("{at}: these rules do not apply to its type").into());
                }
                (_, None) => {}
            }
        }
        writeln!(
            impls,
            "impl Validate for {} {{\n    fn validate_at(&self, at: &str, v: &mut Violations) {{\n{body}    }}\n}}\n",
            rust_type(&message)?
        )?;
    }
    let mut out =
        String::from("// Generated by build.rs from the (brewmesh.validate.v1.rules) options.\n\n");
    out.push_str("use crate::validate::{StringRules, Validate, Violations};\n\n");
    out.push_str("/// Each `pattern` rule: the field it is on, and the pattern.\n");
    out.push_str("pub const PATTERNS: &[(&str, &str)] = &[\n");
    for (at, pattern) in &patterns {
        writeln!(out, "    ({at:?}, {pattern:?}),")?;
    }
    out.push_str("];\n\n");
    for i in 0..patterns.len() {
        writeln!(
            out,
            "static PATTERN_{i}: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| regex::Regex::new(PATTERNS[{i}].1).expect(\"every pattern compiles (a unit test checks)\"));"
        )?;
    }
    out.push('\n');
    out.push_str(&impls);
    Ok(out)
}

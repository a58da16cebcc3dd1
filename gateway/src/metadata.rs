//! HTTP headers ⇄ gRPC metadata: what goes upstream (authorization, trace
//! context, `Grpc-Metadata-*`, the deadline) and what comes back.

use std::time::Duration;

use http::{HeaderMap, HeaderName};
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};

/// Most bytes of the headers passed upstream as metadata (names and
/// values): a bigger set would make the backend refuse the headers of the
/// connection every client's calls share, and reset it for all of them;
/// the one request is refused here instead.
pub const MAX_METADATA_BYTES: usize = 8 * 1024;

/// Why a request's headers cannot go upstream.
#[derive(Debug)]
pub(crate) enum Unforwardable {
    /// A `-bin` header that is not base64.
    NotBase64(String),
    /// More than [`MAX_METADATA_BYTES`] to forward (the size).
    TooLarge(usize),
}

/// Headers that go upstream under their own name.
const PASSED_THROUGH: &[&str] = &["authorization", "traceparent", "tracestate", "baggage"];

/// Authorization, trace context and `Grpc-Metadata-*` go upstream; binary
/// keys (`Grpc-Metadata-Trace-Bin`) carry base64, padded or not, as in
/// grpc-gateway, and a value that is not base64 is the client's error.
pub(crate) fn forward_headers(
    headers: &HeaderMap,
    metadata: &mut MetadataMap,
) -> Result<(), Unforwardable> {
    use base64::Engine as _;
    const BASE64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    let mut size = 0;
    for (name, value) in headers {
        let name = name.as_str();
        let key = if PASSED_THROUGH.contains(&name) {
            name
        } else if let Some(stripped) = name.strip_prefix("grpc-metadata-") {
            stripped
        } else {
            continue;
        };
        // Who the caller is, the gateway says ([`crate::auth`]), never the
        // client.
        if brewmesh_runtime::caller::reserved(key) {
            continue;
        }
        size += key.len() + value.len();
        if size > MAX_METADATA_BYTES {
            let total = headers
                .iter()
                .map(|(n, v)| n.as_str().len() + v.len())
                .sum();
            return Err(Unforwardable::TooLarge(total));
        }
        if key.ends_with("-bin") {
            let bytes = BASE64.decode(value.as_bytes()).map_err(|error| {
                Unforwardable::NotBase64(format!("header {name}: not base64 ({error})"))
            })?;
            if let Ok(key) = MetadataKey::from_bytes(key.as_bytes()) {
                metadata.append_bin(key, MetadataValue::from_bytes(&bytes));
            }
        } else if let (Ok(key), Ok(value)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value.as_bytes()),
        ) {
            metadata.append(key, value);
        }
    }
    Ok(())
}

/// The client's `Grpc-Timeout` (`100m`, `5S`, …), if any.
pub(crate) fn deadline(headers: &HeaderMap) -> Result<Option<Duration>, String> {
    let Some(value) = headers.get("grpc-timeout") else {
        return Ok(None);
    };
    let bad = || format!("Grpc-Timeout {value:?}: expected digits and a unit (H M S m u n)");
    let text = value.to_str().map_err(|_| bad())?;
    if text.len() < 2 || text.len() > 9 {
        return Err(bad());
    }
    let (digits, unit) = text.split_at(text.len() - 1);
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let duration = match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return Err(bad()),
    };
    Ok(Some(duration))
}

/// The backend's metadata as `Grpc-Metadata-*` headers, as grpc-gateway
/// returns them (binary values in base64).
pub(crate) fn add_metadata(headers: &mut HeaderMap, metadata: &MetadataMap) {
    for (name, value) in metadata.clone().into_headers().iter() {
        let name = name.as_str();
        if name.starts_with("grpc-") || name == "content-type" || name == "date" || name == "te" {
            continue;
        }
        if let Ok(header) = HeaderName::from_bytes(format!("grpc-metadata-{name}").as_bytes()) {
            headers.append(header, value.clone());
        }
    }
}

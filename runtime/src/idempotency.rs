//! Idempotency keys: what is stored to tell a retry from a different request
//! that reuses the same key.
//!
//! A request's fingerprint is the method and its protobuf encoding. prost
//! encodes fields in field order and skips defaults, so two equal messages
//! always encode the same; comparing encodings needs no hash to collide.

use std::fmt::Write as _;

/// The fingerprint of `request` sent to `method`, as stored text.
pub fn fingerprint(method: &str, request: &impl prost::Message) -> String {
    format!("{method}:{}", to_hex(&request.encode_to_vec()))
}

/// The answer to a request that reuses a key another request was stored
/// under: ALREADY_EXISTS (409 through the gateway), as the request is well
/// formed but conflicts with what the key already names — the IETF
/// Idempotency-Key draft's "conflict" — with the field named in an ErrorInfo.
pub fn reused(message: String) -> tonic::Status {
    reused_at(message, "idempotency_key")
}

/// [`reused`] for the key at `field`, a field path such as
/// `requests[3].idempotency_key` (one entry of a batch).
pub fn reused_at(message: String, field: &str) -> tonic::Status {
    use tonic_types::{ErrorDetails, StatusExt};
    let details = ErrorDetails::with_error_info(
        "IDEMPOTENCY_KEY_REUSED",
        "brewmesh",
        [("field".to_owned(), field.to_owned())],
    );
    tonic::Status::with_error_details(tonic::Code::AlreadyExists, message, details)
}

/// Lower-case hex of `bytes`, for storing bytes in a portable TEXT column.
pub fn to_hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// The bytes behind [`to_hex`]'s text; `None` if it is not such text.
pub fn from_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips() {
        let bytes = [0u8, 1, 0x7f, 0x80, 0xff];
        assert_eq!(to_hex(&bytes), "00017f80ff");
        assert_eq!(from_hex(&to_hex(&bytes)).as_deref(), Some(&bytes[..]));
        assert_eq!(from_hex("abc"), None);
        assert_eq!(from_hex("zz"), None);
    }

    #[test]
    fn fingerprints_differ_by_method_and_content() {
        let a = prost_types::Duration {
            seconds: 1,
            nanos: 0,
        };
        let b = prost_types::Duration {
            seconds: 2,
            nanos: 0,
        };
        assert_eq!(fingerprint("M", &a), fingerprint("M", &a));
        assert_ne!(fingerprint("M", &a), fingerprint("M", &b));
        assert_ne!(fingerprint("M", &a), fingerprint("N", &a));
    }
}

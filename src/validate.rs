//! The request rules written in the protos (`(brewmesh.validate.v1.rules)`),
//! checked. build.rs generates a [`Validate`] impl for every message whose
//! fields carry rules; the gateway's OpenAPI document reads the same options,
//! so what the document calls valid is what the services accept.
//!
//! A check answers like Google APIs do: `INVALID_ARGUMENT` with a
//! `google.rpc.BadRequest` detail naming every offending field, so a client
//! (or the gateway, as a 400) can point at the field without parsing the
//! message.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

/// A message whose fields carry rules.
pub trait Validate {
    /// Records in `violations` every field of `self` (under `at`, a field
    /// path such as `amount.`) that breaks its rules.
    fn validate_at(&self, at: &str, violations: &mut Violations);

    /// `Ok`, or `INVALID_ARGUMENT` naming every field at fault.
    fn validate(&self) -> Result<(), Status> {
        let mut violations = Violations::new();
        self.validate_at("", &mut violations);
        violations.check()
    }
}

/// The rules of one string field, as the proto gives them.
#[derive(Debug, Clone, Copy, Default)]
pub struct StringRules {
    /// Must hold a character other than ASCII white space.
    pub required: bool,
    /// At most this many characters; 0 is no limit.
    pub max_len: u32,
    /// An id this system gave with this prefix; "" is any string.
    pub id_prefix: &'static str,
}

/// Field violations collected while checking one request.
#[derive(Debug, Default)]
#[must_use = "call check() to turn violations into a status"]
pub struct Violations(Vec<FieldViolation>);

/// The pattern (unanchored) of a string that [`blank`] is not, as the
/// OpenAPI document states a required string: ASCII white space only, which
/// every regex dialect reads alike.
pub const NOT_BLANK_PATTERN: &str = "[^ \\t\\n\\r\\f\\v]";

/// The pattern of the ids [`is_id`] accepts for `prefix`.
pub fn id_pattern(prefix: &str) -> String {
    format!("^{prefix}_[0-9a-f]{{32}}$")
}

/// The white space a required string must hold more than.
fn blank(value: &str) -> bool {
    value
        .bytes()
        .all(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r' | b'\x0c' | b'\x0b'))
}

/// Whether `id` is `prefix`, `_` and 32 lower-case hex digits.
pub fn is_id(prefix: &str, id: &str) -> bool {
    id.strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix('_'))
        .is_some_and(|hex| {
            hex.len() == 32 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        })
}

impl Violations {
    /// No violations yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `field` (a proto field path such as `amount.currency_code`)
    /// is wrong, and why.
    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.0.push(FieldViolation::new(field, description));
    }

    /// Checks the string `at``name` against `rules` and, if set,
    /// `pattern` (which an empty value need not match unless required).
    pub fn string(
        &mut self,
        at: &str,
        name: &str,
        value: &str,
        rules: StringRules,
        pattern: Option<&regex::Regex>,
    ) {
        if value.is_empty() || (rules.required && blank(value)) {
            if rules.required {
                self.add(format!("{at}{name}"), "is required");
            }
            return;
        }
        if rules.max_len > 0 && value.chars().count() > rules.max_len as usize {
            let max = rules.max_len;
            self.add(
                format!("{at}{name}"),
                format!("must be at most {max} characters"),
            );
        }
        let prefix = rules.id_prefix;
        if !prefix.is_empty() && !is_id(prefix, value) {
            self.add(
                format!("{at}{name}"),
                format!("must be an id like {prefix}_ and 32 hex digits"),
            );
        }
        if let Some(regex) = pattern
            && !regex.is_match(value)
        {
            let pattern = regex.as_str();
            self.add(format!("{at}{name}"), format!("must match {pattern}"));
        }
    }

    /// Checks that the repeated field `at``name`, holding `len` entries, has
    /// one at least if `required`, and at most `max` (0: no limit).
    pub fn items(&mut self, at: &str, name: &str, len: usize, required: bool, max: u32) {
        if required && len == 0 {
            self.add(format!("{at}{name}"), "is required: at least one entry");
        }
        if max > 0 && len > max as usize {
            self.add(
                format!("{at}{name}"),
                format!("must have at most {max} entries, not {len}"),
            );
        }
    }

    /// Checks the integer `at``name` is at least `min`.
    pub fn integer(&mut self, at: &str, name: &str, value: i64, min: i64) {
        if value < min {
            let description = match min {
                0 => "must not be negative".to_owned(),
                1 => "must be positive".to_owned(),
                min => format!("must be at least {min}"),
            };
            self.add(format!("{at}{name}"), description);
        }
    }

    /// Checks the duration `at``name`, if set, is at least `min` seconds.
    pub fn duration(
        &mut self,
        at: &str,
        name: &str,
        value: Option<&prost_types::Duration>,
        min: i64,
    ) {
        let Some(value) = value else { return };
        let below = value.seconds < min || (value.seconds == min && value.nanos < 0);
        if below {
            let description = match min {
                0 => "must not be negative".to_owned(),
                min => format!("must be at least {min}s"),
            };
            self.add(format!("{at}{name}"), description);
        }
    }

    /// Checks the message `at``name`: present if `required`, and its own
    /// fields' rules if present.
    pub fn message<M: Validate>(
        &mut self,
        at: &str,
        name: &str,
        value: Option<&M>,
        required: bool,
    ) {
        match value {
            Some(value) => value.validate_at(&format!("{at}{name}."), self),
            None if required => self.add(format!("{at}{name}"), "is required"),
            None => {}
        }
    }

    /// Checks that the message `at``name`, one without rules of its own, is
    /// present.
    pub fn present(&mut self, at: &str, name: &str, present: bool) {
        if !present {
            self.add(format!("{at}{name}"), "is required");
        }
    }

    /// `Ok` when nothing was recorded, else one `INVALID_ARGUMENT` status
    /// carrying every violation as `google.rpc.BadRequest`.
    pub fn check(self) -> Result<(), Status> {
        if self.0.is_empty() {
            return Ok(());
        }
        Err(bad_request(self.0))
    }
}

/// At most this many violations are reported: a batch of a thousand bad
/// entries would otherwise answer with trailers no HTTP/2 peer accepts.
pub const MAX_VIOLATIONS: usize = 50;

/// `INVALID_ARGUMENT` carrying `violations` as `google.rpc.BadRequest` (the
/// first [`MAX_VIOLATIONS`]; the message says how many more there were).
pub fn bad_request(mut violations: Vec<FieldViolation>) -> Status {
    let more = violations.len().saturating_sub(MAX_VIOLATIONS);
    violations.truncate(MAX_VIOLATIONS);
    let fields: Vec<&str> = violations.iter().map(|v| v.field.as_str()).collect();
    let mut message = format!("invalid request: {}", fields.join(", "));
    if more > 0 {
        message.push_str(&format!(" and {more} more"));
    }
    Status::with_error_details(
        Code::InvalidArgument,
        message,
        ErrorDetails::with_bad_request(violations),
    )
}

/// Every `pattern` rule in the protos, with the field it is on, so a test
/// can compile each one.
pub use crate::rules::PATTERNS;

#[cfg(test)]
mod tests {
    use super::*;

    const REQUIRED: StringRules = StringRules {
        required: true,
        max_len: 10,
        id_prefix: "",
    };

    #[test]
    fn every_violation_is_reported_in_bad_request_details() {
        let mut v = Violations::new();
        v.string("", "order_id", "", REQUIRED, None);
        v.string("", "card_token", "tok_0123456789abc", REQUIRED, None);
        v.string("", "customer_name", "Ada", REQUIRED, None);
        v.string("", "blank", " \t\r\n", REQUIRED, None);
        let status = v.check().expect_err("three fields are wrong");
        assert_eq!(status.code(), Code::InvalidArgument);
        let details = status
            .get_details_bad_request()
            .expect("bad request details");
        let fields: Vec<_> = details
            .field_violations
            .iter()
            .map(|f| f.field.as_str())
            .collect();
        assert_eq!(fields, ["order_id", "card_token", "blank"]);
        assert!(status.message().contains("order_id"));
    }

    #[test]
    fn an_optional_field_may_be_empty_but_not_wrong() {
        let id = StringRules {
            id_prefix: "ord",
            ..StringRules::default()
        };
        let mut v = Violations::new();
        v.string("", "page_token", "", id, None);
        v.string(
            "",
            "page_token",
            "ord_0190b2c3d4e5f60718293a4b5c6d7e8f",
            id,
            None,
        );
        v.integer("", "page_size", 0, 0);
        v.duration("", "ttl", None, 0);
        assert!(v.check().is_ok());

        let mut v = Violations::new();
        v.string("", "page_token", "ord_1", id, None);
        v.integer("", "page_size", -1, 0);
        let ttl = prost_types::Duration {
            seconds: 0,
            nanos: -1,
        };
        v.duration("", "ttl", Some(&ttl), 0);
        let fields: Vec<String> = v.0.iter().map(|f| f.field.clone()).collect();
        assert_eq!(fields, ["page_token", "page_size", "ttl"]);
    }

    #[test]
    fn the_documented_patterns_say_what_the_checks_accept() {
        let not_blank = regex::Regex::new(NOT_BLANK_PATTERN).expect("pattern");
        let id = regex::Regex::new(&id_pattern("ord")).expect("pattern");
        for value in [
            "",
            " ",
            " \t\r\n\x0c\x0b",
            "a",
            " a ",
            "\u{a0}",
            "ord_0190b2c3d4e5f60718293a4b5c6d7e8f",
            "ord_0190B2C3D4E5F60718293A4B5C6D7E8F",
            "ord_1",
            "pay_0190b2c3d4e5f60718293a4b5c6d7e8f",
            "ord_0190b2c3d4e5f60718293a4b5c6d7e8f\n",
        ] {
            assert_eq!(not_blank.is_match(value), !blank(value), "{value:?}");
            assert_eq!(id.is_match(value), is_id("ord", value), "{value:?}");
        }
    }

    #[test]
    fn every_pattern_in_the_protos_compiles() {
        assert!(!PATTERNS.is_empty());
        for (field, pattern) in PATTERNS {
            regex::Regex::new(pattern).unwrap_or_else(|e| panic!("{field}: {e}"));
        }
    }
}

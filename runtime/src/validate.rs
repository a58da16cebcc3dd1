//! Request validation that answers like Google APIs do: `INVALID_ARGUMENT`
//! with a `google.rpc.BadRequest` detail naming every offending field, so a
//! client (or the gateway, as a 400) can point at the field without parsing
//! the message.
//!
//! Handlers collect violations in a [`Violations`] and call
//! [`Violations::check`] once, so one bad request reports all of its faults.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

/// The longest idempotency key, order or merchant reference accepted.
pub const MAX_KEY_LEN: usize = 128;

/// Field violations collected while checking one request.
#[derive(Debug, Default)]
#[must_use = "call check() to turn violations into a status"]
pub struct Violations(Vec<FieldViolation>);

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

    /// `field` must be set and at most `max` characters long.
    pub fn required(&mut self, field: &str, value: &str, max: usize) {
        if value.trim().is_empty() {
            self.add(field, "is required");
        } else {
            self.at_most(field, value, max);
        }
    }

    /// `field`, if set, must be at most `max` characters long.
    pub fn at_most(&mut self, field: &str, value: &str, max: usize) {
        if value.chars().count() > max {
            self.add(field, format!("must be at most {max} characters"));
        }
    }

    /// `field` must be an id this system gave, `<prefix>_` and 32 hex digits.
    pub fn id(&mut self, field: &str, prefix: &str, value: &str) {
        if value.is_empty() {
            self.add(field, "is required");
        } else if !crate::ids::is_valid(prefix, value) {
            self.add(
                field,
                format!("must be an id like {prefix}_ and 32 hex digits"),
            );
        }
    }

    /// `field`, a page token, must be empty or one this service gave (the
    /// id of the last item of the previous page).
    pub fn page_token(&mut self, field: &str, prefix: &str, value: &str) {
        if !value.is_empty() && !crate::ids::is_valid(prefix, value) {
            self.add(field, "is not a token this service gave");
        }
    }

    /// `field` must be a well-formed idempotency key.
    pub fn idempotency_key(&mut self, field: &str, value: &str) {
        self.required(field, value, MAX_KEY_LEN);
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

fn bad_request(violations: Vec<FieldViolation>) -> Status {
    let fields: Vec<&str> = violations.iter().map(|v| v.field.as_str()).collect();
    let message = format!("invalid request: {}", fields.join(", "));
    Status::with_error_details(
        Code::InvalidArgument,
        message,
        ErrorDetails::with_bad_request(violations),
    )
}

/// A single-field `INVALID_ARGUMENT`, for faults found after the first checks
/// (an unknown menu item, a reused idempotency key).
pub fn invalid_argument(field: impl Into<String>, description: impl Into<String>) -> Status {
    bad_request(vec![FieldViolation::new(field, description)])
}

/// The token of the page after one whose last item is `last`, if `more`
/// follow; empty on the last page.
pub fn next_page_token(more: bool, last: Option<&str>) -> String {
    match (more, last) {
        (true, Some(last)) => last.to_owned(),
        _ => String::new(),
    }
}

/// A page size as AIP-158 has it: 0 means `default`, above `max` is `max`,
/// negative is a violation.
pub fn page_size(
    violations: &mut Violations,
    field: &str,
    value: i32,
    default: u32,
    max: u32,
) -> u32 {
    match value {
        0 => default,
        v if v < 0 => {
            violations.add(field, "must not be negative");
            default
        }
        v => (v as u32).min(max),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_violation_is_reported_in_bad_request_details() {
        let mut v = Violations::new();
        v.required("order_id", "", 10);
        v.required("card_token", "tok_0123456789abc", 10);
        v.required("customer_name", "Ada", 10);
        let status = v.check().expect_err("two fields are wrong");
        assert_eq!(status.code(), Code::InvalidArgument);
        let details = status
            .get_details_bad_request()
            .expect("bad request details");
        let fields: Vec<_> = details
            .field_violations
            .iter()
            .map(|f| f.field.as_str())
            .collect();
        assert_eq!(fields, ["order_id", "card_token"]);
        assert!(status.message().contains("order_id"));
    }

    #[test]
    fn no_violation_is_ok() {
        let mut v = Violations::new();
        v.required("order_id", "ord_1", 10);
        assert!(v.check().is_ok());
    }

    #[test]
    fn page_sizes_follow_aip_158() {
        let mut v = Violations::new();
        assert_eq!(page_size(&mut v, "page_size", 0, 50, 1000), 50);
        assert_eq!(page_size(&mut v, "page_size", 5000, 50, 1000), 1000);
        assert_eq!(page_size(&mut v, "page_size", 7, 50, 1000), 7);
        assert!(v.check().is_ok());
        let mut v = Violations::new();
        page_size(&mut v, "page_size", -1, 50, 1000);
        assert!(v.check().is_err());
    }
}

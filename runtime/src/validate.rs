//! Request validation that answers like Google APIs do: `INVALID_ARGUMENT`
//! with a `google.rpc.BadRequest` detail naming every offending field, so a
//! client (or the gateway, as a 400) can point at the field without parsing
//! the message.
//!
//! The rules themselves are written in the protos and checked by the
//! [`Validate`] impls build.rs generates (`brewmesh::validate`): a handler
//! calls `request.validate()?` first, and one bad request reports all of its
//! faults. What is here is for the checks a rule cannot state.

pub use brewmesh::validate::{Validate, Violations, bad_request};

/// The token of the page after one whose last item is `last`, if `more`
/// follow; empty on the last page.
pub fn next_page_token(more: bool, last: Option<&str>) -> String {
    match (more, last) {
        (true, Some(last)) => last.to_owned(),
        _ => String::new(),
    }
}

/// A page size as AIP-158 has it: 0 means `default`, above `max` is `max`
/// (a negative one is refused by the request's rules).
pub fn page_size(value: i32, default: u32, max: u32) -> u32 {
    match u32::try_from(value) {
        Ok(0) | Err(_) => default,
        Ok(v) => v.min(max),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_sizes_follow_aip_158() {
        assert_eq!(page_size(0, 50, 1000), 50);
        assert_eq!(page_size(5000, 50, 1000), 1000);
        assert_eq!(page_size(7, 50, 1000), 7);
    }
}

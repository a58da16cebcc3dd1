//! Server-assigned identifiers: a short type prefix and a UUIDv7 in hex.
//!
//! UUIDv7 sorts by creation time, so ordering by id is ordering by age, which
//! is what keyset pagination ("newest first") needs without a second index.

/// A new identifier such as `pay_0190b2c3...`: `prefix`, `_`, 32 hex digits.
pub fn new(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::now_v7().simple())
}

/// Whether `id` has the shape [`new`] gives for `prefix` (the check the
/// protos' `id_prefix` rule makes).
pub use brewmesh::validate::is_id as is_valid;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_ids_are_valid_and_sort_by_creation() {
        let first = new("pay");
        let second = new("pay");
        assert!(is_valid("pay", &first), "{first}");
        assert!(first < second, "{first} !< {second}");
    }

    #[test]
    fn ids_of_another_shape_are_not_valid() {
        assert!(!is_valid("pay", "ord_0190b2c3d4e5f60718293a4b5c6d7e8f"));
        assert!(!is_valid("pay", "pay_0190b2c3"));
        assert!(!is_valid("pay", "pay_0190B2C3D4E5F60718293A4B5C6D7E8F"));
        assert!(!is_valid("pay", "pay0190b2c3d4e5f60718293a4b5c6d7e8f0"));
    }
}

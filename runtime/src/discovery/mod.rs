//! Finding peers and being found: [`registration`] with the registry,
//! [`resolve`]rs that report a service's addresses, and client channels
//! [`balance`]d over whatever a resolver reports.

pub mod balance;
pub mod registration;
pub mod resolve;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

pub use balance::{Balanced, Balancing, CallError, balanced, balanced_with};
pub use registration::{Registration, RegistrationError, RegistryArgs};
pub use resolve::{Source, resolve};

/// The longest wait between two attempts to reach a registry.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The set of addresses a service has now.
pub type Addresses = Arc<BTreeSet<String>>;

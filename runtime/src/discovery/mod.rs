//! Finding peers and being found: [`registration`] with the registry,
//! [`resolve`]rs that report a service's addresses, and client channels
//! [`balance`]d over whatever a resolver reports, under retry and hedging
//! [`policy`].

pub mod balance;
pub mod policy;
pub mod registration;
pub mod resolve;

pub use balance::{Balanced, Balancing, CallError, balanced, balanced_with};
pub use policy::{Policies, ServiceConfig};
pub use registration::{Registration, RegistrationError, RegistryArgs};
pub use resolve::{Addresses, Source, resolve};

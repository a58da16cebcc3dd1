//! The brewmesh runtime: what every brewmesh process shares.
//!
//! # Layout
//!
//! - [`server`]: serves a service's routes with health, reflection,
//!   TCP_NODELAY and a graceful drain under a deadline. Start here.
//! - [`health`]: grpc.health.v1 as the protocol has it (SERVICE_UNKNOWN
//!   watches stay open), whose watchers do not hold up a drain.
//! - [`reflection`]: server reflection v1 and v1alpha; a failed question is
//!   an `error_response` on the stream, which goes on.
//! - [`secret`]: the registry token, never printed.
//! - [`shutdown`]: SIGTERM/SIGINT (or a parent gone) turned into a
//!   cancellation token.
//! - [`fault`]: faults injected per RPC (delay, abort), from flags or
//!   switched at run time at `/admin/faults`.
//! - [`ready`]: the `serving` line and the `--ready-file`, readiness as a
//!   contract.
//! - [`validate`]: `INVALID_ARGUMENT` with `google.rpc.BadRequest` field
//!   violations.
//! - [`client`]: gRPC channels to peers given by address; [`caller`]: the
//!   end user a request is for, as the gateway vouches.
//! - [`discovery`]: registration with the registry, resolvers (static,
//!   DNS, registry) and P2C/peak-EWMA balanced channels; [`ejection`] takes
//!   endpoints that keep failing out for a while.
//! - [`db`]: SQLite (default) or PostgreSQL pools, durable across `kill -9`.
//! - [`telemetry`]: JSON (or text) logs with trace ids, and OpenTelemetry
//!   traces over OTLP configured by the `OTEL_*` variables;
//!   [`instrument`] traces and measures every gRPC call (server and
//!   client); [`metrics`] serves them to Prometheus.
//! - [`defaults`]: each role's address when no flag says otherwise.
//! - [`idempotency`]: request fingerprints for idempotency keys.
//! - [`ids`] and [`time`]: identifiers and timestamps as the contracts spell them.
//!
//! The contracts it serves are the root crate's (`brewmesh::pb`). The
//! services (`services/*`) are libraries with a `run(listener, config,
//! shutdown)` function built on this crate; the `brewmesh` binary (`cli/`)
//! only wires flags to them. Test support is a crate of its own
//! (`brewmesh-testing`), a dev-dependency only.

pub mod caller;
pub mod client;
pub mod db;
pub mod defaults;
pub mod discovery;
pub mod ejection;
pub mod fault;
pub mod files;
pub mod health;
pub mod idempotency;
pub mod ids;
pub mod instrument;
pub mod metrics;
pub mod mtls;
pub mod pod;
pub mod ready;
pub mod reflection;
pub mod secret;
pub mod server;
pub mod shutdown;
pub mod telemetry;
pub mod time;
pub mod validate;

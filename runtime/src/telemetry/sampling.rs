//! The sampling decision, made once where a trace enters a process, and
//! honored by everything below it.
//!
//! tracing-opentelemetry builds an OpenTelemetry span for every `tracing`
//! span it sees and asks the sampler only when the span is built, so an
//! unsampled request used to cost nearly what a sampled one does. Here the
//! decision comes first: [`request_span`] decides (the caller's sampled
//! flag, or `OTEL_TRACES_SAMPLER` at the edge of a trace), and the
//! OpenTelemetry layer's filter ([`otel_filter`]) lets a span through only
//! when its request was sampled. An unsampled request has no span at all:
//! only its trace ids ([`Unsampled`]), carried beside it as a task-local
//! ([`Traced::attach`]) for the log lines and for the `traceparent`
//! (sampled flag off) sent to the next hop; spans made inside it are
//! refused, so no OpenTelemetry span is built in any process. The SDK's
//! own sampler is always-on: what reaches it was already chosen.

use std::cell::Cell;
use std::sync::OnceLock;

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt as _, TraceId};
use tracing::{Metadata, Subscriber};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

/// What a trace's root is decided by.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Root {
    On,
    Off,
    /// Sampled when the trace id falls in this share, as the SDK's
    /// `TraceIdRatioBased` decides.
    Ratio(f64),
}

/// `OTEL_TRACES_SAMPLER` (and `_ARG`), as the specification names them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampler {
    root: Root,
    /// Whether a caller's sampled flag decides (the `parentbased_*` ones).
    parent_based: bool,
}

impl Sampler {
    /// From `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG`; the default
    /// is `parentbased_always_on`.
    pub fn from_env() -> Self {
        let name = std::env::var("OTEL_TRACES_SAMPLER").unwrap_or_default();
        let arg = std::env::var("OTEL_TRACES_SAMPLER_ARG").ok();
        Self::parse(&name, arg.as_deref())
    }

    fn parse(name: &str, arg: Option<&str>) -> Self {
        let ratio = || {
            let p = arg
                .and_then(|a| a.trim().parse::<f64>().ok())
                .filter(|p| (0.0..=1.0).contains(p))
                .unwrap_or(1.0);
            Root::Ratio(p)
        };
        let (root, parent_based) = match name.trim().to_ascii_lowercase().as_str() {
            "always_on" => (Root::On, false),
            "always_off" => (Root::Off, false),
            "traceidratio" => (ratio(), false),
            "parentbased_always_off" => (Root::Off, true),
            "parentbased_traceidratio" => (ratio(), true),
            _ => (Root::On, true),
        };
        Self { root, parent_based }
    }

    /// Whether a span of `trace_id` under `parent` (invalid when there is
    /// none) is sampled.
    pub fn decide(&self, parent: &SpanContext, trace_id: TraceId) -> bool {
        if self.parent_based && parent.is_valid() {
            return parent.is_sampled();
        }
        match self.root {
            Root::On => true,
            Root::Off => false,
            Root::Ratio(p) => {
                // The low 63 bits of the trace id against p · 2^63, as the
                // SDK's TraceIdRatioBased compares them.
                #[allow(
                    clippy::cast_possible_truncation,
                    clippy::cast_sign_loss,
                    clippy::cast_precision_loss
                )]
                let bound = (p * (1u64 << 63) as f64) as u64;
                let bytes = trace_id.to_bytes();
                let low = u64::from_be_bytes([
                    bytes[8], bytes[9], bytes[10], bytes[11], bytes[12], bytes[13], bytes[14],
                    bytes[15],
                ]) >> 1;
                low < bound
            }
        }
    }
}

/// The process's sampler, read once.
pub fn sampler() -> &'static Sampler {
    static SAMPLER: OnceLock<Sampler> = OnceLock::new();
    SAMPLER.get_or_init(Sampler::from_env)
}

/// The trace ids of a request that is not sampled, kept in its span's
/// extensions: the caller's trace id (or a new one), and this hop's span
/// id, which the next hop sees as its parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unsampled {
    /// The trace's id.
    pub trace_id: TraceId,
    /// This hop's id.
    pub span_id: SpanId,
}

impl Unsampled {
    /// The W3C `traceparent` for the next hop, sampled flag off.
    pub fn traceparent(&self) -> String {
        format!("00-{}-{}-00", self.trace_id, self.span_id)
    }
}

fn new_trace_id() -> TraceId {
    TraceId::from(fastrand::u128(1..))
}

fn new_span_id() -> SpanId {
    SpanId::from(fastrand::u64(1..))
}

thread_local! {
    /// The decision for the span being made on this thread by
    /// [`request_span`], read by [`otel_filter`] as the span is created.
    static DECIDED: Cell<Option<bool>> = const { Cell::new(None) };
}

tokio::task_local! {
    /// The trace ids of the unsampled request this task works for.
    static UNSAMPLED: Option<Unsampled>;
}

/// What a request (or a piece of background work) is traced as: a span
/// that OpenTelemetry exports, or — not sampled — no span at all, only its
/// trace ids, carried beside the work as a task-local.
#[derive(Debug, Clone)]
pub enum Traced {
    /// Sampled: the span, with its parent set.
    Span(tracing::Span),
    /// Not sampled: the ids for the log lines and the next hop.
    Unsampled(Unsampled),
}

impl Traced {
    /// The span, when sampled.
    pub fn span(&self) -> Option<&tracing::Span> {
        match self {
            Traced::Span(span) => Some(span),
            Traced::Unsampled(_) => None,
        }
    }

    /// The trace id of a sampled span (an exemplar's): `None` when not
    /// sampled.
    pub fn sampled_trace_id(&self) -> Option<TraceId> {
        self.span().map(trace_id_of)
    }

    /// Runs `f` inside, as [`Traced::attach`] does for a future.
    pub fn in_scope<R>(&self, f: impl FnOnce() -> R) -> R {
        match self {
            Traced::Span(span) => span.in_scope(f),
            Traced::Unsampled(ids) => UNSAMPLED.sync_scope(Some(*ids), f),
        }
    }

    /// Runs `work` inside: in the span, or with the unsampled ids at hand.
    ///
    /// A plain function, not an `async fn`: one of those would hold `work`
    /// twice (as its argument, and inside the future it awaits), doubling
    /// the size of every task spawned through it.
    pub fn attach<F: Future>(self, work: F) -> impl Future<Output = F::Output> {
        use tokio_util::either::Either;
        use tracing::Instrument as _;
        match self {
            Traced::Span(span) => Either::Left(work.instrument(span)),
            Traced::Unsampled(ids) => Either::Right(UNSAMPLED.scope(Some(ids), work)),
        }
    }
}

/// The trace id of a span OpenTelemetry exports (invalid for another).
pub fn trace_id_of(span: &tracing::Span) -> TraceId {
    span.context().span().span_context().trace_id()
}

/// The unsampled request the current task works for, if any.
pub fn unsampled() -> Option<Unsampled> {
    UNSAMPLED.try_with(|ids| *ids).ok().flatten()
}

/// Decides once: `make()` (the full span) under `parent` when `sampled`,
/// made where [`otel_filter`] lets it through; else the ids alone.
fn traced(
    sampled: bool,
    parent: Option<opentelemetry::Context>,
    trace_id: TraceId,
    make: impl FnOnce() -> tracing::Span,
) -> Traced {
    if !sampled {
        return Traced::Unsampled(Unsampled {
            trace_id,
            span_id: new_span_id(),
        });
    }
    DECIDED.with(|d| d.set(Some(true)));
    let span = make();
    DECIDED.with(|d| d.set(None));
    if let Some(parent) = parent {
        // Before the span is entered, or the parent cannot change.
        let _ = span.set_parent(parent);
    }
    Traced::Span(span)
}

/// One request arriving with `parent` (the caller's context, empty when
/// none), sampled or not as the caller's flag or, at the edge of a trace,
/// the sampler says: `make()` is called only for a sampled one.
pub fn request_span(
    parent: opentelemetry::Context,
    make: impl FnOnce() -> tracing::Span,
) -> Traced {
    let remote = parent.span().span_context().clone();
    let trace_id = if remote.is_valid() {
        remote.trace_id()
    } else {
        new_trace_id()
    };
    let sampled = sampler().decide(&remote, trace_id);
    traced(sampled, Some(parent), trace_id, make)
}

/// Work that outlives the request that began it (an order's saga), or
/// begins on its own (a saga taken over): in the current request's trace,
/// sampled or not as it is; with none, a trace of its own, decided here.
pub fn child_or_root(make: impl FnOnce() -> tracing::Span) -> Traced {
    if let Some(ids) = unsampled() {
        return Traced::Unsampled(ids);
    }
    if !tracing::Span::current().is_none() {
        return Traced::Span(make());
    }
    let trace_id = new_trace_id();
    let sampled = sampler().decide(&SpanContext::empty_context(), trace_id);
    traced(sampled, None, trace_id, make)
}

/// Whether the OpenTelemetry layer sees a span or event: a request's span
/// as [`request_span`] decided; anything inside a span it sees; nothing
/// inside an unsampled request; a span that starts a trace of its own as
/// the sampler decides for a new trace.
pub fn otel_filter<S>(metadata: &Metadata<'_>, context: &Context<'_, S>) -> bool
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    if metadata.is_span()
        && let Some(decided) = DECIDED.with(Cell::get)
    {
        return decided;
    }
    if context.lookup_current().is_some() {
        return true;
    }
    if metadata.is_event() {
        return false;
    }
    // Inside an unsampled request: not a trace of its own.
    if unsampled().is_some() {
        return false;
    }
    // A span beginning a trace outside any request (a registration's
    // call): decided as a new trace.
    sampler().decide(&SpanContext::empty_context(), new_trace_id())
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{TraceFlags, TraceState};

    fn parent(sampled: bool) -> SpanContext {
        let flags = if sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        SpanContext::new(
            TraceId::from(7u128),
            SpanId::from(9u64),
            flags,
            true,
            TraceState::default(),
        )
    }

    #[test]
    fn parent_based_samplers_follow_the_callers_flag() {
        for name in [
            "",
            "parentbased_always_on",
            "parentbased_always_off",
            "parentbased_traceidratio",
        ] {
            let sampler = Sampler::parse(name, Some("0.5"));
            assert!(
                sampler.decide(&parent(true), TraceId::from(1u128)),
                "{name}"
            );
            assert!(
                !sampler.decide(&parent(false), TraceId::from(1u128)),
                "{name}"
            );
        }
        // The others ignore it, as the specification says.
        let on = Sampler::parse("always_on", None);
        assert!(on.decide(&parent(false), TraceId::from(1u128)));
        let off = Sampler::parse("always_off", None);
        assert!(!off.decide(&parent(true), TraceId::from(1u128)));
    }

    #[test]
    fn the_ratio_samples_that_share_of_trace_ids() {
        let sampler = Sampler::parse("parentbased_traceidratio", Some("0.01"));
        let none = SpanContext::empty_context();
        let mut rng = fastrand::Rng::with_seed(7);
        let sampled = (0..100_000)
            .filter(|_| sampler.decide(&none, TraceId::from(rng.u128(1..))))
            .count();
        assert!((800..1200).contains(&sampled), "{sampled} of 100000 at 1%");
        let zero = Sampler::parse("traceidratio", Some("0"));
        assert!(!zero.decide(&none, TraceId::from(u128::MAX)));
        let one = Sampler::parse("traceidratio", Some("1"));
        assert!(one.decide(&none, TraceId::from(u128::MAX)));
        // Out of range or unreadable: everything, as the default.
        assert_eq!(
            Sampler::parse("traceidratio", Some("2")).root,
            Root::Ratio(1.0)
        );
        assert_eq!(
            Sampler::parse("traceidratio", Some("x")).root,
            Root::Ratio(1.0)
        );
    }

    #[test]
    fn an_unsampled_traceparent_has_the_flag_off() {
        let ids = Unsampled {
            trace_id: TraceId::from(0xaau128),
            span_id: SpanId::from(0xbbu64),
        };
        assert_eq!(
            ids.traceparent(),
            "00-000000000000000000000000000000aa-00000000000000bb-00"
        );
    }
}

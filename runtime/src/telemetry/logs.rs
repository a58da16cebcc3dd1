//! Log lines as JSON: the process's identity, the event's fields and the
//! current trace context, one object a line, on a standard output that
//! never fails a task.

use std::fmt;
use std::time::SystemTime;

use opentelemetry::trace::TraceContextExt as _;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// JSON lines with the process's identity and the current trace context.
pub(super) struct JsonLines {
    pub(super) service: String,
    pub(super) instance: String,
    /// Whether spans are exported, so lines can carry trace ids.
    pub(super) traced: bool,
}

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let metadata = event.metadata();
        let mut line = serde_json::Map::new();
        line.insert(
            "timestamp".into(),
            humantime::format_rfc3339_micros(SystemTime::now())
                .to_string()
                .into(),
        );
        line.insert("level".into(), metadata.level().as_str().into());
        line.insert("target".into(), metadata.target().into());
        event.record(&mut JsonFields(&mut line));
        line.insert("service".into(), self.service.as_str().into());
        line.insert("instance".into(), self.instance.as_str().into());
        // The request's span as the registry has it, whichever layers
        // take it: a line at warn inside a span at info still carries the
        // ids. A sampled span has them from OpenTelemetry; an unsampled
        // request has no span, and its ids beside the task.
        if self.traced {
            let current = tracing::Span::current();
            let context = current.context();
            let sampled = Some(context.span().span_context().clone())
                .filter(opentelemetry::trace::SpanContext::is_valid)
                .map(|c| (c.trace_id(), c.span_id()));
            let ids =
                sampled.or_else(|| super::sampling::unsampled().map(|u| (u.trace_id, u.span_id)));
            if let Some((trace_id, span_id)) = ids {
                line.insert("trace_id".into(), trace_id.to_string().into());
                line.insert("span_id".into(), span_id.to_string().into());
            }
        }
        let text = serde_json::to_string(&line).map_err(|_| fmt::Error)?;
        writeln!(writer, "{text}")
    }
}

/// An event's fields as JSON values.
struct JsonFields<'a>(&'a mut serde_json::Map<String, serde_json::Value>);

impl JsonFields<'_> {
    /// Sets field `name`, never over what the line itself says: a field
    /// named like one of the line's own keys (`service`, `level`, …), or a
    /// second `message`, is kept as `field.<name>`.
    fn put(&mut self, name: &str, value: serde_json::Value) {
        let own = matches!(
            name,
            "timestamp" | "level" | "target" | "service" | "instance" | "trace_id" | "span_id"
        );
        if own || (name == "message" && self.0.contains_key("message")) {
            self.0.insert(format!("field.{name}"), value);
        } else {
            self.0.insert(name.to_owned(), value);
        }
    }
}

impl Visit for JsonFields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field.name(), format!("{value:?}").into());
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field.name(), value.into());
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field.name(), value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field.name(), value.into());
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field.name(), value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field.name(), value.into());
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field.name(), value.to_string().into());
    }
}

/// Standard output that drops what it cannot write. When the reader of our
/// output is gone (`brewmesh up` killed), tracing-subscriber would report
/// each failed write with `eprintln!`, which panics on a broken stderr, in
/// whichever task was logging; a lost log line must not take a task down.
pub(super) struct LossyStdout;

impl std::io::Write for LossyStdout {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stdout().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stdout().flush();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::layer::SubscriberExt as _;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn no_field_shadows_the_message_or_the_lines_own_keys() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .event_format(JsonLines {
                    service: "payment".into(),
                    instance: "payment-1".into(),
                    traced: false,
                })
                .with_writer(move || writer.clone()),
        );
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(service = "other", error = "boom", "payment call failed");
            tracing::warn!(message = "the status's message", "payment call failed");
        });
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let (line, second) = (&lines[0], &lines[1]);
        assert_eq!(second["message"], "payment call failed", "{second}");
        assert_eq!(second["field.message"], "the status's message", "{second}");
        assert_eq!(line["message"], "payment call failed", "{line}");
        assert_eq!(line["service"], "payment", "{line}");
        assert_eq!(line["field.service"], "other", "{line}");
        assert_eq!(line["error"], "boom", "{line}");
    }
}

//! Structured logs: JSON lines by default (what `brewmesh up` and log stacks
//! read), or human-readable text. `RUST_LOG` filters as usual.

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line: timestamp, level, target, message, fields.
    Json,
    /// Human-readable lines.
    Text,
}

/// Installs the global subscriber writing to standard output. A second call
/// (as in tests that start several servers) keeps the first.
pub fn init(format: LogFormat) {
    // h2/hyper/tower at info would log every connection; keep them quiet
    // unless RUST_LOG asks for them.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,h2=warn,hyper=warn,tower=warn,sqlx=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| LossyStdout);
    let _already_set = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Standard output that drops what it cannot write. When the reader of our
/// output is gone (`brewmesh up` killed), tracing-subscriber would report
/// each failed write with `eprintln!`, which panics on a broken stderr, in
/// whichever task was logging; a lost log line must not take a task down.
struct LossyStdout;

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

//! Turning SIGTERM and SIGINT into a [`CancellationToken`].
//!
//! Every long-running piece (servers, sagas, watch streams) holds a clone of
//! one token; cancelling it starts the drain. Tests cancel it themselves.

pub use tokio_util::sync::CancellationToken;

/// A token that is cancelled on the first SIGTERM or SIGINT.
///
/// Must be called inside a Tokio runtime.
pub fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        let name = wait_for_signal().await;
        tracing::info!(signal = name, "shutdown requested");
        cancel.cancel();
    });
    token
}

/// Set by `brewmesh up` for its children: stop when standard input closes,
/// that is when `up` is gone, however it ended.
pub const EXIT_WITH_PARENT: &str = "BREWMESH_EXIT_WITH_PARENT";

/// When [`EXIT_WITH_PARENT`] is set, cancels `token` once standard input
/// closes.
pub fn exit_with_parent(token: &CancellationToken) {
    if std::env::var_os(EXIT_WITH_PARENT).is_none() {
        return;
    }
    // A plain thread, not tokio's stdin: a read still blocked on the
    // blocking pool would keep the runtime from shutting down.
    let token = token.clone();
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        token.cancel();
        tracing::info!("the parent process is gone; shutting down");
    });
}

/// Waits for SIGTERM or SIGINT and names the one that came.
pub async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the process can only be killed; never
        // report a signal that did not come.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

//! Starting a server in-process for integration tests: bound to port 0 on
//! 127.0.0.1, stopped (and drained) when the handle is dropped or stopped.

use std::future::Future;
use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A server running in this process.
#[derive(Debug)]
pub struct Running<T> {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Cancel to start its drain.
    pub shutdown: CancellationToken,
    task: Option<JoinHandle<T>>,
}

impl<T> Running<T> {
    /// `http://addr`, for tonic clients.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Starts the drain and waits for the server to return.
    pub async fn stop(mut self) -> T {
        self.shutdown.cancel();
        let task = self.task.take().expect("a running server has its task");
        task.await.expect("the server task panicked")
    }
}

impl<T> Drop for Running<T> {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Binds 127.0.0.1:0 and spawns `run(listener, shutdown)`.
pub async fn spawn<F, Fut, T>(run: F) -> Running<T>
where
    F: FnOnce(TcpListener, CancellationToken) -> Fut,
    Fut: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binding 127.0.0.1:0");
    spawn_on(listener, run)
}

/// Spawns `run(listener, shutdown)` on a listener the test bound itself
/// (to come back on the same address, say).
pub fn spawn_on<F, Fut, T>(listener: TcpListener, run: F) -> Running<T>
where
    F: FnOnce(TcpListener, CancellationToken) -> Fut,
    Fut: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let addr = listener
        .local_addr()
        .expect("a bound listener has an address");
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run(listener, shutdown.clone()));
    Running {
        addr,
        shutdown,
        task: Some(task),
    }
}

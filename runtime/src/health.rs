//! `grpc.health.v1` whose Watch streams end once a drain has told them
//! NOT_SERVING.
//!
//! tonic-health's Watch streams never end, and a graceful shutdown waits for
//! every open stream: a single watcher (the registry, a load balancer) would
//! hold every drain until its deadline. Here each watcher still receives the
//! NOT_SERVING update, and then its stream ends, as WatchOrder's do.

use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::Health;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_health::server::{HealthReporter, HealthService};

/// tonic-health's service, with Watch streams that end during a drain.
#[derive(Debug)]
pub struct DrainingHealth {
    inner: HealthService,
    draining: CancellationToken,
}

impl DrainingHealth {
    /// Serves the statuses `reporter` sets; `draining` is cancelled when the
    /// drain starts, before the statuses turn NOT_SERVING.
    pub fn new(reporter: HealthReporter, draining: CancellationToken) -> Self {
        Self {
            inner: HealthService::from_health_reporter(reporter),
            draining,
        }
    }
}

#[tonic::async_trait]
impl Health for DrainingHealth {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.inner.check(request).await
    }

    type WatchStream = ReceiverStream<Result<HealthCheckResponse, Status>>;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let mut statuses = self.inner.watch(request).await?.into_inner();
        let (tx, rx) = mpsc::channel(4);
        let draining = self.draining.clone();
        tokio::spawn(async move {
            let mut told_not_serving = false;
            loop {
                tokio::select! {
                    item = statuses.next() => {
                        let Some(item) = item else { return };
                        told_not_serving = matches!(&item, Ok(r) if r.status() == ServingStatus::NotServing);
                        if tx.send(item).await.is_err() || (told_not_serving && draining.is_cancelled()) {
                            return;
                        }
                    }
                    () = draining.cancelled(), if told_not_serving => return,
                    () = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

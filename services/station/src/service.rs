//! The gRPC face of one station replica: `Espresso.Pull` or `Milk.Steam`,
//! each part of a drink followed on a server stream.

use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::Instrument as _;

use brewmesh::pb::station::v1::{
    BrewState, BrewUpdate, PullRequest, SteamRequest, espresso_server, milk_server,
};
use brewmesh_runtime::validate::Validate as _;

use crate::machines::{Station, full};

/// A part's updates: STARTED, then MADE or FAILED.
pub type Updates = Pin<Box<dyn Stream<Item = Result<BrewUpdate, Status>> + Send>>;

/// One station replica: its machines and queue, and the id it answers with.
#[derive(Debug, Clone)]
pub struct StationService {
    station: Arc<Station>,
    /// `<host>:<port>`, as the replica registered.
    instance: String,
}

impl StationService {
    /// Serves `station` as the replica `instance`.
    pub fn new(station: Arc<Station>, instance: String) -> Self {
        Self { station, instance }
    }

    /// Takes a place for one part of `order_id`'s drink, or answers
    /// RESOURCE_EXHAUSTED at once; then brews it on the next free machine
    /// while the caller listens. A caller that goes away frees its machine.
    fn brew(&self, order_id: String) -> Result<Response<Updates>, Status> {
        let station = Arc::clone(&self.station);
        let Some(place) = station.try_admit() else {
            return Err(full(
                format!(
                    "the {} station is full: every machine and queue place is taken",
                    station.name
                ),
                station.duration,
            ));
        };
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let update = {
            let instance = self.instance.clone();
            move |state: BrewState, failure_reason: String| BrewUpdate {
                state: state.into(),
                station: instance.clone(),
                failure_reason,
            }
        };
        let listener = tx.clone();
        let span = tracing::info_span!("brew", otel.name = station.name, order_id);
        tokio::spawn(
            async move {
                let work = async {
                    let _place = place;
                    let _machine = station.machine().await;
                    tx.send(Ok(update(BrewState::Started, String::new())))
                        .await?;
                    tokio::time::sleep(station.duration).await;
                    let done = if station.fails() {
                        update(
                            BrewState::Failed,
                            format!("the {} station failed", station.name),
                        )
                    } else {
                        update(BrewState::Made, String::new())
                    };
                    tx.send(Ok(done)).await
                };
                tokio::select! {
                    _ = work => {}
                    () = listener.closed() => {
                        tracing::info!("the caller went away; the machine is free again");
                    }
                }
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[tonic::async_trait]
impl espresso_server::Espresso for StationService {
    type PullStream = Updates;

    async fn pull(&self, request: Request<PullRequest>) -> Result<Response<Updates>, Status> {
        let request = request.into_inner();
        request.validate()?;
        self.brew(request.order_id)
    }
}

#[tonic::async_trait]
impl milk_server::Milk for StationService {
    type SteamStream = Updates;

    async fn steam(&self, request: Request<SteamRequest>) -> Result<Response<Updates>, Status> {
        let request = request.into_inner();
        request.validate()?;
        self.brew(request.order_id)
    }
}

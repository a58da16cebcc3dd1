//! The stations as services of their own (`brewmesh station`): each part of
//! a drink sent to a station replica over a balanced channel, followed on
//! its stream, and sent again — to whichever replica the balancer picks —
//! when the stream breaks before the part is made.
//!
//! Brewing charges nothing, so repeating a part is safe: a replica that
//! dies mid-brew costs the order one more brew, not a second charge.

use std::time::Duration;

use tokio::sync::mpsc;
use tonic::{Code, Request, Status};

use brewmesh::pb::station::v1::espresso_client::EspressoClient;
use brewmesh::pb::station::v1::milk_client::MilkClient;
use brewmesh::pb::station::v1::{BrewState, BrewUpdate, PullRequest, SteamRequest};
use brewmesh_runtime::discovery::Balanced;

/// The longest wait between two attempts of one part.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// One part of a drink.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Part {
    /// The shots, at an espresso station.
    Espresso {
        /// How many.
        shots: i32,
    },
    /// The milk, at a milk station.
    Milk,
}

/// The station replicas, one balanced channel per kind.
#[derive(Debug, Clone)]
pub struct Remote {
    espresso: EspressoClient<Balanced>,
    milk: MilkClient<Balanced>,
    /// The deadline of each attempt: the wait for a machine and the brew.
    timeout: Duration,
}

/// How one attempt ended.
enum Ended {
    Made,
    Failed(String),
}

impl Remote {
    /// Stations over `espresso` and `milk`, each attempt under `timeout`.
    pub fn new(espresso: Balanced, milk: Balanced, timeout: Duration) -> Self {
        Self {
            espresso: EspressoClient::new(espresso),
            milk: MilkClient::new(milk),
            timeout,
        }
    }

    /// Brews `part` of `order_id`'s drink at a station replica, sending the
    /// replica's id on `started` each time a machine takes it. `Err` is why
    /// the part cannot be made (the machine failed, or the station refused
    /// the call for good); anything passing — no replica known, a replica
    /// gone, full or slow — is tried again, with backoff, until the part is
    /// made or the caller gives up (drops the future).
    pub(crate) async fn brew(
        &self,
        order_id: &str,
        part: Part,
        started: &mpsc::Sender<String>,
    ) -> Result<(), String> {
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.attempt(order_id, part, started).await {
                Ok(Ended::Made) => return Ok(()),
                Ok(Ended::Failed(reason)) => return Err(reason),
                Err(status) if passing(status.code()) => {
                    tracing::warn!(
                        order_id,
                        code = ?status.code(),
                        error = status.message(),
                        retry_in_ms = backoff.as_millis() as u64,
                        "station call failed; sending the part again"
                    );
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                Err(status) => {
                    return Err(format!(
                        "the {} station refused: {}",
                        part.name(),
                        status.message()
                    ));
                }
            }
        }
    }

    async fn attempt(
        &self,
        order_id: &str,
        part: Part,
        started: &mpsc::Sender<String>,
    ) -> Result<Ended, Status> {
        let order_id = order_id.to_owned();
        let mut updates = match part {
            Part::Espresso { shots } => {
                let mut request = Request::new(PullRequest {
                    order_id,
                    espresso_shots: shots,
                });
                request.set_timeout(self.timeout);
                self.espresso.clone().pull(request).await?.into_inner()
            }
            Part::Milk => {
                let mut request = Request::new(SteamRequest { order_id });
                request.set_timeout(self.timeout);
                self.milk.clone().steam(request).await?.into_inner()
            }
        };
        while let Some(BrewUpdate {
            state,
            station,
            failure_reason,
        }) = updates.message().await?
        {
            match BrewState::try_from(state) {
                Ok(BrewState::Started) => {
                    let _ = started.send(station).await;
                }
                Ok(BrewState::Made) => return Ok(Ended::Made),
                Ok(BrewState::Failed) => return Ok(Ended::Failed(failure_reason)),
                // A state this version does not know: wait for the end.
                _ => {}
            }
        }
        Err(Status::unavailable(
            "the station's stream ended before the part was made",
        ))
    }
}

impl Part {
    fn name(self) -> &'static str {
        match self {
            Part::Espresso { .. } => "espresso",
            Part::Milk => "milk",
        }
    }
}

/// Whether a failed station call may succeed if sent again (elsewhere):
/// everything but a request the stations refuse as such.
fn passing(code: Code) -> bool {
    !matches!(
        code,
        Code::InvalidArgument
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::Unimplemented
            | Code::FailedPrecondition
            | Code::OutOfRange
    )
}

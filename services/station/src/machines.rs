//! One station: a fixed number of machines with a bounded queue in front.
//!
//! Two semaphores per station: `admission` (machines + queue) is taken
//! without waiting when an order is placed, so a full shop answers at once
//! instead of queueing without bound; `machines` is waited for while brewing.
//! An order holds its admission permits until its station step is done.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt as _};

/// One kind of station.
#[derive(Debug)]
pub struct Station {
    /// "espresso" or "milk", for messages.
    pub name: &'static str,
    /// How long one drink takes at this station.
    pub duration: Duration,
    machines: Arc<Semaphore>,
    admission: Arc<Semaphore>,
    capacity: usize,
    places: usize,
    failure_rate: f64,
}

impl Station {
    /// `machines` machines with room for `queue` more orders waiting;
    /// `failure_rate` (0..=1) of the drinks fail, for fault injection.
    pub fn new(
        name: &'static str,
        machines: usize,
        queue: usize,
        duration: Duration,
        failure_rate: f64,
    ) -> Self {
        Self {
            name,
            duration,
            machines: Arc::new(Semaphore::new(machines)),
            admission: Arc::new(Semaphore::new(machines + queue)),
            capacity: machines,
            places: machines + queue,
            failure_rate,
        }
    }

    /// A handle on the station's occupancy, for metrics.
    pub fn load(&self) -> Load {
        Load {
            name: self.name,
            machines: Arc::clone(&self.machines),
            admission: Arc::clone(&self.admission),
            capacity: self.capacity,
            places: self.places,
        }
    }

    /// How many orders the station takes at most: its machines and queue.
    pub fn places(&self) -> usize {
        self.places
    }

    /// A place at this station, or `None` if machines and queue are full.
    pub fn try_admit(&self) -> Option<Place> {
        self.admission.clone().try_acquire_owned().ok()
    }

    /// A place at this station, waiting for one: for orders already accepted
    /// (picked up again after a restart), which must not be turned away.
    pub async fn admit(&self) -> Place {
        self.admission
            .clone()
            .acquire_owned()
            .await
            .expect("station semaphores are never closed")
    }

    /// Waits for a free machine.
    pub async fn machine(&self) -> OwnedSemaphorePermit {
        self.machines
            .clone()
            .acquire_owned()
            .await
            .expect("station semaphores are never closed")
    }

    /// Whether this drink fails at this station (fault injection).
    pub fn fails(&self) -> bool {
        self.failure_rate > 0.0 && fastrand::f64() < self.failure_rate
    }
}

/// How busy a station is, read from its semaphores.
#[derive(Debug, Clone)]
pub struct Load {
    /// The station's name.
    pub name: &'static str,
    machines: Arc<Semaphore>,
    admission: Arc<Semaphore>,
    capacity: usize,
    places: usize,
}

impl Load {
    /// Share of the machines in use (0 to 1).
    pub fn utilization(&self) -> f64 {
        self.busy() as f64 / self.capacity.max(1) as f64
    }

    /// Machines in use now.
    pub fn busy(&self) -> usize {
        self.capacity
            .saturating_sub(self.machines.available_permits())
    }

    /// Orders admitted here and not at a machine yet.
    pub fn waiting(&self) -> usize {
        let admitted = self
            .places
            .saturating_sub(self.admission.available_permits());
        admitted.saturating_sub(self.busy())
    }
}

/// A place at one station (machine or queue), held until its step is done.
pub type Place = OwnedSemaphorePermit;

/// RESOURCE_EXHAUSTED for a full station: `message`, and when to come back
/// (`retry_after`, about one drink's time) as RetryInfo for people and REST
/// clients and as `grpc-retry-pushback-ms` (gRFC A6) for gRPC clients,
/// which skip this replica that long.
pub fn full(message: String, retry_after: Duration) -> Status {
    let mut metadata = tonic::metadata::MetadataMap::new();
    metadata.insert(
        "grpc-retry-pushback-ms",
        tonic::metadata::MetadataValue::from(retry_after.as_millis() as u64),
    );
    Status::with_error_details_and_metadata(
        Code::ResourceExhausted,
        message,
        ErrorDetails::with_retry_info(Some(retry_after)),
        metadata,
    )
}

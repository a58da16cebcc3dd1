//! The stations' gauges: utilization and queue depth, read from their
//! semaphores at scrape time.

use crate::machines::Load;

/// Registers the gauges of the stations behind `loads`, labelled by their
/// names.
pub fn register(loads: Vec<Load>) {
    let read = move |what: fn(&Load) -> f64| {
        let loads = loads.clone();
        move || {
            loads
                .iter()
                .map(|load| {
                    (
                        vec![("station".to_owned(), load.name.to_owned())],
                        what(load),
                    )
                })
                .collect()
        }
    };
    brewmesh_runtime::metrics::register_gauges(
        "brewmesh_station_utilization",
        "Share of a station's machines in use (0 to 1)",
        read(Load::utilization),
    );
    brewmesh_runtime::metrics::register_gauges(
        "brewmesh_station_queue_depth",
        "Orders admitted to a station and waiting for a machine",
        read(|load| load.waiting() as f64),
    );
}

//! Everything counted during a run: outcomes by kind, one latency
//! histogram, and a timeline of seconds kept to a few bytes each.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use hdrhistogram::Histogram;

use super::follow::Ending;

/// Latencies in microseconds, up to an hour, with `digits` significant
/// digits.
fn histogram(digits: u8) -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, digits).expect("valid histogram bounds")
}

/// What one second of the run looked like, for the chart and the report.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(super) struct Second {
    pub(super) served: u64,
    pub(super) p50_ms: f64,
    pub(super) p99_ms: f64,
}

/// Seconds still taking outcomes: a customer's finishing time is taken
/// before its outcome is queued, so one may arrive a little after a later
/// one. Older seconds are summed up into a [`Second`] and their histogram
/// reused, so a long run keeps a few bytes per second, not a histogram.
const OPEN_SECONDS: usize = 3;

/// Everything counted so far.
pub(super) struct Tally {
    pub(super) served: u64,
    pub(super) failed: BTreeMap<String, u64>,
    pub(super) errors: BTreeMap<String, u64>,
    /// The first message seen for each error code.
    pub(super) examples: BTreeMap<String, String>,
    pub(super) latency: Histogram<u64>,
    /// The seconds summed up, from the start.
    pub(super) timeline: Vec<Second>,
    /// The seconds after those, still open: served count and latencies.
    pub(super) open: VecDeque<(u64, Histogram<u64>)>,
    /// A closed second's histogram, for the next one.
    pub(super) spare: Option<Histogram<u64>>,
}

impl Tally {
    pub(super) fn new() -> Self {
        Self {
            served: 0,
            failed: BTreeMap::new(),
            errors: BTreeMap::new(),
            examples: BTreeMap::new(),
            latency: histogram(3),
            timeline: Vec::new(),
            open: VecDeque::new(),
            spare: None,
        }
    }

    pub(super) fn add(&mut self, ending: Ending, at: Duration) {
        match ending {
            Ending::Served(latency) => {
                self.served += 1;
                let micros = (latency.as_micros() as u64).clamp(1, 3_600_000_000);
                let _ = self.latency.record(micros);
                let second = at.as_secs() as usize;
                while self.timeline.len() + self.open.len() <= second {
                    if self.open.len() == OPEN_SECONDS {
                        self.close_oldest();
                    }
                    // Two digits suffice for a chart.
                    let latencies = self.spare.take().unwrap_or_else(|| histogram(2));
                    self.open.push_back((0, latencies));
                }
                // Later than the open seconds can be late: it counts in the
                // oldest open one.
                let index = second.saturating_sub(self.timeline.len());
                let (served, latencies) = &mut self.open[index];
                *served += 1;
                let _ = latencies.record(micros);
            }
            Ending::Failed(reason) => {
                // "payment declined: …" → "payment declined".
                let kind = reason.split(':').next().unwrap_or("").trim().to_owned();
                *self.failed.entry(kind).or_default() += 1;
            }
            Ending::Full(_, message) => {
                self.add(Ending::Error(tonic::Code::ResourceExhausted, message), at)
            }
            Ending::Error(code, message) => {
                let code = brewmesh_runtime::metrics::code_name(code).to_owned();
                self.examples.entry(code.clone()).or_insert(message);
                *self.errors.entry(code).or_default() += 1;
            }
        }
    }

    /// Sums up the oldest open second.
    fn close_oldest(&mut self) {
        if let Some((served, mut latencies)) = self.open.pop_front() {
            self.timeline.push(Second {
                served,
                p50_ms: ms(latencies.value_at_quantile(0.50)),
                p99_ms: ms(latencies.value_at_quantile(0.99)),
            });
            latencies.reset();
            self.spare = Some(latencies);
        }
    }

    /// Sums up every second, at the end of the run.
    pub(super) fn close(&mut self) {
        while !self.open.is_empty() {
            self.close_oldest();
        }
    }
}

pub(super) fn ms(micros: u64) -> f64 {
    micros as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn served(tally: &mut Tally, second: u64, latency_ms: u64) {
        tally.add(
            Ending::Served(Duration::from_millis(latency_ms)),
            Duration::from_millis(second * 1000 + 500),
        );
    }

    /// Seconds are summed up as the run moves on; an outcome that arrives
    /// late counts in an open second, and nothing is lost.
    #[test]
    fn the_timeline_sums_up_each_second_and_takes_late_outcomes() {
        let mut tally = Tally::new();
        served(&mut tally, 0, 10);
        served(&mut tally, 0, 20);
        served(&mut tally, 1, 30);
        served(&mut tally, 5, 40);
        served(&mut tally, 4, 50); // still open
        served(&mut tally, 2, 60); // closed already: counts in second 3
        tally.add(
            Ending::Failed("payment declined: no".into()),
            Duration::ZERO,
        );
        tally.close();
        let served: Vec<u64> = tally.timeline.iter().map(|s| s.served).collect();
        assert_eq!(served, [2, 1, 0, 1, 1, 1]);
        assert_eq!(tally.served, 6);
        assert_eq!(tally.failed["payment declined"], 1);
        let close = |a: f64, b: f64| (a - b).abs() <= b * 0.01;
        assert!(
            close(tally.timeline[0].p99_ms, 20.0),
            "{:?}",
            tally.timeline[0]
        );
        assert!(
            close(tally.timeline[3].p50_ms, 60.0),
            "{:?}",
            tally.timeline[3]
        );
        assert!(
            close(tally.timeline[5].p50_ms, 40.0),
            "{:?}",
            tally.timeline[5]
        );
        assert_eq!(tally.timeline[2], Second::default());
        assert!(tally.open.is_empty());
    }
}

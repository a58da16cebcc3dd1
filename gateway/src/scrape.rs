//! Reading another process's `/metrics`: an HTTP/1.1 GET under a
//! deadline and a size limit, and the RED families of the Prometheus text
//! summed into a process's [`Counters`].

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use prost_reflect::DescriptorPool;
use serde::Serialize;

/// How long one scrape may take.
pub const DEADLINE: Duration = Duration::from_secs(1);
/// Largest `/metrics` answer read from one process.
const MAX_SCRAPE: usize = 4 << 20;

/// The HTTP/1.1 client that scrapes `/metrics`.
pub type Scraper = Client<HttpConnector, Empty<Bytes>>;

/// A scraper with Nagle off (a scrape is one small request).
pub fn scraper() -> Scraper {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(DEADLINE));
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector)
}

/// A process's cumulative request counters, summed over its methods or
/// routes.
#[derive(Debug, Default, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Counters {
    /// Requests answered.
    pub requests: u64,
    /// Of those, the server's faults: HTTP 5xx, or the gRPC codes a server
    /// causes (UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL,
    /// UNAVAILABLE, DATA_LOSS).
    pub errors: u64,
    /// The latency histogram of unary requests (streams last as long as
    /// their client wants): `[upper bound in seconds, cumulative count]`,
    /// the last bound `null` for +Inf.
    pub latency: Vec<(Option<f64>, u64)>,
}

/// `GET http://{address}/metrics`, under [`DEADLINE`].
pub async fn scrape(scraper: &Scraper, address: &str) -> Result<String, String> {
    let uri: http::Uri = format!("http://{address}/metrics")
        .parse()
        .map_err(|_| format!("{address:?} is not an address"))?;
    let fetch = async {
        let response = scraper.get(uri).await.map_err(|e| {
            use std::error::Error as _;
            e.source()
                .map_or_else(|| e.to_string(), ToString::to_string)
        })?;
        if !response.status().is_success() {
            return Err(format!("/metrics answered {}", response.status()));
        }
        let body = Limited::new(response.into_body(), MAX_SCRAPE)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        String::from_utf8(body.to_vec()).map_err(|_| "/metrics is not UTF-8".to_owned())
    };
    tokio::time::timeout(DEADLINE, fetch)
        .await
        .unwrap_or_else(|_| Err("/metrics did not answer in time".to_owned()))
}

/// Sums the RED families of a Prometheus text exposition: the gRPC
/// server's (`rpc_server_*`) and the gateway's (`http_server_*`).
pub fn summarize(text: &str, pool: &DescriptorPool) -> Counters {
    let mut counters = Counters::default();
    let mut buckets: BTreeMap<u64, (Option<f64>, u64)> = BTreeMap::new();
    for line in text.lines() {
        let Some((name, labels, value)) = sample(line) else {
            continue;
        };
        let label = |key: &str| {
            labels
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        };
        match name {
            "rpc_server_requests_total" => {
                counters.requests += value;
                if label("code").is_some_and(server_fault) {
                    counters.errors += value;
                }
            }
            "http_server_requests_total" => {
                counters.requests += value;
                if label("status").is_some_and(|s| s.starts_with('5')) {
                    counters.errors += value;
                }
            }
            "rpc_server_duration_seconds_bucket" | "http_server_duration_seconds_bucket" => {
                let streams = name.starts_with("rpc")
                    && streams(
                        pool,
                        label("service").unwrap_or(""),
                        label("method").unwrap_or(""),
                    );
                let Some(le) = label("le") else { continue };
                if streams {
                    continue;
                }
                let bound = le.parse::<f64>().ok().filter(|b| b.is_finite());
                // Ordered by bound, +Inf last.
                let key = bound.map_or(u64::MAX, f64::to_bits);
                buckets.entry(key).or_insert((bound, 0)).1 += value;
            }
            _ => {}
        }
    }
    counters.latency = buckets.into_values().collect();
    counters
}

/// Codes that say the server failed, not the request.
fn server_fault(code: &str) -> bool {
    use brewmesh_runtime::metrics::{SERVER_FAULTS, code_name};
    SERVER_FAULTS.iter().any(|c| code_name(*c) == code)
}

/// Whether `service/method` streams (its duration is the stream's life,
/// not a latency): from the descriptors the gateway has, and for the two
/// services every process serves beside its own.
fn streams(pool: &DescriptorPool, service: &str, method: &str) -> bool {
    if let Some(found) = pool
        .get_service_by_name(service)
        .and_then(|s| s.methods().find(|m| m.name() == method))
    {
        return found.is_client_streaming() || found.is_server_streaming();
    }
    service.starts_with("grpc.reflection.")
        || (service == "grpc.health.v1.Health" && method == "Watch")
}

/// A sample's labels, in the order written.
type Labels = Vec<(String, String)>;

/// One sample line: its name, labels and value (counts only: a value that
/// is not a whole number is skipped).
fn sample(line: &str) -> Option<(&str, Labels, u64)> {
    if line.starts_with('#') {
        return None;
    }
    let (head, value) = line.rsplit_once(' ')?;
    let value: f64 = value.parse().ok()?;
    if !(value.is_finite() && value >= 0.0 && value.fract() == 0.0) {
        return None;
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let value = value as u64;
    let Some((name, rest)) = head.split_once('{') else {
        return Some((head, Vec::new(), value));
    };
    let rest = rest.strip_suffix('}')?;
    Some((name, labels(rest)?, value))
}

/// `a="x",b="y\"z"` → pairs, with the exposition format's escapes.
fn labels(mut rest: &str) -> Option<Labels> {
    let mut pairs = Vec::new();
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                (_, c) => value.push(c),
            }
        };
        pairs.push((key.trim_start_matches(',').to_owned(), value));
        rest = after[end + 1..].trim_start_matches(',');
    }
    Some(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP rpc_server_requests gRPC calls
# TYPE rpc_server_requests counter
rpc_server_requests_total{service="brewmesh.barista.v1.Barista",method="GetMenu",code="OK"} 7
rpc_server_requests_total{service="brewmesh.barista.v1.Barista",method="PlaceOrder",code="UNAVAILABLE"} 2
rpc_server_requests_total{service="brewmesh.barista.v1.Barista",method="PlaceOrder",code="NOT_FOUND"} 1
rpc_server_duration_seconds_bucket{le="0.001",service="brewmesh.barista.v1.Barista",method="GetMenu"} 5
rpc_server_duration_seconds_bucket{le="+Inf",service="brewmesh.barista.v1.Barista",method="GetMenu"} 7
rpc_server_duration_seconds_bucket{le="0.001",service="brewmesh.barista.v1.Barista",method="WatchOrder"} 0
rpc_server_duration_seconds_bucket{le="+Inf",service="brewmesh.barista.v1.Barista",method="WatchOrder"} 4
rpc_server_duration_seconds_bucket{le="0.001",service="odd\"name\\",method="X"} 1
rpc_server_duration_seconds_bucket{le="+Inf",service="odd\"name\\",method="X"} 3
rpc_server_duration_seconds_sum{service="brewmesh.barista.v1.Barista",method="GetMenu"} 0.25
"#;

    fn pool() -> DescriptorPool {
        DescriptorPool::decode(brewmesh::FILE_DESCRIPTOR_SET).unwrap()
    }

    #[test]
    fn counts_requests_server_faults_and_unary_latency() {
        let counters = summarize(TEXT, &pool());
        assert_eq!(counters.requests, 10);
        // UNAVAILABLE is the server's; NOT_FOUND the request's.
        assert_eq!(counters.errors, 2);
        // WatchOrder streams: left out; an unknown method counts.
        assert_eq!(counters.latency, vec![(Some(0.001), 6), (None, 10)]);
    }

    #[test]
    fn gateway_families_count_5xx_as_errors() {
        let text = "http_server_requests_total{method=\"GET\",route=\"/v1/menu\",status=\"200\"} 3\n\
                    http_server_requests_total{method=\"GET\",route=\"/v1/menu\",status=\"503\"} 1\n\
                    http_server_duration_seconds_bucket{le=\"0.5\",method=\"GET\",route=\"/v1/menu\"} 4\n";
        let counters = summarize(text, &pool());
        assert_eq!((counters.requests, counters.errors), (4, 1));
        assert_eq!(counters.latency, vec![(Some(0.5), 4)]);
    }

    #[test]
    fn labels_unescape_and_bad_lines_are_skipped() {
        let (_, labels, value) = sample(r#"x{a="q\"uo\\te",b="n\nl"} 3"#).unwrap();
        assert_eq!(value, 3);
        assert_eq!(
            labels,
            vec![
                ("a".into(), "q\"uo\\te".into()),
                ("b".into(), "n\nl".into())
            ]
        );
        assert!(sample("x{a=\"unterminated} 3").is_none());
        assert!(sample("x 0.5").is_none());
        assert!(sample("x NaN").is_none());
        assert!(sample("no_value").is_none());
    }
}

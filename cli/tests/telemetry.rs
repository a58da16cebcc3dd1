//! Traces, logs and metrics of the real processes: `brewmesh up` exporting
//! to a test OTLP receiver, its merged JSON log, and `/metrics` scraped
//! before and after a known number of orders.

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

mod support;

use std::time::{Duration, Instant};

use brewmesh_testing::{CollectedSpan, Collector};
use support::{PATIENCE, Process, curl, sample};

/// `up` on port 0 with quick steps, exporting to `endpoint` if given, with
/// `extra` variables.
fn mesh(dir: &std::path::Path, endpoint: Option<&str>, extra: &[(&str, &str)]) -> Process {
    let args = Process::up_args(
        dir,
        &[
            "--payment-arg=--processing-delay=20ms",
            "--barista-arg=--espresso-time=300ms",
            "--barista-arg=--milk-time=300ms",
        ],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut env = vec![
        // The gateway's access log is debug: one line per request.
        ("RUST_LOG", "info,brewmesh_gateway::access=debug"),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ("OTEL_SEMCONV_STABILITY_OPT_IN", "rpc/dup"),
    ];
    if let Some(endpoint) = endpoint {
        env.push(("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint));
    }
    env.extend(extra.iter().copied());
    Process::start_with_env(&args, &env)
}

/// Places an order over REST (with `traceparent` if given) and follows it
/// to its end; the order id.
fn order(gateway: &str, key: &str, card: &str, traceparent: Option<&str>) -> String {
    let body = format!(
        r#"{{"idempotencyKey":"{key}","itemId":"latte","customerName":"Ada","cardToken":"{card}"}}"#
    );
    let url = format!("{gateway}/v1/orders");
    let mut args = vec!["-XPOST", url.as_str(), "--json", body.as_str()];
    let header;
    if let Some(traceparent) = traceparent {
        header = format!("traceparent: {traceparent}");
        args.extend(["-H", header.as_str()]);
    }
    let placed: serde_json::Value = serde_json::from_str(&curl(&args)).unwrap();
    let id = placed["orderId"].as_str().unwrap().to_owned();
    let watched = curl(&["-N", &format!("{gateway}/v1/orders/{id}:watch")]);
    assert!(
        watched.contains("ORDER_EVENT_TYPE_READY") || watched.contains("ORDER_EVENT_TYPE_FAILED"),
        "{watched}"
    );
    id
}

/// The spans of `trace_id`, once `done` holds for them (bounded).
fn spans_of(
    collector: &Collector,
    trace_id: &str,
    done: impl Fn(&[CollectedSpan]) -> bool,
) -> Vec<CollectedSpan> {
    let started = Instant::now();
    loop {
        let spans: Vec<CollectedSpan> = collector
            .spans()
            .into_iter()
            .filter(|s| s.trace_id() == trace_id)
            .collect();
        if done(&spans) {
            return spans;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "incomplete trace: {:#?}",
            spans
                .iter()
                .map(|s| (&s.service, &s.span.name))
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits (bounded) until log records of `trace_id` came from each of
/// `services` over OTLP.
fn logs_of(collector: &Collector, trace_id: &str, services: &[&str]) {
    let started = Instant::now();
    loop {
        let logs = collector.logs();
        let missing: Vec<&&str> = services
            .iter()
            .filter(|service| {
                !logs.iter().any(|l| {
                    l.service == **service
                        && brewmesh_runtime::idempotency::to_hex(&l.record.trace_id) == trace_id
                })
            })
            .collect();
        if missing.is_empty() {
            return;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "no OTLP log records of {trace_id} from {missing:?} ({} records)",
            logs.len()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn named<'a>(spans: &'a [CollectedSpan], service: &str, name: &str) -> &'a CollectedSpan {
    spans
        .iter()
        .find(|s| s.service == service && s.span.name == name)
        .unwrap_or_else(|| {
            panic!(
                "no {service} span {name:?} in {:#?}",
                spans
                    .iter()
                    .map(|s| (&s.service, &s.span.name))
                    .collect::<Vec<_>>()
            )
        })
}

fn has(spans: &[CollectedSpan], service: &str, name: &str) -> bool {
    spans
        .iter()
        .any(|s| s.service == service && s.span.name == name)
}

#[tokio::test(flavor = "multi_thread")]
async fn one_rest_order_is_one_trace_through_gateway_barista_and_payment() {
    let (collector, endpoint) = Collector::start().await;
    let dir = tempfile::tempdir().unwrap();
    // Logs over OTLP/gRPC as well.
    let up = mesh(
        dir.path(),
        Some(&endpoint),
        &[("OTEL_LOGS_EXPORTER", "otlp")],
    );
    let gateway = format!("http://{}", up.instance("gateway"));

    // The client's own trace: the gateway continues it.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let traceparent = format!("00-{trace_id}-{client_span}-01");
    order(&gateway, "traced-1", "tok_visa", Some(&traceparent));
    let spans = spans_of(&collector, trace_id, |s| {
        // The saga's span ends last, after its capture step.
        has(s, "barista", "capture")
            && has(s, "barista", "order saga")
            && has(s, "payment", "ledger Capture")
    });

    // REST call → gateway → barista, each with its parent.
    let http = named(&spans, "gateway", "POST /v1/orders");
    assert_eq!(
        http.parent_id(),
        client_span,
        "the incoming traceparent is continued"
    );
    assert_eq!(http.attribute("http.route").as_deref(), Some("/v1/orders"));
    assert_eq!(
        http.attribute("http.response.status_code").as_deref(),
        Some("201")
    );
    let place = "brewmesh.barista.v1.Barista/PlaceOrder";
    let client = spans
        .iter()
        .find(|s| s.service == "gateway" && s.span.name == place)
        .unwrap();
    assert_eq!(client.parent_id(), http.span_id());
    assert_eq!(client.span.kind, 3, "CLIENT");
    let server = named(&spans, "barista", place);
    assert_eq!(server.parent_id(), client.span_id());
    assert_eq!(server.span.kind, 2, "SERVER");
    // The RPC conventions, old and new names (rpc/dup).
    assert_eq!(server.attribute("rpc.system").as_deref(), Some("grpc"));
    assert_eq!(server.attribute("rpc.system.name").as_deref(), Some("grpc"));
    assert_eq!(
        server.attribute("rpc.service").as_deref(),
        Some("brewmesh.barista.v1.Barista")
    );
    assert_eq!(server.attribute("rpc.method").as_deref(), Some(place));
    assert_eq!(
        server.attribute("rpc.grpc.status_code").as_deref(),
        Some("0")
    );
    assert_eq!(
        server.attribute("rpc.response.status_code").as_deref(),
        Some("OK")
    );

    // The saga under the call, its steps side by side.
    let saga = named(&spans, "barista", "order saga");
    assert_eq!(saga.parent_id(), server.span_id());
    let espresso = named(&spans, "barista", "espresso");
    let milk = named(&spans, "barista", "milk");
    assert_eq!(espresso.parent_id(), saga.span_id());
    assert_eq!(milk.parent_id(), saga.span_id());
    assert!(
        espresso.span.start_time_unix_nano < milk.span.end_time_unix_nano
            && milk.span.start_time_unix_nano < espresso.span.end_time_unix_nano,
        "espresso and milk overlap in time"
    );

    // barista → payment, down to the ledger write.
    for (step, method, ledger) in [
        ("authorize", "Authorize", "ledger Authorize"),
        ("capture", "Capture", "ledger Capture"),
    ] {
        let step = named(&spans, "barista", step);
        assert_eq!(step.parent_id(), saga.span_id());
        let rpc = format!("brewmesh.payment.v1.Payments/{method}");
        let call = spans
            .iter()
            .find(|s| {
                s.service == "barista" && s.span.name == rpc && s.parent_id() == step.span_id()
            })
            .unwrap_or_else(|| panic!("no client span of {rpc} under {}", step.span.name));
        let served = named(&spans, "payment", &rpc);
        assert_eq!(served.parent_id(), call.span_id());
        let write = named(&spans, "payment", ledger);
        assert_eq!(write.parent_id(), served.span_id());
    }
    assert!(
        spans.iter().all(|s| !s.is_error()),
        "a good order has no error span"
    );

    // A cancelled order: its saga voids the authorization, in its trace.
    let cancelled_trace = "6e0c63257de34c926f9efcd03919fb2d";
    let placed: serde_json::Value = serde_json::from_str(&curl(&[
        "-XPOST",
        &format!("{gateway}/v1/orders"),
        "-H",
        &format!("traceparent: 00-{cancelled_trace}-3333333333333333-01"),
        "--json",
        r#"{"idempotencyKey":"traced-3","itemId":"latte","customerName":"Ada","cardToken":"tok_visa"}"#,
    ]))
    .unwrap();
    let id = placed["orderId"].as_str().unwrap();
    curl(&[
        "-XPOST",
        &format!("{gateway}/v1/orders/{id}:cancel"),
        "--json",
        "{}",
    ]);
    let spans = spans_of(&collector, cancelled_trace, |s| {
        // The saga's span ends after its void step: wait for both.
        has(s, "barista", "void")
            && has(s, "barista", "order saga")
            && has(s, "payment", "ledger Void")
    });
    let void = named(&spans, "barista", "void");
    assert_eq!(
        void.parent_id(),
        named(&spans, "barista", "order saga").span_id()
    );

    // A declined card: the authorization and the saga are errors.
    let declined_trace = "0af7651916cd43dd8448eb211c80319c";
    order(
        &gateway,
        "traced-2",
        "tok_declined",
        Some(&format!("00-{declined_trace}-b7ad6b7169203331-01")),
    );
    let spans = spans_of(&collector, declined_trace, |s| {
        has(s, "barista", "order saga") && has(s, "payment", "ledger Authorize")
    });
    assert!(named(&spans, "barista", "authorize").is_error());
    assert!(named(&spans, "barista", "order saga").is_error());
    assert!(named(&spans, "payment", "ledger Authorize").is_error());
    // The RPC itself succeeded: a decline is an answer, not a failure.
    assert!(!named(&spans, "payment", "brewmesh.payment.v1.Payments/Authorize").is_error());
}

#[tokio::test(flavor = "multi_thread")]
async fn every_process_that_handled_an_order_logs_its_trace_id() {
    let (_collector, endpoint) = Collector::start().await;
    let dir = tempfile::tempdir().unwrap();
    let up = mesh(dir.path(), Some(&endpoint), &[]);
    let gateway = format!("http://{}", up.instance("gateway"));
    let trace_id = "5b8efff798038103d269b633813fc60c";
    let order_id = order(
        &gateway,
        "logged-1",
        "tok_visa",
        Some(&format!("00-{trace_id}-eee19b7ec3c1b174-01")),
    );
    let lines = up.lines_with(trace_id);
    let instances: Vec<String> = lines
        .iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .map(|v| v["instance"].as_str().unwrap_or("").to_owned())
        .collect();
    for instance in ["gateway", "barista-1", "payment-1"] {
        assert!(
            instances.iter().any(|i| i == instance),
            "no {instance} line with trace {trace_id}: {lines:#?}"
        );
    }
    // JSON lines with the fields a log stack indexes.
    let line: serde_json::Value = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .find(|v: &serde_json::Value| v["order_id"] == order_id.as_str())
        .expect("a line about the order");
    for field in [
        "timestamp",
        "level",
        "target",
        "message",
        "service",
        "instance",
        "span_id",
    ] {
        assert!(line.get(field).is_some(), "{field} missing from {line}");
    }
    assert_eq!(line["trace_id"], trace_id);
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_exactly_the_orders_served() {
    let dir = tempfile::tempdir().unwrap();
    let up = mesh(dir.path(), None, &[]);
    let gateway = format!("http://{}", up.instance("gateway"));
    let scrape = |instance: &str| curl(&[&format!("http://{}/metrics", up.instance(instance))]);
    let counters = |barista: &str, payment: &str, gw: &str| {
        let barista_calls = [
            ("service", "brewmesh.barista.v1.Barista"),
            ("method", "PlaceOrder"),
            ("code", "OK"),
        ];
        [
            sample(barista, "brewmesh_orders_placed_total", &[]),
            sample(
                barista,
                "brewmesh_orders_finished_total",
                &[("outcome", "ready")],
            ),
            sample(
                barista,
                "brewmesh_orders_finished_total",
                &[("outcome", "failed")],
            ),
            sample(barista, "rpc_server_requests_total", &barista_calls),
            sample(
                barista,
                "rpc_server_duration_seconds_count",
                &barista_calls[..2],
            ),
            sample(
                payment,
                "rpc_server_requests_total",
                &[("method", "Authorize"), ("code", "OK")],
            ),
            sample(
                payment,
                "rpc_server_requests_total",
                &[("method", "Capture"), ("code", "OK")],
            ),
            sample(
                gw,
                "http_server_requests_total",
                &[
                    ("route", "/v1/orders"),
                    ("method", "POST"),
                    ("status", "201"),
                ],
            ),
        ]
    };
    let before = counters(
        &scrape("barista-1"),
        &scrape("payment-1"),
        &scrape("gateway"),
    );

    const ORDERS: usize = 3;
    for n in 0..ORDERS {
        order(&gateway, &format!("counted-{n}"), "tok_visa", None);
    }
    order(&gateway, "counted-declined", "tok_declined", None);

    let barista = scrape("barista-1");
    let after = counters(&barista, &scrape("payment-1"), &scrape("gateway"));
    let moved: Vec<f64> = after.iter().zip(before).map(|(a, b)| a - b).collect();
    let n = ORDERS as f64;
    // placed, ready, failed, PlaceOrder OK, its latency count, Authorize OK
    // (a decline is an OK answer), Capture OK, POST /v1/orders 201.
    assert_eq!(
        moved,
        vec![n + 1.0, n, 1.0, n + 1.0, n + 1.0, n + 1.0, n, n + 1.0]
    );

    // Gauges: the stations (idle now) and the registry's instances.
    assert_eq!(
        sample(
            &barista,
            "brewmesh_station_utilization",
            &[("station", "espresso")]
        ),
        0.0
    );
    assert!(
        barista.contains("brewmesh_station_queue_depth{station=\"milk\"}"),
        "{barista}"
    );
    let registry = scrape("registry-1");
    assert_eq!(
        sample(
            &registry,
            "brewmesh_registry_instances",
            &[
                ("grpc_service", "brewmesh.barista.v1.Barista"),
                ("health", "SERVING")
            ]
        ),
        1.0,
        "{registry}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn with_metrics_off_every_process_serves_but_answers_metrics_with_404() {
    let dir = tempfile::tempdir().unwrap();
    // `up --metrics off` passes the switch on to every role it starts.
    let args = Process::up_args(
        dir.path(),
        &[
            "--metrics",
            "off",
            "--payment-arg=--processing-delay=20ms",
            "--barista-arg=--espresso-time=50ms",
            "--barista-arg=--milk-time=50ms",
        ],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let up = Process::start(&args);
    let gateway = format!("http://{}", up.instance("gateway"));
    order(&gateway, "metrics-off-1", "tok_visa", None);
    for instance in ["registry-1", "payment-1", "barista-1", "gateway"] {
        let url = format!("http://{}/metrics", up.instance(instance));
        let answer = curl(&["-w", "\n%{http_code}", &url]);
        let (body, status) = answer.rsplit_once('\n').unwrap();
        assert_eq!(status, "404", "{instance}: {answer}");
        assert!(
            body.contains("metrics are switched off"),
            "{instance}: {body}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn traces_and_logs_also_go_over_otlp_http_protobuf() {
    let (collector, endpoint) = Collector::start().await;
    let dir = tempfile::tempdir().unwrap();
    let up = mesh(
        dir.path(),
        Some(&endpoint),
        &[
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_LOGS_EXPORTER", "otlp"),
        ],
    );
    let gateway = format!("http://{}", up.instance("gateway"));
    let trace_id = "9d2f8a6c0b1e4f37a5c6d7e8f9011223";
    order(
        &gateway,
        "http-1",
        "tok_visa",
        Some(&format!("00-{trace_id}-1111111111111111-01")),
    );
    let spans = spans_of(&collector, trace_id, |s| {
        has(s, "gateway", "POST /v1/orders") && has(s, "payment", "ledger Capture")
    });
    assert_eq!(
        named(&spans, "gateway", "POST /v1/orders").parent_id(),
        "1111111111111111"
    );
    logs_of(&collector, trace_id, &["gateway", "barista", "payment"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn traces_go_to_a_collector_over_tls_checked_against_its_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (collector, endpoint) = Collector::start_tls(dir.path()).await;
    let ca = dir.path().join("tls").join("ca.crt").display().to_string();
    let data = dir.path().join("mesh");
    let up = mesh(
        &data,
        Some(&endpoint),
        &[("OTEL_EXPORTER_OTLP_CERTIFICATE", ca.as_str())],
    );
    let gateway = format!("http://{}", up.instance("gateway"));
    let trace_id = "5a7d0c4e9b2f41d8a3c6e1f0b9d8c7a6";
    order(
        &gateway,
        "tls-1",
        "tok_visa",
        Some(&format!("00-{trace_id}-2222222222222222-01")),
    );
    spans_of(&collector, trace_id, |s| {
        has(s, "gateway", "POST /v1/orders") && has(s, "payment", "ledger Capture")
    });
}

/// Asserts that gateway, barista and payment each logged a line with
/// `trace_id`.
fn every_hop_logged(up: &Process, trace_id: &str) {
    let lines = up.lines_with(trace_id);
    for instance in ["gateway", "barista-1", "payment-1"] {
        assert!(
            lines.iter().any(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["instance"] == instance
            }),
            "no {instance} line with trace {trace_id}: {lines:#?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn at_one_percent_an_unsampled_request_exports_nothing_and_every_hop_logs_its_trace_id() {
    let (collector, endpoint) = Collector::start().await;
    let dir = tempfile::tempdir().unwrap();
    let up = mesh(
        dir.path(),
        Some(&endpoint),
        &[
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.01"),
        ],
    );
    let gateway = format!("http://{}", up.instance("gateway"));
    // An unsampled client trace (flags 00): nothing of it is exported.
    let trace_id = "aaaaaaaaaaaaaaaabbbbbbbbbbbbbbbb";
    order(
        &gateway,
        "unsampled-1",
        "tok_visa",
        Some(&format!("00-{trace_id}-2222222222222222-00")),
    );
    // Give the batch processors (100 ms) ample time to send anything.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !collector.spans().iter().any(|s| s.trace_id() == trace_id),
        "a span of the unsampled trace was exported"
    );
    every_hop_logged(&up, trace_id);
}

/// With a sampler that samples every new trace, a caller's "not sampled"
/// must still reach every hop: had one lost it, that hop would have
/// started a sampled trace of its own and exported it.
#[tokio::test(flavor = "multi_thread")]
async fn the_callers_sampled_flag_off_reaches_every_hop() {
    flag_off_reaches_every_hop("info,brewmesh_gateway::access=debug").await;
}

/// The same with logs at warn, where no log line wants a request's span:
/// its trace context must live on all the same.
#[tokio::test(flavor = "multi_thread")]
async fn with_logs_at_warn_the_sampled_flag_off_still_reaches_every_hop() {
    flag_off_reaches_every_hop("warn").await;
}

async fn flag_off_reaches_every_hop(log_level: &str) {
    let (collector, endpoint) = Collector::start().await;
    let dir = tempfile::tempdir().unwrap();
    let up = mesh(
        dir.path(),
        Some(&endpoint),
        &[
            ("OTEL_TRACES_SAMPLER", "parentbased_always_on"),
            ("RUST_LOG", log_level),
        ],
    );
    let gateway = format!("http://{}", up.instance("gateway"));
    let trace_id = "ccccccccccccccccdddddddddddddddd";
    order(
        &gateway,
        "unsampled-2",
        "tok_visa",
        Some(&format!("00-{trace_id}-3333333333333333-00")),
    );
    // The control: without a traceparent, the same mesh samples the order,
    // whole.
    order(&gateway, "sampled-2", "tok_visa", None);
    let complete = |spans: &[CollectedSpan]| {
        has(spans, "gateway", "POST /v1/orders")
            && has(spans, "payment", "brewmesh.payment.v1.Payments/Capture")
    };
    let started = Instant::now();
    while !collector
        .spans()
        .iter()
        .any(|s| s.service == "payment" && s.span.name == "brewmesh.payment.v1.Payments/Capture")
    {
        assert!(
            started.elapsed() < PATIENCE,
            "the control order was not traced"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let control = collector
        .spans()
        .into_iter()
        .find(|s| s.service == "gateway" && s.span.name == "POST /v1/orders")
        .expect("the control's gateway span");
    spans_of(&collector, &control.trace_id(), complete);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let leaked: Vec<(String, String)> = collector
        .spans()
        .iter()
        .filter(|s| s.trace_id() == trace_id || s.trace_id() != control.trace_id())
        // The watches (curl, no traceparent) are traces of their own.
        .filter(|s| !s.span.name.starts_with("brewmesh.registry") && !s.span.name.contains("atch"))
        .map(|s| (s.service.clone(), s.span.name.clone()))
        .collect();
    assert!(
        leaked.is_empty(),
        "spans outside the control's trace: {leaked:?}"
    );
    if log_level.starts_with("info") {
        every_hop_logged(&up, trace_id);
    }
}

/// The `trace_id` exemplars on `family`'s bucket lines whose labels
/// include each of `labels`, in an OpenMetrics scrape.
fn exemplars(openmetrics: &str, family: &str, labels: &[&str]) -> Vec<String> {
    openmetrics
        .lines()
        .filter(|l| l.starts_with(&format!("{family}_bucket{{")))
        .filter(|l| labels.iter().all(|label| l.contains(label)))
        .filter_map(|l| l.split_once(" # {trace_id=\""))
        .filter_map(|(_, rest)| rest.split_once('"').map(|(id, _)| id.to_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn latency_buckets_name_a_sampled_trace_as_their_exemplar() {
    let (collector, endpoint) = Collector::start().await;
    let dir = tempfile::tempdir().unwrap();
    let up = mesh(dir.path(), Some(&endpoint), &[]);
    let gateway = format!("http://{}", up.instance("gateway"));
    let trace_id = "7d4a1c0e9b3f8a6d2e5c7b9a1f3d5e7c";
    order(
        &gateway,
        "exemplar-1",
        "tok_visa",
        Some(&format!("00-{trace_id}-4444444444444444-01")),
    );
    let scrape = |instance: &str, accept: Option<&str>| {
        let url = format!("http://{}/metrics", up.instance(instance));
        let mut args = vec!["-i", url.as_str()];
        let header;
        if let Some(accept) = accept {
            header = format!("Accept: {accept}");
            args.extend(["-H", header.as_str()]);
        }
        curl(&args)
    };
    let openmetrics = "application/openmetrics-text; version=1.0.0, text/plain;q=0.5";
    let barista = scrape("barista-1", Some(openmetrics));
    assert!(
        barista
            .to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{}",
        &barista[..200.min(barista.len())]
    );
    let placed = exemplars(
        &barista,
        "rpc_server_duration_seconds",
        &["method=\"PlaceOrder\""],
    );
    assert_eq!(
        placed,
        [trace_id],
        "PlaceOrder's exemplar is the order's trace"
    );
    let routed = exemplars(
        &scrape("gateway", Some(openmetrics)),
        "http_server_duration_seconds",
        &["route=\"/v1/orders\"", "method=\"POST\""],
    );
    assert_eq!(routed, [trace_id]);
    // The trace it names is one the receiver got, from that very process.
    spans_of(&collector, trace_id, |spans| {
        has(spans, "barista", "brewmesh.barista.v1.Barista/PlaceOrder")
            && has(spans, "gateway", "POST /v1/orders")
    });
    // Asked for nothing in particular: the Prometheus text format, which
    // has no exemplars.
    let plain = scrape("barista-1", None);
    assert!(
        plain
            .to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4")
    );
    assert!(
        !plain.contains(" # {"),
        "no exemplar in the Prometheus text"
    );
    assert!(!plain.contains("# EOF"));
    assert!(plain.contains("# TYPE rpc_server_requests_total counter"));
}

#[tokio::test(flavor = "multi_thread")]
async fn rpc_counters_also_arrive_over_otlp() {
    let (collector, endpoint) = Collector::start().await;
    let dir = tempfile::tempdir().unwrap();
    let up = mesh(
        dir.path(),
        Some(&endpoint),
        &[
            ("OTEL_METRICS_EXPORTER", "otlp"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "200"),
        ],
    );
    let gateway = format!("http://{}", up.instance("gateway"));
    order(&gateway, "metered-1", "tok_visa", None);
    order(&gateway, "metered-2", "tok_visa", None);
    // Cumulative sums: the latest export of each process says it all.
    let latest = |service: &str, name: &str| {
        collector
            .metrics()
            .into_iter()
            .rev()
            .find(|m| m.service == service && m.metric.name == name)
    };
    let started = Instant::now();
    loop {
        let placed = latest("barista", "rpc.server.requests")
            .map(|m| m.sum_where(&["rpc.method=PlaceOrder", "rpc.grpc.status_code=0"]));
        let posted = latest("gateway", "http.server.requests")
            .map(|m| m.sum_where(&["http.route=/v1/orders", "http.response.status_code=201"]));
        let captured = latest("payment", "rpc.server.requests").is_some();
        if placed == Some(2) && posted == Some(2) && captured {
            break;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "OTLP metrics: PlaceOrder {placed:?}, POST /v1/orders {posted:?}, payment {captured}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let durations = latest("barista", "rpc.server.call.duration").expect("a duration histogram");
    assert_eq!(durations.metric.unit, "s");
}

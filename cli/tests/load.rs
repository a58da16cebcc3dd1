//! `brewmesh load` against a real mesh started by `brewmesh up`: its counts
//! (served, failed, errors by code) agree with what the mesh did.

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

mod support;

use support::{Process, curl, sample};

fn up(dir: &std::path::Path, barista: &[&str]) -> Process {
    let mut extra = vec!["--payment-arg=--processing-delay=10ms"];
    extra.extend_from_slice(barista);
    let args = Process::up_args(dir, &extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Process::start(&args)
}

/// Runs `brewmesh load <args> --json <file> --no-progress`; its summary and
/// its report.
fn load(dir: &std::path::Path, args: &[&str]) -> (String, serde_json::Value) {
    let report = dir.join("report.json");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_brewmesh"))
        .arg("load")
        .args(args)
        .arg("--json")
        .arg(&report)
        .arg("--no-progress")
        .output()
        .unwrap();
    let summary = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "{summary}\n{output:?}");
    let report = serde_json::from_slice(&std::fs::read(report).unwrap()).unwrap();
    (summary, report)
}

#[tokio::test(flavor = "multi_thread")]
async fn load_counts_served_and_declined_customers_as_the_mesh_does() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = up(
        dir.path(),
        &[
            "--barista-arg=--espresso-time=50ms",
            "--barista-arg=--milk-time=50ms",
        ],
    );
    let gateway = format!("http://{}", mesh.instance("gateway"));
    let (summary, report) = load(
        dir.path(),
        &[
            "--gateway",
            &gateway,
            "--customers",
            "12",
            "--concurrency",
            "4",
            "--declined-every",
            "4",
        ],
    );
    assert!(
        summary.starts_with("Took ") && summary.contains("s to serve coffee to 9 customers"),
        "{summary}"
    );
    assert_eq!(report["customers"], 12);
    assert_eq!(report["served"], 9);
    assert_eq!(report["failed"], 3);
    assert_eq!(report["failed_by_reason"]["payment declined"], 3);
    assert_eq!(report["errors"], 0);
    assert!(report["latency_ms"]["p99"].as_f64().unwrap() > 0.0);

    // The mesh counted the same: 9 ready, 3 failed.
    let text = curl(&[&format!("http://{}/metrics", mesh.instance("barista-1"))]);
    let finished = |outcome| {
        sample(
            &text,
            "brewmesh_orders_finished_total",
            &[("outcome", outcome)],
        )
    };
    assert_eq!(finished("ready"), 9.0);
    assert_eq!(finished("failed"), 3.0);

    // Straight to the barista over gRPC, open loop: the same counting.
    let barista = mesh.instance("barista-1").to_string();
    let (_, report) = load(
        dir.path(),
        &[
            "--grpc",
            &barista,
            "--customers",
            "6",
            "--rate",
            "50",
            "--declined-every",
            "3",
        ],
    );
    assert_eq!(
        (report["served"].as_u64(), report["failed"].as_u64()),
        (Some(4), Some(2))
    );
    assert_eq!(report["loop"], "open");
}

#[tokio::test(flavor = "multi_thread")]
async fn load_counts_calls_refused_by_a_full_shop_by_code() {
    let dir = tempfile::tempdir().unwrap();
    // One espresso machine, no queue, a long pull: one order at a time.
    let mesh = up(
        dir.path(),
        &[
            "--barista-arg=--espresso-machines=1",
            "--barista-arg=--queue-depth=0",
            "--barista-arg=--espresso-time=3s",
            "--barista-arg=--milk-time=50ms",
        ],
    );
    let gateway = format!("http://{}", mesh.instance("gateway"));
    let (summary, report) = load(
        dir.path(),
        &[
            "--gateway",
            &gateway,
            "--customers",
            "5",
            "--concurrency",
            "5",
        ],
    );
    assert_eq!(report["served"], 1, "{summary}");
    assert_eq!(
        report["errors_by_code"]["RESOURCE_EXHAUSTED"], 4,
        "{summary}"
    );
    assert!(summary.contains("4 × RESOURCE_EXHAUSTED"), "{summary}");
}

#[tokio::test(flavor = "multi_thread")]
async fn patient_customers_come_back_after_a_full_shop_until_all_are_served() {
    let dir = tempfile::tempdir().unwrap();
    // Two orders in flight at most: the other customers are sent away
    // with a time to come back.
    let mesh = up(
        dir.path(),
        &[
            "--barista-arg=--max-orders=2",
            "--barista-arg=--espresso-time=200ms",
            "--barista-arg=--milk-time=50ms",
        ],
    );
    let gateway = format!("http://{}", mesh.instance("gateway"));
    let barista = mesh.instance("barista-1").to_string();
    for target in [["--gateway", &gateway], ["--grpc", &barista]] {
        let (summary, report) = load(
            dir.path(),
            &[
                target[0],
                target[1],
                "--customers",
                "8",
                "--concurrency",
                "8",
                "--patient",
            ],
        );
        assert_eq!(report["served"], 8, "{target:?}: {summary}");
        assert_eq!(report["errors"], 0, "{target:?}: {summary}");
        assert_eq!(report["patient"], true);
        assert!(
            report["comebacks"].as_u64().unwrap() > 0,
            "{target:?}: {summary}"
        );
        assert!(summary.contains("× after a full shop"), "{summary}");
    }
    // Impatient, the same crowd leaves a full shop.
    let (summary, report) = load(
        dir.path(),
        &["--grpc", &barista, "--customers", "8", "--concurrency", "8"],
    );
    assert!(
        report["errors_by_code"]["RESOURCE_EXHAUSTED"]
            .as_u64()
            .unwrap()
            > 0,
        "{summary}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn load_in_batches_counts_each_customer_of_a_group() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = up(
        dir.path(),
        &[
            "--barista-arg=--espresso-time=50ms",
            "--barista-arg=--milk-time=50ms",
        ],
    );
    let gateway = format!("http://{}", mesh.instance("gateway"));
    // 12 customers in groups of 5 (the last of 2), two groups at a time.
    let (summary, report) = load(
        dir.path(),
        &[
            "--gateway",
            &gateway,
            "--customers",
            "12",
            "--concurrency",
            "10",
            "--batch",
            "5",
            "--declined-every",
            "4",
        ],
    );
    assert!(
        summary.contains("batches of 5: BatchPlaceOrders"),
        "{summary}"
    );
    assert_eq!(report["batch"], 5);
    assert_eq!(report["customers"], 12);
    assert_eq!(report["served"], 9, "{summary}");
    assert_eq!(report["failed_by_reason"]["payment declined"], 3);
    assert_eq!(report["errors"], 0);

    // Over gRPC, open loop, the same counting.
    let barista = mesh.instance("barista-1").to_string();
    let (_, report) = load(
        dir.path(),
        &[
            "--grpc",
            &barista,
            "--customers",
            "6",
            "--rate",
            "50",
            "--batch",
            "3",
            "--declined-every",
            "3",
        ],
    );
    assert_eq!(
        (report["served"].as_u64(), report["failed"].as_u64()),
        (Some(4), Some(2))
    );
    // The mesh made 12 + 6 orders: 13 ready, 5 failed.
    let text = curl(&[&format!("http://{}/metrics", mesh.instance("barista-1"))]);
    let finished = |outcome| {
        sample(
            &text,
            "brewmesh_orders_finished_total",
            &[("outcome", outcome)],
        )
    };
    assert_eq!(finished("ready"), 13.0);
    assert_eq!(finished("failed"), 5.0);
}

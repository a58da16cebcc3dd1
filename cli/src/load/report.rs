//! The end of a run, told three ways: a summary in the seed's words, a JSON
//! report, and an SVG chart of latency over time.

use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::{Value, json};

use super::args::Args;
use super::follow::{COMEBACKS, RETRIES};
use super::tally::{Tally, ms};

pub(super) fn print_summary(tally: &Tally, took: Duration, target: &str, customers: u64) {
    let word = if tally.served == 1 {
        "customer"
    } else {
        "customers"
    };
    println!(
        "Took {:.2}s to serve coffee to {} {word}",
        took.as_secs_f64(),
        tally.served
    );
    println!("  target      {target}");
    println!(
        "  customers   {customers}: served {}, failed {}, errors {}",
        tally.served,
        tally.failed.values().sum::<u64>(),
        tally.errors.values().sum::<u64>()
    );
    for (reason, n) in &tally.failed {
        println!("    failed    {n} × {reason}");
    }
    for (code, n) in &tally.errors {
        let example = tally.examples.get(code).map_or("", String::as_str);
        println!("    error     {n} × {code} (e.g. {example:?})");
    }
    let retries = RETRIES.load(Ordering::Relaxed);
    if retries > 0 {
        println!("    retried   {retries} × PlaceOrder after UNAVAILABLE (same idempotency key)");
    }
    let comebacks = COMEBACKS.load(Ordering::Relaxed);
    if comebacks > 0 {
        println!("    came back {comebacks} × after a full shop (--patient, same idempotency key)");
    }
    println!(
        "  throughput  {:.1} served/s",
        tally.served as f64 / took.as_secs_f64()
    );
    if tally.served > 0 {
        let h = &tally.latency;
        println!(
            "  latency     p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms, max {:.1} ms",
            ms(h.value_at_quantile(0.50)),
            ms(h.value_at_quantile(0.90)),
            ms(h.value_at_quantile(0.99)),
            ms(h.value_at_quantile(0.999)),
            ms(h.max())
        );
    }
}

pub(super) fn report(
    tally: &Tally,
    took: Duration,
    target: &str,
    customers: u64,
    args: &Args,
) -> Value {
    let h = &tally.latency;
    json!({
        "target": target,
        "loop": if args.rate.is_some() { "open" } else { "closed" },
        "concurrency": if args.rate.is_some() { Value::Null } else { json!(args.concurrency) },
        "rate": args.rate,
        "batch": args.batch,
        "until": format!("{:?}", args.until).to_lowercase(),
        "customers": customers,
        "served": tally.served,
        "failed": tally.failed.values().sum::<u64>(),
        "failed_by_reason": tally.failed,
        "errors": tally.errors.values().sum::<u64>(),
        "errors_by_code": tally.errors,
        "error_examples": tally.examples,
        "place_order_retries": RETRIES.load(Ordering::Relaxed),
        "patient": args.patient,
        "comebacks": COMEBACKS.load(Ordering::Relaxed),
        "seconds": took.as_secs_f64(),
        "served_per_second": tally.served as f64 / took.as_secs_f64(),
        "latency_ms": {
            "p50": ms(h.value_at_quantile(0.50)),
            "p90": ms(h.value_at_quantile(0.90)),
            "p99": ms(h.value_at_quantile(0.99)),
            "p999": ms(h.value_at_quantile(0.999)),
            "max": ms(h.max()),
            "mean": h.mean() / 1000.0,
        },
        "timeline": tally.timeline.iter().enumerate().map(|(second, s)| json!({
            "second": second,
            "served": s.served,
            "p50_ms": s.p50_ms,
            "p99_ms": s.p99_ms,
        })).collect::<Vec<_>>(),
    })
}

/// Latency over time (p50 and p99 of each second's served customers) and
/// the served rate, as an SVG line chart.
pub(super) fn chart(tally: &Tally) -> String {
    let (width, height, pad) = (900.0, 400.0, 50.0);
    let points: Vec<(usize, f64, f64, u64)> = tally
        .timeline
        .iter()
        .enumerate()
        .filter(|(_, s)| s.served > 0)
        .map(|(t, s)| (t, s.p50_ms, s.p99_ms, s.served))
        .collect();
    let seconds = tally.timeline.len().max(1) as f64;
    let top = points.iter().map(|p| p.2).fold(1.0, f64::max) * 1.1;
    let x = |t: usize| pad + (t as f64 + 0.5) / seconds * (width - 2.0 * pad);
    let y = |v: f64| height - pad - v / top * (height - 2.0 * pad);
    let line = |pick: fn(&(usize, f64, f64, u64)) -> f64| {
        points
            .iter()
            .map(|p| format!("{:.1},{:.1}", x(p.0), y(pick(p))))
            .collect::<Vec<_>>()
            .join(" ")
    };
    format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{pad}" y="20">Latency to served, by second of the run (p50 blue, p99 red); {served} served</text>
<line x1="{pad}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="black"/>
<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{bottom}" stroke="black"/>
<text x="{pad}" y="{below}">0 s</text><text x="{right}" y="{below}" text-anchor="end">{seconds} s</text>
<text x="5" y="{pad}">{top:.0} ms</text><text x="5" y="{bottom}">0</text>
<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{p50}"/>
<polyline fill="none" stroke="#d62728" stroke-width="1.5" points="{p99}"/>
</svg>
"##,
        served = tally.served,
        bottom = height - pad,
        right = width - pad,
        below = height - pad + 15.0,
        p50 = line(|p| p.1),
        p99 = line(|p| p.2),
    )
}

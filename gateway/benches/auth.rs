//! What checking a bearer token costs the gateway per request, beside a
//! baseline measured in the same run (the check with tokens off): a token
//! the client reuses (found in the verified-token cache), and a new token
//! every time (an Ed25519 signature verified, its claims parsed).
//!
//! `cargo bench -p brewmesh-gateway --bench auth`

#![allow(clippy::unwrap_used, missing_docs)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue};

use brewmesh_gateway::auth::{Auth, AuthConfig, CACHED_TOKENS};
use brewmesh_gateway::issuer::{AUDIENCE, ISSUER, Issuer};

const SERVICE: &str = "brewmesh.barista.v1.Barista";

fn bearer(token: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    let value = HeaderValue::from_str(&format!("Bearer {token}")).unwrap();
    headers.insert(http::header::AUTHORIZATION, value);
    headers
}

fn benches(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let issuer = Issuer::load_or_create(dir.path()).unwrap();
    let auth = Auth::new(AuthConfig {
        jwks: issuer.jwks(),
        issuer: Some(ISSUER.into()),
        audience: Some(AUDIENCE.into()),
        leeway: Duration::from_secs(60),
    })
    .unwrap();
    let day = Duration::from_secs(24 * 3600);
    let reused = bearer(&issuer.mint("ada", "orders", day).unwrap());
    // More distinct tokens than the cache holds, taken in turn: each is a
    // miss by the time it comes round again.
    let fresh: Vec<HeaderMap> = (0..CACHED_TOKENS + 1000)
        .map(|n| {
            bearer(
                &issuer
                    .mint(&format!("customer-{n}"), "orders", day)
                    .unwrap(),
            )
        })
        .collect();
    let off = Auth::off();

    let mut group = c.benchmark_group("bearer token");
    group.bench_function("baseline: tokens off", |b| {
        b.iter(|| black_box(off.check(black_box(&reused), SERVICE, "GetOrder")))
    });
    group.bench_function("the same token again (cached)", |b| {
        b.iter(|| black_box(auth.check(black_box(&reused), SERVICE, "GetOrder").unwrap()))
    });
    let mut next = 0;
    group.bench_function("a new token each time (EdDSA verify)", |b| {
        b.iter(|| {
            next = (next + 1) % fresh.len();
            black_box(
                auth.check(black_box(&fresh[next]), SERVICE, "GetOrder")
                    .unwrap(),
            )
        })
    });
    group.finish();
}

criterion_group!(auth, benches);
criterion_main!(auth);

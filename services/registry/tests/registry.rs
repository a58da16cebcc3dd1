//! The registry over real gRPC, with real instances whose health it follows.

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tonic::Code;
use tonic::service::Routes;
use tonic::transport::Channel;

use brewmesh::pb::registry::v1::registry_client::RegistryClient;
use brewmesh::pb::registry::v1::{
    DeregisterRequest, HealthStatus, Instance, KeepAliveRequest, ListInstancesRequest,
    ListServicesRequest, RegisterRequest, ResolveRequest, WatchRequest, WatchResponse,
};
use brewmesh_runtime::server::{Drained, ServeArgs, ServeError};
use brewmesh_testing::{Running, spawn, spawn_on};

const TOKEN: &str = "test-token";
const SERVICE: &str = "test.v1.Echo";

async fn registry() -> (
    Running<Result<Drained, ServeError>>,
    RegistryClient<Channel>,
) {
    let _ = brewmesh_runtime::telemetry::init(
        brewmesh_runtime::telemetry::LogFormat::Text,
        brewmesh_runtime::telemetry::Identity::of("test"),
    );
    let config = brewmesh_registry::Config {
        serve: ServeArgs {
            listen: None,
            drain_timeout: Duration::from_secs(5),
            inject_latency: None,
            faults: Vec::new(),
        },
        token: TOKEN.parse().unwrap(),
        default_ttl: Duration::from_secs(10),
        max_ttl: Duration::from_secs(60),
        health_retry: Duration::from_millis(100),
    };
    let server = spawn(|l, s| brewmesh_registry::run(l, config, s)).await;
    let client = RegistryClient::new(brewmesh_runtime::client::channel(&server.url()).unwrap());
    (server, client)
}

/// A real server answering grpc.health.v1 for SERVICE.
fn instance_on(listener: TcpListener) -> Running<Result<Drained, ServeError>> {
    spawn_on(listener, |listener, shutdown| async move {
        let args = ServeArgs {
            listen: None,
            drain_timeout: Duration::from_secs(5),
            inject_latency: None,
            faults: Vec::new(),
        };
        let access = brewmesh_runtime::mtls::Access::new();
        brewmesh_runtime::server::serve(
            listener,
            Routes::default(),
            &[SERVICE],
            access,
            &args,
            shutdown,
        )
        .await
    })
}

/// An address where nothing listens (bound, then closed again).
async fn closed_address() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
}

async fn instance() -> Running<Result<Drained, ServeError>> {
    instance_on(TcpListener::bind("127.0.0.1:0").await.unwrap())
}

fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

fn register(id: &str, addr: SocketAddr, ttl_secs: i64) -> RegisterRequest {
    RegisterRequest {
        instance: Some(Instance {
            instance_id: id.into(),
            service: SERVICE.into(),
            address: addr.to_string(),
            ..Default::default()
        }),
        ttl: Some(prost_types::Duration {
            seconds: ttl_secs,
            nanos: 0,
        }),
    }
}

/// Reads watch updates until `accept` holds for one (bounded).
async fn until(
    updates: &mut tonic::Streaming<WatchResponse>,
    accept: impl Fn(&[String]) -> bool,
) -> Vec<String> {
    tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            let update = updates
                .next()
                .await
                .expect("watch open")
                .expect("watch update");
            let ids: Vec<String> = update
                .instances
                .into_iter()
                .map(|i| i.instance_id)
                .collect();
            if accept(&ids) {
                return ids;
            }
        }
    })
    .await
    .expect("the awaited change comes")
}

async fn watch(client: &mut RegistryClient<Channel>) -> tonic::Streaming<WatchResponse> {
    client
        .watch(WatchRequest {
            service: SERVICE.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test]
async fn register_without_the_right_token_is_unauthenticated() {
    let (_registry, mut client) = registry().await;
    let instance = instance().await;
    let status = client
        .register(register("a", instance.addr, 10))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let status = client
        .register(with_token(register("a", instance.addr, 10), "wrong"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let status = client
        .deregister(DeregisterRequest {
            lease_id: "x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let listed = client
        .list_services(ListServicesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(listed.services.is_empty(), "nothing was registered");
}

#[tokio::test]
async fn a_serving_instance_is_resolved_and_leaves_when_it_drains() {
    let (_registry, mut client) = registry().await;
    let mut updates = watch(&mut client).await;
    assert_eq!(
        until(&mut updates, |_| true).await,
        Vec::<String>::new(),
        "the first update is the current, empty set"
    );

    let served = instance().await;
    client
        .register(with_token(register("a", served.addr, 10), TOKEN))
        .await
        .unwrap();
    until(&mut updates, |ids| ids == ["a"]).await;
    let resolved = client
        .resolve(ResolveRequest {
            service: SERVICE.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resolved.instances.len(), 1);
    assert!(resolved.instances[0].lease_expire_time.is_some());

    // Draining turns it NOT_SERVING: it leaves before its lease ends.
    served.stop().await.unwrap();
    until(&mut updates, |ids| ids.is_empty()).await;
    let listed = client
        .list_services(ListServicesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (listed.services[0].instances, listed.services[0].serving),
        (1, 0)
    );
}

#[tokio::test]
async fn an_instance_that_comes_back_on_its_address_is_resolved_again() {
    let (_registry, mut client) = registry().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let first = instance_on(listener);
    client
        .register(with_token(register("a", addr, 30), TOKEN))
        .await
        .unwrap();
    let mut updates = watch(&mut client).await;
    until(&mut updates, |ids| ids == ["a"]).await;

    first.stop().await.unwrap();
    until(&mut updates, |ids| ids.is_empty()).await;
    let _second = instance_on(TcpListener::bind(addr).await.unwrap());
    until(&mut updates, |ids| ids == ["a"]).await;
}

#[tokio::test]
async fn an_unreachable_instance_is_never_resolved() {
    let (_registry, mut client) = registry().await;
    let nobody = closed_address().await;
    let served = instance().await;
    client
        .register(with_token(register("dead", nobody, 10), TOKEN))
        .await
        .unwrap();
    client
        .register(with_token(register("live", served.addr, 10), TOKEN))
        .await
        .unwrap();
    let mut updates = watch(&mut client).await;
    assert_eq!(until(&mut updates, |ids| !ids.is_empty()).await, ["live"]);
}

#[tokio::test]
async fn list_instances_shows_every_instance_with_its_health() {
    let (_registry, mut client) = registry().await;
    let nobody = closed_address().await;
    let served = instance().await;
    for (id, addr) in [("live", served.addr), ("dead", nobody)] {
        client
            .register(with_token(register(id, addr, 10), TOKEN))
            .await
            .unwrap();
    }
    let listed = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            let listed = client
                .list_instances(ListInstancesRequest {
                    service: SERVICE.into(),
                })
                .await
                .unwrap()
                .into_inner()
                .instances;
            let health: Vec<(String, HealthStatus)> = listed
                .iter()
                .map(|i| (i.instance_id.clone(), i.health()))
                .collect();
            if health
                == [
                    ("dead".to_owned(), HealthStatus::Unreachable),
                    ("live".to_owned(), HealthStatus::Serving),
                ]
            {
                return listed;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("both instances listed with their health");
    assert!(listed.iter().all(|i| i.lease_expire_time.is_some()));
    let other = client
        .list_instances(ListInstancesRequest {
            service: "other.v1.Nobody".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(other.instances.is_empty());
    let all = client
        .list_instances(ListInstancesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.instances.len(), 2);
}

#[tokio::test]
async fn a_lease_lives_while_kept_alive_and_expires_without() {
    let (_registry, mut client) = registry().await;
    let served = instance().await;
    let kept = client
        .register(with_token(register("kept", served.addr, 1), TOKEN))
        .await
        .unwrap()
        .into_inner();
    client
        .register(with_token(register("dropped", served.addr, 1), TOKEN))
        .await
        .unwrap();
    assert_eq!(kept.ttl.unwrap().seconds, 1);

    // Renew `kept` every 200 ms over its own stream.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let renewals = client
        .keep_alive(with_token(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            TOKEN,
        ))
        .await
        .unwrap()
        .into_inner();
    let lease = kept.lease_id.clone();
    let renewer = tokio::spawn(async move {
        let mut renewals = renewals;
        loop {
            tx.send(KeepAliveRequest {
                lease_id: lease.clone(),
            })
            .await
            .unwrap();
            assert!(renewals.next().await.unwrap().is_ok(), "renewal refused");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });

    let mut updates = watch(&mut client).await;
    until(&mut updates, |ids| ids.len() == 2).await;
    // `dropped` was never renewed: after its 1 s it is gone, `kept` stays.
    assert_eq!(until(&mut updates, |ids| ids.len() < 2).await, ["kept"]);
    renewer.abort();
    until(&mut updates, |ids| ids.is_empty()).await;
}

#[tokio::test]
async fn keeping_an_unknown_lease_alive_is_not_found_and_deregister_removes_at_once() {
    let (_registry, mut client) = registry().await;
    let requests = tokio_stream::iter([KeepAliveRequest {
        lease_id: "lease_nope".into(),
    }]);
    let mut answers = client
        .keep_alive(with_token(requests, TOKEN))
        .await
        .unwrap()
        .into_inner();
    let status = answers.next().await.unwrap().unwrap_err();
    assert_eq!(status.code(), Code::NotFound);

    let served = instance().await;
    let lease = client
        .register(with_token(register("a", served.addr, 30), TOKEN))
        .await
        .unwrap()
        .into_inner()
        .lease_id;
    let mut updates = watch(&mut client).await;
    until(&mut updates, |ids| ids == ["a"]).await;
    client
        .deregister(with_token(DeregisterRequest { lease_id: lease }, TOKEN))
        .await
        .unwrap();
    until(&mut updates, |ids| ids.is_empty()).await;
}

#[tokio::test]
async fn a_bad_registration_names_its_fields() {
    let (_registry, mut client) = registry().await;
    let mut request = register("", "127.0.0.1:1".parse().unwrap(), 10);
    request.instance.as_mut().unwrap().address = "no-port".into();
    let status = client
        .register(with_token(request, TOKEN))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    use tonic_types::StatusExt;
    let fields: Vec<String> = status
        .get_details_bad_request()
        .unwrap()
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect();
    assert_eq!(fields, ["instance.instance_id", "instance.address"]);
}

//! grpc.health.v1 and server reflection as their protocols have them, seen
//! by real gRPC clients over a real server on 127.0.0.1.

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use std::time::Duration;

use brewmesh_runtime::health::HealthStatuses;
use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Server};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::{v1, v1alpha};

/// A server of health and reflection only, and a channel to it.
async fn server(health: &HealthStatuses) -> Channel {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (reflection_v1, reflection_v1alpha) =
        brewmesh_runtime::reflection::services(&["brewmesh.barista.v1.Barista"]).unwrap();
    let router = Server::builder()
        .add_service(health.service(CancellationToken::new()))
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    tokio::spawn(router.serve_with_incoming(TcpListenerStream::new(listener)));
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// The next message of `stream` within a generous bound (a hang fails the
/// test instead of stalling it).
async fn next<T>(stream: &mut tonic::Streaming<T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("a message within 10 s")
        .expect("the stream is still open")
        .expect("a message, not an error")
}

#[tokio::test]
async fn a_watch_of_an_unknown_service_stays_open_until_the_service_appears() {
    let health = HealthStatuses::new();
    health.set("", ServingStatus::Serving);
    let mut client = HealthClient::new(server(&health).await);

    let unknown = client
        .check(HealthCheckRequest {
            service: "shop.v1.Later".into(),
        })
        .await
        .expect_err("Check of an unknown service");
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    let mut updates = client
        .watch(HealthCheckRequest {
            service: "shop.v1.Later".into(),
        })
        .await
        .expect("Watch of an unknown service is not refused")
        .into_inner();
    assert_eq!(
        next(&mut updates).await.status(),
        ServingStatus::ServiceUnknown
    );

    // Another service's change is not news to this watcher; the stream stays
    // open and the next message is the watched service's own.
    health.set("shop.v1.Other", ServingStatus::NotServing);
    health.set("shop.v1.Later", ServingStatus::Serving);
    assert_eq!(next(&mut updates).await.status(), ServingStatus::Serving);
    health.set("shop.v1.Later", ServingStatus::Serving);
    health.set("shop.v1.Later", ServingStatus::NotServing);
    assert_eq!(next(&mut updates).await.status(), ServingStatus::NotServing);

    let known = client
        .check(HealthCheckRequest {
            service: "shop.v1.Later".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(known.status(), ServingStatus::NotServing);
}

#[tokio::test]
async fn an_unknown_symbol_is_an_error_response_and_the_stream_goes_on() {
    use v1::server_reflection_request::MessageRequest;
    use v1::server_reflection_response::MessageResponse;

    let channel = server(&HealthStatuses::new()).await;
    let mut client = v1::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut answers = client
        .server_reflection_info(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let ask = |request| v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };

    tx.send(ask(MessageRequest::FileContainingSymbol(
        "brewmesh.barista.v1.Nope".into(),
    )))
    .await
    .unwrap();
    match next(&mut answers).await.message_response {
        Some(MessageResponse::ErrorResponse(error)) => {
            assert_eq!(error.error_code, tonic::Code::NotFound as i32);
            assert!(error.error_message.contains("brewmesh.barista.v1.Nope"));
        }
        other => panic!("expected an error_response, got {other:?}"),
    }

    tx.send(ask(MessageRequest::FileContainingSymbol(
        "brewmesh.barista.v1.Barista.PlaceOrder".into(),
    )))
    .await
    .unwrap();
    match next(&mut answers).await.message_response {
        Some(MessageResponse::FileDescriptorResponse(files)) => {
            let first = <prost_types::FileDescriptorProto as prost::Message>::decode(
                files.file_descriptor_proto[0].as_slice(),
            )
            .unwrap();
            assert_eq!(first.name(), "brewmesh/barista/v1/barista.proto");
        }
        other => panic!("expected the file, got {other:?}"),
    }

    tx.send(ask(MessageRequest::ListServices(String::new())))
        .await
        .unwrap();
    match next(&mut answers).await.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
            assert!(names.contains(&"brewmesh.barista.v1.Barista"), "{names:?}");
            assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");
        }
        other => panic!("expected the services, got {other:?}"),
    }

    // v1alpha, which grpcurl asks, answers the same way.
    let mut alpha = v1alpha::server_reflection_client::ServerReflectionClient::new(channel);
    let question = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::FileByFilename("nope.proto".into()),
        ),
    };
    let mut answers = alpha
        .server_reflection_info(tokio_stream::iter([question.clone(), question]))
        .await
        .unwrap()
        .into_inner();
    for _ in 0..2 {
        match next(&mut answers).await.message_response {
            Some(v1alpha::server_reflection_response::MessageResponse::ErrorResponse(e)) => {
                assert_eq!(e.error_code, tonic::Code::NotFound as i32);
            }
            other => panic!("expected an error_response, got {other:?}"),
        }
    }
}

//! gRPC server reflection, v1 and v1alpha (grpcurl still asks the latter),
//! over the descriptors the server is built from.
//!
//! Written here rather than taken from tonic-reflection, which ends the whole
//! stream with NOT_FOUND when one symbol is unknown: the reflection protocol
//! answers each request on the stream, a failed one with an
//! `error_response`, and the stream goes on. A file is sent with everything
//! it imports, so a client resolves a symbol in one round trip.

use std::collections::HashSet;
use std::sync::Arc;

use prost::Message;
use prost_reflect::{DescriptorPool, FileDescriptor};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tonic_reflection::pb::{v1, v1alpha};
use v1::server_reflection_request::MessageRequest;
use v1::server_reflection_response::MessageResponse;

/// What reflection knows: every descriptor, and the services to list.
#[derive(Debug)]
struct Index {
    pool: DescriptorPool,
    services: Vec<String>,
}

/// Reflection's two versions, v1 and v1alpha, answering alike.
pub type Servers = (
    v1::server_reflection_server::ServerReflectionServer<Reflection>,
    v1alpha::server_reflection_server::ServerReflectionServer<Reflection>,
);

impl Reflection {
    fn servers(self) -> Servers {
        (
            v1::server_reflection_server::ServerReflectionServer::new(self.clone()),
            v1alpha::server_reflection_server::ServerReflectionServer::new(self),
        )
    }
}

/// Reflection for a server of `services`, besides which it lists health and
/// reflection themselves. Fails only if a descriptor set built into the
/// binary does not decode.
pub fn services(services: &[&str]) -> Result<Servers, prost_reflect::DescriptorError> {
    let reflection = Reflection(Arc::new(Index::new(services)?));
    Ok(reflection.servers())
}

/// Reflection over `pool` (a gateway's: every descriptor it fronts),
/// listing `services` and health and reflection themselves, whose
/// descriptors are added to it when missing.
pub fn over_pool(
    mut pool: DescriptorPool,
    services: &[&str],
) -> Result<Servers, prost_reflect::DescriptorError> {
    add_own(&mut pool)?;
    let reflection = Reflection(Arc::new(Index {
        pool,
        services: listed(services),
    }));
    Ok(reflection.servers())
}

/// Adds health's and reflection's descriptors to `pool`, unless there.
pub fn add_own(pool: &mut DescriptorPool) -> Result<(), prost_reflect::DescriptorError> {
    for (set, file) in [
        (
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            "grpc.health.v1.Health",
        ),
        (
            v1::FILE_DESCRIPTOR_SET,
            "grpc.reflection.v1.ServerReflection",
        ),
        (
            v1alpha::FILE_DESCRIPTOR_SET,
            "grpc.reflection.v1alpha.ServerReflection",
        ),
    ] {
        if pool.get_service_by_name(file).is_none() {
            pool.decode_file_descriptor_set(set)?;
        }
    }
    Ok(())
}

fn listed(services: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for name in services.iter().copied().chain([
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ]) {
        if !out.iter().any(|s| s == name) {
            out.push(name.to_owned());
        }
    }
    out
}

/// The reflection service, for either version of the protocol.
#[derive(Clone, Debug)]
pub struct Reflection(Arc<Index>);

impl Index {
    fn new(services: &[&str]) -> Result<Self, prost_reflect::DescriptorError> {
        let mut pool = DescriptorPool::decode(brewmesh::FILE_DESCRIPTOR_SET)?;
        add_own(&mut pool)?;
        let services = listed(services);
        Ok(Self { pool, services })
    }

    fn answer(&self, request: Option<MessageRequest>) -> Result<MessageResponse, Status> {
        let files = |file: FileDescriptor| {
            MessageResponse::FileDescriptorResponse(v1::FileDescriptorResponse {
                file_descriptor_proto: with_imports(file),
            })
        };
        match request {
            None => Err(Status::invalid_argument("the request names no question")),
            Some(MessageRequest::ListServices(_)) => Ok(MessageResponse::ListServicesResponse(
                v1::ListServiceResponse {
                    service: (self.services.iter())
                        .map(|name| v1::ServiceResponse { name: name.clone() })
                        .collect(),
                },
            )),
            Some(MessageRequest::FileByFilename(name)) => match self.pool.get_file_by_name(&name) {
                Some(file) => Ok(files(file)),
                None => Err(Status::not_found(format!("no file {name:?}"))),
            },
            Some(MessageRequest::FileContainingSymbol(symbol)) => match self.symbol(&symbol) {
                Some(file) => Ok(files(file)),
                None => Err(Status::not_found(format!("no symbol {symbol:?}"))),
            },
            Some(MessageRequest::FileContainingExtension(wanted)) => {
                let number = u32::try_from(wanted.extension_number).ok();
                let found = (self.pool.get_message_by_name(&wanted.containing_type))
                    .and_then(|message| message.get_extension(number?));
                match found {
                    Some(extension) => Ok(files(extension.parent_file())),
                    None => Err(Status::not_found(format!(
                        "no extension {} of {:?}",
                        wanted.extension_number, wanted.containing_type
                    ))),
                }
            }
            Some(MessageRequest::AllExtensionNumbersOfType(name)) => {
                match self.pool.get_message_by_name(&name) {
                    Some(message) => Ok(MessageResponse::AllExtensionNumbersResponse(
                        v1::ExtensionNumberResponse {
                            base_type_name: name,
                            extension_number: (message.extensions())
                                .map(|e| e.number() as i32)
                                .collect(),
                        },
                    )),
                    None => Err(Status::not_found(format!("no message type {name:?}"))),
                }
            }
        }
    }

    /// The file that declares `symbol`: a service, method, message, field,
    /// enum, enum value or extension, by its full name.
    fn symbol(&self, symbol: &str) -> Option<FileDescriptor> {
        let pool = &self.pool;
        let symbol = symbol.strip_prefix('.').unwrap_or(symbol);
        if let Some(s) = pool.get_service_by_name(symbol) {
            return Some(s.parent_file());
        }
        if let Some(m) = pool.get_message_by_name(symbol) {
            return Some(m.parent_file());
        }
        if let Some(e) = pool.get_enum_by_name(symbol) {
            return Some(e.parent_file());
        }
        if let Some(e) = pool.get_extension_by_name(symbol) {
            return Some(e.parent_file());
        }
        let (parent, name) = symbol.rsplit_once('.')?;
        if let Some(s) = pool.get_service_by_name(parent) {
            return s
                .methods()
                .any(|m| m.name() == name)
                .then(|| s.parent_file());
        }
        if let Some(m) = pool.get_message_by_name(parent)
            && (m.get_field_by_name(name).is_some() || m.oneofs().any(|o| o.name() == name))
        {
            return Some(m.parent_file());
        }
        // Enum values are scoped beside their enum, not inside it.
        pool.all_enums()
            .find(|e| e.values().any(|v| v.full_name() == symbol))
            .map(|e| e.parent_file())
    }
}

/// `file` and everything it imports, directly or not, each once, encoded
/// with its options (the `google.api.http` rules among them).
fn with_imports(file: FileDescriptor) -> Vec<Vec<u8>> {
    let mut seen = HashSet::new();
    let mut order = Vec::new();
    let mut next = vec![file];
    while let Some(file) = next.pop() {
        if seen.insert(file.name().to_owned()) {
            next.extend(file.dependencies());
            order.push(file.encode_to_vec());
        }
    }
    order
}

/// Re-reads a message as another with the same fields: v1alpha's messages
/// are v1's under another package, field for field.
fn convert<From: Message, To: Message + Default>(message: &From) -> To {
    To::decode(message.encode_to_vec().as_slice()).unwrap_or_default()
}

impl Reflection {
    /// Answers each request of `requests` on the returned stream, in turn.
    fn answer_each<Req, Resp>(
        &self,
        mut requests: Streaming<Req>,
    ) -> ReceiverStream<Result<Resp, Status>>
    where
        Req: Message + Default + 'static,
        Resp: Message + Default + 'static,
    {
        let index = Arc::clone(&self.0);
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            while let Some(Ok(request)) = requests.next().await {
                let request: v1::ServerReflectionRequest = convert(&request);
                let answer =
                    (index.answer(request.message_request.clone())).unwrap_or_else(|status| {
                        MessageResponse::ErrorResponse(v1::ErrorResponse {
                            error_code: status.code() as i32,
                            error_message: status.message().to_owned(),
                        })
                    });
                let response = v1::ServerReflectionResponse {
                    valid_host: request.host.clone(),
                    original_request: Some(request),
                    message_response: Some(answer),
                };
                if tx.send(Ok(convert(&response))).await.is_err() {
                    return;
                }
            }
        });
        ReceiverStream::new(rx)
    }
}

#[tonic::async_trait]
impl v1::server_reflection_server::ServerReflection for Reflection {
    type ServerReflectionInfoStream = ReceiverStream<Result<v1::ServerReflectionResponse, Status>>;

    async fn server_reflection_info(
        &self,
        request: Request<Streaming<v1::ServerReflectionRequest>>,
    ) -> Result<Response<Self::ServerReflectionInfoStream>, Status> {
        Ok(Response::new(self.answer_each(request.into_inner())))
    }
}

#[tonic::async_trait]
impl v1alpha::server_reflection_server::ServerReflection for Reflection {
    type ServerReflectionInfoStream =
        ReceiverStream<Result<v1alpha::ServerReflectionResponse, Status>>;

    async fn server_reflection_info(
        &self,
        request: Request<Streaming<v1alpha::ServerReflectionRequest>>,
    ) -> Result<Response<Self::ServerReflectionInfoStream>, Status> {
        Ok(Response::new(self.answer_each(request.into_inner())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index() -> Index {
        Index::new(&["brewmesh.barista.v1.Barista"]).expect("descriptors")
    }

    #[test]
    fn every_kind_of_symbol_is_found_in_its_file() {
        let index = index();
        for symbol in [
            "brewmesh.barista.v1.Barista",
            "brewmesh.barista.v1.Barista.PlaceOrder",
            "brewmesh.barista.v1.PlaceOrderRequest",
            "brewmesh.barista.v1.PlaceOrderRequest.item_id",
            "brewmesh.barista.v1.OrderState",
            "brewmesh.barista.v1.ORDER_STATE_READY",
        ] {
            let file = index.symbol(symbol).unwrap_or_else(|| panic!("{symbol}"));
            assert_eq!(file.name(), "brewmesh/barista/v1/barista.proto", "{symbol}");
        }
        assert!(index.symbol("brewmesh.barista.v1.Barista.Nope").is_none());
        assert!(index.symbol("nope").is_none());
    }

    #[test]
    fn a_file_comes_with_what_it_imports() {
        let index = index();
        let file = index
            .pool
            .get_file_by_name("brewmesh/barista/v1/barista.proto");
        let names: Vec<String> = with_imports(file.expect("barista"))
            .iter()
            .map(|bytes| {
                prost_types::FileDescriptorProto::decode(bytes.as_slice())
                    .expect("file")
                    .name()
                    .to_owned()
            })
            .collect();
        assert_eq!(names[0], "brewmesh/barista/v1/barista.proto");
        for import in [
            "brewmesh/payment/v1/payment.proto",
            "google/api/annotations.proto",
            "google/api/http.proto",
            "google/protobuf/descriptor.proto",
            "google/protobuf/timestamp.proto",
        ] {
            assert!(names.iter().any(|n| n == import), "{import} in {names:?}");
        }
    }
}

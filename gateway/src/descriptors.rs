//! Where the gateway learns the services it fronts: the descriptor set
//! brewmesh is built with, descriptor-set files (`protoc -o`, `buf build`),
//! and backends' reflection services — so it can front any gRPC backend
//! without generated code.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use prost::Message as _;
use prost_reflect::DescriptorPool;
use tokio_stream::StreamExt as _;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

/// Why descriptors could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum DescriptorError {
    /// A descriptor-set file could not be read.
    #[error("reading descriptor set {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The descriptors do not form a valid pool.
    #[error("descriptors from {from}: {source}")]
    Invalid {
        /// Where they came from.
        from: String,
        /// The cause.
        source: prost_reflect::DescriptorError,
    },
    /// A reflection service could not be reached or answered badly.
    #[error("reflection at {address}: {reason}")]
    Reflection {
        /// The backend.
        address: String,
        /// What went wrong.
        reason: String,
    },
}

/// Adds an encoded `FileDescriptorSet` (options kept) to `pool`.
pub fn add_set(pool: &mut DescriptorPool, bytes: &[u8], from: &str) -> Result<(), DescriptorError> {
    pool.decode_file_descriptor_set(bytes)
        .map_err(|source| DescriptorError::Invalid {
            from: from.to_owned(),
            source,
        })
}

/// Adds a descriptor-set file to `pool`.
pub fn add_file(pool: &mut DescriptorPool, path: &Path) -> Result<(), DescriptorError> {
    let bytes = std::fs::read(path).map_err(|source| DescriptorError::Read {
        path: path.display().to_string(),
        source,
    })?;
    add_set(pool, &bytes, &path.display().to_string())
}

/// Asks the reflection service at `address` (v1) for every service it
/// serves and the files that define them, adds those to `pool`, and returns
/// the services' full names (reflection and health left out).
pub async fn add_reflected(
    pool: &mut DescriptorPool,
    address: &str,
) -> Result<Vec<String>, DescriptorError> {
    let fail = |reason: String| DescriptorError::Reflection {
        address: address.to_owned(),
        reason,
    };
    let endpoint = brewmesh_runtime::client::endpoint(address).map_err(|e| fail(e.to_string()))?;
    let channel = brewmesh_runtime::client::connect(&endpoint)
        .await
        .map_err(|e| fail(format!("connecting: {e}")))?;
    let mut client = ServerReflectionClient::new(channel);

    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let request = |message| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(message),
    };
    let _ = tx
        .send(request(MessageRequest::ListServices(String::new())))
        .await;
    let mut answers = client
        .server_reflection_info(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|s| fail(s.message().to_owned()))?
        .into_inner();

    let mut services = Vec::new();
    let mut asked: HashSet<String> = HashSet::new();
    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut pending = 1usize;
    while pending > 0 {
        let answer = answers
            .next()
            .await
            .ok_or_else(|| fail("stream ended early".to_owned()))?
            .map_err(|s| fail(s.message().to_owned()))?;
        pending -= 1;
        match answer.message_response {
            Some(MessageResponse::ListServicesResponse(list)) => {
                for service in list.service {
                    if service.name.starts_with("grpc.reflection.")
                        || service.name.starts_with("grpc.health.")
                    {
                        continue;
                    }
                    let symbol = service.name.clone();
                    services.push(service.name);
                    pending += 1;
                    let _ = tx
                        .send(request(MessageRequest::FileContainingSymbol(symbol)))
                        .await;
                }
            }
            Some(MessageResponse::FileDescriptorResponse(found)) => {
                for raw in found.file_descriptor_proto {
                    let file = prost_types::FileDescriptorProto::decode(raw.as_slice())
                        .map_err(|e| fail(format!("bad file descriptor: {e}")))?;
                    let name = file.name().to_owned();
                    asked.insert(name.clone());
                    // Dependencies the server did not send along: ask.
                    for dependency in file.dependency {
                        if !files.contains_key(&dependency)
                            && pool.get_file_by_name(&dependency).is_none()
                            && asked.insert(dependency.clone())
                        {
                            pending += 1;
                            let _ = tx
                                .send(request(MessageRequest::FileByFilename(dependency)))
                                .await;
                        }
                    }
                    files.insert(name, raw);
                }
            }
            Some(MessageResponse::ErrorResponse(error)) => {
                return Err(fail(error.error_message));
            }
            _ => return Err(fail("unexpected answer".to_owned())),
        }
    }
    drop(tx);
    // The raw bytes, not decoded prost types: those would drop the
    // (google.api.http) options. A FileDescriptorSet is field 1, repeated.
    let mut set = Vec::new();
    for raw in files.values() {
        prost::encoding::bytes::encode(1, raw, &mut set);
    }
    add_set(pool, &set, &format!("reflection at {address}"))?;
    Ok(services)
}

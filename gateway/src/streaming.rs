//! Server streams as HTTP answers: newline-delimited JSON, or Server-Sent
//! Events when the client asks for `text/event-stream`.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use axum::response::Response;
use bytes::{BufMut as _, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, header};
use prost_reflect::DynamicMessage;
use serde_json::json;
use tokio_stream::StreamExt as _;

use crate::errors::status_json;
use crate::metadata::add_metadata;
use crate::routes::Route;
use crate::state::Gateway;
use crate::transcode;

/// Whether the client asked for Server-Sent Events.
pub(crate) fn accepts_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',')
                .any(|m| m.trim().starts_with("text/event-stream"))
        })
}

/// A stream broken below gRPC (its backend died: the connection reset, an
/// h2 error) is UNAVAILABLE with a hint to resume, as a backend's clean
/// drain says; a status the backend sent stays as it is.
fn went_away(status: tonic::Status) -> tonic::Status {
    use std::error::Error as _;
    let local = status.source().is_some();
    match status.code() {
        tonic::Code::Unknown | tonic::Code::Internal | tonic::Code::Cancelled if local => {
            tonic::Status::unavailable(format!(
                "the stream's backend went away ({}); watch again from the last message received",
                status.message()
            ))
        }
        _ => status,
    }
}

/// A server stream as NDJSON (`{"result": …}` per line, `{"error": …}` at
/// the end when it fails, as grpc-gateway writes it) or as Server-Sent
/// Events (`data:` per message, `event: error` when it fails).
pub(crate) fn stream_response(
    gateway: &Arc<Gateway>,
    route: &Route,
    response: tonic::Response<tonic::Streaming<DynamicMessage>>,
    sse: bool,
) -> Response {
    let (metadata, stream, _) = response.into_parts();
    let gateway = Arc::clone(gateway);
    let route = route.clone();
    // The first error ends the answer: tonic may yield a broken stream's
    // error more than once.
    let mut ended = false;
    let items = stream
        .take_while(move |item| {
            let go = !ended;
            ended |= item.is_err();
            go
        })
        .map(|item| item.map_err(went_away));
    let frames = items.map(move |item| -> Result<Bytes, Infallible> {
        let mut frame = BytesMut::with_capacity(256);
        match (item, sse) {
            (Ok(message), false) => {
                frame.put_slice(b"{\"result\":");
                frame.put_slice(&transcode::response_json(&route, &message));
                frame.put_slice(b"}\n");
            }
            (Ok(message), true) => {
                frame.put_slice(b"data: ");
                frame.put_slice(&transcode::response_json(&route, &message));
                frame.put_slice(b"\n\n");
            }
            (Err(status), false) => {
                let error = json!({"error": status_json(&gateway.pool, &status)});
                frame.put_slice(error.to_string().as_bytes());
                frame.put_slice(b"\n");
            }
            (Err(status), true) => {
                frame.put_slice(b"event: error\ndata: ");
                frame.put_slice(status_json(&gateway.pool, &status).to_string().as_bytes());
                frame.put_slice(b"\n\n");
            }
        }
        Ok(frame.freeze())
    });
    let mut response = Response::new(Body::from_stream(frames));
    let content_type = if sse {
        "text/event-stream"
    } else {
        "application/x-ndjson"
    };
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    add_metadata(h, &metadata);
    response
}

//! Server streams as HTTP answers: newline-delimited JSON, or Server-Sent
//! Events when the client asks for `text/event-stream`.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use bytes::{BufMut as _, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, header};
use serde_json::json;
use tokio_stream::wrappers::IntervalStream;
use tokio_stream::{Stream, StreamExt as _};

use crate::errors::status_json;
use crate::metadata::add_metadata;
use crate::routes::Route;
use crate::state::Gateway;

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

/// Messages until the backend's end (`None`) or the first error, which is
/// the last item: tonic may yield a broken stream's error more than once,
/// and after the deadline's error nothing else may be waited for.
struct UntilError<S> {
    inner: Pin<Box<S>>,
    ended: bool,
}

impl<S, T> Stream for UntilError<S>
where
    S: Stream<Item = Option<Result<T, tonic::Status>>>,
{
    type Item = Result<T, tonic::Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.ended {
            return Poll::Ready(None);
        }
        match self.inner.as_mut().poll_next(cx) {
            Poll::Ready(Some(Some(item))) => {
                self.ended = item.is_err();
                Poll::Ready(Some(item))
            }
            Poll::Ready(Some(None) | None) => {
                self.ended = true;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// A server stream as NDJSON (`{"result": …}` per line, `{"error": …}` at
/// the end when it fails, as grpc-gateway writes it) or as Server-Sent
/// Events (`data:` per message, `event: error` when it fails). At `ends`
/// (the call's deadline) the stream ends with DEADLINE_EXCEEDED, whatever
/// the backend does.
pub(crate) fn stream_response(
    gateway: &Arc<Gateway>,
    route: &Route,
    response: tonic::Response<tonic::Streaming<Bytes>>,
    sse: bool,
    ends: tokio::time::Instant,
) -> Response {
    let (metadata, stream, _) = response.into_parts();
    let gateway = Arc::clone(gateway);
    let route = route.clone();
    // `None` marks the backend's end of the stream; the deadline's tick
    // comes in beside the messages.
    let expired = IntervalStream::new(tokio::time::interval_at(ends, Duration::from_secs(3600)))
        .map(|_| {
            Some(Err(tonic::Status::deadline_exceeded(
                "the stream's deadline passed; send a longer Grpc-Timeout, or watch again from the last message received",
            )))
        });
    // Each message as JSON here, so that one that does not decode ends
    // the stream as the codec's error did.
    let (gw, rt) = (Arc::clone(&gateway), route.clone());
    let stream = stream
        .map(move |item| item.and_then(|bytes| gw.plans.answer(&rt, &bytes)))
        .map(Some)
        .chain(tokio_stream::once(None))
        .merge(expired);
    let items = UntilError {
        inner: Box::pin(stream),
        ended: false,
    }
    .map(|item| item.map_err(went_away));
    let frames = items.map(move |item| -> Result<Bytes, Infallible> {
        let mut frame = BytesMut::with_capacity(256);
        match (item, sse) {
            (Ok(json), false) => {
                frame.put_slice(b"{\"result\":");
                frame.put_slice(&json);
                frame.put_slice(b"}\n");
            }
            (Ok(json), true) => {
                frame.put_slice(b"data: ");
                frame.put_slice(&json);
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

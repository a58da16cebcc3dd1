//! A backend's gRPC answer body, as gRPC-Web or a Connect stream sends it:
//! gRPC-Web's trailers become the body's last frame; Connect's messages
//! are re-enveloped (as JSON when asked) and its trailers become the
//! end-of-stream message. Messages are compressed one by one when the
//! client accepts it. The call's deadline ends it, whatever the
//! backend does.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use base64::Engine as _;
use bytes::{BufMut as _, Bytes, BytesMut};
use http::HeaderMap;
use http_body::Frame;
use prost_reflect::{DescriptorPool, MessageDescriptor};
use tonic::Status;

use std::sync::Arc;

use crate::compression::Encoding;
use crate::envelope::{self, COMPRESSED, Decoder, TRAILERS};
use crate::jsonplan::Plans;
use crate::protocols::{Codec, end_stream, past_deadline};

/// What the answer becomes.
#[derive(Debug)]
pub enum Mode {
    /// gRPC-Web; `text` is its base64 form.
    GrpcWeb {
        /// `application/grpc-web-text`.
        text: bool,
    },
    /// A Connect stream.
    Connect {
        /// How its messages are written.
        codec: Codec,
        /// The messages' type, to write them as JSON.
        output: MessageDescriptor,
        /// The status the backend's headers gave (a trailers-only answer).
        status: Option<Status>,
    },
}

/// A gRPC answer body translated; see the module's description.
pub struct Translated {
    inner: tonic::body::Body,
    mode: Mode,
    decoder: Decoder,
    pending: VecDeque<Bytes>,
    done: bool,
    deadline: Pin<Box<tokio::time::Sleep>>,
    pool: DescriptorPool,
    plans: Arc<Plans>,
    /// Messages of at least this many bytes are sent compressed so.
    compress: Option<(Encoding, usize)>,
}

impl Translated {
    /// `inner` as `mode` says, messages up to `limit` bytes, ending at
    /// `ends`.
    pub fn new(
        inner: tonic::body::Body,
        mode: Mode,
        limit: usize,
        ends: tokio::time::Instant,
        pool: DescriptorPool,
        plans: Arc<Plans>,
    ) -> Self {
        let mut this = Self {
            inner,
            mode,
            decoder: Decoder::new(limit),
            pending: VecDeque::new(),
            done: false,
            deadline: Box::pin(tokio::time::sleep_until(ends)),
            pool,
            plans,
            compress: None,
        };
        if let Mode::Connect {
            status: Some(status),
            ..
        } = &this.mode
        {
            // A trailers-only answer: nothing but its end.
            let end = end_stream(&this.pool, Some(status), &HeaderMap::new());
            this.pending.push_back(end);
            this.done = true;
        }
        this
    }

    /// Messages of at least `floor` bytes compressed with `encoding`; the
    /// caller says so in the answer's headers.
    pub fn compressed(mut self, encoding: Option<Encoding>, floor: usize) -> Self {
        self.compress = encoding.map(|e| (e, floor));
        self
    }

    fn push(&mut self, bytes: Bytes) {
        match self.mode {
            Mode::GrpcWeb { text: true } => self.pending.push_back(Bytes::from(
                base64::engine::general_purpose::STANDARD.encode(&bytes),
            )),
            _ => self.pending.push_back(bytes),
        }
    }

    fn data(&mut self, data: Bytes) {
        let json = match &self.mode {
            Mode::Connect {
                codec: Codec::Json,
                output,
                ..
            } => Some(output.clone()),
            _ => None,
        };
        if json.is_none() && self.compress.is_none() {
            // The backend's frames are already the client's.
            self.push(data);
            return;
        }
        self.decoder.push(&data);
        loop {
            let message = match self.decoder.take() {
                Ok(Some(e)) if e.flags & COMPRESSED == 0 => e.data,
                Ok(Some(_)) => {
                    let status = Status::internal("the backend compressed a message");
                    self.end(&status, &HeaderMap::new());
                    return;
                }
                Ok(None) => return,
                Err(error) => {
                    let status = Status::internal(format!("the backend's answer: {error}"));
                    self.end(&status, &HeaderMap::new());
                    return;
                }
            };
            let message = match &json {
                None => message,
                Some(output) => match self.plans.json(output, &message) {
                    Ok(json) => Bytes::from(json),
                    Err(error) => {
                        let status =
                            Status::internal(format!("decoding the backend's message: {error}"));
                        self.end(&status, &HeaderMap::new());
                        return;
                    }
                },
            };
            let framed = match self.compress {
                Some((encoding, floor)) if message.len() >= floor => {
                    envelope::encode(COMPRESSED, &encoding.compress(&message))
                }
                _ => envelope::encode(0, &message),
            };
            self.push(framed);
        }
    }

    /// The answer's last frame, with `status` and `trailers`.
    fn end(&mut self, status: &Status, trailers: &HeaderMap) {
        self.done = true;
        match self.mode {
            Mode::GrpcWeb { .. } => {
                let mut lines = BytesMut::new();
                let mut all = trailers.clone();
                if !all.contains_key("grpc-status") {
                    // A status made here (the backend sent none).
                    let (head, ()) = status.clone().into_http::<()>().into_parts();
                    all = head.headers;
                    all.remove(http::header::CONTENT_TYPE);
                }
                for (name, value) in &all {
                    lines.put_slice(name.as_str().as_bytes());
                    lines.put_slice(b": ");
                    lines.put_slice(value.as_bytes());
                    lines.put_slice(b"\r\n");
                }
                self.push(envelope::encode(TRAILERS, &lines));
            }
            Mode::Connect { .. } => {
                let end = end_stream(&self.pool, Some(status), trailers);
                self.pending.push_back(end);
            }
        }
    }
}

impl http_body::Body for Translated {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        loop {
            if let Some(bytes) = self.pending.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(bytes))));
            }
            if self.done {
                return Poll::Ready(None);
            }
            if self.deadline.as_mut().poll(cx).is_ready() {
                let status = Status::deadline_exceeded(
                    "the stream's deadline passed; send a longer timeout, or call again from the last message received",
                );
                self.end(&status, &HeaderMap::new());
                continue;
            }
            match ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => self.data(data),
                    Err(frame) => {
                        if let Ok(mut trailers) = frame.into_trailers() {
                            let mut status =
                                Status::from_header_map(&trailers).unwrap_or_else(|| {
                                    Status::internal("the backend's trailers have no grpc-status")
                                });
                            if let Some(late) = past_deadline(&status, self.deadline.deadline()) {
                                // Said here instead of the backend's.
                                trailers.remove("grpc-status");
                                trailers.remove("grpc-message");
                                status = late;
                            }
                            self.end(&status, &trailers);
                        }
                    }
                },
                Some(Err(error)) => {
                    let status = Status::unavailable(format!(
                        "the backend went away ({error}); call again from the last message received"
                    ));
                    self.end(&status, &HeaderMap::new());
                }
                None => {
                    // No trailers: fine after a trailers-only gRPC-Web
                    // answer (its status was in the headers), else the
                    // backend broke off.
                    if let Mode::Connect { .. } = self.mode {
                        let status =
                            Status::internal("the backend's answer ended without a status");
                        self.end(&status, &HeaderMap::new());
                    } else {
                        self.done = true;
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.pending.is_empty()
    }
}

//! gzip and zstd (flate2's and zstd's): whole bodies as HTTP's
//! `Accept-Encoding` / `Content-Encoding` say (REST, Connect's unary
//! calls, the web page), single messages in envelopes as `grpc-encoding`
//! (gRPC-Web) or `connect-content-encoding` (Connect streams) say. Nothing
//! below the size floor is compressed, and nothing inflates past the body
//! limit. Done where the bodies are read and written rather than as
//! tower-http's layers around every request, which cost a REST call that
//! asked for no compression about a tenth of its throughput (two more
//! futures and body wrappers per request).

use std::io::Read as _;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, header};
use http_body::Body as _;
use http_body_util::BodyExt as _;

/// What a response says it accepts, for `grpc-accept-encoding` and
/// `connect-accept-encoding`.
pub const ACCEPTED: &str = "gzip, zstd";

/// A message encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// gzip (RFC 1952).
    Gzip,
    /// Zstandard (RFC 8878).
    Zstd,
}

/// Why a compressed message could not be read.
#[derive(Debug, thiserror::Error)]
pub enum InflateError {
    /// It inflates past the limit.
    #[error("the message inflates past {limit} bytes")]
    TooLarge {
        /// The most bytes it may inflate to.
        limit: usize,
    },
    /// It is not what its encoding says.
    #[error("the message is not valid {encoding}: {reason}")]
    Corrupt {
        /// The encoding's name.
        encoding: &'static str,
        /// What the decoder said.
        reason: String,
    },
}

impl Encoding {
    /// The encoding a header names; `Ok(None)` for `identity`, `Err` with
    /// the name for one not supported here.
    pub fn parse(name: &str) -> Result<Option<Self>, String> {
        match name.trim().to_ascii_lowercase().as_str() {
            "" | "identity" => Ok(None),
            "gzip" => Ok(Some(Encoding::Gzip)),
            "zstd" => Ok(Some(Encoding::Zstd)),
            other => Err(other.to_owned()),
        }
    }

    /// Its name in headers.
    pub fn name(self) -> &'static str {
        match self {
            Encoding::Gzip => "gzip",
            Encoding::Zstd => "zstd",
        }
    }

    /// `data`, compressed.
    pub fn compress(self, data: &[u8]) -> Bytes {
        let compressed = match self {
            Encoding::Gzip => {
                let mut out = Vec::with_capacity(data.len() / 2 + 32);
                let mut encoder = flate2::read::GzEncoder::new(data, flate2::Compression::fast());
                // Reading from a slice cannot fail.
                let _ = encoder.read_to_end(&mut out);
                out
            }
            Encoding::Zstd => zstd::bulk::compress(data, 1).unwrap_or_else(|_| data.to_vec()),
        };
        Bytes::from(compressed)
    }

    /// `data` inflated, at most `limit` bytes of it: reading stops one byte
    /// past the limit, so a small message cannot make this allocate more.
    pub fn decompress(self, data: &[u8], limit: usize) -> Result<Bytes, InflateError> {
        let mut out = Vec::new();
        let cap = limit as u64 + 1;
        let read = match self {
            Encoding::Gzip => flate2::read::GzDecoder::new(data)
                .take(cap)
                .read_to_end(&mut out),
            Encoding::Zstd => match zstd::stream::read::Decoder::with_buffer(data) {
                Ok(decoder) => decoder.take(cap).read_to_end(&mut out),
                Err(error) => Err(error),
            },
        };
        if let Err(error) = read {
            return Err(InflateError::Corrupt {
                encoding: self.name(),
                reason: error.to_string(),
            });
        }
        if out.len() > limit {
            return Err(InflateError::TooLarge { limit });
        }
        Ok(Bytes::from(out))
    }
}

/// The encoding to answer with, from an accept list (`gzip, zstd;q=0.5`):
/// the client's first choice this gateway has, none for `q=0` or none
/// known.
pub fn negotiate(headers: &HeaderMap, name: &str) -> Option<Encoding> {
    let mut best: Option<(Encoding, f32)> = None;
    for value in headers.get_all(name) {
        let Ok(value) = value.to_str() else { continue };
        for item in value.split(',') {
            let mut parts = item.split(';');
            let Ok(Some(encoding)) = Encoding::parse(parts.next().unwrap_or_default()) else {
                continue;
            };
            let q = parts
                .find_map(|p| p.trim().strip_prefix("q="))
                .and_then(|q| q.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            if q > 0.0 && best.is_none_or(|(_, b)| q > b) {
                best = Some((encoding, q));
            }
        }
    }
    best.map(|(encoding, _)| encoding)
}

/// A header value of an encoding's name.
pub fn header_value(encoding: Encoding) -> HeaderValue {
    HeaderValue::from_static(encoding.name())
}

/// Content types worth compressing whole: documents, not streams (Server
/// Sent Events, NDJSON, gRPC, gRPC-Web and Connect streams, whose messages
/// are compressed one by one if at all).
fn compressible(headers: &HeaderMap) -> bool {
    let Some(mime) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let mime = mime.split(';').next().unwrap_or_default().trim();
    matches!(
        mime,
        "application/json"
            | "application/proto"
            | "text/html"
            | "text/css"
            | "text/javascript"
            | "application/javascript"
            | "image/svg+xml"
    )
}

/// `response` compressed with what the client accepts (`encoding`, from
/// its `Accept-Encoding`) when it is a document of a known size of at
/// least `floor` bytes; as it is otherwise.
pub async fn answer(response: Response, encoding: Option<Encoding>, floor: usize) -> Response {
    if !compressible(response.headers())
        || response.headers().contains_key(header::CONTENT_ENCODING)
    {
        return response;
    }
    let Some(size) = response.body().size_hint().exact() else {
        return response;
    };
    let (mut head, body) = response.into_parts();
    if size >= floor as u64 {
        head.headers
            .append(header::VARY, HeaderValue::from_static("accept-encoding"));
    }
    let (Some(encoding), true) = (encoding, size >= floor as u64) else {
        return Response::from_parts(head, body);
    };
    // A body of an exact size is whole already (Full): collecting it does
    // not wait.
    let Ok(collected) = body.collect().await else {
        return Response::from_parts(head, Body::empty());
    };
    let compressed = encoding.compress(&collected.to_bytes());
    head.headers.remove(header::CONTENT_LENGTH);
    head.headers
        .insert(header::CONTENT_ENCODING, header_value(encoding));
    Response::from_parts(head, Body::from(compressed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_encoding_round_trips() {
        let data = b"espresso ".repeat(100);
        for encoding in [Encoding::Gzip, Encoding::Zstd] {
            let small = encoding.compress(&data);
            assert!(small.len() < data.len() / 4, "{encoding:?}");
            assert_eq!(&encoding.decompress(&small, data.len()).unwrap()[..], &data);
        }
    }

    #[test]
    fn nothing_inflates_past_the_limit() {
        let bomb = vec![0u8; 1 << 20];
        for encoding in [Encoding::Gzip, Encoding::Zstd] {
            let small = encoding.compress(&bomb);
            assert!(small.len() < 8 * 1024, "{encoding:?}: {}", small.len());
            assert!(matches!(
                encoding.decompress(&small, 4096),
                Err(InflateError::TooLarge { limit: 4096 })
            ));
        }
        assert!(matches!(
            Encoding::Gzip.decompress(b"not gzip", 10),
            Err(InflateError::Corrupt { .. })
        ));
    }

    #[test]
    fn the_clients_preference_wins() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert("accept-encoding", HeaderValue::from_str(v).unwrap());
            negotiate(&h, "accept-encoding")
        };
        assert_eq!(with("gzip, zstd"), Some(Encoding::Gzip));
        assert_eq!(with("zstd;q=1, gzip;q=0.5"), Some(Encoding::Zstd));
        assert_eq!(with("br, gzip;q=0"), None);
        assert_eq!(with("identity"), None);
        assert_eq!(Encoding::parse("br"), Err("br".to_owned()));
    }
}

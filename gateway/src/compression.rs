//! gzip and zstd. Whole bodies (REST, Connect's unary calls: HTTP's
//! `Accept-Encoding` / `Content-Encoding`) are tower-http's, as the layers
//! [`layers`] makes; single messages in envelopes (gRPC-Web's
//! `grpc-encoding`, Connect streams' `connect-content-encoding`) are
//! compressed and inflated here. Nothing below the size floor is
//! compressed, and nothing inflates past the body limit.

use std::io::Read as _;

use axum::body::Body;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use tower_http::compression::predicate::{NotForContentType, Predicate as _, SizeAbove};
use tower_http::compression::{CompressionLayer, DefaultPredicate};
use tower_http::decompression::RequestDecompressionLayer;

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

/// The layers for whole bodies, outermost first: request bodies inflated
/// as their `Content-Encoding` says (an encoding not known here is passed
/// on, for the handler to refuse in its protocol's form; the handler's
/// body limit bounds what is inflated), and answers of at least
/// `min_bytes` compressed as `Accept-Encoding` asks — not streams (Server
/// Sent Events, NDJSON) nor gRPC, gRPC-Web and Connect streams, whose
/// messages are compressed one by one.
pub fn layers(
    min_bytes: u16,
) -> (
    RequestDecompressionLayer,
    CompressionLayer<impl tower_http::compression::Predicate>,
) {
    let decompress = RequestDecompressionLayer::new()
        .gzip(true)
        .zstd(true)
        .pass_through_unaccepted(true);
    let predicate = DefaultPredicate::new()
        .and(SizeAbove::new(min_bytes))
        .and(NotForContentType::const_new("application/connect+"))
        .and(NotForContentType::const_new("application/x-ndjson"));
    let compress = CompressionLayer::new()
        .gzip(true)
        .zstd(true)
        .quality(tower_http::CompressionLevel::Fastest)
        .compress_when(predicate);
    (decompress, compress)
}

/// A request body after the decompression layer, as the router takes it.
pub fn boxed<B>(request: http::Request<B>) -> http::Request<Body>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    request.map(Body::new)
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

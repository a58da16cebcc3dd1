//! The length-prefixed envelope that gRPC, gRPC-Web and Connect's streams
//! share: one flags byte, a big-endian `u32` length, the message. gRPC's
//! flag 0x01 is a compressed message; gRPC-Web's 0x80 marks its trailers,
//! Connect's 0x02 its end-of-stream message.

use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};

/// The message is compressed (all three protocols).
pub const COMPRESSED: u8 = 0x01;
/// Connect: the end-of-stream message, JSON.
pub const END_STREAM: u8 = 0x02;
/// gRPC-Web: the trailers, as HTTP/1 header lines.
pub const TRAILERS: u8 = 0x80;

/// One envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The flags byte.
    pub flags: u8,
    /// The message, or the trailers / end-of-stream JSON.
    pub data: Bytes,
}

/// Why a body is not a sequence of envelopes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// The body ends inside an envelope.
    #[error("the body ends inside a message envelope ({missing} bytes missing)")]
    Truncated {
        /// How many bytes the envelope still needed.
        missing: usize,
    },
    /// An envelope says it is longer than the limit.
    #[error("a message of {length} bytes is larger than the limit of {limit}")]
    TooLarge {
        /// The length the envelope declares.
        length: usize,
        /// The most bytes a message may have.
        limit: usize,
    },
    /// A flags byte this side does not know.
    #[error("unknown envelope flags {0:#04x}")]
    Flags(u8),
}

/// An envelope's bytes.
pub fn encode(flags: u8, data: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + data.len());
    out.put_u8(flags);
    out.put_u32(u32::try_from(data.len()).unwrap_or(u32::MAX));
    out.put_slice(data);
    out.freeze()
}

/// Envelopes from a body that arrives in pieces: [`Decoder::push`] each
/// piece, then take what is whole with [`Decoder::take`].
#[derive(Debug)]
pub struct Decoder {
    buffer: BytesMut,
    limit: usize,
}

impl Decoder {
    /// A decoder refusing messages over `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self {
            buffer: BytesMut::new(),
            limit,
        }
    }

    /// Adds the next piece of the body.
    pub fn push(&mut self, piece: &[u8]) {
        self.buffer.extend_from_slice(piece);
    }

    /// The length the buffered envelope's header says; the header is there.
    fn declared(&self) -> usize {
        let header = [
            self.buffer[1],
            self.buffer[2],
            self.buffer[3],
            self.buffer[4],
        ];
        u32::from_be_bytes(header) as usize
    }

    /// The next whole envelope, `None` until one is.
    pub fn take(&mut self) -> Result<Option<Envelope>, EnvelopeError> {
        if self.buffer.len() < 5 {
            return Ok(None);
        }
        let flags = self.buffer[0];
        let length = self.declared();
        if length > self.limit {
            return Err(EnvelopeError::TooLarge {
                length,
                limit: self.limit,
            });
        }
        if self.buffer.len() < 5 + length {
            return Ok(None);
        }
        self.buffer.advance(5);
        let data = self.buffer.split_to(length).freeze();
        Ok(Some(Envelope { flags, data }))
    }

    /// At the body's end: an error if part of an envelope is left.
    pub fn finish(&self) -> Result<(), EnvelopeError> {
        match self.buffer.len() {
            0 => Ok(()),
            n if n < 5 => Err(EnvelopeError::Truncated { missing: 5 - n }),
            n => Err(EnvelopeError::Truncated {
                missing: 5 + self.declared() - n,
            }),
        }
    }
}

/// Every envelope of a whole body.
pub fn decode_all(body: &[u8], limit: usize) -> Result<Vec<Envelope>, EnvelopeError> {
    let mut decoder = Decoder::new(limit);
    decoder.push(body);
    let mut out = Vec::new();
    while let Some(envelope) = decoder.take()? {
        out.push(envelope);
    }
    decoder.finish()?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_come_out_whole_whatever_the_pieces() {
        let mut body = encode(0, b"hello").to_vec();
        body.extend_from_slice(&encode(TRAILERS, b"grpc-status: 0\r\n"));
        let mut decoder = Decoder::new(1024);
        let mut out = Vec::new();
        for byte in &body {
            decoder.push(std::slice::from_ref(byte));
            while let Some(envelope) = decoder.take().unwrap() {
                out.push(envelope);
            }
        }
        decoder.finish().unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].data, Bytes::from_static(b"hello"));
        assert_eq!(out[1].flags, TRAILERS);
    }

    #[test]
    fn a_cut_or_oversized_envelope_is_an_error() {
        let whole = encode(0, b"hello");
        assert_eq!(
            decode_all(&whole[..7], 1024),
            Err(EnvelopeError::Truncated { missing: 3 })
        );
        assert_eq!(
            decode_all(&whole[..2], 1024),
            Err(EnvelopeError::Truncated { missing: 3 })
        );
        assert_eq!(
            decode_all(&whole, 4),
            Err(EnvelopeError::TooLarge {
                length: 5,
                limit: 4
            })
        );
        assert_eq!(decode_all(b"", 4), Ok(vec![]));
    }
}

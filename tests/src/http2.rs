//! HTTP/2 written frame by frame (RFC 9113), for clients that break the rules on purpose: a flood test needs a
//! client that ignores the server's SETTINGS and opens more streams than it was allowed, which h2 and tonic
//! never do. Header blocks use only HPACK literals and static-table indexes, so no encoder state is needed.

use tokio::io::{AsyncRead, AsyncReadExt};

/// What every HTTP/2 connection starts with.
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const GOAWAY: u8 = 0x7;

pub const END_STREAM: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;

/// SETTINGS_MAX_CONCURRENT_STREAMS.
pub const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
/// Error code REFUSED_STREAM: the stream was not processed and may be retried.
pub const REFUSED_STREAM: u32 = 0x7;

/// One frame as read off the wire.
#[derive(Debug, Clone)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    /// The error code of a RST_STREAM or GOAWAY frame.
    pub fn error_code(&self) -> Option<u32> {
        let at = match self.kind {
            RST_STREAM => 0,
            GOAWAY => 4,
            _ => return None,
        };
        let bytes = self.payload.get(at..at + 4)?;
        Some(u32::from_be_bytes(bytes.try_into().ok()?))
    }

    /// The last stream id a GOAWAY says the server processed.
    pub fn last_stream(&self) -> Option<u32> {
        if self.kind != GOAWAY {
            return None;
        }
        let bytes = self.payload.get(..4)?;
        Some(u32::from_be_bytes(bytes.try_into().ok()?) & 0x7fff_ffff)
    }

    /// The (identifier, value) pairs of a SETTINGS frame.
    pub fn settings(&self) -> Vec<(u16, u32)> {
        if self.kind != SETTINGS {
            return Vec::new();
        }
        self.payload
            .chunks_exact(6)
            .map(|entry| {
                (
                    u16::from_be_bytes([entry[0], entry[1]]),
                    u32::from_be_bytes([entry[2], entry[3], entry[4], entry[5]]),
                )
            })
            .collect()
    }
}

/// A frame's bytes: the 9-byte header, then the payload.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let length = u32::try_from(payload.len()).expect("frame payload fits 24 bits");
    assert!(length < 1 << 24, "frame payload fits 24 bits");
    let mut bytes = Vec::with_capacity(9 + payload.len());
    bytes.extend_from_slice(&length.to_be_bytes()[1..]);
    bytes.push(kind);
    bytes.push(flags);
    bytes.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    bytes.extend_from_slice(payload);
    bytes
}

/// An HPACK string literal, not Huffman coded.
fn literal(out: &mut Vec<u8>, text: &str) {
    integer(out, 0x00, 7, text.len());
    out.extend_from_slice(text.as_bytes());
}

/// An HPACK integer with an `prefix_bits`-bit prefix, the higher bits of the first byte set to `high`.
fn integer(out: &mut Vec<u8>, high: u8, prefix_bits: u32, mut value: usize) {
    let max = (1usize << prefix_bits) - 1;
    if value < max {
        out.push(high | value as u8);
        return;
    }
    out.push(high | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

/// The header block of a gRPC call to `path` (e.g. `/vesper.v1.Leaf/PutRecord`), plus `extra` headers.
pub fn grpc_request_headers(path: &str, authority: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    let mut block = vec![
        0x83, // :method POST (static index 3)
        0x87, // :scheme https (static index 7)
    ];
    // Literal without indexing, name from the static table: :path (4), :authority (1).
    integer(&mut block, 0x00, 4, 4);
    literal(&mut block, path);
    integer(&mut block, 0x00, 4, 1);
    literal(&mut block, authority);
    let fixed = [("content-type", "application/grpc"), ("te", "trailers")];
    for (name, value) in fixed.iter().chain(extra) {
        // Literal without indexing, new name.
        block.push(0x00);
        literal(&mut block, name);
        literal(&mut block, value);
    }
    block
}

/// Reads the next frame (a payload is below 16 MiB: the length field has 24 bits).
pub async fn read_frame(reader: &mut (impl AsyncRead + Unpin)) -> std::io::Result<Frame> {
    let mut header = [0u8; 9];
    reader.read_exact(&mut header).await?;
    let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
    let mut payload = vec![0u8; length];
    reader.read_exact(&mut payload).await?;
    Ok(Frame {
        kind: header[3],
        flags: header[4],
        stream: u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff,
        payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hpack_integers_follow_the_rfc_examples() {
        // RFC 7541 C.1.1 and C.1.2: 10 and 1337 with a 5-bit prefix.
        let mut out = Vec::new();
        integer(&mut out, 0, 5, 10);
        assert_eq!(out, [0x0a]);
        out.clear();
        integer(&mut out, 0, 5, 1337);
        assert_eq!(out, [0x1f, 0x9a, 0x0a]);
    }

    #[test]
    fn frames_round_trip() {
        let bytes = frame(RST_STREAM, 0, 5, &REFUSED_STREAM.to_be_bytes());
        let read = futures::executor::block_on(read_frame(&mut &bytes[..])).unwrap();
        assert_eq!((read.kind, read.stream), (RST_STREAM, 5));
        assert_eq!(read.error_code(), Some(REFUSED_STREAM));
    }
}

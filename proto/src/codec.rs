//! The gRPC codec of every Vesper service: prost encoding with smaller per-call buffers than tonic's default.
//!
//! tonic allocates an encode and a decode buffer for every call when it starts, 8 KiB each by default. Most
//! Vesper calls are unary and short, but every attached leaf holds one `Leaf.Session` stream open for as long as
//! it is attached, so those two buffers are paid per idle leaf on the super peer (and per connection on the
//! leaf). Vesper's frames are small (keepalives, acknowledgements, events of a few hundred bytes), so the
//! buffers start at [`BUFFER_BYTES`] and grow in steps of that size only when a larger message passes. The
//! yield threshold (how much a busy stream batches into one write) stays tonic's 32 KiB.
//!
//! A message that does not decode (a string field that is not UTF-8, a truncated field, a wrong wire type) is
//! INVALID_ARGUMENT naming the message and field, as prost reports them: the sender's fault, not ours (tonic's
//! own decoder answers INTERNAL).

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::Status;
use tonic_prost::{ProstCodec, ProstEncoder};

/// Initial size of a call's encode and decode buffers, and the step they grow by.
pub const BUFFER_BYTES: usize = 1024;
/// Bytes a streaming call gathers into one write before it yields (tonic's default).
pub const YIELD_THRESHOLD_BYTES: usize = 32 * 1024;

fn settings() -> BufferSettings {
    BufferSettings::new(BUFFER_BYTES, YIELD_THRESHOLD_BYTES)
}

/// Prost encoding with [`BUFFER_BYTES`] buffers (the generated clients and servers use it through
/// `codec_path`).
#[derive(Debug, Clone)]
pub struct LeanCodec<T, U> {
    _types: PhantomData<(T, U)>,
}

impl<T, U> Default for LeanCodec<T, U> {
    fn default() -> Self {
        Self {
            _types: PhantomData,
        }
    }
}

impl<T, U> Codec for LeanCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = LeanDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        LeanDecoder { _type: PhantomData }
    }
}

/// Prost decoding with [`BUFFER_BYTES`] buffers; a message that does not decode is INVALID_ARGUMENT.
#[derive(Debug)]
pub struct LeanDecoder<U> {
    _type: PhantomData<U>,
}

impl<U: prost::Message + Default> Decoder for LeanDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(|error| {
            Status::invalid_argument(format!("malformed message from the peer: {error}"))
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        settings()
    }
}

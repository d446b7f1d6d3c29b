//! Method `zlib` (levels 1–9, default 1): one RFC 1950 zlib stream per batch.
//!
//! Compression by ISA-L igzip at level 1 (with the `isal` feature) or libdeflate; decompression
//! by libdeflate — see `deflate.rs` for the measurements behind that choice. Any zlib decoder
//! can read the payloads.

use super::deflate::{DeflateCompressor, DeflateDecompressor, Framing};
use super::{Codec, CodecError, CodecInfo, Method};

pub struct ZlibCodec {
    enc: DeflateCompressor,
    dec: DeflateDecompressor,
}

impl ZlibCodec {
    pub fn new(level: u8) -> Result<Self, CodecError> {
        Ok(Self { enc: DeflateCompressor::new(Method::Zlib, level, Framing::Zlib)?, dec: DeflateDecompressor::default() })
    }
}

impl Codec for ZlibCodec {
    fn info(&self) -> CodecInfo {
        CodecInfo { method: Method::Zlib, level: self.enc.level(), provider: self.enc.backend().into() }
    }
    fn max_compressed_len(&self, input_len: usize) -> usize {
        super::deflate::bound(input_len)
    }
    fn compress(&mut self, input: &[u8], out: &mut [u8]) -> Result<Option<usize>, CodecError> {
        Ok(self.enc.compress(input, out))
    }
    fn decompress(&mut self, input: &[u8], out: &mut [u8]) -> Result<(), CodecError> {
        self.dec.decompress(Method::Zlib, Framing::Zlib, input, out)
    }
}

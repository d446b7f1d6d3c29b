//! Method `zlib` (levels 1–9, default 1): one RFC 1950 zlib stream per batch.
//!
//! Compression by ISA-L igzip at level 1 (with the `isal` feature) or libdeflate; decompression
//! by libdeflate — see `deflate.rs` for the measurements behind that choice. Any zlib decoder
//! can read the payloads.

use super::deflate::{DeflateCompressor, DeflateDecompressor, Framing};
use super::{Codec, CodecError, CodecInfo, LevelRange, Method, MethodCode, MethodDescriptor};

pub static DESCRIPTOR: MethodDescriptor = MethodDescriptor {
    name: "zlib",
    code: MethodCode(1),
    levels: LevelRange { min: 1, max: 9, default: 1 },
    compresses: true,
    open: |spec| Ok(Box::new(ZlibCodec::new(spec.level)?)),
};
pub(super) const METHOD: Method = Method::of(&DESCRIPTOR);

pub struct ZlibCodec {
    enc: DeflateCompressor,
    dec: DeflateDecompressor,
}

impl ZlibCodec {
    pub fn new(level: i32) -> Result<Self, CodecError> {
        METHOD.check_level(level)?;
        Ok(Self { enc: DeflateCompressor::new(METHOD, level as u8, Framing::Zlib)?, dec: DeflateDecompressor::default() })
    }
}

impl Codec for ZlibCodec {
    fn info(&self) -> CodecInfo {
        CodecInfo { method: METHOD, level: self.enc.level().into(), provider: self.enc.backend().into(), note: None }
    }
    fn max_compressed_len(&self, input_len: usize) -> usize {
        super::deflate::bound(input_len)
    }
    fn compress(&mut self, input: &[u8], out: &mut [u8]) -> Result<Option<usize>, CodecError> {
        Ok(self.enc.compress(input, out))
    }
    fn decompress(&mut self, input: &[u8], out: &mut [u8]) -> Result<(), CodecError> {
        self.dec.decompress(METHOD, Framing::Zlib, input, out)
    }
}

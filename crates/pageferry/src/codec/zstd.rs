//! Method `zstd` (levels -20–19, default 1): one zstd frame per batch, through the zstd crate.
//! Negative levels are zstd's fast levels (`zstd --fast=N` is level -N): less ratio, more
//! speed, which `--multifd-compression auto` uses on links too fast for level 1. Below -20
//! zstd gains little speed and loses most of its ratio, so the range stops there. Level 0 is
//! libzstd's default level (3).
//!
//! Like every software LZ compressor, zstd must not see its input change during a call (see
//! `Codec::tolerates_changing_input`); the engine gives it a stable copy of live memory.

use super::{Codec, CodecError, CodecInfo, LevelRange, Method, MethodCode, MethodDescriptor};

pub static DESCRIPTOR: MethodDescriptor = MethodDescriptor {
    name: "zstd",
    code: MethodCode(2),
    levels: LevelRange { min: -20, max: 19, default: 1 },
    compresses: true,
    open: |spec| Ok(Box::new(ZstdCodec::new(spec.level)?)),
};
const METHOD: Method = Method::of(&DESCRIPTOR);

pub struct ZstdCodec {
    level: i32,
    cctx: zstd::bulk::Compressor<'static>,
    dctx: zstd::bulk::Decompressor<'static>,
}

impl ZstdCodec {
    pub fn new(level: i32) -> Result<Self, CodecError> {
        let setup = |e: std::io::Error| CodecError::Setup { method: METHOD, detail: e.to_string() };
        let mut cctx = zstd::bulk::Compressor::new(level).map_err(setup)?;
        // The destination checks the length itself; a checksum would be redundant with CRC32C.
        cctx.include_checksum(false).map_err(setup)?;
        cctx.include_contentsize(true).map_err(setup)?;
        let dctx = zstd::bulk::Decompressor::new().map_err(setup)?;
        Ok(Self { level, cctx, dctx })
    }
}

impl Codec for ZstdCodec {
    fn info(&self) -> CodecInfo {
        CodecInfo { method: METHOD, level: self.level, provider: format!("libzstd {}", zstd::zstd_safe::version_string()), note: None }
    }
    fn max_compressed_len(&self, input_len: usize) -> usize {
        zstd::zstd_safe::compress_bound(input_len)
    }
    fn compress(&mut self, input: &[u8], out: &mut [u8]) -> Result<Option<usize>, CodecError> {
        let n = self
            .cctx
            .compress_to_buffer(input, out)
            .map_err(|e| CodecError::Compress { method: METHOD, detail: e.to_string() })?;
        Ok(Some(n))
    }
    fn decompress(&mut self, input: &[u8], out: &mut [u8]) -> Result<(), CodecError> {
        let want = out.len();
        let n = self
            .dctx
            .decompress_to_buffer(input, out)
            .map_err(|e| CodecError::Decompress { method: METHOD, detail: e.to_string() })?;
        if n != want {
            return Err(CodecError::Decompress { method: METHOD, detail: format!("inflated to {n} bytes, expected {want}") });
        }
        Ok(())
    }
}

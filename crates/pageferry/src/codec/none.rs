//! Method `none`: pages travel as they are.

use super::{Codec, CodecError, CodecInfo, Method};

pub struct NoneCodec;

impl Codec for NoneCodec {
    fn info(&self) -> CodecInfo {
        CodecInfo { method: Method::None, level: 0, provider: "none".into() }
    }
    fn max_compressed_len(&self, _input_len: usize) -> usize {
        0
    }
    fn compress(&mut self, _input: &[u8], _out: &mut [u8]) -> Result<Option<usize>, CodecError> {
        Ok(None)
    }
    fn decompress(&mut self, _input: &[u8], _out: &mut [u8]) -> Result<(), CodecError> {
        Err(CodecError::Decompress { method: Method::None, detail: "method none carries no compressed payloads".into() })
    }
    fn tolerates_changing_input(&self) -> bool {
        true
    }
    fn compresses(&self) -> bool {
        false
    }
}

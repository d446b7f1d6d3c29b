//! Method `none`: pages travel as they are.

use super::{Codec, CodecError, CodecInfo, CodecSpec, LevelRange, Method, MethodCode, MethodDescriptor};

pub static DESCRIPTOR: MethodDescriptor = MethodDescriptor {
    name: "none",
    code: MethodCode(0),
    levels: LevelRange { min: 0, max: 0, default: 0 },
    compresses: false,
    open,
};
const METHOD: Method = Method::of(&DESCRIPTOR);

fn open(_spec: &CodecSpec) -> Result<Box<dyn Codec>, CodecError> {
    Ok(Box::new(NoneCodec))
}

pub struct NoneCodec;

impl Codec for NoneCodec {
    fn info(&self) -> CodecInfo {
        CodecInfo { method: METHOD, level: 0, provider: "none".into(), note: None }
    }
    fn max_compressed_len(&self, _input_len: usize) -> usize {
        0
    }
    fn compress(&mut self, _input: &[u8], _out: &mut [u8]) -> Result<Option<usize>, CodecError> {
        Ok(None)
    }
    fn decompress(&mut self, _input: &[u8], _out: &mut [u8]) -> Result<(), CodecError> {
        Err(CodecError::Decompress { method: METHOD, detail: "method none carries no compressed payloads".into() })
    }
    fn tolerates_changing_input(&self) -> bool {
        true
    }
    fn compresses(&self) -> bool {
        false
    }
}

//! Compression methods, one file each, behind one small per-channel interface.
//!
//! Every batch is compressed on its own (non-streaming), so every packet decodes on its own —
//! unlike QEMU's zlib/zstd methods, which keep one stream per channel. A method is a
//! [`Codec`]: `compress` one batch into a caller-provided buffer (or decline, and the batch
//! goes raw), `decompress` one payload into a caller-provided buffer of exactly the batch's
//! size. Setup is [`open`] (one codec per channel worker), teardown is `Drop`.
//!
//! Adding a method = one new file here plus one arm in [`open`]; the engine never branches on
//! the method.

mod deflate;
mod none;
pub mod qatzip;
mod zlib;
mod zstd;

#[cfg(test)]
mod tests;

pub use deflate::deflate_backend_name;

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Largest batch: 128 pages of 4 KiB.
pub const MAX_BATCH_PAGES: usize = 128;
pub const MAX_BATCH_BYTES: usize = MAX_BATCH_PAGES * crate::memory::PAGE_SIZE;

/// A compression method as named on the command line and on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    None,
    Zlib,
    Zstd,
    Qatzip,
}

impl Method {
    pub const ALL: [Method; 4] = [Method::None, Method::Zlib, Method::Zstd, Method::Qatzip];
    pub fn name(self) -> &'static str {
        match self {
            Method::None => "none",
            Method::Zlib => "zlib",
            Method::Zstd => "zstd",
            Method::Qatzip => "qatzip",
        }
    }
    /// Wire code (packet header byte).
    pub fn code(self) -> u8 {
        self as u8
    }
    pub fn from_code(c: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.code() == c)
    }
    /// Valid levels and the default, following QEMU's parameters.
    pub fn levels(self) -> (u8, u8, u8) {
        match self {
            Method::None => (0, 0, 0),
            Method::Zlib => (1, 9, 1),
            Method::Zstd => (1, 19, 1),
            Method::Qatzip => (1, 9, 1),
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Method {
    type Err = CodecError;
    fn from_str(s: &str) -> Result<Self, CodecError> {
        Self::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| CodecError::Config(format!("unknown compression method '{s}' (expected none, zlib, zstd or qatzip)")))
    }
}

/// Everything needed to open a codec on either side; sent (method, level) in the handshake.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodecSpec {
    pub method: Method,
    pub level: u8,
    /// qatzip only: which provider to use (auto, qat, cpu). Local choice, not negotiated.
    #[serde(default)]
    pub qatzip: qatzip::QatzipOptions,
}

impl CodecSpec {
    /// Method at its default level.
    pub fn new(method: Method) -> Self {
        Self { method, level: method.levels().2, qatzip: Default::default() }
    }
    pub fn with_level(method: Method, level: u8) -> Result<Self, CodecError> {
        let (lo, hi, _) = method.levels();
        if method != Method::None && !(lo..=hi).contains(&level) {
            return Err(CodecError::Config(format!("{method} level {level} out of range {lo}..={hi}")));
        }
        Ok(Self { method, level, qatzip: Default::default() })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("{0}")]
    Config(String),
    #[error("{method} compression failed: {detail}")]
    Compress { method: Method, detail: String },
    #[error("{method} decompression failed: {detail}")]
    Decompress { method: Method, detail: String },
    #[error("{method} setup failed: {detail}")]
    Setup { method: Method, detail: String },
}

/// What did the work, for reports ("isa-l", "libdeflate", "qat (hardware)", ...).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodecInfo {
    pub method: Method,
    pub level: u8,
    pub provider: String,
}

/// One channel worker's compressor/decompressor for one method.
pub trait Codec: Send {
    fn info(&self) -> CodecInfo;
    /// Size the output buffer given to `compress` must have for `input_len` bytes.
    fn max_compressed_len(&self, input_len: usize) -> usize;
    /// Compress one batch into `out` (at least `max_compressed_len(input.len())` bytes).
    /// `Ok(None)`: send the input raw (method `none`, or the codec chose not to compress).
    fn compress(&mut self, input: &[u8], out: &mut [u8]) -> Result<Option<usize>, CodecError>;
    /// Decompress one payload; it must produce exactly `out.len()` bytes, and anything else
    /// (too much, too little, corrupt) is an error. Never writes outside `out`.
    fn decompress(&mut self, input: &[u8], out: &mut [u8]) -> Result<(), CodecError>;
    /// True only when `compress` reads each input byte once (a device that DMAs the batch,
    /// a codec that copies its input first), so that a page changing during the call cannot
    /// corrupt *other* pages of the payload. The engine compresses live guest memory in
    /// place only for such codecs, and a stable copy otherwise.
    ///
    /// No software LZ compressor qualifies: it emits bytes as literals at one moment and
    /// later validates a match against the same input bytes at another, so an unchanged page
    /// can decode to bytes a concurrently changed page held earlier — and an unchanged page is
    /// never resent. (Seen with zstd on this project's demo: one byte wrong in an untouched
    /// page.) Static memory (images, paused guests) is always compressed in place.
    fn tolerates_changing_input(&self) -> bool {
        false
    }
    /// False for method `none`: the engine then sends pages raw without calling `compress`
    /// (and without gathering scattered pages into a buffer first).
    fn compresses(&self) -> bool {
        true
    }
    /// Batches a channel should keep in flight to this codec when the user does not say
    /// (`--pipeline-depth`): 1 for CPU codecs (one core each), more for an accelerator that
    /// takes parallel requests.
    fn preferred_pipeline_depth(&self) -> usize {
        1
    }
}

/// Open a codec for one channel worker: the one place that maps a method to its file.
pub fn open(spec: &CodecSpec) -> Result<Box<dyn Codec>, CodecError> {
    let (lo, hi, _) = spec.method.levels();
    if spec.method != Method::None && !(lo..=hi).contains(&spec.level) {
        return Err(CodecError::Config(format!("{} level {} out of range {lo}..={hi}", spec.method, spec.level)));
    }
    Ok(match spec.method {
        Method::None => Box::new(none::NoneCodec),
        Method::Zlib => Box::new(zlib::ZlibCodec::new(spec.level)?),
        Method::Zstd => Box::new(zstd::ZstdCodec::new(spec.level)?),
        Method::Qatzip => qatzip::open(spec.level, &spec.qatzip)?,
    })
}

/// The shared conformance suite every codec must pass (public so that out-of-tree codecs and
/// providers run it too).
pub mod conformance;

//! Compression methods, one file each, behind one small per-channel interface.
//!
//! Every batch is compressed on its own (non-streaming), so every packet decodes on its own —
//! unlike QEMU's zlib/zstd methods, which keep one stream per channel. A method is a
//! [`Codec`]: `compress` one batch into a caller-provided buffer (or decline, and the batch
//! goes raw), `decompress` one payload into a caller-provided buffer of exactly the batch's
//! size. Setup is [`open`] (one codec per channel worker), teardown is `Drop`.
//!
//! A method is one file: it declares a [`MethodDescriptor`] (name, wire code, level range
//! and default, how to open it); [`REGISTRY`] lists the files' descriptors, and everything
//! else — the engine, the CLI's flags, the handshake's capabilities — asks the registry
//! through [`Method`]. Adding a method = one new file here plus one line in [`REGISTRY`];
//! nothing branches on a particular method.

mod deflate;
mod none;
pub mod qatzip;
mod zlib;
mod zstd;

#[cfg(test)]
mod tests;

pub use crate::wire::{MethodCode, MAX_BATCH_BYTES, MAX_BATCH_PAGES};
pub use deflate::deflate_backend_name;

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Levels a method accepts and the one used when none is given. Levels are signed: zstd's
/// fast levels are negative. A method without levels (`none`) has `0..=0`, default 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LevelRange {
    /// Lowest level.
    pub min: i32,
    /// Highest level.
    pub max: i32,
    /// Level used when none is given.
    pub default: i32,
}

/// Everything the rest of pageferry knows about a method; each codec file declares one.
pub struct MethodDescriptor {
    /// On the command line and in reports.
    pub name: &'static str,
    /// On the wire; pinned forever once released (see `wire`).
    pub code: MethodCode,
    /// Levels it accepts.
    pub levels: LevelRange,
    /// False only for `none`: pages go raw without calling the codec.
    pub compresses: bool,
    /// Open one codec (one per channel worker) at a level already checked against `levels`.
    pub open: fn(&CodecSpec) -> Result<Box<dyn Codec>, CodecError>,
}

/// The methods, in the order they are listed to users. One line per codec file.
pub static REGISTRY: [&MethodDescriptor; 4] = [&none::DESCRIPTOR, &zlib::DESCRIPTOR, &zstd::DESCRIPTOR, &qatzip::DESCRIPTOR];

/// A compression method: a handle on its registry entry. Compared, hashed and serialized
/// by name/code, never matched on.
#[derive(Clone, Copy)]
pub struct Method(&'static MethodDescriptor);

impl Method {
    /// The method a descriptor declares (for its own codec file).
    pub const fn of(d: &'static MethodDescriptor) -> Self {
        Method(d)
    }
    /// Every registered method, in registry order.
    pub fn all() -> impl Iterator<Item = Method> {
        REGISTRY.iter().map(|d| Method(d))
    }
    /// The method called `name`, if registered.
    pub fn by_name(name: &str) -> Option<Method> {
        Self::all().find(|m| m.name() == name)
    }
    /// The method with wire code `code`, if registered.
    pub fn from_code(code: MethodCode) -> Option<Method> {
        Self::all().find(|m| m.code() == code)
    }
    /// Its registry entry.
    pub fn descriptor(self) -> &'static MethodDescriptor {
        self.0
    }
    /// Its name on the command line and in reports.
    pub fn name(self) -> &'static str {
        self.0.name
    }
    /// Wire code (packet header byte 6).
    pub fn code(self) -> MethodCode {
        self.0.code
    }
    /// Levels it accepts.
    pub fn levels(self) -> LevelRange {
        self.0.levels
    }
    /// Level used when none is given.
    pub fn default_level(self) -> i32 {
        self.0.levels.default
    }
    /// False for `none`.
    pub fn compresses(self) -> bool {
        self.0.compresses
    }
    /// The one level check: `level` is in the method's range.
    pub fn check_level(self, level: i32) -> Result<(), CodecError> {
        let LevelRange { min, max, .. } = self.levels();
        if !(min..=max).contains(&level) {
            return Err(CodecError::Config(format!("{self} level {level} out of range {min}..={max}")));
        }
        Ok(())
    }
    /// Names of all methods for messages: "none, zlib, zstd or qatzip".
    pub fn names() -> String {
        let v: Vec<&str> = Self::all().map(|m| m.name()).collect();
        match v.split_last() {
            Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
            _ => v.join(""),
        }
    }
}

/// The registry's first method, `none`: pages travel as they are (QEMU's default too).
impl Default for Method {
    fn default() -> Self {
        Method(REGISTRY[0])
    }
}

impl PartialEq for Method {
    fn eq(&self, other: &Self) -> bool {
        self.code() == other.code()
    }
}
impl Eq for Method {}
impl std::hash::Hash for Method {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.code().hash(h)
    }
}

impl fmt::Debug for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
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
        Self::by_name(s).ok_or_else(|| CodecError::Config(format!("unknown compression method '{s}' (expected {})", Self::names())))
    }
}

impl Serialize for Method {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for Method {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Everything needed to open a codec on either side; sent (method, level) in the handshake.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodecSpec {
    /// The method.
    pub method: Method,
    /// Its level (checked against the method's range; negative for zstd's fast levels).
    pub level: i32,
    /// qatzip only: which provider to use (auto, qat, cpu). Local choice, not negotiated.
    #[serde(default)]
    pub qatzip: qatzip::QatzipOptions,
}

impl Default for CodecSpec {
    /// Method `none`.
    fn default() -> Self {
        Self::new(Method::default())
    }
}

impl CodecSpec {
    /// Method at its default level.
    pub fn new(method: Method) -> Self {
        Self { method, level: method.default_level(), qatzip: Default::default() }
    }
    /// Method at `level`; fails when the method does not accept it.
    pub fn with_level(method: Method, level: i32) -> Result<Self, CodecError> {
        method.check_level(level)?;
        Ok(Self { method, level, qatzip: Default::default() })
    }
}

#[derive(Debug, thiserror::Error)]
/// Errors of a codec.
pub enum CodecError {
    #[error("{0}")]
    /// Bad configuration (level, provider, options).
    Config(String),
    #[error("{method} compression failed: {detail}")]
    /// Compressing a batch failed.
    Compress {
        /// The method.
        method: Method,
        /// What went wrong.
        detail: String,
    },
    #[error("{method} decompression failed: {detail}")]
    /// A payload did not decompress to exactly its batch (corrupt, truncated, too long).
    Decompress {
        /// The method.
        method: Method,
        /// What went wrong.
        detail: String,
    },
    #[error("{method} setup failed: {detail}")]
    /// The codec could not be opened (library missing, no device, ...).
    Setup {
        /// The method.
        method: Method,
        /// What went wrong.
        detail: String,
    },
}

/// What did the work, for reports ("isa-l", "libdeflate", "qat (hardware)", ...).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodecInfo {
    /// Method that ran.
    pub method: Method,
    /// Its level.
    pub level: i32,
    /// What did the work ("libzstd 1.5.7", "isa-l (system)", "qat (hardware)", ...).
    pub provider: String,
    /// Why this provider, when the operator should know (a fallback); the engine passes it
    /// on as an `engine::Event::CodecNote`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// One channel worker's compressor/decompressor for one method.
pub trait Codec: Send {
    /// Method, level and what does the work.
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
    /// True when the work runs on an accelerator (a QAT device), not this CPU:
    /// `--multifd-compression auto` then adds the method to its candidates by itself.
    fn hardware(&self) -> bool {
        false
    }
}

/// Open a codec for one channel worker (through the method's descriptor).
pub fn open(spec: &CodecSpec) -> Result<Box<dyn Codec>, CodecError> {
    spec.method.check_level(spec.level)?;
    (spec.method.descriptor().open)(spec)
}

/// The shared conformance suite every codec must pass (public so that out-of-tree codecs and
/// providers run it too).
pub mod conformance;

impl Method {
    /// How a destination announces this method in its capabilities.
    pub fn caps(self) -> crate::wire::MethodCaps {
        let l = self.levels();
        crate::wire::MethodCaps { code: self.code(), name: self.name().into(), min_level: l.min, max_level: l.max }
    }
}

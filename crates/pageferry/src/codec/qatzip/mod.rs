//! Method `qatzip` (levels 1–9, default 1): deflate offloaded to Intel QuickAssist (QAT)
//! through Intel's QATzip library, wire-compatible with what QEMU 9.2+'s multifd `qatzip`
//! method puts in a packet.
//!
//! # Format
//! One payload per batch, in QATzip's default `QZ_DEFLATE_GZIP_EXT` format: gzip members whose
//! header carries a `'Q','Z'` extra subfield with the member's uncompressed and compressed
//! sizes (see `format.rs` for the bytes). QEMU calls `qzCompress(..., last = 1)` once per
//! batch with the library's deflate defaults and only the level changed, which is what the
//! `qat` provider does too; QATzip's software path writes one member per call, its hardware
//! one member per 64 KiB hardware buffer. Any multi-member gzip decoder reads the payloads.
//!
//! # Providers
//! A local choice, not negotiated: both produce and accept the same
//! format, so each side picks its own.
//! - `qat`: QATzip, loaded at run time (no build-time dependency, no link against it). One
//!   session per channel worker. Reports `qat (hardware)` when the session got a QAT
//!   instance, `qat (software path)` when QATzip fell back to its own zlib-based software
//!   compression (no device, or no free instance). Fails if the library cannot be loaded.
//! - `cpu`: the format in Rust: ISA-L igzip (level 1, feature `isal`) or libdeflate
//!   compresses, libdeflate decompresses; reports `cpu (isa-l)` / `cpu (libdeflate)`.
//! - `auto` (default): `qat` when QATzip loads *and* its session has a device, else `cpu`,
//!   with a note saying why (in the codec's info; the engine reports it as an event). QATzip's software path is not chosen
//!   automatically: it is several times slower than the `cpu` provider for the same format
//!   (level 1, 512 KiB batches of the silesia-like image, MB/s per CPU-second on this
//!   project's machine: QATzip 1.3.1 compresses ~87 and decompresses ~315, ratio 2.78; `cpu`
//!   ~370 with ISA-L (ratio 2.83) or ~175 with libdeflate (ratio 3.03), and decompresses
//!   ~700), and it retries (and reports) the missing device on every call. Provider `qat`
//!   still forces it, e.g. to compare with QEMU.
//!
//! # Pointing pageferry at QATzip
//! The library is looked for, in order, at `QatzipOptions::lib_path` (`--qatzip-lib PATH`),
//! at `$PAGEFERRY_QATZIP_LIB`, then as `libqatzip.so.3` in the system's library path. When a
//! path is given, QATzip's own dependencies `libusdm.so.0` and `libqat.so.4` are loaded
//! first from the same directory if they are there, so an install unpacked into a private
//! prefix works without `LD_LIBRARY_PATH`. `scripts/fetch-qatzip.sh` unpacks Debian's QATzip
//! 1.3.1 into `.qatzip/` that way (for tests and measurements; it installs nothing).
//! A real device additionally needs the QAT kernel driver, VFIO access and QAT's
//! configuration, as for QEMU.
//!
//! # Why things are as they are
//! - Every batch is its own gzip payload (`last = 1`), so every packet decodes on its own and
//!   a lost channel loses nothing else — as for the other methods here.
//! - Decompression must produce exactly the batch: QATzip stops quietly (status `QZ_OK`) when
//!   the output is full or the input ends early, so the `qat` provider checks that the whole
//!   payload was used and the whole batch produced; the `cpu` provider checks every member's
//!   sizes, CRC-32 and ISIZE itself.
//! - Raw fallback is the engine's: `compress` returns the payload size even when it is not
//!   smaller than the batch, and `None` only when the output does not fit the buffer given.
//!   The largest payload is `max_compressed_len` (about 1.125 × the batch for QATzip, a few
//!   hundred bytes over it for `cpu`), never 2 × the batch.
//! - Neither provider claims `tolerates_changing_input` (no software compressor can; and the
//!   gzip trailer's CRC-32 is a second read of the input). The engine compresses a stable
//!   copy of live memory; copying 512 KiB costs a few percent of compressing it. A QAT device
//!   reads its input once by DMA and could claim it — not done without hardware to verify.
//! - `qzClose` is called only when a library's last session closes: some QATzip versions
//!   stop the device for the whole process there.

mod cpu;
mod format;
mod qat;

#[cfg(test)]
mod tests;

use super::{Codec, CodecError, CodecSpec, LevelRange, Method, MethodCode, MethodDescriptor};

/// The `qatzip` method's registry entry.
pub static DESCRIPTOR: MethodDescriptor = MethodDescriptor {
    name: "qatzip",
    code: MethodCode(3),
    levels: LevelRange { min: 1, max: 9, default: 1 },
    compresses: true,
    open: |spec: &CodecSpec| open(spec.level, &spec.qatzip),
};
pub(crate) const METHOD: Method = Method::of(&DESCRIPTOR);
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// Which implementation of the qatzip method a side uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// QATzip with a QAT device if there is one, else `cpu`.
    #[default]
    Auto,
    /// QATzip, hardware or its software path; an error if the library cannot be loaded.
    Qat,
    /// The same format on the host CPU (ISA-L / libdeflate).
    Cpu,
}

impl Provider {
    /// Every provider.
    pub const ALL: [Provider; 3] = [Provider::Auto, Provider::Qat, Provider::Cpu];
    /// Its name (`--qatzip-provider`).
    pub fn name(self) -> &'static str {
        match self {
            Provider::Auto => "auto",
            Provider::Qat => "qat",
            Provider::Cpu => "cpu",
        }
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Provider {
    type Err = CodecError;
    fn from_str(s: &str) -> Result<Self, CodecError> {
        Self::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| CodecError::Config(format!("unknown qatzip provider '{s}' (expected auto, qat or cpu)")))
    }
}

/// Local (not negotiated) options of the qatzip method.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct QatzipOptions {
    /// Which implementation compresses.
    pub provider: Provider,
    /// The QATzip library (`libqatzip.so.3`) to load; unset: `$PAGEFERRY_QATZIP_LIB`, else the
    /// system's.
    pub lib_path: Option<PathBuf>,
}

impl QatzipOptions {
    /// The library the `qat` provider would load with these options.
    pub fn library(&self) -> PathBuf {
        qat::resolve_path(self.lib_path.as_deref())
    }
}

/// Open a qatzip codec for one channel worker.
pub fn open(level: i32, opts: &QatzipOptions) -> Result<Box<dyn Codec>, CodecError> {
    METHOD.check_level(level)?;
    let level = level as u8; // 1..=9, checked above
    let path = opts.library();
    match opts.provider {
        Provider::Cpu => Ok(Box::new(cpu::CpuCodec::new(level)?)),
        Provider::Qat => {
            let lib = qat::load(&path).map_err(|e| CodecError::Setup {
                method: METHOD,
                detail: format!("cannot load the QATzip library {} ({e}); point --qatzip-lib or ${} at libqatzip.so.3, or use the cpu provider", path.display(), qat::LIB_ENV),
            })?;
            Ok(Box::new(qat::QatCodec::open(lib, level)?))
        }
        Provider::Auto => open_auto(level, &path),
    }
}

/// Provider `auto`: QATzip with a device, else `cpu` with a note saying why (in the codec's
/// info; the engine passes it on to its events sink).
fn open_auto(level: u8, path: &std::path::Path) -> Result<Box<dyn Codec>, CodecError> {
    let cpu = |note: String| -> Result<Box<dyn Codec>, CodecError> { Ok(Box::new(cpu::CpuCodec::new(level)?.with_note(note))) };
    match qat::load(path) {
        Err(e) => cpu(format!("qatzip: {} not found ({e}); using the cpu provider", path.display())),
        Ok(lib) => match qat::QatCodec::open(lib, level) {
            Ok(c) if c.is_hardware() => Ok(Box::new(c)),
            Ok(c) => {
                drop(c);
                cpu(format!("qatzip: {} found no QAT device (software path only); using the cpu provider (same format, faster)", path.display()))
            }
            Err(e) => cpu(format!("qatzip: no QATzip session ({e}); using the cpu provider")),
        },
    }
}

//! Deflate engines shared by the deflate-based methods (`zlib`, and `qatzip`'s cpu provider).
//!
//! Measured on this project's machine (1 core, 512 KiB batches of the silesia-like image,
//! CPU-s per GiB, level 1): ISA-L igzip compresses at 2.58 (ratio 2.79), libdeflate at 5.45
//! (2.95), zlib-rs at 5.40 (2.25); libdeflate decompresses fastest (1.31, ISA-L 1.52).
//! So: compression at level 1 uses ISA-L when built with the `isal` feature, libdeflate
//! otherwise and for levels 2–9; decompression always uses libdeflate.

use super::{CodecError, Method};

/// Output framing around the deflate data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// RFC 1950: 2-byte header, deflate, Adler-32.
    Zlib,
    /// RFC 1951 only; the caller frames it.
    Raw,
}

/// Highest level handed to ISA-L; higher levels use libdeflate for its better ratio.
const ISAL_MAX_LEVEL: u8 = 1;

/// Name of the engine used for level-1 compression in this build.
pub fn deflate_backend_name(level: u8) -> &'static str {
    if cfg!(feature = "isal") && level <= ISAL_MAX_LEVEL {
        "isa-l"
    } else {
        "libdeflate"
    }
}

/// Upper bound of deflate output for `len` input bytes: stored blocks cost 5 bytes per 64 KiB,
/// plus room for zlib or gzip framing.
pub fn bound(len: usize) -> usize {
    len + 5 * (len / 65535 + 1) + 64
}

/// A deflate compressor for one channel worker.
pub struct DeflateCompressor {
    level: u8,
    framing: Framing,
    engine: Engine,
}

enum Engine {
    #[cfg(feature = "isal")]
    Isal(isal::Isal),
    Libdeflate(libdeflater::Compressor),
}

impl DeflateCompressor {
    pub fn new(method: Method, level: u8, framing: Framing) -> Result<Self, CodecError> {
        let engine = if deflate_backend_name(level) == "isa-l" {
            #[cfg(feature = "isal")]
            {
                Engine::Isal(isal::Isal::new(level))
            }
            #[cfg(not(feature = "isal"))]
            unreachable!()
        } else {
            let lvl = libdeflater::CompressionLvl::new(level as i32)
                .map_err(|_| CodecError::Config(format!("{method}: bad deflate level {level}")))?;
            Engine::Libdeflate(libdeflater::Compressor::new(lvl))
        };
        Ok(Self { level, framing, engine })
    }

    pub fn backend(&self) -> &'static str {
        match self.engine {
            #[cfg(feature = "isal")]
            Engine::Isal(_) => "isa-l",
            Engine::Libdeflate(_) => "libdeflate",
        }
    }

    pub fn level(&self) -> u8 {
        self.level
    }

    /// Compress `input` into `out`; `None` when it does not fit `out`.
    pub fn compress(&mut self, input: &[u8], out: &mut [u8]) -> Option<usize> {
        match &mut self.engine {
            #[cfg(feature = "isal")]
            Engine::Isal(e) => e.compress(input, out, self.framing),
            Engine::Libdeflate(c) => {
                let r = match self.framing {
                    Framing::Zlib => c.zlib_compress(input, out),
                    Framing::Raw => c.deflate_compress(input, out),
                };
                r.ok().filter(|&n| n > 0)
            }
        }
    }
}

/// A deflate decompressor (libdeflate) for one channel worker.
pub struct DeflateDecompressor {
    inner: libdeflater::Decompressor,
}

impl Default for DeflateDecompressor {
    fn default() -> Self {
        Self { inner: libdeflater::Decompressor::new() }
    }
}

impl DeflateDecompressor {
    /// Decompress exactly `out.len()` bytes from `input` (one whole stream).
    pub fn decompress(&mut self, method: Method, framing: Framing, input: &[u8], out: &mut [u8]) -> Result<(), CodecError> {
        let want = out.len();
        let err = |detail: String| CodecError::Decompress { method, detail };
        let produced = match framing {
            Framing::Zlib => self.inner.zlib_decompress(input, out),
            Framing::Raw => self.inner.deflate_decompress(input, out),
        }
        .map_err(|e| err(e.to_string()))?;
        if produced != want {
            return Err(err(format!("inflated to {produced} bytes, expected {want}")));
        }
        Ok(())
    }
}

#[cfg(feature = "isal")]
mod isal {
    use super::Framing;
    use isal_sys::igzip_lib as ffi;

    pub struct Isal {
        level: u8,
        level_buf: Vec<u8>,
    }

    impl Isal {
        pub fn new(level: u8) -> Self {
            Self { level, level_buf: vec![0; ffi::ISAL_DEF_LVL1_DEFAULT as usize] }
        }

        pub fn compress(&mut self, input: &[u8], out: &mut [u8], framing: Framing) -> Option<usize> {
            // SAFETY: isal_zstream is a plain C struct; stateless_init sets every field it needs,
            // and the pointers below stay valid for the call.
            unsafe {
                let mut s: ffi::isal_zstream = std::mem::zeroed();
                ffi::isal_deflate_stateless_init(&mut s);
                s.next_in = input.as_ptr() as *mut u8;
                s.avail_in = input.len() as u32;
                s.next_out = out.as_mut_ptr();
                s.avail_out = out.len() as u32;
                s.level = self.level as u32;
                s.level_buf = self.level_buf.as_mut_ptr();
                s.level_buf_size = self.level_buf.len() as u32;
                s.end_of_stream = 1;
                s.flush = ffi::NO_FLUSH as u16;
                s.gzip_flag = match framing {
                    Framing::Zlib => ffi::IGZIP_ZLIB as u16,
                    Framing::Raw => ffi::IGZIP_DEFLATE as u16,
                };
                let rc = ffi::isal_deflate_stateless(&mut s);
                if rc == ffi::COMP_OK as i32 {
                    Some(s.total_out as usize)
                } else {
                    None
                }
            }
        }
    }
}

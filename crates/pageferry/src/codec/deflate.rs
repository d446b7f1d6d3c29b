//! Deflate engines shared by the deflate-based methods (`zlib`, and `qatzip`'s cpu provider).
//!
//! Measured on this project's machine (1 core, 512 KiB batches of the silesia-like image,
//! CPU-s per GiB, level 1): ISA-L igzip compresses at 2.58 (ratio 2.79), libdeflate at 5.45
//! (2.95), zlib-rs at 5.40 (2.25); libdeflate decompresses fastest (1.31, ISA-L 1.52).
//! So: compression at level 1 uses ISA-L when the build has it, libdeflate otherwise and for
//! levels 2–9; decompression always uses libdeflate. Which ISA-L (build.rs decides): the one
//! `isal-sys` builds from source with the `isal` feature, else the system's (`libisal-dev`)
//! when it is installed, through a small C shim compiled against its header.

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

/// The ISA-L this build compresses with, as reports name it; `None`: libdeflate only.
const ISAL_NAME: Option<&str> = if cfg!(feature = "isal") {
    Some("isa-l (source build)")
} else if cfg!(pageferry_isal_system) {
    Some("isa-l (system)")
} else {
    None
};

/// Name of the engine this build compresses deflate at `level` with: "isa-l (source build)",
/// "isa-l (system)" or "libdeflate".
pub fn deflate_backend_name(level: u8) -> &'static str {
    match ISAL_NAME {
        Some(name) if level <= ISAL_MAX_LEVEL => name,
        _ => "libdeflate",
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
    #[cfg(any(feature = "isal", pageferry_isal_system))]
    Isal(isal::Isal),
    Libdeflate(libdeflater::Compressor),
}

impl DeflateCompressor {
    pub fn new(method: Method, level: u8, framing: Framing) -> Result<Self, CodecError> {
        let engine = if deflate_backend_name(level) != "libdeflate" {
            #[cfg(any(feature = "isal", pageferry_isal_system))]
            {
                Engine::Isal(isal::Isal::new(level))
            }
            #[cfg(not(any(feature = "isal", pageferry_isal_system)))]
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
            #[cfg(any(feature = "isal", pageferry_isal_system))]
            Engine::Isal(_) => deflate_backend_name(self.level),
            Engine::Libdeflate(_) => "libdeflate",
        }
    }

    pub fn level(&self) -> u8 {
        self.level
    }

    /// Compress `input` into `out`; `None` when it does not fit `out`.
    pub fn compress(&mut self, input: &[u8], out: &mut [u8]) -> Option<usize> {
        match &mut self.engine {
            #[cfg(any(feature = "isal", pageferry_isal_system))]
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

/// ISA-L from the system (build.rs found `-lisal` and compiled `isal_shim.c` against its header).
#[cfg(all(pageferry_isal_system, not(feature = "isal")))]
mod isal {
    use super::Framing;

    extern "C" {
        fn pageferry_isal_level_buf_size() -> u32;
        #[allow(clippy::too_many_arguments)]
        fn pageferry_isal_compress(
            input: *const u8,
            in_len: u32,
            out: *mut u8,
            out_cap: u32,
            level: u32,
            level_buf: *mut u8,
            level_buf_size: u32,
            zlib: i32,
        ) -> u32;
    }

    pub struct Isal {
        level: u8,
        level_buf: Vec<u8>,
    }

    impl Isal {
        pub fn new(level: u8) -> Self {
            // SAFETY: returns a constant of the header.
            let size = unsafe { pageferry_isal_level_buf_size() };
            Self { level, level_buf: vec![0; size as usize] }
        }

        pub fn compress(&mut self, input: &[u8], out: &mut [u8], framing: Framing) -> Option<usize> {
            let in_len = u32::try_from(input.len()).ok()?;
            let out_cap = u32::try_from(out.len()).unwrap_or(u32::MAX);
            // SAFETY: the shim reads `in_len` bytes of `input` and writes at most `out_cap` bytes of
            // `out`; the level buffer is ours and as large as it says.
            let n = unsafe {
                pageferry_isal_compress(
                    input.as_ptr(),
                    in_len,
                    out.as_mut_ptr(),
                    out_cap,
                    self.level as u32,
                    self.level_buf.as_mut_ptr(),
                    self.level_buf.len() as u32,
                    (framing == Framing::Zlib) as i32,
                )
            };
            (n > 0).then_some(n as usize)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The build picks ISA-L as build.rs documents: the source build with the `isal` feature,
    /// else the system's whenever its header is installed (scripts/setup-deps.sh installs it),
    /// else libdeflate; levels above 1 always use libdeflate.
    #[test]
    fn backend_follows_the_build() {
        let system = std::path::Path::new("/usr/include/isa-l/igzip_lib.h").exists()
            && !std::env::var("PAGEFERRY_ISAL").is_ok_and(|v| v == "off" || v == "0");
        let want = if cfg!(feature = "isal") {
            "isa-l (source build)"
        } else if system {
            "isa-l (system)"
        } else {
            "libdeflate"
        };
        assert_eq!(deflate_backend_name(1), want);
        assert_eq!(deflate_backend_name(2), "libdeflate");
        for framing in [Framing::Zlib, Framing::Raw] {
            let c = DeflateCompressor::new(crate::codec::zlib::METHOD, 1, framing).unwrap();
            assert_eq!(c.backend(), want);
        }
    }

    /// Whatever engine compresses, libdeflate decodes both framings back to the input, and an
    /// output buffer that is too small gives `None` (send raw), never a partial stream.
    #[test]
    fn engines_round_trip_and_respect_the_output_size() {
        let data = super::super::conformance::sample_text(128 * 4096, 7);
        for level in [1, 6] {
            for framing in [Framing::Zlib, Framing::Raw] {
                let mut c = DeflateCompressor::new(crate::codec::zlib::METHOD, level, framing).unwrap();
                let mut out = vec![0u8; bound(data.len())];
                let n = c.compress(&data, &mut out).expect("compresses");
                assert!(n < data.len() / 2, "{}: {n} bytes", c.backend());
                let mut back = vec![0u8; data.len()];
                DeflateDecompressor::default().decompress(crate::codec::zlib::METHOD, framing, &out[..n], &mut back).unwrap();
                assert!(back == data, "{} level {level} {framing:?}", c.backend());
                assert_eq!(c.compress(&data, &mut out[..n / 2]), None, "{}: too small an output", c.backend());
            }
        }
    }
}

//! Provider `cpu`: the qatzip payload format produced and consumed on the host CPU.
//!
//! Compression: one gzip member per batch — our deflate engine (ISA-L igzip at level 1 with
//! the `isal` feature, libdeflate otherwise and at levels 2–9) writes raw deflate between a
//! QATzip-style header and a CRC-32/ISIZE trailer (CRC by crc32fast, PCLMUL-accelerated).
//! Decompression: walks the members (one or more, with or without the `QZ` size record) and
//! inflates each with libdeflate's raw decoder, checking every size, the CRC-32 and ISIZE.

use super::format::{self, HEADER_LEN, TRAILER_LEN};
use crate::codec::deflate::{self, DeflateCompressor, Framing};
use super::METHOD;
use crate::codec::{Codec, CodecError, CodecInfo};

pub(crate) struct CpuCodec {
    level: u8,
    /// Why `auto` chose this provider, when it fell back to it.
    note: Option<String>,
    enc: DeflateCompressor,
    dec: RawInflater,
}

impl CpuCodec {
    pub(crate) fn new(level: u8) -> Result<Self, CodecError> {
        Ok(Self { level, note: None, enc: DeflateCompressor::new(METHOD, level, Framing::Raw)?, dec: RawInflater::new()? })
    }
    pub(crate) fn with_note(mut self, note: String) -> Self {
        self.note = Some(note);
        self
    }
}

/// Largest payload of one member for `input_len` bytes.
pub(crate) fn max_member_len(input_len: usize) -> usize {
    HEADER_LEN + deflate::bound(input_len) + TRAILER_LEN
}

fn compress_err(detail: String) -> CodecError {
    CodecError::Compress { method: METHOD, detail }
}

fn decompress_err(detail: String) -> CodecError {
    CodecError::Decompress { method: METHOD, detail }
}

impl Codec for CpuCodec {
    fn info(&self) -> CodecInfo {
        CodecInfo { method: METHOD, level: self.level.into(), provider: format!("cpu ({})", self.enc.backend()), note: self.note.clone() }
    }

    fn max_compressed_len(&self, input_len: usize) -> usize {
        max_member_len(input_len)
    }

    fn compress(&mut self, input: &[u8], out: &mut [u8]) -> Result<Option<usize>, CodecError> {
        let src_len = u32::try_from(input.len())
            .map_err(|_| compress_err(format!("batch of {} bytes exceeds a gzip member's 4 GiB", input.len())))?;
        if out.len() < HEADER_LEN + TRAILER_LEN {
            return Ok(None);
        }
        let end = out.len() - TRAILER_LEN;
        let Some(n) = self.enc.compress(input, &mut out[HEADER_LEN..end]) else { return Ok(None) };
        // n < out.len() <= usize, and a raw deflate of a < 4 GiB input fits u32 with room.
        let deflate_len = u32::try_from(n).map_err(|_| compress_err(format!("deflate output of {n} bytes")))?;
        format::write_header(out, self.level, src_len, deflate_len);
        format::write_trailer(&mut out[HEADER_LEN + n..], crc32fast::hash(input), src_len);
        Ok(Some(HEADER_LEN + n + TRAILER_LEN))
    }

    fn decompress(&mut self, input: &[u8], out: &mut [u8]) -> Result<(), CodecError> {
        decode_members(&mut self.dec, input, out).map_err(decompress_err)
    }

}

/// Decode a payload of gzip members into exactly `out`. Every member must fit what is left of
/// `out`, carry a correct CRC-32 and ISIZE, and agree with its `QZ` size record when it has
/// one; the members must produce exactly `out.len()` bytes and consume all of `input`.
pub(crate) fn decode_members(dec: &mut RawInflater, input: &[u8], out: &mut [u8]) -> Result<(), String> {
    if input.is_empty() {
        return Err("empty payload".into());
    }
    let (mut pos_in, mut pos_out, mut member) = (0usize, 0usize, 0usize);
    while pos_in < input.len() {
        let at = |e: String| format!("member {member} at byte {pos_in}: {e}");
        let hdr = format::parse_header(&input[pos_in..]).map_err(at)?;
        let data_start = pos_in + hdr.len;
        let rest_out = out.len() - pos_out;
        let (consumed, produced) = match hdr.qz {
            Some(qz) => {
                let (src_len, deflate_len) = (qz.src_len as usize, qz.deflate_len as usize);
                if src_len > rest_out {
                    return Err(at(format!("inflates to {src_len} bytes, only {rest_out} left of {}", out.len())));
                }
                let data = data_start
                    .checked_add(deflate_len)
                    .and_then(|end| input.get(data_start..end))
                    .ok_or_else(|| at(format!("deflate data of {deflate_len} bytes runs past the payload")))?;
                let (used, made) = dec.inflate(data, &mut out[pos_out..pos_out + src_len]).map_err(at)?;
                if used != deflate_len || made != src_len {
                    return Err(at(format!(
                        "QZ record says {deflate_len} -> {src_len} bytes, deflate data gave {used} -> {made}"
                    )));
                }
                (used, made)
            }
            None => dec.inflate(&input[data_start..], &mut out[pos_out..]).map_err(at)?,
        };
        let trailer_at = data_start + consumed;
        let (crc, isize) = format::parse_trailer(input, trailer_at).ok_or_else(|| at("truncated gzip trailer".into()))?;
        let produced_bytes = &out[pos_out..pos_out + produced];
        if isize != produced as u32 {
            return Err(at(format!("ISIZE {isize} but the member inflated to {produced} bytes")));
        }
        let actual = crc32fast::hash(produced_bytes);
        if crc != actual {
            return Err(at(format!("CRC-32 mismatch (stored {crc:#010x}, computed {actual:#010x})")));
        }
        pos_in = trailer_at + TRAILER_LEN;
        pos_out += produced;
        member += 1;
    }
    if pos_out != out.len() {
        return Err(format!("inflated to {pos_out} bytes, expected {}", out.len()));
    }
    Ok(())
}

/// libdeflate's raw-deflate decoder, through its `_ex` entry point that reports how much input
/// a stream used (needed to find the next member when a header has no `QZ` record).
pub(crate) struct RawInflater {
    d: std::ptr::NonNull<libdeflate_sys::libdeflate_decompressor>,
}

// SAFETY: a libdeflate decompressor is plain heap state with no thread affinity; `&mut self`
// on every use keeps it single-threaded.
unsafe impl Send for RawInflater {}

impl RawInflater {
    pub(crate) fn new() -> Result<Self, CodecError> {
        // SAFETY: plain allocation; null on failure.
        let d = unsafe { libdeflate_sys::libdeflate_alloc_decompressor() };
        std::ptr::NonNull::new(d)
            .map(|d| Self { d })
            .ok_or_else(|| CodecError::Setup { method: METHOD, detail: "libdeflate decompressor allocation failed".into() })
    }

    /// Inflate one raw deflate stream from the start of `input` into `out`: (input bytes used,
    /// bytes produced). A stream that needs more than `out` is an error.
    pub(crate) fn inflate(&mut self, input: &[u8], out: &mut [u8]) -> Result<(usize, usize), String> {
        use libdeflate_sys::{libdeflate_deflate_decompress_ex, libdeflate_result};
        const SUCCESS: libdeflate_result = libdeflate_sys::libdeflate_result_LIBDEFLATE_SUCCESS;
        const NO_SPACE: libdeflate_result = libdeflate_sys::libdeflate_result_LIBDEFLATE_INSUFFICIENT_SPACE;
        const SHORT: libdeflate_result = libdeflate_sys::libdeflate_result_LIBDEFLATE_SHORT_OUTPUT;
        let (mut used, mut made) = (0usize, 0usize);
        // SAFETY: pointers and lengths describe live slices; libdeflate writes only within
        // `out` and reads only within `input`.
        let r = unsafe {
            libdeflate_deflate_decompress_ex(
                self.d.as_ptr(),
                input.as_ptr().cast(),
                input.len(),
                out.as_mut_ptr().cast(),
                out.len(),
                &mut used,
                &mut made,
            )
        };
        match r {
            SUCCESS => Ok((used, made)),
            NO_SPACE => {
                Err(format!("deflate data inflates beyond the {} bytes left in the batch", out.len()))
            }
            SHORT => Err("deflate data inflates short".into()),
            _ => Err("corrupt or truncated deflate data".into()),
        }
    }
}

impl Drop for RawInflater {
    fn drop(&mut self) {
        // SAFETY: allocated by libdeflate_alloc_decompressor, freed once.
        unsafe { libdeflate_sys::libdeflate_free_decompressor(self.d.as_ptr()) }
    }
}

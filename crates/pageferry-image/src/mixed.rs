//! [`ImageKind::Mixed`](crate::ImageKind::Mixed): memory of a guest that is half idle — about
//! 50% zero pages, ~9% already-compressed (random) data, the rest SilesiaLike content.
//!
//! Layout, a pure function of (seed, position): each 2 MiB segment is entirely free (zero)
//! with probability [`FREE_SEGMENT`] — free memory comes in large runs — and every 64 KiB
//! chunk of the other segments is zero ([`ZERO_CHUNK`]), random ([`RANDOM_CHUNK`]) or the
//! SilesiaLike bytes at the same position. So batches of 512 KiB range from all-zero through
//! mixtures of a few runs to whole compressible or incompressible batches.

use crate::random::fill_random;
use crate::rng::hash2;
use crate::{fill, ImageKind, SEGMENT_BYTES};

/// Share of 2 MiB segments that are all zero.
pub(crate) const FREE_SEGMENT: f64 = 0.40;
/// In the other segments: share of 64 KiB chunks that are zero ...
pub(crate) const ZERO_CHUNK: f64 = 0.15;
/// ... and that are random (compressed media, encrypted data, compressed swap).
pub(crate) const RANDOM_CHUNK: f64 = 0.15;
pub(crate) const CHUNK: usize = 64 << 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Content {
    Zero,
    Random,
    Silesia,
}

/// A deterministic number in [0, 1) for (seed, salt, index).
fn unit(seed: u64, salt: u64, index: u64) -> f64 {
    (hash2(seed ^ salt, index) >> 11) as f64 / (1u64 << 53) as f64
}

/// What the 64 KiB chunk number `chunk` of the image holds.
pub(crate) fn content_of(seed: u64, chunk: u64) -> Content {
    let segment = chunk * CHUNK as u64 / SEGMENT_BYTES as u64;
    if unit(seed, 0x5E6, segment) < FREE_SEGMENT {
        return Content::Zero;
    }
    let u = unit(seed, 0xC4C, chunk);
    if u < ZERO_CHUNK {
        Content::Zero
    } else if u < ZERO_CHUNK + RANDOM_CHUNK {
        Content::Random
    } else {
        Content::Silesia
    }
}

pub(crate) fn fill_mixed(seed: u64, offset: u64, out: &mut [u8]) {
    let mut done = 0usize;
    while done < out.len() {
        let pos = offset + done as u64;
        let chunk = pos / CHUNK as u64;
        let n = ((chunk + 1) * CHUNK as u64 - pos).min((out.len() - done) as u64) as usize;
        let part = &mut out[done..done + n];
        match content_of(seed, chunk) {
            Content::Zero => part.fill(0),
            Content::Random => fill_random(seed, pos, part),
            Content::Silesia => fill(ImageKind::SilesiaLike, seed, pos, part),
        }
        done += n;
    }
}

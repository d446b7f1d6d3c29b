//! The Random kind: SplitMix64 output at the word index, so any byte range is computed
//! directly.

use crate::rng::{hash2, mix64, GOLDEN};

pub(crate) fn random_word(key: u64, index: u64) -> u64 {
    mix64(key.wrapping_add(index.wrapping_add(1).wrapping_mul(GOLDEN)))
}

pub(crate) fn fill_random(seed: u64, offset: u64, out: &mut [u8]) {
    let key = hash2(seed, 0x52414E44);
    let mut pos = 0usize;
    let mut word = offset / 8;
    let skip = (offset % 8) as usize;
    if skip != 0 {
        let b = random_word(key, word).to_le_bytes();
        let n = (8 - skip).min(out.len());
        out[..n].copy_from_slice(&b[skip..skip + n]);
        pos = n;
        word += 1;
    }
    let mut chunks = out[pos..].chunks_exact_mut(8);
    for c in &mut chunks {
        c.copy_from_slice(&random_word(key, word).to_le_bytes());
        word += 1;
    }
    let rest = chunks.into_remainder();
    let n = rest.len();
    rest.copy_from_slice(&random_word(key, word).to_le_bytes()[..n]);
}

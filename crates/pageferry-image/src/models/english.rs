//! dickens: wrapped English prose.

use crate::fmt::*;
use crate::rng::Rng;
use crate::text::*;

/// dickens: wrapped English paragraphs.
pub(crate) fn gen_english(v: &mut Vec<u8>, rng: &mut Rng, words: &Text, n: usize) {
    while v.len() < n {
        let mut col = 0;
        if rng.chance(0.02) {
            v.extend_from_slice(b"CHAPTER ");
            push_uint(v, rng.range(1, 60) as u64);
            v.extend_from_slice(b"\n\n");
        }
        for _ in 0..1 + rng.below(8) {
            push_sentence(v, rng, words, &mut col, 70);
            if col > 0 {
                v.push(b' ');
                col += 1;
            }
        }
        v.extend_from_slice(b"\n\n");
    }
}

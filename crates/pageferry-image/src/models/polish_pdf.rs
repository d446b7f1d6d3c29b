//! reymont: Polish text (UTF-8 diacritics) inside PDF text-showing operators with font kerning.

use crate::fmt::*;
use crate::rng::{hash2, Rng};
use crate::text::*;

// Calibration knobs (tuned against the real Silesia file; see the crate documentation).
/// reymont: share of letter pairs with a kerning adjustment.
const PL_KERN: f64 = 0.06;

/// reymont: Polish words inside PDF text-showing operators with kerning numbers.
pub(crate) fn gen_polish_pdf(v: &mut Vec<u8>, rng: &mut Rng, words: &Text, n: usize) {
    const KERN: &[&[u8]] = &[
        b"-1", b"1", b"28", b"-28", b"27", b"-27", b"56", b"83", b"-56",
    ];
    while v.len() < n {
        if rng.chance(0.01) {
            v.extend_from_slice(b"ET\nendstream\nendobj\n");
            push_uint(v, rng.range(10, 900) as u64);
            v.extend_from_slice(b" 0 obj<</Length ");
            push_uint(v, rng.range(2000, 9000) as u64);
            v.extend_from_slice(b">>stream\nBT\n/F1 9.963 Tf 90.925 759.927 Td\n");
        }
        let space = -(333 + rng.below(60) as i64);
        let mut space_s = Vec::new();
        push_int_w(&mut space_s, space, 0);
        v.push(b'[');
        let mut len = 0;
        let mut first = true;
        while len < 62 {
            let w = words.sample(rng);
            if !first {
                v.push(b')');
                v.extend_from_slice(&space_s);
            }
            v.push(b'(');
            let start = v.len();
            let chars: Vec<&[u8]> = utf8_chars(w);
            let mut prev: &[u8] = b" ";
            for c in chars {
                if c == b" " {
                    v.push(b')');
                    v.extend_from_slice(&space_s);
                    v.push(b'(');
                } else if prev != b" " {
                    // Font kerning: a fixed adjustment for some letter pairs.
                    let pair = (prev[prev.len() - 1] as u64) << 8 | c[c.len() - 1] as u64;
                    let h = hash2(0x4B45524E, pair);
                    if (h % 1000) < (PL_KERN * 1000.0) as u64 {
                        v.push(b')');
                        v.extend_from_slice(KERN[(h >> 32) as usize % KERN.len()]);
                        v.push(b'(');
                    }
                }
                v.extend_from_slice(c);
                prev = c;
            }
            if first && rng.chance(0.1) {
                v[start] = v[start].to_ascii_uppercase();
            }
            if rng.chance(0.08) {
                v.push(b',');
            }
            len += w.len() + 1;
            first = false;
        }
        v.extend_from_slice(if rng.chance(0.1) { b".)]TJ" } else { b")]TJ" });
        if rng.chance(0.15) {
            v.extend_from_slice(b" -27.879 -13.549 Td\n");
        } else {
            v.extend_from_slice(b" 0 -13.549 Td\n");
        }
    }
}

pub(crate) fn utf8_chars(w: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::with_capacity(w.len());
    let mut i = 0;
    while i < w.len() {
        let l = if w[i] < 0x80 {
            1
        } else if w[i] >= 0xE0 {
            3
        } else {
            2
        };
        let e = (i + l).min(w.len());
        out.push(&w[i..e]);
        i = e;
    }
    out
}

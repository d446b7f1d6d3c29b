//! Small formatting helpers (no allocation, no float formatting).

use crate::rng::Rng;

pub(crate) fn push_uint(v: &mut Vec<u8>, mut n: u64) {
    let mut tmp = [0u8; 20];
    let mut i = tmp.len();
    loop {
        i -= 1;
        tmp[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    v.extend_from_slice(&tmp[i..]);
}

/// `n` right-aligned in `width` columns.
pub(crate) fn push_int_w(v: &mut Vec<u8>, n: i64, width: usize) {
    let mut tmp = Vec::with_capacity(24);
    if n < 0 {
        tmp.push(b'-');
    }
    push_uint(&mut tmp, n.unsigned_abs());
    for _ in tmp.len()..width {
        v.push(b' ');
    }
    v.extend_from_slice(&tmp);
}

/// Fixed-point value `scaled / 10^decimals`, right-aligned in `width` columns (like `%W.Df`).
pub(crate) fn push_fixed(v: &mut Vec<u8>, scaled: i64, decimals: u32, width: usize) {
    let p = 10u64.pow(decimals);
    let a = scaled.unsigned_abs();
    let mut tmp = Vec::with_capacity(24);
    if scaled < 0 {
        tmp.push(b'-');
    }
    push_uint(&mut tmp, a / p);
    if decimals > 0 {
        tmp.push(b'.');
        let frac = a % p;
        let mut digits = [b'0'; 12];
        let mut f = frac;
        for k in (0..decimals as usize).rev() {
            digits[k] = b'0' + (f % 10) as u8;
            f /= 10;
        }
        tmp.extend_from_slice(&digits[..decimals as usize]);
    }
    for _ in tmp.len()..width {
        v.push(b' ');
    }
    v.extend_from_slice(&tmp);
}

pub(crate) fn push_capitalized(v: &mut Vec<u8>, w: &[u8]) {
    if let Some((&first, rest)) = w.split_first() {
        v.push(first.to_ascii_uppercase());
        v.extend_from_slice(rest);
    }
}

pub(crate) fn push_alnum(v: &mut Vec<u8>, rng: &mut Rng, n: usize) {
    const AL: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    for _ in 0..n {
        v.push(AL[rng.below(AL.len())]);
    }
}

//! osdb: rows of a binary database table.

use crate::fmt::*;
use crate::rng::Rng;

// Calibration knobs (tuned against the real Silesia file; see the crate documentation).
/// osdb: share of string columns holding a fresh random value (else a repeated one).
const DB_RANDOM_FIELD: f64 = 0.5;

/// osdb: rows of a binary database table.
pub(crate) fn gen_database(v: &mut Vec<u8>, rng: &mut Rng, n: usize) {
    // Column values that repeat across rows (categories, names).
    let mut pool: Vec<Vec<u8>> = Vec::with_capacity(64);
    for _ in 0..64 {
        let mut x = Vec::new();
        let k = rng.range(4, 14) as usize;
        push_alnum(&mut x, rng, k);
        pool.push(x);
    }
    let mut id = rng.below(1 << 20) as u32;
    while v.len() < n {
        id += 1;
        v.extend_from_slice(&[
            0x03,
            0x00,
            rng.below(256) as u8,
            rng.below(3) as u8,
            0x60,
            0x02,
        ]);
        v.extend_from_slice(&id.to_le_bytes());
        let s = v.len();
        v.resize(s + 4, 0);
        rng.fill_bytes(&mut v[s..]);
        v.extend_from_slice(&[0, 0, 0, rng.below(4) as u8]);
        // repeated-digit number "1717171717.00"
        let d1 = b'0' + rng.below(10) as u8;
        let d2 = b'0' + rng.below(10) as u8;
        v.push(if rng.chance(0.5) { b'-' } else { b'0' });
        for k in 0..9 {
            v.push(if k % 2 == 0 { d1 } else { d2 });
        }
        v.extend_from_slice(b"3.00");
        v.push(rng.below(16) as u8);
        push_uint(v, rng.range(1, 12) as u64);
        v.push(b'/');
        push_uint(v, rng.range(1, 28) as u64);
        v.push(b'/');
        push_uint(v, rng.range(1900, 2000) as u64);
        // CHAR(32) columns, space padded
        for _ in 0..2 {
            let s = v.len();
            if rng.chance(DB_RANDOM_FIELD) {
                let k = rng.range(6, 24) as usize;
                push_alnum(v, rng, k);
            } else {
                v.extend_from_slice(&pool[rng.below(pool.len())]);
            }
            v.resize(s + 32, b' ');
        }
        v.extend_from_slice(&pool[rng.below(pool.len())]);
        v.extend_from_slice(&[0, 0]);
    }
}

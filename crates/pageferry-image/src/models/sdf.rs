//! nci: SDF chemical records on a hexagonal lattice.

use crate::fmt::*;
use crate::rng::Rng;

// Calibration knobs (tuned against the real Silesia file; see the crate documentation).
/// nci: share of molecules whose coordinates are off the hexagonal lattice.
const SDF_JITTER: f64 = 0.2;

/// nci: SDF records (2-D depictions on a hexagonal lattice, so coordinates repeat a lot).
pub(crate) fn gen_sdf(v: &mut Vec<u8>, rng: &mut Rng, n: usize) {
    const EL: &[&[u8]] = &[
        b"C  ", b"C  ", b"C  ", b"C  ", b"C  ", b"C  ", b"C  ", b"O  ", b"O  ", b"N  ", b"N  ",
        b"S  ", b"Cl ", b"F  ", b"Br ", b"P  ",
    ];
    let mut id = rng.range(1000, 600000) as u64;
    let mut atoms: Vec<(i64, i64)> = Vec::with_capacity(128);
    while v.len() < n {
        id += 1 + rng.below(3) as u64;
        push_uint(v, id);
        v.extend_from_slice(b"\n  -OEChem-");
        push_uint(v, rng.range(1000000000, 1000999999) as u64);
        v.extend_from_slice(b"2D\n\n");
        let na = 4 + rng.below(30) + rng.below(20);
        // Random walk on a hexagonal lattice: x in 0.8660 steps, y in 0.5 steps.
        atoms.clear();
        let (mut x, mut y) = (rng.range(0, 6), rng.range(-4, 4) * 2);
        for _ in 0..na {
            atoms.push((x, y));
            match rng.below(6) {
                0 => y += 2,
                1 => y -= 2,
                2 | 3 => {
                    x += 1;
                    y += 1
                }
                _ => {
                    x -= 1;
                    y -= 1
                }
            }
        }
        let nb = na - 1 + rng.below(na / 4 + 1);
        push_int_w(v, na as i64, 3);
        push_int_w(v, nb as i64, 3);
        v.extend_from_slice(b"  0     0  0  0  0  0  0999 V2000\n");
        let jitter = rng.chance(SDF_JITTER);
        for &(ax, ay) in &atoms {
            let mut xs = ax * 8660 + if ax % 2 == 0 { 0 } else { 1 };
            let mut ys = ay * 5000;
            if jitter {
                xs += rng.range(-900, 900);
                ys += rng.range(-900, 900);
            }
            push_fixed(v, xs, 4, 10);
            push_fixed(v, ys, 4, 10);
            push_fixed(v, 0, 4, 10);
            v.push(b' ');
            v.extend_from_slice(rng.pickb(EL));
            v.extend_from_slice(if rng.chance(0.97) {
                b" 0  0  0  0  0  0  0  0  0  0  0  0\n"
            } else {
                b" 0  3  0  0  0  0  0  0  0  0  0  0\n"
            });
        }
        for b in 0..nb {
            let (a1, a2) = if b + 1 < na {
                (b + 1, b + 2)
            } else {
                (1 + rng.below(na), 1 + rng.below(na))
            };
            push_int_w(v, a1 as i64, 3);
            push_int_w(v, a2 as i64, 3);
            push_int_w(v, if rng.chance(0.8) { 1 } else { 2 }, 3);
            v.extend_from_slice(b"  0  0  0  0\n");
        }
        v.extend_from_slice(b"M  END\n> <NSC>\n");
        push_uint(v, id);
        v.extend_from_slice(b"\n\n");
        if rng.chance(0.6) {
            v.extend_from_slice(b"> <CAS_RN>\n");
            push_uint(v, rng.range(1000, 99999) as u64);
            v.push(b'-');
            push_uint(v, rng.range(10, 99) as u64);
            v.push(b'-');
            push_uint(v, rng.range(0, 9) as u64);
            v.extend_from_slice(b"\n\n");
        }
        v.extend_from_slice(b"> <SMILES>\n");
        for k in 0..na {
            let e = rng.pick(EL);
            v.push(e[0]);
            if e[1] != b' ' {
                v.push(e[1]);
            }
            if k % 6 == 5 && rng.chance(0.4) {
                v.extend_from_slice(b"=C");
            }
            if rng.chance(0.1) {
                v.extend_from_slice(b"(C)");
            }
        }
        v.extend_from_slice(b"\n\n$$$$\n");
    }
}

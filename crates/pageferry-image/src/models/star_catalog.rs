//! sao: binary star catalogue records.

use crate::rng::Rng;

/// sao: star catalogue records (f64 RA/Dec in radians, spectral class, magnitude, motions).
pub(crate) fn gen_star_catalog(v: &mut Vec<u8>, rng: &mut Rng, n: usize) {
    const SP: &[&[u8; 2]] = &[b"A0", b"F5", b"G0", b"K0", b"K5", b"M0", b"B9", b"G5"];
    let mut dec = -1.5 + rng.unit() * 3.0;
    let mut ra = 0.0f64;
    while v.len() < n {
        ra += rng.unit() * 0.002;
        if ra > std::f64::consts::TAU {
            ra -= std::f64::consts::TAU;
            dec += 0.01;
        }
        let d = dec + (rng.unit() - 0.5) * 0.01;
        // RA went through single precision (low mantissa bits zero), Dec did not.
        v.extend_from_slice(&((ra as f32) as f64).to_le_bytes());
        v.extend_from_slice(&d.to_le_bytes());
        v.extend_from_slice(*rng.pick(SP));
        v.extend_from_slice(&(rng.range(200, 950) as u16).to_le_bytes());
        for scale in [0.001, 0.01] {
            let pm = if rng.chance(0.4) {
                0.0
            } else {
                (rng.gauss() * scale) as f32
            };
            v.extend_from_slice(&pm.to_le_bytes());
        }
    }
}

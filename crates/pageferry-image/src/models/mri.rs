//! mr: 16-bit MRI slices.

use crate::rng::Rng;

// Calibration knobs (tuned against the real Silesia file; see the crate documentation).
/// mr: tissue noise (standard deviation, in sample units).
const MRI_NOISE: f64 = 2.0;

/// mr: 256x256 16-bit MRI slices: near-zero noisy background, smooth noisy tissue ellipse.
pub(crate) fn gen_mri(v: &mut Vec<u8>, rng: &mut Rng, n: usize) {
    const W: i64 = 256;
    while v.len() < n {
        let (rx, ry) = (rng.range(70, 115) as f64, rng.range(90, 125) as f64);
        let (f1, f2, p1, p2) = (
            rng.unit() * 0.08,
            rng.unit() * 0.08,
            rng.unit() * 6.0,
            rng.unit() * 6.0,
        );
        let base = rng.range(300, 900) as f64;
        for y in 0..W {
            for x in 0..W {
                let dx = (x - 128) as f64 / rx;
                let dy = (y - 128) as f64 / ry;
                let r2 = dx * dx + dy * dy;
                let val = if r2 < 1.0 {
                    let s = base
                        * (0.6
                            + 0.25 * (x as f64 * f1 + p1).sin()
                            + 0.25 * (y as f64 * f2 + p2).cos());
                    (s * (1.0 - r2 * 0.3) + rng.gauss() * MRI_NOISE).max(0.0)
                } else if rng.chance(0.85) {
                    0.0
                } else {
                    (rng.gauss() * 4.0).abs()
                };
                v.extend_from_slice(&(val as u16).to_le_bytes());
            }
        }
    }
}

//! x-ray: noisy 16-bit grayscale rows.

use crate::rng::Rng;

// Calibration knobs (tuned against the real Silesia file; see the crate documentation).
/// x-ray: noise of ordinary rows, and share of quiet rows.
const XRAY_NOISE: f64 = 16.0;
const XRAY_QUIET_ROWS: f64 = 0.15;

/// x-ray: 16-bit grayscale, 12 significant bits, smooth field plus strong noise.
pub(crate) fn gen_xray(v: &mut Vec<u8>, rng: &mut Rng, n: usize) {
    let mut level = 2600.0f64;
    let mut slope = 0.0f64;
    while v.len() < n {
        // Rows of 1024 samples; some rows lie in the quiet (collimated) border.
        let noise = if rng.chance(XRAY_QUIET_ROWS) {
            3.0
        } else {
            XRAY_NOISE
        };
        for _ in 0..1024 {
            slope = (slope + rng.gauss() * 0.8) * 0.98;
            level = (level + slope).clamp(800.0, 3800.0);
            let val = level + rng.gauss() * noise;
            v.extend_from_slice(&(val.clamp(0.0, 4095.0) as u16).to_le_bytes());
        }
    }
}

//! ooffice: x86 machine code with a realistic opcode/ModRM mix and repeated instruction sequences.

use crate::rng::Rng;

// Calibration knobs (tuned against the real Silesia file; see the crate documentation).
/// ooffice: share of instructions that repeat one of the block's idiom sequences.
const X86_REUSE: f64 = 0.25;
/// Longest idiom, in instructions.
const X86_IDIOM_LEN: usize = 4;

/// Per-block state of the machine-code generator: global addresses and "idioms", instructions
/// the compiler emits again and again (same registers, same stack slots).
pub(crate) struct X86 {
    pub(crate) globals: Vec<u32>,
    idioms: Vec<Vec<u8>>,
    /// Probability that an instruction is an idiom rather than a fresh one.
    reuse: f64,
}

impl X86 {
    pub(crate) fn new(rng: &mut Rng, base: u32, idioms: usize, reuse: f64) -> X86 {
        let globals: Vec<u32> = (0..96)
            .map(|_| base + (rng.below(0x10_0000) as u32 & !3))
            .collect();
        let mut x = X86 {
            globals,
            idioms: Vec::new(),
            reuse: 0.0,
        };
        // Idioms are short instruction sequences (argument set-up, calls, checks).
        x.idioms = (0..idioms)
            .map(|_| {
                let mut seq = Vec::new();
                for _ in 0..1 + rng.below(X86_IDIOM_LEN) {
                    x.insn(&mut seq, rng);
                }
                seq
            })
            .collect();
        x.reuse = reuse;
        x
    }

    pub(crate) fn imm32(&self, v: &mut Vec<u8>, rng: &mut Rng) {
        let x = if rng.chance(0.6) {
            *rng.pick(&self.globals)
        } else {
            rng.below(256) as u32
        };
        v.extend_from_slice(&x.to_le_bytes());
    }

    /// One instruction with a plausible opcode/ModRM distribution.
    pub(crate) fn insn(&self, v: &mut Vec<u8>, rng: &mut Rng) {
        const REG_W: &[u8] = &[0, 0, 0, 0, 1, 1, 2, 3, 6, 6, 7];
        let r = *rng.pick(REG_W);
        let r2 = *rng.pick(REG_W);
        let disp8 = |rng: &mut Rng| -> u8 {
            if rng.chance(0.6) {
                (rng.below(16) * 4) as u8
            } else {
                (-(rng.range(1, 16) * 4)) as u8
            }
        };
        if !self.idioms.is_empty() && rng.chance(self.reuse) {
            // Reuse an idiom, Zipf-like: low indices much more often.
            let u = rng.unit();
            v.extend_from_slice(&self.idioms[(u * u * self.idioms.len() as f64) as usize]);
            return;
        }
        match rng.below(32) {
            0..=3 => v.extend_from_slice(&[0x8B, 0x45 | r << 3, disp8(rng)]),
            4..=5 => v.extend_from_slice(&[0x89, 0x45 | r << 3, disp8(rng)]),
            6 => v.extend_from_slice(&[0x8B, 0x44 | r << 3, 0x24, disp8(rng)]),
            7..=8 => v.extend_from_slice(&[0x8B, 0xC0 | r << 3 | r2]),
            9..=10 => v.extend_from_slice(&[0x8B, 0x40 | r << 3 | r2, (rng.below(8) * 4) as u8]),
            11..=12 => v.push(0x50 | r),
            13 => v.extend_from_slice(&[0x6A, rng.below(16) as u8]),
            14 => {
                v.push(0x68);
                self.imm32(v, rng);
            }
            15..=17 => {
                v.push(0xE8);
                let rel = rng.range(-0x30_0000, 0x30_0000) as i32;
                v.extend_from_slice(&rel.to_le_bytes());
                if rng.chance(0.5) {
                    v.extend_from_slice(&[0x83, 0xC4, (rng.range(1, 4) * 4) as u8]);
                }
            }
            18 => {
                v.extend_from_slice(&[0xFF, 0x15]);
                self.imm32(v, rng);
            }
            19 => v.extend_from_slice(&[0xFF, 0x50 | r2, (rng.below(24) * 4) as u8]),
            20 => v.extend_from_slice(&[0x8D, 0x45 | r << 3, disp8(rng)]),
            21 => v.extend_from_slice(&[0x85, 0xC0 | r << 3 | r]),
            22 => v.extend_from_slice(&[0x83, 0xF8 | r, rng.below(16) as u8]),
            23 => v.extend_from_slice(&[0x3B, 0xC0 | r << 3 | r2]),
            24..=25 => v.extend_from_slice(&[0x74 + rng.below(2) as u8, rng.range(2, 60) as u8]),
            26 => v.extend_from_slice(&[0xEB, rng.range(2, 100) as u8]),
            27 => {
                v.extend_from_slice(&[0x0F, 0x84 + rng.below(2) as u8]);
                v.extend_from_slice(&(rng.range(0x80, 0x800) as u32).to_le_bytes());
            }
            28 => v.extend_from_slice(&[0x33, 0xC0 | r << 3 | r]),
            29 => {
                v.extend_from_slice(&[0xC7, 0x45, disp8(rng)]);
                let x = if rng.chance(0.7) {
                    rng.below(4) as u32
                } else {
                    *rng.pick(&self.globals)
                };
                v.extend_from_slice(&x.to_le_bytes());
            }
            30 => {
                v.push(0xA1);
                self.imm32(v, rng);
            }
            _ => {
                v.push(0xB8 | r);
                self.imm32(v, rng);
            }
        }
    }

    /// One function: prologue, body, epilogue, alignment padding.
    pub(crate) fn function(&self, v: &mut Vec<u8>, rng: &mut Rng) {
        if rng.chance(0.3) {
            v.extend_from_slice(&[0x6A, 0xFF, 0x68]);
            self.imm32(v, rng);
            v.extend_from_slice(&[0x64, 0xA1, 0, 0, 0, 0, 0x50, 0x64, 0x89, 0x25, 0, 0, 0, 0]);
        } else {
            v.extend_from_slice(&[0x55, 0x8B, 0xEC]);
        }
        if rng.chance(0.5) {
            v.extend_from_slice(&[0x83, 0xEC, (rng.range(1, 32) * 4) as u8]);
        }
        for r in [0x53u8, 0x56, 0x57] {
            if rng.chance(0.5) {
                v.push(r);
            }
        }
        for _ in 0..rng.range(4, 80) {
            self.insn(v, rng);
        }
        for r in [0x5Fu8, 0x5E, 0x5B] {
            if rng.chance(0.5) {
                v.push(r);
            }
        }
        v.extend_from_slice(&[0x8B, 0xE5, 0x5D]);
        if rng.chance(0.7) {
            v.push(0xC3);
        } else {
            v.extend_from_slice(&[0xC2, (rng.range(1, 4) * 4) as u8, 0]);
        }
        let pad = if rng.chance(0.5) { 0xCC } else { 0x90 };
        while v.len() & 15 != 0 {
            v.push(pad);
        }
    }
}

/// ooffice: x86 functions.
pub(crate) fn gen_x86(v: &mut Vec<u8>, rng: &mut Rng, n: usize) {
    let x86 = X86::new(rng, 0x1E40_0000, 512, X86_REUSE);
    while v.len() < n {
        x86.function(v, rng);
    }
}

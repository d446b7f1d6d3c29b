//! mozilla: a tar of executables (code, symbol names, symbol and relocation tables, data, padding, packed resources).

use crate::fmt::*;
use crate::rng::Rng;
use crate::text::*;
use crate::PAGE;

use super::x86::X86;

// Calibration knobs (tuned against the real Silesia file; see the crate documentation).
/// mozilla: idiom reuse and idiom count of the code runs (code is only ~40% of those blocks).
const EXE_X86_REUSE: f64 = 0.85;
const EXE_X86_IDIOMS: usize = 192;

/// mozilla: a tar of executables: code, symbol names, tables, padding and packed resources.
pub(crate) fn gen_executables(v: &mut Vec<u8>, rng: &mut Rng, vocabs: &Vocabs, n: usize) {
    let x86 = X86::new(rng, 0x0804_0000, EXE_X86_IDIOMS, EXE_X86_REUSE);
    let globals = x86.globals.clone();
    while v.len() < n {
        let end = v.len() + PAGE * rng.range(4, 32) as usize;
        let kind = rng.below(100);
        while v.len() < end {
            match kind {
                0..=39 => x86.function(v, rng),
                40..=54 => {
                    // symbol / string table
                    if rng.chance(0.6) {
                        v.extend_from_slice(b"_ZN");
                        for _ in 0..1 + rng.below(3) {
                            let w = vocabs.idents.sample(rng);
                            push_uint(v, w.len() as u64);
                            v.extend_from_slice(w);
                        }
                        v.extend_from_slice(rng.pickb(&[
                            &b"Ev"[..],
                            b"EPv",
                            b"ERKS0_",
                            b"Ejj",
                            b"EPKc",
                        ]));
                    } else {
                        v.extend_from_slice(vocabs.idents.sample(rng));
                    }
                    v.push(0);
                }
                55..=58 => {
                    // ELF-like symbol table entries
                    let mut addr = *rng.pick(&globals);
                    let mut name_off = rng.below(0x4000) as u32;
                    for _ in 0..64 {
                        name_off += rng.range(6, 30) as u32;
                        addr += rng.range(1, 16) as u32 * 16;
                        v.extend_from_slice(&name_off.to_le_bytes());
                        v.extend_from_slice(&addr.to_le_bytes());
                        v.extend_from_slice(&(rng.below(64) as u32 * 4).to_le_bytes());
                        v.extend_from_slice(&[0x12, 0, 0x0B + rng.below(2) as u8, 0]);
                    }
                }
                59..=69 => {
                    // relocations: mostly consecutive slots of one type
                    let mut addr = *rng.pick(&globals);
                    let mut sym = rng.below(2000) as u32;
                    for _ in 0..128 {
                        addr += if rng.chance(0.8) {
                            4
                        } else {
                            rng.range(2, 40) as u32 * 4
                        };
                        if rng.chance(0.1) {
                            sym = rng.below(2000) as u32;
                        }
                        v.extend_from_slice(&addr.to_le_bytes());
                        v.extend_from_slice(&(sym << 8 | 7).to_le_bytes());
                    }
                }
                70..=71 => {
                    // packed (compressed) resources
                    let s = v.len();
                    v.resize(s + PAGE, 0);
                    rng.fill_bytes(&mut v[s..]);
                }
                72..=75 => {
                    // zero padding: the rest of this page and 1-4 whole pages
                    let l = v.len();
                    v.resize((l / PAGE + 1 + rng.range(1, 4) as usize) * PAGE, 0);
                    break;
                }
                76..=88 => {
                    // embedded English text (licences, help)
                    let mut col = 0;
                    push_sentence(v, rng, &vocabs.english, &mut col, 72);
                    v.push(b'\n');
                }
                _ => {
                    // initialised data: vtables and small-integer arrays
                    for _ in 0..64 {
                        let x = if rng.chance(0.5) {
                            *rng.pick(&globals)
                        } else {
                            rng.below(16) as u32
                        };
                        v.extend_from_slice(&x.to_le_bytes());
                    }
                }
            }
        }
    }
}

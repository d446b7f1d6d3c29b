//! samba: a tar of C sources (headers, boilerplate, idioms, per-file identifiers).

use crate::fmt::*;
use crate::rng::Rng;
use crate::text::*;

// Calibration knobs (tuned against the real Silesia file; see the crate documentation).
/// samba: share of statements that are one of the code base's idioms, and share of
/// identifiers taken from the file's own favourites.
const C_IDIOMS: f64 = 0.45;
const C_LOCALS: f64 = 0.55;

/// samba: tar archive of C sources.
pub(crate) fn gen_c_tar(v: &mut Vec<u8>, rng: &mut Rng, vocabs: &Vocabs, n: usize) {
    // A boilerplate header shared by the files of this block (like a licence comment).
    let mut boiler = Vec::new();
    boiler.extend_from_slice(b"/* \n   Unix SMB/CIFS implementation.\n");
    for _ in 0..6 {
        boiler.extend_from_slice(b"   ");
        let mut col = 3;
        push_sentence(&mut boiler, rng, &vocabs.english, &mut col, 75);
        boiler.push(b'\n');
    }
    boiler.extend_from_slice(b"*/\n\n#include \"includes.h\"\n");
    // Statements this code base repeats everywhere (error checks, frees, debug lines).
    let idioms: Vec<Vec<u8>> = (0..300)
        .map(|_| {
            let mut st = Vec::new();
            gen_c_stmts(
                &mut st,
                rng,
                vocabs,
                &CIds {
                    global: &vocabs.idents,
                    locals: &[],
                },
                &[],
                4,
                1,
            );
            st.drain(..4);
            st
        })
        .collect();
    let mut file = Vec::with_capacity(64 * 1024);
    while v.len() < n {
        file.clear();
        file.extend_from_slice(&boiler);
        let len = 2000 + rng.below(30000);
        gen_c_file(&mut file, rng, vocabs, &idioms, len);
        // tar header
        let start = v.len();
        v.resize(start + 512, 0);
        let mut name = b"samba/source/".to_vec();
        name.extend_from_slice(vocabs.idents.sample(rng));
        name.push(b'/');
        name.extend_from_slice(vocabs.idents.sample(rng));
        name.extend_from_slice(b".c");
        name.truncate(99);
        v[start..start + name.len()].copy_from_slice(&name);
        let mut oct = |at: usize, width: usize, val: u64| {
            let s = format!("{:0w$o}", val, w = width - 1);
            v[start + at..start + at + width - 1].copy_from_slice(s.as_bytes());
        };
        oct(100, 8, 0o644);
        oct(108, 8, 1000);
        oct(116, 8, 1000);
        oct(124, 12, file.len() as u64);
        oct(136, 12, 1_050_000_000 + rng.below(50_000_000) as u64);
        v[start + 156] = b'0';
        v[start + 257..start + 265].copy_from_slice(b"ustar  \0");
        v[start + 265..start + 268].copy_from_slice(b"jra");
        v[start + 297..start + 302].copy_from_slice(b"samba");
        v[start + 148..start + 156].copy_from_slice(b"        ");
        let sum: u64 = v[start..start + 512].iter().map(|&b| b as u64).sum();
        let s = format!("{:06o}\0 ", sum);
        v[start + 148..start + 156].copy_from_slice(s.as_bytes());
        v.extend_from_slice(&file);
        let pad = (512 - v.len() % 512) % 512;
        v.resize(v.len() + pad, 0);
    }
}

pub(crate) fn push_indent(v: &mut Vec<u8>, depth: usize) {
    for _ in 0..depth {
        v.push(b'\t');
    }
}

/// Identifier source for C code: the code base's vocabulary plus the current file's favourites.
pub(crate) struct CIds<'a> {
    global: &'a Words,
    locals: &'a [Vec<u8>],
}

impl CIds<'_> {
    pub(crate) fn sample(&self, rng: &mut Rng) -> &[u8] {
        if !self.locals.is_empty() && rng.chance(C_LOCALS) {
            &self.locals[rng.below(self.locals.len())]
        } else {
            self.global.sample(rng)
        }
    }
}

pub(crate) fn gen_c_file(
    v: &mut Vec<u8>,
    rng: &mut Rng,
    vocabs: &Vocabs,
    idioms: &[Vec<u8>],
    len: usize,
) {
    // Names this file uses over and over (its locals, its struct members, its helpers).
    let locals: Vec<Vec<u8>> = (0..16)
        .map(|_| vocabs.idents.sample(rng).to_vec())
        .collect();
    let ids = &CIds {
        global: &vocabs.idents,
        locals: &locals,
    };
    const TYPES: &[&[u8]] = &[
        b"int",
        b"BOOL",
        b"NTSTATUS",
        b"uint32",
        b"char *",
        b"const char *",
        b"void",
        b"struct smb_request *",
        b"size_t",
        b"TALLOC_CTX *",
    ];
    for _ in 0..rng.below(5) {
        v.extend_from_slice(b"#include \"");
        v.extend_from_slice(ids.sample(rng));
        v.extend_from_slice(b".h\"\n");
    }
    v.push(b'\n');
    while v.len() < len {
        if rng.chance(0.5) {
            v.extend_from_slice(
                b"/****************************************************************************\n ",
            );
            let mut col = 1;
            push_sentence(v, rng, &vocabs.english, &mut col, 76);
            v.extend_from_slice(b"\n****************************************************************************/\n\n");
        }
        if rng.chance(0.6) {
            v.extend_from_slice(b"static ");
        }
        v.extend_from_slice(rng.pickb(TYPES));
        v.push(b' ');
        v.extend_from_slice(ids.sample(rng));
        v.push(b'(');
        for k in 0..1 + rng.below(4) {
            if k > 0 {
                v.extend_from_slice(b", ");
            }
            v.extend_from_slice(rng.pickb(TYPES));
            v.push(b' ');
            v.extend_from_slice(ids.sample(rng));
        }
        v.extend_from_slice(b")\n{\n");
        for _ in 0..rng.below(5) {
            v.push(b'\t');
            v.extend_from_slice(rng.pickb(TYPES));
            v.push(b' ');
            v.extend_from_slice(ids.sample(rng));
            if rng.chance(0.3) {
                v.extend_from_slice(b" = ");
                v.extend_from_slice(if rng.chance(0.5) { b"NULL" } else { b"0" });
            }
            v.extend_from_slice(b";\n");
        }
        v.push(b'\n');
        let count = 3 + rng.below(20);
        gen_c_stmts(v, rng, vocabs, ids, idioms, 1, count);
        v.extend_from_slice(b"\treturn ");
        v.extend_from_slice(ids.sample(rng));
        v.extend_from_slice(b";\n}\n\n");
    }
}

pub(crate) fn push_c_call(v: &mut Vec<u8>, rng: &mut Rng, ids: &CIds) {
    v.extend_from_slice(ids.sample(rng));
    v.push(b'(');
    for k in 0..rng.below(4) {
        if k > 0 {
            v.extend_from_slice(b", ");
        }
        if rng.chance(0.2) {
            v.push(b'&');
        }
        v.extend_from_slice(ids.sample(rng));
        if rng.chance(0.15) {
            v.extend_from_slice(b"->");
            v.extend_from_slice(ids.sample(rng));
        }
    }
    v.push(b')');
}

pub(crate) fn gen_c_stmts(
    v: &mut Vec<u8>,
    rng: &mut Rng,
    vocabs: &Vocabs,
    ids: &CIds,
    idioms: &[Vec<u8>],
    depth: usize,
    count: usize,
) {
    for _ in 0..count {
        push_indent(v, depth);
        if !idioms.is_empty() && rng.chance(C_IDIOMS) {
            let u = rng.unit();
            v.extend_from_slice(&idioms[(u * u * idioms.len() as f64) as usize]);
            continue;
        }
        match rng.below(12) {
            0 | 1 if depth < 4 => {
                v.extend_from_slice(b"if (");
                if rng.chance(0.3) {
                    v.push(b'!');
                }
                push_c_call(v, rng, ids);
                if rng.chance(0.4) {
                    v.extend_from_slice(b" == NULL");
                }
                v.extend_from_slice(b") {\n");
                let count = 1 + rng.below(4);
                gen_c_stmts(v, rng, vocabs, ids, idioms, depth + 1, count);
                push_indent(v, depth);
                v.extend_from_slice(b"}\n");
            }
            2 if depth < 4 => {
                v.extend_from_slice(b"for (i = 0; i < ");
                v.extend_from_slice(ids.sample(rng));
                v.extend_from_slice(b"; i++) {\n");
                let count = 1 + rng.below(4);
                gen_c_stmts(v, rng, vocabs, ids, idioms, depth + 1, count);
                push_indent(v, depth);
                v.extend_from_slice(b"}\n");
            }
            3 => {
                v.extend_from_slice(b"DEBUG(");
                push_uint(v, rng.below(11) as u64);
                v.extend_from_slice(b",(\"");
                v.extend_from_slice(ids.sample(rng));
                v.extend_from_slice(b": ");
                let mut col = 0;
                let mut s = Vec::new();
                push_sentence(&mut s, rng, &vocabs.english, &mut col, 0);
                s.truncate(40);
                v.extend_from_slice(&s);
                v.extend_from_slice(b" %s\\n\", ");
                v.extend_from_slice(ids.sample(rng));
                v.extend_from_slice(b"));\n");
            }
            4 => {
                v.extend_from_slice(b"/* ");
                let mut col = 0;
                push_sentence(v, rng, &vocabs.english, &mut col, 0);
                v.extend_from_slice(b" */\n");
            }
            5 => {
                v.extend_from_slice(b"return ");
                v.extend_from_slice(ids.sample(rng));
                v.extend_from_slice(b";\n");
            }
            _ => {
                v.extend_from_slice(ids.sample(rng));
                if rng.chance(0.2) {
                    v.extend_from_slice(b"->");
                    v.extend_from_slice(ids.sample(rng));
                }
                v.extend_from_slice(b" = ");
                push_c_call(v, rng, ids);
                v.extend_from_slice(b";\n");
            }
        }
    }
}

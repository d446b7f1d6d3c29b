//! A very small x86-64 encoder, just large enough for the guest program in `guest.rs`.
//!
//! Why it exists: the guest is a few dozen instructions of hand-written machine code, and the
//! build must not depend on an external assembler. Writing the bytes through named methods
//! (with labels and rel32 fix-ups) keeps the program readable and the encodings in one place.
//! Only 64-bit register forms and `[base + disp32]` memory operands are supported.

/// General-purpose registers in encoding order.
#[allow(dead_code)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Reg {
    Rax = 0,
    Rcx,
    Rdx,
    Rbx,
    Rsp,
    Rbp,
    Rsi,
    Rdi,
    R8,
    R9,
    R10,
    R11,
    R12,
    R13,
    R14,
    R15,
}

impl Reg {
    fn low(self) -> u8 {
        self as u8 & 7
    }
    fn high(self) -> u8 {
        (self as u8 >> 3) & 1
    }
}

/// Condition codes for `jcc` (the low nibble of the `0F 8x` opcode).
#[allow(dead_code)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Cond {
    /// unsigned <
    B = 0x2,
    /// unsigned >=
    Ae = 0x3,
    E = 0x4,
    Ne = 0x5,
    /// unsigned <=
    Be = 0x6,
    /// unsigned >
    A = 0x7,
    /// signed <
    L = 0xc,
    /// signed >=
    Ge = 0xd,
    /// signed <=
    Le = 0xe,
    /// signed >
    G = 0xf,
}

/// A jump target; bind it with [`Asm::bind`] before [`Asm::finish`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct Label(usize);

#[derive(Default)]
pub(crate) struct Asm {
    code: Vec<u8>,
    labels: Vec<Option<usize>>,
    /// (offset of a rel32 field, its target)
    fixups: Vec<(usize, Label)>,
}

impl Asm {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn label(&mut self) -> Label {
        self.labels.push(None);
        Label(self.labels.len() - 1)
    }

    pub fn bind(&mut self, l: Label) {
        assert!(self.labels[l.0].is_none(), "label bound twice");
        self.labels[l.0] = Some(self.code.len());
    }

    /// Resolve the jumps and return the bytes.
    pub fn finish(mut self) -> Vec<u8> {
        for &(at, l) in &self.fixups {
            let target = self.labels[l.0].expect("unbound label") as i64;
            let rel = target - (at as i64 + 4);
            self.code[at..at + 4].copy_from_slice(&(rel as i32).to_le_bytes());
        }
        self.code
    }

    fn rex(&mut self, w: bool, reg: u8, rm: u8) {
        let b = 0x40 | (u8::from(w) << 3) | (reg << 2) | rm;
        if b != 0x40 {
            self.code.push(b);
        }
    }

    /// `op r/m64, r64` with both operands registers (mod = 11).
    fn rr(&mut self, op: u8, rm: Reg, reg: Reg) {
        self.rex(true, reg.high(), rm.high());
        self.code.push(op);
        self.code.push(0xc0 | (reg.low() << 3) | rm.low());
    }

    /// `op` with a `[base + disp32]` operand (mod = 10) and `reg` in the ModRM reg field.
    fn mem(&mut self, op: u8, reg: Reg, base: Reg, disp: i32) {
        assert!(base.low() != Reg::Rsp.low(), "rsp/r12 as a base needs a SIB byte (unsupported)");
        self.rex(true, reg.high(), base.high());
        self.code.push(op);
        self.code.push(0x80 | (reg.low() << 3) | base.low());
        self.code.extend_from_slice(&disp.to_le_bytes());
    }

    /// `op /ext r64` (group opcodes: inc, dec, neg, shl).
    fn group(&mut self, op: u8, ext: u8, r: Reg) {
        self.rex(true, 0, r.high());
        self.code.push(op);
        self.code.push(0xc0 | (ext << 3) | r.low());
    }

    /// `mov r32, imm32` — zero-extends into the full 64-bit register.
    pub fn mov_imm32(&mut self, dst: Reg, imm: u32) {
        self.rex(false, 0, dst.high());
        self.code.push(0xb8 + dst.low());
        self.code.extend_from_slice(&imm.to_le_bytes());
    }

    /// `mov dst, src`
    pub fn mov(&mut self, dst: Reg, src: Reg) {
        self.rr(0x89, dst, src);
    }

    /// `mov dst, qword [base + disp]`
    pub fn load(&mut self, dst: Reg, base: Reg, disp: i32) {
        self.mem(0x8b, dst, base, disp);
    }

    /// `mov qword [base + disp], src`
    pub fn store(&mut self, base: Reg, disp: i32, src: Reg) {
        self.mem(0x89, src, base, disp);
    }

    /// `add dst, src`
    pub fn add(&mut self, dst: Reg, src: Reg) {
        self.rr(0x01, dst, src);
    }

    /// `sub dst, src`
    pub fn sub(&mut self, dst: Reg, src: Reg) {
        self.rr(0x29, dst, src);
    }

    /// `or dst, src`
    pub fn or(&mut self, dst: Reg, src: Reg) {
        self.rr(0x09, dst, src);
    }

    /// `cmp a, b` (flags of a - b)
    pub fn cmp(&mut self, a: Reg, b: Reg) {
        self.rr(0x39, a, b);
    }

    /// `test a, b`
    pub fn test(&mut self, a: Reg, b: Reg) {
        self.rr(0x85, a, b);
    }

    /// `xor r32, r32` — the short way to zero a register.
    pub fn zero(&mut self, r: Reg) {
        self.rex(false, r.high(), r.high());
        self.code.push(0x31);
        self.code.push(0xc0 | (r.low() << 3) | r.low());
    }

    pub fn inc(&mut self, r: Reg) {
        self.group(0xff, 0, r);
    }

    pub fn dec(&mut self, r: Reg) {
        self.group(0xff, 1, r);
    }

    pub fn neg(&mut self, r: Reg) {
        self.group(0xf7, 3, r);
    }

    /// `shl r, imm8`
    pub fn shl(&mut self, r: Reg, imm: u8) {
        self.group(0xc1, 4, r);
        self.code.push(imm);
    }

    pub fn rdtsc(&mut self) {
        self.code.extend_from_slice(&[0x0f, 0x31]);
    }

    /// `jmp rel32`
    pub fn jmp(&mut self, l: Label) {
        self.code.push(0xe9);
        self.fixups.push((self.code.len(), l));
        self.code.extend_from_slice(&[0; 4]);
    }

    /// `jcc rel32`
    pub fn jcc(&mut self, c: Cond, l: Label) {
        self.code.extend_from_slice(&[0x0f, 0x80 | c as u8]);
        self.fixups.push((self.code.len(), l));
        self.code.extend_from_slice(&[0; 4]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Reference encodings checked against a disassembler once, kept here so that a change to
    // the encoder cannot silently change them.
    #[test]
    fn encodings() {
        type Emit = Box<dyn Fn(&mut Asm)>;
        let cases: Vec<(Emit, &[u8])> = vec![
            (Box::new(|a| a.mov_imm32(Reg::Rsi, 0x11000)), &[0xbe, 0x00, 0x10, 0x01, 0x00]),
            (Box::new(|a| a.mov_imm32(Reg::R9, 1)), &[0x41, 0xb9, 0x01, 0, 0, 0]),
            (Box::new(|a| a.mov(Reg::Rdx, Reg::Rax)), &[0x48, 0x89, 0xc2]),
            (Box::new(|a| a.mov(Reg::R14, Reg::Rax)), &[0x49, 0x89, 0xc6]),
            (Box::new(|a| a.load(Reg::R8, Reg::Rdi, 0)), &[0x4c, 0x8b, 0x87, 0, 0, 0, 0]),
            (Box::new(|a| a.load(Reg::Rax, Reg::R13, 8)), &[0x49, 0x8b, 0x85, 8, 0, 0, 0]),
            (Box::new(|a| a.store(Reg::Rax, 8, Reg::Rax)), &[0x48, 0x89, 0x80, 8, 0, 0, 0]),
            (Box::new(|a| a.store(Reg::Rdi, 0, Reg::R8)), &[0x4c, 0x89, 0x87, 0, 0, 0, 0]),
            (Box::new(|a| a.add(Reg::Rax, Reg::R10)), &[0x4c, 0x01, 0xd0]),
            (Box::new(|a| a.sub(Reg::Rdx, Reg::Rax)), &[0x48, 0x29, 0xc2]),
            (Box::new(|a| a.or(Reg::Rax, Reg::Rdx)), &[0x48, 0x09, 0xd0]),
            (Box::new(|a| a.cmp(Reg::R9, Reg::R11)), &[0x4d, 0x39, 0xd9]),
            (Box::new(|a| a.test(Reg::R13, Reg::R13)), &[0x4d, 0x85, 0xed]),
            (Box::new(|a| a.zero(Reg::R9)), &[0x45, 0x31, 0xc9]),
            (Box::new(|a| a.zero(Reg::Rax)), &[0x31, 0xc0]),
            (Box::new(|a| a.inc(Reg::R8)), &[0x49, 0xff, 0xc0]),
            (Box::new(|a| a.dec(Reg::Rcx)), &[0x48, 0xff, 0xc9]),
            (Box::new(|a| a.neg(Reg::Rdx)), &[0x48, 0xf7, 0xda]),
            (Box::new(|a| a.shl(Reg::Rdx, 32)), &[0x48, 0xc1, 0xe2, 0x20]),
            (Box::new(|a| a.rdtsc()), &[0x0f, 0x31]),
        ];
        for (i, (emit, want)) in cases.iter().enumerate() {
            let mut a = Asm::new();
            emit(&mut a);
            assert_eq!(a.finish(), *want, "case {i}");
        }
    }

    #[test]
    fn jumps_resolve() {
        let mut a = Asm::new();
        let top = a.label();
        let end = a.label();
        a.bind(top);
        a.jcc(Cond::E, end); // 6 bytes
        a.jmp(top); // 5 bytes
        a.bind(end);
        let code = a.finish();
        assert_eq!(code, [0x0f, 0x84, 5, 0, 0, 0, 0xe9, 0xf5, 0xff, 0xff, 0xff]);
    }
}

//! The guest: memory layout, the program it runs, and the page tables and segments the host
//! builds so that it starts directly in 64-bit mode at CPL 3.
//!
//! Why it is shaped like this: on this host's KVM (PVM) code at CPL 3 runs natively while CPL 0
//! code is emulated slowly, and every exit to the VMM is expensive. So there is no guest kernel
//! and no boot: the host writes page tables, a GDT and a TSS into guest memory, sets the
//! segment registers through `KVM_SET_SREGS` and points RIP at a user-mode loop that never
//! exits. The guest reads its parameters from a read-only *config* page and reports progress in
//! a *status* page; the host reads both directly from guest memory.
//!
//! Two modes (chosen through the config page):
//! - **writer**: every tick, write `pages_per_tick` pages of the working set in a cycle; each
//!   written page gets the new counter value at offset 0 and its own guest-physical address at
//!   offset 8. Throttled by the TSC (`tick_cycles`) or unthrottled.
//! - **on demand**: write nothing except the one page the host asks for (used to test a dirty
//!   tracker for exactness: the acknowledgement is the write itself, so no other page changes).
//!
//! Dirty-log exactness: every page-table entry has its accessed/dirty bits preset (the CPU never
//! writes page tables), and the code, config, descriptor-table and page-table pages are mapped
//! read-only, so KVM's dirty log contains exactly the pages the program stores to.

use crate::asm::{Asm, Cond, Reg};
use kvm_bindings::{kvm_dtable, kvm_segment, kvm_sregs};
use pageferry::memory::PAGE_SIZE;

const P: u64 = PAGE_SIZE as u64;

/// Guest-physical address of the program (one read-only page).
pub const CODE_GPA: u64 = 0x10000;
/// The host-written parameter page (read-only to the guest).
pub const CONFIG_GPA: u64 = 0x11000;
/// The guest-written progress page.
pub const STATUS_GPA: u64 = 0x12000;
const GDT_GPA: u64 = 0x13000;
const TSS_GPA: u64 = 0x14000;
const PML4_GPA: u64 = 0x15000;
const PDPT_GPA: u64 = 0x16000;
/// 4 KiB page table for the first 2 MiB (so that single pages can be read-only).
const PT0_GPA: u64 = 0x17000;
/// One page directory per GiB of guest memory, from here.
const PD_GPA: u64 = 0x18000;
/// Most page directories (GiB of guest memory) the layout has room for.
const MAX_PDS: u64 = 64;
/// First page of the system area (code, config, status, tables).
pub const SYSTEM_START: u64 = CODE_GPA;
/// End of the system area (exclusive).
pub const SYSTEM_END: u64 = PD_GPA + MAX_PDS * P;
/// Where the working set starts.
pub const WORKING_SET_GPA: u64 = 0x20_0000;
/// Smallest guest memory the layout supports.
pub const MIN_MEM_BYTES: u64 = 4 << 20;
/// Largest guest memory the layout supports.
pub const MAX_MEM_BYTES: u64 = MAX_PDS << 30;

/// Byte offsets of the fields (u64 each) in the config page.
pub mod config {
    /// `MAGIC` once the host has written the page.
    pub const MAGIC: usize = 0x00;
    /// 0 = writer, 1 = on demand.
    pub const MODE: usize = 0x08;
    /// Guest-physical address of the first working-set page.
    pub const WS_BASE: usize = 0x10;
    /// Pages in the working set (>= 1).
    pub const WS_PAGES: usize = 0x18;
    /// Pages written per tick (>= 1).
    pub const PAGES_PER_TICK: usize = 0x20;
    /// TSC cycles per tick; 0 = unthrottled.
    pub const TICK_CYCLES: usize = 0x28;
    /// TSC cycles a throttled guest may fall behind (its vCPU was not scheduled) and still
    /// catch up at full speed; further behind (paused, migrated) it starts a new cadence.
    pub const CATCH_UP_CYCLES: usize = 0x40;
    /// Bumped by the host each time it resumes the guest after a pause; the guest then starts
    /// a new tick cadence.
    pub const EPOCH: usize = 0x48;
    /// On-demand mode: a new value asks the guest to store it at `CMD_ADDR`.
    pub const CMD_SEQ: usize = 0x30;
    /// On-demand mode: where to store `CMD_SEQ`.
    pub const CMD_ADDR: usize = 0x38;
    pub const MAGIC_VALUE: u64 = 0x3130_7966_6567_6170; // "pagefy01"
}

/// Byte offsets of the fields (u64 each) in the status page.
pub mod status {
    /// Pages written so far; also the stamp of the most recently written page.
    pub const COUNTER: usize = 0x00;
    /// Ticks completed.
    pub const TICKS: usize = 0x08;
    /// The guest's TSC as last read while waiting for a tick (throttled writer only).
    pub const TSC: usize = 0x10;
}

pub const MODE_WRITER: u64 = 0;
pub const MODE_ON_DEMAND: u64 = 1;

/// The guest program. Register use: rsi = config page, rdi = status page, r8 = counter,
/// r9 = cursor (working-set page index), r10 = working-set base, r11 = working-set pages,
/// r12 = epoch seen, r13 = tick length, r14 = next tick deadline (TSC), r15 = ticks,
/// rbx = last command seq,
/// rcx = pages left in this tick; rax/rdx scratch. No stack, no calls, no exits. Spin loops
/// have no PAUSE: on this nested host it made the vCPU lose its CPU noticeably more often.
pub(crate) fn program() -> Vec<u8> {
    use Reg::*;
    let mut a = Asm::new();
    let outer = a.label();
    let inner = a.label();
    let no_wrap = a.label();
    let wait = a.label();
    let due = a.label();
    let resync = a.label();
    let new_epoch = a.label();
    let on_demand = a.label();
    let idle = a.label();

    a.mov_imm32(Rsi, CONFIG_GPA as u32);
    a.mov_imm32(Rdi, STATUS_GPA as u32);
    a.load(R8, Rdi, status::COUNTER as i32);
    a.load(R15, Rdi, status::TICKS as i32);
    a.zero(R9);
    a.rdtsc();
    a.shl(Rdx, 32);
    a.or(Rax, Rdx);
    a.mov(R14, Rax);
    // CMD_SEQ is 0 until the host's first request: start from 0, not from the page (a
    // request made before this instruction would be taken as already done).
    a.zero(Rbx);
    a.load(R12, Rsi, config::EPOCH as i32);

    a.bind(outer);
    a.load(Rax, Rsi, config::MODE as i32);
    a.test(Rax, Rax);
    a.jcc(Cond::Ne, on_demand);
    a.load(R10, Rsi, config::WS_BASE as i32);
    a.load(R11, Rsi, config::WS_PAGES as i32);
    a.load(Rcx, Rsi, config::PAGES_PER_TICK as i32);

    // One page: counter += 1; page[0] = counter; page[8] = page address; status = counter.
    a.bind(inner);
    a.inc(R8);
    a.mov(Rax, R9);
    a.shl(Rax, 12);
    a.add(Rax, R10);
    a.store(Rax, 0, R8);
    a.store(Rax, 8, Rax);
    a.store(Rdi, status::COUNTER as i32, R8);
    a.inc(R9);
    a.cmp(R9, R11);
    a.jcc(Cond::B, no_wrap);
    a.zero(R9);
    a.bind(no_wrap);
    a.dec(Rcx);
    a.jcc(Cond::Ne, inner);

    a.inc(R15);
    a.store(Rdi, status::TICKS as i32, R15);
    a.load(R13, Rsi, config::TICK_CYCLES as i32);
    a.test(R13, R13);
    a.jcc(Cond::E, outer);
    // A new epoch means the VM was paused (and maybe moved): start a new cadence instead of
    // catching up on the time it was stopped.
    a.load(Rax, Rsi, config::EPOCH as i32);
    a.cmp(Rax, R12);
    a.jcc(Cond::Ne, new_epoch);
    a.add(R14, R13);

    // Wait for the deadline. A deadline more than one tick ahead means the TSC went backwards
    // (restored elsewhere): start a new cadence. Being more than one tick late does the same.
    a.bind(wait);
    a.rdtsc();
    a.shl(Rdx, 32);
    a.or(Rax, Rdx);
    a.store(Rdi, status::TSC as i32, Rax);
    a.mov(Rdx, R14);
    a.sub(Rdx, Rax); // remaining = deadline - now
    a.jcc(Cond::Le, due);
    a.cmp(Rdx, R13);
    a.jcc(Cond::A, resync);
    a.jmp(wait);
    a.bind(due);
    a.neg(Rdx); // lateness
    a.load(Rcx, Rsi, config::CATCH_UP_CYCLES as i32);
    a.cmp(Rdx, Rcx);
    a.jcc(Cond::Be, outer);
    a.bind(resync);
    a.mov(R14, Rax);
    a.jmp(outer);
    a.bind(new_epoch);
    a.mov(R12, Rax);
    a.rdtsc();
    a.shl(Rdx, 32);
    a.or(Rax, Rdx);
    a.jmp(resync);

    // On demand: when CMD_SEQ changes, store it at CMD_ADDR (the host polls that page).
    a.bind(on_demand);
    a.load(Rax, Rsi, config::CMD_SEQ as i32);
    a.cmp(Rax, Rbx);
    a.jcc(Cond::E, idle);
    a.mov(Rbx, Rax);
    a.load(Rdx, Rsi, config::CMD_ADDR as i32);
    a.store(Rdx, 0, Rax);
    a.jmp(outer);
    a.bind(idle);
    a.jmp(outer);

    a.finish()
}

// Page-table entry bits.
const PTE_P: u64 = 1 << 0;
const PTE_RW: u64 = 1 << 1;
const PTE_US: u64 = 1 << 2;
const PTE_A: u64 = 1 << 5;
const PTE_D: u64 = 1 << 6;
const PTE_PS: u64 = 1 << 7;

// GDT selectors (user ones with RPL 3).
const SEL_USER_CODE: u16 = (3 << 3) | 3;
const SEL_USER_DATA: u16 = (4 << 3) | 3;
const SEL_TSS: u16 = 5 << 3;

fn descriptor(base: u32, limit: u32, access: u8, flags: u8) -> u64 {
    (limit as u64 & 0xffff)
        | ((base as u64 & 0xff_ffff) << 16)
        | ((access as u64) << 40)
        | (((limit as u64 >> 16) & 0xf) << 48)
        | ((flags as u64 & 0xf) << 52)
        | (((base as u64 >> 24) & 0xff) << 56)
}

fn put_u64(mem: &mut [u8], at: u64, v: u64) {
    mem[at as usize..at as usize + 8].copy_from_slice(&v.to_le_bytes());
}

/// Write the program, GDT, TSS and identity-mapping page tables into `mem` (guest RAM, all
/// zero). Config and status pages are written separately.
pub(crate) fn build_system(mem: &mut [u8]) {
    let len = mem.len() as u64;
    assert!((MIN_MEM_BYTES..=MAX_MEM_BYTES).contains(&len) && len % (2 << 20) == 0);

    let code = program();
    assert!(code.len() <= PAGE_SIZE);
    mem[CODE_GPA as usize..CODE_GPA as usize + code.len()].copy_from_slice(&code);

    // GDT: null, kernel code/data (unused, for completeness), user code/data, 16-byte TSS.
    let accessed = 1; // preset so the CPU never writes the descriptor
    let gdt = [
        0,
        descriptor(0, 0xfffff, 0x80 | 0x10 | 0xa | accessed, 0xa), // DPL0 code, L, G
        descriptor(0, 0xfffff, 0x80 | 0x10 | 0x2 | accessed, 0xc), // DPL0 data, DB, G
        descriptor(0, 0xfffff, 0x80 | 0x60 | 0x10 | 0xa | accessed, 0xa), // DPL3 code
        descriptor(0, 0xfffff, 0x80 | 0x60 | 0x10 | 0x2 | accessed, 0xc), // DPL3 data
        descriptor(TSS_GPA as u32, 0x67, 0x80 | 0xb, 0), // busy 64-bit TSS
        0,                                               // TSS base[63:32]
    ];
    for (i, d) in gdt.iter().enumerate() {
        put_u64(mem, GDT_GPA + 8 * i as u64, *d);
    }

    // Identity map [0, len): 2 MiB pages, except the first 2 MiB which uses 4 KiB pages so
    // that the system pages can be read-only. A and D preset everywhere.
    let table = PTE_P | PTE_RW | PTE_US | PTE_A;
    put_u64(mem, PML4_GPA, PDPT_GPA | table);
    let gibs = len.div_ceil(1 << 30);
    for g in 0..gibs {
        let pd = PD_GPA + g * P;
        put_u64(mem, PDPT_GPA + 8 * g, pd | table);
        for e in 0..512u64 {
            let addr = (g << 30) | (e << 21);
            if addr >= len {
                break;
            }
            let entry = if addr == 0 { PT0_GPA | table } else { addr | table | PTE_D | PTE_PS };
            put_u64(mem, pd + 8 * e, entry);
        }
    }
    for e in 0..512u64 {
        let addr = e * P;
        let read_only = (SYSTEM_START..SYSTEM_END).contains(&addr) && addr != STATUS_GPA;
        let rw = if read_only { 0 } else { PTE_RW };
        put_u64(mem, PT0_GPA + 8 * e, addr | PTE_P | PTE_US | PTE_A | PTE_D | rw);
    }
}

/// Special registers for 64-bit mode at CPL 3 with the tables from [`build_system`]. Starts
/// from the vCPU's current sregs so that fields we do not care about keep KVM's values.
pub(crate) fn initial_sregs(mut s: kvm_sregs) -> kvm_sregs {
    let seg = |selector: u16, type_: u8, l: u8, db: u8| kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 3,
        db,
        s: 1,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    s.cs = seg(SEL_USER_CODE, 0xb, 1, 0);
    let data = seg(SEL_USER_DATA, 0x3, 0, 1);
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.ss = data;
    s.tr = kvm_segment {
        base: TSS_GPA,
        limit: 0x67,
        selector: SEL_TSS,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: 0,
        s: 0,
        l: 0,
        g: 0,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    s.ldt = kvm_segment { type_: 0x2, present: 1, unusable: 1, ..Default::default() };
    s.gdt = kvm_dtable { base: GDT_GPA, limit: 7 * 8 - 1, padding: [0; 3] };
    // An empty IDT: any exception escalates to a triple fault, which KVM reports as a shutdown.
    s.idt = kvm_dtable { base: 0, limit: 0, padding: [0; 3] };
    const CR0_PE: u64 = 1;
    const CR0_MP: u64 = 1 << 1;
    const CR0_ET: u64 = 1 << 4;
    const CR0_NE: u64 = 1 << 5;
    const CR0_WP: u64 = 1 << 16;
    const CR0_PG: u64 = 1 << 31;
    const CR4_PAE: u64 = 1 << 5;
    const CR4_OSFXSR: u64 = 1 << 9;
    const CR4_OSXMMEXCPT: u64 = 1 << 10;
    const EFER_LME: u64 = 1 << 8;
    const EFER_LMA: u64 = 1 << 10;
    s.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    s.cr3 = PML4_GPA;
    s.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    s.efer = EFER_LME | EFER_LMA;
    s
}

/// The stamp page `index` of the working set must hold when the guest's counter is `counter`
/// (writer mode, parameters unchanged since boot): the last value `v <= counter` with
/// `v ≡ index + 1 (mod ws_pages)`, or 0 if the page has not been written yet.
pub fn expected_stamp(index: u64, ws_pages: u64, counter: u64) -> u64 {
    let first = index + 1;
    if counter < first {
        return 0;
    }
    first + (counter - first) / ws_pages * ws_pages
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_fits_and_layout_is_sane() {
        assert!(program().len() < 512);
        const { assert!(SYSTEM_END <= WORKING_SET_GPA) };
        // The dirty-tracker conformance suite writes pages 0, 1 and 2: keep them ordinary RAM.
        const { assert!(SYSTEM_START >= 16 * P) };
    }

    #[test]
    fn stamps() {
        // 4 pages; counter 6 means pages got 1,2,3,4 then 5,6 over pages 0,1.
        assert_eq!(expected_stamp(0, 4, 6), 5);
        assert_eq!(expected_stamp(1, 4, 6), 6);
        assert_eq!(expected_stamp(2, 4, 6), 3);
        assert_eq!(expected_stamp(3, 4, 6), 4);
        assert_eq!(expected_stamp(3, 4, 2), 0);
    }

    #[test]
    fn page_tables_identity_map() {
        let mut mem = vec![0u8; 8 << 20];
        build_system(&mut mem);
        let rd = |a: u64| u64::from_le_bytes(mem[a as usize..a as usize + 8].try_into().unwrap());
        let walk = |va: u64| -> (u64, bool) {
            let l4 = rd(PML4_GPA + 8 * ((va >> 39) & 511));
            let l3 = rd((l4 & !0xfff) + 8 * ((va >> 30) & 511));
            let l2 = rd((l3 & !0xfff) + 8 * ((va >> 21) & 511));
            if l2 & PTE_PS != 0 {
                return ((l2 & !0x1f_ffff) | (va & 0x1f_ffff), l2 & PTE_RW != 0);
            }
            let l1 = rd((l2 & !0xfff) + 8 * ((va >> 12) & 511));
            assert!(l1 & PTE_P != 0);
            ((l1 & !0xfff) | (va & 0xfff), l1 & PTE_RW != 0)
        };
        for va in [0u64, 0x1234, CODE_GPA, STATUS_GPA + 8, 0x20_0000, 0x7f_f000] {
            assert_eq!(walk(va).0, va);
        }
        assert!(!walk(CODE_GPA).1 && !walk(CONFIG_GPA).1 && !walk(PML4_GPA).1);
        assert!(walk(STATUS_GPA).1 && walk(0).1 && walk(0x2000).1 && walk(0x30_0000).1);
    }
}

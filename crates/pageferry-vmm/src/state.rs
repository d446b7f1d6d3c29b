//! vCPU state: capture it from a stopped vCPU, restore it into another, and turn it into bytes
//! that can travel to another process as the migration's "device state".
//!
//! Why a format of our own: the state crosses a process (or host) boundary inside the engine's
//! switchover message, so it needs a stable byte layout with a version. The KVM structures are
//! plain `repr(C)` data; they are written as their raw bytes (through `zerocopy`, no unsafe
//! casts), each in a tagged, length-prefixed section. A reader rejects a different version, an
//! unknown tag or a section of the wrong length rather than guessing.
//!
//! Layout: `b"PFVMSTAT"`, `u32 version`, then sections `u32 tag, u32 len, len bytes` (all
//! little-endian) until the end.

use crate::error::{kvm_err, VmError};
use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events,
    kvm_xcrs, Msrs,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd};
use crate::sys::{self, KVM_GET_XSAVE, KVM_GET_XSAVE2, KVM_SET_XSAVE};
use zerocopy::{FromBytes, IntoBytes};

const MAGIC: &[u8; 8] = b"PFVMSTAT";
/// Version of the byte format; bump on any change of meaning.
pub const STATE_VERSION: u32 = 1;

// Section tags.
const T_META: u32 = 1;
const T_REGS: u32 = 2;
const T_SREGS: u32 = 3;
const T_FPU: u32 = 4;
const T_XSAVE: u32 = 5;
const T_XCRS: u32 = 6;
const T_MSRS: u32 = 7;
const T_DEBUGREGS: u32 = 8;
const T_EVENTS: u32 = 9;
const T_MP_STATE: u32 = 10;

/// Everything KVM keeps for one vCPU that this guest needs to continue where it stopped.
/// Optional parts are those a kernel may not support; what was captured is restored.
#[derive(Clone, Default)]
pub struct VcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub fpu: kvm_fpu,
    /// The XSAVE area as KVM returns it (4096 bytes, or more with `KVM_CAP_XSAVE2`).
    pub xsave: Option<Vec<u32>>,
    pub xcrs: Option<kvm_xcrs>,
    /// (index, value) of every MSR that could be read.
    pub msrs: Vec<(u32, u64)>,
    pub debugregs: Option<kvm_debugregs>,
    pub events: Option<kvm_vcpu_events>,
    pub mp_state: Option<kvm_mp_state>,
}

/// Facts about the source at the moment it paused, carried along with the vCPU state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PauseMeta {
    /// Guest memory size; the destination refuses a state for a different size.
    pub mem_bytes: u64,
    /// The guest's counter (status page) right after it stopped.
    pub counter: u64,
    /// When the source asked the vCPU to stop: CLOCK_MONOTONIC and CLOCK_REALTIME, in ns.
    pub paused_monotonic_ns: u64,
    pub paused_realtime_ns: u64,
    /// The source host's boot id (16 bytes); monotonic times compare only within one boot.
    pub boot_id: [u8; 16],
}

/// The complete device state of the VM: what `SourceWorkload::pause` returns.
#[derive(Clone, Default)]
pub struct DeviceState {
    pub meta: PauseMeta,
    pub vcpu: VcpuState,
}

fn ioctl_buf(fd: &VcpuFd, req: u64, buf: *mut u32) -> std::io::Result<()> {
    // SAFETY: `buf` points to a buffer at least as large as the kernel writes/reads for `req`
    // (callers size it from KVM_CAP_XSAVE2, minimum 4096 bytes).
    unsafe { sys::ioctl(fd, req, buf) }.map(|_| ())
}

/// What the VMM learned once per VM about which state it can save.
#[derive(Clone, Debug)]
pub struct StateCaps {
    /// Bytes of the XSAVE area (0 = no XSAVE support).
    pub xsave_bytes: usize,
    pub xsave2: bool,
    pub xcrs: bool,
    pub events: bool,
    pub debugregs: bool,
    /// MSR indices KVM says it saves and restores.
    pub msr_indices: Vec<u32>,
}

impl StateCaps {
    pub fn probe(kvm: &Kvm) -> Result<Self, VmError> {
        let xsave2 = kvm.check_extension_int(Cap::Xsave2);
        let (xsave_bytes, xsave2) = if xsave2 > 4096 {
            (xsave2 as usize, true)
        } else if kvm.check_extension(Cap::Xsave) {
            (4096, xsave2 > 0)
        } else {
            (0, false)
        };
        let msr_indices = kvm.get_msr_index_list().map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?;
        Ok(Self {
            xsave_bytes,
            xsave2,
            xcrs: kvm.check_extension(Cap::Xcrs),
            events: kvm.check_extension(Cap::VcpuEvents),
            debugregs: kvm.check_extension(Cap::Debugregs),
            msr_indices: msr_indices.as_slice().to_vec(),
        })
    }
}

/// Read the MSRs in `indices`; unreadable ones are left out. KVM_GET_MSRS stops at the first
/// MSR it cannot read and returns how many it did, so read in bulk and skip past failures.
fn get_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<(u32, u64)>, VmError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut m = Msrs::from_entries(&entries).map_err(|e| VmError::State(format!("MSR list: {e:?}")))?;
        let n = vcpu.get_msrs(&mut m).map_err(kvm_err("KVM_GET_MSRS"))?.min(rest.len());
        out.extend(m.as_slice()[..n].iter().map(|e| (e.index, e.data)));
        rest = &rest[(n + 1).min(rest.len())..];
    }
    Ok(out)
}

/// Write `msrs`; returns the indices KVM refused. Bulk, skipping past each refused MSR (a bulk
/// KVM_SET_MSRS stops at the first one it rejects, e.g. 0x4b564d06).
fn set_msrs(vcpu: &VcpuFd, msrs: &[(u32, u64)]) -> Result<Vec<u32>, VmError> {
    let mut failed = Vec::new();
    let mut rest = msrs;
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest.iter().map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() }).collect();
        let m = Msrs::from_entries(&entries).map_err(|e| VmError::State(format!("MSR list: {e:?}")))?;
        let n = vcpu.set_msrs(&m).map_err(kvm_err("KVM_SET_MSRS"))?.min(rest.len());
        if n < rest.len() {
            failed.push(rest[n].0);
        }
        rest = &rest[(n + 1).min(rest.len())..];
    }
    Ok(failed)
}

/// Read the state of a vCPU that is not running (its KVM_RUN has returned).
pub fn capture(vcpu: &VcpuFd, caps: &StateCaps) -> Result<VcpuState, VmError> {
    let mut s = VcpuState {
        regs: vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?,
        sregs: vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?,
        fpu: vcpu.get_fpu().map_err(kvm_err("KVM_GET_FPU"))?,
        ..Default::default()
    };
    if caps.xsave_bytes > 0 {
        let mut buf = vec![0u32; caps.xsave_bytes.div_ceil(4)];
        let req = if caps.xsave2 { KVM_GET_XSAVE2 } else { KVM_GET_XSAVE };
        ioctl_buf(vcpu, req, buf.as_mut_ptr()).map_err(|e| VmError::Kvm { op: "KVM_GET_XSAVE", source: e })?;
        s.xsave = Some(buf);
    }
    if caps.xcrs {
        s.xcrs = Some(vcpu.get_xcrs().map_err(kvm_err("KVM_GET_XCRS"))?);
    }
    if caps.debugregs {
        s.debugregs = Some(vcpu.get_debug_regs().map_err(kvm_err("KVM_GET_DEBUGREGS"))?);
    }
    if caps.events {
        s.events = Some(vcpu.get_vcpu_events().map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?);
    }
    s.mp_state = vcpu.get_mp_state().ok();
    s.msrs = get_msrs(vcpu, &caps.msr_indices)?;
    Ok(s)
}

/// Load `s` into a vCPU that is not running. Returns the MSRs that could not be set (the
/// destination kernel does not know them); everything else must succeed.
pub fn restore(vcpu: &VcpuFd, s: &VcpuState) -> Result<Vec<u32>, VmError> {
    // Special registers first (modes, EFER, CR4.OSXSAVE) so that later state is valid.
    vcpu.set_sregs(&s.sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
    // Only MSRs whose value differs from the fresh vCPU's: some (MSR_KVM_ASYNC_PF_INT) cannot
    // be written back even with the value they already hold.
    let indices: Vec<u32> = s.msrs.iter().map(|&(i, _)| i).collect();
    let current: std::collections::HashMap<u32, u64> = get_msrs(vcpu, &indices)?.into_iter().collect();
    let changed: Vec<(u32, u64)> = s.msrs.iter().copied().filter(|(i, v)| current.get(i) != Some(v)).collect();
    let failed = set_msrs(vcpu, &changed)?;
    vcpu.set_fpu(&s.fpu).map_err(kvm_err("KVM_SET_FPU"))?;
    if let Some(xcrs) = &s.xcrs {
        vcpu.set_xcrs(xcrs).map_err(kvm_err("KVM_SET_XCRS"))?;
    }
    if let Some(x) = &s.xsave {
        // KVM_SET_XSAVE reads as many bytes as KVM_CAP_XSAVE2 says; the buffer came from a
        // kernel with the same CPU features (the CPUID we set is the host's supported one).
        let mut buf = x.clone();
        if buf.len() < 1024 {
            return Err(VmError::State(format!("xsave area of {} bytes", buf.len() * 4)));
        }
        ioctl_buf(vcpu, KVM_SET_XSAVE, buf.as_mut_ptr()).map_err(|e| VmError::Kvm { op: "KVM_SET_XSAVE", source: e })?;
    }
    vcpu.set_regs(&s.regs).map_err(kvm_err("KVM_SET_REGS"))?;
    if let Some(d) = &s.debugregs {
        vcpu.set_debug_regs(d).map_err(kvm_err("KVM_SET_DEBUGREGS"))?;
    }
    if let Some(e) = &s.events {
        vcpu.set_vcpu_events(e).map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
    }
    if let Some(m) = s.mp_state {
        vcpu.set_mp_state(m).map_err(kvm_err("KVM_SET_MP_STATE"))?;
    }
    Ok(failed)
}

// ---- byte format ----

fn section(out: &mut Vec<u8>, tag: u32, body: &[u8]) {
    out.extend_from_slice(&tag.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
}

fn fpu_bytes(f: &kvm_fpu) -> Vec<u8> {
    let mut b = Vec::with_capacity(416);
    for r in &f.fpr {
        b.extend_from_slice(r);
    }
    b.extend_from_slice(&f.fcw.to_le_bytes());
    b.extend_from_slice(&f.fsw.to_le_bytes());
    b.push(f.ftwx);
    b.push(f.pad1);
    b.extend_from_slice(&f.last_opcode.to_le_bytes());
    b.extend_from_slice(&f.last_ip.to_le_bytes());
    b.extend_from_slice(&f.last_dp.to_le_bytes());
    for r in &f.xmm {
        b.extend_from_slice(r);
    }
    b.extend_from_slice(&f.mxcsr.to_le_bytes());
    b.extend_from_slice(&f.pad2.to_le_bytes());
    b
}

fn fpu_from(b: &[u8]) -> Option<kvm_fpu> {
    if b.len() != 416 {
        return None;
    }
    let mut r = Reader { b, at: 0 };
    let mut f = kvm_fpu::default();
    for reg in f.fpr.iter_mut() {
        reg.copy_from_slice(r.take(16)?);
    }
    f.fcw = r.u16()?;
    f.fsw = r.u16()?;
    f.ftwx = r.take(1)?[0];
    f.pad1 = r.take(1)?[0];
    f.last_opcode = r.u16()?;
    f.last_ip = r.u64()?;
    f.last_dp = r.u64()?;
    for reg in f.xmm.iter_mut() {
        reg.copy_from_slice(r.take(16)?);
    }
    f.mxcsr = r.u32()?;
    f.pad2 = r.u32()?;
    Some(f)
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.b.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn done(&self) -> bool {
        self.at == self.b.len()
    }
}

fn pod<T: FromBytes>(tag: &str, b: &[u8]) -> Result<T, VmError> {
    T::read_from_bytes(b).map_err(|_| VmError::State(format!("section {tag}: {} bytes, expected {}", b.len(), std::mem::size_of::<T>())))
}

impl DeviceState {
    /// Serialize (see the module docs for the layout).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8192);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&STATE_VERSION.to_le_bytes());
        let m = &self.meta;
        let mut meta = Vec::new();
        for v in [m.mem_bytes, m.counter, m.paused_monotonic_ns, m.paused_realtime_ns] {
            meta.extend_from_slice(&v.to_le_bytes());
        }
        meta.extend_from_slice(&m.boot_id);
        section(&mut out, T_META, &meta);
        let v = &self.vcpu;
        section(&mut out, T_REGS, v.regs.as_bytes());
        section(&mut out, T_SREGS, v.sregs.as_bytes());
        section(&mut out, T_FPU, &fpu_bytes(&v.fpu));
        if let Some(x) = &v.xsave {
            section(&mut out, T_XSAVE, x.as_bytes());
        }
        if let Some(x) = &v.xcrs {
            section(&mut out, T_XCRS, x.as_bytes());
        }
        let mut msrs = Vec::with_capacity(v.msrs.len() * 12);
        for &(i, d) in &v.msrs {
            msrs.extend_from_slice(&i.to_le_bytes());
            msrs.extend_from_slice(&d.to_le_bytes());
        }
        section(&mut out, T_MSRS, &msrs);
        if let Some(d) = &v.debugregs {
            section(&mut out, T_DEBUGREGS, d.as_bytes());
        }
        if let Some(e) = &v.events {
            section(&mut out, T_EVENTS, e.as_bytes());
        }
        if let Some(m) = &v.mp_state {
            section(&mut out, T_MP_STATE, m.as_bytes());
        }
        out
    }

    /// Parse bytes from [`DeviceState::to_bytes`] (possibly from another process).
    pub fn from_bytes(b: &[u8]) -> Result<Self, VmError> {
        let bad = |what: &str| VmError::State(what.to_string());
        let mut r = Reader { b, at: 0 };
        if r.take(8) != Some(&MAGIC[..]) {
            return Err(bad("not a pageferry-vmm device state (bad magic)"));
        }
        let version = r.u32().ok_or_else(|| bad("truncated header"))?;
        if version != STATE_VERSION {
            return Err(VmError::State(format!("device state version {version}, this build reads {STATE_VERSION}")));
        }
        let mut st = DeviceState::default();
        let (mut meta, mut regs, mut sregs, mut fpu) = (false, false, false, false);
        while !r.done() {
            let tag = r.u32().ok_or_else(|| bad("truncated section header"))?;
            let len = r.u32().ok_or_else(|| bad("truncated section header"))? as usize;
            let body = r.take(len).ok_or_else(|| bad("truncated section"))?;
            let v = &mut st.vcpu;
            match tag {
                T_META => {
                    let mut m = Reader { b: body, at: 0 };
                    let mut next = || m.u64().ok_or_else(|| bad("short meta section"));
                    st.meta.mem_bytes = next()?;
                    st.meta.counter = next()?;
                    st.meta.paused_monotonic_ns = next()?;
                    st.meta.paused_realtime_ns = next()?;
                    st.meta.boot_id = m.take(16).ok_or_else(|| bad("short meta section"))?.try_into().unwrap();
                    meta = true;
                }
                T_REGS => {
                    v.regs = pod("regs", body)?;
                    regs = true;
                }
                T_SREGS => {
                    v.sregs = pod("sregs", body)?;
                    sregs = true;
                }
                T_FPU => {
                    v.fpu = fpu_from(body).ok_or_else(|| bad("fpu section of the wrong size"))?;
                    fpu = true;
                }
                T_XSAVE => {
                    if body.len() % 4 != 0 || body.len() < 4096 {
                        return Err(bad("xsave section of the wrong size"));
                    }
                    v.xsave = Some(body.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect());
                }
                T_XCRS => v.xcrs = Some(pod("xcrs", body)?),
                T_MSRS => {
                    if body.len() % 12 != 0 {
                        return Err(bad("msr section of the wrong size"));
                    }
                    v.msrs = body
                        .chunks_exact(12)
                        .map(|c| (u32::from_le_bytes(c[..4].try_into().unwrap()), u64::from_le_bytes(c[4..].try_into().unwrap())))
                        .collect();
                }
                T_DEBUGREGS => v.debugregs = Some(pod("debugregs", body)?),
                T_EVENTS => v.events = Some(pod("vcpu events", body)?),
                T_MP_STATE => v.mp_state = Some(pod("mp state", body)?),
                other => return Err(VmError::State(format!("unknown section tag {other}"))),
            }
        }
        if !(meta && regs && sregs && fpu) {
            return Err(bad("device state lacks a required section (meta, regs, sregs, fpu)"));
        }
        Ok(st)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> DeviceState {
        let mut s = DeviceState {
            meta: PauseMeta { mem_bytes: 64 << 20, counter: 77, paused_monotonic_ns: 5, paused_realtime_ns: 6, boot_id: [9; 16] },
            ..Default::default()
        };
        s.vcpu.regs.rip = 0x10000;
        s.vcpu.regs.r8 = 77;
        s.vcpu.sregs.cr3 = 0x15000;
        s.vcpu.fpu.mxcsr = 0x1f80;
        s.vcpu.fpu.xmm[3][7] = 42;
        s.vcpu.xsave = Some((0..1024).collect());
        s.vcpu.msrs = vec![(0x10, 123), (0xc0000080, 0x500)];
        s.vcpu.events = Some(kvm_vcpu_events::default());
        s
    }

    #[test]
    fn round_trip() {
        let s = sample();
        let b = s.to_bytes();
        let t = DeviceState::from_bytes(&b).unwrap();
        assert_eq!(t.meta, s.meta);
        assert_eq!(t.vcpu.regs, s.vcpu.regs);
        assert_eq!(t.vcpu.sregs, s.vcpu.sregs);
        assert_eq!(t.vcpu.fpu, s.vcpu.fpu);
        assert_eq!(t.vcpu.xsave, s.vcpu.xsave);
        assert_eq!(t.vcpu.msrs, s.vcpu.msrs);
        assert!(t.vcpu.events.is_some() && t.vcpu.xcrs.is_none());
        assert_eq!(t.to_bytes(), b);
    }

    #[test]
    fn rejects_damage() {
        let b = sample().to_bytes();
        assert!(DeviceState::from_bytes(&b[..b.len() - 1]).is_err());
        assert!(DeviceState::from_bytes(&b[..12]).is_err());
        let mut v = b.clone();
        v[8] = 99; // version
        assert!(DeviceState::from_bytes(&v).is_err());
        let mut m = b.clone();
        m[0] = b'X';
        assert!(DeviceState::from_bytes(&m).is_err());
    }
}

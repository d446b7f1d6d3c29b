//! The VM: one memory slot of guest RAM (a vm-memory `GuestMemoryMmap`), one vCPU, the guest program, and the
//! lifecycle a live migration needs — start, pause with state capture, restore, resume.
//!
//! Why it exists: pageferry's engine migrates memory; something has to own a real guest whose
//! memory changes while it is copied, stop it for the switchover, and continue it elsewhere.
//! This is the smallest KVM VMM that does that: no devices, no interrupts, no firmware. Its
//! whole device state is the vCPU state ([`crate::state`]).

use crate::dirty::{KvmDirtyTracker, VmDirtyTracker};
use crate::error::{kvm_err, VmError};
use crate::guest::{self, config, status};
use crate::state::{self, DeviceState, PauseMeta, StateCaps};
use crate::time::{self, DowntimeClock, Stamp};
use crate::vcpu::{Outcome, VcpuRunner};
use kvm_bindings::{kvm_enable_cap, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VmFd};
use pageferry::dirty::{AtomicBitmapTracker, UnionTracker};
use pageferry::memory::{GuestMemory, MemoryRegion, VmMemoryRegion, PAGE_SIZE};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Guest RAM: rust-vmm's mmap-backed guest memory, with vm-memory's dirty bitmap recording the
/// VMM's own writes through its accessors.
pub type GuestRam = GuestMemoryMmap<AtomicBitmap>;

/// What the guest does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum GuestMode {
    /// Keep writing the working set (see [`VmConfig`]).
    #[default]
    Writer,
    /// Write only the pages the host asks for with [`Vm::guest_write_page`] (dirty-tracker tests).
    OnDemand,
}

/// How [`KvmDirtyTracker`] harvests KVM's dirty log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DirtyLogMode {
    /// `KVM_GET_DIRTY_LOG` alone: fetches and clears the log, write-protecting the dirty pages.
    #[default]
    GetLog,
    /// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` with initially-set bits: `KVM_GET_DIRTY_LOG` only
    /// copies the bitmap, `KVM_CLEAR_DIRTY_LOG` then clears and write-protects what was seen.
    ManualProtect,
}

/// How far a throttled guest may fall behind its cadence (vCPU not scheduled) and still catch
/// up; longer gaps (a pause, a migration's downtime above this) start a new cadence.
const CATCH_UP: Duration = Duration::from_millis(50);

/// Parameters of a new source VM.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Guest RAM in bytes: a multiple of 2 MiB, from 4 MiB to 64 GiB.
    pub mem_bytes: u64,
    pub mode: GuestMode,
    /// Bytes the writer cycles over (a page multiple; starts at guest address 2 MiB, so at most
    /// `mem_bytes - 2 MiB`).
    pub working_set_bytes: u64,
    /// Pages written per tick (>= 1).
    pub pages_per_tick: u64,
    /// Length of a tick (measured with the guest's TSC); `None` runs unthrottled (as fast as
    /// the vCPU can write). When the vCPU loses its CPU for up to 50 ms the guest catches up,
    /// so the average rate holds; after longer gaps (pauses) it starts a new cadence.
    pub tick: Option<Duration>,
    pub dirty_log: DirtyLogMode,
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            mem_bytes: 256 << 20,
            mode: GuestMode::Writer,
            working_set_bytes: 16 << 20,
            pages_per_tick: 256,
            tick: None,
            dirty_log: DirtyLogMode::default(),
        }
    }
}

/// Where a VM is in its life.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmStatus {
    /// Never ran (a destination waiting for its state, or a source before `start`).
    Created,
    Running,
    /// Stopped by [`Vm::pause`]; can be started again.
    Paused,
    /// The guest failed; the VM cannot continue.
    Failed(String),
}

/// Timings of the last [`Vm::pause`].
#[derive(Clone, Debug)]
pub struct PauseReport {
    /// When the pause was requested (the guest stops `vcpu_stopped` later at the latest).
    pub requested: Stamp,
    /// From the request until the vCPU thread had left KVM_RUN.
    pub vcpu_stopped: Duration,
    /// From the request until the device state was captured.
    pub state_captured: Duration,
    /// The guest's counter after it stopped.
    pub counter: u64,
}

/// What happened when a destination resumed; see [`Vm::resume_report`].
#[derive(Clone, Debug)]
pub struct ResumeReport {
    /// The source's facts at pause time (counter, clocks), from the device state.
    pub source: PauseMeta,
    /// The counter found in this VM's memory when the state was restored; equals
    /// `source.counter` when memory arrived intact.
    pub counter_at_restore: u64,
    /// When `resume` was called.
    pub resume_called: Stamp,
    /// From `resume` being called until the vCPU state was loaded.
    pub restore_took: Duration,
    /// When the vCPU thread entered KVM_RUN (None until it has).
    pub run_started: Option<Stamp>,
    /// The first counter value seen to differ from `counter_at_restore`, and when (None until
    /// the guest has made progress, or if it made none within 30 s).
    pub first_progress: Option<(u64, Stamp)>,
    /// MSRs from the source this kernel refused (normally empty).
    pub unrestored_msrs: Vec<u32>,
}

impl ResumeReport {
    /// Source pause request → destination vCPU running, and which clock measured it.
    pub fn downtime(&self) -> Option<(Duration, DowntimeClock)> {
        let run = self.run_started.as_ref()?;
        Some(time::downtime(self.source.paused_monotonic_ns, self.source.paused_realtime_ns, self.source.boot_id, run))
    }
    /// Source pause request → first guest progress observed on the destination.
    pub fn downtime_to_progress(&self) -> Option<(Duration, DowntimeClock)> {
        let (_, at) = self.first_progress.as_ref()?;
        Some(time::downtime(self.source.paused_monotonic_ns, self.source.paused_realtime_ns, self.source.boot_id, at))
    }
}

#[derive(Clone, Copy, Default)]
struct Observed {
    run_started: Option<Stamp>,
    first_progress: Option<(u64, Stamp)>,
}

/// Result of [`Vm::check_pattern`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PatternReport {
    pub counter: u64,
    pub working_set_pages: u64,
    /// Pages that have been written at least once.
    pub pages_written: u64,
}

pub(crate) struct VmInner {
    pub(crate) vm_fd: VmFd,
    pub(crate) ram: GuestRam,
    memory: GuestMemory,
    pub(crate) mem_bytes: u64,
    pub(crate) dirty_log: DirtyLogMode,
    /// Set while a KvmDirtyTracker has logging enabled (one at a time).
    pub(crate) tracking: AtomicBool,
    caps: StateCaps,
    runner: VcpuRunner,
    /// Serializes lifecycle operations (start, pause, restore, shutdown).
    op: Mutex<()>,
    /// A device state was loaded into the vCPU.
    restored: AtomicBool,
    cmd_seq: AtomicU64,
    last_pause: Mutex<Option<PauseReport>>,
    resume: Mutex<Option<ResumeReport>>,
    /// What the watcher saw after the last resume: (vCPU entered KVM_RUN, first progress).
    observed: Arc<Mutex<Observed>>,
    watcher_stop: Arc<AtomicBool>,
}

/// A KVM virtual machine running the pageferry test guest. See the crate docs for the
/// migration flow. Dropping it stops the vCPU; guest memory lives on while a
/// [`GuestMemory`] from [`Vm::guest_memory`] holds it.
pub struct Vm {
    inner: Arc<VmInner>,
}

/// Check that KVM can be used here (for tests that skip without it).
pub fn kvm_available() -> Result<(), VmError> {
    Kvm::new().map(|_| ()).map_err(|e| VmError::KvmUnavailable(std::io::Error::from_raw_os_error(e.errno())))
}

/// The engine's name for guest RAM (vm-memory's region at guest address 0).
pub const RAM_REGION: &str = "ram@0x0";

/// The KVM memory slot guest RAM lives in.
pub(crate) const RAM_SLOT: u32 = 0;

pub(crate) fn set_slot(vm_fd: &VmFd, ram: &GuestRam, flags: u32) -> Result<(), VmError> {
    let region = ram.iter().next().expect("guest RAM has one region");
    let region = kvm_userspace_memory_region {
        slot: RAM_SLOT,
        flags,
        guest_phys_addr: 0,
        memory_size: region.size() as u64,
        userspace_addr: region.as_ptr() as u64,
    };
    // SAFETY: the mapping is valid for its length and outlives the VM fd (VmInner holds both,
    // and the kernel drops the slot with the VM).
    unsafe { vm_fd.set_user_memory_region(region) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))
}

impl Vm {
    /// Create a source VM with the guest loaded, ready to [`start`](Vm::start).
    pub fn new(cfg: VmConfig) -> Result<Vm, VmError> {
        check_mem(cfg.mem_bytes)?;
        let ws = cfg.working_set_bytes;
        if cfg.mode == GuestMode::Writer {
            if ws == 0 || ws % PAGE_SIZE as u64 != 0 {
                return Err(VmError::Config(format!("working set {ws} is not a non-zero multiple of {PAGE_SIZE}")));
            }
            if guest::WORKING_SET_GPA + ws > cfg.mem_bytes {
                return Err(VmError::Config(format!(
                    "working set {ws} does not fit: at most {} bytes with {} bytes of memory",
                    cfg.mem_bytes - guest::WORKING_SET_GPA,
                    cfg.mem_bytes
                )));
            }
            if cfg.pages_per_tick == 0 {
                return Err(VmError::Config("pages_per_tick must be at least 1".into()));
            }
        }
        let inner = VmInner::create(cfg.mem_bytes, cfg.dirty_log, false)?;
        let vcpu = inner.runner.shared.vcpu.lock().unwrap();
        let (tick_cycles, catch_up_cycles) = match cfg.tick {
            None => (0, 0),
            Some(t) => {
                let khz = vcpu.get_tsc_khz().map_err(kvm_err("KVM_GET_TSC_KHZ"))? as u128;
                let cycles = |d: Duration| (d.as_nanos() * khz / 1_000_000).max(1) as u64;
                let tick = cycles(t);
                (tick, cycles(CATCH_UP).max(tick.saturating_mul(64)))
            }
        };
        {
            // SAFETY: the mapping is ours, nobody runs yet.
            let mem = unsafe { std::slice::from_raw_parts_mut(inner.ram_ptr(), inner.mem_bytes as usize) };
            guest::build_system(mem);
        }
        let c = |off: usize, v: u64| inner.word(guest::CONFIG_GPA + off as u64).store(v, Ordering::Relaxed);
        c(config::MODE, if cfg.mode == GuestMode::OnDemand { guest::MODE_ON_DEMAND } else { guest::MODE_WRITER });
        c(config::WS_BASE, guest::WORKING_SET_GPA);
        c(config::WS_PAGES, (ws / PAGE_SIZE as u64).max(1));
        c(config::PAGES_PER_TICK, cfg.pages_per_tick.max(1));
        c(config::TICK_CYCLES, tick_cycles);
        c(config::CATCH_UP_CYCLES, catch_up_cycles);
        c(config::MAGIC, config::MAGIC_VALUE);

        let sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        vcpu.set_sregs(&guest::initial_sregs(sregs)).map_err(kvm_err("KVM_SET_SREGS"))?;
        let regs = kvm_bindings::kvm_regs { rip: guest::CODE_GPA, rflags: 0x2, ..Default::default() };
        vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
        drop(vcpu);
        Ok(Vm { inner: Arc::new(inner) })
    }

    /// Create a destination VM of `mem_bytes` (the source's size) with zeroed memory. The
    /// migration writes its memory through [`Vm::guest_memory`]; [`Vm::resume`] (or the
    /// [`VmDestinationWorkload`]) loads the device state and runs it.
    pub fn new_destination(mem_bytes: u64) -> Result<Vm, VmError> {
        check_mem(mem_bytes)?;
        let inner = VmInner::create(mem_bytes, DirtyLogMode::GetLog, true)?;
        Ok(Vm { inner: Arc::new(inner) })
    }

    /// Guest RAM size in bytes.
    pub fn mem_bytes(&self) -> u64 {
        self.inner.mem_bytes
    }

    /// Guest memory for the engine: the vm-memory guest RAM's one region, `"ram@0x0"`, shared
    /// with the VM (no copy).
    pub fn guest_memory(&self) -> GuestMemory {
        self.inner.memory.clone()
    }

    /// Guest RAM as vm-memory memory: what device emulation would read and write. Writes through
    /// its accessors are marked in its `AtomicBitmap`, which [`Vm::dirty_tracker`] harvests.
    pub fn guest_ram(&self) -> &GuestRam {
        &self.inner.ram
    }

    /// The tracker a migration of this VM uses: KVM's dirty log (the guest's writes) united
    /// with vm-memory's bitmap (the VMM's own writes through [`Vm::guest_ram`]), both harvested
    /// each round, as Cloud Hypervisor does.
    pub fn dirty_tracker(&self) -> VmDirtyTracker {
        let name = match self.inner.dirty_log {
            DirtyLogMode::GetLog => "kvm-dirty-log+vm-memory-bitmap",
            DirtyLogMode::ManualProtect => "kvm-dirty-log-manual+vm-memory-bitmap",
        };
        UnionTracker::new(name, self.kvm_dirty_tracker(), AtomicBitmapTracker::new(&self.inner.ram))
    }

    /// KVM's dirty log of this VM's memory slot alone (see [`KvmDirtyTracker`]): it misses
    /// writes the VMM makes itself; migrations use [`Vm::dirty_tracker`].
    pub fn kvm_dirty_tracker(&self) -> KvmDirtyTracker {
        KvmDirtyTracker::new(self.inner.clone())
    }

    /// The source side of a migration (implements the engine's `SourceWorkload`).
    pub fn source_workload(&self) -> VmSourceWorkload {
        VmSourceWorkload { vm: self.inner.clone() }
    }

    /// The destination side of a migration (implements the engine's `DestinationWorkload`).
    pub fn destination_workload(&self) -> VmDestinationWorkload {
        VmDestinationWorkload { vm: self.inner.clone() }
    }

    /// Run the vCPU: the first start, or continuing after [`pause`](Vm::pause) or
    /// [`restore`](Vm::restore).
    pub fn start(&self) -> Result<(), VmError> {
        self.inner.start()
    }

    /// Stop the guest and capture its device state. The VM stays paused until
    /// [`start`](Vm::start).
    pub fn pause(&self) -> Result<DeviceState, VmError> {
        self.inner.pause()
    }

    /// Load a device state into this (not running) VM without starting it.
    pub fn restore(&self, state: &DeviceState) -> Result<Vec<u32>, VmError> {
        self.inner.restore(state)
    }

    /// Destination switchover in one call: parse `device_state` (bytes from a source's pause),
    /// restore it and run. Timings go to [`resume_report`](Vm::resume_report).
    pub fn resume(&self, device_state: &[u8]) -> Result<(), VmError> {
        self.inner.resume_from_bytes(device_state)
    }

    /// Stop the vCPU thread if it runs. The VM cannot be used afterwards except for reading
    /// memory. Idempotent; also done on drop.
    pub fn shutdown(&self) {
        self.inner.shutdown();
    }

    pub fn status(&self) -> VmStatus {
        self.inner.status()
    }

    /// Auto-converge: let the vCPU run only `100 - pct` percent of the time (0 = full speed).
    /// Every 10 ms of running the vCPU leaves KVM_RUN and sleeps its share (QEMU's
    /// cpu-throttle); a pause interrupts the sleep.
    pub fn set_throttle(&self, pct: u8) {
        self.inner.runner.set_throttle(pct);
    }

    /// Total time the vCPU has slept for the throttle.
    pub fn throttled_time(&self) -> Duration {
        Duration::from_nanos(self.inner.runner.shared.throttled_ns.load(Ordering::Relaxed))
    }

    /// The guest's page counter (pages written since boot, carried across migrations).
    pub fn counter(&self) -> u64 {
        self.inner.read(guest::STATUS_GPA + status::COUNTER as u64)
    }

    /// The guest's TSC as it last read it (throttled writer only; diagnostics).
    pub fn guest_tsc(&self) -> u64 {
        self.inner.read(guest::STATUS_GPA + status::TSC as u64)
    }

    /// Ticks the guest completed.
    pub fn ticks(&self) -> u64 {
        self.inner.read(guest::STATUS_GPA + status::TICKS as u64)
    }

    /// Wait until the counter reaches at least `min`; returns the value seen.
    pub fn wait_for_counter(&self, min: u64, timeout: Duration) -> Result<u64, VmError> {
        let t0 = Instant::now();
        loop {
            let c = self.counter();
            if c >= min {
                return Ok(c);
            }
            if let VmStatus::Failed(r) = self.status() {
                return Err(VmError::Guest(r));
            }
            if t0.elapsed() > timeout {
                return Err(VmError::Timeout(format!("counter {c} did not reach {min} in {timeout:?}")));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// On-demand guest: make the guest store a fresh value in the first 8 bytes of `page` and
    /// wait until it has. Nothing else in guest memory changes (the store is the
    /// acknowledgement), so KVM's dirty log then contains exactly this page.
    pub fn guest_write_page(&self, page: u64, timeout: Duration) -> Result<(), VmError> {
        self.inner.guest_write_page(page, timeout)
    }

    /// Check the writer's pattern over the whole working set: every page holds the counter
    /// value of its latest write (and its own address), consistent with the current counter.
    /// Proves that no page write was lost or reordered, e.g. by a migration. The VM must not
    /// be running; parameters are read from guest memory, so this works on a destination.
    pub fn check_pattern(&self) -> Result<PatternReport, VmError> {
        self.inner.check_pattern()
    }

    /// Timings of the last pause.
    pub fn last_pause(&self) -> Option<PauseReport> {
        self.inner.last_pause.lock().unwrap().clone()
    }

    /// Timings of the last resume from a device state (destination), with the downtime.
    pub fn resume_report(&self) -> Option<ResumeReport> {
        let mut r = self.inner.resume.lock().unwrap().clone()?;
        let o = *self.inner.observed.lock().unwrap();
        r.run_started = o.run_started;
        r.first_progress = o.first_progress;
        Some(r)
    }

    /// Like [`resume_report`](Vm::resume_report), waiting up to `timeout` for the first guest
    /// progress after the resume.
    pub fn wait_resume_report(&self, timeout: Duration) -> Option<ResumeReport> {
        let t0 = Instant::now();
        loop {
            let r = self.resume_report()?;
            if r.first_progress.is_some() || t0.elapsed() > timeout {
                return Some(r);
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    /// Exits the guest made that it should not have (I/O, MMIO); 0 for a healthy guest.
    pub fn unexpected_exits(&self) -> u64 {
        self.inner.runner.shared.unexpected_exits.load(Ordering::Relaxed)
    }
}

fn check_mem(mem_bytes: u64) -> Result<(), VmError> {
    if !(guest::MIN_MEM_BYTES..=guest::MAX_MEM_BYTES).contains(&mem_bytes) || mem_bytes % (2 << 20) != 0 {
        return Err(VmError::Config(format!(
            "guest memory {mem_bytes}: must be a multiple of 2 MiB from {} MiB to {} GiB",
            guest::MIN_MEM_BYTES >> 20,
            guest::MAX_MEM_BYTES >> 30
        )));
    }
    Ok(())
}

impl VmInner {
    fn create(mem_bytes: u64, dirty_log: DirtyLogMode, fresh: bool) -> Result<VmInner, VmError> {
        let kvm = Kvm::new().map_err(|e| VmError::KvmUnavailable(std::io::Error::from_raw_os_error(e.errno())))?;
        let vm_fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        if dirty_log == DirtyLogMode::ManualProtect {
            let want = kvm_bindings::KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | kvm_bindings::KVM_DIRTY_LOG_INITIALLY_SET;
            let have = vm_fd.check_extension_raw(kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2.into()) as u32;
            if have & want != want {
                return Err(VmError::Config("KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 with initially-set is not supported".into()));
            }
            let mut cap = kvm_enable_cap { cap: kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, ..Default::default() };
            cap.args[0] = want as u64;
            vm_fd.enable_cap(&cap).map_err(kvm_err("KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)"))?;
        }
        let ram: GuestRam = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), mem_bytes as usize)])
            .map_err(|e| VmError::Config(format!("guest RAM of {mem_bytes} bytes: {e}")))?;
        set_slot(&vm_fd, &ram, 0)?;
        let region = ram.iter().next().expect("one range, one region");
        // A destination's RAM was just mapped anonymous: honestly fresh, so round 0 may skip
        // writing its zero pages.
        let region = if fresh { VmMemoryRegion::new(region).assume_fresh_zeroed() } else { VmMemoryRegion::new(region) };
        let memory = GuestMemory::new(vec![Arc::new(region) as Arc<dyn MemoryRegion>])?;
        let vcpu = vm_fd.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        let caps = StateCaps::probe(&kvm)?;
        let runner = VcpuRunner::new(vcpu).map_err(|e| VmError::Lifecycle(format!("cannot spawn the vCPU thread: {e}")))?;
        Ok(VmInner {
            vm_fd,
            ram,
            memory,
            mem_bytes,
            dirty_log,
            tracking: AtomicBool::new(false),
            caps,
            runner,
            op: Mutex::new(()),
            restored: AtomicBool::new(false),
            cmd_seq: AtomicU64::new(0x5046_0000_0000_0000),
            last_pause: Mutex::new(None),
            resume: Mutex::new(None),
            observed: Arc::new(Mutex::new(Observed::default())),
            watcher_stop: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Start of guest RAM in this process (the slot's userspace address).
    pub(crate) fn ram_ptr(&self) -> *mut u8 {
        self.memory.regions()[0].host_ptr()
    }

    /// The u64 at guest-physical `gpa` (8-byte aligned, in RAM).
    fn word(&self, gpa: u64) -> &AtomicU64 {
        assert!(gpa % 8 == 0 && gpa + 8 <= self.mem_bytes);
        // SAFETY: in bounds and aligned (checked); the mapping lives as long as `self`. The guest
        // writes these words concurrently, hence atomic access.
        unsafe { AtomicU64::from_ptr(self.ram_ptr().add(gpa as usize).cast()) }
    }

    fn read(&self, gpa: u64) -> u64 {
        self.word(gpa).load(Ordering::Acquire)
    }

    fn status(&self) -> VmStatus {
        if self.runner.is_running() {
            return VmStatus::Running;
        }
        match self.runner.last_outcome() {
            None => VmStatus::Created,
            Some(Outcome::Stopped) => VmStatus::Paused,
            Some(Outcome::Failed(r)) => VmStatus::Failed(r),
        }
    }

    fn start(&self) -> Result<(), VmError> {
        let _op = self.op.lock().unwrap();
        match self.runner.last_outcome() {
            Some(Outcome::Failed(r)) => return Err(VmError::Lifecycle(format!("the guest failed: {r}"))),
            // Continuing after a pause, here or restored from elsewhere: tell a throttled
            // guest to start a new cadence rather than catch up on the gap.
            Some(Outcome::Stopped) => self.bump_epoch(),
            None if self.restored.load(Ordering::SeqCst) => self.bump_epoch(),
            None => {}
        }
        if !self.runner.run() {
            return Err(VmError::Lifecycle("the VM is already running".into()));
        }
        Ok(())
    }

    fn bump_epoch(&self) {
        if self.read(guest::CONFIG_GPA + config::MAGIC as u64) == config::MAGIC_VALUE {
            self.word(guest::CONFIG_GPA + config::EPOCH as u64).fetch_add(1, Ordering::AcqRel);
        }
    }

    fn pause(&self) -> Result<DeviceState, VmError> {
        let _op = self.op.lock().unwrap();
        if !self.runner.is_running() {
            return Err(VmError::Lifecycle(match self.runner.last_outcome() {
                Some(Outcome::Failed(r)) => format!("the guest has failed: {r}"),
                _ => "the VM is not running".into(),
            }));
        }
        self.watcher_stop.store(true, Ordering::SeqCst);
        let requested = Stamp::now();
        let outcome = self.runner.stop();
        let vcpu_stopped = requested.instant.elapsed();
        if let Some(Outcome::Failed(reason)) = outcome {
            return Err(VmError::Guest(reason));
        }
        let vstate = state::capture(&self.runner.shared.vcpu.lock().unwrap(), &self.caps)?;
        let state_captured = requested.instant.elapsed();
        let counter = self.read(guest::STATUS_GPA + status::COUNTER as u64);
        *self.last_pause.lock().unwrap() = Some(PauseReport { requested, vcpu_stopped, state_captured, counter });
        Ok(DeviceState {
            meta: PauseMeta {
                mem_bytes: self.mem_bytes,
                counter,
                paused_monotonic_ns: requested.monotonic_ns,
                paused_realtime_ns: requested.realtime_ns,
                boot_id: time::boot_id(),
            },
            vcpu: vstate,
        })
    }

    fn restore(&self, st: &DeviceState) -> Result<Vec<u32>, VmError> {
        if st.meta.mem_bytes != self.mem_bytes {
            return Err(VmError::State(format!(
                "state is for {} bytes of guest memory, this VM has {}",
                st.meta.mem_bytes, self.mem_bytes
            )));
        }
        let _op = self.op.lock().unwrap();
        if self.runner.is_running() {
            return Err(VmError::Lifecycle("cannot restore into a running VM".into()));
        }
        if let Some(Outcome::Failed(r)) = self.runner.last_outcome() {
            return Err(VmError::Lifecycle(format!("the guest failed: {r}")));
        }
        let failed = state::restore(&self.runner.shared.vcpu.lock().unwrap(), &st.vcpu)?;
        self.restored.store(true, Ordering::SeqCst);
        Ok(failed)
    }

    fn resume_from_bytes(&self, bytes: &[u8]) -> Result<(), VmError> {
        let resume_called = Stamp::now();
        let st = DeviceState::from_bytes(bytes)?;
        let unrestored_msrs = self.restore(&st)?;
        let restore_took = resume_called.instant.elapsed();
        let counter_at_restore = self.read(guest::STATUS_GPA + status::COUNTER as u64);
        *self.observed.lock().unwrap() = Observed::default();
        *self.resume.lock().unwrap() = Some(ResumeReport {
            source: st.meta.clone(),
            counter_at_restore,
            resume_called,
            restore_took,
            run_started: None,
            first_progress: None,
            unrestored_msrs,
        });
        self.start()?;
        self.spawn_progress_watcher(counter_at_restore);
        Ok(())
    }

    /// Record when the vCPU entered KVM_RUN after a resume, then watch the status page until
    /// the counter moves away from `from` (at most 30 s), to time the guest's first progress.
    fn spawn_progress_watcher(&self, from: u64) {
        self.watcher_stop.store(false, Ordering::SeqCst);
        let stop = self.watcher_stop.clone();
        let out = self.observed.clone();
        let shared = self.runner.shared.clone();
        let ram = self.memory.clone();
        let _ = std::thread::Builder::new().name("vm-progress".into()).spawn(move || {
            // SAFETY: status page in bounds of the mapping, which `ram` keeps alive; atomic
            // because the guest writes it.
            let w = unsafe { AtomicU64::from_ptr(ram.regions()[0].host_ptr().add(guest::STATUS_GPA as usize).cast()) };
            // Poll every ~10 µs without holding a CPU the vCPU may need: short sleeps with
            // a 1 µs timer slack (this thread only).
            // SAFETY: prctl with integer arguments.
            unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1000 as libc::c_ulong) };
            let t0 = Instant::now();
            while !stop.load(Ordering::Relaxed) && t0.elapsed() < Duration::from_secs(30) {
                let mut o = out.lock().unwrap();
                if o.run_started.is_none() {
                    o.run_started = *shared.run_started.lock().unwrap();
                }
                if o.run_started.is_some() {
                    let c = w.load(Ordering::Acquire);
                    if c != from {
                        o.first_progress = Some((c, Stamp::now()));
                        return;
                    }
                }
                drop(o);
                std::thread::sleep(Duration::from_micros(10));
            }
        });
    }

    fn shutdown(&self) {
        self.watcher_stop.store(true, Ordering::SeqCst);
        let _op = self.op.lock().unwrap();
        self.runner.stop();
    }

    fn guest_write_page(&self, page: u64, timeout: Duration) -> Result<(), VmError> {
        if self.read(guest::CONFIG_GPA + config::MODE as u64) != guest::MODE_ON_DEMAND {
            return Err(VmError::Config("guest_write_page needs a guest in GuestMode::OnDemand".into()));
        }
        let pages = self.mem_bytes / PAGE_SIZE as u64;
        let sys = guest::SYSTEM_START / PAGE_SIZE as u64..guest::SYSTEM_END / PAGE_SIZE as u64;
        if page >= pages || sys.contains(&page) {
            return Err(VmError::Config(format!("page {page} is outside RAM or in the guest's system area {sys:?}")));
        }
        let seq = self.cmd_seq.fetch_add(1, Ordering::Relaxed) + 1;
        let target = page * PAGE_SIZE as u64;
        self.word(guest::CONFIG_GPA + config::CMD_ADDR as u64).store(target, Ordering::Release);
        self.word(guest::CONFIG_GPA + config::CMD_SEQ as u64).store(seq, Ordering::Release);
        let ack = self.word(target);
        let t0 = Instant::now();
        let mut spins = 0u32;
        while ack.load(Ordering::Acquire) != seq {
            spins += 1;
            if spins % 1024 == 0 {
                if t0.elapsed() > timeout {
                    return match self.status() {
                        VmStatus::Failed(r) => Err(VmError::Guest(r)),
                        VmStatus::Running => Err(VmError::Timeout(format!("guest did not write page {page} within {timeout:?}"))),
                        s => Err(VmError::Lifecycle(format!("guest is not running ({s:?})"))),
                    };
                }
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        Ok(())
    }

    fn check_pattern(&self) -> Result<PatternReport, VmError> {
        if self.status() == VmStatus::Running {
            return Err(VmError::Lifecycle("check_pattern needs a stopped VM".into()));
        }
        let cfg = |off: usize| self.read(guest::CONFIG_GPA + off as u64);
        if cfg(config::MAGIC) != config::MAGIC_VALUE || cfg(config::MODE) != guest::MODE_WRITER {
            return Err(VmError::Guest("no writer guest in this memory (config page missing or other mode)".into()));
        }
        let (base, n) = (cfg(config::WS_BASE), cfg(config::WS_PAGES));
        let counter = self.read(guest::STATUS_GPA + status::COUNTER as u64);
        let mut written = 0;
        for p in 0..n {
            let gpa = base + p * PAGE_SIZE as u64;
            let (stamp, tag) = (self.read(gpa), self.read(gpa + 8));
            let expected = guest::expected_stamp(p, n, counter);
            // The vCPU may have stopped between storing a page and storing the counter: then
            // exactly the page for counter+1 already holds counter+1.
            let in_flight = stamp == counter + 1 && guest::expected_stamp(p, n, counter + 1) == counter + 1;
            let ok_stamp = stamp == expected || in_flight;
            let ok_tag = if stamp == 0 { tag == 0 } else { tag == gpa || (in_flight && tag == 0) };
            if !(ok_stamp && ok_tag) {
                return Err(VmError::Guest(format!(
                    "working-set page {p} (gpa {gpa:#x}) holds stamp {stamp} tag {tag:#x}; with counter {counter} expected stamp {expected} tag {:#x}",
                    if expected == 0 { 0 } else { gpa }
                )));
            }
            if stamp != 0 {
                written += 1;
            }
        }
        Ok(PatternReport { counter, working_set_pages: n, pages_written: written })
    }
}

impl Drop for VmInner {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The source side of a migration: `pause` stops the guest and returns its device state as
/// bytes; `resume_after_failure` lets it continue here. Implements the engine's
/// `SourceWorkload`.
pub struct VmSourceWorkload {
    vm: Arc<VmInner>,
}

impl VmSourceWorkload {
    /// Stop the guest; its device state as bytes (see [`DeviceState::to_bytes`]).
    pub fn pause(&mut self) -> Result<Vec<u8>, VmError> {
        Ok(self.vm.pause()?.to_bytes())
    }

    /// Continue the guest here after a failed migration.
    pub fn resume_after_failure(&mut self) -> Result<(), VmError> {
        self.vm.start()
    }

    /// Auto-converge: see [`Vm::set_throttle`].
    pub fn set_throttle(&mut self, pct: u8) {
        self.vm.runner.set_throttle(pct);
    }
}

/// The destination side: `resume` restores the source's device state and runs the guest.
/// Implements the engine's `DestinationWorkload`.
pub struct VmDestinationWorkload {
    vm: Arc<VmInner>,
}

impl VmDestinationWorkload {
    pub fn resume(&mut self, device_state: &[u8]) -> Result<(), VmError> {
        self.vm.resume_from_bytes(device_state)
    }
}

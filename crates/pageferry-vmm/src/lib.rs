//! pageferry-vmm: a minimal KVM VMM whose guest keeps writing memory, so that pageferry can
//! live-migrate a *running* guest between two processes (or hosts).
//!
//! # How a VMM plugs into the engine
//!
//! The engine needs three things from a VMM, and this crate is a worked example of each:
//!
//! 1. **Memory** — a [`pageferry::memory::GuestMemory`] whose regions are the VMM's own guest-RAM
//!    mappings. Here guest RAM is a rust-vmm `vm-memory` `GuestMemoryMmap<AtomicBitmap>`
//!    ([`GuestRam`], one region at guest address 0, registered as KVM memory slot 0), and
//!    [`Vm::guest_memory`] hands the same mapping to the engine with pageferry's `vm-memory`
//!    feature (`GuestMemory::from_vm_memory`'s regions) as region `"ram@0x0"`. The source
//!    engine reads pages from it while the guest runs; the destination engine writes pages
//!    into the destination VM's (not yet running) mapping. A destination's region reports
//!    `is_fresh_zeroed`, so zero pages need not be written in round 0.
//! 2. **Dirty log** — a [`pageferry::dirty::DirtyTracker`]. [`Vm::dirty_tracker`] is the union
//!    ([`VmDirtyTracker`]) of KVM's dirty log, for the guest's writes, and pageferry's
//!    `AtomicBitmapTracker` over vm-memory's bitmap, for the VMM's own writes through
//!    [`Vm::guest_ram`] (device emulation, in a VMM that has devices). Guest writes happen inside
//!    KVM, so that part is KVM's own dirty log: [`KvmDirtyTracker`] turns on
//!    `KVM_MEM_LOG_DIRTY_PAGES` for the slot in `start`, harvests `KVM_GET_DIRTY_LOG` (optionally
//!    with `KVM_CLEAR_DIRTY_LOG`, see [`DirtyLogMode`]) straight into pageferry's bitmap layout
//!    (which is KVM's) in each `collect`, and turns logging off in `stop`.
//! 3. **Switchover** — [`pageferry::engine::SourceWorkload`] and
//!    [`pageferry::engine::DestinationWorkload`]. `pause` stops the vCPU (signal + `immediate_exit`)
//!    and returns the device state as bytes ([`DeviceState`]: registers, special registers, FPU,
//!    XSAVE, XCRs, MSRs, debug registers, vCPU events, MP state, plus pause-time clocks);
//!    `resume_after_failure` restarts it on the source; the destination's `resume` restores the
//!    state into its vCPU and runs it.
//!
//! ```no_run
//! use pageferry_vmm::{Vm, VmConfig};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Source process
//! let vm = Vm::new(VmConfig { mem_bytes: 1 << 30, working_set_bytes: 16 << 20, ..Default::default() })?;
//! vm.start()?;
//! let memory = vm.guest_memory();
//! let mut tracker = vm.dirty_tracker();
//! let mut workload = vm.source_workload();
//! // pageferry::engine::run_source(addr, &memory, &mut tracker, &mut workload, &cfg, &progress)?;
//!
//! // Destination process, size known in advance ...
//! let dst = Vm::new_destination(1 << 30)?;
//! let mut dst_workload = dst.destination_workload();
//! // pageferry::engine::run_destination(&listener, &dst.guest_memory(), &mut dst_workload, &cfg)?;
//! let report = dst.wait_resume_report(std::time::Duration::from_secs(1)).unwrap();
//! println!("downtime {:?}, guest continued at {:?}", report.downtime(), report.first_progress);
//! // ... or created at the size the source announces (see PendingDestination):
//! // run_destination_with(&listener, &mut |l| pending.provide(l), &mut pending.clone(), &cfg)
//! # Ok(()) }
//! ```
//!
//! # The guest
//!
//! No kernel and no boot: the host writes page tables, a GDT and a TSS into guest memory and
//! starts the vCPU directly in 64-bit mode at CPL 3 (on a PVM host, user-mode code runs natively
//! while kernel-mode code is emulated). The program ([`guest`] module docs) cycles over a working
//! set, stamping each page with an incrementing counter, at a configurable rate; the host reads
//! the counter from a status page ([`Vm::counter`]) and can verify the stamps
//! ([`Vm::check_pattern`]) after a migration. It never exits to the VMM.
//!
//! # Costs measured on the development host (PVM, 2 vCPUs, busy)
//!
//! - Harvesting the dirty log of a 256 MiB slot: ~65 µs with ~2,000 dirty pages, ~130 µs with
//!   4,097, ~2 ms with all 64,513 dirty. `KVM_CLEAR_DIRTY_LOG` mode is no faster here, so plain
//!   `KVM_GET_DIRTY_LOG` is the default.
//! - Pause: the vCPU is out of KVM_RUN ~60–120 µs after the request, the state is captured
//!   ~70–100 µs later (bulk MSR reads; each vCPU ioctl costs ~6 µs). Restore: ~100–170 µs. Waking
//!   the parked vCPU thread: ~130 µs. All of these grow to milliseconds when the host's CPUs are
//!   oversubscribed (the vCPU thread then waits for a CPU).
//!
//! # Downtime
//!
//! The device state carries the source's pause time (CLOCK_MONOTONIC, CLOCK_REALTIME and the
//! boot id). The destination records when its vCPU entered KVM_RUN and when the counter first
//! moved; [`ResumeReport::downtime`] is pause → running, exact on one host.

// `x.is_multiple_of(n)` needs Rust 1.87; the workspace supports older toolchains.
#![allow(clippy::manual_is_multiple_of)]

mod asm;
mod dirty;
mod error;
pub mod guest;
mod state;
mod sys;
mod time;
mod vcpu;
mod vm;
mod workload;

pub use dirty::{HarvestStats, KvmDirtyTracker, VmDirtyTracker};
pub use error::VmError;
pub use state::{DeviceState, PauseMeta, VcpuState, STATE_VERSION};
pub use time::{DowntimeClock, Stamp};
pub use workload::PendingDestination;
pub use vm::{
    kvm_available, DirtyLogMode, GuestMode, GuestRam, PatternReport, PauseReport, ResumeReport, Vm, VmConfig,
    VmDestinationWorkload, VmSourceWorkload, VmStatus, RAM_REGION,
};

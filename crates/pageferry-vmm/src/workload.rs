//! The engine's switchover traits for the VM: [`SourceWorkload`] and [`DestinationWorkload`].
//!
//! Why a separate file: the inherent methods on [`VmSourceWorkload`] / [`VmDestinationWorkload`]
//! carry the VMM's own error type; this is the adapter to the engine's boxed errors, plus
//! [`PendingDestination`] for a destination that learns the guest's size from the source.

use crate::vm::{Vm, VmDestinationWorkload, VmSourceWorkload, RAM_REGION};
use pageferry::engine::{DestinationWorkload, SourceWorkload, WorkloadError};
use pageferry::memory::GuestMemory;
use std::sync::{Arc, Mutex};

impl SourceWorkload for VmSourceWorkload {
    fn pause(&mut self) -> Result<Vec<u8>, WorkloadError> {
        Ok(VmSourceWorkload::pause(self)?)
    }
    fn resume_after_failure(&mut self) -> Result<(), WorkloadError> {
        Ok(VmSourceWorkload::resume_after_failure(self)?)
    }
    fn set_throttle(&mut self, pct: u8) -> Result<bool, WorkloadError> {
        VmSourceWorkload::set_throttle(self, pct);
        Ok(true)
    }
}

impl DestinationWorkload for VmDestinationWorkload {
    fn resume(&mut self, device_state: &[u8]) -> Result<(), WorkloadError> {
        Ok(VmDestinationWorkload::resume(self, device_state)?)
    }
}

/// A destination whose VM is created only when the source's region table arrives, for
/// `pageferry::engine::run_destination_with`: the destination process need not be told the
/// guest's size. Clones share the same VM slot, so one clone can serve as the `provide`
/// callback while another is the workload:
///
/// ```no_run
/// # use pageferry_vmm::PendingDestination;
/// # fn f(listener: &std::net::TcpListener, cfg: &pageferry::engine::DestinationConfig) -> Result<(), Box<dyn std::error::Error>> {
/// let pending = PendingDestination::new();
/// let mut workload = pending.clone();
/// pageferry::engine::run_destination_with(listener, &mut |layout| pending.provide(layout), &mut workload, cfg)?;
/// let vm = pending.take_vm().expect("created during the handshake");
/// println!("{:?}", vm.resume_report());
/// # Ok(()) }
/// ```
#[derive(Clone, Default)]
pub struct PendingDestination {
    vm: Arc<Mutex<Option<Vm>>>,
    /// The VM was made up front at a size the operator chose ([`with_ram`](Self::with_ram)):
    /// a source of another size is refused, the VM stays.
    fixed: bool,
}

impl PendingDestination {
    pub fn new() -> Self {
        Self::default()
    }

    /// A destination whose VM is made now, with `len` bytes of RAM (`vm recv --mem`): the
    /// handshake then refuses a source of another size.
    pub fn with_ram(len: u64) -> Result<Self, String> {
        let vm = Vm::new_destination(len).map_err(|e| e.to_string())?;
        Ok(Self { vm: Arc::new(Mutex::new(Some(vm))), fixed: true })
    }

    /// The engine's `provide` callback: accepts exactly one region, `"ram@0x0"`, and creates a
    /// destination VM of its size. A refusal (`Err`) is reported to both sides.
    ///
    /// It may be called again for the next source when the engine refused a handshake after
    /// this (e.g. postcopy not possible here): that VM never ran and nothing reached its
    /// memory, so it serves a source of the same size, and one of another size gets a new VM
    /// (unless the size was fixed with [`with_ram`](Self::with_ram)).
    pub fn provide(&self, layout: &[(String, u64)]) -> Result<GuestMemory, String> {
        let [(name, len)] = layout else {
            return Err(format!("a pageferry-vmm destination takes one region \"{RAM_REGION}\", the source offers {}", layout.len()));
        };
        if name != RAM_REGION {
            return Err(format!("a pageferry-vmm destination takes region \"{RAM_REGION}\", the source offers \"{name}\""));
        }
        let mut slot = self.vm.lock().unwrap();
        if let Some(vm) = slot.as_ref() {
            if vm.status() != crate::VmStatus::Created {
                return Err("this destination already holds a VM".into());
            }
            if vm.mem_bytes() == *len {
                return Ok(vm.guest_memory());
            }
            if self.fixed {
                return Err(format!("this destination's guest has {} bytes of RAM, the source's has {len}", vm.mem_bytes()));
            }
            // Made for a refused source (the engine dropped its memory before calling again).
            *slot = None;
        }
        let vm = Vm::new_destination(*len).map_err(|e| e.to_string())?;
        let memory = vm.guest_memory();
        *slot = Some(vm);
        Ok(memory)
    }

    /// The VM, once `provide` has created it (shared with clones until taken).
    pub fn take_vm(&self) -> Option<Vm> {
        self.vm.lock().unwrap().take()
    }
}

impl DestinationWorkload for PendingDestination {
    fn resume(&mut self, device_state: &[u8]) -> Result<(), WorkloadError> {
        match self.vm.lock().unwrap().as_ref() {
            Some(vm) => Ok(vm.resume(device_state)?),
            None => Err("no destination VM: the region table never arrived".into()),
        }
    }
}

//! [`UnionTracker`]: two trackers as one, for memory written by two kinds of writers.
//!
//! The usual case is a KVM VMM: the KVM dirty log sees the vCPUs' writes, vm-memory's bitmap
//! ([`super::AtomicBitmapTracker`], feature `vm-memory`) the VMM's own writes (device
//! emulation). Each round harvests both into the same set, one right after the other; since each
//! harvest reads-and-resets its source atomically, a write is reported by the round that
//! harvests its tracker after it, never lost. Nest unions for more than two.

use super::{DirtyError, DirtyPages, DirtyTracker};
use crate::memory::GuestMemory;

/// Reports every page either tracker reports. Started, collected and stopped together.
pub struct UnionTracker<A, B> {
    name: &'static str,
    a: A,
    b: B,
}

impl<A: DirtyTracker, B: DirtyTracker> UnionTracker<A, B> {
    /// The union of `a` and `b`, reported as `name` (e.g. "kvm-dirty-log+vm-memory-bitmap").
    pub fn new(name: &'static str, a: A, b: B) -> Self {
        Self { name, a, b }
    }
    /// The first tracker (e.g. to read its statistics).
    pub fn first(&self) -> &A {
        &self.a
    }
    /// The second tracker.
    pub fn second(&self) -> &B {
        &self.b
    }
    /// Both trackers back.
    pub fn into_parts(self) -> (A, B) {
        (self.a, self.b)
    }
}

impl<A: DirtyTracker, B: DirtyTracker> DirtyTracker for UnionTracker<A, B> {
    fn start(&mut self, memory: &GuestMemory) -> Result<(), DirtyError> {
        self.a.start(memory)?;
        if let Err(e) = self.b.start(memory) {
            self.a.stop();
            return Err(e);
        }
        Ok(())
    }

    fn collect(&mut self, into: &mut DirtyPages) -> Result<(), DirtyError> {
        self.a.collect(into)?;
        self.b.collect(into)
    }

    fn guest_may_write(&self) -> bool {
        self.a.guest_may_write() || self.b.guest_may_write()
    }

    fn stop(&mut self) {
        self.a.stop();
        self.b.stop();
    }

    fn name(&self) -> &'static str {
        self.name
    }
}

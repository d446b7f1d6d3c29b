//! vm-memory guest memory and trackers through the shared conformance suites.

use std::sync::{Arc, Mutex};

use ::vm_memory::bitmap::AtomicBitmap;
use ::vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::memory::{self, GuestMemory, PAGE_SIZE};

const P: usize = PAGE_SIZE;

/// Two regions with a hole between them, as a VMM lays out RAM below and above a PCI hole.
fn vm_ram() -> GuestMemoryMmap<AtomicBitmap> {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 * P), (GuestAddress(0x10_0000), 200 * P)]).unwrap()
}

fn gpa_of(memory: &GuestMemory, rid: usize, page: u64) -> GuestAddress {
    let name = memory.regions()[rid].name();
    let base = u64::from_str_radix(name.trim_start_matches("ram@0x"), 16).unwrap();
    GuestAddress(base + page * P as u64)
}

#[test]
fn vm_memory_regions_pass_the_memory_conformance_suite() {
    let len = 64 * P as u64;
    let plain = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0x4000_0000), len as usize)]).unwrap();
    let region = memory::GuestMemory::from_vm_memory(&plain).unwrap().regions()[0].clone();
    memory::conformance::run_suite(region, len);
    let tracked = vm_ram();
    for r in GuestMemory::from_vm_memory(&tracked).unwrap().regions() {
        memory::conformance::run_suite(r.clone(), r.len());
    }
}

#[test]
fn vm_memory_regions_share_the_mapping_and_have_stable_names() {
    let ram = vm_ram();
    let mem = GuestMemory::from_vm_memory(&ram).unwrap();
    // Same layout on another "host": same names, same ids.
    let other = GuestMemory::from_vm_memory(&vm_ram()).unwrap();
    assert_eq!(mem.layout(), vec![("ram@0x0".to_string(), 64 * P as u64), ("ram@0x100000".to_string(), 200 * P as u64)]);
    assert_eq!(mem.layout(), other.layout());
    // No copy: a write through vm-memory is visible at the region's host pointer, and back.
    ram.write_obj(0xDEAD_BEEFu32, GuestAddress(0x10_0000 + 5 * P as u64)).unwrap();
    let r1 = &mem.regions()[1];
    assert_eq!(unsafe { r1.host_ptr().add(5 * P).cast::<u32>().read_unaligned() }, 0xDEAD_BEEF);
    unsafe { r1.host_ptr().add(7 * P).write(0x5A) };
    assert_eq!(ram.read_obj::<u8>(GuestAddress(0x10_0000 + 7 * P as u64)).unwrap(), 0x5A);
    assert!(!r1.is_fresh_zeroed());
    assert_eq!(memory::vm_region_name(0x1_0000_0000), "ram@0x100000000");
}

#[test]
fn atomic_bitmap_tracker_conformance() {
    let ram = vm_ram();
    let mem = GuestMemory::from_vm_memory(&ram).unwrap();
    let mut t = AtomicBitmapTracker::new(&ram);
    let mut write = |rid: usize, page: u64| ram.write_obj(0xA5u8, gpa_of(&mem, rid, page)).unwrap();
    conformance::run_suite(&mem, &mut t, &mut write, true);
}

#[test]
fn atomic_bitmap_tracker_refuses_other_memory_and_ignores_writes_before_start() {
    let ram = vm_ram();
    let mut t = AtomicBitmapTracker::new(&ram);
    let foreign = GuestMemory::from_vm_memory(&vm_ram()).unwrap();
    assert!(t.start(&foreign).unwrap_err().to_string().contains("not this vm-memory memory's"));
    let mem = GuestMemory::from_vm_memory(&ram).unwrap();
    let mut d = DirtyPages::for_memory(&mem);
    assert!(matches!(t.collect(&mut d), Err(DirtyError::NotStarted)));
    ram.write_obj(1u8, GuestAddress(0)).unwrap(); // before start: round 0 sends it anyway
    t.start(&mem).unwrap();
    t.collect(&mut d).unwrap();
    assert_eq!(d.count(), mem.total_pages());
    let mut next = DirtyPages::for_memory(&mem);
    t.collect(&mut next).unwrap();
    assert_eq!(next.count(), 0, "a write from before start() reported in round 1");
}

/// A tracker fed by hand, standing in for a log that sees other writers (KVM's vCPU writes).
#[derive(Clone, Default)]
struct Scripted {
    pending: Arc<Mutex<Vec<(usize, u64)>>>,
    started: Arc<Mutex<bool>>,
    fail_start: bool,
}

impl DirtyTracker for Scripted {
    fn start(&mut self, _memory: &GuestMemory) -> Result<(), DirtyError> {
        if self.fail_start {
            return Err(DirtyError::Unsupported("scripted".into()));
        }
        *self.started.lock().unwrap() = true;
        Ok(())
    }
    fn collect(&mut self, into: &mut DirtyPages) -> Result<(), DirtyError> {
        for (rid, p) in self.pending.lock().unwrap().drain(..) {
            into.region_mut(rid).set(p);
        }
        Ok(())
    }
    fn guest_may_write(&self) -> bool {
        true
    }
    fn stop(&mut self) {
        *self.started.lock().unwrap() = false;
    }
    fn name(&self) -> &'static str {
        "scripted"
    }
}

#[test]
fn union_of_bitmap_and_another_log_conformance() {
    // Even pages are written through vm-memory (only the bitmap sees them), odd pages by "the
    // guest" (only the other log sees them): the union must report exactly all of them.
    let ram = vm_ram();
    let mem = GuestMemory::from_vm_memory(&ram).unwrap();
    let log = Scripted::default();
    let pending = log.pending.clone();
    let mut t = UnionTracker::new("scripted+vm-memory-bitmap", log, AtomicBitmapTracker::new(&ram));
    let mut write = |rid: usize, page: u64| {
        if page % 2 == 0 {
            ram.write_obj(0xA5u8, gpa_of(&mem, rid, page)).unwrap();
        } else {
            unsafe { mem.regions()[rid].host_ptr().add(page as usize * P).write_volatile(0xA5) };
            pending.lock().unwrap().push((rid, page));
        }
    };
    conformance::run_suite(&mem, &mut t, &mut write, true);
    assert_eq!(t.name(), "scripted+vm-memory-bitmap");
}

#[test]
fn union_reports_both_sides_and_rolls_back_a_failed_start() {
    let ram = vm_ram();
    let mem = GuestMemory::from_vm_memory(&ram).unwrap();
    let log = Scripted::default();
    let (pending, started) = (log.pending.clone(), log.started.clone());
    let mut t = UnionTracker::new("u", log, AtomicBitmapTracker::new(&ram));
    t.start(&mem).unwrap();
    let mut all = DirtyPages::for_memory(&mem);
    t.collect(&mut all).unwrap();
    assert_eq!(all.count(), mem.total_pages());
    ram.write_obj(1u8, GuestAddress(0x10_0000 + 9 * P as u64)).unwrap();
    pending.lock().unwrap().push((0, 3));
    let mut d = DirtyPages::for_memory(&mem);
    t.collect(&mut d).unwrap();
    assert_eq!(d.region(0).iter_set().collect::<Vec<_>>(), vec![3], "the other log's page");
    assert_eq!(d.region(1).iter_set().collect::<Vec<_>>(), vec![9], "vm-memory's page");
    t.stop();
    assert!(!*started.lock().unwrap());

    // The second tracker failing to start stops the first again.
    let first = Scripted::default();
    let started = first.started.clone();
    let mut bad = UnionTracker::new("u", first, Scripted { fail_start: true, ..Default::default() });
    assert!(matches!(bad.start(&mem), Err(DirtyError::Unsupported(_))));
    assert!(!*started.lock().unwrap(), "first tracker left running");
}

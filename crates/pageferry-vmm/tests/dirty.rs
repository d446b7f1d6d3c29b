//! KvmDirtyTracker: the engine's conformance suite with guest writes, exactness under a
//! running writer, and how long a harvest takes.

mod common;

use pageferry::dirty::{conformance, DirtyPages, DirtyTracker};
use pageferry::memory::PAGE_SIZE;
use pageferry_vmm::{guest, DirtyLogMode, GuestMode, Vm, VmConfig};
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn conformance_with(mode: DirtyLogMode) {
    let vm = Vm::new(VmConfig { mem_bytes: 64 * MIB, mode: GuestMode::OnDemand, dirty_log: mode, ..Default::default() }).unwrap();
    vm.start().unwrap();
    // Let the guest fault in its code and config pages before tracking starts.
    vm.guest_write_page(3, Duration::from_secs(10)).unwrap();
    let memory = vm.guest_memory();
    let mut tracker = vm.kvm_dirty_tracker();
    assert_eq!(tracker.mode(), mode);
    conformance::run_suite(
        &memory,
        &mut tracker,
        &mut |region, page| {
            assert_eq!(region, 0);
            vm.guest_write_page(page, Duration::from_secs(10)).unwrap();
        },
        true,
    );
    // Stopped trackers can be started again (a second migration attempt).
    let mut again = vm.kvm_dirty_tracker();
    again.start(&memory).unwrap();
    let mut all = DirtyPages::for_memory(&memory);
    again.collect(&mut all).unwrap();
    assert_eq!(all.count(), memory.total_pages());
    vm.guest_write_page(100, Duration::from_secs(10)).unwrap();
    let mut one = DirtyPages::for_memory(&memory);
    again.collect(&mut one).unwrap();
    assert_eq!(one.region(0).iter_set().collect::<Vec<_>>(), vec![100]);
    // Only one tracker at a time per VM.
    assert!(vm.dirty_tracker().start(&memory).is_err());
    again.stop();
    assert_eq!(vm.unexpected_exits(), 0);
}

/// The tracker migrations use: KVM's log united with vm-memory's bitmap. Even pages are written
/// by the guest (only KVM sees them), odd pages by the VMM through vm-memory (only the bitmap
/// sees them); the union must report exactly all of them, and KVM's log alone misses the VMM's.
#[test]
fn union_of_kvm_log_and_vm_memory_bitmap_conformance() {
    if common::skip() {
        return;
    }
    use vm_memory::{Bytes, GuestAddress};
    let vm = Vm::new(VmConfig { mem_bytes: 64 * MIB, mode: GuestMode::OnDemand, ..Default::default() }).unwrap();
    vm.start().unwrap();
    vm.guest_write_page(3, Duration::from_secs(10)).unwrap();
    let memory = vm.guest_memory();
    assert_eq!(memory.layout(), vec![(pageferry_vmm::RAM_REGION.to_string(), 64 * MIB)]);
    let mut tracker = vm.dirty_tracker();
    assert_eq!(tracker.name(), "kvm-dirty-log+vm-memory-bitmap");
    let mut write = |region: usize, page: u64| {
        assert_eq!(region, 0);
        if page % 2 == 0 {
            vm.guest_write_page(page, Duration::from_secs(10)).unwrap();
        } else {
            vm.guest_ram().write_obj(page, GuestAddress(page * PAGE_SIZE as u64)).unwrap();
        }
    };
    conformance::run_suite(&memory, &mut tracker, &mut write, true);

    // KVM's log alone does not see a write the VMM makes through vm-memory.
    let mut kvm = vm.kvm_dirty_tracker();
    kvm.start(&memory).unwrap();
    let mut all = DirtyPages::for_memory(&memory);
    kvm.collect(&mut all).unwrap();
    vm.guest_ram().write_obj(7u64, GuestAddress(101 * PAGE_SIZE as u64)).unwrap();
    let mut none = DirtyPages::for_memory(&memory);
    kvm.collect(&mut none).unwrap();
    assert!(!none.region(0).get(101), "the KVM log saw a host write");
    kvm.stop();
    assert_eq!(vm.unexpected_exits(), 0);
}

#[test]
fn conformance_get_dirty_log() {
    if common::skip() {
        return;
    }
    conformance_with(DirtyLogMode::GetLog);
}

#[test]
fn conformance_manual_protect() {
    if common::skip() {
        return;
    }
    conformance_with(DirtyLogMode::ManualProtect);
}

#[test]
fn tracker_refuses_foreign_memory() {
    if common::skip() {
        return;
    }
    let a = Vm::new(VmConfig { mem_bytes: 8 * MIB, working_set_bytes: MIB, ..Default::default() }).unwrap();
    let b = Vm::new(VmConfig { mem_bytes: 8 * MIB, working_set_bytes: MIB, ..Default::default() }).unwrap();
    assert!(a.dirty_tracker().start(&b.guest_memory()).is_err());
    let mut t = a.dirty_tracker();
    let mut d = DirtyPages::for_memory(&a.guest_memory());
    assert!(t.collect(&mut d).is_err(), "collect before start");
}

/// With a writer running, every reported page is in the working set or the status page, and
/// the working set is fully reported once the writer has cycled through it.
fn writer_exactness_and_harvest_time(mode: DirtyLogMode) {
    let ws = 16 * MIB;
    let vm = Vm::new(VmConfig {
        mem_bytes: 256 * MIB,
        working_set_bytes: ws,
        pages_per_tick: 64,
        tick: Some(Duration::from_micros(100)),
        dirty_log: mode,
        ..Default::default()
    })
    .unwrap();
    vm.start().unwrap();
    let ws_pages = ws / PAGE_SIZE as u64;
    // Warm up: one full pass over the working set (first touches are slow on this host).
    vm.wait_for_counter(ws_pages, Duration::from_secs(60)).unwrap();
    let memory = vm.guest_memory();
    let mut tracker = vm.kvm_dirty_tracker();
    let t = std::time::Instant::now();
    tracker.start(&memory).unwrap();
    let start_took = t.elapsed();
    let mut all = DirtyPages::for_memory(&memory);
    tracker.collect(&mut all).unwrap();
    let first = tracker.last_harvest().unwrap();
    let ws_range = guest::WORKING_SET_GPA / PAGE_SIZE as u64..(guest::WORKING_SET_GPA + ws) / PAGE_SIZE as u64;
    let status_page = guest::STATUS_GPA / PAGE_SIZE as u64;
    let mut kernel = Vec::new();
    let mut total = Vec::new();
    let mut counts = Vec::new();
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(10));
        let mut d = DirtyPages::for_memory(&memory);
        tracker.collect(&mut d).unwrap();
        let h = tracker.last_harvest().unwrap();
        kernel.push(h.kernel);
        total.push(h.total);
        counts.push(h.dirty_pages);
        for p in d.region(0).iter_set() {
            assert!(ws_range.contains(&p) || p == status_page, "page {p} reported but the guest never writes it");
        }
        assert_eq!(d.count(), h.dirty_pages);
    }
    // A long enough wait covers the whole working set.
    let c = vm.counter();
    vm.wait_for_counter(c + ws_pages, Duration::from_secs(60)).unwrap();
    let mut d = DirtyPages::for_memory(&memory);
    tracker.collect(&mut d).unwrap();
    let full = tracker.last_harvest().unwrap();
    assert_eq!(d.count(), ws_pages + 1, "whole working set + status page");
    tracker.stop();
    kernel.sort();
    total.sort();
    counts.sort();
    println!(
        "{mode:?}, 256 MiB slot: start {start_took:?}, first collect (everything) {:?}; 20 rounds of ~10 ms: kernel median {:?} max {:?}, collect median {:?} max {:?}, dirty pages median {}; full working set ({} pages): kernel {:?}",
        first.kernel,
        kernel[10],
        kernel[19],
        total[10],
        total[19],
        counts[10],
        full.dirty_pages,
        full.kernel
    );
}

#[test]
fn writer_exactness_and_harvest_time_get_dirty_log() {
    if common::skip() {
        return;
    }
    writer_exactness_and_harvest_time(DirtyLogMode::GetLog);
}

#[test]
fn writer_exactness_and_harvest_time_manual_protect() {
    if common::skip() {
        return;
    }
    writer_exactness_and_harvest_time(DirtyLogMode::ManualProtect);
}

/// Worst case: (almost) every page of a 256 MiB guest dirty in one round.
#[test]
fn harvest_time_all_dirty() {
    if common::skip() {
        return;
    }
    for mode in [DirtyLogMode::GetLog, DirtyLogMode::ManualProtect] {
        let ws = 252 * MIB;
        let vm = Vm::new(VmConfig { mem_bytes: 256 * MIB, working_set_bytes: ws, pages_per_tick: 4096, dirty_log: mode, ..Default::default() }).unwrap();
        vm.start().unwrap();
        let ws_pages = ws / PAGE_SIZE as u64;
        vm.wait_for_counter(ws_pages, Duration::from_secs(120)).unwrap();
        let memory = vm.guest_memory();
        let mut tracker = vm.kvm_dirty_tracker();
        tracker.start(&memory).unwrap();
        let mut d = DirtyPages::for_memory(&memory);
        tracker.collect(&mut d).unwrap();
        let mut kernel = Vec::new();
        for _ in 0..5 {
            let c = vm.counter();
            vm.wait_for_counter(c + ws_pages, Duration::from_secs(60)).unwrap();
            let mut d = DirtyPages::for_memory(&memory);
            tracker.collect(&mut d).unwrap();
            let h = tracker.last_harvest().unwrap();
            assert_eq!(h.dirty_pages, ws_pages + 1);
            kernel.push(h.kernel);
        }
        kernel.sort();
        println!("{mode:?}, 256 MiB slot, {} dirty pages per round: harvest median {:?}, min {:?}, max {:?}", ws_pages + 1, kernel[2], kernel[0], kernel[4]);
    }
}

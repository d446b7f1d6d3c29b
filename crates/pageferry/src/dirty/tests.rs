use super::*;
use crate::memory::{GuestMemory, MmapRegion, PAGE_SIZE};
use std::sync::Arc;

fn two_regions(make: &dyn Fn(&str, u64) -> MmapRegion) -> GuestMemory {
    GuestMemory::new(vec![Arc::new(make("a", 64 * PAGE_SIZE as u64)), Arc::new(make("b", 200 * PAGE_SIZE as u64))]).unwrap()
}

fn host_writer(memory: &GuestMemory) -> impl FnMut(usize, u64) + '_ {
    move |rid, page| {
        let r = &memory.regions()[rid];
        // SAFETY: page is in range (suite picks pages < pages()).
        unsafe { r.host_ptr().add(page as usize * PAGE_SIZE).write_volatile(0xA5) };
    }
}

#[test]
fn static_tracker_conformance() {
    let mem = two_regions(&|n, l| MmapRegion::anonymous(n, l).unwrap());
    let mut t = StaticTracker::new();
    conformance::run_suite(&mem, &mut t, &mut host_writer(&mem), true);
}

#[test]
fn static_tracker_requires_start() {
    let mem = two_regions(&|n, l| MmapRegion::anonymous(n, l).unwrap());
    let mut d = DirtyPages::for_memory(&mem);
    assert!(matches!(StaticTracker::new().collect(&mut d), Err(DirtyError::NotStarted)));
}

fn uffd_available() -> bool {
    match UffdTracker::probe() {
        Ok(()) => true,
        Err(e) => {
            eprintln!("skipping uffd tracker test: {e}");
            false
        }
    }
}

#[test]
fn uffd_tracker_conformance_anonymous() {
    if !uffd_available() {
        return;
    }
    let mem = two_regions(&|n, l| MmapRegion::anonymous(n, l).unwrap());
    let mut t = UffdTracker::new();
    conformance::run_suite(&mem, &mut t, &mut host_writer(&mem), true);
}

#[test]
fn uffd_tracker_conformance_memfd() {
    if !uffd_available() {
        return;
    }
    let mem = two_regions(&|n, l| MmapRegion::memfd(n, l).unwrap());
    let mut t = UffdTracker::new();
    conformance::run_suite(&mem, &mut t, &mut host_writer(&mem), true);
}

#[test]
fn uffd_tracker_conformance_shm_file() {
    if !uffd_available() {
        return;
    }
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let mem = two_regions(&|n, l| MmapRegion::create_file(n, &dir.path().join(n), l).unwrap());
    let mut t = UffdTracker::new();
    conformance::run_suite(&mem, &mut t, &mut host_writer(&mem), true);
}

#[test]
fn uffd_tracker_sees_populated_pages_rewritten() {
    if !uffd_available() {
        return;
    }
    let mem = GuestMemory::single(MmapRegion::anonymous("r", 4096 * PAGE_SIZE as u64).unwrap()).unwrap();
    let r = mem.regions()[0].clone();
    // Populate every page before tracking starts.
    unsafe { std::ptr::write_bytes(r.host_ptr(), 1, r.len() as usize) };
    let mut t = UffdTracker::new();
    t.start(&mem).unwrap();
    let mut d = DirtyPages::for_memory(&mem);
    t.collect(&mut d).unwrap();
    for p in (0..4096).step_by(7) {
        unsafe { r.host_ptr().add(p * PAGE_SIZE + 100).write_volatile(2) };
    }
    let mut d = DirtyPages::for_memory(&mem);
    t.collect(&mut d).unwrap();
    let got: Vec<u64> = d.region(0).iter_set().collect();
    let want: Vec<u64> = (0..4096).step_by(7).collect();
    assert_eq!(got, want);
}

#[test]
fn bitmap_ranges_and_iteration() {
    let mut b = DirtyBitmap::new(200);
    b.set_range(3, 130);
    assert_eq!(b.count(), 127);
    assert!(!b.get(2) && b.get(3) && b.get(129) && !b.get(130));
    b.set_range(190, 1000);
    assert_eq!(b.count(), 137);
    assert_eq!(b.iter_set().next(), Some(3));
    assert_eq!(b.iter_set().last(), Some(199));
    b.clear();
    assert_eq!(b.count(), 0);
}

/// A writer thread stamps pages while the main thread repeatedly collects and copies the
/// reported pages into a shadow; after the writer stops, one last collect-and-copy must make
/// the shadow equal to memory. This is the pre-copy loop reduced to its tracker.
fn concurrent_writes_are_never_missed(mem: GuestMemory) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let r = mem.regions()[0].clone();
    let len = r.len() as usize;
    unsafe { std::ptr::write_bytes(r.host_ptr(), 7, len) };
    let mut t = UffdTracker::new();
    t.start(&mem).unwrap();
    let mut shadow = vec![0u8; len];
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let writer = {
        let (r, stop) = (r.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut x: u64 = 99;
            let mut n: u64 = 0;
            while !stop.load(Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let page = (x % r.pages()) as usize;
                n += 1;
                for i in (0..PAGE_SIZE / 8).step_by(64) {
                    unsafe { (r.host_ptr().add(page * PAGE_SIZE) as *mut u64).add(i).write_volatile(n) };
                }
            }
        })
    };
    let copy = |d: &DirtyPages, shadow: &mut [u8]| {
        for p in d.region(0).iter_set() {
            let o = p as usize * PAGE_SIZE;
            unsafe { std::ptr::copy_nonoverlapping(r.host_ptr().add(o), shadow.as_mut_ptr().add(o), PAGE_SIZE) };
        }
    };
    let rounds: usize = std::env::var("PF_STRESS_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    for _ in 0..rounds {
        let mut d = DirtyPages::for_memory(&mem);
        t.collect(&mut d).unwrap();
        copy(&d, &mut shadow);
    }
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    let mut d = DirtyPages::for_memory(&mem);
    t.collect(&mut d).unwrap();
    copy(&d, &mut shadow);
    let mem_bytes = unsafe { std::slice::from_raw_parts(r.host_ptr(), len) };
    let bad: Vec<usize> = (0..len / PAGE_SIZE).filter(|&p| mem_bytes[p * PAGE_SIZE..(p + 1) * PAGE_SIZE] != shadow[p * PAGE_SIZE..(p + 1) * PAGE_SIZE]).collect();
    assert!(bad.is_empty(), "{} pages written but never reported, e.g. {:?}", bad.len(), &bad[..bad.len().min(5)]);
}

#[test]
fn uffd_tracker_never_misses_concurrent_writes_anonymous() {
    if !uffd_available() {
        return;
    }
    concurrent_writes_are_never_missed(GuestMemory::single(MmapRegion::anonymous("r", 16 << 20).unwrap()).unwrap());
}

#[test]
fn uffd_tracker_never_misses_concurrent_writes_shm_file() {
    if !uffd_available() {
        return;
    }
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    concurrent_writes_are_never_missed(GuestMemory::single(MmapRegion::create_file("r", &dir.path().join("r"), 16 << 20).unwrap()).unwrap());
}

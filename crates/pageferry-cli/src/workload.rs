//! A workload that keeps writing source memory during a migration (`--dirty-rate`), so rounds,
//! convergence and downtime can be seen on image migrations. It is paused at switchover.

use pageferry::engine::{SourceWorkload, WorkloadError};
use pageferry::memory::{GuestMemory, PAGE_SIZE};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct DirtyWriter {
    stop: Arc<AtomicBool>,
    pub pages_written: Arc<AtomicU64>,
    /// Auto-converge throttle, percent of each slice spent sleeping.
    throttle: Arc<AtomicU8>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The writer works in slices of this much running time; a throttle of p% adds a sleep of
/// p/(100-p) slices after each (QEMU's cpu-throttle: the vCPU runs a 10 ms timeslice, then
/// sleeps so that p% of the wall time is spent asleep).
pub const SLICE: Duration = Duration::from_millis(10);

/// How long a throttled writer sleeps after each `SLICE` of running.
pub fn throttle_sleep(pct: u8) -> Duration {
    let pct = pct.min(99) as u32;
    SLICE * pct / (100 - pct)
}

impl DirtyWriter {
    /// Write `bytes_per_sec` (in whole pages) to pages of the first `working_set` bytes of
    /// region 0, in a pseudo-random order, starting now. The rate is paced on running time,
    /// so a throttle of p% lowers it by p%.
    pub fn start(memory: &GuestMemory, bytes_per_sec: u64, working_set: u64) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let pages_written = Arc::new(AtomicU64::new(0));
        let throttle = Arc::new(AtomicU8::new(0));
        let region = memory.regions()[0].clone();
        let pages = (working_set.min(region.len()) / PAGE_SIZE as u64).max(1);
        let per_sec = (bytes_per_sec / PAGE_SIZE as u64).max(1);
        let (s, w, th) = (stop.clone(), pages_written.clone(), throttle.clone());
        let thread = std::thread::Builder::new()
            .name("dirty-writer".into())
            .spawn(move || {
                let mut x: u64 = 0x2545F4914F6CDD1D;
                let mut n = 0u64;
                // Running time so far (wall time minus throttle sleeps): the pace's clock.
                let mut ran = Duration::ZERO;
                let mut slice_start = Instant::now();
                while !s.load(Ordering::Relaxed) {
                    let in_slice = slice_start.elapsed();
                    if in_slice >= SLICE {
                        ran += in_slice;
                        let pct = th.load(Ordering::Relaxed);
                        if pct > 0 {
                            std::thread::sleep(throttle_sleep(pct));
                        }
                        slice_start = Instant::now();
                        continue;
                    }
                    // Pace: n pages by now.
                    let due = ((ran + in_slice).as_secs_f64() * per_sec as f64) as u64;
                    if n >= due {
                        std::thread::sleep(Duration::from_micros(500));
                        continue;
                    }
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let page = x % pages;
                    // SAFETY: page < region pages; plain stores into guest memory.
                    unsafe {
                        let p = region.host_ptr().add(page as usize * PAGE_SIZE) as *mut u64;
                        // Stamp a counter into a few words: content changes, stays compressible.
                        for i in (0..PAGE_SIZE / 8).step_by(64) {
                            p.add(i).write_volatile(n ^ (i as u64) << 40);
                        }
                    }
                    n += 1;
                    w.store(n, Ordering::Relaxed);
                }
            })
            .expect("spawn dirty writer");
        Self { stop, pages_written, throttle, thread: Some(thread) }
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl SourceWorkload for DirtyWriter {
    fn pause(&mut self) -> Result<Vec<u8>, WorkloadError> {
        self.halt();
        Ok(self.pages_written.load(Ordering::SeqCst).to_le_bytes().to_vec())
    }
    fn resume_after_failure(&mut self) -> Result<(), WorkloadError> {
        // The writer is a test load: leaving it stopped is the safe state.
        Ok(())
    }
    fn set_throttle(&mut self, pct: u8) -> Result<bool, WorkloadError> {
        self.throttle.store(pct.min(99), Ordering::Relaxed);
        Ok(true)
    }
}

impl Drop for DirtyWriter {
    fn drop(&mut self) {
        self.halt();
    }
}

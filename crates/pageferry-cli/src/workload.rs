//! A workload that keeps writing source memory during a migration (`--dirty-rate`), so rounds,
//! convergence and downtime can be seen on image migrations. It is paused at switchover.

use pageferry::engine::{SourceWorkload, WorkloadError};
use pageferry::memory::{GuestMemory, PAGE_SIZE};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct DirtyWriter {
    stop: Arc<AtomicBool>,
    pub pages_written: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DirtyWriter {
    /// Write `bytes_per_sec` (in whole pages) to pages of the first `working_set` bytes of
    /// region 0, in a pseudo-random order, starting now.
    pub fn start(memory: &GuestMemory, bytes_per_sec: u64, working_set: u64) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let pages_written = Arc::new(AtomicU64::new(0));
        let region = memory.regions()[0].clone();
        let pages = (working_set.min(region.len()) / PAGE_SIZE as u64).max(1);
        let per_sec = (bytes_per_sec / PAGE_SIZE as u64).max(1);
        let (s, w) = (stop.clone(), pages_written.clone());
        let thread = std::thread::Builder::new()
            .name("dirty-writer".into())
            .spawn(move || {
                let t0 = Instant::now();
                let mut x: u64 = 0x2545F4914F6CDD1D;
                let mut n = 0u64;
                while !s.load(Ordering::Relaxed) {
                    // Pace: n pages by now.
                    let due = (t0.elapsed().as_secs_f64() * per_sec as f64) as u64;
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
        Self { stop, pages_written, thread: Some(thread) }
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
}

impl Drop for DirtyWriter {
    fn drop(&mut self) {
        self.halt();
    }
}

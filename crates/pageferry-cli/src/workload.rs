//! A workload that keeps writing source memory during a migration (`--dirty-rate`), so rounds,
//! convergence and downtime can be seen on image migrations. It is paused at switchover.

use pageferry::engine::{DestinationWorkload, SourceWorkload, WorkloadError};
use pageferry::memory::{GuestMemory, PAGE_SIZE};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where a writer is in its sequence: the n-th write stamps `n` into page `x_n % pages`,
/// with `x` a xorshift64 sequence. Its bytes are the device state a source hands over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WriterState {
    /// xorshift state after the last write.
    pub x: u64,
    /// Writes done.
    pub n: u64,
    pub per_sec: u64,
    /// Pages written to, from the start of region 0.
    pub pages: u64,
}

impl WriterState {
    pub fn to_bytes(self) -> Vec<u8> {
        [self.x, self.n, self.per_sec, self.pages].iter().flat_map(|v| v.to_le_bytes()).collect()
    }
    pub fn from_bytes(b: &[u8]) -> Result<Self, String> {
        if b.len() != 32 {
            return Err(format!("dirty writer state is {} bytes, expected 32", b.len()));
        }
        let w = |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().unwrap());
        let s = Self { x: w(0), n: w(1), per_sec: w(2), pages: w(3) };
        if s.per_sec == 0 || s.pages == 0 || s.x == 0 {
            return Err("dirty writer state with zero rate, pages or seed".into());
        }
        Ok(s)
    }
}

/// The writer's sequence step (xorshift64).
pub fn next_x(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

/// The n-th write: stamp `n` into a few words of `page` (content changes, stays compressible).
///
/// # Safety
/// `base` must point to a mapping that holds `page`.
pub unsafe fn stamp(base: *mut u8, page: u64, n: u64) {
    let p = base.add(page as usize * PAGE_SIZE) as *mut u64;
    for i in (0..PAGE_SIZE / 8).step_by(64) {
        p.add(i).write_volatile(n ^ (i as u64) << 40);
    }
}

pub struct DirtyWriter {
    stop: Arc<AtomicBool>,
    pub pages_written: Arc<AtomicU64>,
    last_x: Arc<AtomicU64>,
    per_sec: u64,
    pages: u64,
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
        let region_len = memory.regions()[0].len();
        let state = WriterState {
            x: 0x2545F4914F6CDD1D,
            n: 0,
            per_sec: (bytes_per_sec / PAGE_SIZE as u64).max(1),
            pages: (working_set.min(region_len) / PAGE_SIZE as u64).max(1),
        };
        Self::resume_at(memory, state)
    }

    /// Continue a writer from `state` (a source's writer, paused for a postcopy switchover).
    pub fn resume_at(memory: &GuestMemory, state: WriterState) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let pages_written = Arc::new(AtomicU64::new(state.n));
        let last_x = Arc::new(AtomicU64::new(state.x));
        let throttle = Arc::new(AtomicU8::new(0));
        let region = memory.regions()[0].clone();
        let pages = state.pages.min(region.pages()).max(1);
        let per_sec = state.per_sec;
        let (s, w, th, lx) = (stop.clone(), pages_written.clone(), throttle.clone(), last_x.clone());
        let start_n = state.n;
        let thread = std::thread::Builder::new()
            .name("dirty-writer".into())
            .spawn(move || {
                let mut x = state.x;
                let mut n = start_n;
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
                    let due = start_n + ((ran + in_slice).as_secs_f64() * per_sec as f64) as u64;
                    if n >= due {
                        std::thread::sleep(Duration::from_micros(500));
                        continue;
                    }
                    x = next_x(x);
                    // SAFETY: the page is inside the region; plain stores into guest memory.
                    unsafe { stamp(region.host_ptr(), x % pages, n) };
                    n += 1;
                    w.store(n, Ordering::Relaxed);
                    lx.store(x, Ordering::Relaxed);
                }
            })
            .expect("spawn dirty writer");
        Self { stop, pages_written, last_x, per_sec, pages, throttle, thread: Some(thread) }
    }

    /// Where the writer is (after `pause` or `halt`, where it stopped).
    pub fn state(&self) -> WriterState {
        WriterState { x: self.last_x.load(Ordering::SeqCst), n: self.pages_written.load(Ordering::SeqCst), per_sec: self.per_sec, pages: self.pages }
    }

    /// Ask the writer to stop without waiting for it (it may be blocked on a page that will
    /// never arrive: a failed postcopy).
    pub fn detach(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take();
    }

    pub fn halt(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl SourceWorkload for DirtyWriter {
    fn pause(&mut self) -> Result<Vec<u8>, WorkloadError> {
        self.halt();
        Ok(self.state().to_bytes())
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

/// The destination side of the writer: `resume` continues the source's writer on the
/// destination's memory (for postcopy, as soon as the device state arrives; after pre-copy,
/// once all memory is there). An empty device state (no writer on the source) starts nothing.
#[derive(Clone, Default)]
pub struct ResumeWriter {
    /// The destination's memory, set when the region table has arrived; held weakly, so a
    /// handshake refused after it was made still drops it (the engine holds the session's).
    pub memory: Arc<std::sync::Mutex<crate::partial::WeakMemory>>,
    /// The writer once resumed, and where it started.
    pub running: Arc<std::sync::Mutex<Option<(WriterState, DirtyWriter)>>>,
}

impl DestinationWorkload for ResumeWriter {
    fn resume(&mut self, device_state: &[u8]) -> Result<(), WorkloadError> {
        if device_state.is_empty() {
            return Ok(());
        }
        let state = WriterState::from_bytes(device_state)?;
        let memory = self.memory.lock().unwrap().upgrade().ok_or("no destination memory")?;
        *self.running.lock().unwrap() = Some((state, DirtyWriter::resume_at(&memory, state)));
        Ok(())
    }
}

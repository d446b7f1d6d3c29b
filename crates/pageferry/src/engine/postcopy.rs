//! Postcopy on the destination: guest memory registered with userfaultfd in MISSING mode, the
//! pages the source still had dirty at switchover discarded, a fault thread that asks the
//! source for the pages the running workload touches, and placement of arriving pages with
//! `UFFDIO_COPY` / `UFFDIO_ZEROPAGE`, which never overwrite a page already there (`EEXIST`:
//! the page came earlier, by the other path — urgent or background — and may already have
//! been written by the running workload).
//!
//! Backings: anonymous memory (private) and shared memory (memfd, files on tmpfs such as
//! /dev/shm, with `UFFD_FEATURE_MISSING_SHMEM`). Discarding uses `MADV_REMOVE` on shared
//! mappings (punches the page out of the file) and `MADV_DONTNEED` on private ones; either way
//! the next access is a MISSING fault. Files on other file systems cannot be registered and
//! are refused before the switchover.
//!
//! Fault latency is measured from the moment the fault thread reads the fault (the kernel
//! does not timestamp faults) to the moment `UFFDIO_COPY` (or `ZEROPAGE`) placed the page.
//!
//! The uapi definitions (`include/uapi/linux/userfaultfd.h`, which the libc crate lacks) are
//! in `uffd_sys.rs`, shared with the write-protect dirty tracker.

use crate::memory::{GuestMemory, PAGE_SIZE};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::uffd_sys::*;

fn os(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

/// A bitmap safe to set from several threads.
pub(crate) struct AtomicBitmap(Vec<AtomicU64>);

impl AtomicBitmap {
    pub fn new(pages: u64) -> Self {
        Self((0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect())
    }
    /// Set the bit; true if it was clear.
    pub fn set(&self, page: u64) -> bool {
        let bit = 1u64 << (page % 64);
        self.0[(page / 64) as usize].fetch_or(bit, Ordering::AcqRel) & bit == 0
    }
    pub fn get(&self, page: u64) -> bool {
        self.0[(page / 64) as usize].load(Ordering::Acquire) & (1u64 << (page % 64)) != 0
    }
}

pub use crate::wire::PostcopyStats;

struct Region {
    base: u64,
    len: u64,
    /// Pages present (placed in postcopy, or never discarded).
    placed: AtomicBitmap,
    /// Pages discarded at switchover: the ones postcopy must deliver.
    wanted: AtomicBitmap,
    /// Pages already requested from the source.
    requested: AtomicBitmap,
}

/// The destination's postcopy state, shared by the channel readers (placement), the fault
/// thread (requests) and the control loop (completion).
pub(crate) struct Placer {
    uffd: OwnedFd,
    /// Only user-mode faults are reported (see `open_uffd`).
    user_mode_only: bool,
    regions: Vec<Region>,
    /// Discarded pages not yet placed; postcopy is complete at 0.
    remaining: AtomicU64,
    discarded: u64,
    /// Fault times of requested pages not yet placed.
    pending: Mutex<std::collections::HashMap<(u16, u32), Instant>>,
    latencies_ns: Mutex<Vec<u64>>,
    faults: AtomicU64,
    requested: AtomicU64,
    duplicates: AtomicU64,
    have_zeropage: Vec<bool>,
}

/// Check that this kernel can do postcopy on `memory` (for a clear refusal before the
/// switchover rather than after): userfaultfd MISSING on every region, and, with
/// `kernel_faults`, for faults the kernel takes on behalf of the workload (KVM) too.
pub(crate) fn probe(memory: &GuestMemory, kernel_faults: bool) -> Result<(), String> {
    let p = Placer::register(memory)?;
    if kernel_faults && p.user_mode_only {
        return Err("userfaultfd here handles user-mode faults only (not root, vm.unprivileged_userfaultfd=0), and this destination's guest faults from the kernel (KVM)".into());
    }
    Ok(())
}

/// A userfaultfd, and whether it is limited to user-mode faults.
fn open_uffd() -> Result<(OwnedFd, bool), String> {
    // Kernel-mode faults too (a VMM's KVM touches guest memory from the kernel); fall back to
    // user-mode-only where unprivileged userfaultfd is limited to that.
    for (flags, user_only) in [(libc::O_CLOEXEC | libc::O_NONBLOCK, false), (libc::O_CLOEXEC | libc::O_NONBLOCK | UFFD_USER_MODE_ONLY, true)] {
        // SAFETY: plain syscall; result checked.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        if fd >= 0 {
            // SAFETY: a fresh descriptor we own.
            return Ok((unsafe { OwnedFd::from_raw_fd(fd as i32) }, user_only));
        }
    }
    Err(os("userfaultfd"))
}

impl Placer {
    /// Open a userfaultfd and register every region of `memory` for MISSING faults.
    fn register(memory: &GuestMemory) -> Result<Self, String> {
        let (uffd, _) = open_uffd()?;
        let fd = uffd.as_raw_fd();
        let mut api = UffdioApi { api: UFFD_API, ..Default::default() };
        // SAFETY: UFFDIO_API takes a uffdio_api.
        if unsafe { ioctl(fd, UFFDIO_API, &mut api) } != 0 {
            return Err(os("UFFDIO_API"));
        }
        let avail = api.features;
        drop(uffd);
        let (uffd, user_mode_only) = open_uffd()?;
        let fd = uffd.as_raw_fd();
        let mut api = UffdioApi { api: UFFD_API, features: avail & UFFD_FEATURE_MISSING_SHMEM, ..Default::default() };
        // SAFETY: UFFDIO_API takes a uffdio_api.
        if unsafe { ioctl(fd, UFFDIO_API, &mut api) } != 0 {
            return Err(os("UFFDIO_API"));
        }
        let mut regions = Vec::new();
        let mut have_zeropage = Vec::new();
        for r in memory.regions() {
            let mut reg = UffdioRegister { range: UffdioRange { start: r.host_ptr() as u64, len: r.len() }, mode: UFFDIO_REGISTER_MODE_MISSING, ioctls: 0 };
            // SAFETY: UFFDIO_REGISTER takes a uffdio_register.
            if unsafe { ioctl(fd, UFFDIO_REGISTER, &mut reg) } != 0 {
                return Err(format!(
                    "region '{}' cannot take userfaultfd MISSING faults ({}); postcopy needs anonymous memory, a memfd or a file on tmpfs (/dev/shm)",
                    r.name(),
                    std::io::Error::last_os_error()
                ));
            }
            if reg.ioctls & HAVE_COPY == 0 {
                return Err(format!("region '{}': the kernel offers no UFFDIO_COPY for it", r.name()));
            }
            have_zeropage.push(reg.ioctls & HAVE_ZEROPAGE != 0);
            let pages = r.pages();
            regions.push(Region { base: r.host_ptr() as u64, len: r.len(), placed: AtomicBitmap::new(pages), wanted: AtomicBitmap::new(pages), requested: AtomicBitmap::new(pages) });
        }
        Ok(Self {
            uffd,
            user_mode_only,
            regions,
            remaining: AtomicU64::new(0),
            discarded: 0,
            pending: Mutex::new(Default::default()),
            latencies_ns: Mutex::new(Vec::new()),
            faults: AtomicU64::new(0),
            requested: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            have_zeropage,
        })
    }

    /// Register `memory` and discard `ranges` (region, first page, pages) — the pages the
    /// source still had dirty at switchover. Every other page stays as pre-copy left it.
    pub fn start(memory: &GuestMemory, ranges: &[(u16, u32, u32)]) -> Result<Self, String> {
        let mut p = Self::register(memory)?;
        // Every range checked before any page is dropped.
        for &(rid, first, n) in ranges {
            let r = p.regions.get(rid as usize).ok_or_else(|| format!("discard range names region {rid}, which does not exist"))?;
            let (first, n) = (first as u64, n as u64);
            if n == 0 || first.checked_add(n).is_none_or(|end| end * PAGE_SIZE as u64 > r.len) {
                return Err(format!("discard range {first}+{n} outside region {rid}"));
            }
        }
        let mut discarded = 0u64;
        for &(rid, first, n) in ranges {
            let r = p.regions.get(rid as usize).ok_or_else(|| format!("discard range names region {rid}, which does not exist"))?;
            let (first, n) = (first as u64, n as u64);
            if n == 0 || first.checked_add(n).is_none_or(|end| end * PAGE_SIZE as u64 > r.len) {
                return Err(format!("discard range {first}+{n} outside region {rid}"));
            }
            let addr = (r.base + first * PAGE_SIZE as u64) as *mut libc::c_void;
            let len = (n * PAGE_SIZE as u64) as usize;
            // Shared memory: punch the pages out of the file; private: drop them.
            // SAFETY: a range inside the region's mapping; its contents are to be replaced.
            let ok = unsafe { libc::madvise(addr, len, libc::MADV_REMOVE) == 0 || libc::madvise(addr, len, libc::MADV_DONTNEED) == 0 };
            if !ok {
                return Err(os("discarding pages (madvise)"));
            }
            for pg in first..first + n {
                if r.wanted.set(pg) {
                    discarded += 1;
                }
            }
        }
        // Everything not discarded is present (possibly as a hole of a fresh destination that
        // round 0 skipped: that reads as zero, and a fault on it is served too).
        for r in &p.regions {
            for (w, pl) in r.wanted.0.iter().zip(&r.placed.0) {
                pl.store(!w.load(Ordering::Relaxed), Ordering::Relaxed);
            }
        }
        p.remaining = AtomicU64::new(discarded);
        p.discarded = discarded;
        Ok(p)
    }

    /// Discarded pages still missing.
    pub fn remaining(&self) -> u64 {
        self.remaining.load(Ordering::Acquire)
    }

    /// Place `normal` pages (their contents, in order, in `data`) and `zero` pages of region
    /// `rid`. Pages already present are left alone.
    pub fn place(&self, rid: u16, normal: &[u32], data: &[u8], zero: &[u32]) -> Result<(), String> {
        let r = self.regions.get(rid as usize).ok_or_else(|| format!("region {rid} does not exist"))?;
        let mut i = 0;
        while i < normal.len() {
            let mut j = i + 1;
            while j < normal.len() && normal[j] == normal[j - 1] + 1 {
                j += 1;
            }
            self.place_run(rid, r, normal[i], (j - i) as u32, Some(&data[i * PAGE_SIZE..j * PAGE_SIZE]))?;
            i = j;
        }
        let mut i = 0;
        while i < zero.len() {
            let mut j = i + 1;
            while j < zero.len() && zero[j] == zero[j - 1] + 1 {
                j += 1;
            }
            if self.have_zeropage[rid as usize] {
                self.place_run(rid, r, zero[i], (j - i) as u32, None)?;
            } else {
                let zeros = vec![0u8; (j - i) * PAGE_SIZE];
                self.place_run(rid, r, zero[i], (j - i) as u32, Some(&zeros))?;
            }
            i = j;
        }
        Ok(())
    }

    /// One run of consecutive pages; skips the ones already present (EEXIST).
    fn place_run(&self, rid: u16, r: &Region, first: u32, n: u32, data: Option<&[u8]>) -> Result<(), String> {
        let fd = self.uffd.as_raw_fd();
        let mut at = 0u32; // pages of the run done
        while at < n {
            let page = (first + at) as u64;
            if r.placed.get(page) {
                self.duplicates.fetch_add(1, Ordering::Relaxed);
                at += 1;
                continue;
            }
            // Extend over pages not yet known to be present.
            let mut end = at + 1;
            while end < n && !r.placed.get((first + end) as u64) {
                end += 1;
            }
            let dst = r.base + page * PAGE_SIZE as u64;
            let len = ((end - at) as usize * PAGE_SIZE) as u64;
            let (rc, done) = match data {
                Some(d) => {
                    let src = d[at as usize * PAGE_SIZE..].as_ptr() as u64;
                    let mut c = UffdioCopy { dst, src, len, mode: 0, copy: 0 };
                    // SAFETY: UFFDIO_COPY takes a uffdio_copy; src points to len readable bytes,
                    // dst is inside the registered region.
                    let rc = unsafe { ioctl(fd, UFFDIO_COPY, &mut c) };
                    (rc, c.copy)
                }
                None => {
                    let mut z = UffdioZeropage { range: UffdioRange { start: dst, len }, mode: 0, zeropage: 0 };
                    // SAFETY: UFFDIO_ZEROPAGE takes a uffdio_zeropage inside the region.
                    let rc = unsafe { ioctl(fd, UFFDIO_ZEROPAGE, &mut z) };
                    (rc, z.zeropage)
                }
            };
            let copied_pages = if done > 0 { (done as u64 / PAGE_SIZE as u64) as u32 } else { 0 };
            let now = Instant::now();
            for k in at..at + copied_pages {
                self.mark_placed(rid, r, (first + k) as u64, now);
            }
            if rc == 0 {
                at = end;
                continue;
            }
            match std::io::Error::last_os_error().raw_os_error() {
                // The page after the copied ones is present (placed by the other path): skip it.
                Some(libc::EEXIST) => {
                    let p = first + at + copied_pages;
                    if r.placed.set(p as u64) && r.wanted.get(p as u64) {
                        // Present without going through us: cannot happen for discarded pages
                        // (nothing else fills them); count it so completion still adds up.
                        self.remaining.fetch_sub(1, Ordering::AcqRel);
                    }
                    self.duplicates.fetch_add(1, Ordering::Relaxed);
                    at += copied_pages + 1;
                }
                Some(libc::EAGAIN) | Some(libc::EINTR) => at += copied_pages,
                _ => return Err(os(if data.is_some() { "UFFDIO_COPY" } else { "UFFDIO_ZEROPAGE" })),
            }
        }
        Ok(())
    }

    fn mark_placed(&self, rid: u16, r: &Region, page: u64, now: Instant) {
        if !r.placed.set(page) {
            return;
        }
        if r.wanted.get(page) {
            self.remaining.fetch_sub(1, Ordering::AcqRel);
        }
        if r.requested.get(page) {
            if let Some(t) = self.pending.lock().unwrap().remove(&(rid, page as u32)) {
                self.latencies_ns.lock().unwrap().push(now.duration_since(t).as_nanos() as u64);
            }
        }
    }

    /// The fault thread: read faults until `stop`, and ask for each missing page once through
    /// `request(region, pages)` (pages of one region, in fault order). Returns on `stop` or on
    /// the first error.
    pub fn serve_faults(&self, stop: &FaultStop, request: &mut dyn FnMut(u16, Vec<u32>) -> Result<(), String>) -> Result<(), String> {
        let fd = self.uffd.as_raw_fd();
        let mut msgs = [UffdMsg { event: 0, _reserved: [0; 7], flags: 0, address: 0, _feat: 0 }; 64];
        while !stop.stopped() {
            let mut pfd = [libc::pollfd { fd, events: libc::POLLIN, revents: 0 }, libc::pollfd { fd: stop.wake.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
            // SAFETY: two pollfds.
            let n = unsafe { libc::poll(pfd.as_mut_ptr(), 2, FAULT_POLL.as_millis() as libc::c_int) };
            if n <= 0 || pfd[0].revents == 0 {
                continue;
            }
            // SAFETY: reading whole uffd_msg structs into a buffer of them.
            let got = unsafe { libc::read(fd, msgs.as_mut_ptr().cast(), std::mem::size_of_val(&msgs)) };
            if got < 0 {
                let e = std::io::Error::last_os_error();
                if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EINTR)) {
                    continue;
                }
                return Err(format!("reading userfaultfd: {e}"));
            }
            let now = Instant::now();
            let count = got as usize / std::mem::size_of::<UffdMsg>();
            let mut batch: Vec<(u16, u32)> = Vec::with_capacity(count);
            for m in &msgs[..count] {
                if m.event != UFFD_EVENT_PAGEFAULT {
                    continue;
                }
                self.faults.fetch_add(1, Ordering::Relaxed);
                let Some((rid, r)) = self.regions.iter().enumerate().find(|(_, r)| m.address >= r.base && m.address < r.base + r.len) else {
                    return Err(format!("fault at {:#x}, outside guest memory", m.address));
                };
                let page = (m.address - r.base) / PAGE_SIZE as u64;
                if !r.wanted.get(page) {
                    // Not discarded, yet missing: a hole round 0 skipped in fresh memory (a zero
                    // page). Nothing will bring it: map zeros, which is what it holds.
                    self.fill_hole(rid, r, page)?;
                    continue;
                }
                if r.placed.get(page) || !r.requested.set(page) {
                    continue; // placed meanwhile (the copy woke the thread) or already asked for
                }
                self.pending.lock().unwrap().insert((rid as u16, page as u32), now);
                batch.push((rid as u16, page as u32));
            }
            // One request per region, in fault order.
            let mut i = 0;
            while i < batch.len() {
                let rid = batch[i].0;
                let pages: Vec<u32> = batch[i..].iter().take_while(|(r, _)| *r == rid).map(|&(_, p)| p).collect();
                i += pages.len();
                self.requested.fetch_add(pages.len() as u64, Ordering::Relaxed);
                request(rid, pages)?;
            }
        }
        Ok(())
    }

    /// Map a zero page at `page` of region `rid` (one that was never discarded); one already
    /// there is left alone.
    fn fill_hole(&self, rid: usize, r: &Region, page: u64) -> Result<(), String> {
        static ZEROS: [u8; PAGE_SIZE] = [0; PAGE_SIZE];
        let dst = r.base + page * PAGE_SIZE as u64;
        let rc = if self.have_zeropage[rid] {
            let mut z = UffdioZeropage { range: UffdioRange { start: dst, len: PAGE_SIZE as u64 }, mode: 0, zeropage: 0 };
            // SAFETY: UFFDIO_ZEROPAGE takes a uffdio_zeropage inside the region.
            unsafe { ioctl(self.uffd.as_raw_fd(), UFFDIO_ZEROPAGE, &mut z) }
        } else {
            let mut c = UffdioCopy { dst, src: ZEROS.as_ptr() as u64, len: PAGE_SIZE as u64, mode: 0, copy: 0 };
            // SAFETY: UFFDIO_COPY takes a uffdio_copy; src is one readable page, dst inside the region.
            unsafe { ioctl(self.uffd.as_raw_fd(), UFFDIO_COPY, &mut c) }
        };
        match (rc, std::io::Error::last_os_error().raw_os_error()) {
            (0, _) | (_, Some(libc::EEXIST)) | (_, Some(libc::EAGAIN)) => Ok(()),
            _ => Err(os("mapping a zero page")),
        }
    }

    /// Counters and latency percentiles so far.
    pub fn stats(&self) -> PostcopyStats {
        let mut l = self.latencies_ns.lock().unwrap().clone();
        l.sort_unstable();
        let pct = |q: f64| if l.is_empty() { 0.0 } else { l[((l.len() - 1) as f64 * q).round() as usize] as f64 / 1000.0 };
        PostcopyStats {
            duration_ms: 0.0,
            discarded_pages: self.discarded,
            faults: self.faults.load(Ordering::Relaxed),
            pages_requested: self.requested.load(Ordering::Relaxed),
            duplicate_pages: self.duplicates.load(Ordering::Relaxed),
            fault_latency_p50_us: pct(0.5),
            fault_latency_p99_us: pct(0.99),
            fault_latency_max_us: l.last().map_or(0.0, |&x| x as f64 / 1000.0),
        }
    }

    /// Postcopy is over: unregister (closing the descriptor also wakes any thread still
    /// waiting on a fault; it then sees the page as the backing has it).
    pub fn finish(&self) {
        for r in &self.regions {
            let mut range = UffdioRange { start: r.base, len: r.len };
            // SAFETY: UFFDIO_UNREGISTER takes a uffdio_range.
            unsafe { ioctl(self.uffd.as_raw_fd(), UFFDIO_UNREGISTER, &mut range) };
        }
    }

    /// Postcopy failed: keep the registration, so threads touching missing pages stay blocked
    /// instead of reading zeros (the descriptor is leaked on purpose).
    pub fn abandon(self: &std::sync::Arc<Self>) {
        std::mem::forget(self.clone());
    }
}

/// How long the fault thread waits on the descriptor between checks of its stop flag (a
/// [`FaultStop::stop`] also wakes it at once).
pub(crate) const FAULT_POLL: Duration = Duration::from_millis(20);

/// Tells the fault thread to return: a flag, and an eventfd its poll also waits on, so it
/// returns at once rather than at its next poll timeout (postcopy's completion, and the
/// in-memory replay, which starts and stops one per switchover, do not wait for it).
pub(crate) struct FaultStop {
    flag: AtomicBool,
    wake: OwnedFd,
}

impl FaultStop {
    pub fn new() -> Result<Self, String> {
        // SAFETY: plain syscall; result checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(os("eventfd"));
        }
        // SAFETY: a fresh descriptor we own.
        Ok(Self { flag: AtomicBool::new(false), wake: unsafe { OwnedFd::from_raw_fd(fd) } })
    }
    pub fn stop(&self) {
        self.flag.store(true, Ordering::Release);
        let one = 1u64;
        // SAFETY: writes 8 bytes from a u64 to our eventfd (a full counter only means it is
        // awake already).
        unsafe { libc::write(self.wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }
    fn stopped(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }
}

/// The source's side of the return path: page requests from the destination become batches
/// for the urgent channel's worker, ahead of (and skipped by) the background push.
pub(crate) struct UrgentServer {
    /// The postcopy round once the switchover began; requests before it are a protocol error.
    round: std::sync::atomic::AtomicU32,
    active: AtomicBool,
    tx: Mutex<Option<crossbeam_channel::Sender<super::channel::Batch>>>,
    outstanding: std::sync::Arc<super::channel::Outstanding>,
    /// Pages sent on the urgent channel (the background push skips them).
    pub served: Vec<AtomicBitmap>,
    region_pages: Vec<u64>,
    /// Pages served.
    pub pages: AtomicU64,
}

/// Most pages one request may name (a fault thread asks for what it read at once: ≤ 64).
const MAX_REQUEST_PAGES: usize = 4096;

impl UrgentServer {
    pub fn new(memory: &GuestMemory, tx: crossbeam_channel::Sender<super::channel::Batch>, outstanding: std::sync::Arc<super::channel::Outstanding>) -> Self {
        let region_pages: Vec<u64> = memory.regions().iter().map(|r| r.pages()).collect();
        Self {
            round: Default::default(),
            active: AtomicBool::new(false),
            tx: Mutex::new(Some(tx)),
            outstanding,
            served: region_pages.iter().map(|&p| AtomicBitmap::new(p)).collect(),
            region_pages,
            pages: AtomicU64::new(0),
        }
    }

    /// Start serving requests as pages of `round`.
    pub fn activate(&self, round: u32) {
        self.round.store(round, Ordering::Release);
        self.active.store(true, Ordering::Release);
    }

    /// Queue a request for the urgent channel, checked against the region table.
    pub fn request(&self, region: u16, mut pages: Vec<u32>) -> Result<(), String> {
        if !self.active.load(Ordering::Acquire) {
            return Err("page request before the switchover to postcopy".into());
        }
        let Some(&n) = self.region_pages.get(region as usize) else {
            return Err(format!("page request for region {region}, which does not exist"));
        };
        if pages.is_empty() || pages.len() > MAX_REQUEST_PAGES {
            return Err(format!("page request for {} pages (1..={MAX_REQUEST_PAGES} allowed)", pages.len()));
        }
        if let Some(p) = pages.iter().find(|&&p| p as u64 >= n) {
            return Err(format!("page request for page {p} of region {region} ({n} pages)"));
        }
        // A packet lists pages in increasing order; the request's pages were all faulted at
        // about the same time.
        pages.sort_unstable();
        pages.dedup();
        for &p in &pages {
            self.served[region as usize].set(p as u64);
        }
        self.pages.fetch_add(pages.len() as u64, Ordering::Relaxed);
        let round = self.round.load(Ordering::Acquire);
        let tx = self.tx.lock().unwrap();
        let Some(tx) = tx.as_ref() else { return Ok(()) }; // migration over
        for chunk in pages.chunks(crate::codec::MAX_BATCH_PAGES) {
            self.outstanding.add();
            if tx.send(super::channel::Batch { region, round, pages: chunk.to_vec() }).is_err() {
                self.outstanding.done();
                return Err("the urgent channel stopped".into());
            }
        }
        Ok(())
    }

    /// No more requests: lets the urgent worker finish.
    pub fn close(&self) {
        self.tx.lock().unwrap().take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MmapRegion;
    use std::sync::Arc;

    fn anon(pages: u64) -> GuestMemory {
        GuestMemory::single(MmapRegion::anonymous("ram0", pages * PAGE_SIZE as u64).unwrap()).unwrap()
    }

    fn page(m: &GuestMemory, p: u64) -> &[u8] {
        let r = &m.regions()[0];
        unsafe { std::slice::from_raw_parts(r.host_ptr().add(p as usize * PAGE_SIZE), PAGE_SIZE) }
    }

    #[test]
    fn placer_fills_discarded_pages_once_and_never_overwrites() {
        let m = anon(16);
        for p in 0..16u64 {
            unsafe { std::ptr::write_bytes(m.regions()[0].host_ptr().add(p as usize * PAGE_SIZE), 0x11, PAGE_SIZE) };
        }
        let placer = match Placer::start(&m, &[(0, 4, 4), (0, 10, 1)]) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("skipping: {e}");
                return;
            }
        };
        assert_eq!(placer.remaining(), 5);
        // Untouched pages keep their contents; discarded ones are gone (read as a fault, so not
        // read here). Bad ranges are refused.
        assert_eq!(page(&m, 3)[0], 0x11);
        assert!(Placer::start(&m, &[(0, 15, 2)]).is_err());
        assert!(Placer::start(&m, &[(1, 0, 1)]).is_err());
        // Pages 4..6 arrive; then 5..8 (5 again: left alone) and 10 as a zero page.
        let a = vec![0xAA; 2 * PAGE_SIZE];
        placer.place(0, &[4, 5], &a, &[]).unwrap();
        let b = vec![0xBB; 3 * PAGE_SIZE];
        placer.place(0, &[5, 6, 7], &b, &[10]).unwrap();
        assert_eq!(placer.remaining(), 0);
        assert_eq!((page(&m, 4)[0], page(&m, 5)[0], page(&m, 6)[0], page(&m, 7)[4095]), (0xAA, 0xAA, 0xBB, 0xBB));
        assert!(page(&m, 10).iter().all(|&b| b == 0));
        assert_eq!(page(&m, 11)[0], 0x11, "a page that was never discarded stays");
        // A page present before the switchover is never overwritten either.
        placer.place(0, &[3], &a[..PAGE_SIZE], &[]).unwrap();
        assert_eq!(page(&m, 3)[0], 0x11);
        let st = placer.stats();
        assert_eq!((st.discarded_pages, st.duplicate_pages), (5, 2));
        placer.finish();
    }

    /// A placer over `discard` of `m` with its fault thread serving, its requests sent to the
    /// returned receiver; None (the test skips, saying why) where userfaultfd is unavailable.
    #[allow(clippy::type_complexity)]
    fn serving(
        m: &GuestMemory,
        discard: &[(u16, u32, u32)],
    ) -> Option<(Arc<Placer>, Arc<FaultStop>, crossbeam_channel::Receiver<(u16, Vec<u32>)>, std::thread::JoinHandle<Result<(), String>>)> {
        let placer = match Placer::start(m, discard) {
            Ok(p) => Arc::new(p),
            Err(e) => {
                eprintln!("skipping: {e}");
                return None;
            }
        };
        let stop = Arc::new(FaultStop::new().unwrap());
        let (tx, rx) = crossbeam_channel::unbounded::<(u16, Vec<u32>)>();
        let (p2, s2) = (placer.clone(), stop.clone());
        let faults = std::thread::spawn(move || p2.serve_faults(&s2, &mut |r, pages| tx.send((r, pages)).map_err(|e| e.to_string())));
        Some((placer, stop, rx, faults))
    }

    #[test]
    fn a_fault_on_a_missing_page_is_requested_once_and_the_reader_gets_the_source_page() {
        let m = anon(8);
        let Some((placer, stop, rx, faults)) = serving(&m, &[(0, 0, 8)]) else { return };
        // The "guest" reads page 6: it blocks until the page is placed.
        let m2 = m.clone();
        let reader = std::thread::spawn(move || page(&m2, 6)[100]);
        let (region, pages) = rx.recv_timeout(Duration::from_secs(10)).expect("a request");
        assert_eq!((region, pages), (0, vec![6]));
        placer.place(0, &[6], &[0x66; PAGE_SIZE], &[]).unwrap();
        assert_eq!(reader.join().unwrap(), 0x66);
        stop.stop();
        faults.join().unwrap().unwrap();
        let st = placer.stats();
        assert_eq!((st.faults, st.pages_requested), (1, 1));
        assert!(st.fault_latency_max_us > 0.0 && st.fault_latency_p50_us <= st.fault_latency_max_us);
        placer.finish();
    }

    #[test]
    fn a_fault_on_a_page_never_written_and_not_discarded_reads_zeros_at_once() {
        // A fresh destination skips zero pages in round 0: they are holes, not discarded, and
        // nothing will ever place them. A guest reading one must not wait for postcopy's end.
        let m = anon(8);
        unsafe { std::ptr::write_bytes(m.regions()[0].host_ptr(), 0x11, PAGE_SIZE) };
        let Some((placer, stop, rx, faults)) = serving(&m, &[(0, 0, 1)]) else { return };
        let (done_tx, done_rx) = crossbeam_channel::bounded(1);
        let m2 = m.clone();
        std::thread::spawn(move || done_tx.send(page(&m2, 5).iter().all(|&b| b == 0)).unwrap());
        let zeros = done_rx.recv_timeout(Duration::from_secs(5));
        // (Before the fix the reader stayed blocked until `finish` unregistered the memory.)
        stop.stop();
        faults.join().unwrap().unwrap();
        placer.finish();
        assert_eq!(zeros, Ok(true), "the hole did not read as zeros within 5 s");
        assert!(rx.try_recv().is_err(), "a hole is not asked of the source");
        assert_eq!(placer.remaining(), 1, "the discarded page is still to come");
    }

    #[test]
    fn page_requests_are_checked_before_anything_is_sent() {
        let m = anon(8);
        let (tx, rx) = crossbeam_channel::unbounded();
        let u = UrgentServer::new(&m, tx, Arc::new(super::super::channel::Outstanding::default()));
        assert!(u.request(0, vec![1]).unwrap_err().contains("before the switchover"));
        u.activate(5);
        assert!(u.request(1, vec![1]).unwrap_err().contains("region 1"));
        assert!(u.request(0, vec![8]).unwrap_err().contains("page 8"));
        assert!(u.request(0, vec![]).is_err());
        assert!(u.request(0, vec![0; MAX_REQUEST_PAGES + 1]).is_err());
        assert!(rx.try_recv().is_err(), "nothing queued for bad requests");
        u.request(0, vec![7, 2, 7]).unwrap();
        let b = rx.try_recv().unwrap();
        assert_eq!((b.region, b.round, b.pages), (0, 5, vec![2, 7]));
        assert!(u.served[0].get(2) && u.served[0].get(7) && !u.served[0].get(3));
        u.close();
        u.request(0, vec![1]).unwrap(); // after the end: ignored
        assert!(rx.try_recv().is_err());
    }
}

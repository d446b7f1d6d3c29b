//! Running the vCPU on its own thread, and stopping it again quickly and cleanly.
//!
//! Why it is done this way: `KVM_RUN` blocks for as long as the guest runs (this guest never
//! exits on its own), so stopping it needs a signal. The thread installs a pointer to its
//! `kvm_run.immediate_exit` in a thread-local; a `SIGRTMIN` handler (installed without
//! `SA_RESTART`) sets that byte. Whether the signal lands while the guest runs (KVM_RUN returns
//! `EINTR`) or just before the thread enters KVM_RUN (KVM sees `immediate_exit` and returns
//! `EINTR` at once), the thread gets out. It then enters KVM_RUN once more with
//! `immediate_exit` still set, so that any half-finished exit (port or MMIO emulation)
//! completes and the register state is consistent, releases the vCPU and parks. The caller
//! then reads or writes the state on its own thread. The thread lives as long as the VM, so
//! resuming is a wake-up, not a thread spawn.

use crate::time::Stamp;
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::cell::Cell;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::thread::JoinHandle;
use std::time::Duration;

thread_local! {
    /// `&kvm_run.immediate_exit` of the vCPU this thread runs (null when none).
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn on_kick(_sig: libc::c_int) {
    // Only touches a const-initialized thread-local without destructor: async-signal-safe.
    let p = IMMEDIATE_EXIT.with(|c| c.get());
    if !p.is_null() {
        // SAFETY: the pointer is set by the vCPU thread to its own live kvm_run mapping and
        // cleared before that mapping can go away; the handler runs on that same thread.
        unsafe { std::ptr::write_volatile(p, 1) };
    }
}

fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

fn install_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a plain sigaction call with a handler that is async-signal-safe. No
        // SA_RESTART: KVM_RUN must return EINTR.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_kick as *const () as usize;
            sa.sa_flags = 0;
            libc::sigemptyset(&mut sa.sa_mask);
            let r = libc::sigaction(kick_signal(), &sa, std::ptr::null_mut());
            assert_eq!(r, 0, "sigaction(SIGRTMIN) failed");
        }
    });
}

/// Why a run of the vCPU ended.
#[derive(Clone, Debug)]
pub(crate) enum Outcome {
    /// Stopped on request; state is consistent.
    Stopped,
    /// The guest did something it never should; the VM cannot continue.
    Failed(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for a run request; the vCPU may be used by other threads.
    Parked,
    RunRequested,
    Running,
    Exit,
}

struct Ctl {
    phase: Phase,
    /// How the last run ended.
    outcome: Option<Outcome>,
}

/// State shared between the controller and the vCPU thread.
pub(crate) struct Shared {
    /// The vCPU; locked by the thread while it runs, by the controller while parked.
    pub vcpu: Mutex<VcpuFd>,
    ctl: Mutex<Ctl>,
    cv: Condvar,
    stop: AtomicBool,
    /// When the thread last entered KVM_RUN after a run request.
    pub run_started: Mutex<Option<Stamp>>,
    /// Exits the guest was not expected to make but which are harmless (I/O, MMIO).
    pub unexpected_exits: AtomicU64,
    /// Auto-converge throttle in percent (0 = full speed); see [`VcpuRunner::set_throttle`].
    throttle: Mutex<u8>,
    throttle_cv: Condvar,
    /// Set by the throttle timer just before it kicks the vCPU: the exit is a throttle stop.
    throttle_kick: AtomicBool,
    /// Time the vCPU spent asleep for the throttle (ns).
    pub throttled_ns: AtomicU64,
}

/// The throttle's running slice, as QEMU's cpu-throttle: the vCPU runs this long, then sleeps
/// `pct / (100 - pct)` of it, so it is asleep `pct`% of the time.
pub(crate) const THROTTLE_SLICE: Duration = Duration::from_millis(10);

pub(crate) fn throttle_sleep(pct: u8) -> Duration {
    let pct = pct.min(99) as u32;
    THROTTLE_SLICE * pct / (100 - pct)
}

/// The vCPU and the thread that runs it. The thread is created once and parks between runs,
/// so starting (or resuming) the guest is a condition-variable wake-up, not a thread spawn.
pub(crate) struct VcpuRunner {
    pub shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    /// Kicks the vCPU out of KVM_RUN every slice while a throttle is set.
    timer: Option<JoinHandle<()>>,
}

impl VcpuRunner {
    pub fn new(vcpu: VcpuFd) -> std::io::Result<Self> {
        install_handler();
        let shared = Arc::new(Shared {
            vcpu: Mutex::new(vcpu),
            ctl: Mutex::new(Ctl { phase: Phase::Parked, outcome: None }),
            cv: Condvar::new(),
            stop: AtomicBool::new(false),
            run_started: Mutex::new(None),
            unexpected_exits: AtomicU64::new(0),
            throttle: Mutex::new(0),
            throttle_cv: Condvar::new(),
            throttle_kick: AtomicBool::new(false),
            throttled_ns: AtomicU64::new(0),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new().name("vcpu0".into()).spawn(move || thread_main(&s))?;
        let (s, target) = (shared.clone(), thread.as_pthread_t());
        let timer = std::thread::Builder::new().name("vcpu0-throttle".into()).spawn(move || throttle_timer(&s, target))?;
        Ok(Self { shared, thread: Some(thread), timer: Some(timer) })
    }

    /// Throttle the vCPU to run only `100 - pct` percent of the time (0 = full speed): every
    /// `THROTTLE_SLICE` of running it is kicked out of KVM_RUN and sleeps its share, like
    /// QEMU's cpu-throttle. Takes effect at the next slice; a stop interrupts the sleep.
    pub fn set_throttle(&self, pct: u8) {
        *self.shared.throttle.lock().unwrap() = pct.min(99);
        self.shared.throttle_cv.notify_all();
    }

    fn kick(&self) {
        if let Some(t) = &self.thread {
            // SAFETY: the thread is joinable (joined only in drop), so its pthread_t is valid.
            unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
        }
    }

    /// True while a run is requested or in progress.
    pub fn is_running(&self) -> bool {
        matches!(self.shared.ctl.lock().unwrap().phase, Phase::RunRequested | Phase::Running)
    }

    /// How the last run ended, if it has (None while running or before the first run).
    pub fn last_outcome(&self) -> Option<Outcome> {
        let c = self.shared.ctl.lock().unwrap();
        if c.phase == Phase::Parked {
            c.outcome.clone()
        } else {
            None
        }
    }

    /// Ask the thread to run the guest. Returns false if it is already running.
    pub fn run(&self) -> bool {
        let mut c = self.shared.ctl.lock().unwrap();
        if c.phase != Phase::Parked {
            return false;
        }
        self.shared.stop.store(false, Ordering::SeqCst);
        *self.shared.run_started.lock().unwrap() = None;
        c.phase = Phase::RunRequested;
        c.outcome = None;
        self.shared.cv.notify_all();
        true
    }

    /// Stop a run and wait until the thread has parked. Re-sends the signal every 2 ms until
    /// then (guards against a signal that lands just before the thread registered its
    /// kvm_run). Returns how the run ended; `None` if nothing was running.
    pub fn stop(&self) -> Option<Outcome> {
        let mut c = self.shared.ctl.lock().unwrap();
        match c.phase {
            Phase::Parked | Phase::Exit => return None,
            Phase::RunRequested => {
                // Not picked up yet: cancel.
                c.phase = Phase::Parked;
                c.outcome = Some(Outcome::Stopped);
                return c.outcome.clone();
            }
            Phase::Running => {}
        }
        self.shared.stop.store(true, Ordering::SeqCst);
        self.kick();
        while c.phase == Phase::Running {
            let (g, t) = self.shared.cv.wait_timeout(c, Duration::from_millis(2)).unwrap();
            c = g;
            if t.timed_out() && c.phase == Phase::Running {
                self.kick();
            }
        }
        c.outcome.clone()
    }
}

impl Drop for VcpuRunner {
    fn drop(&mut self) {
        self.stop();
        self.shared.ctl.lock().unwrap().phase = Phase::Exit;
        self.shared.cv.notify_all();
        // The timer first: it signals the vCPU thread, which must still exist.
        self.set_throttle(0);
        if let Some(t) = self.timer.take() {
            let _ = t.join();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn unblock_kick_signal() {
    // SAFETY: plain signal-mask calls on this thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, kick_signal());
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
}

/// While a throttle is set: every slice of running (plus the sleep that follows it), mark the
/// kick as a throttle stop and signal the vCPU thread.
fn throttle_timer(shared: &Shared, target: libc::pthread_t) {
    loop {
        let pct = {
            let mut t = shared.throttle.lock().unwrap();
            while *t == 0 {
                if shared.ctl.lock().unwrap().phase == Phase::Exit {
                    return;
                }
                t = shared.throttle_cv.wait_timeout(t, Duration::from_millis(100)).unwrap().0;
            }
            *t
        };
        std::thread::sleep(THROTTLE_SLICE);
        if shared.ctl.lock().unwrap().phase == Phase::Running {
            shared.throttle_kick.store(true, Ordering::SeqCst);
            // SAFETY: the vCPU thread is joined only after this thread (see Drop).
            unsafe { libc::pthread_kill(target, kick_signal()) };
        }
        // Let the vCPU sleep its share before the next slice starts counting.
        std::thread::sleep(throttle_sleep(pct));
    }
}

/// The throttle's sleep on the vCPU thread; a stop request ends it early.
fn throttle_pause(shared: &Shared) {
    let pct = *shared.throttle.lock().unwrap();
    if pct == 0 {
        return;
    }
    let t0 = std::time::Instant::now();
    let until = t0 + throttle_sleep(pct);
    while !shared.stop.load(Ordering::SeqCst) {
        let now = std::time::Instant::now();
        if now >= until {
            break;
        }
        std::thread::sleep((until - now).min(Duration::from_micros(500)));
    }
    shared.throttled_ns.fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
}

fn thread_main(shared: &Shared) {
    unblock_kick_signal();
    let mut c = shared.ctl.lock().unwrap();
    loop {
        while !matches!(c.phase, Phase::RunRequested | Phase::Exit) {
            c = shared.cv.wait(c).unwrap();
        }
        if c.phase == Phase::Exit {
            return;
        }
        c.phase = Phase::Running;
        drop(c);
        let outcome = {
            let mut vcpu = shared.vcpu.lock().unwrap();
            run_guest(&mut vcpu, shared)
        };
        c = shared.ctl.lock().unwrap();
        c.outcome = Some(outcome);
        if c.phase == Phase::Running {
            c.phase = Phase::Parked;
        }
        shared.cv.notify_all();
    }
}

/// Enter KVM_RUN with `immediate_exit` set: KVM finishes a pending exit (if any) and returns
/// EINTR without running guest code, leaving the registers consistent for saving.
fn complete_pending_exit(vcpu: &mut VcpuFd) {
    vcpu.set_kvm_immediate_exit(1);
    let _ = vcpu.run();
}

/// Run the guest until asked to stop or until it fails.
fn run_guest(vcpu: &mut VcpuFd, shared: &Shared) -> Outcome {
    vcpu.set_kvm_immediate_exit(0);
    shared.throttle_kick.store(false, Ordering::SeqCst);
    let ie: *mut u8 = &mut vcpu.get_kvm_run().immediate_exit;
    IMMEDIATE_EXIT.with(|c| c.set(ie));
    let mut first = true;
    let outcome = loop {
        if shared.stop.load(Ordering::SeqCst) {
            if !first {
                complete_pending_exit(vcpu);
            }
            break Outcome::Stopped;
        }
        if first {
            *shared.run_started.lock().unwrap() = Some(Stamp::now());
            first = false;
        }
        match vcpu.run() {
            Ok(VcpuExit::IoIn(..) | VcpuExit::IoOut(..) | VcpuExit::MmioRead(..) | VcpuExit::MmioWrite(..)) => {
                shared.unexpected_exits.fetch_add(1, Ordering::Relaxed);
            }
            Ok(VcpuExit::Intr) => {}
            Ok(VcpuExit::Shutdown) => break Outcome::Failed("guest shut down (triple fault)".into()),
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                break Outcome::Failed(format!("VM entry failed (reason {reason:#x}, cpu {cpu})"))
            }
            Ok(VcpuExit::InternalError) => {
                // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the live member.
                let sub = unsafe { vcpu.get_kvm_run().__bindgen_anon_1.internal.suberror };
                break Outcome::Failed(format!("KVM internal error (suberror {sub})"));
            }
            Ok(other) => break Outcome::Failed(format!("unexpected exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                if shared.stop.load(Ordering::SeqCst) {
                    complete_pending_exit(vcpu);
                    break Outcome::Stopped;
                }
                vcpu.set_kvm_immediate_exit(0);
                if shared.throttle_kick.swap(false, Ordering::SeqCst) {
                    throttle_pause(shared);
                }
            }
            Err(e) => break Outcome::Failed(format!("KVM_RUN failed: {e}")),
        }
    };
    IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null_mut()));
    vcpu.set_kvm_immediate_exit(0);
    outcome
}

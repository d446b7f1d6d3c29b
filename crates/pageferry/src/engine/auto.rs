//! The engine's side of `--multifd-compression auto`: live measurements in, one
//! [`Policy`](super::policy::Policy) shared by every compression worker, one codec per
//! candidate per worker (opened on first use).
//!
//! Measurements: each socket writer adds its wire bytes and busy time (from asking the rate
//! limiter to the end of the write) to a [`LinkMeter`]; each worker reports the raw and
//! payload bytes of every batch and its time on it, less the waits for the link. A worker that finds the window over
//! takes the link sample and lets the policy decide.

use super::policy::{AutoConfig, AutoReport, Candidate, Choice, LinkSample, Policy};
use super::ratelimit::RateLimiter;
use crate::codec::{self, Codec, CodecError, CodecSpec};
use crate::wire::MethodCode;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Wire bytes and busy time of all socket writers together.
#[derive(Default, Debug)]
pub struct LinkMeter {
    wire_bytes: AtomicU64,
    busy_ns: AtomicU64,
}

impl LinkMeter {
    /// A writer moved `bytes` and was busy `busy` doing it (limiter wait plus write).
    pub fn add(&self, bytes: u64, busy: Duration) {
        self.wire_bytes.fetch_add(bytes, Relaxed);
        self.busy_ns.fetch_add(busy.as_nanos() as u64, Relaxed);
    }
    fn read(&self) -> (u64, u64) {
        (self.wire_bytes.load(Relaxed), self.busy_ns.load(Relaxed))
    }
}

struct State {
    policy: Policy,
    /// Meter readings and time at the start of the window.
    at: Instant,
    wire: u64,
    busy_ns: u64,
}

/// `--max-cpu` enforced: at most `slots` codec calls run at once.
pub struct CpuGate {
    slots: usize,
    busy: Mutex<usize>,
    freed: Condvar,
}

/// A slot of a [`CpuGate`], given back on drop.
pub struct CpuSlot(Arc<CpuGate>);

impl CpuGate {
    pub fn new(slots: usize) -> Self {
        Self { slots: slots.max(1), busy: Mutex::new(0), freed: Condvar::new() }
    }
    /// Wait for a slot; `None` once `stop()` says the migration is over (a worker never waits
    /// for a slot that will not come: holders give theirs back after one codec call).
    pub fn enter(self: &Arc<Self>, stop: impl Fn() -> bool) -> Option<CpuSlot> {
        let mut busy = self.busy.lock().unwrap();
        while *busy >= self.slots {
            if stop() {
                return None;
            }
            busy = self.freed.wait_timeout(busy, Duration::from_millis(100)).unwrap().0;
        }
        *busy += 1;
        Some(CpuSlot(self.clone()))
    }
}

impl Drop for CpuSlot {
    fn drop(&mut self) {
        *self.0.busy.lock().unwrap() -= 1;
        self.0.freed.notify_one();
    }
}

/// The policy shared by all workers of one migration.
pub struct AutoSelector {
    state: Mutex<State>,
    meter: Arc<LinkMeter>,
    limiter: Option<Arc<RateLimiter>>,
    writers: usize,
    t0: Instant,
    /// `--max-cpu` below the workers: at most ⌈max_cpu⌉ of them compress at once.
    gate: Option<Arc<CpuGate>>,
}

impl AutoSelector {
    pub fn new(candidates: &[Candidate], config: AutoConfig, workers: usize, writers: usize, meter: Arc<LinkMeter>, limiter: Option<Arc<RateLimiter>>) -> Self {
        let t0 = Instant::now();
        let (wire, busy_ns) = meter.read();
        let gate = config.max_cpu.map(|c| c.ceil() as usize).filter(|&slots| slots < workers).map(|slots| Arc::new(CpuGate::new(slots)));
        let policy = Policy::new(candidates, config, workers, 0.0);
        Self { state: Mutex::new(State { policy, at: t0, wire, busy_ns }), meter, limiter, writers, t0, gate }
    }

    /// The gate every codec call passes when `--max-cpu` is below the workers.
    pub fn gate(&self) -> Option<Arc<CpuGate>> {
        self.gate.clone()
    }

    /// The plan for the next batch (deciding first when the window is over).
    pub fn choose(&self) -> Choice {
        let mut s = self.state.lock().unwrap();
        let now = self.t0.elapsed().as_secs_f64();
        if s.policy.window_due(now) {
            let (wire, busy_ns) = self.meter.read();
            let at = Instant::now();
            let sample = LinkSample {
                wire_bytes: wire - s.wire,
                busy_s: (busy_ns - s.busy_ns) as f64 / 1e9,
                writers: self.writers,
                wall_s: at.duration_since(s.at).as_secs_f64(),
                cap: self.limiter.as_ref().map(|l| l.rate() as f64),
            };
            s.policy.decide(now, sample);
            (s.at, s.wire, s.busy_ns) = (at, wire, busy_ns);
        }
        s.policy.choose(now)
    }

    /// A batch planned with `choice` carried `raw` non-zero bytes as `wire` payload bytes and
    /// took `secs` of its worker's time (all but the waits for the link).
    pub fn record(&self, choice: &Choice, raw: u64, wire: u64, secs: f64) {
        self.state.lock().unwrap().policy.record(choice, raw, wire, secs);
    }

    /// A probe with a shadow: see [`Policy::record_pair`].
    pub fn record_pair(&self, choice: &Choice, raw: u64, wire: u64, wire_cur: u64, secs: f64, secs_cur: f64) {
        self.state.lock().unwrap().policy.record_pair(choice, raw, wire, wire_cur, secs, secs_cur);
    }

    /// A sampled probe: see [`Policy::record_sample`].
    pub fn record_sample(&self, index: usize, raw: u64, wire: u64, secs: f64) {
        self.state.lock().unwrap().policy.record_sample(index, raw, wire, secs);
    }

    pub fn report(&self) -> AutoReport {
        self.state.lock().unwrap().policy.report()
    }
}

/// One worker's codecs, one per candidate, opened on first use.
pub struct Encoders {
    specs: Vec<CodecSpec>,
    /// The method code each candidate's packets carry (`none`'s raw packets carry the label
    /// the destination accepts, see the source).
    codes: Vec<MethodCode>,
    codecs: Vec<Option<Box<dyn Codec>>>,
}

impl Encoders {
    pub fn new(specs: Vec<CodecSpec>, codes: Vec<MethodCode>) -> Self {
        let codecs = specs.iter().map(|_| None).collect();
        Self { specs, codes, codecs }
    }
    pub fn code(&self, index: usize) -> MethodCode {
        self.codes[index]
    }
    /// The codec for candidate `index`, opened by an earlier [`Encoders::get`].
    pub fn opened(&mut self, index: usize) -> &mut dyn Codec {
        self.codecs[index].as_deref_mut().expect("opened by get")
    }
    /// The codec for candidate `index`.
    pub fn get(&mut self, index: usize) -> Result<&mut dyn Codec, CodecError> {
        if self.codecs[index].is_none() {
            self.codecs[index] = Some(codec::open(&self.specs[index])?);
        }
        Ok(self.codecs[index].as_deref_mut().expect("opened above"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize};

    /// `--max-cpu` enforced: however many workers call at once, at most `slots` hold a slot.
    #[test]
    fn the_cpu_gate_admits_at_most_its_slots() {
        for slots in [1, 2] {
            let gate = Arc::new(CpuGate::new(slots));
            let (inside, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
            std::thread::scope(|s| {
                for _ in 0..4 {
                    let (gate, inside, most) = (gate.clone(), inside.clone(), most.clone());
                    s.spawn(move || {
                        for _ in 0..50 {
                            let _slot = gate.enter(|| false).expect("no stop");
                            let n = inside.fetch_add(1, Relaxed) + 1;
                            most.fetch_max(n, Relaxed);
                            std::thread::sleep(Duration::from_micros(200));
                            inside.fetch_sub(1, Relaxed);
                        }
                    });
                }
            });
            assert!(most.load(Relaxed) <= slots, "{} inside at once with {slots} slots", most.load(Relaxed));
            assert_eq!(*gate.busy.lock().unwrap(), 0, "every slot given back");
        }
    }

    #[test]
    fn a_full_gate_lets_go_when_the_migration_stops() {
        let gate = Arc::new(CpuGate::new(1));
        let held = gate.enter(|| false).unwrap();
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            let waiter = s.spawn(|| gate.enter(|| stop.load(Relaxed)).is_none());
            std::thread::sleep(Duration::from_millis(50));
            stop.store(true, Relaxed);
            assert!(waiter.join().unwrap(), "a stopped migration gets no slot");
        });
        drop(held);
        assert!(gate.enter(|| false).is_some());
    }

    /// The gate exists only when --max-cpu is below the workers, with ⌈max_cpu⌉ slots.
    #[test]
    fn the_selector_gates_only_below_the_workers() {
        let sel = |max_cpu| AutoSelector::new(&[], AutoConfig { max_cpu, ..AutoConfig::default() }, 4, 2, Arc::new(LinkMeter::default()), None);
        assert!(sel(None).gate().is_none());
        assert!(sel(Some(4.0)).gate().is_none());
        assert_eq!(sel(Some(1.5)).gate().map(|g| g.slots), Some(2));
        assert_eq!(sel(Some(0.1)).gate().map(|g| g.slots), Some(1));
    }
}

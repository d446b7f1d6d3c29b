//! The engine's side of `--multifd-compression auto`: live measurements in, one
//! [`Policy`](super::policy::Policy) shared by every compression worker, one codec per
//! candidate per worker (opened on first use).
//!
//! Measurements: each socket writer adds its wire bytes and busy time (from asking the rate
//! limiter to the end of the write) to a [`LinkMeter`]; each worker reports the raw and
//! payload bytes and the time of every batch it encoded. A worker that finds the window over
//! takes the link sample and lets the policy decide.

use super::policy::{AutoConfig, AutoReport, Candidate, Choice, LinkSample, Policy};
use super::ratelimit::RateLimiter;
use crate::codec::{self, Codec, CodecError, CodecSpec};
use crate::wire::MethodCode;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
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

/// The policy shared by all workers of one migration.
pub struct AutoSelector {
    state: Mutex<State>,
    meter: Arc<LinkMeter>,
    limiter: Option<Arc<RateLimiter>>,
    writers: usize,
    t0: Instant,
}

impl AutoSelector {
    pub fn new(candidates: &[Candidate], config: AutoConfig, workers: usize, writers: usize, meter: Arc<LinkMeter>, limiter: Option<Arc<RateLimiter>>) -> Self {
        let t0 = Instant::now();
        let (wire, busy_ns) = meter.read();
        let policy = Policy::new(candidates, config, workers, 0.0);
        Self { state: Mutex::new(State { policy, at: t0, wire, busy_ns }), meter, limiter, writers, t0 }
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
    /// took `secs` to encode.
    pub fn record(&self, choice: &Choice, raw: u64, wire: u64, secs: f64) {
        self.state.lock().unwrap().policy.record(choice, raw, wire, secs);
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

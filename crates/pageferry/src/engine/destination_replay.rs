//! The destination's state machine over in-memory streams: the fuzz target `destination`
//! (fuzz/) and tests feed it bytes, with no sockets and no threads.
//!
//! It runs the real code of a session: the control Hello through the handshake's frame reader
//! and `check_hello` (limits, methods, verification, layout, postcopy), each data channel's
//! Hello through `check_data_hello` (and postcopy's urgent channel's as `accept_session` checks
//! it), every packet through the channel reader (header, method, packet number, round, offsets
//! against the region, CRC, decode, apply in place or place through userfaultfd in postcopy,
//! the gate), and the control frames through the control loop (RoundDone, Finish, digest,
//! Postcopy and the switchover, resume, Done).
//!
//! One thread does everything, in an order the input decides: whenever the control loop waits
//! for an event, the next byte of `schedule` names the stream that delivers its next item (a
//! control frame, or one packet of a channel); a channel waiting at the gate for the others,
//! or a stream at its end, passes the turn to the next stream that can go (so every order the
//! real threads may take can be expressed, and none that they cannot). Without schedule bytes
//! the streams take turns. What differs from a live session: the end of a data stream at a
//! packet boundary is the source going quiet rather than a failure, what the destination
//! writes to the source is discarded, the destination's own guest does not run (so it makes no
//! page requests; answers on the urgent channel arrive as the input has them), and a session
//! whose channels are not all in the input fails instead of waiting for them.

use super::*;

/// Replay one source's control stream (its Hello, then control frames) and its channels'
/// streams (each: a data or urgent channel's Hello, then packets), in any order, into
/// `memory`, as the destination would receive them; `schedule` decides the interleaving (see
/// the module). Returns what `run_destination` would; `workload` is resumed exactly when it
/// would be.
#[doc(hidden)]
pub fn replay_destination(
    mut control: &[u8],
    streams: &[&[u8]],
    schedule: &[u8],
    memory: &GuestMemory,
    workload: &mut dyn DestinationWorkload,
    config: &DestinationConfig,
) -> Result<DestinationReport, MigrationError> {
    let cpu = CpuMeter::start();
    let handshake = |what: &str, r: Result<Frame, WireError>| match r {
        Ok(Frame { msg: Control::Hello(h), .. }) => Ok(h),
        Ok(Frame { msg, .. }) => Err(MigrationError::Other(format!("{what}: expected a handshake, got {msg:?}"))),
        Err(cause) => Err(MigrationError::Wire { channel: what.into(), cause }),
    };
    let hello = handshake("control channel", wire::read_frame_limited(&mut control, wire::MAX_HANDSHAKE_BODY))?;
    if hello.role != Role::Control {
        return Err(MigrationError::Other(format!("the first connection is a {:?} channel, not control", hello.role)));
    }
    let (memory, version) = check_hello(&hello, &mut |_| Ok(memory.clone()), config).map_err(MigrationError::Refused)?;
    let channels = hello.channels as usize;
    // Each stream's Hello, as accept_session checks it: a data channel of this session not
    // connected yet, or (postcopy) its one urgent channel (whose reader index is `channels`).
    let mut taken = vec![false; channels];
    let mut urgent = false;
    let mut conns: Vec<(usize, &[u8], bool)> = Vec::new();
    for (i, &stream) in streams.iter().enumerate() {
        let mut rest = stream;
        let what = format!("stream {i}");
        let h = handshake(&what, wire::read_frame_limited(&mut rest, wire::MAX_HANDSHAKE_BODY))?;
        if h.session != hello.session {
            return Err(MigrationError::Other(format!("stray connection: session {} is not {}", h.session, hello.session)));
        }
        if h.role == Role::Urgent {
            if !hello.wants.postcopy || urgent || !h.versions.contains(version) {
                return Err(MigrationError::Refused("unexpected or duplicate urgent connection".into()));
            }
            urgent = true;
            conns.push((channels, rest, true));
            continue;
        }
        let idx = check_data_hello(&h, version, channels, |i| taken[i]).map_err(MigrationError::Refused)?;
        taken[idx] = true;
        conns.push((idx, rest, false));
    }
    let connected = taken.iter().filter(|&&t| t).count();
    if connected < channels || (hello.wants.postcopy && !urgent) {
        return Err(MigrationError::Other(format!(
            "the replay has {connected} of the session's {channels} data channels{}",
            if hello.wants.postcopy && !urgent { " and no urgent channel" } else { "" }
        )));
    }

    let accepted = accepted_methods(&hello, config);
    let fresh: Vec<bool> = memory.regions().iter().map(|r| r.is_fresh_zeroed()).collect();
    let counters = Counters::default();
    let gate = Gate::new(channels, false);
    let (ev_tx, ev_rx) = crossbeam_channel::unbounded::<Event>();
    let shared = ReaderShared { memory: &memory, accepted: &accepted, config, gate: &gate, counters: &counters, fresh: &fresh, events: &ev_tx };
    // Stream i of the input is the schedule's stream 1 + i.
    let readers = conns.into_iter().map(|(idx, s, is_urgent)| Some((Reader::new(&shared, idx, s, is_urgent, true), RxBufs::default()))).collect();
    let mut replay = Replay { events: ev_rx, tx: ev_tx.clone(), control: Some(control), version, readers, schedule, last: 0 };
    let sink = Arc::new(Mutex::new(std::io::sink()));
    let outcome = control_loop(&mut replay, &sink, version, &memory, workload, &gate, &counters, &cpu, "replay", hello.verify, hello.wants.postcopy, config.timeout.map(|t| Instant::now() + t), config);
    gate.fail();
    outcome
}

/// The streams of a replay, stepped when the control loop asks for its next event.
struct Replay<'a> {
    events: crossbeam_channel::Receiver<Event>,
    /// For control frames (the readers hold their own senders).
    tx: crossbeam_channel::Sender<Event>,
    /// The control frames still to come (`None` once its end was delivered).
    control: Option<&'a [u8]>,
    version: u16,
    /// The channels, in the input's order; `None` once ended.
    readers: Vec<Option<(Reader<'a, &'a [u8]>, RxBufs)>>,
    schedule: &'a [u8],
    /// The stream that went last (0: control, 1 + i: reader i).
    last: usize,
}

impl Replay<'_> {
    /// Deliver one item of the stream the schedule names (or of the next one that can go).
    /// False when no stream can go.
    fn step(&mut self) -> bool {
        let n = 1 + self.readers.len();
        let first = match self.schedule.split_first() {
            Some((&b, rest)) => {
                self.schedule = rest;
                b as usize % n
            }
            None => (self.last + 1) % n,
        };
        let can_go = |r: &Self, s: usize| if s == 0 { r.control.is_some() } else { r.readers[s - 1].as_ref().is_some_and(|(rd, _)| !rd.waiting()) };
        let Some(s) = (0..n).map(|k| (first + k) % n).find(|&s| can_go(self, s)) else { return false };
        self.last = s;
        if s == 0 {
            let mut rest = self.control.take().expect("can go");
            let r = wire::read_frame_at(&mut rest, self.version);
            if r.is_ok() {
                self.control = Some(rest);
            }
            let _ = self.tx.send(Event::Control(r));
        } else {
            let (reader, bufs) = self.readers[s - 1].as_mut().expect("can go");
            if !reader.step(bufs) {
                self.readers[s - 1] = None;
            }
        }
        true
    }

    fn next(&mut self) -> Result<Event, RecvTimeoutError> {
        loop {
            if let Ok(e) = self.events.try_recv() {
                return Ok(e);
            }
            if !self.step() {
                return Err(RecvTimeoutError::Disconnected);
            }
        }
    }
}

impl EventSource for Replay<'_> {
    fn recv_timeout(&mut self, _: Duration) -> Result<Event, RecvTimeoutError> {
        self.next()
    }
    fn recv_deadline(&mut self, _: Instant) -> Result<Event, RecvTimeoutError> {
        self.next()
    }
}

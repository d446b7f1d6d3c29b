//! The destination's state machine over in-memory streams: the fuzz target `destination`
//! (fuzz/) and tests feed it bytes, with no sockets and no threads.
//!
//! It runs the real code of a one-channel session: the control Hello through the handshake's
//! frame reader and `check_hello` (limits, methods, verification, layout), the data channel's
//! Hello through `check_data_hello`, every data packet through the channel reader (header,
//! method, packet number, round, offsets against the region, CRC, decode, apply in place,
//! the gate), then the control frames through the control loop (RoundDone, Finish, digest,
//! resume, Done). What differs from a live session: the data stream is read to its end before
//! the control frames are looked at (one order the real threads may also take), its end at a
//! packet boundary is the source going quiet rather than a failure, what the destination
//! writes to the source is discarded, and a Hello with more than one channel or postcopy is
//! refused.

use super::*;

/// Replay one source's control stream (its Hello, then control frames) and data stream (the
/// data channel's Hello, then packets) into `memory`, as the destination would receive them.
/// Returns what `run_destination` would; `workload` is resumed exactly when it would be.
#[doc(hidden)]
pub fn replay_destination(
    mut control: &[u8],
    mut data: &[u8],
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
    if hello.channels != 1 || hello.wants.postcopy {
        return Err(MigrationError::Other("a replay has one data channel and no postcopy".into()));
    }
    let data_hello = handshake("data channel", wire::read_frame_limited(&mut data, wire::MAX_HANDSHAKE_BODY))?;
    if data_hello.session != hello.session {
        return Err(MigrationError::Other(format!("stray connection: session {} is not {}", data_hello.session, hello.session)));
    }
    check_data_hello(&data_hello, version, 1, |_| false).map_err(MigrationError::Refused)?;

    let accepted = accepted_methods(&hello, config);
    let fresh: Vec<bool> = memory.regions().iter().map(|r| r.is_fresh_zeroed()).collect();
    let counters = Counters::default();
    let gate = Gate { state: Mutex::new(GateState::default()), cv: Condvar::new(), channels: 1, closed: std::sync::RwLock::new(false), postcopy: Mutex::new(None) };
    let (ev_tx, ev_rx) = crossbeam_channel::unbounded::<Event>();
    let shared = ReaderShared { memory: &memory, accepted: &accepted, config, gate: &gate, counters: &counters, fresh: &fresh, events: &ev_tx };
    Reader::new(&shared, 0, data, false, true).run();
    // The control frames after the Hello, as the control thread reads them; the last event is
    // the error that ended the stream (its end: the source closed the control channel).
    loop {
        let r = wire::read_frame_at(&mut control, version);
        let stop = r.is_err();
        let _ = ev_tx.send(Event::Control(r));
        if stop {
            break;
        }
    }
    // Every event is queued and no sender is left: the control loop never waits.
    drop(ev_tx);
    let sink = Arc::new(Mutex::new(std::io::sink()));
    let outcome = control_loop(&ev_rx, &sink, version, &memory, workload, &gate, &counters, &cpu, "replay", hello.verify, hello.wants.postcopy, config.timeout.map(|t| Instant::now() + t), config);
    gate.fail();
    outcome
}

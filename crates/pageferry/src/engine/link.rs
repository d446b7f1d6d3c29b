//! The control connection shared by a side's threads: one writer at a time, keepalives when
//! idle, and the names of stalls.

use crate::wire::{self, Control, WireError};
use crate::transport::Stream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The write half of a control connection. Every write is bounded by the socket's write
/// timeout (the stall timeout); a keepalive thread sends [`Control::Keepalive`] whenever
/// nothing else was sent for a quarter of the stall timeout, so the peer can tell a silent
/// control channel from an idle one.
pub(crate) struct ControlLink {
    sock: Arc<Mutex<Stream>>,
    /// A clone for `shutdown`, usable while a writer holds `sock`.
    shut: Stream,
    last: Mutex<Instant>,
    stop: AtomicBool,
    /// The protocol version agreed in the handshake; every frame is written in it.
    version: u16,
}

impl ControlLink {
    pub fn new(sock: Stream, stall: Duration, version: u16) -> std::io::Result<Arc<Self>> {
        Self::shared(Arc::new(Mutex::new(sock)), stall, version)
    }

    /// Over a socket other threads write too (under the same lock): frames never interleave.
    pub fn shared(sock: Arc<Mutex<Stream>>, stall: Duration, version: u16) -> std::io::Result<Arc<Self>> {
        let shut = {
            let s = sock.lock().unwrap();
            s.set_write_timeout(Some(stall))?;
            s.try_clone()?
        };
        Ok(Arc::new(Self { sock, shut, last: Mutex::new(Instant::now()), stop: AtomicBool::new(false), version }))
    }

    pub fn send(&self, msg: &Control, blob: &[u8]) -> Result<(), WireError> {
        let mut s = self.sock.lock().unwrap();
        wire::write_frame(&mut *s, self.version, msg, blob)?;
        *self.last.lock().unwrap() = Instant::now();
        Ok(())
    }

    /// A last message on the way out (Abort, Cancel): waits at most a second for room
    /// (the socket's timeout is shared by every clone, so a writer holding the lock is
    /// bounded by it too).
    pub fn send_last(&self, msg: &Control) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.shut.set_write_timeout(Some(Duration::from_secs(1)));
        let mut s = self.sock.lock().unwrap();
        let _ = wire::write_frame(&mut *s, self.version, msg, &[]);
    }

    /// Close both ways now; wakes a writer blocked on a stalled link (not under the lock).
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.shut.shutdown(std::net::Shutdown::Both);
    }

    /// Send keepalives every `stall / 4` of silence until stopped or the link fails.
    pub fn spawn_keepalive(self: &Arc<Self>, stall: Duration) -> std::io::Result<()> {
        let link = self.clone();
        let every = stall / 4;
        std::thread::Builder::new().name("pf-keepalive".into()).spawn(move || {
            while !link.stop.load(Ordering::SeqCst) {
                std::thread::sleep(every.min(Duration::from_millis(100)));
                let idle = link.last.lock().unwrap().elapsed();
                if idle >= every && !link.stop.load(Ordering::SeqCst) && link.send(&Control::Keepalive, &[]).is_err() {
                    return;
                }
            }
        })?;
        Ok(())
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// True for the errors a socket timeout produces (the stall timeout ran out).
pub(crate) fn is_timeout(e: &WireError) -> bool {
    matches!(e, WireError::Io(io) if matches!(io.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut))
}

/// "30 s", "2.5 s".
pub(crate) fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{s:.0} s")
    } else {
        format!("{s:.1} s")
    }
}

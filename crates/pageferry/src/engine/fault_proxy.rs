//! A TCP proxy for fault-injection tests: sits between a source and a destination and, on
//! cue, flips a bit, drops a connection, stalls it (stops forwarding both ways, keeping it
//! open), delays it, or kills every connection at once. Connections are numbered in the order
//! the source opens them: 0 is the control channel, 1..=N the data channels 0..N-1.
//!
//! Shared by the library's tests and the CLI's (included with `#[path]`); test code only.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Direction of the bytes a fault acts on.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Dir {
    /// Source → destination.
    Up,
    /// Destination → source.
    Down,
}

/// Where in a connection's byte stream a fault fires.
#[derive(Clone, Debug)]
pub enum At {
    /// At this byte offset of the direction's stream (0: at once).
    Byte(u64),
    /// On the control frame whose JSON `type` is this ("finish", "done", "round_done", ...),
    /// its `nth` occurrence (0-based). The connection must carry control frames only.
    Frame(&'static str, usize),
}

#[derive(Clone, Debug)]
pub enum Action {
    /// Flip one bit (bit `bit` of the byte at the offset; for a frame, of a byte inside its
    /// JSON body).
    Flip(u8),
    /// Close the connection both ways (the frame itself is not forwarded).
    Drop,
    /// Stop forwarding both ways, keeping the sockets open (a frozen link or peer).
    Stall,
    /// Hold the bytes this long, then go on.
    Delay(Duration),
    /// Close every connection of the proxy at once (a peer process dying).
    KillAll,
}

#[derive(Clone, Debug)]
pub struct Fault {
    pub conn: usize,
    pub dir: Dir,
    pub at: At,
    pub action: Action,
}

struct Conn {
    up: TcpStream,
    down: TcpStream,
    stalled: AtomicBool,
}

#[derive(Default)]
struct Shared {
    conns: Mutex<Vec<Arc<Conn>>>,
    closed: AtomicBool,
    fired: Mutex<Option<Instant>>,
    accepted: AtomicUsize,
}

impl Shared {
    fn fire(&self) {
        self.fired.lock().unwrap().get_or_insert_with(Instant::now);
    }
    fn kill(&self) {
        self.fire();
        for c in self.conns.lock().unwrap().iter() {
            let _ = c.up.shutdown(Shutdown::Both);
            let _ = c.down.shutdown(Shutdown::Both);
        }
    }
}

/// The proxy; connections and threads end when it is dropped.
pub struct FaultProxy {
    pub addr: String,
    shared: Arc<Shared>,
}

impl FaultProxy {
    /// Listen on an ephemeral loopback port, relay each connection to `upstream`.
    pub fn start(upstream: &str, faults: Vec<Fault>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let shared = Arc::new(Shared::default());
        let (sh, upstream) = (shared.clone(), upstream.to_string());
        listener.set_nonblocking(true).unwrap();
        std::thread::spawn(move || loop {
            if sh.closed.load(Ordering::SeqCst) {
                return;
            }
            let down = match listener.accept() {
                Ok((s, _)) => s,
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
            };
            down.set_nonblocking(false).unwrap();
            let Ok(up) = TcpStream::connect(&upstream) else {
                continue; // the client sees its connection closed
            };
            let _ = (up.set_nodelay(true), down.set_nodelay(true));
            let n = sh.accepted.fetch_add(1, Ordering::SeqCst);
            let conn = Arc::new(Conn { up, down, stalled: AtomicBool::new(false) });
            sh.conns.lock().unwrap().push(conn.clone());
            for dir in [Dir::Up, Dir::Down] {
                let mine: Vec<Fault> = faults.iter().filter(|f| f.conn == n && f.dir == dir).cloned().collect();
                let (sh, conn) = (sh.clone(), conn.clone());
                std::thread::spawn(move || pump(sh, conn, dir, mine));
            }
        });
        Self { addr, shared }
    }

    /// When the first fault fired.
    pub fn fired_at(&self) -> Option<Instant> {
        *self.shared.fired.lock().unwrap()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Kill every connection at once (both ends see it closed), like a peer process dying.
    pub fn kill(&self) {
        self.shared.kill();
    }

    /// Stall every connection (nothing forwarded any more either way).
    pub fn stall_all(&self) {
        self.shared.fire();
        for c in self.shared.conns.lock().unwrap().iter() {
            c.stalled.store(true, Ordering::SeqCst);
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::SeqCst);
        for c in self.shared.conns.lock().unwrap().iter() {
            let _ = c.up.shutdown(Shutdown::Both);
            let _ = c.down.shutdown(Shutdown::Both);
        }
    }
}

fn frame_mode(faults: &[Fault]) -> bool {
    faults.iter().any(|f| matches!(f.at, At::Frame(..)))
}

/// Forward one direction of `conn`, applying `faults`.
fn pump(sh: Arc<Shared>, conn: Arc<Conn>, dir: Dir, mut faults: Vec<Fault>) {
    let (mut from, mut to) = match dir {
        Dir::Up => (conn.down.try_clone().unwrap(), conn.up.try_clone().unwrap()),
        Dir::Down => (conn.up.try_clone().unwrap(), conn.down.try_clone().unwrap()),
    };
    let stall_forever = |conn: &Conn| {
        conn.stalled.store(true, Ordering::SeqCst);
        while !sh.closed.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let drop_conn = |conn: &Conn| {
        let _ = conn.up.shutdown(Shutdown::Both);
        let _ = conn.down.shutdown(Shutdown::Both);
    };
    let framed = frame_mode(&faults);
    let mut seen: std::collections::HashMap<String, usize> = Default::default();
    let mut pos = 0u64;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        // Next unit: a whole control frame in frame mode, else whatever arrived.
        let mut unit: Vec<u8> = if framed {
            let mut hdr = [0u8; 14];
            if from.read_exact(&mut hdr).is_err() {
                break;
            }
            let body = u32::from_le_bytes(hdr[6..10].try_into().unwrap()) as usize;
            let blob = u32::from_le_bytes(hdr[10..14].try_into().unwrap()) as usize;
            let mut rest = vec![0u8; body + blob + 4];
            if from.read_exact(&mut rest).is_err() {
                break;
            }
            [&hdr[..], &rest].concat()
        } else {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => buf[..n].to_vec(),
            }
        };
        if conn.stalled.load(Ordering::SeqCst) {
            stall_forever(&conn);
            return;
        }
        let start = pos;
        pos += unit.len() as u64;
        let mut cut: Option<usize> = None; // forward only this much, then act
        let mut act: Option<Action> = None;
        if framed {
            let body_len = u32::from_le_bytes(unit[6..10].try_into().unwrap()) as usize;
            let ty = serde_json::from_slice::<serde_json::Value>(&unit[14..14 + body_len])
                .ok()
                .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(String::from))
                .unwrap_or_default();
            let k = seen.entry(ty.clone()).or_default();
            let nth = *k;
            *k += 1;
            if let Some(i) = faults.iter().position(|f| matches!(f.at, At::Frame(t, n) if t == ty && n == nth)) {
                let f = faults.remove(i);
                match f.action {
                    Action::Flip(bit) => {
                        let at = 14 + body_len / 2;
                        unit[at] ^= 1 << (bit % 8);
                        sh.fire();
                    }
                    a => {
                        cut = Some(0);
                        act = Some(a);
                    }
                }
            }
        } else if let Some(i) = faults.iter().position(|f| matches!(f.at, At::Byte(b) if b < pos)) {
            let f = faults.remove(i);
            let At::Byte(b) = f.at else { unreachable!() };
            let off = b.saturating_sub(start) as usize;
            match f.action {
                Action::Flip(bit) => {
                    unit[off] ^= 1 << (bit % 8);
                    sh.fire();
                }
                a => {
                    cut = Some(off);
                    act = Some(a);
                }
            }
        }
        let n = cut.unwrap_or(unit.len());
        if to.write_all(&unit[..n]).is_err() {
            break;
        }
        match act {
            None => continue,
            Some(Action::Drop) => {
                sh.fire();
                drop_conn(&conn);
                return;
            }
            Some(Action::Stall) => {
                sh.fire();
                stall_forever(&conn);
                return;
            }
            Some(Action::Delay(d)) => {
                sh.fire();
                std::thread::sleep(d);
                if to.write_all(&unit[n..]).is_err() {
                    break;
                }
            }
            Some(Action::KillAll) => {
                sh.kill();
                return;
            }
            Some(Action::Flip(_)) => unreachable!(),
        }
    }
    // One side closed: pass the close on (half-close, like a real link).
    let _ = to.shutdown(Shutdown::Write);
}

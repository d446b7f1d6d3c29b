//! A TLS 1.3 connection over a blocking `TcpStream`: rustls runs the handshake, our record
//! layer ([`super::record`]) carries the data, usable from two threads at once (one reading,
//! one writing).
//!
//! What is copied, and why:
//! - **send**: each ≤ 16 KiB record is encrypted straight from the caller's memory (guest
//!   pages, a compressed batch) into a reused write buffer (AES-GCM out of place, with the
//!   inner content type as the extra byte: aws-lc-rs `seal_out_of_place_scatter`), so
//!   there is no user-space copy; only a record that spans two of the caller's slices is
//!   gathered into the buffer first and sealed there in place. About 64 KiB of records go
//!   to the socket per `write`, while they are still in cache for the kernel's copy.
//! - **receive**: the socket is read in 256 KiB chunks into a reused buffer (it stays in
//!   L2); each complete record is authenticated and decrypted there in place, and its
//!   plaintext, still hot, is copied into the caller's buffers. Decrypting straight into
//!   the caller's memory would save that copy but would put bytes of a record that fails
//!   authentication into guest memory; nothing is handed out before its tag checks.
//!
//! rustls' own buffered connection copies once more each way (plaintext into a new
//! allocation per record, records into an output buffer; on receive into its deframer and
//! out of its plaintext queue), which is what this module avoids.
//!
//! Locks: reading takes the read lock (it holds it across the socket read: readers are
//! serialized among themselves), writing takes the write lock (records reach the socket in
//! sequence order). The two never wait on each other, except that a reader that fails
//! sends its alert only if the write lock is free, and KeyUpdate handling takes the key
//! schedule's lock briefly.
//!
//! The handshake is driven through rustls' unbuffered API on our own buffer, so whatever the
//! peer sent after its last handshake record (it may start talking right after its
//! Finished) stays ours: records rustls already decrypted are handed out first, the
//! partial rest is the start of our read buffer, and the sequence numbers rustls hands over
//! account for both.

use super::record::{self, Keys, ALERT, APPLICATION_DATA, HANDSHAKE, HEADER, MAX_CIPHERTEXT, MAX_PLAIN, TAG};
use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::kernel::KernelConnection;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedConnectionCommon, UnbufferedStatus};
use rustls::{AlertDescription, ConnectionTrafficSecrets, Error, ExtractedSecrets};
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::ops::DerefMut;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// TLS bytes read from the socket per call (several full records), and about how many
/// record bytes are gathered before one socket write.
const CHUNK: usize = 64 << 10;
/// The read buffer: a chunk plus room for a partial record kept from the previous read.
const READ_BUF: usize = READ_CHUNK + HEADER + MAX_CIPHERTEXT;
/// TLS bytes read from the socket per call: fewer, larger reads (the buffer still fits L2).
const READ_CHUNK: usize = 256 << 10;
/// Largest handshake flight we buffer (certificate chains).
const MAX_HANDSHAKE_BUF: usize = 1 << 20;

fn io_err(e: Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// rustls' key schedule, kept for KeyUpdate.
enum Kernel {
    Client(KernelConnection<ClientConnectionData>),
    Server(KernelConnection<ServerConnectionData>),
}

impl Kernel {
    fn update_tx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), Error> {
        match self {
            Kernel::Client(k) => k.update_tx_secret(),
            Kernel::Server(k) => k.update_tx_secret(),
        }
    }
    fn update_rx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), Error> {
        match self {
            Kernel::Client(k) => k.update_rx_secret(),
            Kernel::Server(k) => k.update_rx_secret(),
        }
    }
}

struct ReadState {
    keys: Keys,
    buf: Vec<u8>,
    /// TLS bytes not yet opened: `buf[start..end]`.
    start: usize,
    end: usize,
    /// Decrypted plaintext not yet handed out: `buf[plain..plain + plain_len]`.
    plain: usize,
    plain_len: usize,
    /// close_notify received: reads return end of stream.
    closed: bool,
    /// A fatal error: every later read returns it again.
    failed: Option<Error>,
}

struct WriteState {
    keys: Keys,
    /// Sealed records waiting for the socket: `out[..fill]` (`out` is allocated once, at its
    /// full size, so sealing never has to zero or grow it).
    out: Vec<u8>,
    fill: usize,
    /// Send a KeyUpdate once the sequence number reaches this.
    update_at: u64,
    /// A write failed part way: the record stream is no longer well formed.
    broken: bool,
}

struct Shared {
    read: Mutex<ReadState>,
    write: Mutex<WriteState>,
    kernel: Mutex<Kernel>,
    /// The peer asked for a KeyUpdate: the next write sends ours first.
    reply_key_update: AtomicBool,
    peer_certificates: Option<Vec<Vec<u8>>>,
    describe: String,
}

/// One TLS connection; clones share it (see [`TlsStream::try_clone`]).
pub struct TlsStream {
    sock: TcpStream,
    shared: Arc<Shared>,
}

/// What the handshake leaves behind.
struct Established {
    secrets: ExtractedSecrets,
    kernel: Kernel,
    peer_certificates: Option<Vec<Vec<u8>>>,
    describe: String,
    /// Application data rustls decrypted after the handshake (the peer's first records).
    plain: Vec<u8>,
    /// Undecrypted bytes that followed.
    rest: Vec<u8>,
}

/// The two unbuffered connection types, driven by one handshake loop.
trait Handshaker: DerefMut<Target = UnbufferedConnectionCommon<Self::Data>> + Sized {
    type Data;
    fn process<'c, 'i>(&'c mut self, buf: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data>;
    fn into_kernel(self) -> Result<(ExtractedSecrets, Kernel), Error>;
    const IS_SERVER: bool;
}

impl Handshaker for UnbufferedClientConnection {
    type Data = ClientConnectionData;
    const IS_SERVER: bool = false;
    fn process<'c, 'i>(&'c mut self, buf: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(buf)
    }
    fn into_kernel(self) -> Result<(ExtractedSecrets, Kernel), Error> {
        self.dangerous_into_kernel_connection().map(|(s, k)| (s, Kernel::Client(k)))
    }
}

impl Handshaker for UnbufferedServerConnection {
    type Data = ServerConnectionData;
    const IS_SERVER: bool = true;
    fn process<'c, 'i>(&'c mut self, buf: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(buf)
    }
    fn into_kernel(self) -> Result<(ExtractedSecrets, Kernel), Error> {
        self.dangerous_into_kernel_connection().map(|(s, k)| (s, Kernel::Server(k)))
    }
}

/// Why the handshake loop stopped.
enum Step {
    /// Call `process` again.
    Again,
    /// rustls needs more bytes from the peer.
    Read,
    Done,
    Fail(io::Error),
}

/// After a failed handshake: send what rustls queued (its alert). `inb` must be the
/// buffer rustls last saw (its deframer keeps positions in it).
fn flush_queued<C: Handshaker>(conn: &mut C, sock: &mut TcpStream, inb: &mut [u8], out: &mut Vec<u8>) -> io::Result<()> {
    loop {
        let UnbufferedStatus { state, .. } = conn.process(inb);
        match state {
            Ok(ConnectionState::EncodeTlsData(mut enc)) => encode(&mut enc, out)?,
            Ok(ConnectionState::TransmitTlsData(t)) => {
                sock.write_all(out)?;
                out.clear();
                t.done();
            }
            _ => break,
        }
    }
    if !out.is_empty() {
        sock.write_all(out)?;
        out.clear();
    }
    Ok(())
}

fn encode<D>(enc: &mut rustls::unbuffered::EncodeTlsData<'_, D>, out: &mut Vec<u8>) -> io::Result<()> {
    let at = out.len();
    out.resize(at + 4096, 0);
    loop {
        match enc.encode(&mut out[at..]) {
            Ok(n) => {
                out.truncate(at + n);
                return Ok(());
            }
            Err(EncodeError::InsufficientSize(s)) => out.resize(at + s.required_size, 0),
            Err(e) => return Err(io::Error::other(e)),
        }
    }
}

/// Run a handshake to completion on `sock` (timeouts: `deadline`), keeping every byte that
/// arrives after it.
fn drive<C: Handshaker>(mut conn: C, sock: &mut TcpStream, deadline: Instant) -> io::Result<Established> {
    let mut inb = vec![0u8; 16 << 10];
    let mut used = 0;
    let mut out = Vec::new();
    let mut plain = Vec::new();
    sock.set_write_timeout(Some(deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1)))).ok();
    loop {
        let UnbufferedStatus { discard, state } = conn.process(&mut inb[..used]);
        let step = match state {
            Err(e) => Step::Fail(io_err(e)),
            Ok(ConnectionState::EncodeTlsData(mut enc)) => match encode(&mut enc, &mut out) {
                Ok(()) => Step::Again,
                Err(e) => Step::Fail(e),
            },
            Ok(ConnectionState::TransmitTlsData(t)) => match sock.write_all(&out) {
                Ok(()) => {
                    out.clear();
                    t.done();
                    Step::Again
                }
                Err(e) => Step::Fail(e),
            },
            Ok(ConnectionState::ReadTraffic(mut r)) => {
                // The peer's first application data, right behind its Finished.
                let mut res = Step::Again;
                while let Some(rec) = r.next_record() {
                    match rec {
                        Ok(rec) => plain.extend_from_slice(rec.payload),
                        Err(e) => {
                            res = Step::Fail(io_err(e));
                            break;
                        }
                    }
                }
                res
            }
            Ok(ConnectionState::BlockedHandshake) => Step::Read,
            Ok(ConnectionState::WriteTraffic(_)) => Step::Done,
            Ok(ConnectionState::PeerClosed) | Ok(ConnectionState::Closed) => Step::Fail(io::ErrorKind::UnexpectedEof.into()),
            Ok(_) => Step::Fail(io_err(Error::General("unexpected TLS state during the handshake (early data?)".into()))),
        };
        inb.copy_within(discard..used, 0);
        used -= discard;
        match step {
            Step::Done if !conn.is_handshaking() => break,
            // The server may send before the client's Finished (0.5-RTT); we wait for it.
            Step::Done | Step::Read => {
                if used == inb.len() {
                    if inb.len() >= MAX_HANDSHAKE_BUF {
                        return Err(io_err(Error::General("TLS handshake message too large".into())));
                    }
                    inb.resize(inb.len() * 2, 0);
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::ErrorKind::TimedOut.into());
                }
                sock.set_read_timeout(Some(left)).ok();
                let n = sock.read(&mut inb[used..])?;
                if n == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                used += n;
            }
            Step::Again => {}
            Step::Fail(e) => {
                // Tell the peer why (rustls queued an alert), then report it.
                out.clear();
                let _ = flush_queued(&mut conn, sock, &mut inb[..used], &mut out);
                if C::IS_SERVER && matches!(e.get_ref().and_then(|i| i.downcast_ref::<Error>()), Some(Error::InvalidMessage(_))) {
                    // A peer that does not speak TLS at all: one more fatal
                    // unexpected_message alert, so that a plaintext pageferry source reads
                    // at least a frame header's worth of bytes and can tell the
                    // destination requires TLS (it sees their first bytes as a bad magic).
                    let _ = sock.write_all(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x0a]);
                }
                return Err(e);
            }
        }
    }
    // Nothing is left to send here: rustls reports WriteTraffic only once its flights are
    // out (and refuses to hand over the keys otherwise).
    let peer_certificates = conn.peer_certificates().map(|v| v.iter().map(|c| c.as_ref().to_vec()).collect());
    let version = match conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLS 1.3".to_string(),
        Some(v) => return Err(io_err(Error::General(format!("negotiated {v:?}, TLS 1.3 is required")))),
        None => "TLS".into(),
    };
    let suite = conn.negotiated_cipher_suite().map(|s| format!("{:?}", s.suite())).unwrap_or_default();
    let describe = format!("{version} {}", suite.trim_start_matches("TLS13_"));
    let (secrets, kernel) = conn.into_kernel().map_err(io_err)?;
    inb.truncate(used);
    Ok(Established { secrets, kernel, peer_certificates, describe, plain, rest: inb })
}


/// Run the client side of a handshake (`timeout` for all of it).
pub(crate) fn client(mut sock: TcpStream, config: Arc<rustls::ClientConfig>, name: rustls::pki_types::ServerName<'static>, timeout: Duration) -> io::Result<TlsStream> {
    let conn = UnbufferedClientConnection::new(config, name).map_err(io_err)?;
    let est = drive(conn, &mut sock, Instant::now() + timeout)?;
    TlsStream::new(sock, est)
}

/// Run the server side of a handshake on an accepted socket.
pub(crate) fn server(mut sock: TcpStream, config: Arc<rustls::ServerConfig>, timeout: Duration) -> io::Result<TlsStream> {
    let conn = UnbufferedServerConnection::new(config).map_err(io_err)?;
    let est = drive(conn, &mut sock, Instant::now() + timeout)?;
    TlsStream::new(sock, est)
}

/// The write buffer: about a chunk of records, plus room for one more.
const WRITE_BUF: usize = CHUNK + HEADER + MAX_PLAIN + 1 + TAG;

impl WriteState {
    /// Append one sealed record with `plain` (≤ 2^14 bytes) as its plaintext and `typ` as
    /// its content type, encrypted straight from `plain` into the buffer.
    fn seal(&mut self, plain: &[u8], typ: u8) -> Result<(), Error> {
        let at = self.fill;
        let end = at + HEADER + plain.len() + 1 + TAG;
        self.keys.seal_from(plain, typ, &mut self.out[at..end])?;
        self.fill = end;
        Ok(())
    }
}

impl TlsStream {
    fn new(sock: TcpStream, est: Established) -> io::Result<Self> {
        let Established { secrets, kernel, peer_certificates, describe, plain, rest } = est;
        let (tx_seq, tx) = secrets.tx;
        let (rx_seq, rx) = secrets.rx;
        // The read buffer starts with what the handshake left: plaintext, then TLS bytes.
        let mut buf = Vec::with_capacity(READ_BUF.max(plain.len() + rest.len() + HEADER + MAX_CIPHERTEXT));
        buf.extend_from_slice(&plain);
        buf.extend_from_slice(&rest);
        let (start, end) = (plain.len(), buf.len());
        buf.resize(buf.capacity(), 0);
        let read = ReadState { keys: Keys::new(rx_seq, rx).map_err(io_err)?, buf, start, end, plain: 0, plain_len: plain.len(), closed: false, failed: None };
        let write = WriteState { keys: Keys::new(tx_seq, tx).map_err(io_err)?, out: vec![0; WRITE_BUF], fill: 0, update_at: record::KEY_UPDATE_AFTER, broken: false };
        sock.set_read_timeout(None).ok();
        sock.set_write_timeout(None).ok();
        let shared = Shared {
            read: Mutex::new(read),
            write: Mutex::new(write),
            kernel: Mutex::new(kernel),
            reply_key_update: AtomicBool::new(false),
            peer_certificates,
            describe,
        };
        Ok(Self { sock, shared: Arc::new(shared) })
    }

    /// A second handle to the same connection (e.g. a reader thread while another writes).
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self { sock: self.sock.try_clone()?, shared: self.shared.clone() })
    }

    /// The TCP socket underneath.
    pub fn tcp(&self) -> &TcpStream {
        &self.sock
    }

    /// The peer's certificate chain (end entity first), if it presented one.
    pub fn peer_certificates(&self) -> Option<Vec<Vec<u8>>> {
        self.shared.peer_certificates.clone()
    }

    /// Negotiated protocol version and cipher suite, e.g. "TLS 1.3 AES_128_GCM_SHA256".
    pub fn describe(&self) -> String {
        self.shared.describe.clone()
    }

    /// Shut the TCP connection down (no close_notify: see [`TlsStream::close_notify`]).
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.sock.shutdown(how)
    }

    /// Read timeout of the socket.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.sock.set_read_timeout(t)
    }

    /// Write timeout of the socket.
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.sock.set_write_timeout(t)
    }

    /// Send a close_notify alert (best effort: the peer may be gone).
    pub fn close_notify(&self) -> io::Result<()> {
        let mut w = self.shared.write.lock().unwrap();
        self.send_alert(&mut w, AlertDescription::CloseNotify)
    }

    fn send_alert(&self, w: &mut WriteState, desc: AlertDescription) -> io::Result<()> {
        if w.broken {
            return Err(broken());
        }
        let level = if desc == AlertDescription::CloseNotify { 1 } else { 2 };
        w.seal(&[level, u8::from(desc)], ALERT).map_err(io_err)?;
        self.flush_out(w)
    }

    fn flush_out(&self, w: &mut WriteState) -> io::Result<()> {
        let r = (&self.sock).write_all(&w.out[..w.fill]);
        w.fill = 0;
        if r.is_err() {
            w.broken = true;
        }
        r
    }

    /// Send a KeyUpdate (update_not_requested) under the current keys, then switch to the
    /// next ones (rustls' key schedule).
    fn key_update(&self, w: &mut WriteState) -> io::Result<()> {
        w.seal(&record::KEY_UPDATE, HANDSHAKE).map_err(io_err)?;
        let (seq, secrets) = self.shared.kernel.lock().unwrap().update_tx().map_err(io_err)?;
        w.keys = Keys::new(seq, secrets).map_err(io_err)?;
        Ok(())
    }

    /// Test hook: rotate the sending keys after `records` more records.
    #[cfg(test)]
    pub(crate) fn key_update_after(&self, records: u64) {
        let mut w = self.shared.write.lock().unwrap();
        w.update_at = w.keys.seq() + records;
    }

    /// Test hook: (decrypted plaintext, undecrypted TLS bytes) the handshake left in the
    /// read buffer, before anything was read.
    #[cfg(test)]
    pub(crate) fn handshake_leftover_for_test(&self) -> (usize, usize) {
        let rs = self.shared.read.lock().unwrap();
        (rs.plain_len, rs.end - rs.start)
    }

    /// Test hook: send one record with any content type.
    #[cfg(test)]
    pub(crate) fn send_record_for_test(&self, plain: &[u8], typ: u8) -> io::Result<()> {
        let mut w = self.shared.write.lock().unwrap();
        w.seal(plain, typ).map_err(io_err)?;
        self.flush_out(&mut w)
    }

    fn write_slices(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut w = self.shared.write.lock().unwrap();
        if w.broken {
            return Err(broken());
        }
        if self.shared.reply_key_update.swap(false, Ordering::AcqRel) {
            self.key_update(&mut w)?;
        }
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let mut slices = bufs.iter().map(|b| &b[..]).filter(|b| !b.is_empty());
        let mut cur: &[u8] = &[];
        let mut left = total;
        while left > 0 {
            if w.keys.seq() >= w.update_at {
                self.key_update(&mut w)?;
                w.update_at = w.keys.seq() + record::KEY_UPDATE_AFTER;
            }
            let n = left.min(MAX_PLAIN);
            while cur.is_empty() {
                cur = slices.next().expect("slice lengths add up");
            }
            let w = &mut *w;
            if cur.len() >= n {
                // The usual case: the record's plaintext is contiguous in the caller's
                // memory, encrypted from there straight into the buffer (no copy).
                w.seal(&cur[..n], APPLICATION_DATA).map_err(io_err)?;
                cur = &cur[n..];
            } else {
                // The record spans slices: gather them into the buffer, seal in place.
                let at = w.fill;
                let mut p = at + HEADER;
                let mut need = n;
                while need > 0 {
                    while cur.is_empty() {
                        cur = slices.next().expect("slice lengths add up");
                    }
                    let k = need.min(cur.len());
                    w.out[p..p + k].copy_from_slice(&cur[..k]);
                    cur = &cur[k..];
                    p += k;
                    need -= k;
                }
                w.out[p] = APPLICATION_DATA;
                let end = p + 1 + TAG;
                w.keys.seal(&mut w.out[at..end]).map_err(io_err)?;
                w.fill = end;
            }
            left -= n;
            if w.fill >= CHUNK {
                self.flush_out(w)?;
            }
        }
        if w.fill > 0 {
            self.flush_out(&mut w)?;
        }
        Ok(total)
    }

    /// A fatal error on the read side: remember it, tell the peer (if the write side is
    /// free), report it.
    fn fail(&self, rs: &mut ReadState, e: Error) -> io::Error {
        let desc = match &e {
            Error::DecryptError => Some(AlertDescription::BadRecordMac),
            Error::AlertReceived(_) => None,
            _ => Some(AlertDescription::UnexpectedMessage),
        };
        if let (Some(d), Ok(mut w)) = (desc, self.shared.write.try_lock()) {
            let _ = self.send_alert(&mut w, d);
        }
        rs.failed = Some(e.clone());
        io_err(e)
    }

    /// Open the next complete record in the buffer, if there is one. Ok(true): progress.
    fn open_next(&self, rs: &mut ReadState) -> Result<bool, Error> {
        let avail = rs.end - rs.start;
        if avail < HEADER {
            return Ok(false);
        }
        let len = record::check_header(&rs.buf[rs.start..rs.start + HEADER])?;
        if avail < HEADER + len {
            return Ok(false);
        }
        let at = rs.start;
        let (typ, n) = rs.keys.open(&mut rs.buf[at..at + HEADER + len])?;
        rs.start += HEADER + len;
        let body = at + HEADER;
        match typ {
            APPLICATION_DATA => {
                rs.plain = body;
                rs.plain_len = n;
            }
            ALERT => {
                record::alert(&rs.buf[body..body + n])?;
                rs.closed = true;
            }
            HANDSHAKE => {
                let requested = record::key_update(&rs.buf[body..body + n])?;
                let (seq, secrets) = self.shared.kernel.lock().unwrap().update_rx()?;
                rs.keys = Keys::new(seq, secrets)?;
                if requested {
                    self.shared.reply_key_update.store(true, Ordering::Release);
                }
            }
            t => return Err(Error::General(format!("TLS: unexpected content type {t} after the handshake"))),
        }
        Ok(true)
    }

    fn read_plain(&self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        if bufs.iter().all(|b| b.is_empty()) {
            return Ok(0);
        }
        let mut guard = self.shared.read.lock().unwrap();
        let rs = &mut *guard;
        if let Some(e) = &rs.failed {
            return Err(io_err(e.clone()));
        }
        let mut done = 0;
        let mut bi = 0;
        let mut off = 0;
        loop {
            // Hand out decrypted plaintext, across records already in the buffer, without
            // blocking once something was delivered.
            while rs.plain_len > 0 && bi < bufs.len() {
                let b = &mut bufs[bi][off..];
                let k = b.len().min(rs.plain_len);
                b[..k].copy_from_slice(&rs.buf[rs.plain..rs.plain + k]);
                rs.plain += k;
                rs.plain_len -= k;
                done += k;
                off += k;
                if off == bufs[bi].len() {
                    bi += 1;
                    off = 0;
                }
            }
            if bi == bufs.len() || rs.closed {
                return Ok(done);
            }
            match self.open_next(rs) {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => return Err(self.fail(rs, e)),
            }
            if done > 0 {
                return Ok(done);
            }
            // Need more TLS bytes. Keep room for a whole record behind the partial one.
            if rs.start == rs.end {
                rs.start = 0;
                rs.end = 0;
            } else if rs.buf.len() - rs.start < HEADER + MAX_CIPHERTEXT || rs.buf.len() - rs.end < READ_CHUNK / 4 {
                rs.buf.copy_within(rs.start..rs.end, 0);
                rs.end -= rs.start;
                rs.start = 0;
            }
            let end = rs.end;
            let n = (&self.sock).read(&mut rs.buf[end..])?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the peer closed the TLS connection without close_notify"));
            }
            rs.end += n;
        }
    }
}

fn broken() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "TLS connection unusable after an earlier write error")
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_plain(&mut [IoSliceMut::new(buf)])
    }
    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        self.read_plain(bufs)
    }
}

impl Read for &TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_plain(&mut [IoSliceMut::new(buf)])
    }
    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        self.read_plain(bufs)
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_slices(&[IoSlice::new(buf)])
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.write_slices(bufs)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Write for &TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_slices(&[IoSlice::new(buf)])
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.write_slices(bufs)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

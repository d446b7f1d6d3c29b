//! A TLS connection usable from two threads at once (one reading, one writing), over a
//! blocking `TcpStream`.
//!
//! The rustls connection state sits behind a mutex that is never held during a socket call:
//! - reading takes the read lock (readers are serialized among themselves), reads TLS bytes
//!   from the socket into its own buffer without the connection lock, then locks the
//!   connection only to feed, decrypt and take plaintext;
//! - writing takes the write lock, locks the connection to encrypt the plaintext into
//!   records (drained into the write buffer), unlocks it, then writes the buffer to the
//!   socket. Encryption and socket writes happen under the same write lock, so records reach
//!   the socket in sequence order.
//!
//! Records are encrypted by copying: TLS cannot send guest memory straight from the page
//! cache the way `writev` does on plain TCP (kTLS could, but it is not used; see the module
//! doc of `transport`).

use rustls::Connection;
use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// TLS bytes read from the socket per call (several full records).
const READ_CHUNK: usize = 64 << 10;

struct ReadState {
    buf: Vec<u8>,
    pos: usize,
    end: usize,
}

struct Shared {
    conn: Mutex<Connection>,
    read: Mutex<ReadState>,
    /// The write buffer doubles as the write lock.
    write: Mutex<Vec<u8>>,
}

/// One TLS connection; clones share it (see [`TlsStream::try_clone`]).
pub struct TlsStream {
    sock: TcpStream,
    shared: Arc<Shared>,
}

fn tls_err(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl TlsStream {
    /// Wrap a connection whose handshake is complete.
    pub(crate) fn new(sock: TcpStream, mut conn: Connection) -> Self {
        // Whole packets (≤ 512 KiB) are encrypted in one call; the write buffer bounds memory.
        conn.set_buffer_limit(None);
        let shared = Shared {
            conn: Mutex::new(conn),
            read: Mutex::new(ReadState { buf: vec![0u8; READ_CHUNK], pos: 0, end: 0 }),
            write: Mutex::new(Vec::with_capacity(READ_CHUNK)),
        };
        Self { sock, shared: Arc::new(shared) }
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
        let c = self.shared.conn.lock().unwrap();
        c.peer_certificates().map(|v| v.iter().map(|c| c.as_ref().to_vec()).collect())
    }

    /// Negotiated protocol version and cipher suite, e.g. "TLSv1_3 TLS13_AES_128_GCM_SHA256".
    pub fn describe(&self) -> String {
        let c = self.shared.conn.lock().unwrap();
        let v = match c.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => "TLS 1.3".to_string(),
            Some(v) => format!("{v:?}"),
            None => "TLS".into(),
        };
        let s = c.negotiated_cipher_suite().map(|s| format!("{:?}", s.suite())).unwrap_or_default();
        format!("{v} {}", s.trim_start_matches("TLS13_"))
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

    /// Send whatever the connection has queued (alerts, key updates) under the write lock.
    fn flush_pending(&self) -> io::Result<()> {
        let mut out = self.shared.write.lock().unwrap();
        {
            let mut c = self.shared.conn.lock().unwrap();
            while c.wants_write() {
                c.write_tls(&mut *out)?;
            }
        }
        let r = (&self.sock).write_all(&out);
        out.clear();
        r
    }

    /// Send a close_notify alert (best effort: the peer may be gone).
    pub fn close_notify(&self) -> io::Result<()> {
        self.shared.conn.lock().unwrap().send_close_notify();
        self.flush_pending()
    }

    fn write_slices(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut out = self.shared.write.lock().unwrap();
        let n = {
            let mut c = self.shared.conn.lock().unwrap();
            let n = c.writer().write_vectored(bufs)?;
            while c.wants_write() {
                c.write_tls(&mut *out)?;
            }
            n
        };
        let r = (&self.sock).write_all(&out);
        out.clear();
        if out.capacity() > 4 * READ_CHUNK + (1 << 20) {
            out.shrink_to(READ_CHUNK);
        }
        r.map(|_| n)
    }

    fn read_plain(&self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut rs = self.shared.read.lock().unwrap();
        loop {
            let mut reply = false;
            {
                let mut c = self.shared.conn.lock().unwrap();
                // Feed buffered TLS bytes while there is room for their plaintext.
                while rs.pos < rs.end {
                    let (pos, end) = (rs.pos, rs.end);
                    match c.read_tls(&mut &rs.buf[pos..end]) {
                        Ok(0) => break,
                        Ok(n) => rs.pos += n,
                        // The plaintext buffer is full: hand that out first.
                        Err(e) if e.kind() == io::ErrorKind::Other => break,
                        Err(e) => return Err(e),
                    }
                    let st = c.process_new_packets();
                    reply |= c.wants_write();
                    if let Err(e) = st {
                        // Send the alert that explains it to the peer, then report it.
                        drop(c);
                        let _ = self.flush_pending();
                        return Err(tls_err(e));
                    }
                }
                if rs.pos == rs.end {
                    rs.pos = 0;
                    rs.end = 0;
                }
                let r = c.reader().read(buf);
                drop(c);
                if reply {
                    // Post-handshake answers (key updates): best effort, the data path
                    // reports a dead peer on its own.
                    let _ = self.flush_pending();
                }
                match r {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            if rs.pos < rs.end {
                continue;
            }
            // Need more TLS bytes: read the socket without holding the connection lock.
            let n = (&self.sock).read(&mut rs.buf[..])?;
            if n == 0 {
                // EOF: let rustls decide between a clean close (close_notify seen: Ok(0))
                // and a truncated stream (UnexpectedEof).
                let mut c = self.shared.conn.lock().unwrap();
                let _ = c.read_tls(&mut &[][..]);
                c.process_new_packets().map_err(tls_err)?;
                return match c.reader().read(buf) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(io::ErrorKind::UnexpectedEof.into()),
                    r => r,
                };
            }
            rs.pos = 0;
            rs.end = n;
        }
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_plain(buf)
    }
}

impl Read for &TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_plain(buf)
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

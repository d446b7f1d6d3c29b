//! Transport: the byte stream every channel runs over — plain TCP, or TLS 1.3 (rustls with
//! the aws-lc-rs provider) — and the handshakes that make one.
//!
//! The engine sees a [`Stream`]: `Read + Write`, a second handle to the same connection
//! ([`Stream::try_clone`], the source's control channel reads on one thread while another
//! writes), `shutdown`, timeouts, and vectored I/O. Plain TCP keeps true zero copy (`writev`
//! straight from guest memory, `readv` straight into it).
//!
//! TLS: rustls runs the handshake and every authentication decision (certificates, PSK,
//! authz, version and suite); after it, the TLS 1.3 record layer is ours (`tls`, `record`),
//! the way kTLS takes over from a user-space handshake, but in user space: rustls hands over
//! the traffic keys (`dangerous_into_kernel_connection`, rustls' API for exactly this) and
//! keeps its key schedule for KeyUpdate. What TLS copies, per byte, and why:
//! - send: nothing in user space when a record's 16 KiB are contiguous in the caller's
//!   memory (the usual case: runs of guest pages, compressed batches): AES-GCM encrypts out
//!   of place from there into a reused 64 KiB buffer of records, then the kernel copies that
//!   (cache-hot) buffer into the socket, as it copies guest memory for plain TCP;
//! - receive: the kernel's copy into a reused 256 KiB buffer, decryption in place, one copy
//!   of the cache-hot plaintext into the caller's buffers (guest memory or a batch buffer):
//!   nothing reaches the caller before its record authenticates.
//!
//! rustls' buffered connection costs one or two more copies each way and an allocation per
//! record; `pageferry bench --tls both` and `examples/tls_cost.rs` measure what is left
//! (docs/BENCHMARKS.md). The wire is standard
//! TLS 1.3 (tests run our record layer against plain rustls peers). Because nothing but data,
//! alerts and KeyUpdate may follow the handshake, a server configuration is used with
//! TLS 1.3 session tickets off, and both sides with secret extraction on (set here on a
//! copy when a caller's configuration lacks them).
//!
//! kTLS (the kernel `tls` ULP, which would let the kernel encrypt while it copies into the
//! socket, and decrypt while it copies out) is not used: this project's kernels have no `tls` module. The
//! keys it would need are the ones our record layer already takes.
//!
//! Credentials and their trust model are in [`creds`]; the library API takes rustls
//! configurations ([`creds::TlsClient`], `Arc<rustls::ServerConfig>`), so a VMM can pass its
//! own; the `pageferry` command builds them from QEMU-style flags.

pub mod creds;
mod record;
#[cfg(test)]
mod tests_record;
mod tls;

pub use creds::TlsClient;
pub use tls::TlsStream;

use rustls::pki_types::ServerName;
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::time::Duration;

/// Why a TLS connection or its credentials failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A TLS handshake failed; the message says why in the operator's terms.
    #[error("{0}")]
    Handshake(String),
    /// A credential file is missing, unreadable or unusable (the message names it).
    #[error("TLS credentials: {0}")]
    Credentials(String),
    /// A socket error outside the handshake.
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
}

/// Who is at the other end of an authenticated connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerIdentity {
    /// Plain TCP: nobody was authenticated.
    Plain,
    /// TLS, but the peer presented no certificate (the destination does not verify peers).
    Anonymous,
    /// TLS with a verified client certificate (x509, or one derived from a PSK): its DER.
    Certificate(Vec<u8>),
}

impl PeerIdentity {
    /// For messages: the certificate's subject (a PSK identity shows as `pageferry-psk:ID`).
    pub fn describe(&self) -> String {
        match self {
            PeerIdentity::Plain => "an unauthenticated plain TCP peer".into(),
            PeerIdentity::Anonymous => "a TLS peer without a certificate".into(),
            PeerIdentity::Certificate(der) => creds::certificate_subject(der),
        }
    }
}

/// One connection: plain TCP or TLS.
pub enum Stream {
    /// Plain TCP (no authentication, no encryption).
    Plain(TcpStream),
    /// TLS 1.3 over TCP.
    Tls(TlsStream),
}

impl Stream {
    /// A second handle to the same connection.
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Plain(s) => Stream::Plain(s.try_clone()?),
            Stream::Tls(s) => Stream::Tls(s.try_clone()?),
        })
    }
    /// The TCP socket underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => s.tcp(),
        }
    }
    /// Whether this connection runs TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }
    /// Shut the TCP connection down (unblocks threads reading or writing it).
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.tcp().shutdown(how)
    }
    /// Read timeout of the socket (all handles).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.tcp().set_read_timeout(t)
    }
    /// Write timeout of the socket (all handles).
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.tcp().set_write_timeout(t)
    }
    /// The socket's read timeout.
    pub fn read_timeout(&self) -> io::Result<Option<Duration>> {
        self.tcp().read_timeout()
    }
    /// The socket's write timeout.
    pub fn write_timeout(&self) -> io::Result<Option<Duration>> {
        self.tcp().write_timeout()
    }
    /// Send TLS close_notify (no-op on plain TCP), so the peer sees a clean end of stream.
    pub fn close_notify(&self) {
        if let Stream::Tls(s) = self {
            let _ = s.close_notify();
        }
    }
    /// Who the peer authenticated as.
    pub fn peer_identity(&self) -> PeerIdentity {
        match self {
            Stream::Plain(_) => PeerIdentity::Plain,
            Stream::Tls(s) => match s.peer_certificates() {
                Some(mut chain) if !chain.is_empty() => PeerIdentity::Certificate(chain.swap_remove(0)),
                _ => PeerIdentity::Anonymous,
            },
        }
    }
    /// "plain TCP" or the TLS version and cipher suite.
    pub fn describe(&self) -> String {
        match self {
            Stream::Plain(_) => "plain TCP".into(),
            Stream::Tls(s) => s.describe(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read_vectored(bufs),
            // Decrypted plaintext is copied out of the record buffer into the slices in turn.
            Stream::Tls(s) => s.read_vectored(bufs),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write_vectored(bufs),
            Stream::Tls(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

/// The host part of `host:port` (brackets of an IPv6 literal removed).
pub fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(addr);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// Run the client side of a TLS handshake on `sock` within `timeout`; `addr` names the peer
/// for the certificate check unless `tls.server_name` overrides it.
pub fn client_handshake(sock: TcpStream, tls: &TlsClient, addr: &str, timeout: Duration) -> Result<Stream, TransportError> {
    let name = tls.server_name.clone().unwrap_or_else(|| host_of(addr).to_string());
    let server_name = ServerName::try_from(name.clone()).map_err(|_| TransportError::Handshake(format!("{name:?} is not a valid TLS server name (set --tls-hostname)")))?;
    // Our record layer takes the traffic keys once the handshake is done.
    let config = if tls.config.enable_secret_extraction {
        tls.config.clone()
    } else {
        let mut c = (*tls.config).clone();
        c.enable_secret_extraction = true;
        Arc::new(c)
    };
    tls::client(sock, config, server_name, timeout).map(Stream::Tls).map_err(|e| TransportError::Handshake(explain(&e, "destination", &name, timeout)))
}

/// Run the server side of a TLS handshake on an accepted `sock` within `timeout`.
///
/// The configuration is used with two changes our record layer needs: secret extraction
/// on, and no TLS 1.3 session tickets (nothing may follow the handshake but data).
pub fn server_handshake(sock: TcpStream, config: &Arc<rustls::ServerConfig>, timeout: Duration) -> Result<Stream, TransportError> {
    let config = if config.enable_secret_extraction && config.send_tls13_tickets == 0 {
        config.clone()
    } else {
        let mut c = (**config).clone();
        c.enable_secret_extraction = true;
        c.send_tls13_tickets = 0;
        Arc::new(c)
    };
    tls::server(sock, config, timeout).map(Stream::Tls).map_err(|e| TransportError::Handshake(explain(&e, "source", "", timeout)))
}

/// An operator's explanation of a failed handshake or of an error on an established TLS
/// connection (`peer`: "source" or "destination"; `name`: the name checked, if any).
pub fn explain(e: &io::Error, peer: &str, name: &str, timeout: Duration) -> String {
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<E>()) else {
        return match e.kind() {
            io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => {
                format!("the {peer} closed the connection during the TLS handshake (does it have TLS configured? did it refuse us?)")
            }
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => format!("TLS handshake with the {peer} timed out after {timeout:?}"),
            _ => format!("TLS handshake with the {peer}: {e}"),
        };
    };
    let what = match tls {
        E::InvalidCertificate(c) => match c {
            C::UnknownIssuer => format!("the {peer}'s certificate is not signed by our CA (ca-cert.pem)"),
            C::NotValidForName | C::NotValidForNameContext { .. } => format!("the {peer}'s certificate is not valid for the name {name:?} (check --tls-hostname)"),
            C::Expired | C::ExpiredContext { .. } => format!("the {peer}'s certificate has expired"),
            C::NotValidYet | C::NotValidYetContext { .. } => format!("the {peer}'s certificate is not valid yet"),
            C::Revoked => format!("the {peer}'s certificate is revoked"),
            C::Other(o) => format!("the {peer} is not authorized: {o}"),
            // Raised by the --tls-authz check only (see creds::AuthzVerifier).
            C::ApplicationVerificationFailure => creds::take_authz_denial().unwrap_or_else(|| format!("the {peer}'s certificate is not in the --tls-authz list")),
            other => format!("the {peer}'s certificate is invalid: {other:?}"),
        },
        E::NoCertificatesPresented => format!("the {peer} presented no certificate (peer verification requires client-cert.pem / client-key.pem)"),
        E::AlertReceived(a) => match a {
            A::ProtocolVersion => format!("the {peer} refused our TLS version (TLS 1.3 is required)"),
            A::AccessDenied => format!("the {peer} refused our credentials: our certificate is not in its --tls-authz list (TLS alert {a:?})"),
            A::CertificateExpired => format!("the {peer} refused our credentials: our certificate has expired or is not valid yet (TLS alert {a:?})"),
            A::UnknownCA => format!("the {peer} refused our credentials: our certificate is not signed by a CA it trusts (TLS alert {a:?})"),
            // What rustls sends for a certificate not valid for the expected name (or malformed).
            A::BadCertificate if peer == "source" => {
                format!("the {peer} refused our credentials: our certificate is not valid for the name it expects (its --tls-hostname, or the host it connected to), or is malformed (TLS alert {a:?})")
            }
            A::BadCertificate | A::CertificateUnknown | A::CertificateRequired | A::DecryptError => {
                format!("the {peer} refused our credentials (TLS alert {a:?}): wrong CA, expired or unauthorized certificate, or wrong pre-shared key")
            }
            A::UnrecognisedName => format!("the {peer} does not know our PSK identity (TLS alert {a:?})"),
            A::HandshakeFailure => format!("the {peer} refused the handshake (TLS alert {a:?}): no common TLS 1.3 cipher suite, or credentials it cannot use"),
            other => format!("the {peer} aborted the TLS handshake (alert {other:?})"),
        },
        E::InvalidMessage(_) => format!("the {peer} does not speak TLS (a plaintext pageferry peer? both sides need --tls-creds or --tls-psk)"),
        E::PeerIncompatible(p) => format!("the {peer} is incompatible: {p:?} (TLS 1.3 is required)"),
        E::General(g) => format!("TLS handshake with the {peer}: {g}"),
        other => format!("TLS handshake with the {peer}: {other}"),
    };
    what
}

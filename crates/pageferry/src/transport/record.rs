//! The TLS 1.3 record layer after the handshake (RFC 8446 §5.2), ours instead of rustls'.
//!
//! rustls runs the handshake and every authentication decision; once it is done, its traffic
//! keys are taken out (`dangerous_into_kernel_connection`, the API meant for kTLS) and
//! records are sealed and opened here, in place, in buffers that stay in cache:
//!
//! ```text
//! record = 0x17 0x03 0x03 len(u16)  ||  AEAD(plaintext || content type, nonce = iv XOR seq, aad = the 5-byte header)
//! ```
//!
//! Only what a pageferry connection uses after the handshake is accepted: application data,
//! alerts (close_notify ends the stream; any other alert is the peer's error), and KeyUpdate
//! (keys are rotated on both directions through rustls' key schedule). Anything else — a
//! NewSessionTicket, another handshake message, an unknown content type, a record over the
//! size limit, a record that fails authentication — is an error, and no byte of a record is
//! used before its tag has been checked.

use aws_lc_rs::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use rustls::{AlertDescription, ConnectionTrafficSecrets, Error};

/// Outer content type of every protected record.
pub(crate) const APPLICATION_DATA: u8 = 23;
/// Inner content types.
pub(crate) const ALERT: u8 = 21;
pub(crate) const HANDSHAKE: u8 = 22;
/// Header: type, legacy version 0x0303, length.
pub(crate) const HEADER: usize = 5;
/// AEAD tag of every TLS 1.3 suite.
pub(crate) const TAG: usize = 16;
/// Largest plaintext of one record (2^14).
pub(crate) const MAX_PLAIN: usize = 1 << 14;
/// Largest protected payload a peer may send: 2^14 + 256 (RFC 8446 §5.2).
pub(crate) const MAX_CIPHERTEXT: usize = MAX_PLAIN + 256;
/// Keys are rotated (KeyUpdate) after this many records in one direction, well inside the
/// AES-GCM confidentiality limit (2^24 records, what rustls assumes for its suites).
pub(crate) const KEY_UPDATE_AFTER: u64 = 1 << 23;

/// The keys of one direction and its record sequence number.
pub(crate) struct Keys {
    key: LessSafeKey,
    iv: [u8; 12],
    seq: u64,
}

fn err(msg: impl Into<String>) -> Error {
    Error::General(msg.into())
}

impl Keys {
    /// Keys from rustls' traffic secrets, starting at sequence number `seq`.
    pub(crate) fn new(seq: u64, secrets: ConnectionTrafficSecrets) -> Result<Self, Error> {
        let (alg, key, iv) = match &secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (&aead::CHACHA20_POLY1305, key, iv),
            _ => return Err(err("TLS: unsupported cipher suite for the record layer")),
        };
        let iv: [u8; 12] = iv.as_ref().try_into().map_err(|_| err("TLS: bad IV length"))?;
        Self::raw(alg, key.as_ref(), iv, seq)
    }

    fn raw(alg: &'static aead::Algorithm, key: &[u8], iv: [u8; 12], seq: u64) -> Result<Self, Error> {
        let key = UnboundKey::new(alg, key).map_err(|_| err("TLS: bad traffic key length"))?;
        Ok(Self { key: LessSafeKey::new(key), iv, seq })
    }

    /// The sequence number of the next record.
    pub(crate) fn seq(&self) -> u64 {
        self.seq
    }

    /// The nonce of the next record; advances the sequence number (an error instead of
    /// wrapping around, RFC 8446 §5.3).
    fn next_nonce(&mut self) -> Result<Nonce, Error> {
        let seq = self.seq;
        self.seq = seq.checked_add(1).ok_or_else(|| err("TLS: record sequence number exhausted"))?;
        let mut n = self.iv;
        for (b, s) in n[4..].iter_mut().zip(seq.to_be_bytes()) {
            *b ^= s;
        }
        Ok(Nonce::assume_unique_for_key(n))
    }

    /// Seal one record whose plaintext (content type byte included) is already in
    /// `rec[HEADER..HEADER + inner]`; `rec` is `HEADER + inner + TAG` long. Writes the header
    /// and the tag.
    pub(crate) fn seal(&mut self, rec: &mut [u8]) -> Result<(), Error> {
        let len = rec.len() - HEADER;
        let inner = len - TAG;
        debug_assert!(inner >= 1 && inner <= MAX_PLAIN + 1);
        let hdr = [APPLICATION_DATA, 3, 3, (len >> 8) as u8, len as u8];
        rec[..HEADER].copy_from_slice(&hdr);
        let nonce = self.next_nonce()?;
        let (body, tag) = rec[HEADER..].split_at_mut(inner);
        let t = self.key.seal_in_place_separate_tag(nonce, Aad::from(hdr), body).map_err(|_| err("TLS: encryption failed"))?;
        tag.copy_from_slice(t.as_ref());
        Ok(())
    }

    /// Seal one record straight from `plain` (≤ 2^14 bytes, e.g. guest memory) into `rec`,
    /// which is `HEADER + plain.len() + 1 + TAG` long: header, ciphertext, encrypted content
    /// type and tag. `plain` is only read.
    pub(crate) fn seal_from(&mut self, plain: &[u8], typ: u8, rec: &mut [u8]) -> Result<(), Error> {
        let n = plain.len();
        debug_assert!(n <= MAX_PLAIN && rec.len() == HEADER + n + 1 + TAG);
        let len = n + 1 + TAG;
        let hdr = [APPLICATION_DATA, 3, 3, (len >> 8) as u8, len as u8];
        rec[..HEADER].copy_from_slice(&hdr);
        let nonce = self.next_nonce()?;
        let (ct, extra) = rec[HEADER..].split_at_mut(n);
        self.key.seal_out_of_place_scatter(nonce, Aad::from(hdr), plain, ct, &[typ], extra).map_err(|_| err("TLS: encryption failed"))
    }

    /// Authenticate and decrypt one record in place (`rec`: header and protected payload).
    /// Returns the inner content type and the plaintext's length (it starts at
    /// `rec[HEADER]`).
    pub(crate) fn open(&mut self, rec: &mut [u8]) -> Result<(u8, usize), Error> {
        let hdr: [u8; HEADER] = rec[..HEADER].try_into().expect("record header");
        let nonce = self.next_nonce()?;
        let plain = self.key.open_in_place(nonce, Aad::from(hdr), &mut rec[HEADER..]).map_err(|_| Error::DecryptError)?;
        // Strip the zero padding; the last non-zero byte is the content type.
        let Some(at) = plain.iter().rposition(|&b| b != 0) else {
            return Err(err("TLS: record without a content type (all padding)"));
        };
        if at > MAX_PLAIN {
            return Err(err("TLS: record plaintext over 2^14 bytes"));
        }
        Ok((plain[at], at))
    }
}

/// Parse a record header: the protected payload's length, after checking the header is one
/// a TLS 1.3 connection may carry once the handshake is done.
pub(crate) fn check_header(hdr: &[u8]) -> Result<usize, Error> {
    let len = u16::from_be_bytes([hdr[3], hdr[4]]) as usize;
    if hdr[0] != APPLICATION_DATA {
        return Err(err(format!("TLS: unexpected record type {} after the handshake", hdr[0])));
    }
    if hdr[1] != 3 || hdr[2] != 3 {
        return Err(err(format!("TLS: unexpected record version {:02x}{:02x}", hdr[1], hdr[2])));
    }
    if len > MAX_CIPHERTEXT {
        return Err(err(format!("TLS: record of {len} bytes is over the limit")));
    }
    if len < TAG + 1 {
        return Err(err(format!("TLS: record of {len} bytes is too short")));
    }
    Ok(len)
}

/// What an alert record means: Ok(()) for close_notify, else the peer's error.
pub(crate) fn alert(plain: &[u8]) -> Result<(), Error> {
    match plain {
        [_, 0] => Ok(()),
        [_, d] => Err(Error::AlertReceived(AlertDescription::from(*d))),
        _ => Err(err("TLS: malformed alert record")),
    }
}

/// The handshake messages of one record after the handshake: only a single KeyUpdate is
/// accepted (it must end its record: RFC 8446 §5.1). Returns whether the peer asks us to
/// update our keys too.
pub(crate) fn key_update(plain: &[u8]) -> Result<bool, Error> {
    match plain {
        [24, 0, 0, 1, r @ (0 | 1)] => Ok(*r == 1),
        [24, ..] => Err(err("TLS: malformed KeyUpdate")),
        [4, ..] => Err(err("TLS: unexpected NewSessionTicket after the handshake (session tickets are off)")),
        [t, ..] => Err(err(format!("TLS: unexpected post-handshake message type {t}"))),
        [] => Err(err("TLS: empty handshake record")),
    }
}

/// The plaintext of a KeyUpdate(update_not_requested) message.
pub(crate) const KEY_UPDATE: [u8; 4 + 1] = [24, 0, 0, 1, 0];

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(seq: u64) -> Keys {
        Keys::raw(&aead::AES_128_GCM, &[7u8; 16], [9u8; 12], seq).unwrap()
    }

    fn record(k: &mut Keys, inner: &[u8]) -> Vec<u8> {
        let mut r = vec![0u8; HEADER];
        r.extend_from_slice(inner);
        r.resize(r.len() + TAG, 0);
        k.seal(&mut r).unwrap();
        r
    }

    #[test]
    fn seal_then_open_round_trips_and_padding_is_stripped() {
        let (mut tx, mut rx) = (keys(5), keys(5));
        let mut r = record(&mut tx, b"pages\x17");
        assert_eq!(check_header(&r).unwrap(), r.len() - HEADER);
        assert_eq!(rx.open(&mut r).unwrap(), (APPLICATION_DATA, 5));
        assert_eq!(&r[HEADER..HEADER + 5], b"pages");
        assert_eq!((tx.seq(), rx.seq()), (6, 6));
        // Zero padding after the content type is allowed (RFC 8446 §5.4).
        let mut r = record(&mut tx, b"ab\x15\0\0");
        assert_eq!(rx.open(&mut r).unwrap(), (ALERT, 2));
        // All padding: no content type.
        let mut r = record(&mut tx, b"\0\0");
        assert!(rx.open(&mut r).is_err());
    }

    #[test]
    fn sealing_from_the_source_equals_sealing_in_place() {
        let (mut a, mut b) = (keys(3), keys(3));
        let plain = b"guest page bytes";
        let in_place = record(&mut a, b"guest page bytes\x17");
        let mut out = vec![0u8; HEADER + plain.len() + 1 + TAG];
        b.seal_from(plain, APPLICATION_DATA, &mut out).unwrap();
        assert_eq!(in_place, out);
        assert_eq!(keys(3).open(&mut out).unwrap(), (APPLICATION_DATA, plain.len()));
    }

    #[test]
    fn tampered_replayed_or_reordered_records_fail() {
        let mut tx = keys(0);
        let a = record(&mut tx, b"first\x17");
        let b = record(&mut tx, b"second\x17");
        // Out of order: b where a is expected.
        assert!(matches!(keys(0).open(&mut b.clone()), Err(Error::DecryptError)));
        // A flipped bit in the ciphertext, the tag or the header (the header is the AAD).
        for at in [HEADER, a.len() - 1, 4, 0] {
            let mut t = a.clone();
            t[at] ^= 1;
            assert!(matches!(keys(0).open(&mut t), Err(Error::DecryptError)), "bit at {at}");
        }
        let mut rx = keys(0);
        assert!(rx.open(&mut a.clone()).is_ok());
        // Replay of a as the second record.
        assert!(matches!(keys(1).open(&mut a.clone()), Err(Error::DecryptError)));
        assert!(rx.open(&mut b.clone()).is_ok());
        // Other keys.
        let mut other = Keys::raw(&aead::AES_128_GCM, &[8u8; 16], [9u8; 12], 0).unwrap();
        assert!(matches!(other.open(&mut a.clone()), Err(Error::DecryptError)));
    }

    #[test]
    fn sequence_numbers_do_not_wrap() {
        let mut tx = keys(u64::MAX);
        let mut r = vec![0u8; HEADER + 1 + TAG];
        assert!(tx.seal(&mut r).is_err());
        assert!(keys(u64::MAX).open(&mut r).is_err());
    }

    #[test]
    fn headers_other_than_application_data_are_refused() {
        assert!(check_header(&[23, 3, 3, 0, 17]).is_ok());
        assert!(check_header(&[23, 3, 3, 0x41, 0]).is_ok());
        assert!(check_header(&[22, 3, 3, 0, 40]).is_err());
        assert!(check_header(&[20, 3, 3, 0, 1]).is_err());
        assert!(check_header(&[21, 3, 3, 0, 2]).is_err());
        assert!(check_header(&[23, 3, 1, 0, 40]).is_err());
        assert!(check_header(&[23, 3, 3, 0, 16]).is_err());
        assert!(check_header(&[23, 3, 3, 0x41, 1]).is_err());
    }

    #[test]
    fn post_handshake_messages_other_than_key_update_are_refused() {
        assert!(!key_update(&KEY_UPDATE).unwrap());
        assert!(key_update(&[24, 0, 0, 1, 1]).unwrap());
        assert!(key_update(&[24, 0, 0, 1, 2]).is_err());
        assert!(key_update(&[4, 0, 0, 1, 0]).is_err());
        assert!(key_update(&[24, 0, 0, 2, 0, 0]).is_err());
        assert!(key_update(&[24, 0, 0, 1, 0, 24, 0, 0, 1, 0]).is_err());
        assert!(key_update(&[24, 0, 0]).is_err());
        assert!(key_update(&[]).is_err());
        assert!(alert(&[1, 0]).is_ok());
        assert!(matches!(alert(&[2, 20]), Err(Error::AlertReceived(AlertDescription::BadRecordMac))));
        assert!(alert(&[1]).is_err());
    }
}

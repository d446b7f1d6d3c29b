//! Unit tests of the wire format: data packet headers and offsets, control frames.

use super::*;

const NONE: MethodCode = MethodCode(0);
const ZLIB: MethodCode = MethodCode(1);
const ZSTD: MethodCode = MethodCode(2);

fn pages(method: MethodCode, normal: u16, zero: u16, payload_len: u32) -> PacketHeader {
    PacketHeader { kind: PacketKind::Pages, raw: false, method, region: 3, normal, zero, round: 7, packet_num: 0x0102_0304_0506_0708, payload_len }
}

/// Encode, apply `edit` to the bytes, decode; the error's text.
fn decode_err(h: PacketHeader, edit: impl FnOnce(&mut [u8; PACKET_HEADER_LEN])) -> String {
    let mut b = h.encode();
    edit(&mut b);
    match PacketHeader::decode(&b) {
        Ok(h) => panic!("decoded {h:?}, expected an error"),
        Err(e) => e.to_string(),
    }
}

fn assert_malformed(h: PacketHeader, needle: &str) {
    let e = decode_err(h, |_| {});
    assert!(e.contains(needle), "error '{e}' does not mention '{needle}'");
}

#[test]
fn header_round_trips() {
    for method in [0u8, 1, 2, 3, 200].map(MethodCode) {
        for h in [
            pages(method, 5, 2, 1234),
            pages(method, 128, 128, MAX_BATCH_BYTES as u32),
            pages(method, 0, 1, 0),
            PacketHeader { raw: true, ..pages(method, 3, 0, 3 * PAGE_SIZE as u32) },
            PacketHeader { region: u16::MAX, round: u32::MAX, packet_num: u64::MAX, ..pages(method, 1, 0, 1) },
            PacketHeader::sync(method, 42, 99),
        ] {
            let b = h.encode();
            assert_eq!(u32::from_le_bytes(b[0..4].try_into().unwrap()), PACKET_MAGIC);
            assert_eq!(PacketHeader::decode(&b).unwrap(), h);
        }
    }
}

#[test]
fn header_layout_is_little_endian_at_documented_offsets() {
    let h = PacketHeader { raw: true, ..pages(ZSTD, 2, 1, 2 * PAGE_SIZE as u32) };
    let b = h.encode();
    assert_eq!(&b[0..4], b"PFDP");
    assert_eq!(b[4], 0);
    assert_eq!(b[5], 1);
    assert_eq!(b[6], 2);
    assert_eq!(b[7], 0);
    assert_eq!(&b[8..10], &3u16.to_le_bytes());
    assert_eq!(&b[10..12], &2u16.to_le_bytes());
    assert_eq!(&b[12..14], &1u16.to_le_bytes());
    assert_eq!(&b[14..16], &[0, 0]);
    assert_eq!(&b[16..20], &7u32.to_le_bytes());
    assert_eq!(&b[20..28], &0x0102_0304_0506_0708u64.to_le_bytes());
    assert_eq!(&b[28..32], &(2 * PAGE_SIZE as u32).to_le_bytes());
    assert_eq!(h.offsets_len(), 12);
    assert_eq!(h.wire_len(), PACKET_HEADER_LEN + 12 + 2 * PAGE_SIZE + 4);
}

#[test]
fn decode_rejects_bad_magic() {
    let e = PacketHeader::decode(&{
        let mut b = pages(NONE, 1, 0, 1).encode();
        b[0..4].copy_from_slice(b"PFCT");
        b
    })
    .unwrap_err();
    assert!(matches!(e, WireError::BadMagic { found } if found == u32::from_le_bytes(*b"PFCT")), "{e}");
    assert!(e.to_string().contains("bad magic"));
}

#[test]
fn decode_rejects_unknown_kind() {
    for k in [2u8, 7, 255] {
        let e = decode_err(pages(NONE, 1, 0, 1), |b| b[4] = k);
        assert!(e.contains(&format!("unknown kind {k}")), "{e}");
    }
}

#[test]
fn decode_rejects_reserved_bits() {
    let h = pages(ZLIB, 1, 0, 100);
    for (byte, value) in [(5usize, 0x02u8), (5, 0x80), (7, 1), (14, 1), (15, 0x80)] {
        let e = decode_err(h, |b| b[byte] |= value);
        assert!(e.contains("reserved bits"), "byte {byte}: {e}");
    }
}

#[test]
fn decode_leaves_the_method_code_to_the_receiver() {
    // The wire knows no method list: any code decodes, and the destination refuses a code
    // other than its session's (engine::tests_hostile::wrong_or_unknown_method_in_a_packet_is_rejected).
    for code in [4u8, 9, 255] {
        let mut b = pages(ZLIB, 1, 0, 100).encode();
        b[6] = code;
        assert_eq!(PacketHeader::decode(&b).unwrap().method, MethodCode(code));
    }
}

#[test]
fn decode_rejects_packet_without_pages() {
    assert_malformed(pages(NONE, 0, 0, 0), "no pages");
}

#[test]
fn decode_rejects_more_pages_than_a_batch() {
    let over = MAX_BATCH_PAGES as u16 + 1;
    assert_malformed(pages(ZSTD, over, 0, 100), "batch limit");
    assert_malformed(pages(ZSTD, 1, over, 100), "batch limit");
    assert_malformed(pages(ZSTD, u16::MAX, 0, 100), "batch limit");
    assert_malformed(pages(ZSTD, 0, u16::MAX, 0), "batch limit");
    // The limit itself is fine.
    PacketHeader::decode(&pages(ZSTD, MAX_BATCH_PAGES as u16, MAX_BATCH_PAGES as u16, 100).encode()).unwrap();
}

#[test]
fn decode_rejects_payload_longer_than_its_pages() {
    // One byte more than the normal pages it carries: no payload may ever inflate a batch.
    assert_malformed(pages(ZSTD, 1, 0, PAGE_SIZE as u32 + 1), "payload of");
    assert_malformed(pages(ZSTD, 3, 5, 3 * PAGE_SIZE as u32 + 1), "payload of");
    // Over the 512 KiB receive buffer, with the largest batch.
    assert_malformed(pages(ZSTD, MAX_BATCH_PAGES as u16, 0, MAX_BATCH_BYTES as u32 + 1), "payload of");
    assert_malformed(pages(ZSTD, MAX_BATCH_PAGES as u16, 0, u32::MAX), "payload of");
    // Exactly the pages' size is allowed (a compressor that did not gain anything).
    PacketHeader::decode(&pages(ZSTD, 2, 0, 2 * PAGE_SIZE as u32).encode()).unwrap();
}

#[test]
fn decode_rejects_raw_payload_of_the_wrong_length() {
    for len in [1u32, 2 * PAGE_SIZE as u32 - 1] {
        let h = PacketHeader { raw: true, ..pages(NONE, 2, 0, len) };
        assert_malformed(h, "raw payload");
    }
}

#[test]
fn decode_rejects_payload_and_page_count_disagreeing() {
    // (Caught by the payload bound: 10 bytes for 0 normal pages.)
    assert_malformed(pages(ZSTD, 0, 3, 10), "payload of 10 bytes for 0 pages");
    assert_malformed(pages(ZSTD, 2, 0, 0), "normal pages without payload");
}

#[test]
fn decode_rejects_sync_with_pages_or_payload() {
    let s = PacketHeader::sync(ZSTD, 1, 2);
    for h in [
        PacketHeader { normal: 1, ..s },
        PacketHeader { zero: 1, ..s },
        PacketHeader { payload_len: 1, ..s },
        PacketHeader { raw: true, ..s },
        PacketHeader { region: 1, ..s },
    ] {
        assert_malformed(h, "sync packet");
    }
}

fn offsets(list: &[u32]) -> Vec<u8> {
    list.iter().flat_map(|p| p.to_le_bytes()).collect()
}

fn decode_offsets_of(normal: &[u32], zero: &[u32], region_pages: u64) -> Result<(Vec<u32>, Vec<u32>), WireError> {
    let h = pages(NONE, normal.len() as u16, zero.len() as u16, normal.len() as u32 * PAGE_SIZE as u32);
    let bytes = offsets(&[normal, zero].concat());
    let (mut n, mut z) = (vec![99], vec![99]);
    decode_offsets(&h, &bytes, region_pages, &mut n, &mut z)?;
    Ok((n, z))
}

#[test]
fn offsets_decode_into_normal_and_zero_lists() {
    let (n, z) = decode_offsets_of(&[0, 1, 5, 99], &[2, 3, 98], 100).unwrap();
    assert_eq!(n, [0, 1, 5, 99]);
    assert_eq!(z, [2, 3, 98]);
    let (n, z) = decode_offsets_of(&[], &[7], 8).unwrap();
    assert!(n.is_empty());
    assert_eq!(z, [7]);
}

#[test]
fn offsets_outside_the_region_are_rejected() {
    for (normal, zero) in [(&[100u32][..], &[][..]), (&[1, 2], &[100]), (&[0], &[u32::MAX])] {
        let e = decode_offsets_of(normal, zero, 100).unwrap_err().to_string();
        assert!(e.contains("outside region 3 of 100 pages"), "{e}");
    }
}

#[test]
fn offsets_must_strictly_increase() {
    for (normal, zero) in [(&[1u32, 1][..], &[][..]), (&[2, 1], &[]), (&[], &[5, 4]), (&[0, 3], &[7, 7])] {
        let e = decode_offsets_of(normal, zero, 100).unwrap_err().to_string();
        assert!(e.contains("not strictly increasing"), "{normal:?} {zero:?}: {e}");
    }
}

#[test]
fn a_page_cannot_be_both_normal_and_zero() {
    for (normal, zero) in [(&[3u32][..], &[3u32][..]), (&[1, 4, 9], &[2, 9]), (&[0, 50], &[0])] {
        let e = decode_offsets_of(normal, zero, 100).unwrap_err().to_string();
        assert!(e.contains("both normal and zero"), "{normal:?} {zero:?}: {e}");
    }
}

#[test]
fn packet_crc_is_one_stream_of_offsets_payload_header() {
    let (h, o, p) = ([1u8; 32], [2u8; 8], [3u8; 100]);
    let whole = [&o[..], &p[..], &h[..]].concat();
    assert_eq!(packet_crc(&h, &o, &p), crc32c::crc32c(&whole));
    let mut flipped = p;
    flipped[50] ^= 0x10;
    assert_ne!(packet_crc(&h, &o, &p), packet_crc(&h, &o, &flipped));
}

// ---- control frames ----

fn hello() -> Control {
    Control::Hello(Hello {
        versions: VersionRange { min: 2, max: 3 },
        session: SessionId(0x0123_4567_89ab_cdef_0011_2233_4455_6677),
        role: Role::Data,
        channel: 3,
        channels: 4,
        method: ZSTD,
        level: 3,
        regions: vec![("ram0".into(), 1 << 30), ("ram1".into(), 4096)],
        wants: Features { tls: true, postcopy: false, auto: true, ..Features::default() },
        verify: false,
    })
}

fn capabilities() -> Capabilities {
    Capabilities {
        methods: vec![
            MethodCaps { code: ZSTD, name: "zstd".into(), min_level: 1, max_level: 19 },
            MethodCaps { code: NONE, name: "none".into(), min_level: 0, max_level: 0 },
        ],
        features: Features { tls: false, postcopy: true, auto: false, ..Features::default() },
    }
}

fn report() -> DestinationReport {
    DestinationReport {
        cpu_s: 1.5,
        wall_s: 2.25,
        pages: 5,
        zero_pages: 2,
        wire_bytes: 1 << 33,
        verify_ms: 0.5,
        verified: true,
        rounds: 3,
        provider: "x".into(),
        peak_rss_anon_bytes: 4096,
        postcopy: None,
        done_not_delivered: true,
    }
}

fn frame(msg: &Control, blob: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    write_frame(&mut v, PROTOCOL_VERSION, msg, blob).unwrap();
    v
}

#[test]
fn control_frames_round_trip() {
    let msgs = [
        (hello(), vec![]),
        (Control::Welcome { version: 2, fresh_destination: true, capabilities: capabilities() }, vec![]),
        (Control::Refuse { reason: "compression method mismatch: ü".into() }, vec![]),
        (Control::RoundDone { round: 3, pages: 1 << 40 }, vec![]),
        (Control::Finish { round: 9, digest: Some(format!("{:032x}", u128::MAX)) }, (0..=255u8).cycle().take(100_000).collect()),
        (Control::Finish { round: 0, digest: None }, vec![0u8]),
        (Control::Done { report: report() }, vec![]),
        (Control::Abort { reason: "because".into() }, vec![]),
        (Control::Postcopy { round: 9, discard: vec![(0, 5, 3), (1, 0, 1)] }, b"device state".to_vec()),
        (Control::PostcopyRunning, vec![]),
        (Control::PageRequest { region: 1, pages: vec![7, 3, 99] }, vec![]),
        (Control::Done { report: DestinationReport { postcopy: Some(crate::wire::PostcopyStats { faults: 3, fault_latency_p99_us: 250.5, ..Default::default() }), ..report() } }, vec![]),
        (Control::Cancel { by: "destination".into() }, vec![]),
        (Control::Keepalive, vec![]),
    ];
    // Several frames back to back on one stream.
    let mut stream = Vec::new();
    for (m, blob) in &msgs {
        stream.extend_from_slice(&frame(m, blob));
    }
    let mut r = &stream[..];
    for (m, blob) in &msgs {
        let got = read_frame(&mut r).unwrap();
        assert_eq!(&got.msg, m);
        assert_eq!(&got.blob, blob);
        assert_eq!(got.version, PROTOCOL_VERSION);
    }
    assert!(r.is_empty());
    assert!(matches!(read_frame(&mut r), Err(WireError::Closed(_))), "clean end of stream reads as Closed");
}

#[test]
fn session_id_is_32_hex_digits_on_the_wire() {
    let f = frame(&hello(), &[]);
    let body = String::from_utf8_lossy(&f[14..f.len() - 4]).to_string();
    assert!(body.contains("\"0123456789abcdef0011223344556677\""), "{body}");
    let short = body.replace("0123456789abcdef0011223344556677", "0123");
    let e = serde_json::from_str::<Control>(&short).unwrap_err().to_string();
    assert!(e.contains("32 hex digits"), "{e}");
}

#[test]
fn flipped_byte_anywhere_in_a_frame_is_detected() {
    let good = frame(&Control::Finish { round: 1, digest: Some("ab".into()) }, b"device state");
    // Every byte after the magic: version and lengths, body, blob, CRC. A flip in a length
    // field may instead read as a truncated or oversized frame; it must never be accepted.
    for i in 4..good.len() {
        let mut bad = good.clone();
        bad[i] ^= 0x04;
        let r = read_frame(&mut &bad[..]);
        assert!(r.is_err(), "flip at byte {i} accepted: {r:?}");
        if (14..good.len()).contains(&i) {
            assert!(matches!(r, Err(WireError::Crc { .. })), "flip at byte {i}: {r:?}");
        }
    }
    let e = read_frame(&mut &{
        let mut b = good.clone();
        b[20] ^= 1;
        b
    }[..])
    .unwrap_err();
    assert!(e.to_string().contains("CRC32C mismatch"), "{e}");
}

#[test]
fn truncated_frame_is_closed() {
    let good = frame(&Control::RoundDone { round: 1, pages: 2 }, b"xyz");
    for cut in [1, 13, 14, 20, good.len() - 1] {
        let e = read_frame(&mut &good[..cut]).unwrap_err();
        assert!(matches!(e, WireError::Closed(_)), "cut at {cut}: {e}");
        assert!(e.to_string().contains("closed"), "{e}");
    }
}

#[test]
fn oversized_declared_body_is_malformed_before_allocating() {
    for (body, blob) in [(MAX_FRAME_BODY as u32 + 1, 0u32), (10, MAX_FRAME_BODY as u32 + 1), (u32::MAX, u32::MAX)] {
        let mut f = frame(&Control::Abort { reason: "x".into() }, &[]);
        f[6..10].copy_from_slice(&body.to_le_bytes());
        f[10..14].copy_from_slice(&blob.to_le_bytes());
        let e = read_frame(&mut &f[..]).unwrap_err();
        assert!(matches!(e, WireError::Malformed { what: "control frame", .. }), "{e}");
        assert!(e.to_string().contains("exceeds"), "{e}");
    }
}

#[test]
fn garbage_magic_is_bad_magic() {
    let junk = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    let e = read_frame(&mut &junk[..]).unwrap_err();
    assert!(matches!(e, WireError::BadMagic { found } if found == u32::from_le_bytes(*b"GET ")), "{e}");
    // A data packet on the control channel is not a frame either.
    let pkt = PacketHeader::sync(NONE, 0, 0).encode();
    let mut stream = pkt.to_vec();
    stream.extend_from_slice(&[0u8; 16]);
    assert!(matches!(read_frame(&mut &stream[..]), Err(WireError::BadMagic { .. })));
}

#[test]
fn valid_crc_over_a_bad_body_is_malformed() {
    // Well framed, checksummed, but not a control message.
    let body = br#"{"type":"launch_missiles"}"#;
    let mut hdr = [0u8; 14];
    hdr[0..4].copy_from_slice(b"PFCT");
    hdr[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    hdr[6..10].copy_from_slice(&(body.len() as u32).to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&hdr), body);
    let f = [&hdr[..], &body[..], &crc.to_le_bytes()].concat();
    let e = read_frame(&mut &f[..]).unwrap_err();
    assert!(matches!(e, WireError::Malformed { what: "control message", .. }), "{e}");
}

// ---- versions and capabilities ----

#[test]
fn a_build_speaks_n_and_n_minus_1_and_agrees_on_the_highest_common() {
    let v = |min, max| VersionRange { min, max };
    // A build of version 3 (N) speaks 2..=3.
    let n3 = VersionRange::policy(3);
    assert_eq!(n3, v(2, 3));
    assert_eq!(n3.negotiate(v(2, 2)), Some(2), "an N-1 peer is accepted");
    assert_eq!(n3.negotiate(VersionRange::policy(2)), Some(2));
    assert_eq!(n3.negotiate(v(3, 4)), Some(3), "a newer peer: the highest both speak");
    assert_eq!(n3.negotiate(VersionRange::policy(4)), Some(3));
    assert_eq!(n3.negotiate(v(1, 1)), None, "an N-2 peer is refused");
    assert_eq!(n3.negotiate(v(5, 6)), None);
    assert_eq!(n3.negotiate(v(3, 2)), None, "an empty range agrees on nothing");
    // Version 1 predates negotiation: no build's range reaches below 2.
    assert_eq!(VersionRange::policy(2), v(2, 2));
    assert_eq!(VersionRange::SUPPORTED, VersionRange::policy(PROTOCOL_VERSION));
    // The refusal names both sides.
    let e = WireError::Version { peer: v(1, 1), ours: n3 }.to_string();
    assert_eq!(e, "protocol version mismatch: peer speaks version 1, we speak versions 2..=3");
}

#[test]
fn a_frame_older_than_negotiation_is_a_version_error_before_its_body_is_parsed() {
    let mut f = frame(&Control::Abort { reason: "x".into() }, &[]);
    // Rewrite the version to 1 (with a valid CRC): not parsed, whatever its body.
    f[4..6].copy_from_slice(&1u16.to_le_bytes());
    let n = f.len();
    let crc = crc32c::crc32c(&f[..n - 4]);
    f[n - 4..].copy_from_slice(&crc.to_le_bytes());
    let e = read_frame(&mut &f[..]).unwrap_err();
    assert!(matches!(e, WireError::Version { peer: VersionRange { min: 1, max: 1 }, .. }), "{e}");
    assert!(e.to_string().contains("peer speaks version 1, we speak version 2"), "{e}");
}

#[test]
fn a_session_reads_only_frames_of_its_version() {
    let f = encode_frame(3, &Control::RoundDone { round: 1, pages: 2 }, &[]);
    assert_eq!(read_frame(&mut &f[..]).unwrap().version, 3);
    let e = read_frame_at(&mut &f[..], 2).unwrap_err().to_string();
    assert!(e.contains("of protocol version 3 in a version 2 session"), "{e}");
    let (m, _) = read_frame_at(&mut &f[..], 3).unwrap();
    assert_eq!(m, Control::RoundDone { round: 1, pages: 2 });
}

#[test]
fn capabilities_name_what_is_missing() {
    let caps = capabilities();
    let none = Features::default();
    caps.check(ZSTD, "zstd", 19, &none).unwrap();
    caps.check(NONE, "none", 0, &none).unwrap();
    let e = caps.check(ZLIB, "zlib", 1, &none).unwrap_err();
    assert_eq!(e, "the destination does not decode zlib (it decodes: zstd 1..=19, none 0..=0)");
    let e = caps.check(ZSTD, "zstd", 20, &none).unwrap_err();
    assert!(e.contains("does not accept zstd level 20"), "{e}");
    caps.check(ZSTD, "zstd", 1, &Features { postcopy: true, ..none }).unwrap();
    let e = caps.check(ZSTD, "zstd", 1, &Features { tls: true, postcopy: true, auto: true, ..Features::default() }).unwrap_err();
    assert_eq!(e, "the destination does not support tls, auto");
}

#[test]
fn page_runs_split_at_gaps() {
    let runs = |p: &[u32]| page_runs(p).collect::<Vec<_>>();
    assert_eq!(runs(&[]), []);
    assert_eq!(runs(&[5]), [(5, 1)]);
    assert_eq!(runs(&[0, 1, 2, 7, 8, 10]), [(0, 3), (7, 2), (10, 1)]);
    assert_eq!(runs(&[u32::MAX - 1, u32::MAX]), [(u32::MAX - 1, 2)]);
    let mut b = Vec::new();
    encode_offsets(&runs(&[3, 4, 9]), &[5], &mut b);
    assert_eq!(b, offsets(&[3, 4, 9, 5]));
}

#[test]
fn packet_crc_can_be_carried_from_body_to_header() {
    let h = pages(ZSTD, 2, 0, 10).encode();
    let (o, p) = ([1u8; 8], [9u8; 10]);
    let body = PacketCrc::new().body(&o).body(&p[..4]).body(&p[4..]).value();
    assert_eq!(PacketCrc::resume(body).finish(&h), packet_crc(&h, &o, &p));
    PacketCrc::resume(body).check(&h, packet_crc(&h, &o, &p).to_le_bytes()).unwrap();
    assert!(matches!(PacketCrc::resume(body).check(&h, [0; 4]), Err(WireError::Crc { .. })));
}

#[test]
fn hello_without_verify_field_means_verify() {
    // A Hello written before the field existed reads as verify: true.
    let Control::Hello(h) = hello() else { unreachable!() };
    let mut v = serde_json::to_value(Control::Hello(h)).unwrap();
    v.as_object_mut().unwrap().remove("verify");
    let back: Control = serde_json::from_value(v).unwrap();
    assert!(matches!(back, Control::Hello(Hello { verify: true, .. })));
}

#[test]
fn handshake_limit_refuses_big_frames_before_reading_them() {
    let big = frame(&Control::Refuse { reason: "x".repeat(MAX_HANDSHAKE_BODY + 1) }, &[]);
    let e = read_frame_limited(&mut &big[..], MAX_HANDSHAKE_BODY).unwrap_err();
    assert!(matches!(e, WireError::Malformed { .. }) && e.to_string().contains("exceeds"), "{e}");
    // Only the header was consumed.
    let mut r = &big[..];
    let _ = read_frame_limited(&mut r, MAX_HANDSHAKE_BODY);
    assert_eq!(r.len(), big.len() - 14);
    assert!(read_frame(&mut &big[..]).is_ok());
}

#[test]
fn capabilities_for_an_unsigned_peer_raise_negative_bounds() {
    let caps = Capabilities {
        methods: vec![
            MethodCaps {
                code: ZSTD,
                name: "zstd".into(),
                min_level: -20,
                max_level: 19,
            },
            MethodCaps {
                code: NONE,
                name: "none".into(),
                min_level: 0,
                max_level: 0,
            },
        ],
        features: Features {
            auto: true,
            signed_levels: true,
            ..Features::default()
        },
    };
    caps.check(ZSTD, "zstd", -20, &Features::default()).unwrap();
    let e = caps
        .check(ZSTD, "zstd", -21, &Features::default())
        .unwrap_err();
    assert!(
        e.contains("does not accept zstd level -21") && e.contains("zstd -20..=19"),
        "{e}"
    );
    let old = caps.clone().for_unsigned_peer();
    assert_eq!(
        (old.methods[0].min_level, old.methods[0].max_level),
        (0, 19)
    );
    assert_eq!(old.methods[1], caps.methods[1]);
    assert!(!old.features.signed_levels && old.features.auto);
    // signed_levels is announced, never required.
    assert!(old
        .features
        .missing(&Features {
            signed_levels: true,
            ..Features::default()
        })
        .is_empty());
    // What an unsigned parser reads: no negative number anywhere in the JSON.
    let json = serde_json::to_string(&old).unwrap();
    assert!(
        !json.contains('-') && !json.contains("signed_levels"),
        "{json}"
    );
}

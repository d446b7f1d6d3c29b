//! Golden bytes: every control message and every packet kind encoded to literal bytes checked
//! in here, and the same bytes decoded back. A change to the format fails these tests; if it
//! is intended, it needs a new protocol version (see "Versions" in the module doc).

use super::*;

fn unhex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A control frame's expected bytes: header (hex), JSON body (text), blob (hex), CRC (hex).
fn golden_frame(header: &str, body: &str, blob: &str, crc: &str) -> Vec<u8> {
    [unhex(header), body.as_bytes().to_vec(), unhex(blob), unhex(crc)].concat()
}

fn check_frame(msg: Control, blob: &[u8], expected: Vec<u8>) {
    let got = encode_frame(2, &msg, blob);
    assert_eq!(hex(&got), hex(&expected), "encoding of {msg:?}\nbody: {}", String::from_utf8_lossy(&got[14..]));
    let back = read_frame(&mut &expected[..]).unwrap();
    assert_eq!(back, Frame { version: 2, msg, blob: blob.to_vec() });
}

const SESSION: SessionId = SessionId(0x0123_4567_89ab_cdef_0011_2233_4455_6677);

#[test]
fn golden_hello() {
    let hello = Hello {
        versions: VersionRange { min: 2, max: 2 },
        session: SESSION,
        role: Role::Data,
        channel: 1,
        channels: 2,
        method: MethodCode(2),
        level: 3,
        regions: vec![("ram0".into(), 8192)],
        wants: Features::default(),
        verify: true,
    };
    check_frame(
        Control::Hello(hello),
        &[],
        golden_frame(
            "50464354 0200 f2000000 00000000",
            r#"{"type":"hello","versions":{"min":2,"max":2},"session":"0123456789abcdef0011223344556677","role":"data","channel":1,"channels":2,"method":2,"level":3,"regions":[["ram0",8192]],"wants":{"tls":false,"postcopy":false,"auto":false},"verify":true}"#,
            "",
            "5ba2afe4",
        ),
    );
}

/// Signed levels: a Hello at zstd's fast level -5 from a source that reads negative levels,
/// and the Welcome announcing zstd's -20..=19 to it. (Without `signed_levels` the frames are
/// those above, byte for byte: builds from before signed levels read them.)
#[test]
fn golden_hello_and_welcome_with_signed_levels() {
    let hello = Hello {
        versions: VersionRange { min: 2, max: 2 },
        session: SESSION,
        role: Role::Control,
        channel: 0,
        channels: 2,
        method: MethodCode(2),
        level: -5,
        regions: vec![("ram0".into(), 8192)],
        wants: Features {
            signed_levels: true,
            ..Features::default()
        },
        verify: true,
    };
    check_frame(
        Control::Hello(hello),
        &[],
        golden_frame(
            "50464354 0200 0b010000 00000000",
            r#"{"type":"hello","versions":{"min":2,"max":2},"session":"0123456789abcdef0011223344556677","role":"control","channel":0,"channels":2,"method":2,"level":-5,"regions":[["ram0",8192]],"wants":{"tls":false,"postcopy":false,"auto":false,"signed_levels":true},"verify":true}"#,
            "",
            "a3b203b7",
        ),
    );
    let capabilities = Capabilities {
        methods: vec![MethodCaps {
            code: MethodCode(2),
            name: "zstd".into(),
            min_level: -20,
            max_level: 19,
        }],
        features: Features {
            tls: false,
            postcopy: true,
            auto: true,
            signed_levels: true,
        },
    };
    check_frame(
        Control::Welcome {
            version: 2,
            fresh_destination: false,
            capabilities,
        },
        &[],
        golden_frame(
            "50464354 0200 d7000000 00000000",
            r#"{"type":"welcome","version":2,"fresh_destination":false,"capabilities":{"methods":[{"code":2,"name":"zstd","min_level":-20,"max_level":19}],"features":{"tls":false,"postcopy":true,"auto":true,"signed_levels":true}}}"#,
            "",
            "29df1070",
        ),
    );
}

#[test]
fn golden_welcome() {
    let capabilities = Capabilities {
        methods: vec![MethodCaps { code: MethodCode(1), name: "zlib".into(), min_level: 1, max_level: 9 }],
        features: Features { tls: false, postcopy: false, auto: false, signed_levels: false },
    };
    check_frame(
        Control::Welcome { version: 2, fresh_destination: true, capabilities },
        &[],
        golden_frame(
            "50464354 0200 c0000000 00000000",
            r#"{"type":"welcome","version":2,"fresh_destination":true,"capabilities":{"methods":[{"code":1,"name":"zlib","min_level":1,"max_level":9}],"features":{"tls":false,"postcopy":false,"auto":false}}}"#,
            "",
            "892197f7",
        ),
    );
}

#[test]
fn golden_refuse_round_done_abort() {
    check_frame(
        Control::Refuse { reason: "no".into() },
        &[],
        golden_frame("50464354 0200 1f000000 00000000", r#"{"type":"refuse","reason":"no"}"#, "", "2e620cfe"),
    );
    check_frame(
        Control::RoundDone { round: 4, pages: 300 },
        &[],
        golden_frame("50464354 0200 2b000000 00000000", r#"{"type":"round_done","round":4,"pages":300}"#, "", "f36c5e42"),
    );
    check_frame(
        Control::Abort { reason: "stop".into() },
        &[],
        golden_frame("50464354 0200 20000000 00000000", r#"{"type":"abort","reason":"stop"}"#, "", "8d0c0c89"),
    );
}

#[test]
fn golden_finish_with_blob() {
    check_frame(
        Control::Finish { round: 5, digest: Some("000102030405060708090a0b0c0d0e0f".into()) },
        &[0xde, 0xad],
        golden_frame(
            "50464354 0200 47000000 02000000",
            r#"{"type":"finish","round":5,"digest":"000102030405060708090a0b0c0d0e0f"}"#,
            "dead",
            "58f3d76a",
        ),
    );
}

#[test]
fn golden_done() {
    let report = DestinationReport {
        cpu_s: 1.5,
        wall_s: 2.0,
        pages: 10,
        zero_pages: 3,
        wire_bytes: 20000,
        verify_ms: 0.25,
        verified: true,
        rounds: 2,
        provider: "libzstd".into(),
        peak_rss_anon_bytes: 4096,
        postcopy: None,
        done_not_delivered: false,
    };
    check_frame(
        Control::Done { report },
        &[],
        golden_frame(
            "50464354 0200 bc000000 00000000",
            r#"{"type":"done","report":{"cpu_s":1.5,"wall_s":2.0,"pages":10,"zero_pages":3,"wire_bytes":20000,"verify_ms":0.25,"verified":true,"rounds":2,"provider":"libzstd","peak_rss_anon_bytes":4096}}"#,
            "",
            "8325e61b",
        ),
    );
}

#[test]
fn golden_postcopy_messages() {
    check_frame(
        Control::Postcopy { round: 3, discard: vec![(0, 5, 2), (1, 0, 1)] },
        b"st",
        golden_frame("50464354 0200 39000000 02000000", r#"{"type":"postcopy","round":3,"discard":[[0,5,2],[1,0,1]]}"#, "7374", "e710b354"),
    );
    check_frame(Control::PostcopyRunning, &[], golden_frame("50464354 0200 1b000000 00000000", r#"{"type":"postcopy_running"}"#, "", "3df648c6"));
    check_frame(
        Control::PageRequest { region: 1, pages: vec![7, 9] },
        &[],
        golden_frame("50464354 0200 30000000 00000000", r#"{"type":"page_request","region":1,"pages":[7,9]}"#, "", "13a87c02"),
    );
}

fn check_packet(h: PacketHeader, normal: &[u32], zero: &[u32], payload: &[u8], expected: Vec<u8>) {
    let runs: Vec<(u32, u32)> = page_runs(normal).collect();
    let mut offsets = Vec::new();
    encode_offsets(&runs, zero, &mut offsets);
    let got = encode_packet(&h, &offsets, payload);
    assert_eq!(hex(&got), hex(&expected), "encoding of {h:?}");
    let back = decode_packet(&expected, 128).unwrap();
    assert_eq!(back, DecodedPacket { header: h, normal: normal.to_vec(), zero: zero.to_vec(), payload: payload.to_vec() });
}

const PAGES: PacketHeader =
    PacketHeader { kind: PacketKind::Pages, raw: false, method: MethodCode(2), region: 1, normal: 2, zero: 1, round: 3, packet_num: 4, payload_len: 5 };

#[test]
fn golden_compressed_pages_packet() {
    check_packet(
        PAGES,
        &[6, 7],
        &[9],
        b"zzzzz",
        unhex(
            "50464450 00 00 02 00 0100 0200 0100 0000 03000000 0400000000000000 05000000
             06000000 07000000 09000000
             7a7a7a7a7a
             be797541",
        ),
    );
}

#[test]
fn golden_raw_pages_packet() {
    let payload = [0xabu8; 4096];
    let h = PacketHeader { raw: true, normal: 1, zero: 0, payload_len: 4096, ..PAGES };
    let expected = [
        unhex("50464450 00 01 02 00 0100 0100 0000 0000 03000000 0400000000000000 00100000 07000000"),
        payload.to_vec(),
        unhex("9938884c"),
    ]
    .concat();
    check_packet(h, &[7], &[], &payload, expected);
}

#[test]
fn golden_zero_pages_packet() {
    let h = PacketHeader { normal: 0, zero: 2, payload_len: 0, ..PAGES };
    check_packet(
        h,
        &[],
        &[0, 127],
        &[],
        unhex("50464450 00 00 02 00 0100 0000 0200 0000 03000000 0400000000000000 00000000 00000000 7f000000 96af780c"),
    );
}

#[test]
fn golden_sync_packet() {
    check_packet(
        PacketHeader::sync(MethodCode(2), 3, 5),
        &[],
        &[],
        &[],
        unhex("50464450 01 00 02 00 0000 0000 0000 0000 03000000 0500000000000000 00000000 0d370904"),
    );
}

/// Every code that crosses the wire, as literal numbers and strings.
#[test]
fn wire_codes_are_pinned() {
    assert_eq!(PacketKind::Pages.code(), 0);
    assert_eq!(PacketKind::Sync.code(), 1);
    assert_eq!(PacketKind::from_code(2), None);
    assert_eq!(FLAG_RAW, 0x01);
    assert_eq!(PACKET_MAGIC.to_le_bytes(), *b"PFDP");
    assert_eq!(FRAME_MAGIC.to_le_bytes(), *b"PFCT");
    assert_eq!((PACKET_HEADER_LEN, FRAME_HEADER_LEN), (32, 14));
    assert_eq!(PROTOCOL_VERSION, 2);
    assert_eq!(VersionRange::SUPPORTED, VersionRange { min: 2, max: 2 });
    assert_eq!(serde_json::to_string(&Role::Control).unwrap(), r#""control""#);
    assert_eq!(serde_json::to_string(&Role::Data).unwrap(), r#""data""#);
    assert_eq!(serde_json::to_string(&Role::Urgent).unwrap(), r#""urgent""#);
    assert_eq!(serde_json::to_string(&MethodCode(3)).unwrap(), "3");
    let tag = |m: &Control| serde_json::to_value(m).unwrap()["type"].as_str().unwrap().to_string();
    let tags: Vec<String> = [
        Control::Hello(Hello {
            versions: VersionRange::SUPPORTED,
            session: SESSION,
            role: Role::Control,
            channel: 0,
            channels: 1,
            method: MethodCode(0),
            level: 0,
            regions: vec![],
            wants: Features::default(),
            verify: true,
        }),
        Control::Welcome { version: 2, fresh_destination: false, capabilities: Capabilities::default() },
        Control::Refuse { reason: String::new() },
        Control::RoundDone { round: 0, pages: 0 },
        Control::Finish { round: 0, digest: None },
        Control::Postcopy { round: 0, discard: vec![] },
        Control::PostcopyRunning,
        Control::PageRequest { region: 0, pages: vec![] },
        Control::Done { report: DestinationReport::default() },
        Control::Abort { reason: String::new() },
        Control::Cancel { by: "source".into() },
        Control::Keepalive,
    ]
    .iter()
    .map(tag)
    .collect();
    assert_eq!(tags, ["hello", "welcome", "refuse", "round_done", "finish", "postcopy", "postcopy_running", "page_request", "done", "abort", "cancel", "keepalive"]);
}


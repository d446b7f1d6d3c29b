use super::*;

fn method(name: &str) -> Method {
    name.parse().unwrap()
}

#[test]
fn none_conformance() {
    conformance::run_suite(&|| open(&CodecSpec::new(method("none"))).unwrap());
}

#[test]
fn zstd_conformance() {
    for level in [1, 3, 19] {
        conformance::run_suite(&|| open(&CodecSpec::with_level(method("zstd"), level).unwrap()).unwrap());
    }
}

#[test]
fn zlib_conformance() {
    for level in [1, 6, 9] {
        conformance::run_suite(&|| open(&CodecSpec::with_level(method("zlib"), level).unwrap()).unwrap());
    }
}

#[test]
fn zlib_payload_is_standard_zlib() {
    let data = conformance::sample_text(64 * 4096, 1);
    let mut c = open(&CodecSpec::new(method("zlib"))).unwrap();
    let mut out = vec![0u8; c.max_compressed_len(data.len())];
    let n = c.compress(&data, &mut out).unwrap().unwrap();
    // Any zlib decoder reads it: check with libdeflate's own zlib decoder and the header bits.
    assert_eq!(out[0] & 0x0F, 8, "CM = deflate");
    assert_eq!(((out[0] as u16) << 8 | out[1] as u16) % 31, 0, "zlib header check bits");
    let mut back = vec![0u8; data.len()];
    assert_eq!(libdeflater::Decompressor::new().zlib_decompress(&out[..n], &mut back).unwrap(), data.len());
    assert!(back == data);
}

#[test]
fn levels_are_validated() {
    assert!(CodecSpec::with_level(method("zlib"), 0).is_err());
    assert!(CodecSpec::with_level(method("zlib"), 10).is_err());
    assert!(CodecSpec::with_level(method("zstd"), 20).is_err());
    assert!(CodecSpec::with_level(method("zstd"), -21).is_err());
    assert!(CodecSpec::with_level(method("zlib"), -1).is_err());
    assert!(method("zstd").check_level(-21).unwrap_err().to_string().contains("zstd level -21 out of range -20..=19"), "negative levels are reported as such");
    assert!(open(&CodecSpec { method: method("zstd"), level: -21, qatzip: Default::default() }).is_err());
    assert!(open(&CodecSpec { method: method("zlib"), level: 0, qatzip: Default::default() }).is_err());
    assert_eq!(CodecSpec::new(method("zstd")).level, 1);
    assert!("lz4".parse::<Method>().unwrap_err().to_string().contains("expected none, zlib, zstd or qatzip"));
    for m in Method::all() {
        assert_eq!(m.name().parse::<Method>().unwrap(), m);
        assert_eq!(Method::from_code(m.code()), Some(m));
        m.check_level(m.default_level()).unwrap();
        assert!(m.check_level(m.levels().max + 1).is_err());
        assert!(m.check_level(m.levels().min - 1).is_err());
    }
    assert!(method("none").check_level(1).is_err());
    assert!(method("qatzip").check_level(0).unwrap_err().to_string().contains("qatzip level 0 out of range 1..=9"));
}

/// The registry's names, wire codes and level ranges are part of the protocol and the CLI:
/// literal numbers, so that renumbering a method fails here.
#[test]
fn registry_codes_names_and_levels_are_pinned() {
    let got: Vec<(&str, u8, i32, i32, i32, bool)> = Method::all()
        .map(|m| {
            let l = m.levels();
            (m.name(), m.code().0, l.min, l.max, l.default, m.compresses())
        })
        .collect();
    assert_eq!(
        got,
        [
            ("none", 0, 0, 0, 0, false),
            ("zlib", 1, 1, 9, 1, true),
            ("zstd", 2, -20, 19, 1, true),
            ("qatzip", 3, 1, 9, 1, true),
        ]
    );
    for code in [4u8, 9, 255] {
        assert_eq!(Method::from_code(MethodCode(code)), None);
    }
    // Codes are unique (a registry line with a reused code would make two methods equal).
    let mut codes: Vec<u8> = Method::all().map(|m| m.code().0).collect();
    codes.sort();
    codes.dedup();
    assert_eq!(codes.len(), REGISTRY.len());
    assert_eq!(Method::names(), "none, zlib, zstd or qatzip");
    // Serialized by name (reports, JSON).
    assert_eq!(serde_json::to_string(&method("zstd")).unwrap(), "\"zstd\"");
    assert_eq!(serde_json::from_str::<Method>("\"qatzip\"").unwrap(), method("qatzip"));
}

#[test]
fn every_codec_reports_its_own_method() {
    for m in Method::all() {
        let mut spec = CodecSpec::new(m);
        spec.qatzip.provider = qatzip::Provider::Cpu;
        let c = open(&spec).unwrap();
        assert_eq!(c.info().method, m);
        assert_eq!(c.compresses(), m.compresses());
    }
}

/// zstd's fast (negative) levels: they pass the conformance suite, are announced as levels,
/// and trade ratio for speed as zstd documents (a fast level never compresses better than 1).
#[test]
fn zstd_fast_levels_work() {
    for level in [-20, -5, -1] {
        let spec = CodecSpec::with_level(method("zstd"), level).unwrap();
        conformance::run_suite(&|| open(&spec).unwrap());
        assert_eq!(open(&spec).unwrap().info().level, level);
    }
    let data: Vec<u8> = (0..MAX_BATCH_BYTES)
        .map(|i| b"the quick brown fox jumps over the lazy dog "[i % 44] ^ ((i / 4096) as u8 & 3))
        .collect();
    let size = |level| {
        let mut c = open(&CodecSpec::with_level(method("zstd"), level).unwrap()).unwrap();
        let mut out = vec![0u8; c.max_compressed_len(data.len())];
        c.compress(&data, &mut out).unwrap().expect("compressible")
    };
    assert!(
        size(-5) >= size(1),
        "zstd:-5 gave {} bytes, zstd:1 {}",
        size(-5),
        size(1)
    );
    assert!(
        size(-5) < data.len() / 4,
        "fast levels still compress text: {}",
        size(-5)
    );
    let caps = method("zstd").caps();
    assert_eq!((caps.min_level, caps.max_level), (-20, 19));
}

use super::*;

#[test]
fn none_conformance() {
    conformance::run_suite(&|| open(&CodecSpec::new(Method::None)).unwrap());
}

#[test]
fn zstd_conformance() {
    for level in [1, 3, 19] {
        conformance::run_suite(&|| open(&CodecSpec::with_level(Method::Zstd, level).unwrap()).unwrap());
    }
}

#[test]
fn zlib_conformance() {
    for level in [1, 6, 9] {
        conformance::run_suite(&|| open(&CodecSpec::with_level(Method::Zlib, level).unwrap()).unwrap());
    }
}

#[test]
fn zlib_payload_is_standard_zlib() {
    let data = conformance::sample_text(64 * 4096, 1);
    let mut c = open(&CodecSpec::new(Method::Zlib)).unwrap();
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
    assert!(CodecSpec::with_level(Method::Zlib, 0).is_err());
    assert!(CodecSpec::with_level(Method::Zlib, 10).is_err());
    assert!(CodecSpec::with_level(Method::Zstd, 20).is_err());
    assert!(open(&CodecSpec { method: Method::Zstd, level: 0, qatzip: Default::default() }).is_err());
    assert_eq!(CodecSpec::new(Method::Zstd).level, 1);
    assert!("lz4".parse::<Method>().unwrap_err().to_string().contains("expected none, zlib, zstd or qatzip"));
    for m in Method::ALL {
        assert_eq!(m.name().parse::<Method>().unwrap(), m);
        assert_eq!(Method::from_code(m.code()), Some(m));
    }
}

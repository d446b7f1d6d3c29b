//! Packet header, page offsets and whole packets: a header that decodes has consistent lengths, and offsets
//! that pass `decode_offsets` lie inside the region, strictly increasing within each list.
#![no_main]
use libfuzzer_sys::fuzz_target;
use pageferry::wire::{decode_offsets, decode_packet, PacketHeader, PACKET_HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    if data.len() < PACKET_HEADER_LEN + 2 {
        return;
    }
    let region_pages = u16::from_le_bytes([data[0], data[1]]) as u64 + 1;
    let data = &data[2..];
    // The whole-packet decoder (header, offsets, payload, CRC) must fail cleanly too.
    let _ = decode_packet(data, region_pages);
    let hdr: &[u8; PACKET_HEADER_LEN] = data[..PACKET_HEADER_LEN].try_into().unwrap();
    let Ok(h) = PacketHeader::decode(hdr) else { return };
    assert_eq!(h.wire_len(), PACKET_HEADER_LEN + h.offsets_len() + h.payload_len as usize + 4);
    let rest = &data[PACKET_HEADER_LEN..];
    if rest.len() < h.offsets_len() {
        return;
    }
    let (mut normal, mut zero) = (Vec::new(), Vec::new());
    if decode_offsets(&h, &rest[..h.offsets_len()], region_pages, &mut normal, &mut zero).is_ok() {
        assert_eq!(normal.len(), h.normal as usize);
        assert_eq!(zero.len(), h.zero as usize);
        for list in [&normal, &zero] {
            assert!(list.iter().all(|&p| (p as u64) < region_pages));
            assert!(list.windows(2).all(|w| w[0] < w[1]));
        }
    }
});

//! Handshake and control frames: any bytes either decode to a message that re-encodes to a
//! frame decoding to the same message, or fail with an error; never a panic. The handshake
//! limit is applied as the destination applies it.
#![no_main]
use libfuzzer_sys::fuzz_target;
use pageferry::wire::{encode_frame, read_frame, read_frame_limited, MAX_HANDSHAKE_BODY};

fuzz_target!(|data: &[u8]| {
    let _ = read_frame_limited(&mut &data[..], MAX_HANDSHAKE_BODY);
    if let Ok(frame) = read_frame(&mut &data[..]) {
        let again = encode_frame(frame.version, &frame.msg, &frame.blob);
        let back = read_frame(&mut &again[..]).expect("a re-encoded frame decodes");
        assert_eq!(frame, back);
    }
});

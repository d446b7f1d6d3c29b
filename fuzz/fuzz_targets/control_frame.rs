//! Handshake and control frames (harness: `pageferry_fuzz::control_frame`): any bytes either
//! decode to a message that re-encodes to a frame decoding to the same message, or fail with
//! an error; never a panic. The handshake limit is applied as the destination applies it.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| pageferry_fuzz::control_frame(data));

//! A stand-in for Intel's `libqatzip.so.3` (QATzip 1.3.x C ABI), for tests and benchmarks of
//! the qatzip method's `qat` provider on machines without QAT.
//!
//! Exports `qzInit`, `qzGetDefaultsDeflate`, `qzSetupSessionDeflate`, `qzCompress`,
//! `qzDecompress`, `qzTeardownSession`, `qzClose`, `qzMaxCompressedLength` and `qzSetLogLevel`
//! with QATzip 1.3.1's struct layouts, over libdeflate. Output is QATzip's
//! `QZ_DEFLATE_GZIP_EXT` format: gzip members with a `'Q','Z'` extra subfield holding the
//! member's uncompressed and deflate sizes. Only that format and the deflate algorithm are
//! supported; decompression accepts only such members.
//!
//! Behaviour is steered by environment variables, read at every call:
//! - `FAKE_QZ_HW=1`: sessions report a device (`hw_session_stat = QZ_OK`); otherwise they
//!   report the software path (`QZ_NO_HW`), and `qzInit(sess, sw_backup = 0)` is refused.
//! - `FAKE_QZ_FAIL=what[,what...]`, each `what` one of `init` (qzInit returns
//!   `QZ_NOSW_NO_HW`), `setup` (qzSetupSessionDeflate returns `QZ_FAIL`), `compress` (every
//!   qzCompress returns `QZ_FAIL`), `compress:N` (only the N-th qzCompress call of the process,
//!   counting from 1), `decompress` (qzDecompress returns `QZ_DATA_ERROR`).
//! - `FAKE_QZ_DEVICE=instances=K,latency_us=L[,inflight=P]`: a simulated device. qzCompress
//!   splits its input into 64 KiB requests; each request holds one of K process-wide device
//!   slots for L µs while the calling thread sleeps (no host CPU), and the call keeps up to P
//!   of its requests on the device at once (default 1: one after another). The output, one
//!   gzip member per request as QAT hardware writes it, is then made on the host (libdeflate,
//!   cheap for the compressible data such benchmarks use). So throughput scales with the
//!   requests in flight, up to K.
//!
//! `fake_qz_live_sessions()` returns the number of sessions set up and not torn down;
//! `fake_qz_take_device_peak()` the most device slots in use at once since its last call.

#![allow(clippy::missing_safety_doc)]

use std::ffi::{c_int, c_long, c_uchar, c_uint, c_ulong, c_void};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

const QZ_OK: c_int = 0;
const QZ_DUPLICATE: c_int = 1;
const QZ_PARAMS: c_int = -1;
const QZ_FAIL: c_int = -2;
const QZ_BUF_ERROR: c_int = -3;
const QZ_DATA_ERROR: c_int = -4;
const QZ_NO_HW: c_long = 11;
const QZ_NOSW_NO_HW: c_int = -101;
const QZ_DEFLATE: c_uchar = 8;
const QZ_DEFLATE_GZIP_EXT: c_int = 2;
const QZ_SKID_PAD_SZ: u64 = 48;
const QZ_COMPRESSED_SZ_OF_EMPTY_FILE: c_uint = 34;

/// Bytes of one member's header (10 fixed + XLEN + the QZ subfield) and trailer.
const HEADER_LEN: usize = 24;
const TRAILER_LEN: usize = 8;
/// Size of one simulated hardware request.
const REQUEST_LEN: usize = 64 * 1024;

#[repr(C)]
pub struct QzSession {
    pub hw_session_stat: c_long,
    pub thd_sess_stat: c_int,
    pub internal: *mut c_void,
    pub total_in: c_ulong,
    pub total_out: c_ulong,
}

#[repr(C)]
pub struct QzSessionParamsCommon {
    pub direction: c_int,
    pub comp_lvl: c_uint,
    pub comp_algorithm: c_uchar,
    pub max_forks: c_uint,
    pub sw_backup: c_uchar,
    pub hw_buff_sz: c_uint,
    pub strm_buff_sz: c_uint,
    pub input_sz_thrshold: c_uint,
    pub req_cnt_thrshold: c_uint,
    pub wait_cnt_thrshold: c_uint,
    pub polling_mode: c_int,
    pub is_sensitive_mode: c_uint,
}

#[repr(C)]
pub struct QzSessionParamsDeflate {
    pub common_params: QzSessionParamsCommon,
    pub huffman_hdr: c_int,
    pub data_fmt: c_int,
}

const _: () = assert!(std::mem::size_of::<QzSession>() == 40);
const _: () = assert!(std::mem::size_of::<QzSessionParamsDeflate>() == 56);

struct Session {
    level: u8,
    comp: libdeflater::Compressor,
    decomp: libdeflater::Decompressor,
}

static LIVE_SESSIONS: AtomicI64 = AtomicI64::new(0);
static COMPRESS_CALLS: AtomicU64 = AtomicU64::new(0);
static LOG_LEVEL: AtomicI64 = AtomicI64::new(2);

fn hardware() -> bool {
    std::env::var("FAKE_QZ_HW").is_ok_and(|v| v == "1")
}

/// Whether FAKE_QZ_FAIL asks `what` to fail on call number `call` (1-based).
fn failing(what: &str, call: u64) -> bool {
    let spec = std::env::var("FAKE_QZ_FAIL").unwrap_or_default();
    spec.split(',').map(str::trim).any(|item| match item.split_once(':') {
        None => item == what,
        Some((w, n)) => w == what && n.trim().parse::<u64>().is_ok_and(|n| n == call),
    })
}

struct Device {
    instances: usize,
    latency: Duration,
    inflight: usize,
}

fn device() -> Option<Device> {
    let spec = std::env::var("FAKE_QZ_DEVICE").ok()?;
    let mut d = Device { instances: 1, latency: Duration::ZERO, inflight: 1 };
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (k, v) = item.split_once('=')?;
        let v: u64 = v.trim().parse().ok()?;
        match k.trim() {
            "instances" => d.instances = v.max(1) as usize,
            "latency_us" => d.latency = Duration::from_micros(v),
            "inflight" => d.inflight = v.max(1) as usize,
            _ => return None,
        }
    }
    Some(d)
}

/// Device slots in use, process-wide, and the most ever in use at once.
static SLOTS: Mutex<usize> = Mutex::new(0);
static PEAK_SLOTS: AtomicI64 = AtomicI64::new(0);
static SLOT_FREED: Condvar = Condvar::new();

/// Take between 1 and `want` slots of `instances`, waiting for the first one.
fn acquire(want: usize, instances: usize) -> usize {
    let mut used = SLOTS.lock().unwrap_or_else(|e| e.into_inner());
    while *used >= instances {
        used = SLOT_FREED.wait(used).unwrap_or_else(|e| e.into_inner());
    }
    let take = want.min(instances - *used);
    *used += take;
    PEAK_SLOTS.fetch_max(*used as i64, Ordering::SeqCst);
    take
}

fn release(n: usize) {
    let mut used = SLOTS.lock().unwrap_or_else(|e| e.into_inner());
    *used -= n;
    SLOT_FREED.notify_all();
}

unsafe fn session<'a>(sess: *mut QzSession) -> Option<&'a mut Session> {
    if sess.is_null() || (*sess).internal.is_null() {
        return None;
    }
    Some(&mut *((*sess).internal as *mut Session))
}

#[no_mangle]
pub unsafe extern "C" fn qzInit(sess: *mut QzSession, sw_backup: c_uchar) -> c_int {
    if sess.is_null() {
        return QZ_PARAMS;
    }
    if failing("init", 0) || (!hardware() && sw_backup == 0) {
        return QZ_NOSW_NO_HW;
    }
    QZ_OK
}

#[no_mangle]
pub unsafe extern "C" fn qzGetDefaultsDeflate(p: *mut QzSessionParamsDeflate) -> c_int {
    if p.is_null() {
        return QZ_PARAMS;
    }
    // QATzip 1.3.1's defaults.
    p.write(QzSessionParamsDeflate {
        common_params: QzSessionParamsCommon {
            direction: 2,
            comp_lvl: 1,
            comp_algorithm: QZ_DEFLATE,
            max_forks: 3,
            sw_backup: 1,
            hw_buff_sz: 64 * 1024,
            strm_buff_sz: 64 * 1024,
            input_sz_thrshold: 1024,
            req_cnt_thrshold: 32,
            wait_cnt_thrshold: 8,
            polling_mode: 0,
            is_sensitive_mode: 0,
        },
        huffman_hdr: 0,
        data_fmt: QZ_DEFLATE_GZIP_EXT,
    });
    QZ_OK
}

#[no_mangle]
pub unsafe extern "C" fn qzSetupSessionDeflate(sess: *mut QzSession, p: *mut QzSessionParamsDeflate) -> c_int {
    if sess.is_null() || p.is_null() {
        return QZ_PARAMS;
    }
    if failing("setup", 0) {
        return QZ_FAIL;
    }
    if !(*sess).internal.is_null() {
        return QZ_DUPLICATE;
    }
    let p = &*p;
    let level = p.common_params.comp_lvl;
    if !(1..=9).contains(&level) || p.common_params.comp_algorithm != QZ_DEFLATE || p.data_fmt != QZ_DEFLATE_GZIP_EXT {
        return QZ_PARAMS;
    }
    let Ok(lvl) = libdeflater::CompressionLvl::new(level as i32) else { return QZ_PARAMS };
    let s = Box::new(Session {
        level: level as u8,
        comp: libdeflater::Compressor::new(lvl),
        decomp: libdeflater::Decompressor::new(),
    });
    (*sess).internal = Box::into_raw(s) as *mut c_void;
    (*sess).hw_session_stat = if hardware() { QZ_OK as c_long } else { QZ_NO_HW };
    LIVE_SESSIONS.fetch_add(1, Ordering::SeqCst);
    QZ_OK
}

fn xfl(level: u8) -> u8 {
    match level {
        1 => 4,
        9 => 2,
        _ => 0,
    }
}

/// Write one member for `chunk` into `dest`; its length, or None when it does not fit.
fn write_member(s: &mut Session, chunk: &[u8], dest: &mut [u8]) -> Option<usize> {
    if dest.len() < HEADER_LEN + TRAILER_LEN {
        return None;
    }
    let end = dest.len() - TRAILER_LEN;
    let n = s.comp.deflate_compress(chunk, &mut dest[HEADER_LEN..end]).ok().filter(|&n| n > 0)?;
    let h = &mut dest[..HEADER_LEN];
    h[..10].copy_from_slice(&[0x1f, 0x8b, 8, 4, 0, 0, 0, 0, xfl(s.level), 0xff]);
    h[10..12].copy_from_slice(&12u16.to_le_bytes());
    h[12..16].copy_from_slice(&[b'Q', b'Z', 8, 0]);
    h[16..20].copy_from_slice(&(chunk.len() as u32).to_le_bytes());
    h[20..24].copy_from_slice(&(n as u32).to_le_bytes());
    let t = &mut dest[HEADER_LEN + n..];
    t[..4].copy_from_slice(&crc32fast::hash(chunk).to_le_bytes());
    t[4..8].copy_from_slice(&(chunk.len() as u32).to_le_bytes());
    Some(HEADER_LEN + n + TRAILER_LEN)
}

#[no_mangle]
pub unsafe extern "C" fn qzCompress(
    sess: *mut QzSession,
    src: *const c_uchar,
    src_len: *mut c_uint,
    dest: *mut c_uchar,
    dest_len: *mut c_uint,
    _last: c_uint,
) -> c_int {
    let call = COMPRESS_CALLS.fetch_add(1, Ordering::SeqCst) + 1;
    if src_len.is_null() || dest_len.is_null() || (src.is_null() && *src_len > 0) || dest.is_null() {
        return QZ_PARAMS;
    }
    let Some(s) = session(sess) else { return QZ_PARAMS };
    let input = if *src_len == 0 { &[][..] } else { std::slice::from_raw_parts(src, *src_len as usize) };
    let out = std::slice::from_raw_parts_mut(dest, *dest_len as usize);
    *src_len = 0;
    *dest_len = 0;
    if failing("compress", call) {
        return QZ_FAIL;
    }
    let dev = device();
    let chunks: Vec<&[u8]> = match &dev {
        Some(_) if !input.is_empty() => input.chunks(REQUEST_LEN).collect(),
        _ => vec![input],
    };
    let (mut used_in, mut used_out) = (0usize, 0usize);
    let mut next = 0;
    while next < chunks.len() {
        // One wave of requests on the simulated device, then their output on the host.
        let wave = match &dev {
            Some(d) => {
                let got = acquire(d.inflight.min(chunks.len() - next), d.instances);
                std::thread::sleep(d.latency);
                release(got);
                got
            }
            None => chunks.len(),
        };
        for chunk in &chunks[next..next + wave] {
            let Some(n) = write_member(s, chunk, &mut out[used_out..]) else {
                *src_len = used_in as c_uint;
                *dest_len = used_out as c_uint;
                return QZ_BUF_ERROR;
            };
            used_in += chunk.len();
            used_out += n;
        }
        next += wave;
    }
    (*sess).total_in += used_in as c_ulong;
    (*sess).total_out += used_out as c_ulong;
    *src_len = used_in as c_uint;
    *dest_len = used_out as c_uint;
    QZ_OK
}

#[no_mangle]
pub unsafe extern "C" fn qzDecompress(
    sess: *mut QzSession,
    src: *const c_uchar,
    src_len: *mut c_uint,
    dest: *mut c_uchar,
    dest_len: *mut c_uint,
) -> c_int {
    if src.is_null() || src_len.is_null() || dest.is_null() || dest_len.is_null() {
        return QZ_PARAMS;
    }
    let Some(s) = session(sess) else { return QZ_PARAMS };
    let input = std::slice::from_raw_parts(src, *src_len as usize);
    let out = std::slice::from_raw_parts_mut(dest, *dest_len as usize);
    let (mut pos_in, mut pos_out) = (0usize, 0usize);
    let rc = if failing("decompress", 0) {
        QZ_DATA_ERROR
    } else {
        loop {
            if pos_in == input.len() {
                break if pos_in == 0 { QZ_DATA_ERROR } else { QZ_OK };
            }
            match decode_member(s, &input[pos_in..], &mut out[pos_out..]) {
                Some((used, made)) => {
                    pos_in += used;
                    pos_out += made;
                }
                None => break QZ_DATA_ERROR,
            }
        }
    };
    *src_len = pos_in as c_uint;
    *dest_len = pos_out as c_uint;
    rc
}

/// Decode one QZ member from the start of `input` into `out`: (bytes used, bytes made).
fn decode_member(s: &mut Session, input: &[u8], out: &mut [u8]) -> Option<(usize, usize)> {
    let h = input.get(..HEADER_LEN)?;
    if h[..4] != [0x1f, 0x8b, 8, 4] || h[10..16] != [12, 0, b'Q', b'Z', 8, 0] {
        return None;
    }
    let src_sz = u32::from_le_bytes(h[16..20].try_into().ok()?) as usize;
    let comp_sz = u32::from_le_bytes(h[20..24].try_into().ok()?) as usize;
    let data = input.get(HEADER_LEN..HEADER_LEN.checked_add(comp_sz)?)?;
    let t = input.get(HEADER_LEN + comp_sz..HEADER_LEN + comp_sz + TRAILER_LEN)?;
    let out = out.get_mut(..src_sz)?;
    if s.decomp.deflate_decompress(data, out).ok()? != src_sz {
        return None;
    }
    let crc = u32::from_le_bytes(t[..4].try_into().ok()?);
    let isize = u32::from_le_bytes(t[4..].try_into().ok()?);
    (crc == crc32fast::hash(out) && isize as usize == src_sz).then_some((HEADER_LEN + comp_sz + TRAILER_LEN, src_sz))
}

#[no_mangle]
pub unsafe extern "C" fn qzTeardownSession(sess: *mut QzSession) -> c_int {
    if sess.is_null() {
        return QZ_PARAMS;
    }
    if !(*sess).internal.is_null() {
        drop(Box::from_raw((*sess).internal as *mut Session));
        (*sess).internal = std::ptr::null_mut();
        LIVE_SESSIONS.fetch_sub(1, Ordering::SeqCst);
    }
    QZ_OK
}

#[no_mangle]
pub unsafe extern "C" fn qzClose(sess: *mut QzSession) -> c_int {
    if sess.is_null() {
        return QZ_PARAMS;
    }
    QZ_OK
}

/// Bound over 64 KiB pieces, each with QATzip's 9/8 expansion, skid pad, header and footer.
#[no_mangle]
pub unsafe extern "C" fn qzMaxCompressedLength(src_sz: c_uint, _sess: *mut QzSession) -> c_uint {
    if src_sz == 0 {
        return QZ_COMPRESSED_SZ_OF_EMPTY_FILE;
    }
    let n = src_sz as u64;
    let piece = REQUEST_LEN as u64;
    let bound = |len: u64| (9 * len).div_ceil(8) + QZ_SKID_PAD_SZ + (HEADER_LEN + TRAILER_LEN) as u64;
    let rest = n % piece;
    let total = (n / piece) * bound(piece) + if rest > 0 { bound(rest) } else { 0 };
    c_uint::try_from(total).unwrap_or(0)
}

#[no_mangle]
pub extern "C" fn qzSetLogLevel(level: c_int) -> c_int {
    LOG_LEVEL.swap(level as i64, Ordering::SeqCst) as c_int
}

#[no_mangle]
pub extern "C" fn fake_qz_live_sessions() -> c_long {
    LIVE_SESSIONS.load(Ordering::SeqCst) as c_long
}

/// The most simulated-device slots in use at once since the last call (which resets it).
#[no_mangle]
pub extern "C" fn fake_qz_take_device_peak() -> c_long {
    PEAK_SLOTS.swap(0, Ordering::SeqCst) as c_long
}

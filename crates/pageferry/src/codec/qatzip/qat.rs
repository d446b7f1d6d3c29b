//! Provider `qat`: Intel's QATzip library, loaded at run time.
//!
//! One QATzip session per codec (= per channel worker), set up the way QEMU's multifd-qatzip
//! does: `qzInit(sw_backup = 1)`, the library's deflate defaults (format
//! `QZ_DEFLATE_GZIP_EXT`) with only the level changed, `qzSetupSessionDeflate`; then one
//! non-streaming `qzCompress(last = 1)` per batch and one `qzDecompress` per payload.
//! `hw_session_stat` after setup tells a hardware session (`QZ_OK`) from the library's
//! software fallback (`QZ_NO_HW` and friends).
//!
//! The structs below mirror QATzip 1.3.x's `qatzip.h` (libqatzip.so.3, built without
//! `ERR_INJECTION`, as distributions ship it) for x86-64 Linux.

use super::cpu;
use super::METHOD;
use crate::codec::{Codec, CodecError, CodecInfo};
use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_LOCAL, RTLD_NOW};
use std::collections::HashMap;
use std::ffi::{c_int, c_long, c_uchar, c_uint, c_ulong, c_void};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, OnceLock};

/// Library file name searched in the system's library path when no path is given.
pub(crate) const DEFAULT_LIB: &str = "libqatzip.so.3";
/// Environment variable naming the library (when `QatzipOptions::lib_path` is unset).
pub(crate) const LIB_ENV: &str = "PAGEFERRY_QATZIP_LIB";
/// QATzip's own dependencies, preloaded from the library's directory when they are there
/// (a private unpacked prefix is not in the loader's search path).
const DEPS: [&str; 2] = ["libusdm.so.0", "libqat.so.4"];

// Status codes (qatzip.h).
pub(crate) const QZ_OK: c_int = 0;
pub(crate) const QZ_DUPLICATE: c_int = 1;
const QZ_DEFLATE: c_uchar = 8;
const QZ_DIR_BOTH: c_int = 2;
const QZ_DYNAMIC_HDR: c_int = 0;
const QZ_DEFLATE_GZIP_EXT: c_int = 2;
const LOG_NONE: c_int = 0;

/// Name of a QATzip status code.
pub(crate) fn qz_status_name(rc: c_long) -> &'static str {
    match rc {
        0 => "QZ_OK",
        1 => "QZ_DUPLICATE",
        2 => "QZ_FORCE_SW",
        -1 => "QZ_PARAMS",
        -2 => "QZ_FAIL",
        -3 => "QZ_BUF_ERROR",
        -4 => "QZ_DATA_ERROR",
        -5 => "QZ_TIMEOUT",
        -100 => "QZ_INTEG",
        11 => "QZ_NO_HW",
        12 => "QZ_NO_MDRV",
        13 => "QZ_NO_INST_ATTACH",
        14 => "QZ_LOW_MEM",
        15 => "QZ_LOW_DEST_MEM",
        16 => "QZ_UNSUPPORTED_FMT",
        100 => "QZ_NONE",
        -101 => "QZ_NOSW_NO_HW",
        -102 => "QZ_NOSW_NO_MDRV",
        -103 => "QZ_NOSW_NO_INST_ATTACH",
        -104 => "QZ_NOSW_LOW_MEM",
        -105 => "QZ_NO_SW_AVAIL",
        -116 => "QZ_NOSW_UNSUPPORTED_FMT",
        -117 => "QZ_POST_PROCESS_ERROR",
        -118 => "QZ_METADATA_OVERFLOW",
        -119 => "QZ_OUT_OF_RANGE",
        -200 => "QZ_NOT_SUPPORTED",
        _ => "unknown QATzip status",
    }
}

fn describe(call: &str, rc: c_int) -> String {
    format!("{call} returned {} ({rc})", qz_status_name(rc as c_long))
}

/// `QzSession_T`.
#[repr(C)]
pub(crate) struct QzSession {
    pub hw_session_stat: c_long,
    pub thd_sess_stat: c_int,
    pub internal: *mut c_void,
    pub total_in: c_ulong,
    pub total_out: c_ulong,
}

/// `QzSessionParamsCommon_T` (1.3.x: with `polling_mode` and `is_sensitive_mode`).
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct QzSessionParamsCommon {
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

/// `QzSessionParamsDeflate_T`.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct QzSessionParamsDeflate {
    pub common_params: QzSessionParamsCommon,
    pub huffman_hdr: c_int,
    pub data_fmt: c_int,
}

// Sizes as the C compiler lays them out from qatzip.h 1.3.1 (checked with gcc on x86-64).
const _: () = assert!(std::mem::size_of::<QzSession>() == 40);
const _: () = assert!(std::mem::size_of::<QzSessionParamsCommon>() == 48);
const _: () = assert!(std::mem::size_of::<QzSessionParamsDeflate>() == 56);
const _: () = assert!(std::mem::offset_of!(QzSessionParamsDeflate, data_fmt) == 52);

/// Params with slack behind them: a library built with `ERR_INJECTION` has two more pointers
/// in the common params, and must not write past our allocation if it meets us.
#[repr(C)]
struct ParamsWithSlack {
    p: QzSessionParamsDeflate,
    _slack: [u64; 4],
}

type InitFn = unsafe extern "C" fn(*mut QzSession, c_uchar) -> c_int;
type SetupDeflateFn = unsafe extern "C" fn(*mut QzSession, *mut QzSessionParamsDeflate) -> c_int;
type GetDefaultsDeflateFn = unsafe extern "C" fn(*mut QzSessionParamsDeflate) -> c_int;
type CompressFn = unsafe extern "C" fn(*mut QzSession, *const u8, *mut c_uint, *mut u8, *mut c_uint, c_uint) -> c_int;
type DecompressFn = unsafe extern "C" fn(*mut QzSession, *const u8, *mut c_uint, *mut u8, *mut c_uint) -> c_int;
type SessionFn = unsafe extern "C" fn(*mut QzSession) -> c_int;
type MaxLenFn = unsafe extern "C" fn(c_uint, *mut QzSession) -> c_uint;
type SetLogLevelFn = unsafe extern "C" fn(c_int) -> c_int;

/// A loaded QATzip library: its entry points, looked up once. Never unloaded (QATzip keeps
/// process-wide state and, with hardware, threads).
pub(crate) struct QzLib {
    pub path: PathBuf,
    init: InitFn,
    setup_deflate: SetupDeflateFn,
    get_defaults_deflate: GetDefaultsDeflateFn,
    compress: CompressFn,
    decompress: DecompressFn,
    teardown: SessionFn,
    close: SessionFn,
    max_len: MaxLenFn,
    set_log_level: Option<SetLogLevelFn>,
    /// Live sessions; `qzClose` is called when the last one goes (some QATzip versions stop
    /// the device for the whole process in `qzClose`, which would pull it from under the
    /// other channels).
    sessions: Mutex<usize>,
    _lib: Library,
    _deps: Vec<Library>,
}

/// Which library to load: the option, else the environment variable, else the system's.
pub(crate) fn resolve_path(lib_path: Option<&Path>) -> PathBuf {
    match lib_path {
        Some(p) => p.to_path_buf(),
        None => match std::env::var_os(LIB_ENV) {
            Some(p) if !p.is_empty() => PathBuf::from(p),
            _ => PathBuf::from(DEFAULT_LIB),
        },
    }
}

/// Load (once per path) the library.
pub(crate) fn load(path: &Path) -> Result<Arc<QzLib>, String> {
    static LOADED: OnceLock<Mutex<HashMap<PathBuf, Arc<QzLib>>>> = OnceLock::new();
    let mut loaded = LOADED.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    if let Some(lib) = loaded.get(path) {
        return Ok(lib.clone());
    }
    let lib = Arc::new(load_uncached(path)?);
    loaded.insert(path.to_path_buf(), lib.clone());
    Ok(lib)
}

fn load_uncached(path: &Path) -> Result<QzLib, String> {
    let mut deps = Vec::new();
    // A bare name is left to the loader's search path; a path brings its directory's deps.
    if path.components().count() > 1 {
        if !path.exists() {
            return Err(format!("{} does not exist", path.display()));
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        for dep in DEPS {
            let p = dir.join(dep);
            if p.exists() {
                // SAFETY: loading QATzip's own dependency; its initialisers are the library's.
                let l = unsafe { Library::open(Some(p.as_os_str()), RTLD_NOW | RTLD_GLOBAL) }
                    .map_err(|e| format!("cannot load {}: {e}", p.display()))?;
                deps.push(l);
            }
        }
    }
    // SAFETY: loading the QATzip library the user pointed us at; its initialisers run here.
    let lib = unsafe { Library::open(Some(path.as_os_str()), RTLD_NOW | RTLD_LOCAL) }.map_err(|e| e.to_string())?;
    macro_rules! sym {
        ($name:literal, $t:ty) => {
            // SAFETY: the symbol has this C signature in qatzip.h 1.3.x; the pointer is used
            // only while `lib` (kept in QzLib) is loaded.
            *unsafe { lib.get::<$t>(concat!($name, "\0").as_bytes()) }
                .map_err(|e| format!("{} lacks {} (QATzip 1.3 or later needed): {e}", path.display(), $name))?
        };
    }
    Ok(QzLib {
        path: path.to_path_buf(),
        init: sym!("qzInit", InitFn),
        setup_deflate: sym!("qzSetupSessionDeflate", SetupDeflateFn),
        get_defaults_deflate: sym!("qzGetDefaultsDeflate", GetDefaultsDeflateFn),
        compress: sym!("qzCompress", CompressFn),
        decompress: sym!("qzDecompress", DecompressFn),
        teardown: sym!("qzTeardownSession", SessionFn),
        close: sym!("qzClose", SessionFn),
        max_len: sym!("qzMaxCompressedLength", MaxLenFn),
        // SAFETY: as above; optional.
        set_log_level: unsafe { lib.get::<SetLogLevelFn>(b"qzSetLogLevel\0") }.ok().map(|s| *s),
        sessions: Mutex::new(0),
        _lib: lib,
        _deps: deps,
    })
}

/// One QATzip session: the `qat` provider's codec.
pub(crate) struct QatCodec {
    lib: Arc<QzLib>,
    /// Boxed: QATzip may keep the session's address.
    sess: NonNull<QzSession>,
    level: u8,
    hardware: bool,
    /// The parameters the session was set up with, to set it up again.
    params: QzSessionParamsDeflate,
    /// A failed call left the session in an unknown state and resetting it failed too: try
    /// again before the next call.
    needs_reset: bool,
    /// Compression target when the caller's buffer is smaller than qzMaxCompressedLength
    /// (QATzip's software path reports a too-small output as a plain QZ_FAIL).
    scratch: Vec<u8>,
}

// SAFETY: a QATzip session is used by one thread at a time (`&mut self` for every call that
// uses it) and the library documents its calls as thread-safe, so a session may be set up
// in one thread and used in another. `max_compressed_len` (`&self`) only reads session
// parameters.
unsafe impl Send for QatCodec {}

fn setup_err(detail: String) -> CodecError {
    CodecError::Setup { method: METHOD, detail }
}

impl QatCodec {
    /// Open a session at `level`. Errors name the call and its QZ status.
    pub(crate) fn open(lib: Arc<QzLib>, level: u8) -> Result<Self, CodecError> {
        let sess = Box::new(QzSession {
            hw_session_stat: 0,
            thd_sess_stat: 0,
            internal: std::ptr::null_mut(),
            total_in: 0,
            total_out: 0,
        });
        let sess = NonNull::from(Box::leak(sess));
        // SAFETY: `sess` is a valid, zeroed session; sw_backup 1 allows the software fallback.
        let rc = unsafe { (lib.init)(sess.as_ptr(), 1) };
        if rc != QZ_OK && rc != QZ_DUPLICATE {
            // SAFETY: from Box::leak above, never handed out.
            drop(unsafe { Box::from_raw(sess.as_ptr()) });
            return Err(setup_err(format!("{} ({})", describe("qzInit", rc), lib.path.display())));
        }
        *lib.sessions.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        // From here on, Drop tears down and closes.
        // SAFETY: zeroed plain C data (integers).
        let zeroed: QzSessionParamsDeflate = unsafe { std::mem::zeroed() };
        let mut me = Self { lib, sess, level, hardware: false, params: zeroed, needs_reset: false, scratch: Vec::new() };
        // SAFETY: zeroed plain C data (integers) with slack.
        let mut params: ParamsWithSlack = unsafe { std::mem::zeroed() };
        // SAFETY: a valid params buffer for the library to fill.
        let rc = unsafe { (me.lib.get_defaults_deflate)(&mut params.p) };
        if rc != QZ_OK {
            return Err(setup_err(describe("qzGetDefaultsDeflate", rc)));
        }
        let p = &mut params.p;
        // The library defaults, as QEMU uses them, with the level set; format, algorithm and
        // the software fallback pinned in case someone changed the process defaults.
        p.common_params.comp_lvl = level as c_uint;
        p.common_params.comp_algorithm = QZ_DEFLATE;
        p.common_params.direction = QZ_DIR_BOTH;
        p.common_params.sw_backup = 1;
        p.huffman_hdr = QZ_DYNAMIC_HDR;
        p.data_fmt = QZ_DEFLATE_GZIP_EXT;
        me.params = *p;
        me.setup().map_err(setup_err)?;
        if !me.hardware {
            // Without a device, QATzip retries the hardware on every call and logs the miss
            // each time; errors still reach the caller as status codes. (The level is
            // process-wide; a process with a device never gets here.)
            if let Some(set) = me.lib.set_log_level {
                // SAFETY: plain setter.
                unsafe { set(LOG_NONE) };
            }
        }
        Ok(me)
    }

    /// `qzSetupSessionDeflate` with the stored parameters; records hardware or software.
    fn setup(&mut self) -> Result<(), String> {
        let mut params = ParamsWithSlack { p: self.params, _slack: [0; 4] };
        // SAFETY: valid session (initialised, no internals) and params.
        let rc = unsafe { (self.lib.setup_deflate)(self.sess.as_ptr(), &mut params.p) };
        if rc != QZ_OK {
            return Err(describe("qzSetupSessionDeflate", rc));
        }
        // SAFETY: the session is ours and set up.
        self.hardware = unsafe { self.sess.as_ref().hw_session_stat } == QZ_OK as c_long;
        Ok(())
    }

    /// Tear the session down and set it up again. QATzip keeps a (de)compression stream in
    /// the session, and a call that fails or stops early (full output, truncated input) leaves
    /// it mid-stream: the next payload is read as its continuation. Seen with QATzip 1.3.1's
    /// software path: after a payload that overflowed the output, was truncated or corrupt,
    /// the next good payload came back as QZ_OK with the wrong bytes (only the input count
    /// gave it away), or as QZ_DATA_ERROR for ever after garbage.
    fn reset(&mut self) -> Result<(), String> {
        // SAFETY: our session; teardown frees its internals, setup makes new ones.
        unsafe { (self.lib.teardown)(self.sess.as_ptr()) };
        self.needs_reset = true;
        self.setup()?;
        self.needs_reset = false;
        Ok(())
    }

    /// After a failed call: reset, and say so in the error if that failed too.
    fn after_failure(&mut self, detail: String) -> String {
        match self.reset() {
            Ok(()) => detail,
            Err(e) => format!("{detail}; resetting the session failed: {e}"),
        }
    }

    fn ready(&mut self) -> Result<(), String> {
        if self.needs_reset {
            self.reset().map_err(|e| format!("session unusable since an earlier failure: {e}"))?;
        }
        Ok(())
    }

    pub(crate) fn is_hardware(&self) -> bool {
        self.hardware
    }

    fn max_len(&self, input_len: usize) -> usize {
        let fallback = cpu::max_member_len(input_len) + 128;
        let Ok(n) = c_uint::try_from(input_len) else { return fallback };
        // SAFETY: the session is set up; qzMaxCompressedLength only reads it.
        match unsafe { (self.lib.max_len)(n, self.sess.as_ptr()) } {
            0 => fallback, // overflow
            m => m as usize,
        }
    }

    fn compress_into(&mut self, input: &[u8], out_ptr: *mut u8, out_len: usize) -> Result<usize, CodecError> {
        let err = |detail: String| CodecError::Compress { method: METHOD, detail };
        self.ready().map_err(err)?;
        let mut src_len = c_uint::try_from(input.len()).map_err(|_| err(format!("batch of {} bytes", input.len())))?;
        let mut dest_len = c_uint::try_from(out_len).unwrap_or(c_uint::MAX);
        // SAFETY: input and output describe live buffers of these lengths; last = 1 ends the
        // member(s) within this call.
        let rc = unsafe { (self.lib.compress)(self.sess.as_ptr(), input.as_ptr(), &mut src_len, out_ptr, &mut dest_len, 1) };
        if rc != QZ_OK {
            let detail = describe("qzCompress", rc);
            return Err(err(self.after_failure(detail)));
        }
        if src_len as usize != input.len() || dest_len as usize > out_len {
            let detail = format!(
                "qzCompress consumed {src_len} of {} bytes and reported {dest_len} bytes of output in {out_len}",
                input.len()
            );
            return Err(err(self.after_failure(detail)));
        }
        Ok(dest_len as usize)
    }
}

impl Codec for QatCodec {
    fn hardware(&self) -> bool {
        self.hardware
    }
    fn info(&self) -> CodecInfo {
        let provider = if self.hardware { "qat (hardware)" } else { "qat (software path)" };
        CodecInfo { method: METHOD, level: self.level.into(), provider: provider.into(), note: None }
    }

    fn max_compressed_len(&self, input_len: usize) -> usize {
        self.max_len(input_len)
    }

    fn compress(&mut self, input: &[u8], out: &mut [u8]) -> Result<Option<usize>, CodecError> {
        let need = self.max_len(input.len());
        if out.len() >= need {
            return self.compress_into(input, out.as_mut_ptr(), out.len()).map(Some);
        }
        // The caller's buffer may be too small: compress aside, then copy if it fits.
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.resize(need, 0);
        let r = self.compress_into(input, scratch.as_mut_ptr(), scratch.len());
        let r = r.map(|n| {
            (n <= out.len()).then(|| {
                out[..n].copy_from_slice(&scratch[..n]);
                n
            })
        });
        self.scratch = scratch;
        r
    }

    fn decompress(&mut self, input: &[u8], out: &mut [u8]) -> Result<(), CodecError> {
        let err = |detail: String| CodecError::Decompress { method: METHOD, detail };
        if input.is_empty() {
            return Err(err("empty payload".into()));
        }
        self.ready().map_err(err)?;
        let mut src_len = c_uint::try_from(input.len()).map_err(|_| err(format!("payload of {} bytes", input.len())))?;
        let mut dest_len = c_uint::try_from(out.len()).map_err(|_| err(format!("batch of {} bytes", out.len())))?;
        // SAFETY: input and output describe live buffers of these lengths.
        let rc = unsafe {
            (self.lib.decompress)(self.sess.as_ptr(), input.as_ptr(), &mut src_len, out.as_mut_ptr(), &mut dest_len)
        };
        if rc != QZ_OK {
            let detail = describe("qzDecompress", rc);
            return Err(err(self.after_failure(detail)));
        }
        // QATzip stops quietly when the output is full or the input ends mid-member: the
        // counts are the only sign of a payload that inflates beyond or short of the batch.
        if src_len as usize != input.len() || dest_len as usize != out.len() {
            let detail = format!(
                "qzDecompress used {src_len} of {} payload bytes and produced {dest_len} of {} bytes",
                input.len(),
                out.len()
            );
            return Err(err(self.after_failure(detail)));
        }
        Ok(())
    }

}

impl Drop for QatCodec {
    fn drop(&mut self) {
        // SAFETY: the session was initialised by qzInit; teardown frees its internals (and is
        // harmless on a session whose setup failed); the box is ours.
        unsafe {
            (self.lib.teardown)(self.sess.as_ptr());
            let mut live = self.lib.sessions.lock().unwrap_or_else(|e| e.into_inner());
            *live -= 1;
            if *live == 0 {
                (self.lib.close)(self.sess.as_ptr());
            }
            drop(live);
            drop(Box::from_raw(self.sess.as_ptr()));
        }
    }
}

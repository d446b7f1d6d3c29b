//! `pageferry bench`: the seed's benchmark, rerunnable. Runs a matrix of (method, level,
//! channels, link) migrations of one memory image between two processes, each case as a real
//! `recv` + `send` pair, and prints a markdown table, JSON lines and SVG charts.
//! `pageferry bench codecs` measures the bare codecs on the same image's 512 KiB batches next
//! to the engine's CPU cost for the same bytes. `pageferry bench pipeline` shows pipelining
//! keeping a simulated accelerator (the fake QATzip library's device) busy.
//!
//! Files: [`matrix`] (cases, processes, progress), [`link`] (`cap:`/`tc:`/`unlimited` links,
//! the network namespace and Ctrl-C cleanup), [`metrics`] (per-run numbers, median/min/max),
//! [`render`] (markdown, JSON), [`charts`] (SVG), [`codecs`] (bare codec speed).

mod charts;
mod codecs;
mod link;
mod matrix;
mod metrics;
mod pipeline;
mod render;

use crate::args::parse_size;
use anyhow::{bail, Context, Result};
use pageferry::codec::{CodecSpec, Method};
use pageferry_image::ImageKind;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};


/// Where benchmark images live: tmpfs, so they are RAM like a guest's, and `--dirty-rate` can
/// track writes to the source image.
pub const SHM_DIR: &str = "/dev/shm";

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    cmd: Option<BenchCmd>,
    #[command(flatten)]
    matrix: matrix::MatrixArgs,
}

#[derive(clap::Subcommand)]
enum BenchCmd {
    /// Bare compress/decompress speed per core of each method and level on the image's 512 KiB
    /// batches, next to the engine's CPU-seconds per GiB for a migration of the same image.
    Codecs(codecs::CodecsArgs),
    /// Throughput against channels and pipeline depth with qatzip offloaded to a simulated
    /// device (the fake QATzip library: K instances, a fixed latency per 64 KiB request).
    Pipeline(pipeline::PipelineArgs),
}

pub fn run(a: BenchArgs) -> Result<()> {
    link::install_signal_cleanup();
    match a.cmd {
        Some(BenchCmd::Codecs(c)) => codecs::run(c),
        Some(BenchCmd::Pipeline(p)) => pipeline::run(p),
        None => matrix::run(a.matrix),
    }
}

/// The image to benchmark on: a file of one's own, or a generated one.
#[derive(clap::Args, Clone, Debug)]
pub struct ImageOpts {
    /// Benchmark on this file instead of a generated image (any file: it is copied to
    /// /dev/shm; one smaller than --size is repeated to --size, one whose size is not a
    /// multiple of 4096 is zero-padded to the next multiple).
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Generated image content: silesia-like, zero, random, mixed (~50% zero pages, ~9% random).
    #[arg(long, default_value = "silesia-like")]
    pub kind: String,
    /// Image size (1G, 256M, bytes; a multiple of 4096). Default: 1G (256M with --quick, 256M
    /// for `bench codecs`, 128M for `bench pipeline`).
    #[arg(long, value_parser = parse_size)]
    pub size: Option<u64>,
    /// Seed of the generated image.
    #[arg(long, default_value_t = pageferry_image::DEFAULT_SEED)]
    pub seed: u64,
}

/// A benchmark image in /dev/shm, removed on drop (and on Ctrl-C).
pub struct PreparedImage {
    pub path: PathBuf,
    pub bytes: u64,
    /// How it was made, for the reports ("silesia-like 1024 MiB seed 0x…", "file X repeated").
    pub desc: String,
}

impl Drop for PreparedImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        link::unregister_file(&self.path);
    }
}

/// A per-process file name under /dev/shm.
pub fn shm_path(tag: &str) -> PathBuf {
    Path::new(SHM_DIR).join(format!("pageferry-bench-{}-{tag}.img", std::process::id()))
}

/// Build the benchmark image in /dev/shm: generated, or a copy of `opts.image` repeated or
/// padded as documented on [`ImageOpts`].
pub fn prepare_image(opts: &ImageOpts, default_size: u64, tag: &str) -> Result<PreparedImage> {
    let size = opts.size.unwrap_or(default_size);
    if size == 0 || size % 4096 != 0 {
        bail!("--size must be a non-zero multiple of 4096 (got {size})");
    }
    let path = shm_path(tag);
    link::register_file(&path);
    // From here on the guard removes the file whatever happens.
    let mut img = PreparedImage { path: path.clone(), bytes: 0, desc: String::new() };
    match &opts.image {
        None => {
            let kind: ImageKind = opts.kind.parse().map_err(|e| anyhow::anyhow!("--kind: {e}"))?;
            eprintln!("pageferry bench: generating a {} MiB {} image in {}", size >> 20, kind.name(), SHM_DIR);
            pageferry_image::write_image(kind, opts.seed, size, &path, &mut |_| {}).with_context(|| format!("writing {}", path.display()))?;
            img.bytes = size;
            img.desc = format!("generated {} {} MiB, seed {:#x}", kind.name(), size >> 20, opts.seed);
        }
        Some(file) => {
            let (bytes, how) = copy_image(file, &path, size).with_context(|| format!("copying {} to {}", file.display(), path.display()))?;
            img.bytes = bytes;
            img.desc = format!("{} ({how}), {} MiB", file.display(), bytes >> 20);
            eprintln!("pageferry bench: image {}", img.desc);
        }
    }
    Ok(img)
}

/// The size a user file becomes: repeated up to `size` when shorter, else its own size rounded
/// up to a multiple of 4096.
pub fn target_len(file_len: u64, size: u64) -> u64 {
    if file_len < size {
        size
    } else {
        file_len.div_ceil(4096) * 4096
    }
}

/// Copy `src` to `dst` at [`target_len`]: repeated when shorter than `size`, zero-padded to a
/// page multiple otherwise. Returns the length and what was done.
fn copy_image(src: &Path, dst: &Path, size: u64) -> Result<(u64, &'static str)> {
    let mut f = std::fs::File::open(src)?;
    let len = f.metadata()?.len();
    if len == 0 {
        bail!("the image file is empty");
    }
    let target = target_len(len, size);
    let mut out = std::io::BufWriter::with_capacity(8 << 20, std::fs::File::create(dst)?);
    let mut done = 0u64;
    let mut buf = vec![0u8; 8 << 20];
    if len >= size {
        // Whole file (it is already long enough), then zero padding to `target` via set_len.
        std::io::copy(&mut f, &mut out)?;
        let file = out.into_inner().map_err(|e| e.into_error())?;
        file.set_len(target)?;
        return Ok((target, if target == len { "copied" } else { "copied, zero-padded to a page multiple" }));
    }
    while done < target {
        f.seek(std::io::SeekFrom::Start(0))?;
        let mut left_in_file = len;
        while left_in_file > 0 && done < target {
            let want = (buf.len() as u64).min(left_in_file).min(target - done) as usize;
            let n = f.read(&mut buf[..want])?;
            if n == 0 {
                bail!("the image file shrank while it was copied");
            }
            out.write_all(&buf[..n])?;
            done += n as u64;
            left_in_file -= n as u64;
        }
    }
    out.flush()?;
    Ok((target, "repeated to --size"))
}

/// Parse a comma-separated list, trimming items; empty items are an error.
fn split_list<'a>(flag: &str, s: &'a str) -> Result<Vec<&'a str>> {
    let items: Vec<&str> = s.split(',').map(str::trim).collect();
    if items.iter().any(|i| i.is_empty()) {
        bail!("{flag}: empty item in '{s}' (expected a comma-separated list)");
    }
    Ok(items)
}

/// A matrix's method: a fixed one, or `auto` (the source's engine chooses per window; the
/// destination accepts whatever it decodes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BenchMethod {
    Fixed(Method),
    Auto,
}

impl BenchMethod {
    pub fn name(&self) -> &'static str {
        match self {
            BenchMethod::Fixed(m) => m.name(),
            BenchMethod::Auto => "auto",
        }
    }
    /// Auto may compress.
    pub fn compresses(&self) -> bool {
        self.fixed().is_none_or(|m| m.compresses())
    }
    pub fn fixed(&self) -> Option<Method> {
        match self {
            BenchMethod::Fixed(m) => Some(*m),
            BenchMethod::Auto => None,
        }
    }
}

impl From<Method> for BenchMethod {
    fn from(m: Method) -> Self {
        BenchMethod::Fixed(m)
    }
}

impl std::fmt::Display for BenchMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The matrix's `--methods auto,none,zlib,zstd,qatzip`; each fixed method at the given
/// levels (see [`method_levels`]), auto once (level shown as 0).
pub fn matrix_methods(s: &str, levels: &[i32]) -> Result<Vec<(BenchMethod, i32)>> {
    let items = split_list("--methods", s)?;
    let auto = items.contains(&"auto");
    let fixed: Vec<&str> = items.into_iter().filter(|i| *i != "auto").collect();
    let mut out = Vec::new();
    if auto {
        out.push((BenchMethod::Auto, 0));
    }
    if !fixed.is_empty() {
        let methods = parse_methods(&fixed.join(","))?;
        out.extend(method_levels(&methods, levels).into_iter().map(|(m, l)| (BenchMethod::Fixed(m), l)));
    }
    Ok(out)
}

/// `--methods none,zlib,zstd,qatzip`.
pub fn parse_methods(s: &str) -> Result<Vec<Method>> {
    let mut out = Vec::new();
    for item in split_list("--methods", s)? {
        let m: Method = item.parse().map_err(|e| anyhow::anyhow!("--methods: {e}"))?;
        if out.contains(&m) {
            bail!("--methods: '{item}' given twice");
        }
        out.push(m);
    }
    Ok(out)
}

/// `--channels 1,2,4,8,16` (each 1..=256).
pub fn parse_channels(s: &str) -> Result<Vec<usize>> {
    let mut out = Vec::new();
    for item in split_list("--channels", s)? {
        let n: usize = item.parse().map_err(|_| anyhow::anyhow!("--channels: '{item}' is not a number (expected e.g. 1,2,4,8,16)"))?;
        if n == 0 || n > 256 {
            bail!("--channels: {n} is out of range 1..=256");
        }
        if out.contains(&n) {
            bail!("--channels: {n} given twice");
        }
        out.push(n);
    }
    Ok(out)
}

/// `--levels 1,3,9` (or `--levels=-5,1`: zstd's fast levels are negative): levels to run
/// every compressing method at (none has only level 0).
pub fn parse_levels(s: &str) -> Result<Vec<i32>> {
    let mut out = Vec::new();
    for item in split_list("--levels", s)? {
        let n: i32 = item.parse().map_err(|_| anyhow::anyhow!("--levels: '{item}' is not a level (expected e.g. 1,3,9 or -5,1)"))?;
        if !out.contains(&n) {
            out.push(n);
        }
    }
    Ok(out)
}

/// (method, level) pairs: each method at each of `levels` it accepts (its default level when
/// `levels` is empty); method none once at level 0. Combinations out of a method's range are
/// reported on stderr and left out.
pub fn method_levels(methods: &[Method], levels: &[i32]) -> Vec<(Method, i32)> {
    let mut out = Vec::new();
    for &m in methods {
        let (lo, hi) = (m.levels().min, m.levels().max);
        if !m.compresses() || levels.is_empty() {
            out.push((m, m.default_level()));
            continue;
        }
        for &l in levels {
            if (lo..=hi).contains(&l) {
                out.push((m, l));
            } else {
                eprintln!("pageferry bench: leaving out {m} level {l} (valid levels {lo}..={hi})");
            }
        }
    }
    out
}

/// The codec spec of a (method, level) pair with the user's qatzip provider.
pub fn spec_for(method: Method, level: i32, qatzip_provider: &str) -> Result<CodecSpec> {
    let mut spec = CodecSpec::with_level(method, level)?;
    spec.qatzip.provider = qatzip_provider.parse()?;
    Ok(spec)
}

/// Digest (xxh3-128, the engine's memory digest) of a whole image file.
pub fn digest_file(path: &Path) -> Result<u128> {
    use pageferry::memory::{GuestMemory, MmapRegion};
    let r = MmapRegion::open_file("image", path).with_context(|| format!("open {}", path.display()))?;
    Ok(GuestMemory::single(r)?.digest())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(name: &str) -> Method {
        name.parse().unwrap()
    }

    #[test]
    fn lists_parse() {
        assert_eq!(parse_methods("none,zlib, zstd,qatzip").unwrap(), Method::all().collect::<Vec<_>>());
        assert_eq!(parse_channels("1,2,4,8,16").unwrap(), vec![1, 2, 4, 8, 16]);
        assert_eq!(parse_levels("1,3,3").unwrap(), vec![1, 3]);
    }

    #[test]
    fn list_errors_are_clear() {
        let e = parse_methods("none,lz4").unwrap_err().to_string();
        assert!(e.contains("--methods") && e.contains("lz4"), "{e}");
        let e = parse_methods("zstd,zstd").unwrap_err().to_string();
        assert!(e.contains("twice"), "{e}");
        let e = parse_channels("1,,2").unwrap_err().to_string();
        assert!(e.contains("--channels") && e.contains("empty"), "{e}");
        let e = parse_channels("0").unwrap_err().to_string();
        assert!(e.contains("out of range"), "{e}");
        let e = parse_channels("two").unwrap_err().to_string();
        assert!(e.contains("'two' is not a number"), "{e}");
        let e = parse_levels("x").unwrap_err().to_string();
        assert!(e.contains("--levels"), "{e}");
    }

    #[test]
    fn matrix_methods_take_auto() {
        let v = matrix_methods("auto,none,zstd", &[1, 3]).unwrap();
        let (none, zstd): (Method, Method) = ("none".parse().unwrap(), "zstd".parse().unwrap());
        assert_eq!(v, [(BenchMethod::Auto, 0), (none.into(), 0), (zstd.into(), 1), (zstd.into(), 3)]);
        assert_eq!(v[0].0.to_string(), "auto");
        assert!(matrix_methods("auto,lz4", &[]).is_err());
    }

    #[test]
    fn levels_per_method() {
        let v = method_levels(&[named("none"), named("zstd"), named("zlib")], &[1, 12]);
        assert_eq!(v, vec![(named("none"), 0), (named("zstd"), 1), (named("zstd"), 12), (named("zlib"), 1)]);
        assert_eq!(method_levels(&[named("zlib")], &[]), vec![(named("zlib"), 1)]);
    }

    #[test]
    fn image_target_len() {
        assert_eq!(target_len(100, 8192), 8192);
        assert_eq!(target_len(8192, 8192), 8192);
        assert_eq!(target_len(10_000, 8192), 12_288);
        assert_eq!(target_len(1 << 30, 4096), 1 << 30);
    }

    #[test]
    fn copy_repeats_and_pads() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::write(&src, b"abcde").unwrap();
        let dst = dir.path().join("dst");
        let (n, how) = copy_image(&src, &dst, 8192).unwrap();
        assert_eq!((n, how), (8192, "repeated to --size"));
        let got = std::fs::read(&dst).unwrap();
        assert_eq!(got.len(), 8192);
        assert_eq!(&got[..12], b"abcdeabcdeab");
        assert_eq!(got[8191], b"abcde"[8191 % 5]);
        let big: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        std::fs::write(&src, &big).unwrap();
        let (n, _) = copy_image(&src, &dst, 4096).unwrap();
        assert_eq!(n, 8192);
        let got = std::fs::read(&dst).unwrap();
        assert_eq!(&got[..5000], &big[..]);
        assert!(got[5000..].iter().all(|&b| b == 0));
    }
}

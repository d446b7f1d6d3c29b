//! `pageferry bench codecs`: what each method costs by itself, and what the engine adds.
//!
//! For each (method, level): one codec from `pageferry::codec::open`, on this thread, over the
//! image's 512 KiB batches (the engine's batch size; every batch compressed on its own, zero
//! pages included): compress all of them, then decompress all of them and check the result
//! equals the image. CPU time is this thread's (`getrusage(RUSAGE_THREAD)`), so MB/s is per
//! core. Then, unless `--no-migrate`, one migration of the same image between two processes
//! (unlimited loopback, `--channels` channels, engine digest off — the two files are compared
//! with xxh3 instead, so hashing does not count as overhead), and the engine's CPU-seconds per
//! GiB beside the bare ones: overhead % = (engine − bare) / bare.

use super::link::Link;
use super::matrix::{self, Case, RunEnv, RunRecord};
use super::metrics::cpu_s_per_gib;
use super::ImageOpts;
use anyhow::{bail, Context, Result};
use pageferry::codec::{self, MAX_BATCH_BYTES};
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct CodecsArgs {
    #[command(flatten)]
    image: ImageOpts,
    /// Compression methods (comma-separated).
    #[arg(long, default_value = "none,zlib,zstd,qatzip")]
    methods: String,
    /// Levels to measure each compressing method at (comma-separated; default: each
    /// method's default level, 1; zstd's fast levels are negative, e.g. -5,1).
    #[arg(long, allow_hyphen_values = true)]
    levels: Option<String>,
    /// Channels of the engine migration next to the bare numbers.
    #[arg(long, default_value_t = 2)]
    channels: usize,
    /// Only the bare codec numbers, no engine migration.
    #[arg(long = "no-migrate")]
    no_migrate: bool,
    /// qatzip provider: auto, qat, cpu.
    #[arg(long = "qatzip-provider", default_value = "auto")]
    qatzip_provider: String,
    /// Print JSON lines instead of the markdown table.
    #[arg(long)]
    json: bool,
    /// Directory for codecs.md and codecs.jsonl.
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
}

/// CPU time of the calling thread (user + system), seconds.
pub fn thread_cpu_s() -> f64 {
    // SAFETY: getrusage fills the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Bare codec numbers for one (method, level).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Bare {
    pub method: String,
    pub level: i32,
    pub provider: String,
    pub bytes: u64,
    /// Payload bytes, batches the codec declined counted at their raw size.
    pub compressed_bytes: u64,
    pub raw_batches: u64,
    pub compress_cpu_s: f64,
    pub compress_wall_s: f64,
    pub decompress_cpu_s: f64,
    pub decompress_wall_s: f64,
}

impl Bare {
    pub fn ratio(&self) -> f64 {
        if self.compressed_bytes > 0 {
            self.bytes as f64 / self.compressed_bytes as f64
        } else {
            0.0
        }
    }
    /// Decimal MB (10^6 bytes) per CPU-second; None when no CPU time was measurable (method
    /// none compresses nothing).
    fn mb_per_cpu_s(bytes: u64, cpu_s: f64) -> Option<f64> {
        if cpu_s > 0.0 {
            Some(bytes as f64 / 1e6 / cpu_s)
        } else {
            None
        }
    }
    pub fn compress_mb_s(&self) -> Option<f64> {
        Self::mb_per_cpu_s(self.bytes, self.compress_cpu_s)
    }
    /// For method none (and batches a codec declined) this is the copy the destination does.
    pub fn decompress_mb_s(&self) -> Option<f64> {
        Self::mb_per_cpu_s(self.bytes, self.decompress_cpu_s)
    }
    pub fn compress_cpu_s_per_gib(&self) -> f64 {
        cpu_s_per_gib(self.compress_cpu_s, self.bytes)
    }
    pub fn decompress_cpu_s_per_gib(&self) -> f64 {
        cpu_s_per_gib(self.decompress_cpu_s, self.bytes)
    }
}

/// Engine overhead over the bare codec, in %; None when the bare cost is too small to divide
/// by (method none).
pub fn overhead_pct(engine: f64, bare: f64) -> Option<f64> {
    if bare > 1e-3 {
        Some((engine - bare) / bare * 100.0)
    } else {
        None
    }
}

/// Compress every 512 KiB batch of `data`, then decompress them all and check the result.
pub fn measure(spec: &codec::CodecSpec, data: &[u8]) -> Result<Bare> {
    let mut c = codec::open(spec)?;
    let info = c.info();
    if let Some(note) = &info.note {
        eprintln!("{note}");
    }
    let cap = c.max_compressed_len(MAX_BATCH_BYTES);
    let batches = data.len().div_ceil(MAX_BATCH_BYTES);
    // Output space touched up front so page faults do not count as codec time.
    let mut store = vec![1u8; batches * cap];
    let mut sizes: Vec<Option<usize>> = Vec::with_capacity(batches);
    let (cpu0, wall0) = (thread_cpu_s(), Instant::now());
    for (i, chunk) in data.chunks(MAX_BATCH_BYTES).enumerate() {
        sizes.push(c.compress(chunk, &mut store[i * cap..(i + 1) * cap])?);
    }
    let (compress_cpu_s, compress_wall_s) = (thread_cpu_s() - cpu0, wall0.elapsed().as_secs_f64());

    let mut back = vec![1u8; data.len()];
    let (cpu0, wall0) = (thread_cpu_s(), Instant::now());
    for (i, (chunk, size)) in back.chunks_mut(MAX_BATCH_BYTES).zip(&sizes).enumerate() {
        match size {
            Some(n) => c.decompress(&store[i * cap..i * cap + n], chunk)?,
            // Declined batches travel raw: the destination copies them.
            None => chunk.copy_from_slice(&data[i * MAX_BATCH_BYTES..i * MAX_BATCH_BYTES + chunk.len()]),
        }
    }
    let (decompress_cpu_s, decompress_wall_s) = (thread_cpu_s() - cpu0, wall0.elapsed().as_secs_f64());
    if back != data {
        bail!("{} level {}: decompressed data differs from the input", spec.method, spec.level);
    }
    let compressed_bytes = data
        .chunks(MAX_BATCH_BYTES)
        .zip(&sizes)
        .map(|(chunk, s)| s.unwrap_or(chunk.len()) as u64)
        .sum();
    Ok(Bare {
        method: info.method.name().into(),
        level: info.level,
        provider: info.provider,
        bytes: data.len() as u64,
        compressed_bytes,
        raw_batches: sizes.iter().filter(|s| s.is_none()).count() as u64,
        compress_cpu_s,
        compress_wall_s,
        decompress_cpu_s,
        decompress_wall_s,
    })
}

/// One row: the bare numbers and, when migrated, the engine's.
pub struct Row {
    pub bare: Bare,
    pub engine: Option<RunRecord>,
    pub engine_error: Option<String>,
}

impl Row {
    fn overheads(&self) -> (Option<f64>, Option<f64>) {
        match &self.engine {
            Some(e) => (
                overhead_pct(e.metrics.send_cpu_s_per_gib, self.bare.compress_cpu_s_per_gib()),
                overhead_pct(e.metrics.recv_cpu_s_per_gib, self.bare.decompress_cpu_s_per_gib()),
            ),
            None => (None, None),
        }
    }
}

fn opt(v: Option<f64>, decimals: usize) -> String {
    v.map(|x| format!("{x:.decimals$}")).unwrap_or_else(|| "—".into())
}

pub fn markdown(rows: &[Row]) -> String {
    let mut s = String::from(
        "| method | level | provider | ratio | compress MB/s per core | decompress MB/s per core | compress CPU-s/GiB | decompress CPU-s/GiB | engine send CPU-s/GiB | engine recv CPU-s/GiB | send overhead % | recv overhead % |\n\
         |---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let b = &r.bare;
        let (so, ro) = r.overheads();
        let e = r.engine.as_ref().map(|e| e.metrics);
        s.push_str(&format!(
            "| {} | {} | {} | {:.2} | {} | {} | {:.2} | {:.2} | {} | {} | {} | {} |\n",
            b.method,
            b.level,
            b.provider,
            b.ratio(),
            opt(b.compress_mb_s(), 0),
            opt(b.decompress_mb_s(), 0),
            b.compress_cpu_s_per_gib(),
            b.decompress_cpu_s_per_gib(),
            opt(e.map(|m| m.send_cpu_s_per_gib), 2),
            opt(e.map(|m| m.recv_cpu_s_per_gib), 2),
            opt(so, 0),
            opt(ro, 0),
        ));
    }
    for r in rows.iter().filter(|r| r.engine_error.is_some()) {
        s.push_str(&format!("\nEngine migration of {} level {} failed: {}\n", r.bare.method, r.bare.level, r.engine_error.as_deref().unwrap_or("")));
    }
    s
}

pub fn json_lines(rows: &[Row]) -> Result<String> {
    let mut s = String::new();
    for r in rows {
        let b = &r.bare;
        let (so, ro) = r.overheads();
        let v = serde_json::json!({
            "bare": b,
            "ratio": b.ratio(),
            "compress_mb_s_per_core": b.compress_mb_s(),
            "decompress_mb_s_per_core": b.decompress_mb_s(),
            "compress_cpu_s_per_gib": b.compress_cpu_s_per_gib(),
            "decompress_cpu_s_per_gib": b.decompress_cpu_s_per_gib(),
            "engine": r.engine,
            "engine_error": r.engine_error,
            "send_overhead_pct": so,
            "recv_overhead_pct": ro,
        });
        s.push_str(&serde_json::to_string(&v)?);
        s.push('\n');
    }
    Ok(s)
}

pub fn run(a: CodecsArgs) -> Result<()> {
    let methods = super::parse_methods(&a.methods)?;
    let levels = match &a.levels {
        Some(s) => super::parse_levels(s)?,
        None => Vec::new(),
    };
    if a.channels == 0 || a.channels > 256 {
        bail!("--channels must be between 1 and 256");
    }
    let img = super::prepare_image(&a.image, 256 << 20, "codecs-src")?;
    let data = std::fs::read(&img.path).with_context(|| format!("reading {}", img.path.display()))?;
    let dst = super::shm_path("codecs-dst");
    super::link::register_file(&dst);
    let _dst_guard = super::PreparedImage { path: dst.clone(), bytes: 0, desc: String::new() };
    let exe = std::env::current_exe().context("locating the pageferry binary")?;
    let env = RunEnv {
        exe,
        src: &img.path,
        dst,
        tc: None,
        dirty_rate: None,
        dirty_set: None,
        qatzip_provider: a.qatzip_provider.clone(),
        no_engine_verify: true,
        file_check: true,
        tls_creds: None,
    };

    let mut rows = Vec::new();
    for (m, l) in super::method_levels(&methods, &levels) {
        let spec = super::spec_for(m, l, &a.qatzip_provider)?;
        eprintln!("pageferry bench codecs: {m} level {l}: bare codec on {} MiB ...", img.bytes >> 20);
        let bare = match measure(&spec, &data) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("pageferry bench codecs: skipping {m} level {l}: {e:#}");
                continue;
            }
        };
        let (engine, engine_error) = if a.no_migrate {
            (None, None)
        } else {
            eprintln!("pageferry bench codecs: {m} level {l}: engine migration, {} channels, unlimited link ...", a.channels);
            let case = Case { method: m.into(), level: l, channels: a.channels, link: Link::Unlimited, tls: false };
            match matrix::run_once(&env, &case, &|_| {}) {
                Ok(r) if r.file_check == "match" => (Some(r), None),
                Ok(r) => (None, Some(format!("destination file differs from the source (file check: {})", r.file_check))),
                Err(e) => (None, Some(format!("{e:#}"))),
            }
        };
        if let Some(e) = &engine_error {
            eprintln!("pageferry bench codecs: engine migration of {m} level {l} failed: {e}");
        }
        rows.push(Row { bare, engine, engine_error });
    }
    if rows.is_empty() {
        bail!("no method could be measured");
    }
    let table = markdown(&rows);
    let jsonl = json_lines(&rows)?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let meta = super::render::Meta::new(&img.desc, img.bytes, 1, &[]);
    std::fs::write(a.out.join("codecs.md"), format!("{}\n{}", meta.header_markdown(), table))?;
    std::fs::write(a.out.join("codecs.jsonl"), &jsonl)?;
    if a.json {
        print!("{jsonl}");
    } else {
        print!("{table}");
    }
    eprintln!("pageferry bench codecs: wrote {} (codecs.md, codecs.jsonl)", a.out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use pageferry::codec::{CodecSpec, Method};
    use pageferry_image::{fill, ImageKind, DEFAULT_SEED};

    #[test]
    fn bare_round_trip_and_numbers() {
        let mut data = vec![0u8; 4 << 20];
        fill(ImageKind::SilesiaLike, DEFAULT_SEED, 0, &mut data);
        let b = measure(&CodecSpec::with_level("zstd".parse::<Method>().unwrap(), 1).unwrap(), &data).unwrap();
        assert_eq!(b.bytes, 4 << 20);
        assert!(b.ratio() > 1.5, "{b:?}");
        assert!(b.compress_cpu_s >= 0.0 && b.decompress_cpu_s >= 0.0);
        let n = measure(&CodecSpec::new("none".parse::<Method>().unwrap()), &data).unwrap();
        assert_eq!(n.raw_batches, 8);
        assert_eq!(n.ratio(), 1.0);
    }

    #[test]
    fn overhead() {
        assert_eq!(overhead_pct(1.5, 1.0), Some(50.0));
        assert_eq!(overhead_pct(0.9, 1.0).map(|v| v.round()), Some(-10.0));
        assert_eq!(overhead_pct(0.2, 0.0), None);
        let b = Bare { bytes: 1 << 30, compress_cpu_s: 2.0, decompress_cpu_s: 0.5, compressed_bytes: 1 << 28, ..Default::default() };
        assert_eq!(b.compress_cpu_s_per_gib(), 2.0);
        assert_eq!(b.decompress_cpu_s_per_gib(), 0.5);
        assert_eq!(b.ratio(), 4.0);
        assert!((b.compress_mb_s().unwrap() - 536.870912).abs() < 1e-9);
        assert_eq!(Bare { bytes: 1 << 30, ..Default::default() }.compress_mb_s(), None);
    }

    #[test]
    fn table_and_json_shape() {
        let b = Bare { method: "zstd".into(), level: 1, provider: "zstd".into(), bytes: 1 << 30, compressed_bytes: 1 << 28, compress_cpu_s: 2.0, decompress_cpu_s: 1.0, ..Default::default() };
        let rows = vec![Row { bare: b, engine: None, engine_error: Some("boom".into()) }];
        let t = markdown(&rows);
        assert_eq!(t.lines().filter(|l| l.starts_with('|')).count(), 3);
        assert!(t.contains("| zstd | 1 | zstd | 4.00 |"), "{t}");
        assert!(t.contains("failed: boom"));
        let j: serde_json::Value = serde_json::from_str(json_lines(&rows).unwrap().trim()).unwrap();
        assert_eq!(j["ratio"], 4.0);
        assert_eq!(j["compress_cpu_s_per_gib"], 2.0);
        assert!(j["engine"].is_null());
        assert_eq!(j["bare"]["method"], "zstd");
    }
}

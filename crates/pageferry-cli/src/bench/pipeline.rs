//! `pageferry bench pipeline`: pipelining keeps an accelerator busy, shown without hardware.
//!
//! The source offloads qatzip to the fake QATzip library (crates/fake-qatzip) with a simulated
//! device: `FAKE_QZ_DEVICE=instances=K,latency_us=L` makes every 64 KiB request hold one of K
//! process-wide slots for L µs while the calling thread sleeps (no host CPU), so the device
//! moves at most K × 64 KiB / L bytes per second, however many threads call it. A channel
//! worker compresses one 512 KiB batch per call, its 8 requests one after another (the
//! library's default `inflight=1`), so one worker alone keeps one slot busy: throughput grows
//! with the workers, channels × `--pipeline-depth`, until they cover the K slots.
//!
//! Each case (channels C, depth D) is a real two-process migration through
//! [`matrix::run_once_with`]: `recv` decoding with the `cpu` provider, `send` with
//! `--qatzip-provider qat --qatzip-lib <fake> --pipeline-depth D --multifd-channels C
//! --no-verify`, the device variables set for the source process only; the two image files
//! are compared with xxh3-128 afterwards. Output: a markdown table (rows channels, columns
//! depth), JSON lines, `pipeline.svg`, and a conclusion line: the fewest channels at which
//! each depth reaches [`THRESHOLD_PCT`] % of the device's capacity.

use super::link::Link;
use super::matrix::{self, Case, RunEnv, RunRecord, SourceExtras};
use super::render::Meta;
use super::ImageOpts;
use anyhow::{bail, Context, Result};
use pageferry::codec::{Method, MAX_BATCH_BYTES};
use plotters::prelude::*;
use serde_json::json;
use std::path::{Path, PathBuf};

/// Bytes of one request on the simulated device (the fake library's hardware buffer).
pub const REQUEST_BYTES: u64 = 64 * 1024;
/// A depth "reaches the device's capacity" at this utilisation.
pub const THRESHOLD_PCT: f64 = 90.0;
/// Environment variable naming the fake library (as for the codec tests).
pub const FAKE_LIB_ENV: &str = "PAGEFERRY_FAKE_QATZIP";
const FAKE_LIB_NAME: &str = "libfake_qatzip.so";
const DEFAULT_SIZE: u64 = 128 << 20;

#[derive(clap::Args)]
pub struct PipelineArgs {
    /// The simulated device: instances=K,latency_us=L[,inflight=P] (the fake library's
    /// FAKE_QZ_DEVICE; P: requests one compress call keeps on the device at once, default 1).
    /// Capacity K × 64 KiB / L; the default is 32.8 MB/s, well below what 2 cores feed.
    #[arg(long, default_value = "instances=6,latency_us=12000")]
    device: String,
    /// Channel counts (comma-separated).
    #[arg(long, default_value = "1,2,4,8")]
    channels: String,
    /// Pipeline depths (comma-separated, each 1..=64).
    #[arg(long, default_value = "1,2,4")]
    depths: String,
    #[command(flatten)]
    image: ImageOpts,
    /// The fake QATzip library (default: $PAGEFERRY_FAKE_QATZIP, else libfake_qatzip.so next
    /// to this binary, where `cargo build --release -p fake-qatzip` puts it).
    #[arg(long = "fake-lib")]
    fake_lib: Option<PathBuf>,
    /// Print JSON lines (one object per case, then a summary) instead of the markdown table.
    #[arg(long)]
    json: bool,
    /// Directory for pipeline.md, pipeline.jsonl and pipeline.svg.
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
}

/// The simulated device of the fake library.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Device {
    pub instances: u64,
    pub latency_us: u64,
    /// Requests one compress call keeps on the device at once (the library's default: 1).
    pub inflight: Option<u64>,
}

impl Device {
    pub fn parse(s: &str) -> Result<Self> {
        let (mut instances, mut latency_us, mut inflight) = (None, None, None);
        for item in super::split_list("--device", s)? {
            let Some((k, v)) = item.split_once('=') else {
                bail!("--device: '{item}' is not key=value (expected instances=K,latency_us=L[,inflight=P])");
            };
            let n: u64 = v.trim().parse().map_err(|_| anyhow::anyhow!("--device: '{item}': '{}' is not a whole number", v.trim()))?;
            if n == 0 {
                bail!("--device: {} must be at least 1", k.trim());
            }
            let slot = match k.trim() {
                "instances" => &mut instances,
                "latency_us" => &mut latency_us,
                "inflight" => &mut inflight,
                other => bail!("--device: unknown key '{other}' (expected instances, latency_us, inflight)"),
            };
            if slot.replace(n).is_some() {
                bail!("--device: {} given twice", k.trim());
            }
        }
        match (instances, latency_us) {
            (Some(instances), Some(latency_us)) => Ok(Self { instances, latency_us, inflight }),
            _ => bail!("--device: both instances=K and latency_us=L are needed (got '{s}')"),
        }
    }

    /// The value of FAKE_QZ_DEVICE.
    pub fn env_value(&self) -> String {
        let mut s = format!("instances={},latency_us={}", self.instances, self.latency_us);
        if let Some(p) = self.inflight {
            s.push_str(&format!(",inflight={p}"));
        }
        s
    }

    /// Input bytes per second the device can take: K requests of 64 KiB per latency.
    pub fn capacity(&self) -> f64 {
        self.instances as f64 * REQUEST_BYTES as f64 * 1e6 / self.latency_us as f64
    }

    /// The model's throughput with `workers` compression workers and no host time at all: each
    /// worker keeps min(inflight, requests per batch) slots busy, up to K.
    pub fn ideal(&self, workers: usize) -> f64 {
        let per_call = self.inflight.unwrap_or(1).min(MAX_BATCH_BYTES as u64 / REQUEST_BYTES);
        let busy = (workers as u64 * per_call).min(self.instances);
        self.capacity() * busy as f64 / self.instances as f64
    }

    pub fn describe(&self) -> String {
        format!(
            "{} instances x {} us per 64 KiB request{} = capacity {:.1} MB/s",
            self.instances,
            self.latency_us,
            self.inflight.map(|p| format!(" (up to {p} in flight per call)")).unwrap_or_default(),
            self.capacity() / 1e6
        )
    }
}

/// `--depths 1,2,4`.
pub fn parse_depths(s: &str) -> Result<Vec<usize>> {
    let mut out = Vec::new();
    for item in super::split_list("--depths", s)? {
        let n: usize = item.parse().map_err(|_| anyhow::anyhow!("--depths: '{item}' is not a number (expected e.g. 1,2,4)"))?;
        if n == 0 || n > 64 {
            bail!("--depths: {n} is out of range 1..=64");
        }
        if out.contains(&n) {
            bail!("--depths: {n} given twice");
        }
        out.push(n);
    }
    Ok(out)
}

/// The fake library: `--fake-lib`, else `$PAGEFERRY_FAKE_QATZIP`, else next to this binary.
fn locate_fake_lib(flag: Option<&Path>) -> Result<PathBuf> {
    let (path, how) = match (flag, std::env::var_os(FAKE_LIB_ENV).filter(|v| !v.is_empty())) {
        (Some(p), _) => (p.to_path_buf(), "--fake-lib".to_string()),
        (None, Some(p)) => (PathBuf::from(p), format!("${FAKE_LIB_ENV}")),
        (None, None) => {
            let exe = std::env::current_exe().context("locating the pageferry binary")?;
            let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
            (dir.join(FAKE_LIB_NAME), "next to the pageferry binary".to_string())
        }
    };
    if !path.is_file() {
        bail!(
            "the fake QATzip library is not at {} ({how}); build it with `cargo build --release -p fake-qatzip` \
             (cargo puts {FAKE_LIB_NAME} next to target/release/pageferry), or point --fake-lib or ${FAKE_LIB_ENV} at it",
            path.display()
        );
    }
    path.canonicalize().with_context(|| format!("resolving {}", path.display()))
}

/// One (channels, depth) case and how it went.
#[derive(Clone, Debug)]
pub struct PipeResult {
    pub channels: usize,
    pub depth: usize,
    /// The run, when it succeeded and was verified.
    pub run: Option<RunRecord>,
    pub reason: Option<String>,
}

impl PipeResult {
    /// Guest memory per second, bytes (zero pages included).
    pub fn rate(&self) -> Option<f64> {
        let r = &self.run.as_ref()?.report;
        (r.total_time_s > 0.0).then(|| r.raw_bytes as f64 / r.total_time_s)
    }
    /// Bytes per second that went through the device (the non-zero pages).
    pub fn device_rate(&self) -> Option<f64> {
        let r = &self.run.as_ref()?.report;
        (r.total_time_s > 0.0).then(|| (r.normal_pages * pageferry::memory::PAGE_SIZE as u64) as f64 / r.total_time_s)
    }
    /// Device utilisation, % of capacity.
    pub fn utilisation(&self, dev: &Device) -> Option<f64> {
        Some(self.device_rate()? / dev.capacity() * 100.0)
    }
}

/// For each depth (in `depths` order): the fewest channels at which it reached
/// [`THRESHOLD_PCT`], else None.
pub fn reached(results: &[PipeResult], depths: &[usize], dev: &Device) -> Vec<(usize, Option<usize>)> {
    depths
        .iter()
        .map(|&d| {
            let first = results
                .iter()
                .filter(|r| r.depth == d && r.utilisation(dev).is_some_and(|u| u >= THRESHOLD_PCT))
                .map(|r| r.channels)
                .min();
            (d, first)
        })
        .collect()
}

/// The one-line conclusion, from the measured cases.
pub fn conclusion(results: &[PipeResult], depths: &[usize], dev: &Device) -> String {
    let parts: Vec<String> = reached(results, depths, dev)
        .into_iter()
        .map(|(d, first)| match first {
            Some(c) => format!("depth {d}: {c} channel{}", if c == 1 { "" } else { "s" }),
            None => {
                let best = results
                    .iter()
                    .filter(|r| r.depth == d)
                    .filter_map(|r| Some((r.utilisation(dev)?, r.channels)))
                    .max_by(|a, b| a.0.total_cmp(&b.0));
                match best {
                    Some((u, c)) => format!("depth {d}: not reached (best {u:.0}% at {c} channel{})", if c == 1 { "" } else { "s" }),
                    None => format!("depth {d}: not reached (no successful case)"),
                }
            }
        })
        .collect();
    let mut s = format!("Fewest channels reaching {THRESHOLD_PCT:.0}% of the device's {:.1} MB/s: {}", dev.capacity() / 1e6, parts.join("; "));
    let has = |f: fn(&usize) -> bool| depths.iter().any(f);
    if has(|d| *d == 1) && has(|d| *d >= 2) {
        s.push_str(match deeper_needs_fewer(results, depths, dev) {
            Some(true) => ". Depth >= 2 needs fewer channels than depth 1.",
            Some(false) => ". Depth >= 2 does NOT need fewer channels than depth 1 here.",
            None => ". Inconclusive: neither depth 1 nor some deeper depth reached it at these channel counts.",
        });
    }
    s
}

/// Whether every depth ≥ 2 reached the threshold with fewer channels than depth 1 (not
/// reaching it counts as needing more channels than were tried). None when that cannot be
/// told: no depth 1 or no deeper depth, or a deeper depth and depth 1 both not reaching it
/// (and no deeper depth contradicting).
fn deeper_needs_fewer(results: &[PipeResult], depths: &[usize], dev: &Device) -> Option<bool> {
    let r = reached(results, depths, dev);
    let one = r.iter().find(|(d, _)| *d == 1)?.1;
    let verdicts: Vec<Option<bool>> = r
        .iter()
        .filter(|(d, _)| *d >= 2)
        .map(|(_, c)| match (c, one) {
            (Some(c), Some(o)) => Some(*c < o),
            (Some(_), None) => Some(true),
            (None, Some(_)) => Some(false),
            (None, None) => None,
        })
        .collect();
    if verdicts.is_empty() {
        None
    } else if verdicts.contains(&Some(false)) {
        Some(false)
    } else if verdicts.iter().all(|v| *v == Some(true)) {
        Some(true)
    } else {
        None
    }
}

/// Rows channels, columns depth; cells "MB/s (% of capacity)".
pub fn markdown_table(results: &[PipeResult], channels: &[usize], depths: &[usize], dev: &Device) -> String {
    let mut s = String::from("| channels |");
    for d in depths {
        s.push_str(&format!(" depth {d} |"));
    }
    s.push_str("\n|---:|");
    s.push_str(&"---:|".repeat(depths.len()));
    s.push('\n');
    for &c in channels {
        s.push_str(&format!("| {c} |"));
        for &d in depths {
            let cell = match results.iter().find(|r| r.channels == c && r.depth == d) {
                Some(r) => match (r.rate(), r.utilisation(dev)) {
                    (Some(mb), Some(u)) => format!("{:.1} MB/s ({u:.0}%)", mb / 1e6),
                    _ => format!("FAILED: {}", r.reason.clone().unwrap_or_default().replace('|', "/")),
                },
                None => "—".into(),
            };
            s.push_str(&format!(" {cell} |"));
        }
        s.push('\n');
    }
    s
}

pub fn case_json(r: &PipeResult, dev: &Device) -> Result<serde_json::Value> {
    let mb = |v: Option<f64>| v.map(|v| v / 1e6);
    Ok(json!({
        "type": "case",
        "channels": r.channels,
        "depth": r.depth,
        "workers": r.channels * r.depth,
        "status": if r.run.is_some() { "ok" } else { "failed" },
        "reason": r.reason,
        "mb_s": mb(r.rate()),
        "device_mb_s": mb(r.device_rate()),
        "utilisation_pct": r.utilisation(dev),
        "ideal_mb_s": dev.ideal(r.channels * r.depth) / 1e6,
        "capacity_mb_s": dev.capacity() / 1e6,
        "run": r.run.as_ref().map(serde_json::to_value).transpose()?,
    }))
}

pub fn summary_json(results: &[PipeResult], depths: &[usize], dev: &Device) -> serde_json::Value {
    let reached: Vec<serde_json::Value> = reached(results, depths, dev).into_iter().map(|(d, c)| json!({"depth": d, "channels": c})).collect();
    json!({
        "type": "summary",
        "device": dev.env_value(),
        "instances": dev.instances,
        "latency_us": dev.latency_us,
        "inflight": dev.inflight.unwrap_or(1),
        "capacity_mb_s": dev.capacity() / 1e6,
        "threshold_pct": THRESHOLD_PCT,
        "reached": reached,
        "deeper_needs_fewer_channels": deeper_needs_fewer(results, depths, dev),
        "conclusion": conclusion(results, depths, dev),
    })
}

const DEPTH_COLORS: [RGBColor; 6] =
    [RGBColor(31, 119, 180), RGBColor(255, 127, 14), RGBColor(44, 160, 44), RGBColor(214, 39, 40), RGBColor(148, 103, 189), RGBColor(140, 86, 75)];

/// Throughput (y) against channels (x, evenly spaced), one line per depth, and the device's
/// capacity as a dashed horizontal line.
pub fn write_chart(path: &Path, results: &[PipeResult], channels: &[usize], depths: &[usize], dev: &Device) -> Result<()> {
    let cap = dev.capacity() / 1e6;
    let n = channels.len().max(1) as f64;
    let mut series = vec![super::charts::Series {
        label: format!("device capacity {cap:.1} MB/s"),
        color: RGBColor(110, 110, 110),
        dashed: true,
        markers: false,
        points: vec![(-0.4, cap), (n - 0.6, cap)],
    }];
    for (i, &d) in depths.iter().enumerate() {
        let points = channels
            .iter()
            .enumerate()
            .filter_map(|(x, &c)| Some((x as f64, results.iter().find(|r| r.channels == c && r.depth == d)?.rate()? / 1e6)))
            .collect();
        series.push(super::charts::Series { label: format!("depth {d}"), color: DEPTH_COLORS[i % DEPTH_COLORS.len()], dashed: false, markers: true, points });
    }
    let labels: Vec<String> = channels.iter().map(|c| c.to_string()).collect();
    let title = format!("qatzip on a simulated device: {} x {} us per 64 KiB", dev.instances, dev.latency_us);
    super::charts::line_chart(path, &title, "channels", "MB/s of guest memory", &labels, &series)
}

pub fn run(a: PipelineArgs) -> Result<()> {
    let dev = Device::parse(&a.device)?;
    let channels = super::parse_channels(&a.channels)?;
    let depths = parse_depths(&a.depths)?;
    let lib = locate_fake_lib(a.fake_lib.as_deref())?;
    let img = super::prepare_image(&a.image, DEFAULT_SIZE, "src")?;
    let dst = super::shm_path("dst");
    super::link::register_file(&dst);
    let _dst_guard = super::PreparedImage { path: dst.clone(), bytes: 0, desc: String::new() };
    let env = RunEnv {
        exe: std::env::current_exe().context("locating the pageferry binary")?,
        src: &img.path,
        dst,
        tc: None,
        dirty_rate: None,
        dirty_set: None,
        // The destination decodes on the CPU; the source's provider is in the extras.
        qatzip_provider: "cpu".into(),
        no_engine_verify: true,
        file_check: true,
        tls_creds: None,
    };
    let guess: f64 = depths.iter().flat_map(|&d| channels.iter().map(move |&c| img.bytes as f64 / dev.ideal(c * d) + 0.5)).sum();
    eprintln!(
        "pageferry bench pipeline: {} cases (channels {channels:?} x depths {depths:?}) on {}; device {}; library {}; at least {:.0} s",
        channels.len() * depths.len(),
        img.desc,
        dev.describe(),
        lib.display(),
        guess
    );

    let total = channels.len() * depths.len();
    let mut results = Vec::new();
    for &d in &depths {
        for &c in &channels {
            let case = Case { method: "qatzip".parse::<Method>()?.into(), level: 1, channels: c, link: Link::Unlimited, tls: false };
            let extras = SourceExtras {
                qatzip_provider: Some("qat".into()),
                args: vec!["--qatzip-lib".into(), lib.display().to_string(), "--pipeline-depth".into(), d.to_string()],
                env: vec![("FAKE_QZ_DEVICE".into(), dev.env_value()), ("FAKE_QZ_HW".into(), "1".into())],
            };
            eprintln!("pageferry bench pipeline: [{}/{total}] depth {d}, {c} channel(s) ...", results.len() + 1);
            let mut res = PipeResult { channels: c, depth: d, run: None, reason: None };
            match matrix::run_once_with(&env, &case, &|_| {}, &extras) {
                Ok(r) => {
                    res.run = Some(r);
                    let r = res.run.as_ref().expect("just set");
                    let util = res.utilisation(&dev).unwrap_or(0.0);
                    let problem = if r.file_check != "match" {
                        Some(format!("the destination image differs from the source (file check: {})", r.file_check))
                    } else if !r.report.provider.contains("hardware") {
                        Some(format!("the source's qatzip provider was '{}', not the simulated hardware", r.report.provider))
                    } else if r.report.pipeline_depth != d {
                        Some(format!("the source ran at pipeline depth {}, not {d}", r.report.pipeline_depth))
                    } else if util > 110.0 {
                        Some(format!("{util:.0}% of the device's capacity: the library does not simulate the device (is it the one built from crates/fake-qatzip?)"))
                    } else {
                        None
                    };
                    match problem {
                        None => eprintln!(
                            "pageferry bench pipeline:   {:.1} MB/s ({util:.0}% of capacity; {:.0}% in the model without host time), files match",
                            res.rate().unwrap_or(0.0) / 1e6,
                            dev.ideal(c * d) / dev.capacity() * 100.0
                        ),
                        Some(why) => {
                            eprintln!("pageferry bench pipeline:   failed: {why}");
                            res.run = None;
                            res.reason = Some(why);
                        }
                    }
                }
                Err(e) => {
                    let why = format!("{e:#}");
                    eprintln!("pageferry bench pipeline:   failed: {why}");
                    res.reason = Some(why);
                }
            }
            results.push(res);
        }
    }

    let meta = Meta::new(&img.desc, img.bytes, 1, &[]);
    let table = markdown_table(&results, &channels, &depths, &dev);
    let concl = conclusion(&results, &depths, &dev);
    let device_line = format!("Simulated device: {} (FAKE_QZ_DEVICE={}). Cells: MB/s of guest memory (% of the device's capacity used).", dev.describe(), dev.env_value());
    let mut jsonl = String::new();
    for r in &results {
        jsonl.push_str(&serde_json::to_string(&case_json(r, &dev)?)?);
        jsonl.push('\n');
    }
    jsonl.push_str(&serde_json::to_string(&summary_json(&results, &depths, &dev))?);
    jsonl.push('\n');
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let md = format!(
        "# pageferry bench pipeline\n\n- date: {} UTC\n- machine: {} cores ({})\n- command: `{}`\n- image: {} ({} bytes)\n\n{device_line}\n\n{table}\n{concl}\n",
        meta.date_utc, meta.cores, meta.cpu_model, meta.command, meta.image, meta.image_bytes
    );
    std::fs::write(a.out.join("pipeline.md"), md)?;
    std::fs::write(a.out.join("pipeline.jsonl"), &jsonl)?;
    write_chart(&a.out.join("pipeline.svg"), &results, &channels, &depths, &dev)?;
    if a.json {
        print!("{jsonl}");
    } else {
        print!("{device_line}\n\n{table}\n{concl}\n");
    }
    eprintln!("pageferry bench pipeline: wrote {} (pipeline.md, pipeline.jsonl, pipeline.svg)", a.out.display());
    let failed = results.iter().filter(|r| r.run.is_none()).count();
    if failed > 0 {
        bail!("{failed} case(s) failed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::metrics::Metrics;
    use pageferry::engine::MigrationReport;

    fn dev() -> Device {
        Device::parse("instances=4,latency_us=8192").unwrap()
    }

    /// A case moving `mb` (10^6 bytes) of device input per second.
    fn case(channels: usize, depth: usize, mb: f64) -> PipeResult {
        let pages = 25_600u64; // 100 MiB of non-zero pages
        let t = (pages * 4096) as f64 / (mb * 1e6);
        let report = MigrationReport { total_time_s: t, raw_bytes: pages * 4096, normal_pages: pages, ..Default::default() };
        let run = RunRecord { metrics: Metrics::from_report(&report), verified: false, file_check: "match".into(), wall_s: t, report };
        PipeResult { channels, depth, run: Some(run), reason: None }
    }

    #[test]
    fn device_spec() {
        let d = dev();
        assert_eq!(d, Device { instances: 4, latency_us: 8192, inflight: None });
        assert!((d.capacity() - 32e6).abs() < 1.0, "{}", d.capacity());
        assert_eq!(d.env_value(), "instances=4,latency_us=8192");
        assert!((d.ideal(1) - 8e6).abs() < 1.0);
        assert!((d.ideal(9) - 32e6).abs() < 1.0);
        let p = Device::parse(" inflight=2, latency_us=1000,instances=8").unwrap();
        assert_eq!(p.env_value(), "instances=8,latency_us=1000,inflight=2");
        assert!((p.ideal(1) / p.capacity() - 0.25).abs() < 1e-9);
        for (bad, want) in [
            ("instances=4", "both"),
            ("instances=4,latency_us=0", "at least 1"),
            ("instances=4,latency_us=x", "not a whole number"),
            ("instances=4,latency_us=5,speed=3", "unknown key 'speed'"),
            ("instances=4,instances=5,latency_us=1", "twice"),
            ("instances", "key=value"),
        ] {
            let e = Device::parse(bad).unwrap_err().to_string();
            assert!(e.contains("--device") && e.contains(want), "{bad}: {e}");
        }
        assert_eq!(parse_depths("1,2,4").unwrap(), vec![1, 2, 4]);
        assert!(parse_depths("0").unwrap_err().to_string().contains("out of range"));
        assert!(parse_depths("2,2").unwrap_err().to_string().contains("twice"));
    }

    #[test]
    fn table_and_conclusion() {
        let d = dev();
        let mut results = vec![case(1, 1, 7.0), case(2, 1, 14.0), case(4, 1, 29.5), case(1, 2, 14.0), case(2, 2, 29.0), case(4, 2, 31.0)];
        results.push(PipeResult { channels: 1, depth: 4, run: None, reason: Some("source failed | boom".into()) });
        let t = markdown_table(&results, &[1, 2, 4], &[1, 2, 4], &d);
        let rows: Vec<&str> = t.lines().collect();
        assert_eq!(rows[0], "| channels | depth 1 | depth 2 | depth 4 |");
        assert_eq!(rows[1], "|---:|---:|---:|---:|");
        assert_eq!(rows[2], "| 1 | 7.0 MB/s (22%) | 14.0 MB/s (44%) | FAILED: source failed / boom |");
        assert_eq!(rows[4], "| 4 | 29.5 MB/s (92%) | 31.0 MB/s (97%) | — |");
        assert_eq!(reached(&results, &[1, 2, 4], &d), vec![(1, Some(4)), (2, Some(2)), (4, None)]);
        let c = conclusion(&results, &[1, 2], &d);
        assert_eq!(c, "Fewest channels reaching 90% of the device's 32.0 MB/s: depth 1: 4 channels; depth 2: 2 channels. Depth >= 2 needs fewer channels than depth 1.");
        let c = conclusion(&results, &[1, 2, 4], &d);
        assert!(c.contains("depth 4: not reached (no successful case)") && c.contains("does NOT"), "{c}");
        let low = vec![case(1, 1, 7.0), case(1, 2, 14.0)];
        let c = conclusion(&low, &[1, 2], &d);
        assert!(c.ends_with("Inconclusive: neither depth 1 nor some deeper depth reached it at these channel counts."), "{c}");
        let only2 = vec![case(1, 1, 7.0), case(1, 2, 30.0)];
        assert!(conclusion(&only2, &[1, 2], &d).ends_with("depth 2: 1 channel. Depth >= 2 needs fewer channels than depth 1."));
        let only1 = vec![case(1, 1, 7.0), case(2, 1, 14.0)];
        let c = conclusion(&only1, &[1], &d);
        assert_eq!(c, "Fewest channels reaching 90% of the device's 32.0 MB/s: depth 1: not reached (best 44% at 2 channels)");
        let s = summary_json(&results, &[1, 2], &d);
        assert_eq!(s["reached"][0]["channels"], 4);
        assert_eq!(s["deeper_needs_fewer_channels"], true);
        let j = case_json(&results[0], &d).unwrap();
        assert_eq!(j["status"], "ok");
        assert_eq!(j["workers"], 1);
        assert!((j["utilisation_pct"].as_f64().unwrap() - 21.875).abs() < 1e-6);
        assert_eq!(case_json(&results[6], &d).unwrap()["status"], "failed");
    }

    #[test]
    fn chart_is_svg() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pipeline.svg");
        let results = vec![case(1, 1, 7.0), case(2, 1, 14.0), case(1, 2, 14.0), case(2, 2, 29.0)];
        write_chart(&p, &results, &[1, 2], &[1, 2], &dev()).unwrap();
        let s = std::fs::read_to_string(&p).unwrap();
        assert!(s.starts_with("<svg"));
        assert!(s.contains("depth 2") && s.contains("device capacity 32.0 MB/s"), "{s}");
    }
}

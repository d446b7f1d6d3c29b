//! `pageferry demo`: the main job on a built-in default. Builds a deterministic 1 GiB
//! silesia-like image in /dev/shm, starts a destination and a source as two processes over
//! loopback TCP, keeps dirtying the source while it migrates with zstd over 2 channels, then
//! checks the destination file equals the source's final memory and prints the report.

use crate::args::parse_size;
use anyhow::{bail, Context, Result};
use pageferry::engine::MigrationReport;
use pageferry_image::ImageKind;
use pageferry::memory::{GuestMemory, MmapRegion};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Guest memory size.
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    size: u64,
    /// Compression method.
    #[arg(long = "multifd-compression", default_value = "zstd")]
    method: String,
    /// Parallel channels.
    #[arg(long = "multifd-channels", default_value_t = 2)]
    channels: usize,
    /// Cap on wire bytes/s (e.g. 1gbit); default unlimited.
    #[arg(long = "max-bandwidth")]
    max_bandwidth: Option<String>,
    /// How fast the workload dirties memory during the migration (bytes/s; 0 = no workload).
    #[arg(long = "dirty-rate", default_value = "100MB")]
    dirty_rate: String,
    /// Working set the workload writes to.
    #[arg(long = "dirty-set", default_value = "64M", value_parser = parse_size)]
    dirty_set: u64,
    /// Where the source and destination memory files live (tmpfs, so they are RAM like a guest's).
    #[arg(long, default_value = "/dev/shm")]
    dir: PathBuf,
    /// Keep the memory files afterwards.
    #[arg(long)]
    keep: bool,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
    /// Migrate over TLS 1.3 (mutual x509 authentication) with throwaway credentials.
    #[arg(long)]
    tls: bool,
}

fn digest_file(path: &std::path::Path) -> Result<u128> {
    let r = MmapRegion::open_file("image", path).with_context(|| format!("open {}", path.display()))?;
    Ok(GuestMemory::single(r)?.digest())
}

pub fn run(a: DemoArgs) -> Result<()> {
    let exe = std::env::current_exe().context("locating the pageferry binary")?;
    let src = a.dir.join(format!("pageferry-demo-{}-src.img", std::process::id()));
    let dst = a.dir.join(format!("pageferry-demo-{}-dst.img", std::process::id()));
    let cleanup = Cleanup { files: vec![src.clone(), dst.clone()], keep: a.keep };

    eprintln!("pageferry demo: generating a {} MiB silesia-like memory image in {}", a.size >> 20, a.dir.display());
    let bar = indicatif::ProgressBar::new(a.size);
    pageferry_image::write_image(ImageKind::SilesiaLike, pageferry_image::DEFAULT_SEED, a.size, &src, &mut |d| bar.set_position(d))
        .with_context(|| format!("writing {}", src.display()))?;
    bar.finish_and_clear();

    let creds = if a.tls { Some(crate::tls::Throwaway::new()?) } else { None };
    let tls_args: Vec<&std::ffi::OsStr> = match &creds {
        Some(c) => vec!["--tls-creds".as_ref(), c.path().as_os_str()],
        None => vec![],
    };
    let mut recv = Command::new(&exe)
        .args(["recv", "--listen", "127.0.0.1:0", "--json", "--no-verify", "--multifd-compression", &a.method])
        .arg("--image")
        .arg(&dst)
        .args(&tls_args)
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the destination process")?;
    let mut lines = BufReader::new(recv.stdout.take().expect("piped")).lines();
    let first = lines.next().transpose()?.unwrap_or_default();
    let Some(addr) = first.strip_prefix("listening on ") else {
        let _ = recv.wait();
        bail!("the destination did not start (it said: {first:?})");
    };
    eprintln!("pageferry demo: destination (pid {}) listening on {addr}; migrating with {} over {} channels, workload dirtying {} of a {} MiB working set",
        recv.id(), a.method, a.channels, a.dirty_rate, a.dirty_set >> 20);

    let mut send = Command::new(&exe);
    // --no-verify: this demo compares the two files itself afterwards (a stronger, end-to-end
    // check), so the engine's in-band digest would only add to the downtime.
    send.args(["send", "--connect", addr, "--json", "--no-verify", "--multifd-compression", &a.method, "--multifd-channels", &a.channels.to_string()])
        .arg("--image")
        .arg(&src)
        .args(&tls_args)
        .stdout(Stdio::piped());
    if let Some(b) = &a.max_bandwidth {
        send.args(["--max-bandwidth", b]);
    }
    if !matches!(a.dirty_rate.as_str(), "0" | "none") {
        send.args(["--dirty-rate", &a.dirty_rate, "--dirty-set", &a.dirty_set.to_string()]);
    }
    let out = send.spawn().context("starting the source process")?.wait_with_output()?;
    let recv_out: Vec<String> = lines.collect::<Result<_, _>>()?;
    let recv_status = recv.wait()?;
    if !out.status.success() || !recv_status.success() {
        bail!("migration failed (source: {}, destination: {})", out.status, recv_status);
    }
    let mut report: MigrationReport = serde_json::from_slice(&out.stdout).context("reading the source's report")?;
    let _ = recv_out;

    // The source's workload stopped at switchover, so its file holds the final memory.
    let (ds, dd) = (digest_file(&src)?, digest_file(&dst)?);
    if ds != dd {
        bail!("destination differs from the source's final memory (xxh3-128 {ds:032x} vs {dd:032x})");
    }
    // Said once, on the report's `verified:` line (the engine's in-band check was off).
    report.verified_by = Some(format!("yes, by the demo: the destination file equals the source's final memory (xxh3-128 {ds:032x})"));
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.render());
    }
    drop(cleanup);
    Ok(())
}

struct Cleanup {
    files: Vec<PathBuf>,
    keep: bool,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if !self.keep {
            for f in &self.files {
                let _ = std::fs::remove_file(f);
            }
        }
    }
}

//! `pageferry`: the command-line edge of the library — migrate image files between two
//! processes (`send`/`recv`), run the built-in demo, generate benchmark images. Errors are
//! reported here with context; the library's are typed.

mod args;
mod bench;
mod demo;
mod events;
mod exit;
mod partial;
mod progress;
mod tls;
mod vm;
mod workload;

use anyhow::{bail, Context, Result};
use args::{parse_size, MethodArgs, SourceArgs};
use clap::{Parser, Subcommand};
use pageferry::dirty::{DirtyTracker, StaticTracker, UffdTracker};
use pageferry::engine::{self, DestinationConfig, NoWorkload, SourceWorkload};
use pageferry_image::ImageKind;
use pageferry::memory::{GuestMemory, MmapRegion};
use std::io::Write;
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "pageferry", version, about = "Live migration of guest memory over parallel compressed channels (multifd)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Source: migrate an image file's content to a `recv` at ADDR.
    Send(SendArgs),
    /// Destination: receive a migration into an image file.
    Recv(RecvArgs),
    /// Build a 1 GiB silesia-like image, migrate it between two processes with zstd while a
    /// workload dirties it, verify, report.
    Demo(demo::DemoArgs),
    /// Write a deterministic benchmark memory image.
    Image(ImageArgs),
    /// Live-migrate a running KVM guest (the minimal VMM in crates/pageferry-vmm).
    #[command(subcommand)]
    Vm(vm::VmCmd),
    /// Benchmark matrix (methods x channels x links) between two processes: markdown table,
    /// JSON lines, SVG charts; `bench codecs` for bare codec speed.
    Bench(bench::BenchArgs),
}

#[derive(clap::Args)]
struct SendArgs {
    /// Destination address (host:port).
    #[arg(long)]
    connect: String,
    /// Image file to migrate (size a multiple of 4096). With --dirty-rate it must be on
    /// tmpfs (/dev/shm) or be a memfd-capable file system for write tracking.
    #[arg(long)]
    image: PathBuf,
    #[command(flatten)]
    engine: SourceArgs,
    /// Keep writing the image at this rate while migrating (bytes/s: 100MB, 1gbit, ...), to
    /// exercise pre-copy rounds; writes are tracked with userfaultfd.
    #[arg(long = "dirty-rate")]
    dirty_rate: Option<String>,
    /// Bytes at the start of the image the --dirty-rate workload writes to.
    #[arg(long = "dirty-set", default_value = "64M", value_parser = parse_size)]
    dirty_set: u64,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
    /// Machine interface: the migration's lifecycle as JSON lines on stdout (QEMU's MIGRATION
    /// statuses, a line per round, the report in the last line; see README "Events").
    #[arg(long, conflicts_with = "json")]
    events: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

#[derive(clap::Args)]
struct RecvArgs {
    /// Address to listen on (host:port; port 0 picks one, printed as "listening on ADDR").
    #[arg(long)]
    listen: String,
    /// Image file to write, at the size the source announces. It is received into
    /// IMAGE.incomplete (space reserved in the handshake) and renamed to IMAGE only once the
    /// migration completed; a failed one leaves IMAGE as it was, and a source refused in the
    /// handshake leaves no file.
    #[arg(long)]
    image: PathBuf,
    /// Accept a source that skips the end-to-end memory digest (its --no-verify); without
    /// this, such a source is refused in the handshake.
    #[arg(long = "no-verify")]
    no_verify: bool,
    /// Seconds a channel (data or control) may stay silent before the migration fails.
    #[arg(long = "stall-timeout", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    stall_timeout_s: u64,
    #[command(flatten)]
    method: MethodArgs,
    /// Seconds to wait for the source to connect. A source refused in the handshake (another
    /// method, --no-verify, no room for its image, TLS credentials, ...) is told why, reported
    /// on stderr, and recv keeps listening for the right one; when none came in time, recv
    /// exits 5 naming the last refusal.
    #[arg(long = "accept-timeout", default_value_t = 60)]
    accept_timeout_s: u64,
    /// Give up after this many seconds from the accepted handshake (the source is told and
    /// keeps running; no image is left). Default: no bound of its own (the source's --timeout
    /// and --stall-timeout still apply).
    #[arg(long = "timeout", value_parser = clap::value_parser!(u64).range(1..))]
    timeout_s: Option<u64>,
    /// Print the destination's report as one JSON object.
    #[arg(long)]
    json: bool,
    /// Machine interface: JSON lines on stdout, like `send --events` (the listening address
    /// first, then the destination's MIGRATION statuses, the report in the last line).
    #[arg(long, conflicts_with = "json")]
    events: bool,
    /// Decompress through a bounce buffer (measures what zero copy saves).
    #[arg(long = "no-zero-copy")]
    no_zero_copy: bool,
    /// Continue the source's --dirty-rate writer here after the switchover (in postcopy: at
    /// once, before all memory has arrived), like a guest that moved; without it the image
    /// only receives.
    #[arg(long = "resume-writer")]
    resume_writer: bool,
    /// With --resume-writer: keep the writer running this long after the migration
    /// completed, then stop it and report where it started and stopped.
    #[arg(long = "run-after-ms", default_value_t = 0)]
    run_after_ms: u64,
    #[command(flatten)]
    tls: tls::RecvTlsArgs,
}

/// What `recv --json` prints: the destination's report, and where a resumed writer started
/// and stopped (to replay its writes).
#[derive(serde::Serialize)]
struct RecvOutput {
    #[serde(flatten)]
    report: engine::DestinationReport,
    workload: Option<WriterRun>,
}

#[derive(serde::Serialize)]
struct WriterRun {
    from: workload::WriterState,
    to: workload::WriterState,
}

#[derive(clap::Args)]
struct ImageArgs {
    /// Content: silesia-like (Silesia-corpus-like mix), zero, random, mixed (~50% zero pages, ~9% random, the rest silesia-like).
    #[arg(long, default_value = "silesia-like")]
    kind: String,
    /// Size (1G, 256M, bytes; a multiple of 4096).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    size: u64,
    /// Seed of the generator.
    #[arg(long, default_value_t = pageferry_image::DEFAULT_SEED)]
    seed: u64,
    /// Output file.
    out: PathBuf,
}

static CANCEL: std::sync::OnceLock<engine::CancelToken> = std::sync::OnceLock::new();

/// The process's cancel handle: SIGINT/SIGTERM cancel the running migration (both sides are
/// told; a second signal exits at once).
pub fn cancel_token() -> engine::CancelToken {
    CANCEL.get_or_init(engine::CancelToken::new).clone()
}

fn main() {
    let cli = Cli::parse();
    let token = cancel_token();
    let _ = ctrlc::set_handler(move || {
        if token.is_cancelled() {
            std::process::exit(130);
        }
        eprintln!("pageferry: cancelling the migration (signal again to exit at once)");
        token.cancel();
    });
    let (name, r) = match cli.cmd {
        Cmd::Send(a) => ("send", send(a)),
        Cmd::Recv(a) => ("recv", recv(a)),
        Cmd::Demo(a) => ("demo", demo::run(a)),
        Cmd::Image(a) => ("image", make_image(a)),
        Cmd::Vm(c) => ("vm", vm::run(c)),
        Cmd::Bench(a) => ("bench", bench::run(a)),
    };
    if let Err(e) = r {
        eprintln!("pageferry {name}: error: {e:#}");
        std::process::exit(exit::code(&e));
    }
}

fn send(a: SendArgs) -> Result<()> {
    let bar = progress::Bar::new(0, !a.quiet);
    if a.events {
        let events = events::JsonEvents::new(bar);
        let result = migrate_image(&a, &events);
        events.end(&result);
        result.map(drop)
    } else {
        let report = migrate_image(&a, &bar)?;
        if a.json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            print!("{}", report.render());
        }
        Ok(())
    }
}

/// `send`'s migration; progress and events go to `sink`.
fn migrate_image(a: &SendArgs, sink: &dyn engine::ProgressSink) -> Result<engine::MigrationReport> {
    let config = a.engine.config()?;
    let region = MmapRegion::open_file("image", &a.image).with_context(|| format!("source image {}", a.image.display()))?;
    let memory = GuestMemory::single(region)?;
    let (mut tracker, mut workload): (Box<dyn DirtyTracker>, Box<dyn SourceWorkload>) = match &a.dirty_rate {
        None => (Box::new(StaticTracker::new()), Box::new(NoWorkload)),
        Some(rate) => {
            let rate = engine::ratelimit::parse_bandwidth(rate).map_err(anyhow::Error::msg).context("--dirty-rate")?;
            UffdTracker::probe().context("--dirty-rate needs userfaultfd write-protect tracking")?;
            let mut tracker = UffdTracker::new();
            // Track first, then start writing: no write can be missed.
            tracker.start(&memory).context("write tracking of the source image (is it on /dev/shm?)")?;
            let w: Box<dyn SourceWorkload> = match rate {
                Some(r) => Box::new(workload::DirtyWriter::start(&memory, r, a.dirty_set)),
                None => bail!("--dirty-rate needs a rate, e.g. 100MB"),
            };
            (Box::new(StartedTracker(tracker)), w)
        }
    };
    engine::run_source(&a.connect, &memory, tracker.as_mut(), workload.as_mut(), &config, sink).with_context(|| format!("migration to {}", a.connect))
}

/// A tracker that was started before the engine got it (so a workload could start early);
/// the engine's `start` is then a no-op.
struct StartedTracker(UffdTracker);

impl DirtyTracker for StartedTracker {
    fn start(&mut self, _memory: &GuestMemory) -> Result<(), pageferry::dirty::DirtyError> {
        Ok(())
    }
    fn collect(&mut self, into: &mut pageferry::dirty::DirtyPages) -> Result<(), pageferry::dirty::DirtyError> {
        self.0.collect(into)
    }
    fn guest_may_write(&self) -> bool {
        true
    }
    fn stop(&mut self) {
        self.0.stop()
    }
    fn name(&self) -> &'static str {
        self.0.name()
    }
}

/// Where `recv` writes until the migration completed.
fn incomplete_path(image: &std::path::Path) -> PathBuf {
    let mut s = image.as_os_str().to_owned();
    s.push(".incomplete");
    PathBuf::from(s)
}

fn recv(a: RecvArgs) -> Result<()> {
    if a.events {
        let events = Arc::new(events::JsonEvents::new(progress::Bar::new(0, false)));
        let result = receive(&a, engine::EventSink(events.clone()), &|addr| events.listening(addr));
        events.end(&result);
        return result.map(drop);
    }
    let out = receive(&a, progress::stderr_events(), &|addr| {
        println!("listening on {addr}");
        let _ = std::io::stdout().flush();
    })?;
    if a.json {
        println!("{}", serde_json::to_string(&out)?);
    } else {
        let report = &out.report;
        println!(
            "received {} pages ({} zero) in {} rounds; cpu {:.2} s over {:.2} s; verified: {}",
            report.pages, report.zero_pages, report.rounds, report.cpu_s, report.wall_s, report.verified
        );
    }
    Ok(())
}

/// `recv`'s migration; events go to `events`, the listening address to `listening`.
fn receive(a: &RecvArgs, events: engine::EventSink, listening: &dyn Fn(std::net::SocketAddr)) -> Result<RecvOutput> {
    // Until the session is accepted, the partial image belongs to its handshake (see
    // `partial`): a refused source's goes with its memory.
    let accepted = partial::Accepted::default();
    let events = accepted.watch(events);
    let config = DestinationConfig {
        codec: a.method.spec()?,
        only: a.method.restricts(),
        accept_timeout: Duration::from_secs(a.accept_timeout_s),
        timeout: a.timeout_s.map(Duration::from_secs),
        zero_copy: !a.no_zero_copy,
        require_verify: !a.no_verify,
        events,
        stall_timeout: Duration::from_secs(a.stall_timeout_s),
        cancel: cancel_token(),
        tls: a.tls.server_config(&a.listen)?,
        ..Default::default()
    };
    let listener = TcpListener::bind(&a.listen).with_context(|| format!("listen on {}", a.listen))?;
    listening(listener.local_addr()?);
    let partial = incomplete_path(&a.image);
    let mut created = false;
    let mut writer = workload::ResumeWriter::default();
    let slot = writer.memory.clone();
    let mut provide = |regions: &[(String, u64)]| -> Result<GuestMemory, String> {
        let [(name, len)] = regions else {
            return Err(format!("an image destination takes one region, the source announced {}", regions.len()));
        };
        // Called only for a handshake that passed every check needing no memory; the engine
        // may still refuse it (the file is then removed with its memory, before another
        // source is served) and call this again for the next source. A leftover of an
        // interrupted run is ours (by its name) and incomplete by definition.
        let _ = std::fs::remove_file(&partial);
        let r = partial::PartialImage::create(name, &partial, *len, &accepted).map_err(|e| format!("destination image: {e}"))?;
        created = true;
        let m = GuestMemory::new(vec![Arc::new(r)]).map_err(|e| e.to_string())?;
        *slot.lock().unwrap() = partial::WeakMemory::of(&m);
        Ok(m)
    };
    let workload: &mut dyn engine::DestinationWorkload = if a.resume_writer { &mut writer } else { &mut NoWorkload };
    let result = engine::run_destination_with(&listener, &mut provide, workload, &config);
    let run = writer.running.lock().unwrap().take();
    let run = match (run, &result) {
        (Some((from, mut w)), Ok(_)) => {
            std::thread::sleep(Duration::from_millis(a.run_after_ms));
            w.halt();
            Some(WriterRun { from, to: w.state() })
        }
        // A failed postcopy keeps the writer blocked on a missing page: leave it there.
        (Some((_, w)), Err(_)) => {
            w.detach();
            None
        }
        (None, _) => None,
    };
    let (report, memory) = match result {
        Ok(x) => x,
        // A failed postcopy keeps its state: the partial image holds every page that arrived
        // (and the writes made here), the source keeps the rest.
        Err(e @ engine::MigrationError::Postcopy(_)) => {
            return Err(e).with_context(|| format!("receiving migration (the partial image stays in {})", partial.display()));
        }
        Err(e) => {
            if created {
                let _ = std::fs::remove_file(&partial);
            }
            return Err(e).context("receiving migration");
        }
    };
    drop(memory);
    // The commit point for an image: complete and checked, so it takes its real name.
    std::fs::rename(&partial, &a.image).with_context(|| format!("renaming {} to {}", partial.display(), a.image.display()))?;
    Ok(RecvOutput { report, workload: run })
}

fn make_image(a: ImageArgs) -> Result<()> {
    let kind: ImageKind = a.kind.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
    if a.size == 0 || a.size % 4096 != 0 {
        bail!("--size must be a non-zero multiple of 4096");
    }
    let bar = indicatif::ProgressBar::new(a.size);
    bar.set_style(indicatif::ProgressStyle::with_template("{bar:30} {bytes}/{total_bytes} {binary_bytes_per_sec}").unwrap());
    pageferry_image::write_image(kind, a.seed, a.size, &a.out, &mut |done| bar.set_position(done)).with_context(|| format!("writing {}", a.out.display()))?;
    bar.finish_and_clear();
    println!("wrote {} ({} bytes, kind {}, seed {:#x})", a.out.display(), a.size, kind.name(), a.seed);
    Ok(())
}

//! `pageferry vm`: live-migrate a running KVM guest (crates/pageferry-vmm) between two
//! processes — `vm recv`, `vm send`, and `vm demo`, which runs both and prints the engine's
//! report plus the guest's view: counter at pause, counter found on the destination, first
//! progress after resume, downtime from vCPU pause to vCPU running on the destination.

use crate::args::{parse_size, MethodArgs, SourceArgs};
use anyhow::{bail, Context, Result};
use pageferry::engine::{self, DestinationConfig, MigrationReport};
use pageferry_vmm::{PendingDestination, Vm, VmConfig};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::Duration;

#[derive(clap::Subcommand)]
pub enum VmCmd {
    /// Destination: wait for a guest, restore it, let it run, check its memory stamps.
    Recv(VmRecvArgs),
    /// Source: boot the test guest, let it write memory, migrate it live.
    Send(VmSendArgs),
    /// Both, as two processes over loopback; prints the combined report.
    Demo(VmDemoArgs),
}

#[derive(clap::Args)]
pub struct VmRecvArgs {
    #[arg(long)]
    listen: String,
    /// Guest RAM; default: whatever the source announces.
    #[arg(long, value_parser = parse_size)]
    mem: Option<u64>,
    #[command(flatten)]
    method: MethodArgs,
    #[command(flatten)]
    tls: crate::tls::RecvTlsArgs,
    /// How long the resumed guest runs before the stamp check.
    #[arg(long = "run-after-ms", default_value_t = 300)]
    run_after_ms: u64,
    /// Accept a source that skips the end-to-end memory digest (its --no-verify).
    #[arg(long = "no-verify")]
    no_verify: bool,
    /// Seconds a channel may stay silent before the migration fails.
    #[arg(long = "stall-timeout", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    stall_timeout_s: u64,
    /// Seconds to wait for the source to connect. A source refused in the handshake (another
    /// method or guest size, --no-verify, TLS credentials, ...) is told why, reported on
    /// stderr, and vm recv keeps listening for the right one; when none came in time, it
    /// exits 5 naming the last refusal.
    #[arg(long = "accept-timeout", default_value_t = 60)]
    accept_timeout_s: u64,
    /// Give up after this many seconds from the accepted handshake (the source is told and
    /// resumes its guest). Default: no bound of its own.
    #[arg(long = "timeout", value_parser = clap::value_parser!(u64).range(1..))]
    timeout_s: Option<u64>,
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Clone)]
pub struct GuestArgs {
    /// Guest RAM (a multiple of 2 MiB).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    mem: u64,
    /// Bytes the guest keeps rewriting.
    #[arg(long = "working-set", default_value = "16M", value_parser = parse_size)]
    working_set: u64,
    /// How fast the guest writes (bytes/s, in whole pages per millisecond; 0 = as fast as it can).
    #[arg(long = "guest-dirty-rate", default_value = "16MB")]
    guest_dirty_rate: String,
}

#[derive(clap::Args)]
pub struct VmSendArgs {
    #[arg(long)]
    connect: String,
    #[command(flatten)]
    guest: GuestArgs,
    #[command(flatten)]
    engine: SourceArgs,
    #[arg(long)]
    json: bool,
    #[arg(long)]
    quiet: bool,
}

#[derive(clap::Args)]
pub struct VmDemoArgs {
    #[command(flatten)]
    guest: GuestArgs,
    #[arg(long = "multifd-compression", default_value = "zstd")]
    method: String,
    #[arg(long = "multifd-channels", default_value_t = 2)]
    channels: usize,
    /// Downtime budget in ms.
    #[arg(long = "downtime-limit", default_value_t = 5)]
    downtime_limit: u64,
    /// Also compare memory digests in-band (adds the hashing time to the downtime).
    #[arg(long)]
    verify: bool,
    /// Cap on wire bytes/s (e.g. 32MB), to see a guest outrun the link.
    #[arg(long = "max-bandwidth")]
    max_bandwidth: Option<String>,
    /// May switch to postcopy: the guest runs on the destination and pulls the pages it
    /// touches (not with --verify: postcopy has no digest).
    #[arg(long)]
    postcopy: bool,
    /// Throttle the vCPU when pre-copy does not converge.
    #[arg(long = "auto-converge")]
    auto_converge: bool,
    /// Migrate over TLS 1.3 (mutual x509 authentication) with throwaway credentials.
    #[arg(long)]
    tls: bool,
    #[arg(long)]
    json: bool,
}

/// What `vm send --json` prints.
#[derive(Serialize, Deserialize)]
pub struct VmSendReport {
    pub engine: MigrationReport,
    pub counter_at_pause: u64,
    pub vcpu_stop_us: f64,
    pub last_harvest_us: Option<f64>,
}

/// What `vm recv --json` prints.
#[derive(Serialize, Deserialize)]
pub struct VmRecvReport {
    pub counter_at_pause: u64,
    pub counter_at_restore: u64,
    pub first_counter_after_resume: Option<u64>,
    pub downtime_ms: Option<f64>,
    pub downtime_to_progress_ms: Option<f64>,
    pub downtime_clock: String,
    pub restore_us: f64,
    pub counter_after_run: u64,
    pub stamps_ok: bool,
    pub pages_written: u64,
}

pub fn run(cmd: VmCmd) -> Result<()> {
    pageferry_vmm::kvm_available().context("pageferry vm needs /dev/kvm")?;
    match cmd {
        VmCmd::Recv(a) => recv(a),
        VmCmd::Send(a) => send(a),
        VmCmd::Demo(a) => demo(a),
    }
}

fn guest_config(g: &GuestArgs) -> Result<VmConfig> {
    let rate = engine::ratelimit::parse_bandwidth(&g.guest_dirty_rate).map_err(anyhow::Error::msg).context("--guest-dirty-rate")?;
    let (pages_per_tick, tick) = match rate {
        None => (64, None),
        Some(r) => ((r / 4096 / 1000).max(1), Some(Duration::from_millis(1))),
    };
    Ok(VmConfig { mem_bytes: g.mem, working_set_bytes: g.working_set, pages_per_tick, tick, ..Default::default() })
}

fn send(a: VmSendArgs) -> Result<()> {
    let config = a.engine.config()?;
    let vm = Vm::new(guest_config(&a.guest)?).context("creating the source VM")?;
    vm.start()?;
    // Let the guest write its whole working set once before migrating, so the memory being
    // moved is what a running guest's is (and at least 1000 writes).
    let pass = (a.guest.working_set / 4096).max(1000);
    vm.wait_for_counter(pass, Duration::from_secs(60)).context("the guest did not write its working set")?;
    let mut tracker = vm.dirty_tracker();
    let mut workload = vm.source_workload();
    let bar = crate::progress::Bar::new(vm.mem_bytes(), !a.quiet);
    let report = engine::run_source(&a.connect, &vm.guest_memory(), &mut tracker, &mut workload, &config, &bar)
        .with_context(|| format!("live migration to {}", a.connect))?;
    let pause = vm.last_pause().context("the VM was not paused")?;
    let out = VmSendReport {
        engine: report,
        counter_at_pause: pause.counter,
        vcpu_stop_us: pause.vcpu_stopped.as_secs_f64() * 1e6,
        last_harvest_us: tracker.first().last_harvest().map(|h| h.total.as_secs_f64() * 1e6),
    };
    if a.json {
        println!("{}", serde_json::to_string(&out)?);
    } else {
        print!("{}", out.engine.render());
        println!("{:<22} {} (vCPU stopped {:.0} µs after the request)", "guest counter at pause:", out.counter_at_pause, out.vcpu_stop_us);
    }
    Ok(())
}

fn recv(a: VmRecvArgs) -> Result<()> {
    // SAFETY: sysconf has no preconditions.
    let ram = unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) as u64 * libc::sysconf(libc::_SC_PAGESIZE) as u64 };
    let config = DestinationConfig {
        codec: a.method.spec()?,
        only: a.method.restricts(),
        require_verify: !a.no_verify,
        accept_timeout: Duration::from_secs(a.accept_timeout_s),
        max_memory: Some(ram),
        postcopy_kernel_faults: true,
        events: crate::progress::stderr_events(),
        stall_timeout: Duration::from_secs(a.stall_timeout_s),
        timeout: a.timeout_s.map(Duration::from_secs),
        cancel: crate::cancel_token(),
        tls: a.tls.server_config(&a.listen)?,
        ..Default::default()
    };
    let listener = TcpListener::bind(&a.listen).with_context(|| format!("listen on {}", a.listen))?;
    let pending = match a.mem {
        // Made up front: the handshake then checks the source's size against it.
        Some(mem) => PendingDestination::with_ram(mem).map_err(anyhow::Error::msg).context("creating the destination VM")?,
        None => PendingDestination::new(),
    };
    println!("listening on {}", listener.local_addr()?);
    std::io::stdout().flush()?;
    let mut workload = pending.clone();
    engine::run_destination_with(&listener, &mut |layout| pending.provide(layout), &mut workload, &config).context("receiving the guest")?;
    let vm = pending.take_vm().context("no VM was created")?;
    let r = vm.wait_resume_report(Duration::from_secs(10)).context("the guest did not resume")?;
    std::thread::sleep(Duration::from_millis(a.run_after_ms));
    vm.pause()?;
    let stamps = vm.check_pattern();
    let (downtime, clock) = r.downtime().map(|(d, c)| (Some(d), format!("{c:?}"))).unwrap_or((None, "unknown".into()));
    let out = VmRecvReport {
        counter_at_pause: r.source.counter,
        counter_at_restore: r.counter_at_restore,
        first_counter_after_resume: r.first_progress.map(|(c, _)| c),
        downtime_ms: downtime.map(|d| d.as_secs_f64() * 1000.0),
        downtime_to_progress_ms: r.downtime_to_progress().map(|(d, _)| d.as_secs_f64() * 1000.0),
        downtime_clock: clock,
        restore_us: r.restore_took.as_secs_f64() * 1e6,
        counter_after_run: vm.counter(),
        stamps_ok: stamps.is_ok(),
        pages_written: stamps.as_ref().map(|p| p.pages_written).unwrap_or(0),
    };
    if a.json {
        println!("{}", serde_json::to_string(&out)?);
    } else {
        println!(
            "guest resumed: counter {} at pause, {} in memory at restore, first progress {:?}; downtime {:?} ms; stamps {}",
            out.counter_at_pause,
            out.counter_at_restore,
            out.first_counter_after_resume,
            out.downtime_ms,
            if out.stamps_ok { "ok" } else { "WRONG" }
        );
    }
    if let Err(e) = stamps {
        bail!("the guest's memory stamps are wrong on the destination: {e}");
    }
    Ok(())
}

fn demo(a: VmDemoArgs) -> Result<()> {
    if a.postcopy && a.verify {
        bail!("--postcopy cannot be combined with --verify: postcopy has no memory digest (the guest runs on the destination before all memory has arrived)");
    }
    let exe = std::env::current_exe()?;
    let creds = if a.tls { Some(crate::tls::Throwaway::new()?) } else { None };
    let tls_args: Vec<&std::ffi::OsStr> = match &creds {
        Some(c) => vec!["--tls-creds".as_ref(), c.path().as_os_str()],
        None => vec![],
    };
    let mut recv = Command::new(&exe)
        .args(["vm", "recv", "--listen", "127.0.0.1:0", "--json", "--multifd-compression", &a.method])
        .args(if a.verify { &[][..] } else { &["--no-verify"][..] })
        .args(&tls_args)
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the destination")?;
    let mut lines = BufReader::new(recv.stdout.take().expect("piped")).lines();
    let first = lines.next().transpose()?.unwrap_or_default();
    let Some(addr) = first.strip_prefix("listening on ") else {
        let _ = recv.wait();
        bail!("the destination did not start ({first:?})");
    };
    let mut send = Command::new(&exe);
    send.args(["vm", "send", "--json", "--connect", addr, "--multifd-compression", &a.method])
        .args(["--multifd-channels", &a.channels.to_string(), "--downtime-limit", &a.downtime_limit.to_string()])
        .args(["--mem", &a.guest.mem.to_string(), "--working-set", &a.guest.working_set.to_string(), "--guest-dirty-rate", &a.guest.guest_dirty_rate])
        .args(&tls_args)
        .stdout(Stdio::piped());
    if !a.verify {
        send.arg("--no-verify");
    }
    if let Some(b) = &a.max_bandwidth {
        send.args(["--max-bandwidth", b]);
    }
    if a.postcopy {
        send.arg("--postcopy");
    }
    if a.auto_converge {
        send.arg("--auto-converge");
    }
    let out = send.spawn()?.wait_with_output()?;
    let recv_line = lines.next().transpose()?.unwrap_or_default();
    let recv_ok = recv.wait()?.success();
    if !out.status.success() || !recv_ok {
        bail!("live migration failed (see the messages above)");
    }
    let s: VmSendReport = serde_json::from_slice(&out.stdout).context("source report")?;
    let d: VmRecvReport = serde_json::from_str(&recv_line).context("destination report")?;
    if a.json {
        println!("{}", serde_json::json!({ "source": s, "destination": d }));
        return Ok(());
    }
    print!("{}", s.engine.render());
    let line = |k: &str, v: String| println!("{k:<22} {v}");
    line("guest counter:", format!("{} at pause on the source, {} in memory at restore ({})", s.counter_at_pause, d.counter_at_restore,
        if s.counter_at_pause == d.counter_at_restore { "continuous" } else { "MISMATCH" }));
    line("first after resume:", format!("{:?} (next value after {})", d.first_counter_after_resume, s.counter_at_pause));
    line("vCPU downtime:", format!("{:.2} ms pause → running on the destination ({} clock); {:.2} ms to first progress",
        d.downtime_ms.unwrap_or(f64::NAN), d.downtime_clock, d.downtime_to_progress_ms.unwrap_or(f64::NAN)));
    line("dirty log harvest:", format!("{:.0} µs (last round)", s.last_harvest_us.unwrap_or(f64::NAN)));
    line("guest memory stamps:", format!("{} ({} pages written, counter {} after running on)", if d.stamps_ok { "ok" } else { "WRONG" }, d.pages_written, d.counter_after_run));
    Ok(())
}

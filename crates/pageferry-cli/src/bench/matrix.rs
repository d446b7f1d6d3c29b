//! The benchmark matrix: every (link, method, level, channels) case, `--reps` times, each run
//! a real destination process (`pageferry recv`, inside the namespace for `tc:` links) and a
//! real source process (`pageferry send --json`). The source's report carries both sides'
//! CPU; after each run the two image files are compared with xxh3-128. Runs go in rounds
//! ([`schedule`]) so that every case of a link sees the same drift in the machine's load.

use super::link::{self, Link, TcNet};
use super::metrics::{Metrics, Summary};
use super::{charts, render, BenchMethod, ImageOpts, PreparedImage};
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use pageferry::engine::MigrationReport;
use serde::Serialize;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct MatrixArgs {
    /// Compression methods (comma-separated): none, zlib, zstd, qatzip, and auto (the engine
    /// chooses per window among what the destination decodes).
    #[arg(long, default_value = "none,zlib,zstd,qatzip")]
    methods: String,
    /// Levels to run each compressing method at (comma-separated; default: each method's
    /// default level, 1; zstd's fast levels are negative, e.g. -5,1).
    #[arg(long, allow_hyphen_values = true)]
    levels: Option<String>,
    /// Channel counts (comma-separated). Default 1,2,4,8,16 (1,2,4 with --quick).
    #[arg(long)]
    channels: Option<String>,
    /// Links (comma-separated): unlimited (loopback), cap:RATE (the engine's
    /// --max-bandwidth), tc:RATE[:delay=D] (kernel-shaped veth into a network namespace;
    /// root only).
    #[arg(long, default_value = "cap:1gbit,unlimited")]
    links: String,
    /// Runs per case; the table shows the median (and min–max when > 1). They go in rounds:
    /// every case of a link once per round, each round starting one case later.
    #[arg(long, default_value_t = 1)]
    reps: usize,
    #[command(flatten)]
    image: ImageOpts,
    /// Smaller defaults: a 256 MiB image and channels 1,2,4 (explicit flags still win).
    #[arg(long)]
    quick: bool,
    /// Keep writing the source image at this rate during each migration (send --dirty-rate).
    #[arg(long = "dirty-rate")]
    dirty_rate: Option<String>,
    /// Working set of the --dirty-rate writer (send --dirty-set; default 64M).
    #[arg(long = "dirty-set")]
    dirty_set: Option<String>,
    /// qatzip provider on both sides: auto, qat, cpu.
    #[arg(long = "qatzip-provider", default_value = "auto")]
    qatzip_provider: String,
    /// Print JSON lines (one object per case, all runs included) instead of the markdown table.
    #[arg(long)]
    json: bool,
    /// Directory for results.md, results.jsonl and the SVG charts.
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
    /// Trust the engine's digest check (`verified`) and skip the extra xxh3 comparison of the
    /// two image files after each run.
    #[arg(long = "no-file-check")]
    no_file_check: bool,
    /// TLS 1.3 on every channel (mutual x509 with throwaway credentials): off, on, or both
    /// (each case plain and over TLS, next to each other).
    #[arg(long, value_name = "off|on|both", default_value = "off", default_missing_value = "on", num_args = 0..=1)]
    tls: String,
}

/// One cell of the matrix.
#[derive(Clone, Debug, PartialEq)]
pub struct Case {
    pub method: BenchMethod,
    pub level: i32,
    pub channels: usize,
    pub link: Link,
    /// Every channel over TLS 1.3 (mutual x509, throwaway credentials).
    pub tls: bool,
}

impl Case {
    pub fn name(&self) -> String {
        format!("{} L{} {}ch {}{}", self.method, self.level, self.channels, self.link, if self.tls { " tls" } else { "" })
    }
}

/// One run of a case.
#[derive(Clone, Debug, Serialize)]
pub struct RunRecord {
    pub metrics: Metrics,
    /// The engine's end-to-end memory digest check (both sides hashed their memory).
    pub verified: bool,
    /// "match" when the xxh3-128 of the destination file equals the source file's,
    /// "skipped" with --no-file-check.
    pub file_check: String,
    /// Spawn of the destination to the end of the file check, seconds.
    pub wall_s: f64,
    pub report: MigrationReport,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Failed,
    Skipped,
}

/// A case with its runs.
#[derive(Clone, Debug)]
pub struct CaseResult {
    pub case: Case,
    pub status: Status,
    pub reason: Option<String>,
    pub runs: Vec<RunRecord>,
}

impl CaseResult {
    pub fn summary(&self) -> Option<Summary> {
        Summary::of(&self.runs.iter().map(|r| r.metrics).collect::<Vec<_>>())
    }
    /// Every run verified (see `run_once`) and no file mismatch.
    pub fn verified(&self) -> bool {
        !self.runs.is_empty() && self.runs.iter().all(|r| r.verified && r.file_check != "mismatch")
    }
}

/// What a run needs besides its case.
pub struct RunEnv<'a> {
    pub exe: PathBuf,
    pub src: &'a Path,
    pub dst: PathBuf,
    pub tc: Option<&'a TcNet>,
    pub dirty_rate: Option<String>,
    pub dirty_set: Option<String>,
    pub qatzip_provider: String,
    /// Pass `--no-verify` to both sides (the file comparison still checks the result).
    pub no_engine_verify: bool,
    pub file_check: bool,
    /// Credentials for the cases that run over TLS.
    pub tls_creds: Option<PathBuf>,
}

/// Last few non-empty lines of a process's stderr, for error messages.
fn tail(s: &str, lines: usize) -> String {
    let v: Vec<&str> = s.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    v[v.len().saturating_sub(lines)..].join(" | ")
}

fn drain<R: Read + Send + 'static>(r: R) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = BufReader::new(r).read_to_string(&mut s);
        s
    })
}

/// A started child that is killed (and reaped) if dropped before it was waited for.
struct Proc {
    child: Option<Child>,
}

impl Proc {
    fn spawn(cmd: &mut Command, what: &str) -> Result<Self> {
        let child = cmd.spawn().with_context(|| format!("starting the {what} process"))?;
        link::register_pid(child.id());
        Ok(Self { child: Some(child) })
    }
    fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("not yet waited")
    }
    /// Wait up to `limit`, then kill; returns the exit status (None if killed).
    fn wait_for(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let t0 = Instant::now();
        let mut c = self.child.take().expect("waited once");
        let st = loop {
            match c.try_wait() {
                Ok(Some(st)) => break Some(st),
                Ok(None) if t0.elapsed() < limit => std::thread::sleep(Duration::from_millis(20)),
                _ => {
                    let _ = c.kill();
                    let _ = c.wait();
                    break None;
                }
            }
        };
        link::unregister_pid(c.id());
        st
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            link::unregister_pid(c.id());
        }
    }
}

/// What the source process of a run gets beyond [`RunEnv`] (`bench pipeline`): its own qatzip
/// provider, more flags, and environment variables set for the source only.
#[derive(Clone, Debug, Default)]
pub struct SourceExtras {
    /// The source's qatzip provider; None: `RunEnv::qatzip_provider`, as the destination's.
    pub qatzip_provider: Option<String>,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

/// Run one migration of `case`; `tick(elapsed)` is called about five times a second.
pub fn run_once(env: &RunEnv, case: &Case, tick: &dyn Fn(f64)) -> Result<RunRecord> {
    run_once_with(env, case, tick, &SourceExtras::default())
}

/// [`run_once`] with `extras` for the source process.
pub fn run_once_with(env: &RunEnv, case: &Case, tick: &dyn Fn(f64), extras: &SourceExtras) -> Result<RunRecord> {
    let t0 = Instant::now();
    let _ = std::fs::remove_file(&env.dst);
    let method = case.method.name();
    // `--flag=-5`: a negative level as a separate argument would read as a flag.
    let level_flag = format!("--multifd-{method}-level={}", case.level);
    // The destination of an auto case gets no method: by default it accepts any it decodes.
    let method_flags = |c: &mut Command, provider: &str, source: bool| {
        c.args(["--qatzip-provider", provider]);
        match case.method {
            BenchMethod::Auto if !source => {}
            BenchMethod::Auto => {
                c.args(["--multifd-compression", "auto"]);
            }
            BenchMethod::Fixed(m) => {
                c.args(["--multifd-compression", method]);
                if m.compresses() {
                    c.arg(level_flag.as_str());
                }
            }
        }
    };

    // Destination.
    let listen_ip = match (&case.link, env.tc) {
        (Link::Tc { .. }, Some(net)) => net.ns_addr.clone(),
        (Link::Tc { .. }, None) => bail!("tc link without a network namespace"),
        _ => "127.0.0.1".to_string(),
    };
    let mut recv_cmd = match (&case.link, env.tc) {
        (Link::Tc { .. }, Some(net)) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &net.ns]).arg(&env.exe);
            c
        }
        _ => Command::new(&env.exe),
    };
    recv_cmd.args(["recv", "--json", "--listen", &format!("{listen_ip}:0"), "--image"]).arg(&env.dst);
    method_flags(&mut recv_cmd, &env.qatzip_provider, false);
    if env.no_engine_verify {
        recv_cmd.arg("--no-verify");
    }
    let tls_creds = match (case.tls, &env.tls_creds) {
        (true, Some(dir)) => Some(dir),
        (true, None) => bail!("a TLS case without credentials"),
        (false, _) => None,
    };
    match tls_creds {
        Some(dir) => {
            recv_cmd.arg("--tls-creds").arg(dir);
        }
        // A plaintext benchmark on a namespace's address: the operator asked for it.
        None => {
            recv_cmd.arg("--insecure");
        }
    }
    recv_cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut recv = Proc::spawn(&mut recv_cmd, "destination")?;
    let recv_err = drain(recv.child().stderr.take().expect("piped"));
    let mut recv_lines = BufReader::new(recv.child().stdout.take().expect("piped"));
    let mut first = String::new();
    recv_lines.read_line(&mut first)?;
    let Some(addr) = first.trim().strip_prefix("listening on ").map(str::to_string) else {
        recv.wait_for(Duration::from_secs(2));
        let err = recv_err.join().unwrap_or_default();
        bail!("the destination did not start: {}", tail(&err, 3).if_empty(first.trim()));
    };
    let recv_out = drain(recv_lines);

    // Source.
    let mut send_cmd = Command::new(&env.exe);
    send_cmd
        .args(["send", "--json", "--quiet", "--connect", &addr, "--multifd-channels", &case.channels.to_string(), "--timeout", "3600"])
        .arg("--image")
        .arg(env.src);
    method_flags(&mut send_cmd, extras.qatzip_provider.as_deref().unwrap_or(&env.qatzip_provider), true);
    if let Some(dir) = tls_creds {
        // The throwaway server certificate names localhost, whatever address the link uses.
        send_cmd.arg("--tls-creds").arg(dir).args(["--tls-hostname", "localhost"]);
    }
    send_cmd.args(&extras.args).envs(extras.env.iter().map(|(k, v)| (k, v)));
    if let Link::Cap { text, .. } = &case.link {
        send_cmd.args(["--max-bandwidth", text]);
    }
    if let Some(r) = &env.dirty_rate {
        send_cmd.args(["--dirty-rate", r]);
        if let Some(s) = &env.dirty_set {
            send_cmd.args(["--dirty-set", s]);
        }
    }
    if env.no_engine_verify {
        send_cmd.arg("--no-verify");
    }
    send_cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut send = Proc::spawn(&mut send_cmd, "source")?;
    let send_out = drain(send.child().stdout.take().expect("piped"));
    let send_err = drain(send.child().stderr.take().expect("piped"));
    let send_status = loop {
        if let Some(st) = send.child().try_wait()? {
            break st;
        }
        tick(t0.elapsed().as_secs_f64());
        std::thread::sleep(Duration::from_millis(200));
    };
    send.wait_for(Duration::ZERO);
    // A successful source means the destination is finishing; a failed one may leave it
    // waiting for connections, so it only gets a moment.
    let recv_status = recv.wait_for(if send_status.success() { Duration::from_secs(60) } else { Duration::from_secs(2) });
    let (send_out, send_err) = (send_out.join().unwrap_or_default(), send_err.join().unwrap_or_default());
    let (_recv_out, recv_err) = (recv_out.join().unwrap_or_default(), recv_err.join().unwrap_or_default());
    if !send_status.success() {
        bail!("source failed ({send_status}): {}", tail(&send_err, 3).if_empty(&tail(&recv_err, 3)));
    }
    match recv_status {
        Some(st) if st.success() => {}
        Some(st) => bail!("destination failed ({st}): {}", tail(&recv_err, 3)),
        None => bail!("destination did not exit after the source finished"),
    }
    let line = send_out.lines().rev().find(|l| l.trim_start().starts_with('{')).unwrap_or("");
    let report: MigrationReport = serde_json::from_str(line).with_context(|| format!("parsing the source's JSON report {:?}", tail(&send_out, 2)))?;

    let file_check = if env.file_check {
        let (a, b) = (super::digest_file(env.src)?, super::digest_file(&env.dst)?);
        if a == b {
            "match".to_string()
        } else {
            "mismatch".to_string()
        }
    } else {
        "skipped".to_string()
    };
    let _ = std::fs::remove_file(&env.dst);
    // Verified by the file comparison when it ran (the engine's digest is off then), else by
    // the engine's digest.
    let verified = if file_check == "skipped" { report.verified } else { file_check == "match" };
    Ok(RunRecord { metrics: Metrics::from_report(&report), verified, file_check, wall_s: t0.elapsed().as_secs_f64(), report })
}

trait IfEmpty {
    fn if_empty(self, other: &str) -> String;
}
impl IfEmpty for String {
    fn if_empty(self, other: &str) -> String {
        if self.is_empty() {
            other.to_string()
        } else {
            self
        }
    }
}

/// Whether a failed run's message says the method could not be set up (a codec that does
/// not open on a side: the source's probe or a channel's codec, or the destination refusing
/// the handshake) rather than a migration that went wrong.
pub fn is_setup_failure(msg: &str) -> bool {
    msg.contains("setup") || msg.contains("handshake refused")
}

/// The cases in run order: link, then method and level, then channels.
pub fn plan(links: &[Link], method_levels: &[(BenchMethod, i32)], channels: &[usize], tls: &[bool]) -> Vec<Case> {
    let mut v = Vec::new();
    for l in links {
        for &(method, level) in method_levels {
            for &c in channels {
                for &tls in tls {
                    v.push(Case { method, level, channels: c, link: l.clone(), tls });
                }
            }
        }
    }
    v
}

/// The order of the runs: link by link (a `tc:` link is shaped once), and within one link
/// round by round — every case once per round, each round starting one case later — so that
/// a machine whose load drifts (2 shared cores, page cache, a build elsewhere) weighs on every
/// case alike instead of on whichever ran its reps while the drift lasted. Entries are
/// (case index, rep).
pub fn schedule(cases: &[Case], reps: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::with_capacity(cases.len() * reps);
    let mut start = 0;
    while start < cases.len() {
        let end = (start..cases.len()).find(|&i| cases[i].link != cases[start].link).unwrap_or(cases.len());
        let n = end - start;
        for rep in 0..reps {
            out.extend((0..n).map(|k| (start + (k + rep) % n, rep)));
        }
        start = end;
    }
    out
}

/// A first guess of a run's seconds on a 2-core machine before anything was measured.
fn prior_secs(case: &Case, bytes: u64) -> f64 {
    let b = bytes as f64;
    // Sending CPU bytes/s by method name, measured on such a machine; others as zlib.
    const PRIOR_RATE: [(&str, f64); 4] = [("none", 1.5e9), ("zstd", 350e6), ("zlib", 150e6), ("qatzip", 150e6)];
    let rate = PRIOR_RATE.iter().find(|(n, _)| *n == case.method.name()).map_or(150e6, |&(_, r)| r);
    let cpu = b / rate;
    let shrink = if case.method.compresses() { 3.0 } else { 1.0 };
    let net = case.link.rate().map(|r| b / r as f64 / shrink).unwrap_or(0.0);
    cpu.max(net) + 1.0
}

/// Remaining-time estimate: each pending run costs what the measured run of the same
/// (link, method, level) with the nearest channel count cost, else the prior guess.
struct Eta {
    bytes: u64,
    done: Vec<(Case, f64)>,
}

impl Eta {
    fn estimate(&self, case: &Case) -> f64 {
        let same = self.done.iter().filter(|(c, _)| c.link == case.link && c.method == case.method && c.level == case.level);
        let dist = |c: &Case| ((c.channels as f64).log2() - (case.channels as f64).log2()).abs();
        match same.min_by(|a, b| dist(&a.0).total_cmp(&dist(&b.0))) {
            Some((_, s)) => *s,
            None => prior_secs(case, self.bytes),
        }
    }
}

fn fmt_secs(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s / 60 % 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

pub fn run(a: MatrixArgs) -> Result<()> {
    let levels = match &a.levels {
        Some(s) => super::parse_levels(s)?,
        None => Vec::new(),
    };
    let methods = super::matrix_methods(&a.methods, &levels)?;
    let channels = super::parse_channels(a.channels.as_deref().unwrap_or(if a.quick { "1,2,4" } else { "1,2,4,8,16" }))?;
    let mut links = link::parse_links(&a.links)?;
    if a.reps == 0 {
        bail!("--reps must be at least 1");
    }
    let tls_modes: Vec<bool> = match a.tls.as_str() {
        "off" => vec![false],
        "on" => vec![true],
        "both" => vec![false, true],
        other => bail!("--tls takes off, on or both, not {other:?}"),
    };
    let tls_creds = if tls_modes.contains(&true) { Some(crate::tls::Throwaway::new()?) } else { None };
    if let Some(r) = &a.dirty_rate {
        pageferry::engine::ratelimit::parse_bandwidth(r).map_err(anyhow::Error::msg).context("--dirty-rate")?;
    }
    let mut skipped: Vec<(String, String)> = Vec::new(); // (what, why)

    // Methods that cannot even open here are skipped before anything runs.
    let mut mls = Vec::new();
    for (m, l) in methods {
        let Some(fixed) = m.fixed() else {
            mls.push((m, l));
            continue;
        };
        match super::spec_for(fixed, l, &a.qatzip_provider).and_then(|s| pageferry::codec::open(&s).map(drop).map_err(Into::into)) {
            Ok(()) => mls.push((m, l)),
            Err(e) => {
                eprintln!("pageferry bench: skipping method {m} level {l}: {e:#}");
                skipped.push((format!("method {m} level {l}"), format!("{e:#}")));
            }
        }
    }

    // tc links need the namespace; without it they are skipped.
    let mut net = None;
    if links.iter().any(Link::is_tc) {
        match TcNet::create() {
            Ok(n) => net = Some(n),
            Err(e) => {
                for l in links.iter().filter(|l| l.is_tc()) {
                    eprintln!("pageferry bench: skipping tc link {l}: {e:#}");
                    skipped.push((format!("link {l}"), format!("{e:#}")));
                }
                links.retain(|l| !l.is_tc());
            }
        }
    }

    let size_default = if a.quick { 256 << 20 } else { 1 << 30 };
    let img: PreparedImage = super::prepare_image(&a.image, size_default, "src")?;
    let dst = super::shm_path("dst");
    link::register_file(&dst);
    let _dst_guard = PreparedImage { path: dst.clone(), bytes: 0, desc: String::new() };
    let exe = std::env::current_exe().context("locating the pageferry binary")?;
    let env_base = |tc| RunEnv {
        exe: exe.clone(),
        src: &img.path,
        dst: dst.clone(),
        tc,
        dirty_rate: a.dirty_rate.clone(),
        dirty_set: a.dirty_set.clone(),
        qatzip_provider: a.qatzip_provider.clone(),
        // The file comparison is the check; the engine's digest would add its hashing to the
        // CPU figures.
        no_engine_verify: !a.no_file_check,
        file_check: !a.no_file_check,
        tls_creds: tls_creds.as_ref().map(|t| t.path().to_path_buf()),
    };

    let cases = plan(&links, &mls, &channels, &tls_modes);
    let total_runs = cases.len() * a.reps;
    let mut eta = Eta { bytes: img.bytes, done: Vec::new() };
    let prior_total: f64 = cases.iter().map(|c| prior_secs(c, img.bytes) * a.reps as f64).sum();
    eprintln!(
        "pageferry bench: {} cases x {} reps on {} ({} links, {} methods/levels, channels {:?}); first guess {}",
        cases.len(), a.reps, img.desc, links.len(), mls.len(), channels, fmt_secs(prior_total)
    );
    let bar = ProgressBar::with_draw_target(Some(total_runs as u64), ProgressDrawTarget::stderr_with_hz(5));
    bar.set_style(ProgressStyle::with_template("{spinner} [{elapsed_precise}] [{bar:20}] {pos}/{len} runs done | {wide_msg}").expect("static template"));
    let plain = bar.is_hidden();

    let mut results: Vec<CaseResult> = cases.iter().map(|c| CaseResult { case: c.clone(), status: Status::Ok, reason: None, runs: Vec::new() }).collect();
    // A case that failed or was skipped runs no more reps.
    let mut ended = vec![false; cases.len()];
    let mut shaped: Option<Link> = None;
    let mut dead_link: Option<(Link, String)> = None;
    let mut method_ok: Vec<(BenchMethod, i32)> = Vec::new();
    let mut method_dead: Vec<((BenchMethod, i32), String)> = Vec::new();
    let order = schedule(&cases, a.reps);
    for (step, &(ci, rep)) in order.iter().enumerate() {
        let case = &cases[ci];
        let res = &mut results[ci];
        // Link shaping (once per tc link).
        if case.link.is_tc() && shaped.as_ref() != Some(&case.link) {
            shaped = Some(case.link.clone());
            dead_link = None;
            if let Err(e) = net.as_ref().expect("tc links only with a namespace").shape(&case.link) {
                bar.suspend(|| eprintln!("pageferry bench: skipping tc link {}: {e:#}", case.link));
                skipped.push((format!("link {}", case.link), format!("{e:#}")));
                dead_link = Some((case.link.clone(), format!("{e:#}")));
            }
        }
        if ended[ci] {
            bar.inc(1);
            continue;
        }
        let dead = match (&dead_link, method_dead.iter().find(|(ml, _)| *ml == (case.method, case.level))) {
            (Some((l, why)), _) if *l == case.link => Some(why.clone()),
            (_, Some((_, why))) => Some(why.clone()),
            _ => None,
        };
        if let Some(why) = dead {
            res.status = Status::Skipped;
            res.reason = Some(why);
            ended[ci] = true;
            bar.inc(1);
            continue;
        }
        let env = env_base(if case.link.is_tc() { net.as_ref() } else { None });
        let remaining_after: f64 = order[step + 1..].iter().filter(|&&(i, _)| !ended[i]).map(|&(i, _)| eta.estimate(&cases[i])).sum();
        let est_now = eta.estimate(case);
        let label = format!("case {}/{} {}{}", ci + 1, cases.len(), case.name(), if a.reps > 1 { format!(" rep {}/{}", rep + 1, a.reps) } else { String::new() });
        if plain {
            eprintln!("pageferry bench: [{}/{}] {label} ...", step + 1, total_runs);
        }
        let tick = |el: f64| bar.set_message(format!("{label} {:.0}s | ETA {}", el, fmt_secs(remaining_after + (est_now - el).max(0.0))));
        tick(0.0);
        match run_once(&env, case, &tick) {
            Ok(r) => {
                if plain {
                    eprintln!("pageferry bench:   {:.2} s, {:.0} Mbps raw, verified {}, files {}", r.metrics.time_s, r.metrics.raw_mbps, r.verified, r.file_check);
                }
                eta.done.push((case.clone(), r.wall_s));
                if !method_ok.contains(&(case.method, case.level)) {
                    method_ok.push((case.method, case.level));
                }
                if !r.verified || r.file_check == "mismatch" {
                    res.status = Status::Failed;
                    res.reason = Some(format!("verification failed (engine verified: {}, files: {})", r.verified, r.file_check));
                }
                res.runs.push(r);
            }
            Err(e) => {
                let why = format!("{e:#}");
                if method_ok.contains(&(case.method, case.level)) || !is_setup_failure(&why) {
                    bar.suspend(|| eprintln!("pageferry bench: {} failed: {why}", case.name()));
                    res.status = Status::Failed;
                    res.reason = Some(why);
                } else {
                    // The method never worked here and failed setting up: not a result.
                    bar.suspend(|| eprintln!("pageferry bench: skipping method {} level {}: {why}", case.method, case.level));
                    skipped.push((format!("method {} level {}", case.method, case.level), why.clone()));
                    method_dead.push(((case.method, case.level), why.clone()));
                    res.status = Status::Skipped;
                    res.reason = Some(why);
                }
                ended[ci] = true;
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    drop(net);

    // Output.
    let meta = render::Meta::new(&img.desc, img.bytes, a.reps, &skipped);
    let table = render::markdown(&results, &meta);
    let jsonl = render::json_lines(&results)?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    std::fs::write(a.out.join("results.md"), format!("{}\n{}", meta.header_markdown(), table))?;
    std::fs::write(a.out.join("results.jsonl"), &jsonl)?;
    let charts = charts::write_all(&results, &a.out)?;
    if a.json {
        print!("{jsonl}");
    } else {
        print!("{table}");
    }
    eprintln!("pageferry bench: wrote {} (results.md, results.jsonl, {} charts)", a.out.display(), charts.len());
    let failed: Vec<&CaseResult> = results.iter().filter(|r| r.status == Status::Failed).collect();
    if !failed.is_empty() {
        bail!("{} case(s) failed: {}", failed.len(), failed.iter().map(|r| r.case.name()).collect::<Vec<_>>().join(", "));
    }
    if results.iter().all(|r| r.status != Status::Ok) && !results.is_empty() {
        bail!("no case ran (all skipped)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(name: &str) -> pageferry::codec::Method {
        name.parse().unwrap()
    }

    #[test]
    fn plan_order() {
        let links = vec![Link::Unlimited, Link::Cap { bytes_per_s: 1, text: "8bit".into() }];
        let cases = plan(&links, &[(named("none").into(), 0), (named("zstd").into(), 1)], &[1, 4], &[false]);
        assert_eq!(cases.len(), 8);
        assert_eq!(cases[0].name(), "none L0 1ch unlimited");
        assert_eq!(cases[3].name(), "zstd L1 4ch unlimited");
        assert_eq!(cases[4].link.name(), "cap:8bit");
    }

    #[test]
    fn runs_go_link_by_link_and_round_by_round_each_round_starting_one_case_later() {
        let fast = Link::Unlimited;
        let slow = Link::Cap { bytes_per_s: 1, text: "8bit".into() };
        let mls: Vec<(BenchMethod, i32)> = vec![(named("none").into(), 0), (named("zlib").into(), 1), (named("zstd").into(), 1)];
        let cases = plan(&[slow, fast], &mls, &[2], &[false]);
        let order = schedule(&cases, 3);
        let expect = [
            // cap:8bit, cases 0..3
            (0, 0), (1, 0), (2, 0), (1, 1), (2, 1), (0, 1), (2, 2), (0, 2), (1, 2),
            // unlimited, cases 3..6
            (3, 0), (4, 0), (5, 0), (4, 1), (5, 1), (3, 1), (5, 2), (3, 2), (4, 2),
        ];
        assert_eq!(order, expect);
        // Every case runs every rep exactly once.
        for ci in 0..cases.len() {
            let mut reps: Vec<usize> = order.iter().filter(|&&(c, _)| c == ci).map(|&(_, r)| r).collect();
            reps.sort();
            assert_eq!(reps, vec![0, 1, 2]);
        }
        assert_eq!(schedule(&cases[..1], 2), vec![(0, 0), (0, 1)]);
        assert!(schedule(&[], 3).is_empty());
    }

    #[test]
    fn eta_uses_nearest_measured() {
        let case = |c| Case { method: named("zstd").into(), level: 1, channels: c, link: Link::Unlimited, tls: false };
        let mut eta = Eta { bytes: 1 << 30, done: vec![] };
        let prior = eta.estimate(&case(4));
        assert!(prior > 1.0);
        eta.done.push((case(1), 10.0));
        eta.done.push((case(8), 3.0));
        assert_eq!(eta.estimate(&case(2)), 10.0);
        assert_eq!(eta.estimate(&case(16)), 3.0);
        let other = Case { method: named("zlib").into(), ..case(2) };
        assert_eq!(eta.estimate(&other), prior_secs(&other, 1 << 30));
    }

    #[test]
    fn setup_failures() {
        assert!(is_setup_failure("source failed (exit status: 1): pageferry send: error: migration to 127.0.0.1:1: setup: qatzip setup failed: no device"));
        assert!(is_setup_failure("source failed: handshake refused: destination cannot open qatzip"));
        assert!(!is_setup_failure("source failed: protocol error on channel 1: connection reset"));
    }

    #[test]
    fn secs_format() {
        assert_eq!(fmt_secs(5.4), "5s");
        assert_eq!(fmt_secs(125.0), "2m05s");
        assert_eq!(fmt_secs(3700.0), "1h01m");
    }
}

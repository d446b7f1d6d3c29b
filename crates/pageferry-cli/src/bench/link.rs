//! The link a benchmark case migrates over, and the clean-up of everything the bench creates.
//!
//! * `unlimited`: loopback TCP, no cap.
//! * `cap:RATE`: loopback TCP with the engine's own pacing (`send --max-bandwidth RATE`).
//! * `tc:RATE[:delay=D]`: a kernel-shaped link. The destination process runs in a network
//!   namespace `pf-bench-<pid>` joined to the host by a veth pair with addresses
//!   `10.213.A.B/30` (they exist only on that pair); both veth ends get a `tbf` qdisc at RATE
//!   (a symmetric link: data one way, ACKs the other), and with `delay=D` a `netem` child
//!   adding D on each direction (round trip 2·D). Needs root, `ip` and `tc`.
//!
//! The namespace (and with it the veth pair) is removed when [`TcNet`] drops, and on SIGINT,
//! SIGTERM or SIGHUP a watcher thread kills the child processes the bench started, deletes the
//! namespace and the /dev/shm images, then exits with 128 + the signal.

use anyhow::{bail, Context, Result};
use pageferry::engine::ratelimit::parse_bandwidth;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// One link of `--links`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Link {
    Unlimited,
    /// Engine pacing at this many bytes/s; `text` is the rate as given (e.g. "1gbit").
    Cap { bytes_per_s: u64, text: String },
    /// Kernel shaping at this many bytes/s, with an optional one-way delay in microseconds.
    Tc { bytes_per_s: u64, text: String, delay_us: Option<u64>, delay_text: Option<String> },
}

impl Link {
    /// The name as given on the command line, normalised ("cap:1gbit", "tc:1gbit:delay=5ms").
    pub fn name(&self) -> String {
        match self {
            Link::Unlimited => "unlimited".into(),
            Link::Cap { text, .. } => format!("cap:{text}"),
            Link::Tc { text, delay_text: None, .. } => format!("tc:{text}"),
            Link::Tc { text, delay_text: Some(d), .. } => format!("tc:{text}:delay={d}"),
        }
    }
    /// Bytes/s of the link, None when unlimited.
    pub fn rate(&self) -> Option<u64> {
        match self {
            Link::Unlimited => None,
            Link::Cap { bytes_per_s, .. } | Link::Tc { bytes_per_s, .. } => Some(*bytes_per_s),
        }
    }
    pub fn is_tc(&self) -> bool {
        matches!(self, Link::Tc { .. })
    }
    /// A file-name-safe form of the name ("cap-1gbit", "tc-1gbit-delay-5ms").
    pub fn slug(&self) -> String {
        self.name().chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' { c } else { '-' }).collect()
    }
}

impl std::fmt::Display for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

/// Parse a delay such as `5ms`, `500us`, `1s` into microseconds.
pub fn parse_delay(s: &str) -> Result<u64> {
    let t = s.trim().to_ascii_lowercase();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num.parse().map_err(|_| anyhow::anyhow!("bad delay '{s}': expected e.g. 5ms, 500us"))?;
    let mult = match unit {
        "us" => 1.0,
        "ms" => 1e3,
        "s" => 1e6,
        _ => bail!("bad delay '{s}': unit must be us, ms or s"),
    };
    let us = v * mult;
    if !us.is_finite() || us < 1.0 {
        bail!("bad delay '{s}': must be at least 1us");
    }
    Ok(us as u64)
}

fn parse_rate(item: &str, rate: &str) -> Result<u64> {
    match parse_bandwidth(rate) {
        Ok(Some(b)) => Ok(b),
        Ok(None) => bail!("--links: '{item}': a {} link needs a rate (use 'unlimited' for none)", item.split(':').next().unwrap_or("")),
        Err(e) => bail!("--links: '{item}': {e}"),
    }
}

/// One `--links` item.
pub fn parse_link(item: &str) -> Result<Link> {
    let item = item.trim();
    if item.eq_ignore_ascii_case("unlimited") {
        return Ok(Link::Unlimited);
    }
    let mut parts = item.split(':');
    let kind = parts.next().unwrap_or("");
    match kind {
        "cap" => {
            let (Some(rate), None) = (parts.next(), parts.next()) else {
                bail!("--links: '{item}': expected cap:RATE, e.g. cap:1gbit");
            };
            Ok(Link::Cap { bytes_per_s: parse_rate(item, rate)?, text: rate.to_string() })
        }
        "tc" => {
            let Some(rate) = parts.next() else { bail!("--links: '{item}': expected tc:RATE[:delay=D], e.g. tc:1gbit:delay=5ms") };
            let bytes_per_s = parse_rate(item, rate)?;
            let (mut delay_us, mut delay_text) = (None, None);
            for opt in parts {
                match opt.split_once('=') {
                    Some(("delay", d)) => {
                        delay_us = Some(parse_delay(d).with_context(|| format!("--links: '{item}'"))?);
                        delay_text = Some(d.to_string());
                    }
                    _ => bail!("--links: '{item}': unknown option '{opt}' (tc links take delay=D)"),
                }
            }
            Ok(Link::Tc { bytes_per_s, text: rate.to_string(), delay_us, delay_text })
        }
        _ => bail!("--links: '{item}': expected unlimited, cap:RATE or tc:RATE[:delay=D]"),
    }
}

/// `--links cap:1gbit,unlimited,tc:1gbit:delay=5ms`.
pub fn parse_links(s: &str) -> Result<Vec<Link>> {
    let mut out: Vec<Link> = Vec::new();
    for item in super::split_list("--links", s)? {
        let l = parse_link(item)?;
        if out.contains(&l) {
            bail!("--links: '{item}' given twice");
        }
        out.push(l);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Clean-up registry and signal handling.

struct Registry {
    netns: Vec<String>,
    files: Vec<PathBuf>,
    pids: Vec<u32>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry { netns: Vec::new(), files: Vec::new(), pids: Vec::new() });
static SIGNAL_PIPE_WR: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

fn with_registry(f: impl FnOnce(&mut Registry)) {
    let mut g = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
    f(&mut g);
}

pub fn register_file(p: &Path) {
    with_registry(|r| r.files.push(p.to_path_buf()));
}
pub fn unregister_file(p: &Path) {
    with_registry(|r| r.files.retain(|f| f != p));
}
pub fn register_pid(pid: u32) {
    with_registry(|r| r.pids.push(pid));
}
pub fn unregister_pid(pid: u32) {
    with_registry(|r| r.pids.retain(|&p| p != pid));
}

extern "C" fn on_signal(sig: libc::c_int) {
    let fd = SIGNAL_PIPE_WR.load(std::sync::atomic::Ordering::Relaxed);
    if fd >= 0 {
        let b = sig as u8;
        // SAFETY: write(2) is async-signal-safe; one byte to our own pipe.
        unsafe { libc::write(fd, &b as *const u8 as *const libc::c_void, 1) };
    }
}

/// Install the SIGINT/SIGTERM/SIGHUP clean-up (once per process).
pub fn install_signal_cleanup() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: pipe2 fills two descriptors.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            eprintln!("pageferry bench: warning: no Ctrl-C clean-up (pipe: {})", std::io::Error::last_os_error());
            return;
        }
        SIGNAL_PIPE_WR.store(fds[1], std::sync::atomic::Ordering::Relaxed);
        let rd = fds[0];
        std::thread::Builder::new()
            .name("bench-signals".into())
            .spawn(move || {
                let mut b = 0u8;
                // SAFETY: blocking read of one byte from our pipe.
                let n = unsafe { libc::read(rd, &mut b as *mut u8 as *mut libc::c_void, 1) };
                if n == 1 {
                    eprintln!("\npageferry bench: interrupted (signal {b}); cleaning up");
                    cleanup_all();
                    std::process::exit(128 + b as i32);
                }
            })
            .expect("spawn signal watcher");
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            // SAFETY: installing a handler that only writes to a pipe.
            unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
                sa.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut sa.sa_mask);
                libc::sigaction(sig, &sa, std::ptr::null_mut());
            }
        }
    });
}

/// Kill the registered children, delete the registered namespaces and files.
fn cleanup_all() {
    let (pids, netns, files) = {
        let mut g = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
        (std::mem::take(&mut g.pids), std::mem::take(&mut g.netns), std::mem::take(&mut g.files))
    };
    for pid in pids {
        // SAFETY: pids of children this process started and has not reaped yet.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    }
    for ns in netns {
        delete_netns(&ns);
    }
    for f in files {
        let _ = std::fs::remove_file(f);
    }
}

// ---------------------------------------------------------------------------------------------
// The network namespace of `tc:` links.

/// Run a command, failing with its stderr.
fn sh(cmd: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(cmd).args(args).output().with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!("`{cmd} {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn delete_netns(ns: &str) {
    let _ = Command::new("ip").args(["netns", "del", ns]).output();
}

fn in_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

/// Why `tc:` links cannot run here, or None when they can be tried.
pub fn tc_unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (network namespaces, veth and tc)".into());
    }
    for tool in ["ip", "tc"] {
        if !in_path(tool) {
            return Some(format!("`{tool}` not found in PATH (install iproute2)"));
        }
    }
    None
}

/// A network namespace with a veth pair to the host; deleted on drop.
pub struct TcNet {
    pub ns: String,
    host_if: String,
    ns_if: String,
    pub host_addr: String,
    /// Where the destination listens (inside the namespace).
    pub ns_addr: String,
}

impl TcNet {
    /// The per-process names and addresses: `pf-bench-<pid>`, veth `pfb<pid>h`/`pfb<pid>n`,
    /// `10.213.A.B/30` with A, B from the pid so that two benches do not collide.
    pub fn names(pid: u32) -> (String, String, String, String, String) {
        let a = pid % 250 + 1;
        let b = (pid / 250 % 63) * 4;
        (
            format!("pf-bench-{pid}"),
            format!("pfb{pid}h"),
            format!("pfb{pid}n"),
            format!("10.213.{a}.{}", b + 1),
            format!("10.213.{a}.{}", b + 2),
        )
    }

    pub fn create() -> Result<Self> {
        if let Some(why) = tc_unavailable() {
            bail!("{why}");
        }
        let (ns, host_if, ns_if, host_addr, ns_addr) = Self::names(std::process::id());
        // Leftovers of an earlier run with the same pid (a crash): remove first.
        delete_netns(&ns);
        let _ = Command::new("ip").args(["link", "del", &host_if]).output();
        sh("ip", &["netns", "add", &ns])?;
        with_registry(|r| r.netns.push(ns.clone()));
        let net = TcNet { ns, host_if, ns_if, host_addr, ns_addr };
        let (ns, h, n) = (net.ns.as_str(), net.host_if.as_str(), net.ns_if.as_str());
        sh("ip", &["link", "add", h, "type", "veth", "peer", "name", n, "netns", ns])?;
        sh("ip", &["addr", "add", &format!("{}/30", net.host_addr), "dev", h])?;
        sh("ip", &["link", "set", h, "up"])?;
        sh("ip", &["-n", ns, "addr", "add", &format!("{}/30", net.ns_addr), "dev", n])?;
        sh("ip", &["-n", ns, "link", "set", n, "up"])?;
        sh("ip", &["-n", ns, "link", "set", "lo", "up"])?;
        Ok(net)
    }

    /// Shape both veth ends for `link` (a `tc:` link), replacing any earlier shaping.
    pub fn shape(&self, link: &Link) -> Result<()> {
        let Link::Tc { bytes_per_s, delay_us, .. } = link else { bail!("not a tc link: {link}") };
        let rate = format!("{}bit", bytes_per_s * 8);
        let burst = tbf_burst(*bytes_per_s).to_string();
        for (netns, dev) in [(None, self.host_if.as_str()), (Some(self.ns.as_str()), self.ns_if.as_str())] {
            let tc = |args: &[&str]| -> Result<()> {
                let mut v: Vec<&str> = Vec::new();
                if let Some(ns) = netns {
                    v.extend(["-n", ns]);
                }
                v.extend(args);
                sh("tc", &v)
            };
            let _ = tc(&["qdisc", "del", "dev", dev, "root"]);
            tc(&["qdisc", "add", "dev", dev, "root", "handle", "1:", "tbf", "rate", &rate, "burst", &burst, "latency", "50ms"])?;
            if let Some(d) = delay_us {
                tc(&["qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:", "netem", "delay", &format!("{d}us"), "limit", "100000"])
                    .context("netem (the kernel's sch_netem) is needed for delay=")?;
            }
        }
        Ok(())
    }
}

/// tbf bucket: 2 ms at the rate, at least 64 KiB (one GSO packet on a veth).
pub fn tbf_burst(bytes_per_s: u64) -> u64 {
    (bytes_per_s / 500).max(64 << 10)
}

impl Drop for TcNet {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.host_if]).output();
        delete_netns(&self.ns);
        let ns = self.ns.clone();
        with_registry(|r| r.netns.retain(|n| *n != ns));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_parse() {
        let v = parse_links("cap:1gbit,unlimited,tc:1gbit,tc:500mbit:delay=5ms").unwrap();
        assert_eq!(v[0], Link::Cap { bytes_per_s: 125_000_000, text: "1gbit".into() });
        assert_eq!(v[1], Link::Unlimited);
        assert_eq!(v[2].rate(), Some(125_000_000));
        assert!(v[2].is_tc());
        assert_eq!(v[3], Link::Tc { bytes_per_s: 62_500_000, text: "500mbit".into(), delay_us: Some(5000), delay_text: Some("5ms".into()) });
        assert_eq!(v[3].name(), "tc:500mbit:delay=5ms");
        assert_eq!(v[3].slug(), "tc-500mbit-delay-5ms");
        assert_eq!(v[0].slug(), "cap-1gbit");
    }

    #[test]
    fn link_errors_are_clear() {
        for (bad, want) in [
            ("cap", "expected cap:RATE"),
            ("cap:fast", "bad bandwidth"),
            ("cap:0", "needs a rate"),
            ("tc:1gbit:jitter=1ms", "unknown option 'jitter=1ms'"),
            ("tc:1gbit:delay=5", "unit must be"),
            ("wifi:1gbit", "expected unlimited, cap:RATE or tc:RATE"),
            ("cap:1gbit,cap:1gbit", "given twice"),
            ("cap:1gbit,", "empty item"),
        ] {
            let e = format!("{:#}", parse_links(bad).unwrap_err());
            assert!(e.contains("--links") && e.contains(want), "{bad}: {e}");
        }
    }

    #[test]
    fn netns_names_fit() {
        let (ns, h, n, a, b) = TcNet::names(4_194_303);
        assert_eq!(ns, "pf-bench-4194303");
        assert!(h.len() <= 15 && n.len() <= 15);
        assert!(a.starts_with("10.213.") && b.starts_with("10.213."));
        let last = |s: &str| s.rsplit('.').next().unwrap().parse::<u32>().unwrap();
        assert_eq!(last(&a) % 4, 1);
        assert_eq!(last(&b), last(&a) + 1);
        assert_eq!(tbf_burst(125_000_000), 250_000);
        assert_eq!(tbf_burst(1000), 64 << 10);
    }
}

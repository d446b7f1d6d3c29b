//! Command-line flags shared by several subcommands, named after QEMU's migration parameters.

use anyhow::{bail, Context, Result};
use clap::Args;
use pageferry::codec::{qatzip::QatzipOptions, CodecSpec, Method};
use pageferry::engine::ratelimit::parse_bandwidth;
use pageferry::engine::policy::{AutoConfig, Candidate};
use pageferry::engine::{AutoConverge, PostcopyConfig, SourceConfig};
use std::path::PathBuf;
use std::time::Duration;

/// Method and level flags (both sides).
#[derive(Args, Clone, Debug)]
pub struct MethodArgs {
    /// Compression method: none, zlib, zstd, qatzip, or auto. Source: the method to use
    /// (default none); auto picks method and level per window from the measured link, CPU
    /// and ratio. Destination: accept only this method (default, and auto: any it decodes).
    #[arg(long = "multifd-compression")]
    pub method: Option<String>,
    #[command(flatten)]
    pub levels: LevelArgs,
    /// qatzip provider: auto (QATzip library if present, else cpu), qat, cpu.
    #[arg(long = "qatzip-provider", default_value = "auto")]
    pub qatzip_provider: String,
    /// Path of libqatzip.so (default: $PAGEFERRY_QATZIP_LIB, else the system's libqatzip.so.3).
    #[arg(long = "qatzip-lib")]
    pub qatzip_lib: Option<PathBuf>,
}

impl MethodArgs {
    /// `--multifd-compression auto`.
    pub fn is_auto(&self) -> bool {
        self.method.as_deref().map(str::trim) == Some("auto")
    }
    /// A destination accepts only the given method (not auto, not left out).
    pub fn restricts(&self) -> bool {
        self.method.is_some() && !self.is_auto()
    }
    /// The method's spec (none when not given or auto: then only the local options count).
    pub fn spec(&self) -> Result<CodecSpec> {
        let name = if self.is_auto() { "none" } else { self.method.as_deref().unwrap_or("none") };
        let method: Method = name.parse()?;
        let mut spec = CodecSpec::with_level(method, self.levels.level(method))?;
        spec.qatzip = QatzipOptions { provider: self.qatzip_provider.parse()?, lib_path: self.qatzip_lib.clone() };
        Ok(spec)
    }
}

/// `--multifd-<method>-level L` for every method of the codec registry that has levels
/// (QEMU's names), each defaulting to the method's default level.
#[derive(Clone, Debug, Default)]
pub struct LevelArgs {
    /// (method, level given or defaulted)
    levels: Vec<(Method, i32)>,
}

impl LevelArgs {
    fn flag(m: Method) -> String {
        format!("multifd-{}-level", m.name())
    }
    fn with_levels() -> impl Iterator<Item = Method> {
        Method::all().filter(|m| m.levels().min < m.levels().max)
    }
    /// The level for `method`: its flag's value, or its default (methods without levels).
    pub fn level(&self, method: Method) -> i32 {
        self.levels.iter().find(|(m, _)| *m == method).map_or(method.default_level(), |&(_, l)| l)
    }
}

impl clap::FromArgMatches for LevelArgs {
    fn from_arg_matches(matches: &clap::ArgMatches) -> Result<Self, clap::Error> {
        let mut s = Self::default();
        s.update_from_arg_matches(matches)?;
        Ok(s)
    }
    fn update_from_arg_matches(&mut self, matches: &clap::ArgMatches) -> Result<(), clap::Error> {
        for m in Self::with_levels() {
            if let Some(&l) = matches.get_one::<i32>(&Self::flag(m)) {
                self.levels.retain(|(x, _)| *x != m);
                self.levels.push((m, l));
            }
        }
        Ok(())
    }
}

impl Args for LevelArgs {
    fn augment_args(mut cmd: clap::Command) -> clap::Command {
        for m in Self::with_levels() {
            let l = m.levels();
            cmd = cmd.arg(
                clap::Arg::new(Self::flag(m))
                    .long(Self::flag(m))
                    .value_name("LEVEL")
                    .value_parser(clap::value_parser!(i32))
                    .allow_negative_numbers(true)
                    .default_value(l.default.to_string())
                    .help(format!("{m} level, {} to {}{}", l.min, l.max, if l.min < 0 { " (negative: fast levels)" } else { "" })),
            );
        }
        cmd
    }
    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

/// Source-side engine flags.
#[derive(Args, Clone, Debug)]
pub struct SourceArgs {
    /// Number of parallel data channels.
    #[arg(long = "multifd-channels", default_value_t = 2)]
    pub channels: usize,
    #[command(flatten)]
    pub method: MethodArgs,
    /// Batches each channel keeps in flight to its compressor (default: the method's choice).
    #[arg(long = "pipeline-depth")]
    pub pipeline_depth: Option<usize>,
    /// Switch over when the switchover is expected to fit this many milliseconds: its fixed
    /// cost measured on the rounds plus the rest at the measured rate (verification's memory
    /// digests come on top; see the report's `switchover`).
    #[arg(long = "downtime-limit", default_value_t = 300)]
    pub downtime_limit_ms: u64,
    /// Give up after this many rounds (the source keeps running).
    #[arg(long = "max-rounds", default_value_t = 30)]
    pub max_rounds: u32,
    /// Give up after this many seconds (the source keeps running).
    #[arg(long = "timeout", default_value_t = 600)]
    pub timeout_s: u64,
    /// Cap on wire bytes/s across all channels: bytes, or with a unit (125MB, 1gbit, 100MiB).
    #[arg(long = "max-bandwidth")]
    pub max_bandwidth: Option<String>,
    /// With --multifd-compression auto: cores the compression workers may use together
    /// (default: one per channel and pipeline slot). Planned with, and enforced: at most
    /// ceil(CORES) batches are compressed at once.
    #[arg(long = "max-cpu")]
    pub max_cpu: Option<f64>,
    /// With --multifd-compression auto: the candidates, comma-separated METHOD[:LEVEL]
    /// (default: none,zlib:1,zstd:1,zstd:3 with ISA-L, none,zstd:-3,zstd:1,zstd:3 without;
    /// plus qatzip:1 when a QAT device is present). Named, they are the whole list.
    #[arg(long = "auto-candidates")]
    pub auto_candidates: Option<String>,
    /// Skip the end-to-end memory digest comparison.
    #[arg(long = "no-verify")]
    pub no_verify: bool,
    /// Seconds a channel (data or control) may stay silent before the migration fails.
    #[arg(long = "stall-timeout", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub stall_timeout_s: u64,
    /// Throttle the workload when pre-copy does not converge (QEMU's auto-converge).
    #[arg(long = "auto-converge")]
    pub auto_converge: bool,
    /// Auto-converge: first throttle, percent.
    #[arg(long = "cpu-throttle-initial", default_value_t = 20)]
    pub cpu_throttle_initial: u8,
    /// Auto-converge: throttle step, percent.
    #[arg(long = "cpu-throttle-increment", default_value_t = 10)]
    pub cpu_throttle_increment: u8,
    /// Auto-converge: highest throttle, percent.
    #[arg(long = "max-cpu-throttle", default_value_t = 99)]
    pub max_cpu_throttle: u8,
    /// Auto-converge: a round counts as "dirtying too fast" when the guest dirtied more than
    /// this percentage of the bytes transferred.
    #[arg(long = "throttle-trigger-threshold", default_value_t = 50)]
    pub throttle_trigger_threshold: u8,
    /// May switch to postcopy when pre-copy does not converge: the guest then runs on the
    /// destination, which asks for the pages it touches (needs the destination's memory on
    /// tmpfs or anonymous, and userfaultfd).
    #[arg(long = "postcopy")]
    pub postcopy: bool,
    /// Switch to postcopy after this many pre-copy rounds (implies --postcopy).
    #[arg(long = "postcopy-after-rounds")]
    pub postcopy_after_rounds: Option<u32>,
    /// Copy every batch before compressing/sending (measures what zero copy saves).
    #[arg(long = "no-zero-copy")]
    pub no_zero_copy: bool,
    #[command(flatten)]
    pub tls: crate::tls::SendTlsArgs,
}

impl SourceArgs {
    pub fn config(&self) -> Result<SourceConfig> {
        if self.channels == 0 || self.channels > 256 {
            bail!("--multifd-channels must be between 1 and 256");
        }
        let max_bandwidth = match &self.max_bandwidth {
            Some(s) => parse_bandwidth(s).map_err(anyhow::Error::msg).context("--max-bandwidth")?,
            None => None,
        };
        let auto_converge = self.auto_converge.then_some(AutoConverge {
            initial: self.cpu_throttle_initial,
            increment: self.cpu_throttle_increment,
            max: self.max_cpu_throttle,
            trigger_threshold: self.throttle_trigger_threshold,
        });
        if let Some(ac) = &auto_converge {
            ac.validate().map_err(anyhow::Error::msg)?;
        }
        if self.postcopy_after_rounds == Some(0) {
            bail!("--postcopy-after-rounds must be at least 1 (round 0 sends all memory)");
        }
        let postcopy = (self.postcopy || self.postcopy_after_rounds.is_some()).then_some(PostcopyConfig { after_rounds: self.postcopy_after_rounds });
        let auto_on = self.method.is_auto();
        if !auto_on && (self.max_cpu.is_some() || self.auto_candidates.is_some()) {
            bail!("--max-cpu and --auto-candidates need --multifd-compression auto");
        }
        let auto = if auto_on {
            let mut c = AutoConfig::default();
            if let Some(m) = self.max_cpu {
                if !(m > 0.0 && m.is_finite()) {
                    bail!("--max-cpu must be a positive number of cores, got {m}");
                }
                c.max_cpu = Some(m);
            }
            if let Some(list) = &self.auto_candidates {
                // Named candidates are the list: no accelerated method added by itself.
                c.hardware_candidates = false;
                c.candidates = list.split(',').map(|x| x.trim().parse::<Candidate>().map_err(anyhow::Error::msg)).collect::<Result<_>>().context("--auto-candidates")?;
            }
            Some(c)
        } else {
            None
        };
        // With auto, the method flag's options (qatzip provider, library) still apply.
        let codec = self.method.spec()?;
        Ok(SourceConfig {
            auto_converge,
            postcopy,
            channels: self.channels,
            codec,
            auto,
            pipeline_depth: self.pipeline_depth,
            downtime_limit: Duration::from_millis(self.downtime_limit_ms),
            max_rounds: self.max_rounds.max(1),
            timeout: Duration::from_secs(self.timeout_s),
            max_bandwidth,
            verify: !self.no_verify,
            stall_timeout: Duration::from_secs(self.stall_timeout_s),
            cancel: crate::cancel_token(),
            zero_copy: !self.no_zero_copy,
            tls: self.tls.client_config()?,
            ..Default::default()
        })
    }
}

/// Parse a size: bytes or with a suffix (K, M, G, T; powers of 1024; KiB etc. accepted).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("bad size '{s}': expected e.g. 1G, 256M, 4096"))?;
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        u => return Err(format!("bad size '{s}': unknown unit '{u}'")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("size '{s}' too large"))
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn sizes() {
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("256MiB"), Ok(256 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("").is_err());
    }
}

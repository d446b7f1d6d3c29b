//! Tests of `policy.rs`: kept in their own file so `policy.rs` reads as the code it is.

use super::*;

fn named(name: &str) -> Method {
    name.parse().unwrap()
}

const BATCH: u64 = 512 << 10;

/// A synthetic world: per-candidate CPU rate (raw bytes/s per core) and ratio (raw/wire),
/// a link (wire bytes/s). Batches flow through a two-stage pipeline; time advances by the
/// slower stage.
struct World {
    cpu: Vec<(Candidate, f64, f64)>,
    link: f64,
    now: f64,
    cores: f64,
}

impl World {
    fn new(link: f64, cpu_scale: f64) -> Self {
        let c = |m, l, rate: f64, ratio| (Candidate::new(m, l), rate * cpu_scale, ratio);
        Self {
            cpu: vec![
                c(named("zstd"), -5, 900e6, 2.1),
                c(named("zstd"), -1, 650e6, 2.5),
                c(named("zstd"), 1, 410e6, 3.06),
                c(named("zstd"), 3, 230e6, 3.34),
                c(named("zlib"), 1, 480e6, 2.83),
            ],
            link,
            now: 0.0,
            cores: 2.0,
        }
    }
    fn policy(&self) -> Policy {
        Policy::new(&self.cpu.iter().map(|c| c.0).collect::<Vec<_>>(), AutoConfig::default(), 2, self.now)
    }
    /// Run `batches` batches; returns the share of batches per candidate.
    fn run(&mut self, p: &mut Policy, batches: usize) -> std::collections::HashMap<Candidate, usize> {
        let mut used = std::collections::HashMap::new();
        let (mut wire_w, mut busy_w, mut t_w) = (0u64, 0.0, self.now);
        for _ in 0..batches {
            let ch = p.choose(self.now);
            *used.entry(ch.candidate).or_insert(0) += 1;
            let (secs, wire) = match self.cpu.iter().find(|c| c.0 == ch.candidate) {
                Some(&(_, rate, ratio)) => (BATCH as f64 / rate, (BATCH as f64 / ratio) as u64),
                None => (0.0, BATCH),
            };
            p.record(&ch, BATCH, wire, secs);
            let mut sampled = 0.0;
            if let Some(j) = ch.sample {
                let &(_, rate, ratio) = self.cpu.iter().find(|c| c.0 == p.candidates()[j]).expect("samples compressors");
                let raw = SAMPLE_BYTES as f64;
                sampled = raw / rate;
                p.record_sample(j, SAMPLE_BYTES as u64, (raw / ratio) as u64, sampled);
            }
            let secs = secs + sampled;
            let link_s = wire as f64 / self.link;
            self.now += (secs / self.cores).max(link_s);
            wire_w += wire;
            busy_w += link_s * 2.0; // two writers share the link
            if p.window_due(self.now) {
                let s = LinkSample { wire_bytes: wire_w, busy_s: busy_w, writers: 2, wall_s: self.now - t_w, cap: None };
                p.decide(self.now, s);
                (wire_w, busy_w, t_w) = (0, 0.0, self.now);
            }
        }
        used
    }
}

#[test]
fn slow_link_picks_a_compressing_method() {
    // 100 Mbit/s: the link is the bottleneck for every candidate; the best ratio wins.
    let mut w = World::new(12.5e6, 1.0);
    let mut p = w.policy();
    w.run(&mut p, 400);
    assert_eq!(p.current(), Candidate::new(named("zstd"), 3), "{}", p.report().last_reason);
}

#[test]
fn fast_link_and_slow_cpu_pick_none() {
    // 2 GB/s link, a CPU five times slower than this machine's: compressing only costs.
    let mut w = World::new(2e9, 0.2);
    let mut p = w.policy();
    let used = w.run(&mut p, 600);
    assert_eq!(p.current(), Candidate::none(), "{}", p.report().last_reason);
    // After the first window it stays there, apart from probes.
    let none = used[&Candidate::none()];
    assert!(none > 500, "none used for {none} of 600 batches: {used:?}");
}

#[test]
fn gigabit_link_picks_the_fastest_method_that_keeps_it_full() {
    // 1 Gbit/s, 2 cores: zstd:3 would be CPU bound (460 MB/s raw < 3.34 × 125 MB/s), so
    // the model prefers a candidate whose pipeline is shortest.
    let mut w = World::new(125e6, 1.0);
    let mut p = w.policy();
    w.run(&mut p, 600);
    let best = w
        .cpu
        .iter()
        .map(|&(c, rate, ratio)| (c, (1.0 / (rate * 2.0)).max(1.0 / ratio / 125e6)))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap();
    let cur = p.current();
    let t_cur = w.cpu.iter().find(|c| c.0 == cur).map(|&(_, r, q)| (1.0 / (r * 2.0)).max(1.0 / q / 125e6)).unwrap();
    assert!(t_cur <= best.1 * 1.07, "chose {cur} ({t_cur}), best {} ({}): {}", best.0, best.1, p.report().last_reason);
    assert!(cur.compresses());
}

#[test]
fn a_changing_link_changes_the_choice() {
    let mut w = World::new(2e9, 0.2);
    let mut p = w.policy();
    w.run(&mut p, 300);
    assert_eq!(p.current(), Candidate::none());
    w.link = 12.5e6;
    w.run(&mut p, 300);
    assert!(p.current().compresses(), "slow link, still {}: {}", p.current(), p.report().last_reason);
    w.link = 2e9;
    w.run(&mut p, 300);
    assert_eq!(p.current(), Candidate::none(), "{}", p.report().last_reason);
    let r = p.report();
    assert!(r.switches >= 2, "{r:?}");
    assert!(r.share_of("none") > 0.3 && r.share_of("none") < 0.9, "{}", r.summary());
}

#[test]
fn candidates_are_probed_but_cheaply() {
    let mut w = World::new(2e9, 1.0);
    let mut p = w.policy();
    w.run(&mut p, 4000);
    // Every candidate was measured (a whole batch, or a slice of one once out of the race) ...
    let r = p.report();
    for c in &w.cpu {
        let s = r.shares.iter().find(|s| s.candidate == c.0.to_string()).unwrap();
        assert!(s.batches + s.sampled >= 2, "{} never probed: {r:?}", c.0);
    }
    // ... and probes stayed a small share of the batches.
    let probes: u64 = p.report().shares.iter().map(|s| s.probes).sum();
    assert!(probes < 4000 / 10, "{probes} probes in 4000 batches");
}

#[test]
fn near_ties_do_not_flap() {
    // Two candidates 3% apart, measurements jittering by ±4% window to window: the
    // hysteresis keeps whichever was chosen first.
    let a = Candidate::new(named("zstd"), 1);
    let b = Candidate::new(named("zlib"), 1);
    let mut p = Policy::new(&[a, b], AutoConfig { probe_gap: 4, ..Default::default() }, 2, 0.0);
    let mut now = 0.0;
    for k in 0..200 {
        let jitter = if k % 2 == 0 { 1.04 } else { 0.96 };
        for _ in 0..64 {
            let ch = p.choose(now);
            let (rate, ratio) = if ch.candidate == a { (400e6 * jitter, 3.0) } else { (400e6 / jitter, 2.91) };
            let wire = (BATCH as f64 / ratio) as u64;
            p.record(&ch, BATCH, wire, if ch.candidate.compresses() { BATCH as f64 / rate } else { 0.0 });
            now += wire as f64 / 12.5e6;
        }
        p.decide(now, LinkSample { wire_bytes: 64 * BATCH / 3, busy_s: 2.0 * 64.0 * (BATCH as f64 / 3.0) / 12.5e6, writers: 2, wall_s: 64.0 * (BATCH as f64 / 3.0) / 12.5e6, cap: None });
    }
    assert!(p.report().switches <= 2, "{} switches: {:?}", p.report().switches, p.report().switch_log);
}

#[test]
fn link_sample_extrapolates_idle_writers_and_respects_the_cap() {
    // Writers busy a quarter of the time moved 100 MB/s: they could move 400.
    let s = LinkSample { wire_bytes: 100_000_000, busy_s: 0.5, writers: 2, wall_s: 1.0, cap: None };
    assert_eq!(s.rate(), Some(400e6));
    assert_eq!(LinkSample { cap: Some(125e6), ..s }.rate(), Some(125e6));
    assert_eq!(LinkSample { wire_bytes: 0, ..s }.rate(), None);
}

#[test]
fn the_cpu_budget_bounds_the_compressing_rate() {
    // Fast link but only a tenth of a core: compression cannot keep up; none wins even
    // though the same CPU with 2 cores would compress.
    let cands: Vec<Candidate> = World::new(1.0, 1.0).cpu.iter().map(|c| c.0).collect();
    let mut p = Policy::new(&cands, AutoConfig { max_cpu: Some(0.1), ..Default::default() }, 2, 0.0);
    assert_eq!(p.report().cores, 0.1);
    let mut now = 0.0;
    for _ in 0..3 {
        for _ in 0..64 {
            let ch = p.choose(now);
            let wire = if ch.candidate.compresses() { BATCH / 3 } else { BATCH };
            p.record(&ch, BATCH, wire, if ch.candidate.compresses() { BATCH as f64 / 400e6 } else { 0.0 });
            now += 0.001;
        }
        p.decide(now, LinkSample { wire_bytes: 64 * BATCH, busy_s: 0.128, writers: 2, wall_s: 0.064, cap: Some(500e6) });
    }
    assert_eq!(p.current(), Candidate::none(), "{}", p.report().last_reason);
}

#[test]
fn a_worker_stage_slower_than_the_link_picks_none() {
    // The engine measures a worker's whole time on a batch, waiting for a core included:
    // on a shared machine 150 MB/s per worker of zstd:1 (ratio 3) on 2 workers is 300 MB/s
    // of raw bytes, less than none's 500 MB/s link. The policy picks none.
    let z = "zstd:1".parse::<Candidate>().unwrap();
    let mut p = Policy::new(&[z], AutoConfig::default(), 2, 0.0);
    let mut now = 0.0;
    for _ in 0..6 {
        let mut wire = 0u64;
        let t0 = now;
        for _ in 0..64 {
            let ch = p.choose(now);
            let w = if ch.candidate.compresses() { BATCH / 3 } else { BATCH };
            p.record(&ch, BATCH, w, if ch.candidate.compresses() { BATCH as f64 / 150e6 } else { 0.0 });
            wire += w;
            now += if ch.candidate.compresses() { BATCH as f64 / 300e6 } else { BATCH as f64 / 500e6 };
        }
        let link_s = wire as f64 / 500e6;
        p.decide(now, LinkSample { wire_bytes: wire, busy_s: 2.0 * link_s, writers: 2, wall_s: now - t0, cap: None });
    }
    assert_eq!(p.current(), Candidate::none(), "{}", p.report().last_reason);
}

#[test]
fn zero_heavy_windows_keep_the_compressor() {
    // 1 Gbit/s and a half-idle guest: 7 of 8 batches are zero pages only (nothing to
    // compress, a quick scan), so the writers idle half the time and few raw bytes move
    // per second. That is no sign of a slow CPU: zstd:1 still beats none on the raw bytes
    // there are. (An earlier version read it as "the workers get 13% of their cores" and
    // flapped to none.)
    let z = "zstd:1".parse::<Candidate>().unwrap();
    let mut p = Policy::new(&[z], AutoConfig::default(), 2, 0.0);
    let (link, scan) = (125e6, 0.0005);
    let mut now = 0.0;
    let mut used_none = 0;
    for _ in 0..20 {
        let (t0, mut wire, mut busy) = (now, 0u64, 0.0);
        for k in 0..64 {
            let ch = p.choose(now);
            if k % 8 != 0 {
                // All zero pages: no raw bytes, no payload, a scan.
                p.record(&ch, 0, 0, scan);
                now += scan / 2.0;
                continue;
            }
            used_none += !ch.candidate.compresses() as usize;
            let (w, secs) = if ch.candidate.compresses() { (BATCH / 3, BATCH as f64 / 410e6) } else { (BATCH, scan) };
            p.record(&ch, BATCH, w, secs);
            let link_s = w as f64 / link;
            now += link_s.max(secs / 2.0);
            (wire, busy) = (wire + w, busy + 2.0 * link_s);
        }
        p.decide(now, LinkSample { wire_bytes: wire, busy_s: busy, writers: 2, wall_s: now - t0, cap: Some(link) });
    }
    assert_eq!(p.current(), z, "{}", p.report().last_reason);
    assert_eq!(p.report().switches, 1, "{:?}", p.report().switch_log);
    assert!(used_none < 20, "{used_none} of 160 raw batches went with none");
}

#[test]
fn far_slower_candidates_are_probed_less_and_less() {
    // Loopback-fast link, slow CPU: every compressor is predicted several times slower than
    // none. After the first windows their probes thin out to one per max_probe_gap.
    let mut w = World::new(2e9, 0.2);
    let mut p = w.policy();
    w.run(&mut p, 1000);
    let early: u64 = p.report().shares.iter().map(|s| s.probes).sum();
    w.run(&mut p, 8000);
    let late = p.report().shares.iter().map(|s| s.probes).sum::<u64>() - early;
    assert_eq!(p.current(), Candidate::none());
    // 5 candidates, each at most once per 1024 batches once backed off (plus the windows
    // in which the gaps grew).
    assert!(late <= 5 * (8000 / 1024 + 2), "{late} probes in 8000 batches after the first 1000 ({early} before)");
    assert!(early < 100, "{early} probes in the first 1000 batches");
    // A candidate close to the current one keeps being probed at probe_gap: on the 2 GB/s
    // link with this machine's CPU, zstd:-5 is within 30% of none.
    let mut w = World::new(2e9, 1.0);
    let mut p = w.policy();
    w.run(&mut p, 4000);
    let fast = p.report().shares.iter().find(|s| s.candidate == "zstd:-5").unwrap().probes;
    assert!(fast > 4000 / 16 / 5 / 2, "zstd:-5 probed {fast} times in 4000 batches");
}

#[test]
fn a_compressor_whose_worker_stage_alone_loses_backs_off_at_once() {
    // Loopback-fast link, slow CPU: each compressor's worker stage alone is several times
    // slower than none's whole pipeline, so no ratio makes it win. From the first decision on
    // it is probed once per max_probe_gap, without the windows of doubling in between.
    let mut w = World::new(2e9, 0.2);
    let mut p = w.policy();
    w.run(&mut p, 12);
    assert_eq!(p.report().decisions, 1, "the first window ends once every candidate was probed");
    assert!(p.gap.iter().skip(1).all(|&g| g == p.cfg.max_probe_gap), "{:?}", p.gap);
    w.run(&mut p, 2048 - 12);
    assert_eq!(p.current(), Candidate::none());
    // 5 compressors: one probe each before the first decision, then one per 1024 batches,
    // on a slice of a batch that none carries.
    let r = p.report();
    let probes: u64 = r.shares.iter().map(|s| s.probes).sum();
    let sampled: u64 = r.shares.iter().map(|s| s.sampled).sum();
    assert_eq!(probes, 5, "{r:?}");
    assert!((5..=10).contains(&sampled), "{sampled} sampled probes in 2048 batches: {r:?}");
    assert_eq!(r.share_of("none"), 1.0 - 5.0 / 2048.0);
    // A link that gets faster (TCP ramping up on loopback) only puts them further behind:
    // their gaps stay; a slower one brings them back. (No CPU budget here: it alone would
    // hold the probes back in this short run.)
    let mut w = World::new(0.5e9, 0.2);
    let cands: Vec<Candidate> = w.cpu.iter().map(|c| c.0).collect();
    let mut p = Policy::new(&cands, AutoConfig { probe_cpu_share: 1.0, ..AutoConfig::default() }, 2, w.now);
    w.run(&mut p, 200);
    assert!(p.gap.iter().skip(1).all(|&g| g == p.cfg.max_probe_gap), "{:?}", p.gap);
    let before: u64 = p.report().shares.iter().map(|s| s.probes).sum();
    w.link = 2e9;
    w.run(&mut p, 200);
    let during = p.report().shares.iter().map(|s| s.probes).sum::<u64>() - before;
    assert_eq!(during, 0, "probes once the link got faster");
    assert!(p.gap.iter().skip(1).all(|&g| g == p.cfg.max_probe_gap), "faster link: {:?}", p.gap);
    w.link = 12.5e6;
    w.run(&mut p, 200);
    assert!(p.gap.iter().skip(1).any(|&g| g == p.cfg.probe_gap), "slower link: {:?}", p.gap);
    // A compressor within reach (zstd:-5 at this machine's CPU on a 2 GB/s link: its worker
    // stage is 1.1x none's time) is not cut off.
    let mut w = World::new(2e9, 1.0);
    let mut p = w.policy();
    w.run(&mut p, 12);
    let i = p.cands.iter().position(|c| c.to_string() == "zstd:-5").unwrap();
    assert_eq!(p.gap[i], p.cfg.probe_gap, "{:?}", p.gap);
}

#[test]
fn samples_keep_measuring_compressors_out_of_the_race_and_a_slower_link_brings_whole_probes_back() {
    let mut w = World::new(2e9, 0.2);
    let mut p = w.policy();
    w.run(&mut p, 3000);
    assert_eq!(p.current(), Candidate::none());
    let r = p.report();
    assert!(r.shares.iter().skip(1).all(|s| s.sampled >= 2), "every compressor sampled: {r:?}");
    // What the samples measured is what the policy knows of them: each compressor's ratio.
    for (i, c) in p.cands.iter().enumerate().skip(1) {
        let want = 1.0 / w.cpu.iter().find(|x| x.0 == *c).unwrap().2;
        let got = p.est[i].ratio.unwrap();
        assert!((got - want).abs() < 0.01, "{c}: ratio estimate {got}, world {want}");
    }
    // The link drops to 100 Mbit/s: auto compresses, and probes are whole batches again
    // (samples only while none carries the migration).
    let before: u64 = r.shares.iter().map(|s| s.sampled).sum();
    w.link = 12.5e6;
    w.run(&mut p, 300);
    assert!(p.current().compresses(), "{}", p.report().last_reason);
    let r = p.report();
    assert_eq!(r.shares.iter().map(|s| s.sampled).sum::<u64>(), before, "no samples while compressing: {r:?}");
    assert!(r.shares.iter().map(|s| s.probes).sum::<u64>() > 5, "{r:?}");
}

#[test]
fn a_link_that_moves_brings_probes_back() {
    // Backed off on a fast link, then the link drops to 100 Mbit/s: the policy switches to
    // a compressor at the next decision and probes the others at probe_gap again.
    let mut w = World::new(2e9, 0.2);
    let mut p = w.policy();
    w.run(&mut p, 3000);
    assert_eq!(p.current(), Candidate::none());
    assert!(p.gap.iter().skip(1).all(|&g| g > 64), "{:?}", p.gap);
    w.link = 12.5e6;
    w.run(&mut p, 130);
    assert!(p.current().compresses(), "{}", p.report().last_reason);
    let near = p.gap.iter().filter(|&&g| g == p.cfg.probe_gap).count();
    assert!(near >= 2, "{:?}", p.gap);
}

/// Batch `k`'s compressibility, a factor on every candidate's ratio: on the silesia-like
/// image batches differ far more from each other than candidates do on one batch.
fn content(k: u64) -> f64 {
    [0.5, 1.0, 2.5, 0.7, 1.6, 3.0, 0.6, 1.2][(k.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 61) as usize]
}

/// Drive `p` through `windows` windows of 64 batches on a `link` (wire bytes/s) with two
/// workers, batch `k` of content `content(k)`. `world(c, carrying)`: candidate c's raw
/// bytes/s per worker (when `carrying`: c is the current one, every worker on it) and
/// ratio. Paired probes are recorded as the engine does. Returns batches per candidate.
fn drive(p: &mut Policy, now: &mut f64, k: &mut u64, windows: usize, link: f64, world: impl Fn(Candidate, bool) -> (f64, f64)) -> std::collections::HashMap<Candidate, u64> {
    let mut used = std::collections::HashMap::new();
    let cur_of = |p: &Policy, i: usize| p.candidates()[i];
    for _ in 0..windows {
        let (t0, mut wire_w) = (*now, 0u64);
        for _ in 0..64 {
            *k += 1;
            let ch = p.choose(*now);
            *used.entry(ch.candidate).or_insert(0) += 1;
            let wire_of = |c: Candidate| match world(c, false).1 {
                _ if !c.compresses() => BATCH,
                r => ((BATCH as f64 / (r * content(*k))) as u64).min(BATCH),
            };
            let (rate, _) = world(ch.candidate, !ch.probe);
            let (wire, secs) = if ch.candidate.compresses() { (wire_of(ch.candidate), BATCH as f64 / rate) } else { (BATCH, 0.0) };
            p.record(&ch, BATCH, wire, secs);
            if let Some(j) = ch.shadow {
                let cur = cur_of(p, j);
                p.record_pair(&ch, BATCH, wire, wire_of(cur), BATCH as f64 / world(ch.candidate, false).0, BATCH as f64 / world(cur, false).0);
            }
            *now += (secs / 2.0).max(wire as f64 / link);
            wire_w += wire;
        }
        let link_s = wire_w as f64 / link;
        p.decide(*now, LinkSample { wire_bytes: wire_w, busy_s: 2.0 * link_s, writers: 2, wall_s: *now - t0, cap: Some(link) });
    }
    used
}

#[test]
fn paired_probes_see_through_batches_that_differ() {
    // 100 Mbit/s, every candidate link bound: the best ratio wins. zstd:1 (3.06) beats
    // zlib:1 (2.83) by 8% on every batch, but one batch differs from the next by up to 6x.
    // Paired with the current candidate on the same batches, the probes see the 8%; the
    // policy settles on zstd:1 and stays.
    let (z, d) = ("zstd:1".parse::<Candidate>().unwrap(), "zlib:1".parse::<Candidate>().unwrap());
    let world = |c: Candidate, _| if c == z { (340e6, 3.06) } else if c == d { (480e6, 2.83) } else { (5e9, 1.0) };
    for start in [z, d] {
        let mut p = Policy::new(&[z, d], AutoConfig::default(), 2, 0.0);
        // Start from one or the other: the first decision, from unpaired probes, may pick either.
        p.current = p.candidates().iter().position(|&c| c == start).unwrap();
        let (mut now, mut k) = (0.0, 0);
        let used = drive(&mut p, &mut now, &mut k, 60, 12.5e6, world);
        assert_eq!(p.current(), z, "from {start}: {}", p.report().last_reason);
        assert!(p.report().switches <= 1, "from {start}: {:?}", p.report().switch_log);
        assert!(used[&z] > 60 * 64 * 8 / 10, "from {start}: {used:?}");
    }
}

#[test]
fn a_candidate_slower_than_its_probes_promised_is_tried_once() {
    // 1 Gbit/s. Probed one batch at a time, zstd:3 (ratio 3.34, 250 MB/s per core) keeps
    // the link full on two cores and beats zstd:1 on ratio; carrying the migration its
    // workers get a fraction of their cores (the destination decodes on the same
    // machine) and it falls to 120 MB/s per worker: CPU bound, slower than zstd:1. The
    // policy tries it, goes back, and does not try again while that measurement is fresh.
    let (z1, z3) = ("zstd:1".parse::<Candidate>().unwrap(), "zstd:3".parse::<Candidate>().unwrap());
    let world = |c: Candidate, carrying: bool| {
        if c == z1 {
            (340e6, 3.06)
        } else if c == z3 {
            (if carrying { 120e6 } else { 250e6 }, 3.34)
        } else {
            (5e9, 1.0)
        }
    };
    let mut p = Policy::new(&[z1, z3], AutoConfig { hysteresis: 0.03, ..Default::default() }, 2, 0.0);
    p.current = 1;
    let (mut now, mut k) = (0.0, 0);
    drive(&mut p, &mut now, &mut k, 80, 125e6, world);
    assert!(now < p.cfg.loaded_ttl_s, "the test needs fresh measurements: {now} s");
    assert_eq!(p.current(), z1, "{}", p.report().last_reason);
    let to_z3 = p.report().switch_log.iter().filter(|s| s.1 == "zstd:3").count();
    assert_eq!(to_z3, 1, "{:?}", p.report().switch_log);
    // Once the link moves, the old measurement no longer holds.
    assert!(p.est[2].loaded.is_some());
    drive(&mut p, &mut now, &mut k, 2, 12.5e6, world);
    assert!(p.est[2].loaded.is_none() || p.current() == z3, "{}", p.report().last_reason);
}

#[test]
fn after_a_switch_every_other_compressor_is_paired_at_once() {
    // zstd:3 looked hopeless in the first window (one unpaired probe under start-up load
    // said 60 MB/s per core) and was backed off; once a compressor carries the migration
    // it is paired with it within a few dozen batches all the same, and judged on that.
    let (z1, z3, d) = ("zstd:1".parse::<Candidate>().unwrap(), "zstd:3".parse::<Candidate>().unwrap(), "zlib:1".parse::<Candidate>().unwrap());
    let mut p = Policy::new(&[z1, z3, d], AutoConfig::default(), 2, 0.0);
    let i3 = p.candidates().iter().position(|&c| c == z3).unwrap();
    p.est[i3] = Estimate { cpu_rate: Some(60e6), ratio: Some(1.0 / 3.3), loaded: None };
    p.gap[i3] = 512;
    p.due[i3] = 1 << 20;
    let id = p.candidates().iter().position(|&c| c == d).unwrap();
    p.current = id;
    let mut pairs = 0;
    for k in 0..40u64 {
        let ch = p.choose(k as f64 * 0.001);
        p.record(&ch, BATCH, BATCH / 3, 0.001);
        if let Some(j) = ch.shadow {
            assert_eq!(j, id);
            p.record_pair(&ch, BATCH, BATCH / 3, BATCH / 3, 0.001, 0.001);
            pairs += 1;
        }
    }
    assert!(p.pairs[i3].raw >= PAIR_FIRST, "{:?} after {pairs} pairs", p.pairs[i3]);
    assert!(p.pairs.iter().enumerate().all(|(i, q)| i == 0 || i == id || q.raw >= PAIR_FIRST), "{:?}", p.pairs);
    assert!(pairs <= 12, "{pairs} pairs in 40 batches");
}

#[test]
fn a_link_drop_is_believed_once_it_lasts_or_at_once_with_a_new_cap() {
    // Loopback-fast and none; then windows that moved a twentieth of that (the destination
    // got no CPU for a moment). Shorter than link_drop_s: auto keeps none. Longer: the
    // link is that slow, and auto compresses.
    let z = "zstd:1".parse::<Candidate>().unwrap();
    let world = |c: Candidate, _| if c == z { (340e6, 3.06) } else { (5e9, 1.0) };
    let (mut now, mut k) = (0.0, 0);
    let mut p = Policy::new(&[z], AutoConfig::default(), 2, 0.0);
    drive(&mut p, &mut now, &mut k, 20, 2e9, world);
    assert_eq!(p.current(), Candidate::none());
    let sample = |p: &Policy, wall_s: f64, rate: f64, cap: Option<f64>| LinkSample { wire_bytes: (rate * wall_s) as u64, busy_s: 2.0 * wall_s, writers: 2, wall_s, cap: cap.or(p.cap) };
    // Stalled for 0.6 s in three windows, then fast again.
    for _ in 0..3 {
        now += 0.2;
        p.decide(now, sample(&p, 0.2, 100e6, None));
        assert_eq!(p.current(), Candidate::none(), "{}", p.report().last_reason);
    }
    assert!(p.link_rate().unwrap() > 1e9);
    drive(&mut p, &mut now, &mut k, 4, 2e9, world);
    assert_eq!(p.report().switches, 0, "{:?}", p.report().switch_log);
    // Slow for longer than a second: believed.
    for _ in 0..8 {
        now += 0.2;
        p.decide(now, sample(&p, 0.2, 100e6, None));
    }
    assert_eq!(p.current(), z, "{}", p.report().last_reason);
    // A new cap is believed at once.
    let mut p = Policy::new(&[z], AutoConfig::default(), 2, 0.0);
    let (mut now, mut k) = (0.0, 0);
    drive(&mut p, &mut now, &mut k, 20, 2e9, world);
    now += 0.05;
    p.decide(now, sample(&p, 0.05, 100e6, Some(100e6)));
    assert_eq!(p.current(), z, "{}", p.report().last_reason);
}

#[test]
fn the_pipeline_time_is_the_slower_stage_and_more_when_they_are_close() {
    assert_eq!(pipeline(0.0, 2.0), 2.0);
    assert_eq!(pipeline(3.0, 0.0), 3.0);
    let equal = pipeline(1.0, 1.0);
    assert!((equal - 2f64.powf(1.0 / 8.0)).abs() < 1e-12, "{equal}");
    assert!(pipeline(1.0, 1.4) < 1.4 * 1.01 && pipeline(1.0, 1.4) > 1.4);
    assert_eq!(pipeline(1.0, 2.0), pipeline(2.0, 1.0));
}

#[test]
fn candidates_parse_and_print() {
    assert_eq!("zstd:-1".parse::<Candidate>(), Ok(Candidate::new(named("zstd"), -1)));
    assert_eq!("zlib".parse::<Candidate>(), Ok(Candidate::new(named("zlib"), 1)));
    assert_eq!("none".parse::<Candidate>(), Ok(Candidate::none()));
    assert_eq!(Candidate::new(named("zstd"), -5).to_string(), "zstd:-5");
    assert!("lz4:1".parse::<Candidate>().is_err());
    assert!("zstd:x".parse::<Candidate>().is_err());
}

//! `bench kernbench`: the seed's no-regression run. A fault-heavy workload
//! with dirty logging off, under mmu notifier invalidations and shrinker
//! pressure, per design; the designs alternate round by round so that the
//! drift of a shared machine hits both alike, and each reports its median.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};
use serde_json::json;
use shadow_mmu_engine::MmuDesign;
use shadow_mmu_engine::VmConfig;
use shadow_mmu_testkit::kernbench::{KernbenchConfig, KernbenchRun, Populate, Workload, kernbench, populate};
use shadow_mmu_testkit::trace::PageTrace;

use super::BenchResult;
use crate::output::{Progress, Spread, write_runs};

#[derive(Debug, Args)]
pub struct KernbenchArgs {
    /// Designs, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "locked,lockless")]
    pub mmu: Vec<MmuDesign>,
    /// vCPUs.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub vcpus: u32,
    /// What the vCPUs run.
    #[arg(long, value_enum, default_value_t = KernbenchWorkload::Sweep)]
    pub workload: KernbenchWorkload,
    /// The page trace a replay runs (see traces/README.md).
    #[arg(long, default_value = "traces/cc1-O2.smtrace")]
    pub trace: PathBuf,
    /// Guest memory, MiB. A replay cuts it into copies of the trace's pages
    /// and runs each lap of the trace in the next copy.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(2..=1 << 20))]
    pub guest_mib: u64,
    /// Shadow page budget, pages (KVM's minimum is 64).
    #[arg(long, default_value_t = 64)]
    pub max_mmu_pages: usize,
    /// Microseconds between two 2 MiB mmu notifier invalidations; 0: none.
    #[arg(long, default_value_t = 500)]
    pub invalidate_every_us: u64,
    /// Measured seconds per design, spread over the rounds.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Alternations of the designs.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub rounds: u32,
    /// Turn `fast_page_fault` off (the locked design then updates sptes with
    /// plain stores).
    #[arg(long)]
    pub no_fast_page_fault: bool,
    /// Write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Seed of the random choices.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// A kernbench guest program.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KernbenchWorkload {
    /// Each vCPU sweeps its slice of memory, one store per page.
    Sweep,
    /// Each vCPU replays the recorded trace of a real program.
    Replay,
}

/// The no-regression target: the lockless design's throughput against the
/// locked design's.
const KERNBENCH_TARGET: f64 = 0.98;

pub fn main(a: &KernbenchArgs) -> BenchResult {
    if !(a.seconds.is_finite() && a.seconds > 0.0) {
        return Err(format!("--seconds {}", a.seconds).into());
    }
    if let Some(line) = crate::output::oversubscribed(a.vcpus, 1) {
        println!("{line}");
    }
    let (workload, what) = match a.workload {
        KernbenchWorkload::Sweep => (Workload::Sweep, format!("sweep over {} MiB", a.guest_mib)),
        KernbenchWorkload::Replay => {
            let trace = PageTrace::load(&a.trace).map_err(|e| format!("{}: {e}", a.trace.display()))?;
            let what = format!("replay of {} ({trace}) over {} MiB", a.trace.display(), a.guest_mib);
            (
                Workload::Replay {
                    entries: trace.iter().map(|(p, w)| p << 1 | u32::from(w)).collect(),
                    pages: trace.pages(),
                },
                what,
            )
        }
    };
    println!(
        "== kernbench: {what}; {} vCPUs, shadow page budget {}, {}, dirty logging off",
        a.vcpus,
        a.max_mmu_pages,
        if a.invalidate_every_us == 0 {
            "no invalidations".to_string()
        } else {
            format!("a 2 MiB invalidation every {} us", a.invalidate_every_us)
        }
    );
    let (samples, populates) = run_rounds(a, &workload)?;
    let mut runs = Vec::new();
    for (mmu, s) in a.mmu.iter().zip(&samples) {
        let ops = Spread::of(&s.iter().map(|r| r.ops_per_sec).collect::<Vec<_>>());
        let faults = Spread::of(&s.iter().map(|r| r.faults_per_sec).collect::<Vec<_>>());
        println!(
            "{mmu}: median {:.0} ops/s [{:.0}, {:.0}], {:.0} faults/s [{:.0}, {:.0}] over {} rounds",
            ops.median,
            ops.min,
            ops.max,
            faults.median,
            faults.min,
            faults.max,
            s.len()
        );
        let (ops, faults) = (ops.median, faults.median);
        runs.push(json!({
            "mmu": mmu.name(),
            "workload": format!("{:?}", a.workload).to_lowercase(),
            "vcpus": a.vcpus,
            "guest_bytes": s[0].guest_bytes,
            "ops_per_sec": ops,
            "faults_per_sec": faults,
            "max_mmu_pages": a.max_mmu_pages,
            "invalidate_every_us": a.invalidate_every_us,
            "populate_ns": populates[runs.len()].iter().map(|p| p.ns).collect::<Vec<_>>(),
            "populate_mmu_lock_wait_ns": populates[runs.len()].iter().map(|p| [p.lock_wait_ns.0, p.lock_wait_ns.1]).collect::<Vec<_>>(),
            "rounds": s.iter().map(|r| json!({
                "ops_per_sec": r.ops_per_sec,
                "faults_per_sec": r.faults_per_sec,
                "invalidations": r.invalidations,
                "sp_shrunk": r.sp_shrunk,
            })).collect::<Vec<_>>(),
        }));
    }
    print_populate(a, &populates);
    let pos = |d: MmuDesign| a.mmu.iter().position(|&m| m == d);
    if let (Some(l), Some(ll)) = (pos(MmuDesign::Locked), pos(MmuDesign::Lockless)) {
        // Per round: the two designs ran one after the other.
        let r: Vec<f64> =
            samples[ll].iter().zip(&samples[l]).map(|(x, y)| x.ops_per_sec / y.ops_per_sec).collect();
        let r = Spread::of(&r);
        let verdict = if r.crosses(KERNBENCH_TARGET) {
            "inconclusive: the spread crosses the target"
        } else if r.min >= KERNBENCH_TARGET {
            "met in every round"
        } else {
            "missed in every round"
        };
        println!(
            "lockless/locked kernbench throughput: {:.3} [{:.3}, {:.3}] per round (target >= {KERNBENCH_TARGET}): {verdict}",
            r.median, r.min, r.max
        );
    }
    if let Some(path) = &a.json {
        write_runs(path, runs)?;
        println!("wrote {}", path.display());
    }
    Ok(true)
}

/// Per design (in `--mmu` order), its kernbench runs and its populates,
/// one of each a round.
type Rounds = (Vec<Vec<KernbenchRun>>, Vec<Vec<Populate>>);

/// Every round, each design in turn: its parallel populate, then its
/// kernbench run of `--seconds / --rounds`.
fn run_rounds(a: &KernbenchArgs, workload: &Workload) -> BenchResult<Rounds> {
    let per = Duration::from_secs_f64(a.seconds / f64::from(a.rounds));
    let p = Progress::new(u64::from(a.rounds) * a.mmu.len() as u64, "kernbench");
    let mut samples: Vec<Vec<KernbenchRun>> = vec![Vec::new(); a.mmu.len()];
    let mut populates: Vec<Vec<Populate>> = vec![Vec::new(); a.mmu.len()];
    for round in 0..a.rounds {
        for (i, &mmu) in a.mmu.iter().enumerate() {
            let design = VmConfig { mmu, fast_page_fault: !a.no_fast_page_fault, ..VmConfig::default() };
            let pop = populate(&design, a.vcpus, a.guest_mib << 20)?;
            p.line(format!(
                "round {} {mmu}: populate {:.2} ms ({} vCPUs in parallel, 4 KiB faults; mmu_lock waited {:.2} ms \
                 for read, {:.2} ms for write)",
                round + 1,
                pop.ns as f64 / 1e6,
                a.vcpus,
                pop.lock_wait_ns.0 as f64 / 1e6,
                pop.lock_wait_ns.1 as f64 / 1e6
            ));
            populates[i].push(pop);
            let cfg = KernbenchConfig {
                mmu,
                fast_page_fault: !a.no_fast_page_fault,
                vcpus: a.vcpus,
                guest_bytes: a.guest_mib << 20,
                workload: workload.clone(),
                max_mmu_pages: a.max_mmu_pages,
                invalidate_every: (a.invalidate_every_us > 0)
                    .then(|| Duration::from_micros(a.invalidate_every_us)),
                duration: per,
                seed: a.seed.wrapping_add(u64::from(round)),
            };
            let r = kernbench(&cfg)?;
            p.line(format!(
                "round {} {mmu}: {:.0} ops/s, {:.0} faults/s, {} invalidations, {} shadow pages shrunk",
                round + 1,
                r.ops_per_sec,
                r.faults_per_sec,
                r.invalidations,
                r.sp_shrunk
            ));
            p.step(format!("{mmu} round {}", round + 1));
            samples[i].push(r);
        }
    }
    p.finish();
    Ok((samples, populates))
}

/// The parallel populate: each design's median with its spread, and its
/// time against the locked design's, per round.
fn print_populate(a: &KernbenchArgs, populates: &[Vec<Populate>]) {
    let locked = a.mmu.iter().position(|&m| m == MmuDesign::Locked);
    for (mmu, s) in a.mmu.iter().zip(populates) {
        let t = Spread::of(&s.iter().map(|p| p.ns as f64 / 1e6).collect::<Vec<_>>());
        let against = locked.filter(|&l| populates[l].len() == s.len()).map(|l| {
            let r: Vec<f64> =
                s.iter().zip(&populates[l]).map(|(x, y)| x.ns as f64 / y.ns.max(1) as f64).collect();
            let r = Spread::of(&r);
            format!("; against locked {:.3} [{:.3}, {:.3}] per round", r.median, r.min, r.max)
        });
        let (fr, fw) = s.first().map_or((0, 0), |p| p.fault_locks);
        println!(
            "{mmu}: populate with {} vCPUs in parallel: median {:.2} ms [{:.2}, {:.2}]{} (slow faults took mmu_lock \
             {fr} times for read, {fw} for write)",
            a.vcpus,
            t.median,
            t.min,
            t.max,
            against.unwrap_or_default()
        );
    }
}

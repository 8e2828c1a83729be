//! `shadow-mmu bench`: benchmarks in the manner of KVM's
//! `dirty_log_perf_test`.

use std::time::Duration;

use clap::{Args, Subcommand};
use engine::MmuDesign;
use engine::harness::HarnessError;
use engine::perf::{self, MigratePerfConfig, MigratePerfRun};
use serde_json::{Value, json};

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// get_dirty_log time with vCPUs write-faulting, per design, and a
    /// fault-heavy workload with logging off (the seed's two claims).
    MigratePerf(MigratePerfArgs),
}

#[derive(Debug, Args)]
pub struct MigratePerfArgs {
    /// Backends, comma-separated. Only the engine for now; real KVM comes
    /// with its backend.
    #[arg(long, value_delimiter = ',', default_value = "engine")]
    pub backend: Vec<String>,
    /// Designs, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "locked,lockless")]
    pub mmu: Vec<MmuDesign>,
    /// vCPUs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub vcpus: u32,
    /// Guest memory, MiB.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    pub guest_mib: u64,
    /// Iterations (harvests after the bulk copy).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub iterations: u32,
    /// Share of accesses that are writes, percent.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub write_pct: u8,
    /// Random pages instead of a sequential sweep.
    #[arg(long)]
    pub random: bool,
    /// Never map 2 MiB pages.
    #[arg(long)]
    pub no_large_pages: bool,
    /// Seconds of the fault-heavy (logging off) measurement, per design,
    /// spread over five alternations of the designs; 0 skips it.
    #[arg(long, default_value_t = 6.0)]
    pub fault_heavy_seconds: f64,
    /// Write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
    /// Seed of the random choices.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

fn secs(ns: u64) -> String {
    format!("{}.{:09}s", ns / 1_000_000_000, ns % 1_000_000_000)
}

fn print_run(mmu: MmuDesign, a: &MigratePerfArgs, r: &MigratePerfRun) {
    println!("== backend=engine mmu={mmu} vcpus={} guest={} MiB", a.vcpus, a.guest_mib);
    println!("Populate memory time: {}", secs(r.populate_ns));
    println!("Enabling dirty logging time: {}", secs(r.enable_dirty_logging_ns));
    let n = r.iterations.len() as u64;
    println!(
        "Dirty memory time over {n} iterations: {} (avg {}/iteration)",
        secs(r.dirty_memory_avg_ns() * n),
        secs(r.dirty_memory_avg_ns())
    );
    println!(
        "Get dirty log over {n} iterations took {}. (Avg {}/iteration, {} dirty pages, {:.1} ns/page)",
        secs(r.get_dirty_log_avg_ns() * n),
        secs(r.get_dirty_log_avg_ns()),
        r.dirty_pages_avg(),
        r.get_dirty_log_avg_ns() as f64 / r.dirty_pages_avg().max(1) as f64
    );
    println!(
        "vCPU write faults: {} ({} fixed by fast_page_fault), mmu_lock held {:.1} ms",
        r.vcpu.write_faults,
        r.vm.fast_page_faults,
        r.vm.mmu_lock_hold_ns as f64 / 1e6
    );
    println!("Lost pages: {}", r.lost_pages);
}

fn run_json(mmu: MmuDesign, a: &MigratePerfArgs, r: &MigratePerfRun, faults_per_sec: Option<f64>) -> Value {
    json!({
        "backend": "engine",
        "mmu": mmu.name(),
        "vcpus": a.vcpus,
        "guest_bytes": a.guest_mib << 20,
        "write_pct": a.write_pct,
        "random": a.random,
        "populate_ns": r.populate_ns,
        "enable_dirty_logging_ns": r.enable_dirty_logging_ns,
        "dirty_memory_avg_ns": r.dirty_memory_avg_ns(),
        "get_dirty_log_avg_ns": r.get_dirty_log_avg_ns(),
        "dirty_pages_avg": r.dirty_pages_avg(),
        "ns_per_dirty_page": r.get_dirty_log_avg_ns() as f64 / r.dirty_pages_avg().max(1) as f64,
        "iterations": r.iterations.iter().map(|i| json!({
            "dirty_memory_ns": i.dirty_memory_ns,
            "get_dirty_log_ns": i.get_dirty_log_ns,
            "dirty_pages": i.dirty_pages,
        })).collect::<Vec<_>>(),
        "vcpu_write_faults": r.vcpu.write_faults,
        "fast_page_faults": r.vm.fast_page_faults,
        "mmu_lock_hold_ns": r.vm.mmu_lock_hold_ns,
        "fault_heavy_faults_per_sec": faults_per_sec,
        "lost_pages": r.lost_pages,
    })
}

/// Alternations of the designs in the fault-heavy measurement.
const FAULT_HEAVY_ROUNDS: usize = 5;

/// The fault-heavy measurement, designs alternated `FAULT_HEAVY_ROUNDS`
/// times (so that drift of a shared machine hits both alike); the median of
/// each.
fn fault_heavy(a: &MigratePerfArgs) -> Result<Vec<f64>, HarnessError> {
    let per = Duration::from_secs_f64(a.fault_heavy_seconds / FAULT_HEAVY_ROUNDS as f64);
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); a.mmu.len()];
    for _ in 0..FAULT_HEAVY_ROUNDS {
        for (i, &mmu) in a.mmu.iter().enumerate() {
            let f = perf::fault_heavy(mmu, a.vcpus, per)?;
            samples[i].push(f.faults_per_sec);
        }
    }
    Ok(samples
        .into_iter()
        .map(|mut s| {
            s.sort_by(f64::total_cmp);
            s[s.len() / 2]
        })
        .collect())
}

pub fn migrate_perf(a: &MigratePerfArgs) -> Result<bool, HarnessError> {
    if let Some(b) = a.backend.iter().find(|b| b.as_str() != "engine") {
        return Err(HarnessError::BadConfig(format!("unknown backend {b:?} (known: engine)")));
    }
    if !(a.fault_heavy_seconds.is_finite() && a.fault_heavy_seconds >= 0.0) {
        return Err(HarnessError::BadConfig(format!("--fault-heavy-seconds {}", a.fault_heavy_seconds)));
    }
    let mut runs = Vec::new();
    for &mmu in &a.mmu {
        let cfg = MigratePerfConfig {
            mmu,
            vcpus: a.vcpus,
            guest_bytes: a.guest_mib << 20,
            iterations: a.iterations,
            write_pct: a.write_pct,
            random: a.random,
            large_pages: !a.no_large_pages,
            seed: a.seed,
        };
        let r = perf::migrate_perf(&cfg, |i, it| {
            println!(
                "Iteration {i} dirty memory time: {}, get dirty log time: {} ({} dirty pages)",
                secs(it.dirty_memory_ns),
                secs(it.get_dirty_log_ns),
                it.dirty_pages
            );
        })?;
        print_run(mmu, a, &r);
        runs.push((mmu, r));
    }
    let faults = if a.fault_heavy_seconds > 0.0 { Some(fault_heavy(a)?) } else { None };
    if let Some(f) = &faults {
        println!(
            "== fault-heavy, dirty logging off ({} MiB, 4 KiB pages, 64 shadow pages, {} vCPUs)",
            perf::FAULT_HEAVY_GUEST_BYTES >> 20,
            a.vcpus
        );
        for (mmu, x) in a.mmu.iter().zip(f) {
            println!("{mmu}: {:.0} faults/s", x);
        }
    }
    let find = |d: MmuDesign| a.mmu.iter().position(|&m| m == d);
    if let (Some(l), Some(ll)) = (find(MmuDesign::Locked), find(MmuDesign::Lockless)) {
        let ratio = runs[ll].1.get_dirty_log_avg_ns() as f64 / runs[l].1.get_dirty_log_avg_ns().max(1) as f64;
        println!("lockless/locked get_dirty_log time: {ratio:.3} (the seed: 0.53; target <= 0.5)");
        if let Some(f) = &faults {
            println!("lockless/locked fault-heavy throughput: {:.3} (target >= 0.98)", f[ll] / f[l]);
        }
    }
    let lost: u64 = runs.iter().map(|(_, r)| r.lost_pages).sum();
    if let Some(path) = &a.json {
        let v = json!({
            "command": std::env::args().collect::<Vec<_>>().join(" "),
            "runs": runs.iter().enumerate().map(|(i, (mmu, r))| run_json(*mmu, a, r, faults.as_ref().map(|f| f[i]))).collect::<Vec<_>>(),
        });
        let text = serde_json::to_string_pretty(&v).expect("JSON of numbers and strings");
        std::fs::write(path, text + "\n")
            .map_err(|e| HarnessError::BadConfig(format!("writing {}: {e}", path.display())))?;
        println!("wrote {}", path.display());
    }
    Ok(lost == 0)
}

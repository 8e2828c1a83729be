//! `bench migrate-perf`: `dirty_log_perf_test`'s report, per backend, design
//! and guest size, plus what the seed cared about: get-dirty-log ns per dirty
//! page against a compare-exchange floor, and the vCPUs' write-fault latency
//! with and without a harvest running.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use serde_json::{Value, json};
use shadow_mmu_engine::EngineBackend;
use shadow_mmu_engine::{MmuDesign, VmConfig};
use shadow_mmu_testkit::perf::{self, PerfRun};
use shadow_mmu_vmm::LatencySummary;
use shadow_mmu_vmm::{DirtyLogInterface, HarvestSpec, PassSpec};

use super::{BenchResult, Progress, parse_size, secs, write_json};
use crate::harvest_args::HarvestKnobs;
use crate::plot;

#[derive(Debug, Args)]
pub struct MigratePerfArgs {
    /// Backends, comma-separated: engine, kvm (the machine's /dev/kvm).
    #[arg(long, value_delimiter = ',', default_value = "engine,kvm")]
    pub backend: Vec<Backend>,
    /// Designs of the engine, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "locked,lockless")]
    pub mmu: Vec<MmuDesign>,
    /// vCPUs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub vcpus: u32,
    /// Guest memory in MiB, all vCPUs together; a comma-separated list runs
    /// each size (the plot's x axis).
    #[arg(long, value_delimiter = ',', conflicts_with = "bytes_per_vcpu")]
    pub guest_mib: Vec<u64>,
    /// Guest memory per vCPU (`dirty_log_perf_test -b`): bytes with an
    /// optional K, M, G suffix; a comma-separated list runs each size.
    #[arg(long, value_delimiter = ',', value_parser = parse_size)]
    pub bytes_per_vcpu: Vec<u64>,
    /// Iterations (harvests after the bulk copy).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub iterations: u32,
    /// Share of accesses that are writes, percent.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub write_pct: u8,
    /// Random pages instead of a sequential sweep.
    #[arg(long)]
    pub random: bool,
    /// Never map 2 MiB pages (engine).
    #[arg(long)]
    pub no_large_pages: bool,
    /// Turn the engine's `fast_page_fault` off, in both designs: the
    /// baseline of the first measurements, where a write fault on a logged page takes
    /// the slow path and the locked design updates sptes with plain stores.
    #[arg(long)]
    pub no_fast_page_fault: bool,
    /// Seconds of the fault-heavy (logging off) measurement of the engine,
    /// per design, spread over five alternations of the designs; 0 skips it.
    #[arg(long, default_value_t = 6.0)]
    pub fault_heavy_seconds: f64,
    /// Write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write SVG charts into this directory.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Dirty-log interfaces, comma-separated: get (GET clears and
    /// re-protects), clear (manual protect: GET copies, CLEAR in chunks),
    /// ring (the per-vCPU dirty ring, reaped when full and at each harvest).
    #[arg(long, value_delimiter = ',', default_value = "get")]
    pub dirty_log: Vec<DirtyLogInterface>,
    #[command(flatten)]
    pub knobs: HarvestKnobs,
    /// Sweep only the first N pages (a multiple of 64) of every guest size:
    /// a fixed working set, with the guest mapped lazily (MAP_NORESERVE), so
    /// that a guest larger than this machine runs and the harvest's cost can
    /// be set against the guest's size (engine only).
    #[arg(long)]
    pub dirty_pages: Option<u64>,
    /// Threads each harvest is split over, comma-separated (engine; KVM's
    /// harvest is its own ioctl, run with 1).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub harvest_threads: Vec<u32>,
    /// Seed of the random choices.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

impl MigratePerfArgs {
    /// Every harvest spec the lists ask for, checked.
    pub(super) fn harvest_specs(&self) -> Result<Vec<HarvestSpec>, String> {
        let mut v = Vec::new();
        for &interface in &self.dirty_log {
            for &harvest_threads in &self.harvest_threads {
                let s = self.knobs.spec(interface, harvest_threads);
                s.validate().map_err(|e| e.to_string())?;
                v.push(s);
            }
        }
        Ok(v)
    }
}

/// Where the workload runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// Our engine, each design.
    Engine,
    /// The machine's KVM, through /dev/kvm.
    Kvm,
}

/// One run, whichever the backend: the figures every backend has
/// ([`PerfRun`]), and what only some have.
#[derive(Debug, Clone, Default)]
pub struct Record {
    pub(super) backend: &'static str,
    /// The engine's design; KVM's own MMU otherwise.
    pub(super) mmu: String,
    /// How it harvested.
    pub(super) spec: HarvestSpec,
    pub(super) vcpus: u32,
    pub(super) guest_bytes: u64,
    pub(super) run: PerfRun,
    pub(super) floor_ns_per_page: f64,
    /// Engine only: KVM's faults cannot be timed from userspace.
    pub(super) latency: Option<(LatencySummary, LatencySummary)>,
    pub(super) fault_heavy_faults_per_sec: Option<f64>,
    pub(super) extra: Value,
}

impl Record {
    fn label(&self) -> String {
        format!("{} {} {}", self.backend, self.mmu, self.spec.label())
    }

    /// A figure of the backend's own (`PassExtras::figures`).
    fn figure(&self, name: &str) -> Option<u64> {
        self.extra.get(name).and_then(Value::as_u64)
    }

    fn json(&self) -> Value {
        let lat = |h: Option<&LatencySummary>| {
            h.map(|h| {
                json!({
                    "count": h.count(),
                    "p50_ns": h.quantile_ns(0.5),
                    "p99_ns": h.quantile_ns(0.99),
                    "p999_ns": h.quantile_ns(0.999),
                    "max_ns": h.max_ns(),
                })
            })
        };
        let (harvest, idle) = match &self.latency {
            Some((h, i)) => (Some(h), Some(i)),
            None => (None, None),
        };
        json!({
            "backend": self.backend,
            "mmu": self.mmu,
            "dirty_log": self.spec.interface_label(),
            "harvest_threads": self.spec.harvest_threads,
            "clear_chunk_pages": (self.spec.interface == DirtyLogInterface::Clear).then_some(self.spec.clear_chunk_pages),
            "ring_entries": (self.spec.interface == DirtyLogInterface::Ring).then_some(self.spec.ring_entries),
            "ring_full_exits": (self.spec.interface == DirtyLogInterface::Ring).then(|| self.figure("ring_full_exits")),
            "mmu_lock_max_hold_ns": self.figure("harvest_mmu_lock_max_hold_ns"),
            "harvest_mmu_lock_hold_ns": self.figure("harvest_mmu_lock_hold_ns"),
            "vcpus": self.vcpus,
            "guest_bytes": self.guest_bytes,
            "populate_ns": self.run.populate_ns,
            "enable_dirty_logging_ns": self.run.enable_dirty_logging_ns,
            "dirty_memory_avg_ns": self.run.dirty_memory_avg_ns(),
            "get_dirty_log_avg_ns": self.run.get_dirty_log_avg_ns(),
            "clear_dirty_log_avg_ns": self.run.clear_dirty_log_avg_ns(),
            "dirty_pages_avg": self.run.dirty_pages_avg(),
            "ns_per_dirty_page": self.run.ns_per_dirty_page(),
            "floor_ns_per_page": self.floor_ns_per_page,
            "vcpu_fault_p99_ns_harvest": harvest.map(|h| h.quantile_ns(0.99)),
            "vcpu_fault_p99_ns_idle": idle.map(|h| h.quantile_ns(0.99)),
            "vcpu_fault_latency_harvest": lat(harvest),
            "vcpu_fault_latency_idle": lat(idle),
            "lost_pages": self.run.lost_pages,
            "quiet_get_dirty_log_ns": self.run.quiet.get_dirty_log_ns,
            "quiet_dirty_pages": self.run.quiet.dirty_pages,
            "quiet_ns_per_dirty_page": self.run.quiet.ns_per_page(),
            "fault_heavy_faults_per_sec": self.fault_heavy_faults_per_sec,
            "iterations": self.run.iterations.iter().map(|i| json!({
                "dirty_memory_ns": i.dirty_memory_ns,
                "get_dirty_log_ns": i.get_dirty_log_ns,
                "clear_dirty_log_ns": i.clear_dirty_log_ns,
                "dirty_pages": i.dirty_pages,
            })).collect::<Vec<_>>(),
            "details": self.extra,
        })
    }
}

fn latency_line(what: &str, h: &LatencySummary) -> String {
    let us = |ns: u64| ns as f64 / 1e3;
    format!(
        "vCPU write-fault latency {what}: p50 {:.2} us, p99 {:.2} us, p99.9 {:.2} us, max {:.2} us ({} faults)",
        us(h.quantile_ns(0.5)),
        us(h.quantile_ns(0.99)),
        us(h.quantile_ns(0.999)),
        us(h.max_ns()),
        h.count()
    )
}

/// `dirty_log_perf_test`'s closing lines, and ours.
pub fn print_summary(p: &Progress, r: &Record) {
    let run = &r.run;
    let n = run.iterations.len() as u64;
    p.line(format!(
        "Dirty memory time over {n} iterations: {} (avg {}/iteration)",
        secs(run.dirty_memory_avg_ns() * n),
        secs(run.dirty_memory_avg_ns())
    ));
    p.line(format!(
        "Get dirty log over {n} iterations took {}. (Avg {}/iteration)",
        secs(run.get_dirty_log_avg_ns() * n),
        secs(run.get_dirty_log_avg_ns())
    ));
    if let Some(c) = run.clear_dirty_log_avg_ns() {
        p.line(format!(
            "Clear dirty log over {n} iterations took {}. (Avg {}/iteration)",
            secs(c * n),
            secs(c)
        ));
    }
    let per = run.ns_per_dirty_page();
    p.line(format!(
        "{} per dirty page: {per:.2} ns ({} dirty pages avg); floor (one compare-exchange per \
         page over a plain array): {:.2} ns; = {:.2} x floor",
        if run.clear_dirty_log_avg_ns().is_some() { "Get + clear dirty log" } else { "Get dirty log" },
        run.dirty_pages_avg(),
        r.floor_ns_per_page,
        per / r.floor_ns_per_page
    ));
    {
        let q = run.quiet;
        let per = q.ns_per_page();
        p.line(format!(
            "Harvest with no vCPU running: {} for {} dirty pages, {per:.2} ns per page = {:.2} x floor",
            secs(q.harvest_ns()),
            q.dirty_pages,
            per / r.floor_ns_per_page
        ));
    }
    // The rhythm's one race: the vCPUs start their next pass as the harvest
    // starts, both from page 0. If a vCPU gets ahead of the harvester, its
    // stores no longer fault (the pages are still writable), the two share
    // cache lines for the whole harvest (which slows it), and the pass is
    // absorbed by this harvest: the next one finds few pages.
    let most = run.iterations.iter().map(|i| i.dirty_pages).max().unwrap_or(0);
    for (k, it) in run.iterations.iter().enumerate().skip(1) {
        if it.dirty_pages * 10 < most * 9 {
            p.line(format!(
                "Note: iteration {} harvested {} pages where others harvested {most}: the vCPUs' pass \
                 ran ahead of iteration {}'s harvest, which took it in (and was slowed sharing its cache \
                 lines); the averages above include both",
                k + 1,
                it.dirty_pages,
                k
            ));
        }
    }
    match &r.latency {
        Some((harvest, idle)) => {
            p.line(latency_line("during harvest", harvest));
            p.line(latency_line("with no harvest", idle));
        }
        None => p.line("vCPU write-fault latency: not measurable from userspace on this backend"),
    }
    p.line(format!("Lost pages: {}", run.lost_pages));
}

/// One run on `backend`, reported the same way whichever it is: the
/// header, each iteration, `dirty_log_perf_test`'s closing lines and ours,
/// then the backend's own lines. `details` goes into the JSON, with the
/// backend's own figures.
#[allow(clippy::too_many_arguments)]
pub(super) fn backend_run(
    a: &MigratePerfArgs,
    p: &Progress,
    backend: &dyn shadow_mmu_vmm::Backend,
    kind: &'static str,
    mmu: String,
    harvest: &HarvestSpec,
    guest_bytes: u64,
    header: String,
    mut details: serde_json::Map<String, Value>,
) -> BenchResult<Record> {
    p.line(header);
    let spec = PassSpec {
        vcpus: a.vcpus,
        guest_bytes,
        write_pct: a.write_pct,
        random: a.random,
        seed: a.seed,
        dirty_pages: a.dirty_pages,
    };
    let mut vm = backend.start_passes(&spec)?;
    let step = format!("{kind} {mmu} {} {} MiB", harvest.label(), guest_bytes >> 20);
    let (run, extras) = perf::migrate_perf(vm.as_mut(), a.iterations, harvest, |i, it: &perf::Iteration| {
        p.line(format!("Iteration {i} dirty memory time: {}", secs(it.dirty_memory_ns)));
        p.line(format!("Iteration {i} get dirty log time: {}", secs(it.get_dirty_log_ns)));
        if let Some(ns) = it.clear_dirty_log_ns {
            p.line(format!("Iteration {i} clear dirty log time: {}", secs(ns)));
        }
        p.step(step.clone());
    })?;
    for (k, v) in extras.figures {
        details.insert(k.to_string(), json!(v));
    }
    let rec = Record {
        backend: kind,
        mmu,
        spec: *harvest,
        vcpus: a.vcpus,
        guest_bytes,
        floor_ns_per_page: perf::cmpxchg_floor(run.dirty_pages_avg()),
        latency: extras.latency,
        fault_heavy_faults_per_sec: None,
        run,
        extra: Value::Object(details),
    };
    p.line(format!("Populate memory time: {}", secs(rec.run.populate_ns)));
    p.line(format!("Enabling dirty logging time: {}", secs(rec.run.enable_dirty_logging_ns)));
    print_summary(p, &rec);
    for line in extras.lines {
        p.line(line);
    }
    Ok(rec)
}

fn engine_run(
    a: &MigratePerfArgs,
    p: &Progress,
    mmu: MmuDesign,
    harvest: &HarvestSpec,
    guest_bytes: u64,
) -> BenchResult<Record> {
    let config = VmConfig {
        mmu,
        fast_page_fault: !a.no_fast_page_fault,
        large_pages: !a.no_large_pages,
        dirty_log_protect: harvest.protect(),
        harvest_threads: harvest.harvest_threads,
        ..VmConfig::default()
    };
    let header = format!(
        "== backend=engine mmu={mmu} dirty-log={} vcpus={} guest={} MiB ({} MiB per vCPU)",
        harvest.label(),
        a.vcpus,
        guest_bytes >> 20,
        (guest_bytes / u64::from(a.vcpus)) >> 20
    );
    let Value::Object(details) = json!({
        "write_pct": a.write_pct,
        "random": a.random,
        "fast_page_fault": !a.no_fast_page_fault,
    }) else {
        unreachable!("an object")
    };
    backend_run(
        a,
        p,
        &EngineBackend { config, dirty_ring: harvest.ring_bytes().map(|b| b / 16) },
        "engine",
        mmu.name().to_string(),
        harvest,
        guest_bytes,
        header,
        details,
    )
}

/// Alternations of the designs in the fault-heavy measurement.
const FAULT_HEAVY_ROUNDS: usize = 5;

/// The fault-heavy measurement, designs alternated `FAULT_HEAVY_ROUNDS`
/// times (so that drift of a shared machine hits both alike); the median of
/// each.
fn fault_heavy(a: &MigratePerfArgs) -> BenchResult<Vec<f64>> {
    let per = Duration::from_secs_f64(a.fault_heavy_seconds / FAULT_HEAVY_ROUNDS as f64);
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); a.mmu.len()];
    for _ in 0..FAULT_HEAVY_ROUNDS {
        for (i, &mmu) in a.mmu.iter().enumerate() {
            samples[i].push(perf::fault_heavy(mmu, !a.no_fast_page_fault, a.vcpus, per)?.faults_per_sec);
        }
    }
    Ok(samples.into_iter().map(median).collect())
}

/// The median of `s`.
pub fn median(mut s: Vec<f64>) -> f64 {
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

fn guest_sizes(a: &MigratePerfArgs) -> Result<Vec<u64>, String> {
    let sizes: Vec<u64> = if !a.bytes_per_vcpu.is_empty() {
        a.bytes_per_vcpu.iter().map(|b| b * u64::from(a.vcpus)).collect()
    } else if !a.guest_mib.is_empty() {
        a.guest_mib.iter().map(|m| m << 20).collect()
    } else {
        vec![1 << 30]
    };
    for &s in &sizes {
        if s == 0 || !s.is_multiple_of(4096) || s / 4096 < u64::from(a.vcpus) || s > 1 << 40 {
            return Err(format!("guest size {s} bytes: not a positive multiple of 4 KiB, one page per vCPU"));
        }
    }
    Ok(sizes)
}

pub fn main(a: &MigratePerfArgs) -> BenchResult {
    if !(a.fault_heavy_seconds.is_finite() && a.fault_heavy_seconds >= 0.0) {
        return Err(format!("--fault-heavy-seconds {}", a.fault_heavy_seconds).into());
    }
    let sizes = guest_sizes(a)?;
    let specs = a.harvest_specs()?;
    let engine = a.backend.contains(&Backend::Engine);
    let kvm = a.backend.contains(&Backend::Kvm).then(super::kvm::KvmBench::probe);
    if let Some(k) = &kvm {
        println!("{}", k.describe());
    }
    let kvm_specs: Vec<HarvestSpec> = match kvm.as_ref().filter(|k| k.usable()) {
        Some(_) if a.dirty_pages.is_some() => {
            println!("(KVM: skipped: a working set, --dirty-pages, runs on the engine only)");
            Vec::new()
        }
        Some(k) => k.runnable(&specs, &|line| println!("{line}")),
        None => Vec::new(),
    };
    let per_size = if engine { (a.mmu.len() * specs.len()) as u64 } else { 0 } + kvm_specs.len() as u64;
    let p = Progress::new(sizes.len() as u64 * per_size * u64::from(a.iterations), "migrate-perf");
    let mut records = Vec::new();
    for &size in &sizes {
        for spec in &specs {
            if engine {
                for &mmu in &a.mmu {
                    records.push(engine_run(a, &p, mmu, spec, size)?);
                }
            }
            if let Some(k) = kvm.as_ref().filter(|k| k.usable())
                && kvm_specs.contains(spec)
            {
                records.push(k.run(a, &p, size, spec)?);
            }
        }
    }
    let faults = if engine && a.fault_heavy_seconds > 0.0 {
        p.line(format!(
            "== fault-heavy, dirty logging off ({} MiB, 4 KiB pages, 64 shadow pages, {} vCPUs)",
            perf::FAULT_HEAVY_GUEST_BYTES >> 20,
            a.vcpus
        ));
        let f = fault_heavy(a)?;
        for (mmu, x) in a.mmu.iter().zip(&f) {
            p.line(format!("{mmu}: {x:.0} faults/s"));
        }
        Some(f)
    } else {
        None
    };
    p.finish();
    if let Some(f) = &faults {
        for r in records.iter_mut().filter(|r| r.backend == "engine") {
            let i = a.mmu.iter().position(|m| m.name() == r.mmu).expect("a design we ran");
            r.fault_heavy_faults_per_sec = Some(f[i]);
        }
    }
    print_ratios(&records, &sizes, faults.as_deref(), a);
    if let Some(dir) = &a.plot {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let mut written = plot::dirty_log_vs_size(
            dir,
            &records.iter().map(|r| (r.label(), r.guest_bytes, r.run.harvest_avg_ns())).collect::<Vec<_>>(),
        )?;
        let largest = sizes.iter().max().copied().unwrap_or(0);
        let lat: Vec<(String, &LatencySummary)> = records
            .iter()
            .filter(|r| r.guest_bytes == largest)
            .filter_map(|r| r.latency.as_ref().map(|(h, _)| (r.label(), h)))
            .collect();
        if !lat.is_empty() {
            written.push(plot::fault_latency(dir, &lat, largest)?);
        }
        for w in written {
            println!("wrote {}", w.display());
        }
    }
    if let Some(path) = &a.json {
        write_json(path, records.iter().map(Record::json).collect())?;
        println!("wrote {}", path.display());
    }
    Ok(records.iter().all(|r| r.run.lost_pages == 0))
}

/// The seed's claims, as ratios of runs of this process.
fn print_ratios(records: &[Record], sizes: &[u64], faults: Option<&[f64]>, a: &MigratePerfArgs) {
    let specs = a.harvest_specs().unwrap_or_default();
    let find = |size: u64, backend: &str, mmu: &str, spec: &HarvestSpec| {
        records
            .iter()
            .find(|r| r.guest_bytes == size && r.backend == backend && r.mmu == mmu && r.spec == *spec)
    };
    for &size in sizes {
        for spec in &specs {
            print_spec_lines(records, size, spec, &find);
        }
    }
    let pos = |d: MmuDesign| a.mmu.iter().position(|&m| m == d);
    if let (Some(f), Some(l), Some(ll)) = (faults, pos(MmuDesign::Locked), pos(MmuDesign::Lockless)) {
        println!("lockless/locked fault-heavy throughput: {:.3} (target >= 0.98)", f[ll] / f[l]);
    }
}

/// The lines of [`print_ratios`] for one guest size and harvest spec.
fn print_spec_lines<'r>(
    records: &'r [Record],
    size: u64,
    spec: &HarvestSpec,
    find: &dyn Fn(u64, &str, &str, &HarvestSpec) -> Option<&'r Record>,
) {
    let tag = format!("{} MiB, {}", size >> 20, spec.label());
    for r in records.iter().filter(|r| r.guest_bytes == size && r.spec == *spec && r.backend == "engine") {
        if let Some(held) = r.figure("harvest_mmu_lock_hold_ns") {
            println!(
                "{tag}: engine {}: the harvests held mmu_lock {held} ns in all, longest {} ns{}",
                r.mmu,
                r.figure("harvest_mmu_lock_max_hold_ns").unwrap_or(0),
                r.figure("ring_full_exits")
                    .filter(|_| spec.interface == DirtyLogInterface::Ring)
                    .map_or(String::new(), |n| format!("; {n} ring-full exits"))
            );
        }
    }
    if spec.harvest_threads > 1 {
        let one = HarvestSpec { harvest_threads: 1, ..*spec };
        if let Some(r) = find(size, "engine", "lockless", spec) {
            let pages = r.run.dirty_pages_avg();
            let (f1, fn_) =
                (perf::cmpxchg_floor_on(pages, 1), perf::cmpxchg_floor_on(pages, spec.harvest_threads));
            println!(
                "{tag}: the compare-exchange floor itself on {} threads against 1: {:.3} ({fn_:.2} against \
                 {f1:.2} ns per page): how far this machine runs locked read-modify-writes in parallel",
                spec.harvest_threads,
                fn_ / f1
            );
        }
        for mmu in ["locked", "lockless"] {
            if let (Some(n), Some(o)) = (find(size, "engine", mmu, spec), find(size, "engine", mmu, &one)) {
                println!(
                    "{tag}: engine {mmu}: harvest with no vCPU running on {} threads against 1: {:.3} \
                     (lockless target <= 0.6); with a vCPU faulting: {:.3}; the latest helper thread \
                     started {:.0} us into its harvest",
                    spec.harvest_threads,
                    n.run.quiet.harvest_ns() as f64 / o.run.quiet.harvest_ns().max(1) as f64,
                    n.run.harvest_avg_ns() as f64 / o.run.harvest_avg_ns().max(1) as f64,
                    n.figure("harvest_thread_start_max_ns").unwrap_or(0) as f64 / 1e3
                );
            }
        }
    }
    {
        let tag = tag.as_str();
        let (Some(l), Some(ll)) =
            (find(size, "engine", "locked", spec), find(size, "engine", "lockless", spec))
        else {
            return;
        };
        let locked_ns = l.run.harvest_avg_ns().max(1) as f64;
        let ratio = ll.run.harvest_avg_ns() as f64 / locked_ns;
        let seed = if spec.interface == DirtyLogInterface::Get && spec.harvest_threads == 1 {
            " (the seed: 0.53)"
        } else {
            ""
        };
        println!("{tag}: lockless/locked harvest time: {ratio:.3}{seed}");
        // A lockless harvest clears W with one locked read-modify-write per
        // dirty page, so it cannot take less than the floor per page; set
        // against this locked run, that bounds the ratio above from below.
        let floor = l.floor_ns_per_page.min(ll.floor_ns_per_page);
        let bound = floor * ll.run.dirty_pages_avg() as f64 / locked_ns / f64::from(spec.harvest_threads);
        println!(
            "{tag}: the floor bounds that ratio from below: {bound:.3} (one compare-exchange per dirty page, \
             nothing else, on each of the harvest threads, against this locked run)"
        );
        if let (Some((lh, _)), Some((llh, _))) = (&l.latency, &ll.latency) {
            println!(
                "{tag}: vCPU write-fault p99 during harvest: locked {:.2} us, lockless {:.2} us",
                lh.quantile_ns(0.99) as f64 / 1e3,
                llh.quantile_ns(0.99) as f64 / 1e3
            );
        }
        println!(
            "{tag}: lockless ns per dirty page: {:.2} = {:.2} x the compare-exchange floor with a vCPU \
             faulting; {:.2} = {:.2} x with none",
            ll.run.ns_per_dirty_page(),
            ll.run.ns_per_dirty_page() / ll.floor_ns_per_page,
            ll.run.quiet.ns_per_page(),
            ll.run.quiet.ns_per_page() / ll.floor_ns_per_page
        );
        println!(
            "{tag}: enabling dirty logging: locked {}, lockless {}",
            secs(l.run.enable_dirty_logging_ns),
            secs(ll.run.enable_dirty_logging_ns)
        );
        for k in records.iter().filter(|r| r.guest_bytes == size && r.backend == "kvm" && r.spec == *spec) {
            println!(
                "{tag}: harvest time against KVM {} ({}): locked {:.2}x, lockless {:.2}x",
                k.mmu,
                if k.run.clear_dirty_log_avg_ns().is_some() {
                    "KVM_GET_DIRTY_LOG + KVM_CLEAR_DIRTY_LOG"
                } else {
                    "KVM_GET_DIRTY_LOG"
                },
                l.run.harvest_avg_ns() as f64 / k.run.harvest_avg_ns().max(1) as f64,
                ll.run.harvest_avg_ns() as f64 / k.run.harvest_avg_ns().max(1) as f64
            );
        }
    }
}

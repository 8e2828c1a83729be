//! `bench migrate-perf`: `dirty_log_perf_test`'s report, per backend, design
//! and guest size, plus what the seed cared about: get-dirty-log ns per dirty
//! page against a compare-exchange floor, and the vCPUs' write-fault latency
//! with and without a harvest running.

mod args;
mod kvm;
mod repeat;
mod run;

use std::time::Duration;

use serde_json::{Value, json};
use shadow_mmu_core::spte::PAGE_SIZE;
use shadow_mmu_engine::{MmuDesign, VmConfig};
use shadow_mmu_testkit::perf;
use shadow_mmu_vmm::{DirtyLogInterface, HarvestSpec, LatencySummary, ProgressTrace};

use crate::backend_kind::BackendKind;
use crate::cmd::bench::BenchResult;
use crate::output::{Progress, median, secs, write_runs};
use crate::plot;

pub use args::MigratePerfArgs;
use run::{Record, backend_run};

/// One engine variant: the design, and the TDP design's eager split and PML.
#[derive(Debug, Clone)]
struct Variant {
    mmu: MmuDesign,
    eager_page_split: bool,
    pml: bool,
    /// `tdp`, `tdp pml`, `tdp no-eager-split`, ...
    label: String,
}

/// The engine's variants `a` asks for: each design, and the TDP design once
/// per `--pml` and `--eager-split` value.
fn engine_variants(a: &MigratePerfArgs) -> Vec<Variant> {
    let mut v = Vec::new();
    for &mmu in &a.mmu {
        if mmu != MmuDesign::Tdp {
            v.push(Variant { mmu, eager_page_split: true, pml: false, label: mmu.name().to_string() });
            continue;
        }
        for &pml in &a.pml {
            for &eager_page_split in &a.eager_split {
                let label = format!(
                    "{mmu}{}{}",
                    if pml { " pml" } else { "" },
                    if eager_page_split { "" } else { " no-eager-split" }
                );
                v.push(Variant { mmu, eager_page_split, pml, label });
            }
        }
    }
    v
}

fn engine_run(
    a: &MigratePerfArgs,
    p: &Progress,
    Variant { mmu, eager_page_split, pml, label }: &Variant,
    harvest: &HarvestSpec,
    guest_bytes: u64,
) -> BenchResult<Record> {
    let engine = VmConfig {
        mmu: *mmu,
        fast_page_fault: !a.no_fast_page_fault,
        large_pages: !a.no_large_pages,
        eager_page_split: *eager_page_split,
        pml: *pml,
        ..VmConfig::default()
    };
    let lock = a.lock_point;
    let header = format!(
        "== backend=engine mmu={label} dirty-log={} vcpus={} guest={} MiB ({} MiB per vCPU){}",
        harvest.label(),
        a.vcpus,
        guest_bytes >> 20,
        (guest_bytes / u64::from(a.vcpus)) >> 20,
        if lock.any() {
            format!(" lock faults: {} (the vCPUs sweep half the guest)", lock.label())
        } else {
            String::new()
        }
    );
    let Value::Object(details) = json!({
        "write_pct": a.write_pct,
        "random": a.random,
        "fast_page_fault": !a.no_fast_page_fault,
        "eager_page_split": (*mmu == MmuDesign::Tdp).then_some(*eager_page_split),
        "pml": (*mmu == MmuDesign::Tdp).then_some(*pml),
        "lock_faults": {
            "fresh_per_sec": lock.fresh_per_sec,
            "split_per_sec": lock.split_per_sec,
            "invalidations_per_sec": lock.invalidations_per_sec,
        },
    }) else {
        unreachable!("an object")
    };
    backend_run(
        a,
        p,
        &*BackendKind::Engine.backend(&engine, harvest),
        "engine",
        label.clone(),
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
/// each. `None` for the TDP design: the workload faults because the shadow
/// page budget makes the shrinker zap the map, and no budget binds the TDP
/// MMU's tables (upstream's `n_max_mmu_pages` is the shadow MMU's), so it
/// would fault once and measure nothing.
fn fault_heavy(a: &MigratePerfArgs) -> BenchResult<Vec<Option<f64>>> {
    let per = Duration::from_secs_f64(a.fault_heavy_seconds / FAULT_HEAVY_ROUNDS as f64);
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); a.mmu.len()];
    for _ in 0..FAULT_HEAVY_ROUNDS {
        for (i, &mmu) in a.mmu.iter().enumerate().filter(|(_, m)| **m != MmuDesign::Tdp) {
            samples[i].push(perf::fault_heavy(mmu, !a.no_fast_page_fault, a.vcpus, per)?.faults_per_sec);
        }
    }
    Ok(samples.into_iter().map(|s| (!s.is_empty()).then(|| median(s))).collect())
}

/// The fault-heavy measurement (`fault_heavy`), printed as it is made.
fn print_fault_heavy(a: &MigratePerfArgs, p: &Progress) -> BenchResult<Vec<Option<f64>>> {
    p.line(format!(
        "== fault-heavy, dirty logging off ({} MiB, 4 KiB pages, 64 shadow pages, {} vCPUs)",
        perf::FAULT_HEAVY_GUEST_BYTES >> 20,
        a.vcpus
    ));
    let f = fault_heavy(a)?;
    for (mmu, x) in a.mmu.iter().zip(&f) {
        match x {
            Some(x) => p.line(format!("{mmu}: {x:.0} faults/s")),
            None => p.line(format!(
                "{mmu}: not measured: no shadow page budget binds its tables, so nothing zaps them"
            )),
        }
    }
    Ok(f)
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
        if s == 0 || !s.is_multiple_of(PAGE_SIZE) || s / PAGE_SIZE < u64::from(a.vcpus) || s > 1 << 40 {
            return Err(format!("guest size {s} bytes: not a positive multiple of 4 KiB, one page per vCPU"));
        }
    }
    Ok(sizes)
}

pub fn main(a: &MigratePerfArgs) -> BenchResult {
    if !(a.fault_heavy_seconds.is_finite() && a.fault_heavy_seconds >= 0.0) {
        return Err(format!("--fault-heavy-seconds {}", a.fault_heavy_seconds).into());
    }
    let mut records = Vec::new();
    let locks = a.lock.points();
    for &vcpus in &a.vcpus_list {
        for &lock_point in &locks {
            let mut point = MigratePerfArgs { vcpus, lock_point, ..a.clone() };
            let mut folder = Vec::new();
            if a.vcpus_list.len() > 1 {
                println!("==== {vcpus} vCPU(s)");
                folder.push(format!("vcpus-{vcpus}"));
            }
            if locks.len() > 1 {
                println!("==== lock faults: {}", lock_point.label());
                folder.push(format!("lock-faults-{}", lock_point.total_per_sec()));
            }
            if !folder.is_empty() {
                // Each point's charts in a folder of their own.
                point.plot = a.plot.as_ref().map(|d| d.join(folder.join("-")));
            }
            records.extend(sweep_point(&point)?);
        }
    }
    if let Some(path) = &a.json {
        write_runs(path, records.iter().map(Record::json).collect())?;
        println!("wrote {}", path.display());
    }
    Ok(records.iter().all(|r| r.run.lost_pages == 0))
}

/// Everything `a` asks for at one vCPU count (`a.vcpus`): the runs, their
/// lines and charts.
fn sweep_point(a: &MigratePerfArgs) -> BenchResult<Vec<Record>> {
    let sizes = guest_sizes(a)?;
    let specs = a.harvest_specs()?;
    if let Some(line) =
        crate::output::oversubscribed(a.vcpus, a.harvest_threads.iter().copied().max().unwrap_or(1))
    {
        println!("{line}");
    }
    let engine = a.backend.contains(&BackendKind::Engine);
    let kvm = a.backend.contains(&BackendKind::Kvm).then(kvm::KvmBench::probe);
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
    let variants = engine_variants(a);
    let per_size = if engine { (variants.len() * specs.len()) as u64 } else { 0 } + kvm_specs.len() as u64;
    let steps = u64::from(a.repeat) * sizes.len() as u64 * per_size * u64::from(a.iterations);
    let p = Progress::new(steps, "migrate-perf");
    let mut records = Vec::new();
    // Round by round, every run once per round: the designs interleave.
    for repetition in 0..a.repeat {
        for &size in &sizes {
            for spec in &specs {
                let mut round = Vec::new();
                if engine {
                    for v in &variants {
                        round.push(engine_run(a, &p, v, spec, size)?);
                    }
                }
                if let Some(k) = kvm.as_ref().filter(|k| k.usable())
                    && kvm_specs.contains(spec)
                {
                    round.push(k.run(a, &p, size, spec)?);
                }
                records.extend(round.into_iter().map(|r| Record { repetition, ..r }));
            }
        }
    }
    let faults = if engine && a.fault_heavy_seconds > 0.0 { Some(print_fault_heavy(a, &p)?) } else { None };
    p.finish();
    if let Some(f) = &faults {
        for r in records.iter_mut().filter(|r| r.backend == "engine") {
            let design = r.mmu.split(' ').next().unwrap_or_default();
            let i = a.mmu.iter().position(|m| m.name() == design).expect("a design we ran");
            r.fault_heavy_faults_per_sec = f[i];
        }
    }
    // The single-run lines, of the first round.
    let first: Vec<Record> = records.iter().filter(|r| r.repetition == 0).cloned().collect();
    if a.repeat > 1 {
        println!("== the first of {} rounds", a.repeat);
    }
    print_ratios(&first, &sizes, faults.as_deref(), a);
    repeat::print_repetitions(&records, a.repeat);
    if let Some(dir) = &a.plot {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let mut written = plot::dirty_log_vs_size(
            dir,
            &first.iter().map(|r| (r.label(), r.guest_bytes, r.run.harvest_avg_ns())).collect::<Vec<_>>(),
        )?;
        let largest = sizes.iter().max().copied().unwrap_or(0);
        let at_largest: Vec<&Record> = first.iter().filter(|r| r.guest_bytes == largest).collect();
        let lat: Vec<(String, &LatencySummary)> = at_largest
            .iter()
            .filter_map(|r| r.latency.as_ref().map(|(h, i)| (r, h, i)))
            .flat_map(|(r, h, i)| {
                [(format!("{} during harvests", r.label()), h), (format!("{} outside", r.label()), i)]
            })
            .collect();
        if !lat.is_empty() {
            written.push(plot::fault_latency(dir, &lat, largest)?);
        }
        let progress: Vec<(String, &ProgressTrace)> =
            at_largest.iter().filter_map(|r| r.progress.as_ref().map(|p| (r.label(), p))).collect();
        if !progress.is_empty() {
            written.push(plot::guest_progress(dir, &progress)?);
        }
        for w in written {
            println!("wrote {}", w.display());
        }
    }
    Ok(records)
}

/// The seed's claims, as ratios of runs of this process.
fn print_ratios(records: &[Record], sizes: &[u64], faults: Option<&[Option<f64>]>, a: &MigratePerfArgs) {
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
    if let (Some(f), Some(l), Some(ll)) = (faults, pos(MmuDesign::Locked), pos(MmuDesign::Lockless))
        && let (Some(l), Some(ll)) = (f[l], f[ll])
    {
        println!("lockless/locked fault-heavy throughput: {:.3} (target >= 0.98)", ll / l);
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
        print_phases(&tag, r);
        print_lock_modes(&tag, r);
        print_stall(&tag, r);
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
        print_thread_lines(&tag, size, spec, find);
    }
    if let (Some(e), Some(n)) =
        (find(size, "engine", "tdp", spec), find(size, "engine", "tdp no-eager-split", spec))
    {
        let first = |r: &Record| r.run.iterations.first().map_or(0, |i| i.dirty_memory_ns).max(1) as f64;
        println!(
            "{tag}: tdp eager split against none: first dirtying pass after enable {:.3} ({} against {}), \
             enable {:.3} ({} against {}) (Matlack's series, 96 vCPUs, 1 GiB HugeTLB: 0.05 and 910x)",
            first(e) / first(n),
            secs(first(e) as u64),
            secs(first(n) as u64),
            e.run.enable_dirty_logging_ns as f64 / n.run.enable_dirty_logging_ns.max(1) as f64,
            secs(e.run.enable_dirty_logging_ns),
            secs(n.run.enable_dirty_logging_ns)
        );
    }
    if let (Some(l), Some(ll)) =
        (find(size, "engine", "locked", spec), find(size, "engine", "lockless", spec))
    {
        print_design_lines(&tag, records, size, spec, l, ll);
    }
}

/// `dirty_log_perf_test`'s phases of one run, on one line.
fn print_phases(tag: &str, r: &Record) {
    let it = &r.run.iterations;
    let later: Vec<u64> = it.iter().skip(1).map(|i| i.dirty_memory_ns).collect();
    let later_avg = later.iter().sum::<u64>() / later.len().max(1) as u64;
    println!(
        "{tag}: engine {}: populate {}, enable {}, dirty memory iteration 1 {} then {} avg, get {} avg{}, \
         disable {}",
        r.mmu,
        secs(r.run.populate_ns),
        secs(r.run.enable_dirty_logging_ns),
        secs(it.first().map_or(0, |i| i.dirty_memory_ns)),
        secs(later_avg),
        secs(r.run.get_dirty_log_avg_ns()),
        r.run.clear_dirty_log_avg_ns().map_or(String::new(), |c| format!(", clear {} avg", secs(c))),
        secs(r.run.disable_dirty_logging_ns)
    );
}

/// Which mode of `mmu_lock` the slow faults and the harvests took, and
/// how long it was held in each.
fn print_lock_modes(tag: &str, r: &Record) {
    let f = |k: &str| r.figure(k).unwrap_or(0);
    println!(
        "{tag}: engine {}: mmu_lock: slow faults took it {} times for read, {} for write; harvests {} for \
         read, {} for write; held {} for read (summed over readers), {} for write; waited {} for read, \
         {} for write",
        r.mmu,
        f("fault_mmu_lock_reads"),
        f("fault_mmu_lock_writes"),
        f("harvest_mmu_lock_reads"),
        f("harvest_mmu_lock_writes"),
        secs(f("mmu_lock_read_hold_ns")),
        secs(f("mmu_lock_hold_ns")),
        secs(f("mmu_lock_read_wait_ns")),
        secs(f("mmu_lock_write_wait_ns"))
    );
}

/// What the vCPUs lost to the harvests in one run: their `mmu_lock` wait
/// in faults during harvests, the fault latency inside harvest windows
/// against outside them, and the guest's progress in them.
fn print_stall(tag: &str, r: &Record) {
    let us = |ns: u64| ns as f64 / 1e3;
    let Some((inside, outside)) = &r.latency else { return };
    println!(
        "{tag}: engine {}: vCPU mmu_lock wait in faults during harvests {:.3} ms (of {:.3} ms in all); \
         write-fault p50/p99/max inside harvests {:.2}/{:.2}/{:.2} us ({} faults), outside {:.2}/{:.2}/{:.2} \
         us; p99 inside/outside {:.2}; guest progress during harvests {}",
        r.mmu,
        r.harvest_lock_wait_ns() as f64 / 1e6,
        (r.loss().mmu_lock_read_wait_ns + r.loss().mmu_lock_write_wait_ns) as f64 / 1e6,
        us(inside.quantile_ns(0.5)),
        us(inside.quantile_ns(0.99)),
        us(inside.max_ns()),
        inside.count(),
        us(outside.quantile_ns(0.5)),
        us(outside.quantile_ns(0.99)),
        us(outside.max_ns()),
        inside.quantile_ns(0.99) as f64 / outside.quantile_ns(0.99).max(1) as f64,
        r.progress
            .as_ref()
            .and_then(ProgressTrace::fraction)
            .map_or("unmeasured".into(), |f| format!("{f:.3} of outside"))
    );
}

/// A harvest on several threads against one: the floor's, and each
/// design's.
fn print_thread_lines<'r>(
    tag: &str,
    size: u64,
    spec: &HarvestSpec,
    find: &dyn Fn(u64, &str, &str, &HarvestSpec) -> Option<&'r Record>,
) {
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
            // The helpers spin through the vCPUs' last pass before a quiet
            // harvest (`prepare_harvest`): what that costs the guest.
            println!(
                "{tag}: engine {mmu}: the vCPUs' pass before the quiet harvest, the helpers woken ahead and \
                 spinning: {} against {} with no helper: {:.3}",
                secs(n.run.quiet.dirty_memory_ns),
                secs(o.run.quiet.dirty_memory_ns),
                n.run.quiet.dirty_memory_ns as f64 / o.run.quiet.dirty_memory_ns.max(1) as f64
            );
        }
    }
}

/// Lockless against locked (`l`, `ll`): the harvest, its floor, the fault
/// latency, the enable, and each against KVM.
fn print_design_lines(tag: &str, records: &[Record], size: u64, spec: &HarvestSpec, l: &Record, ll: &Record) {
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
    if let (Some((lh, _)), Some((llh, lli))) = (&l.latency, &ll.latency) {
        println!(
            "{tag}: vCPU write-fault p99 during harvest: locked {:.2} us, lockless {:.2} us; lockless inside \
             harvests against outside: {:.2} (target <= 1.5)",
            lh.quantile_ns(0.99) as f64 / 1e3,
            llh.quantile_ns(0.99) as f64 / 1e3,
            llh.quantile_ns(0.99) as f64 / lli.quantile_ns(0.99).max(1) as f64
        );
        println!(
            "{tag}: vCPU mmu_lock wait during harvests: lockless {:.3} ms against locked {:.3} ms: {:.3} \
             (target <= 0.1)",
            ll.harvest_lock_wait_ns() as f64 / 1e6,
            l.harvest_lock_wait_ns() as f64 / 1e6,
            ll.harvest_lock_wait_ns() as f64 / l.harvest_lock_wait_ns().max(1) as f64
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

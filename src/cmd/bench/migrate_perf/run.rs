//! One `bench migrate-perf` run on any backend, through the testkit's one
//! procedure: its record, and the report's lines.

use serde_json::{Value, json};
use shadow_mmu_testkit::perf::{self, PerfRun};
use shadow_mmu_vmm::{DirtyLogInterface, HarvestSpec, LatencySummary, PassSpec, ProgressTrace, VcpuLoss};

use crate::cmd::bench::BenchResult;
use crate::output::{Progress, secs};

use super::args::MigratePerfArgs;

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
    /// Which repetition (`--repeat`) this run was, from 0.
    pub(super) repetition: u32,
    pub(super) run: PerfRun,
    pub(super) floor_ns_per_page: f64,
    /// With several harvest threads: the compare-exchange floor on that
    /// many threads against one, measured right after this run, so that a
    /// round's harvest ratio can be set against what the machine ran in
    /// parallel at that moment.
    pub(super) floor_threads_ratio: Option<f64>,
    /// Engine only: KVM's faults cannot be timed from userspace.
    pub(super) latency: Option<(LatencySummary, LatencySummary)>,
    /// Per vCPU: what it lost, and its `mmu_lock` waits during harvests
    /// (read, write); empty where the backend measures none.
    pub(super) losses: Vec<(VcpuLoss, (u64, u64))>,
    /// The guest's progress and the harvest windows, where sampled.
    pub(super) progress: Option<ProgressTrace>,
    pub(super) fault_heavy_faults_per_sec: Option<f64>,
    pub(super) extra: Value,
}

impl Record {
    pub(super) fn label(&self) -> String {
        format!("{} {} {}", self.backend, self.mmu, self.spec.label())
    }

    /// The vCPUs' `mmu_lock` waits in faults that overlapped a harvest, ns,
    /// read and write together, summed over the vCPUs.
    pub(super) fn harvest_lock_wait_ns(&self) -> u64 {
        self.losses.iter().map(|(_, (r, w))| r + w).sum()
    }

    /// What the vCPUs lost, summed.
    pub(super) fn loss(&self) -> VcpuLoss {
        self.losses.iter().map(|(l, _)| *l).sum()
    }

    /// A figure of the backend's own (`PassExtras::figures`).
    pub(super) fn figure(&self, name: &str) -> Option<u64> {
        self.extra.get(name).and_then(Value::as_u64)
    }

    pub(super) fn json(&self) -> Value {
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
            "repetition": self.repetition,
            "populate_ns": self.run.populate_ns,
            "enable_dirty_logging_ns": self.run.enable_dirty_logging_ns,
            "disable_dirty_logging_ns": self.run.disable_dirty_logging_ns,
            "dirty_memory_avg_ns": self.run.dirty_memory_avg_ns(),
            "get_dirty_log_avg_ns": self.run.get_dirty_log_avg_ns(),
            "clear_dirty_log_avg_ns": self.run.clear_dirty_log_avg_ns(),
            "dirty_pages_avg": self.run.dirty_pages_avg(),
            "ns_per_dirty_page": self.run.ns_per_dirty_page(),
            "floor_ns_per_page": self.floor_ns_per_page,
            "floor_threads_ratio": self.floor_threads_ratio,
            "vcpu_fault_p99_ns_harvest": harvest.map(|h| h.quantile_ns(0.99)),
            "vcpu_fault_p99_ns_idle": idle.map(|h| h.quantile_ns(0.99)),
            "vcpu_fault_latency_harvest": lat(harvest),
            "vcpu_fault_latency_idle": lat(idle),
            "lost_pages": self.run.lost_pages,
            "quiet_get_dirty_log_ns": self.run.quiet.get_dirty_log_ns,
            "quiet_harvests_ns": self.run.quiet_harvests_ns,
            "quiet_pass_before_ns": self.run.quiet.dirty_memory_ns,
            "quiet_dirty_pages": self.run.quiet.dirty_pages,
            "quiet_ns_per_dirty_page": self.run.quiet.ns_per_page(),
            "fault_heavy_faults_per_sec": self.fault_heavy_faults_per_sec,
            "vcpu_losses": self.losses.iter().map(loss_json).collect::<Vec<_>>(),
            "progress": self.progress.as_ref().map(progress_json),
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

/// One vCPU's losses, by cause, with its lock waits during harvests.
fn loss_json((l, (hr, hw)): &(VcpuLoss, (u64, u64))) -> Value {
    let mut o: serde_json::Map<String, Value> =
        l.causes().iter().map(|(k, v)| (format!("{k}_ns"), json!(v))).collect();
    o.insert("harvest_mmu_lock_read_wait_ns".into(), json!(hr));
    o.insert("harvest_mmu_lock_write_wait_ns".into(), json!(hw));
    Value::Object(o)
}

/// The guest's progress: the rates, the windows, the samples.
fn progress_json(p: &ProgressTrace) -> Value {
    let windows: Vec<Value> = p
        .windows
        .iter()
        .map(|w| {
            json!([w.begin_ns, w.end_ns, w.begin_accesses, w.end_accesses, w.begin_idle_ns, w.end_idle_ns])
        })
        .collect();
    json!({
        "inside_harvest_per_sec": p.rates().map(|r| r.0),
        "outside_harvest_per_sec": p.rates().map(|r| r.1),
        "fraction": p.fraction(),
        "windows": windows,
        "samples": p.samples,
    })
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

/// What the vCPUs lost, per vCPU (up to 8; beyond, summed), and the
/// guest's progress during harvests against outside them.
fn loss_lines(r: &Record) -> Vec<String> {
    let ms = |ns: u64| ns as f64 / 1e6;
    let line = |who: String, l: &VcpuLoss, (hr, hw): (u64, u64)| {
        format!(
            "{who} lost: mmu_lock waits {:.3} ms for read, {:.3} ms for write (in faults during harvests: \
             {:.3} ms, {:.3} ms; begun behind a harvest: {:.3} ms); TLB flush requests {:.3} ms; throttled \
             {:.3} ms; ring full {:.3} ms",
            ms(l.mmu_lock_read_wait_ns),
            ms(l.mmu_lock_write_wait_ns),
            ms(hr),
            ms(hw),
            ms(l.harvest_lock_wait_ns),
            ms(l.tlb_flush_ns),
            ms(l.throttle_ns),
            ms(l.ring_full_ns)
        )
    };
    let mut out = Vec::new();
    if r.losses.len() <= 8 {
        for (i, (l, h)) in r.losses.iter().enumerate() {
            out.push(line(format!("vCPU {i}"), l, *h));
        }
    } else {
        let h = r.losses.iter().fold((0, 0), |a, (_, (x, y))| (a.0 + x, a.1 + y));
        out.push(line(format!("{} vCPUs together", r.losses.len()), &r.loss(), h));
    }
    if let Some(p) = &r.progress {
        // A vCPU woken but waiting for a CPU counts as idle until it runs,
        // one preempted as running: with more threads than CPUs, the two
        // sides of the ratio see different shares of the CPUs.
        let caveat = if crate::output::oversubscribed(r.vcpus, 1).is_some() {
            "; oversubscribed, so not comparable: a vCPU waiting for a CPU counts as running"
        } else {
            ""
        };
        out.push(match (p.rates(), p.fraction()) {
            (Some((inside, outside)), Some(f)) => format!(
                "Guest progress during harvests: {:.2} M accesses/s against {:.2} M outside them: {f:.3} \
                 ({} harvest windows, {:.3} ms in all{caveat})",
                inside / 1e6,
                outside / 1e6,
                p.windows.len(),
                ms(p.windows.iter().map(|w| w.end_ns - w.begin_ns).sum())
            ),
            _ => "Guest progress during harvests: no harvest window to measure".into(),
        });
    }
    out
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
            "Harvest with no vCPU running: {} for {} dirty pages, {per:.2} ns per page = {:.2} x floor (the \
             median of {:?} ns)",
            secs(q.harvest_ns()),
            q.dirty_pages,
            per / r.floor_ns_per_page,
            run.quiet_harvests_ns
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
    for line in loss_lines(r) {
        p.line(line);
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
        lock_faults: a.lock_point,
        lazy_memory: false,
        compute_vcpus: 0,
        // The guest-progress plot.
        progress_samples: true,
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
        repetition: 0,
        floor_ns_per_page: perf::cmpxchg_floor(run.dirty_pages_avg()),
        floor_threads_ratio: (harvest.harvest_threads > 1).then(|| {
            let pages = run.quiet.dirty_pages;
            perf::cmpxchg_floor_on(pages, harvest.harvest_threads) / perf::cmpxchg_floor_on(pages, 1)
        }),
        latency: extras.latency,
        losses: extras.vcpu_losses,
        progress: extras.progress,
        fault_heavy_faults_per_sec: None,
        run,
        extra: Value::Object(details),
    };
    p.line(format!("Populate memory time: {}", secs(rec.run.populate_ns)));
    p.line(format!("Enabling dirty logging time: {}", secs(rec.run.enable_dirty_logging_ns)));
    print_summary(p, &rec);
    p.line(format!("Disabling dirty logging time: {}", secs(rec.run.disable_dirty_logging_ns)));
    for line in extras.lines {
        p.line(line);
    }
    Ok(rec)
}

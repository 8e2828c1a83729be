//! `migrate-perf`: dirty logging measured the way KVM's
//! `dirty_log_perf_test` reports it, plus the seed's two claims.
//!
//! Procedure, per design, in `dirty_log_perf_test`'s rhythm:
//! 1. vCPU threads start; each sweeps its slice of guest memory once, one
//!    8-byte store per page (or the chosen mix of loads and stores), then
//!    waits for the host to release its next pass. The first pass of every
//!    vCPU is the *populate* time.
//! 2. Dirty logging is enabled (timed), and the harvester copies all of
//!    memory (the bulk copy of a migration).
//! 3. Iteration `i`: the vCPUs' pass `i` (every page write-protected by the
//!    last harvest, so every store faults) is the *dirty memory* time. Then
//!    the host releases pass `i + 1` and times `get_dirty_log` while the vCPUs
//!    are write-faulting again, and lets the oracle check the harvest and
//!    copy the dirty pages.
//! 4. The vCPUs finish their pass and make one more while nobody harvests;
//!    then, with every vCPU parked, one harvest of the freshly dirtied guest
//!    is timed alone (`quiet`).
//! 5. The vCPUs stop; the oracle's exact final check counts lost pages.
//!
//! The no-regression claim is measured separately ([`fault_heavy`]): a
//! fault-heavy workload with dirty logging off, whose shadow page budget is
//! too small to hold the map, so every pass faults on every page again.
//!
//! Every vCPU carries a [`LatencyProbe`]: each write fault's latency, from
//! the exit of guest mode to the re-entry, goes into one HDR histogram if a
//! harvest ran at any time during the fault, into another if none did. The
//! host brackets each `get_dirty_log` with two increments of a harvest
//! sequence number (odd: a harvest runs), which the probe reads at both ends
//! of the fault. [`cmpxchg_floor`] gives the cost a harvest cannot go below:
//! one compare-exchange per dirty page over a plain array.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_utils::CachePadded;
use hdrhistogram::Histogram;

use crate::dirty_bitmap::bitmap_words;
use crate::harness::HarnessError;
use crate::memory::HostMemory;
use crate::memslot::{MemFlags, UserMemoryRegion};
use crate::mmu::MmuDesign;
use crate::oracle::Oracle;
use crate::spte::PAGE_SIZE;
use crate::vcpu::{FaultObserver, VcpuExit, VcpuStats};
use crate::vm::{Vm, VmConfig, VmStats};
use crate::workload::{AccessPattern, GuestControl, HC_PASS_DONE, HC_STOP, WorkloadGuest, WorkloadSpec};

/// A `migrate-perf` run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigratePerfConfig {
    /// Design.
    pub mmu: MmuDesign,
    /// `fast_page_fault` on (`VmConfig::fast_page_fault`).
    pub fast_page_fault: bool,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest memory, bytes.
    pub guest_bytes: u64,
    /// Iterations (harvests) after the bulk copy.
    pub iterations: u32,
    /// Share of accesses that are stores, percent.
    pub write_pct: u8,
    /// Random pages instead of a sequential sweep.
    pub random: bool,
    /// Map 2 MiB pages where possible (before logging).
    pub large_pages: bool,
    /// Seed of the random choices.
    pub seed: u64,
}

/// One iteration of a `migrate-perf` run, whichever the backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Iteration {
    /// The slowest vCPU's last full pass over its memory (one store per
    /// page): `dirty_log_perf_test`'s "dirty memory time".
    pub dirty_memory_ns: u64,
    /// Time of `get_dirty_log`.
    pub get_dirty_log_ns: u64,
    /// Time of `clear_dirty_log`, where the backend protects manually.
    pub clear_dirty_log_ns: Option<u64>,
    /// Pages it reported dirty.
    pub dirty_pages: u64,
}

impl Iteration {
    /// The harvest: `get_dirty_log`, plus `clear_dirty_log` where the
    /// protection is done there (manual protect).
    pub fn harvest_ns(&self) -> u64 {
        self.get_dirty_log_ns + self.clear_dirty_log_ns.unwrap_or(0)
    }

    /// Harvest time per dirty page.
    pub fn ns_per_page(&self) -> f64 {
        self.harvest_ns() as f64 / self.dirty_pages.max(1) as f64
    }
}

/// What a `migrate-perf` run measures on every backend.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PerfRun {
    /// Time for every vCPU to complete its first pass, dirty logging off.
    pub populate_ns: u64,
    /// Time to enable dirty logging.
    pub enable_dirty_logging_ns: u64,
    /// Each iteration.
    pub iterations: Vec<Iteration>,
    /// After the iterations: a harvest of a guest the vCPUs have just fully
    /// dirtied (with `write_pct` 100), with every vCPU parked.
    pub quiet: Iteration,
    /// Lost dirty pages found (all checks, final included).
    pub lost_pages: u64,
}

impl PerfRun {
    /// The mean of `f` over the iterations.
    pub fn avg(&self, f: impl Fn(&Iteration) -> u64) -> u64 {
        self.iterations.iter().map(f).sum::<u64>() / self.iterations.len().max(1) as u64
    }

    /// Mean `get_dirty_log` time.
    pub fn get_dirty_log_avg_ns(&self) -> u64 {
        self.avg(|i| i.get_dirty_log_ns)
    }

    /// Mean `clear_dirty_log` time, where the backend protects manually.
    pub fn clear_dirty_log_avg_ns(&self) -> Option<u64> {
        let c: Option<Vec<u64>> = self.iterations.iter().map(|i| i.clear_dirty_log_ns).collect();
        c.filter(|c| !c.is_empty()).map(|c| c.iter().sum::<u64>() / c.len() as u64)
    }

    /// Mean harvest time (`get_dirty_log`, plus `clear_dirty_log`).
    pub fn harvest_avg_ns(&self) -> u64 {
        self.avg(Iteration::harvest_ns)
    }

    /// Mean dirty memory time.
    pub fn dirty_memory_avg_ns(&self) -> u64 {
        self.avg(|i| i.dirty_memory_ns)
    }

    /// Mean dirty pages per harvest.
    pub fn dirty_pages_avg(&self) -> u64 {
        self.avg(|i| i.dirty_pages)
    }

    /// Mean harvest time per dirty page.
    pub fn ns_per_dirty_page(&self) -> f64 {
        self.harvest_avg_ns() as f64 / self.dirty_pages_avg().max(1) as f64
    }
}

/// What a `migrate-perf` run on the engine measured: [`PerfRun`], and what
/// only the engine shows.
#[derive(Debug, Clone, Default)]
pub struct MigratePerfRun {
    /// The figures every backend has.
    pub run: PerfRun,
    /// vCPU counters, summed, over the whole run.
    pub vcpu: VcpuStats,
    /// MMU figures at the end.
    pub vm: VmStats,
    /// Latencies of the vCPUs' write faults that overlapped a harvest, ns.
    pub fault_latency_harvest: LatencyHistogram,
    /// Latencies of the vCPUs' write faults with no harvest running, ns.
    pub fault_latency_idle: LatencyHistogram,
}

/// A histogram of latencies in nanoseconds (1 ns to 100 s, 3 significant
/// digits).
#[derive(Debug, Clone)]
pub struct LatencyHistogram(pub Histogram<u64>);

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self(Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("valid bounds"))
    }
}

impl LatencyHistogram {
    /// Records one latency (clamped into the histogram's range).
    pub fn record(&mut self, ns: u64) {
        self.0.saturating_record(ns.max(1));
    }

    /// The latency at `quantile` (0.0 to 1.0); 0 if empty.
    pub fn quantile_ns(&self, quantile: f64) -> u64 {
        if self.0.is_empty() { 0 } else { self.0.value_at_quantile(quantile) }
    }

    /// Samples recorded.
    pub fn count(&self) -> u64 {
        self.0.len()
    }

    /// The largest latency; 0 if empty.
    pub fn max_ns(&self) -> u64 {
        if self.0.is_empty() { 0 } else { self.0.max() }
    }

    /// Merges `other` in.
    pub fn add(&mut self, other: &Self) {
        // Both have the same bounds, and the bounds auto-resize anyway.
        self.0.add(&other.0).expect("histograms of the same bounds");
    }
}

/// The harvest sequence number: odd while the host harvests.
#[derive(Debug, Default)]
pub struct HarvestClock(CachePadded<AtomicU64>);

impl HarvestClock {
    /// Brackets `f`, a harvest, so that the probes see it.
    pub fn harvest<T>(&self, f: impl FnOnce() -> T) -> T {
        // Relaxed: a classification for statistics, read by the probes with
        // relaxed loads. A fault that overlaps a harvest by less than the
        // time a store takes to reach the other core may be counted idle.
        self.0.fetch_add(1, Ordering::Relaxed);
        let r = f();
        // Relaxed: as above.
        self.0.fetch_add(1, Ordering::Relaxed);
        r
    }

    fn now(&self) -> u64 {
        // Relaxed: see `harvest`.
        self.0.load(Ordering::Relaxed)
    }
}

/// A vCPU's fault probe: write-fault latencies, split by whether a harvest
/// overlapped the fault.
#[derive(Debug)]
pub struct LatencyProbe {
    clock: Arc<HarvestClock>,
    begin: u64,
    /// Write faults that overlapped a harvest.
    pub harvest: LatencyHistogram,
    /// Write faults with no harvest running.
    pub idle: LatencyHistogram,
}

impl LatencyProbe {
    /// A probe that reads `clock`.
    pub fn new(clock: Arc<HarvestClock>) -> Self {
        Self { clock, begin: 0, harvest: LatencyHistogram::default(), idle: LatencyHistogram::default() }
    }
}

impl FaultObserver for LatencyProbe {
    fn fault_begin(&mut self) {
        self.begin = self.clock.now();
    }

    fn fault_end(&mut self, write: bool, ns: u64) {
        if !write {
            return;
        }
        let end = self.clock.now();
        // A harvest ran at some time during the fault if one was running at
        // either end, or one started or ended in between.
        if self.begin % 2 == 1 || end != self.begin {
            self.harvest.record(ns);
        } else {
            self.idle.record(ns);
        }
    }
}

/// The floor of a harvest: one compare-exchange that clears the writable
/// bit per page, over a plain array of `pages` u64 (no rmap, no bitmap, no
/// shadow page), on one thread. Returns ns per page, the best of 3 runs.
pub fn cmpxchg_floor(pages: u64) -> f64 {
    use crate::spte::PT_WRITABLE_MASK;
    let pages = pages.max(1);
    let array: Vec<AtomicU64> = (0..pages).map(|i| AtomicU64::new((i << 12) | 0x7)).collect();
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        for a in &array {
            // Relaxed: single-threaded setup.
            a.fetch_or(PT_WRITABLE_MASK, Ordering::Relaxed);
        }
        let t = Instant::now();
        for a in &array {
            // Relaxed loads and a relaxed compare-exchange: the floor measures
            // the locked read-modify-write itself (on x86 every ordering
            // compiles to the same `lock cmpxchg`), as
            // `spte_write_protect_lockless` does once per writable spte.
            let old = a.load(Ordering::Relaxed);
            let _ = a.compare_exchange(old, old & !PT_WRITABLE_MASK, Ordering::Relaxed, Ordering::Relaxed);
        }
        best = best.min(t.elapsed().as_nanos() as f64 / pages as f64);
    }
    std::hint::black_box(&array);
    best
}

/// A vCPU's pass count and the duration of its last pass.
#[derive(Default)]
struct PassClock {
    passes: AtomicU64,
    last_pass_ns: AtomicU64,
}

/// vCPU threads that sweep their memory pass by pass, as far as the host
/// releases them (`allowed`), counting and timing their passes.
struct Sweepers {
    ctl: Arc<GuestControl>,
    passes: Arc<[CachePadded<PassClock>]>,
    allowed: Arc<AtomicU64>,
    threads: Vec<JoinHandle<SweeperExit>>,
}

/// What a sweeper thread returns: its vCPU's counters and its probe.
type SweeperExit = Result<(VcpuStats, Option<Box<LatencyProbe>>), String>;

/// What the sweepers leave when they stop.
#[derive(Debug, Default)]
struct SweepResult {
    stats: VcpuStats,
    harvest: LatencyHistogram,
    idle: LatencyHistogram,
}

impl Sweepers {
    /// Starts `vcpus` sweepers, allowed `allowed` passes before they wait.
    fn start(
        vm: &Vm,
        vcpus: u32,
        npages: u64,
        spec: WorkloadSpec,
        allowed: u64,
        clock: Option<Arc<HarvestClock>>,
    ) -> Result<Self, HarnessError> {
        let ctl = GuestControl::new(vcpus);
        let passes: Arc<[CachePadded<PassClock>]> =
            (0..vcpus).map(|_| CachePadded::new(PassClock::default())).collect();
        let allowed = Arc::new(AtomicU64::new(allowed));
        let mut threads = Vec::new();
        for id in 0..vcpus {
            let mut vcpu = vm.create_vcpu(id)?;
            if let Some(c) = &clock {
                vcpu.set_fault_observer(Some(Box::new(LatencyProbe::new(c.clone()))));
            }
            let mut guest = WorkloadGuest::new(spec, id, vcpus, 0, npages, ctl.clone());
            let (passes, ctl, allowed) = (passes.clone(), ctl.clone(), allowed.clone());
            threads.push(std::thread::spawn(move || {
                let clock = &passes[id as usize];
                let mut done = 0;
                let mut pass_start = Instant::now();
                let r = loop {
                    match vcpu.run(&mut guest) {
                        Ok(VcpuExit::Hypercall(HC_PASS_DONE)) => {
                            // Relaxed: published by the release increment below.
                            clock
                                .last_pass_ns
                                .store(pass_start.elapsed().as_nanos() as u64, Ordering::Relaxed);
                            done += 1;
                            // Release: pairs with `wait_passes`' acquire load.
                            clock.passes.store(done, Ordering::Release);
                            // Outside guest mode (the guest parked): wait until the
                            // host releases the next pass, or stops us.
                            // Acquire: pairs with `release`.
                            while allowed.load(Ordering::Acquire) <= done && !ctl.stop_requested() {
                                std::thread::sleep(Duration::from_micros(20));
                            }
                            pass_start = Instant::now();
                        }
                        Ok(VcpuExit::Hypercall(HC_STOP)) => {
                            let probe = vcpu.set_fault_observer(None).map(|o| {
                                let o: Box<dyn std::any::Any> = o;
                                o.downcast::<LatencyProbe>().expect("the probe we installed")
                            });
                            break Ok((vcpu.stats(), probe));
                        }
                        Ok(other) => break Err(format!("vCPU {id}: unexpected exit {other:?}")),
                        Err(e) => break Err(format!("vCPU {id}: {e}")),
                    }
                };
                ctl.park(id);
                r
            }));
        }
        Ok(Self { ctl, passes, allowed, threads })
    }

    /// Lets every vCPU go on up to pass `n`.
    fn release(&self, n: u64) {
        // Release: pairs with the vCPUs' acquire load.
        self.allowed.store(n, Ordering::Release);
    }

    /// Passes each vCPU has completed.
    fn passes(&self) -> Vec<u64> {
        // Acquire: pairs with the vCPU's release increment.
        self.passes.iter().map(|p| p.passes.load(Ordering::Acquire)).collect()
    }

    /// Waits until every vCPU has completed more passes than `since`;
    /// returns the longest of their last passes.
    fn wait_passes(&self, since: &[u64]) -> u64 {
        for (p, &s) in self.passes.iter().zip(since) {
            // Acquire: as in `passes`.
            while p.passes.load(Ordering::Acquire) <= s {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
        // Relaxed: each read after the acquire load that saw the increment
        // its store precedes.
        self.passes.iter().map(|p| p.last_pass_ns.load(Ordering::Relaxed)).max().unwrap_or(0)
    }

    fn stop(&mut self) -> Result<SweepResult, String> {
        self.ctl.request_stop();
        let mut r = SweepResult::default();
        for t in self.threads.drain(..) {
            let (stats, probe) = t.join().map_err(|_| "a vCPU thread panicked".to_string())??;
            r.stats += stats;
            if let Some(p) = probe {
                r.harvest.add(&p.harvest);
                r.idle.add(&p.idle);
            }
        }
        Ok(r)
    }
}

impl Drop for Sweepers {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// A VM with one slot over pre-populated host memory: the first pass then
/// measures shadow page faults, not the host kernel's first-touch faults
/// (which would also make whichever design runs first look slower).
pub(crate) fn vm_with_memory(
    config: VmConfig,
    guest_bytes: u64,
) -> Result<(Vm, Arc<HostMemory>), HarnessError> {
    let vm = Vm::new(config)?;
    let mem = HostMemory::anonymous_populated(guest_bytes)?;
    vm.set_user_memory_region(UserMemoryRegion {
        slot: 0,
        flags: MemFlags::empty(),
        guest_phys_addr: 0,
        memory_size: guest_bytes,
        memory: Some(mem.clone()),
        memory_offset: 0,
    })?;
    Ok((vm, mem))
}

/// Runs one `migrate-perf` configuration; `on_iteration` sees each
/// iteration as it completes.
pub fn migrate_perf(
    cfg: &MigratePerfConfig,
    mut on_iteration: impl FnMut(u32, &Iteration),
) -> Result<MigratePerfRun, HarnessError> {
    if cfg.vcpus == 0 || cfg.guest_bytes / PAGE_SIZE < u64::from(cfg.vcpus) || cfg.write_pct > 100 {
        return Err(HarnessError::BadConfig(format!("{cfg:?}")));
    }
    let (vm, mem) = vm_with_memory(
        VmConfig {
            mmu: cfg.mmu,
            fast_page_fault: cfg.fast_page_fault,
            large_pages: cfg.large_pages,
            ..VmConfig::default()
        },
        cfg.guest_bytes,
    )?;
    let npages = cfg.guest_bytes / PAGE_SIZE;
    let spec = WorkloadSpec {
        pattern: if cfg.random { AccessPattern::Random } else { AccessPattern::Seq },
        write_pct: cfg.write_pct,
        exit_each_pass: true,
        seed: cfg.seed,
        ..WorkloadSpec::default()
    };
    let mut engine_run = MigratePerfRun::default();
    let run = &mut engine_run.run;
    let clock = Arc::new(HarvestClock::default());
    let t0 = Instant::now();
    let mut sweepers = Sweepers::start(&vm, cfg.vcpus, npages, spec, 1, Some(clock.clone()))?;
    sweepers.wait_passes(&vec![0; cfg.vcpus as usize]);
    run.populate_ns = t0.elapsed().as_nanos() as u64;

    let mut oracle = Oracle::new(0, npages);
    let mut bitmap = vec![0u64; bitmap_words(npages)];
    sweepers.ctl.cut();
    let t = Instant::now();
    vm.enable_dirty_logging(0)?;
    run.enable_dirty_logging_ns = t.elapsed().as_nanos() as u64;
    oracle.full_copy(mem.words());

    // Pass 2 dirties the memory for the first harvest.
    sweepers.release(2);
    for i in 0..cfg.iterations {
        let pass = 2 + u64::from(i);
        let dirty_memory_ns = sweepers.wait_passes(&vec![pass - 1; cfg.vcpus as usize]);
        // The cut first, with every vCPU parked (so it returns at once), then
        // the release, then the harvest: the vCPUs go on write-faulting
        // during the harvest, and the harvester starts as they wake, ahead
        // of them, so each of their stores faults on a page it has already
        // protected. With the release first, the cut waited for every vCPU's
        // first store of the new pass: a vCPU could start ahead of the
        // harvester, and then stayed ahead without faulting, sharing its
        // cache lines and handing it the whole pass (the README's outliers).
        let cut = sweepers.ctl.cut();
        sweepers.release(pass + 1);
        let (dirty_pages, get_dirty_log_ns) = clock.harvest(|| {
            let t = Instant::now();
            let r = vm.get_dirty_log(0, &mut bitmap);
            (r, t.elapsed().as_nanos() as u64)
        });
        let it = Iteration {
            dirty_memory_ns,
            get_dirty_log_ns,
            clear_dirty_log_ns: None,
            dirty_pages: dirty_pages?,
        };
        run.lost_pages += oracle.collect(mem.words(), &bitmap, cut).lost_pages;
        on_iteration(i + 1, &it);
        run.iterations.push(it);
    }
    // The harvest alone: the vCPUs finish the pass they are in (harvested
    // untimed), then make one more full pass and park, and one harvesting
    // thread write-protects a fully dirtied guest with nothing running
    // beside it.
    let pass = 2 + u64::from(cfg.iterations);
    sweepers.wait_passes(&vec![pass - 1; cfg.vcpus as usize]);
    let cut = sweepers.ctl.cut();
    vm.get_dirty_log(0, &mut bitmap)?;
    run.lost_pages += oracle.collect(mem.words(), &bitmap, cut).lost_pages;
    sweepers.release(pass + 1);
    let dirty_memory_ns = sweepers.wait_passes(&vec![pass; cfg.vcpus as usize]);
    let cut = sweepers.ctl.cut();
    let t = Instant::now();
    let dirty_pages = vm.get_dirty_log(0, &mut bitmap)?;
    run.quiet = Iteration {
        dirty_memory_ns,
        get_dirty_log_ns: t.elapsed().as_nanos() as u64,
        clear_dirty_log_ns: None,
        dirty_pages,
    };
    run.lost_pages += oracle.collect(mem.words(), &bitmap, cut).lost_pages;

    let swept = sweepers.stop().map_err(HarnessError::BadConfig)?;
    vm.get_dirty_log(0, &mut bitmap)?;
    run.lost_pages += oracle.finish(mem.words(), &bitmap).lost_pages;
    engine_run.vcpu = swept.stats;
    engine_run.fault_latency_harvest = swept.harvest;
    engine_run.fault_latency_idle = swept.idle;
    engine_run.vm = vm.stats();
    Ok(engine_run)
}

/// What [`fault_heavy`] measured.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FaultHeavy {
    /// Page faults handled per second.
    pub faults_per_sec: f64,
    /// Guest accesses per second.
    pub accesses_per_sec: f64,
    /// Shadow pages zapped by the shrinker.
    pub sp_shrunk: u64,
}

/// Guest memory of the fault-heavy workload: 128 page tables' worth, twice
/// the shadow page budget.
pub const FAULT_HEAVY_GUEST_BYTES: u64 = 256 << 20;

/// The no-regression workload: `vcpus` vCPUs sweep 256 MiB with 4 KiB
/// mappings and a shadow page budget of 64 pages, so the shrinker zaps the
/// map as fast as it is built and every pass faults on every page; dirty
/// logging is off. Runs for `duration` after one warm-up pass.
pub fn fault_heavy(
    mmu: MmuDesign,
    fast_page_fault: bool,
    vcpus: u32,
    duration: Duration,
) -> Result<FaultHeavy, HarnessError> {
    let guest_bytes = FAULT_HEAVY_GUEST_BYTES;
    let config =
        VmConfig { mmu, fast_page_fault, large_pages: false, max_mmu_pages: Some(64), ..VmConfig::default() };
    let (vm, _mem) = vm_with_memory(config, guest_bytes)?;
    let spec = WorkloadSpec { exit_each_pass: true, ..WorkloadSpec::default() };
    let mut sweepers = Sweepers::start(&vm, vcpus, guest_bytes / PAGE_SIZE, spec, u64::MAX, None)?;
    sweepers.wait_passes(&vec![0; vcpus as usize]);
    let stats0 = vm.stats();
    // Faults are counted by the MMU (leaf sptes installed, one per fault
    // with 4 KiB mappings), passes by the sweepers.
    let start_passes = sweepers.passes();
    let t0 = Instant::now();
    std::thread::sleep(duration);
    let secs = t0.elapsed().as_secs_f64();
    let passes: u64 = sweepers.passes().iter().zip(&start_passes).map(|(a, b)| a - b).sum();
    let stats = vm.stats();
    sweepers.stop().map_err(HarnessError::BadConfig)?;
    let pages = guest_bytes / PAGE_SIZE;
    Ok(FaultHeavy {
        faults_per_sec: (stats.mmu.sptes_mapped - stats0.mmu.sptes_mapped) as f64 / secs,
        accesses_per_sec: (passes * pages / u64::from(vcpus)) as f64 / secs,
        sp_shrunk: stats.mmu.sp_shrunk - stats0.mmu.sp_shrunk,
    })
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn the_probe_files_a_fault_under_harvest_if_any_harvest_overlapped_it() {
        let clock = Arc::new(HarvestClock::default());
        let mut p = LatencyProbe::new(clock.clone());
        // No harvest at all: idle.
        p.fault_begin();
        p.fault_end(true, 100);
        // Begins and ends inside one harvest.
        clock.harvest(|| {
            p.fault_begin();
            p.fault_end(true, 200);
        });
        // Begins before a harvest that ends before the fault does.
        p.fault_begin();
        clock.harvest(|| ());
        p.fault_end(true, 300);
        // Begins inside a harvest, ends after it.
        clock.harvest(|| p.fault_begin());
        p.fault_end(true, 400);
        // Read faults are not write faults: not recorded.
        clock.harvest(|| {
            p.fault_begin();
            p.fault_end(false, 500);
        });
        assert_eq!((p.idle.count(), p.harvest.count()), (1, 3));
        assert_eq!(p.idle.max_ns(), 100);
        assert_eq!((p.harvest.quantile_ns(0.0), p.harvest.max_ns()), (200, 400));
    }

    #[test]
    fn histograms_merge_and_clamp() {
        let mut a = LatencyHistogram::default();
        let mut b = LatencyHistogram::default();
        assert_eq!((a.quantile_ns(0.99), a.max_ns(), a.count()), (0, 0, 0), "empty");
        a.record(0);
        b.record(1_000);
        b.record(u64::MAX);
        a.add(&b);
        assert_eq!(a.count(), 3);
        assert_eq!(a.quantile_ns(0.0), 1, "0 ns is recorded as the lowest value");
        assert!(a.max_ns() >= 100_000_000_000 - 100_000_000, "clamped to the top of the range");
    }

    #[test]
    fn the_floor_is_a_positive_time_per_page() {
        let f = cmpxchg_floor(4096);
        assert!(f.is_finite() && f > 0.0, "{f}");
    }
}

//! `migrate-perf`: dirty logging measured the way KVM's
//! `dirty_log_perf_test` reports it, plus the seed's two claims.
//!
//! Procedure ([`migrate_perf`]), on any backend's [`PassVm`] (the engine's is
//! [`EnginePassVm`](shadow_mmu_engine::EnginePassVm)), in `dirty_log_perf_test`'s rhythm:
//! 1. vCPU threads start; once released, each sweeps its slice of guest
//!    memory once, one 8-byte store per page (or the chosen mix of loads and
//!    stores), then waits for the host to release its next pass. The first
//!    pass of every vCPU is the *populate* time.
//! 2. Dirty logging is enabled (timed), and the harvester copies all of
//!    memory (the bulk copy of a migration).
//! 3. Iteration `i`: the vCPUs' pass `i` (every page write-protected by the
//!    last harvest, so every store faults) is the *dirty memory* time. Then
//!    the host releases pass `i + 1` and times `get_dirty_log` (and, with
//!    manual protect, `clear_dirty_log`) while the vCPUs are write-faulting
//!    again, and lets the oracle check the harvest (where the stores carry
//!    tags) and copy the dirty pages.
//! 4. The vCPUs finish their pass and make one more while nobody harvests;
//!    then, with every vCPU parked, one harvest of the freshly dirtied guest
//!    is timed alone; three times, each after a full pass, and `quiet` is
//!    the median.
//! 5. The vCPUs stop; the oracle's exact final check counts lost pages.
//!
//! The no-regression claim is measured separately ([`fault_heavy`]): a
//! fault-heavy workload with dirty logging off, whose shadow page budget is
//! too small to hold the map, so every pass faults on every page again.
//!
//! Every vCPU carries a [`LatencyProbe`](shadow_mmu_engine::passes::LatencyProbe): each write fault's latency, from
//! the exit of guest mode to the re-entry, goes into one HDR histogram if a
//! harvest ran at any time during the fault, into another if none did. The
//! host brackets each `get_dirty_log` with two increments of a harvest
//! sequence number (odd: a harvest runs), which the probe reads at both ends
//! of the fault. [`cmpxchg_floor`] gives the cost a harvest cannot go below:
//! one compare-exchange per dirty page over a plain array.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use shadow_mmu_core::dirty_bitmap::bitmap_words;
use shadow_mmu_core::spte::{PAGE_SIZE, WORDS_PER_PAGE};
use shadow_mmu_engine::backend::vm_with_memory;
use shadow_mmu_engine::mmu::MmuDesign;
use shadow_mmu_engine::passes::Sweepers;
use shadow_mmu_engine::vm::VmConfig;
use shadow_mmu_engine::workload::WorkloadSpec;
use shadow_mmu_vmm::{BackendError, HarvestSpec, PassExtras, PassVm, timed_harvest};

use crate::harness::HarnessError;
use crate::oracle::Oracle;

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
    /// Time to disable it, at the end, with the vCPUs stopped.
    pub disable_dirty_logging_ns: u64,
    /// Each iteration.
    pub iterations: Vec<Iteration>,
    /// After the iterations: a harvest of a guest the vCPUs have just fully
    /// dirtied (with `write_pct` 100), with every vCPU parked; the median of
    /// [`QUIET_HARVESTS`] such harvests.
    pub quiet: Iteration,
    /// Each of those harvests' time, ns, in the order they ran.
    pub quiet_harvests_ns: Vec<u64>,
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

/// The floor of a harvest: one compare-exchange that clears the writable
/// bit per page, over a plain array of `pages` u64 (no rmap, no bitmap, no
/// shadow page), on one thread. Returns ns per page, the best of 3 runs.
pub fn cmpxchg_floor(pages: u64) -> f64 {
    cmpxchg_floor_on(pages, 1)
}

/// [`cmpxchg_floor`] with the array split over `threads` threads (each its
/// own contiguous part): the time per page of the whole. What a harvest on
/// that many threads could reach at best; against the one-thread floor it
/// shows how far this machine runs locked read-modify-writes in parallel.
pub fn cmpxchg_floor_on(pages: u64, threads: u32) -> f64 {
    use shadow_mmu_core::spte::PT_WRITABLE_MASK;
    let pages = pages.max(1);
    let array: Vec<AtomicU64> = (0..pages).map(|i| AtomicU64::new((i << 12) | 0x7)).collect();
    let sweep = |part: &[AtomicU64]| {
        for a in part {
            // Relaxed loads and a relaxed compare-exchange: the floor measures
            // the locked read-modify-write itself (on x86 every ordering
            // compiles to the same `lock cmpxchg`), as
            // `spte_write_protect_lockless` does once per writable spte.
            let old = a.load(Ordering::Relaxed);
            let _ = a.compare_exchange(old, old & !PT_WRITABLE_MASK, Ordering::Relaxed, Ordering::Relaxed);
        }
    };
    let parts: Vec<&[AtomicU64]> = {
        let n = threads.max(1) as usize;
        let len = array.len().div_ceil(n);
        array.chunks(len.max(1)).collect()
    };
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        for a in &array {
            // Relaxed: setup, before the threads start.
            a.fetch_or(PT_WRITABLE_MASK, Ordering::Relaxed);
        }
        // Every thread starts its part at a barrier and times it from there:
        // the spawn (tens of microseconds, as long as a whole part of a
        // small array) is not the floor's.
        let start = std::sync::Barrier::new(parts.len());
        let timed = |part: &[AtomicU64]| {
            start.wait();
            let t = Instant::now();
            sweep(part);
            t.elapsed()
        };
        let ns = std::thread::scope(|s| {
            let hs: Vec<_> = parts[1..].iter().map(|&p| s.spawn(move || timed(p))).collect();
            let mine = timed(parts[0]);
            hs.into_iter().map(|h| h.join().expect("a floor thread panicked")).fold(mine, Duration::max)
        });
        best = best.min(ns.as_nanos() as f64 / pages as f64);
    }
    std::hint::black_box(&array);
    best
}

/// Quiet harvests per run, each after a full pass of the vCPUs: the
/// reported one is their median.
pub const QUIET_HARVESTS: u64 = 3;

/// How long before the stop-and-copy harvest its helper threads are woken:
/// the last pass of the vCPUs, at most this long.
pub const STOP_AND_COPY_NOTICE: Duration = Duration::from_millis(250);

/// The oracle of a `migrate-perf` run, over the pages the vCPUs store to
/// (all of them, or a working set at the start of a larger guest, with the
/// lock faults' reserve after it, which no store ever leaves): a page
/// outside them reported dirty is an error, not a copy.
struct RunCheck {
    oracle: Oracle,
    stored: u64,
    stored_words: usize,
    stored_mem: usize,
    /// The dirty log's buffer, the whole guest's.
    bitmap: Vec<u64>,
}

impl RunCheck {
    fn new(vm: &dyn PassVm) -> Self {
        let stored = vm.stored_pages();
        Self {
            oracle: Oracle::new(0, stored),
            stored,
            stored_words: bitmap_words(stored),
            stored_mem: stored as usize * WORDS_PER_PAGE,
            bitmap: vec![0u64; bitmap_words(vm.pages())],
        }
    }

    /// No page outside those the vCPUs store to was reported.
    fn outside(&self, vm: &dyn PassVm) -> Result<(), BackendError> {
        match self.bitmap[self.stored_words..].iter().position(|&w| w != 0) {
            Some(w) => Err(BackendError::new(
                &vm.name(),
                "harvest",
                HarnessError::BadConfig(format!(
                    "pages from {} reported dirty, outside the {} pages the vCPUs store to",
                    (self.stored_words + w) * 64,
                    self.stored
                )),
            )),
            None => Ok(()),
        }
    }

    /// The oracle's check of the harvest just made; returns the lost pages.
    /// The first pass runs with logging off and INITIALLY_SET reports every
    /// page at first: only the pages stored to are checked.
    fn collect(&mut self, vm: &dyn PassVm, cut: Option<u64>) -> u64 {
        let (mem, bits) = (&vm.memory()[..self.stored_mem], &self.bitmap[..self.stored_words]);
        match cut {
            Some(cut) => self.oracle.collect(mem, bits, cut).lost_pages,
            None => self.oracle.copy_dirty(mem, bits).lost_pages,
        }
    }

    /// A harvest ([`harvest`]), then both checks; returns the iteration.
    fn harvest(
        &mut self,
        vm: &mut dyn PassVm,
        spec: &HarvestSpec,
        cut: Option<u64>,
        dirty_memory_ns: u64,
        probed: bool,
        run: &mut PerfRun,
    ) -> Result<Iteration, BackendError> {
        let it = harvest(vm, spec, &mut self.bitmap, dirty_memory_ns, probed)?;
        self.outside(vm)?;
        run.lost_pages += self.collect(vm, cut);
        Ok(it)
    }
}

/// Runs `migrate-perf` on `vm`, whichever its backend (module docs);
/// `on_iteration` sees each iteration as it completes. Lost pages are
/// counted by the oracle: at every harvest where the backend's stores carry
/// iteration tags ([`PassWorkload::cut`](shadow_mmu_vmm::PassWorkload::cut)), and exactly at the end, with the vCPUs
/// stopped, on every backend.
pub fn migrate_perf(
    vm: &mut dyn PassVm,
    iterations: u32,
    spec: &HarvestSpec,
    mut on_iteration: impl FnMut(u32, &Iteration),
) -> Result<(PerfRun, PassExtras), BackendError> {
    let mut run = PerfRun::default();
    let t0 = Instant::now();
    vm.release(1);
    vm.wait_passes(0)?;
    run.populate_ns = t0.elapsed().as_nanos() as u64;

    let mut check = RunCheck::new(vm);
    vm.cut();
    let t = Instant::now();
    vm.set_dirty_logging(true)?;
    run.enable_dirty_logging_ns = t.elapsed().as_nanos() as u64;
    check.oracle.full_copy(&vm.memory()[..check.stored_mem]);

    // Pass 2 dirties the memory for the first harvest.
    vm.release(2);
    for i in 0..iterations {
        let pass = 2 + u64::from(i);
        let dirty_memory_ns = vm.wait_passes(pass - 1)?;
        // The cut first, with every vCPU waiting for its release (so it
        // returns at once), then the release, then the harvest: the vCPUs
        // go on write-faulting during the harvest, and the harvester starts
        // as they wake, ahead of them, so each of their stores faults on a
        // page it has already protected. With the release first, the cut
        // waited for every vCPU's first store of the new pass: a vCPU could
        // start ahead of the harvester, and then stayed ahead without
        // faulting, sharing its cache lines and handing it the whole pass
        // (the README's outliers).
        let cut = vm.cut();
        vm.release(pass + 1);
        let it = harvest(vm, spec, &mut check.bitmap, dirty_memory_ns, true)?;
        if i > 0 || !spec.initially_set {
            check.outside(vm)?;
        }
        run.lost_pages += check.collect(vm, cut);
        on_iteration(i + 1, &it);
        run.iterations.push(it);
    }
    let extras = finish_run(vm, spec, iterations, &mut check, &mut run)?;
    Ok((run, extras))
}

/// The end of a `migrate-perf` run: the quiet harvest, the stop, the
/// oracle's exact check, and disabling logging.
fn finish_run(
    vm: &mut dyn PassVm,
    spec: &HarvestSpec,
    iterations: u32,
    check: &mut RunCheck,
    run: &mut PerfRun,
) -> Result<PassExtras, BackendError> {
    // The harvest alone: the vCPUs finish the pass they are in (harvested
    // untimed), then make one more full pass and park, and one harvesting
    // thread write-protects a fully dirtied guest with nothing running
    // beside it.
    let pass = 2 + u64::from(iterations);
    vm.wait_passes(pass - 1)?;
    let cut = vm.cut();
    check.harvest(vm, spec, cut, 0, false, run)?;
    // The last pass before the stop-and-copy harvest: a VMM that pauses its
    // vCPUs for the final harvest knows it is coming, and wakes the
    // harvest's helper threads as it starts (`Vm::prepare_harvest`). Made
    // `QUIET_HARVESTS` times: one harvest of a millisecond on a shared host
    // is one draw of its noise, and the figure is their median.
    let mut quiet = Vec::new();
    for k in 0..QUIET_HARVESTS {
        let pass = pass + k;
        vm.prepare_harvest(STOP_AND_COPY_NOTICE);
        vm.release(pass + 1);
        let dirty_memory_ns = vm.wait_passes(pass)?;
        let cut = vm.cut();
        quiet.push(check.harvest(vm, spec, cut, dirty_memory_ns, false, run)?);
    }
    run.quiet_harvests_ns = quiet.iter().map(Iteration::harvest_ns).collect();
    quiet.sort_by_key(Iteration::harvest_ns);
    run.quiet = quiet[quiet.len() / 2];

    let extras = vm.stop()?;
    // Nothing runs now: a last harvest, and the oracle's exact check.
    harvest(vm, spec, &mut check.bitmap, 0, false)?;
    check.outside(vm)?;
    let (mem, bits) = (&vm.memory()[..check.stored_mem], &check.bitmap[..check.stored_words]);
    run.lost_pages += check.oracle.finish(mem, bits).lost_pages;
    let t = Instant::now();
    vm.set_dirty_logging(false)?;
    run.disable_dirty_logging_ns = t.elapsed().as_nanos() as u64;
    Ok(extras)
}

/// [`timed_harvest`] as an iteration; `probed`: marked for the
/// fault-latency probes.
fn harvest(
    vm: &mut dyn PassVm,
    spec: &HarvestSpec,
    bitmap: &mut [u64],
    dirty_memory_ns: u64,
    probed: bool,
) -> Result<Iteration, BackendError> {
    if probed {
        vm.harvest_begin();
    }
    let r = timed_harvest(vm, spec, bitmap);
    if probed {
        vm.harvest_end();
    }
    let (dirty_pages, get_dirty_log_ns, clear_dirty_log_ns) = r?;
    Ok(Iteration { dirty_memory_ns, get_dirty_log_ns, clear_dirty_log_ns, dirty_pages })
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
    let (vm, _mem) = vm_with_memory(config, guest_bytes, true)?;
    let spec = WorkloadSpec { exit_each_pass: true, ..WorkloadSpec::default() };
    let mut sweepers = Sweepers::start(&vm, vcpus, guest_bytes / PAGE_SIZE, spec, u64::MAX, None)?;
    sweepers.wait_passes(&vec![0; vcpus as usize], &mut || {});
    let stats0 = vm.stats();
    // Faults are counted by the MMU (leaf sptes installed, one per fault
    // with 4 KiB mappings), passes by the sweepers.
    let start_passes = sweepers.passes();
    let t0 = Instant::now();
    std::thread::sleep(duration);
    let secs = t0.elapsed().as_secs_f64();
    let passes: u64 = sweepers.passes().iter().zip(&start_passes).map(|(a, b)| a - b).sum();
    let stats = vm.stats();
    sweepers.stop()?;
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
    fn the_floor_is_a_positive_time_per_page() {
        let f = cmpxchg_floor(1 << 12);
        assert!(f.is_finite() && f > 0.0, "{f}");
    }
}

//! `migrate-perf`: dirty logging measured the way KVM's
//! `dirty_log_perf_test` reports it, plus the seed's two claims.
//!
//! Procedure ([`migrate_perf`]), on any backend's [`PassVm`] (the engine's is
//! [`EnginePassVm`]), in `dirty_log_perf_test`'s rhythm:
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

use crate::backend::EngineVm;
use crate::dirty_bitmap::bitmap_words;
use crate::harness::HarnessError;
use crate::memory::HostMemory;
use crate::memory::WORDS_PER_PAGE;
use crate::memslot::{MemFlags, UserMemoryRegion};
use crate::mmu::MmuDesign;
use crate::oracle::Oracle;
use crate::spte::PAGE_SIZE;
use crate::vcpu::{FaultObserver, VcpuExit, VcpuStats};
use crate::vm::{Vm, VmConfig};
use crate::workload::{
    AccessPattern, GuestControl, HC_PASS_DONE, HC_STOP, WORKLOAD_STATE_WORDS, WorkloadGuest, WorkloadSpec,
};
use shadow_mmu_vmm::vcpu_gate::{IdleWait, decode_words, encode_words};
use shadow_mmu_vmm::{
    BackendError, HarvestProbe, HarvestSpec, LatencySummary, PassExtras, PassSpec, PassVm, PassWorkload,
    VcpuControl, VcpuGate, VcpuStateError, check_vcpu_states, timed_harvest,
};

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

    /// Its summary, as the `vmm` interface hands latencies on.
    pub fn summary(&self) -> LatencySummary {
        LatencySummary::from_fn(self.count(), self.max_ns(), |q| self.quantile_ns(q))
    }
}

/// The harvest sequence number: odd while the host harvests.
#[derive(Debug, Default)]
pub struct HarvestClock(CachePadded<AtomicU64>);

impl HarvestClock {
    /// Marks the start or the end of a harvest (the count goes odd, then
    /// even again), so that the probes see it.
    pub fn tick(&self) {
        // Relaxed: a classification for statistics, read by the probes with
        // relaxed loads. A fault that overlaps a harvest by less than the
        // time a store takes to reach the other core may be counted idle.
        self.0.fetch_add(1, Ordering::Relaxed);
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
    /// Where faults that overlapped a harvest are also recorded, for the
    /// host to take per harvest ([`crate::backend::PassVm::take_harvest_latency`]).
    shared: Option<Arc<parking_lot::Mutex<LatencyHistogram>>>,
    /// Write faults that overlapped a harvest.
    pub harvest: LatencyHistogram,
    /// Write faults with no harvest running.
    pub idle: LatencyHistogram,
}

impl LatencyProbe {
    /// A probe that reads `clock`.
    pub fn new(clock: Arc<HarvestClock>) -> Self {
        Self {
            clock,
            begin: 0,
            shared: None,
            harvest: LatencyHistogram::default(),
            idle: LatencyHistogram::default(),
        }
    }

    /// Also records each fault that overlapped a harvest into `shared`.
    pub fn sharing(mut self, shared: Arc<parking_lot::Mutex<LatencyHistogram>>) -> Self {
        self.shared = Some(shared);
        self
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
            if let Some(s) = &self.shared {
                // Only faults that met a harvest take this lock, and the host
                // takes it once per harvest.
                s.lock().record(ns);
            }
        } else {
            self.idle.record(ns);
        }
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
    use crate::spte::PT_WRITABLE_MASK;
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
        let t = Instant::now();
        if parts.len() == 1 {
            sweep(parts[0]);
        } else {
            std::thread::scope(|s| {
                let hs: Vec<_> = parts[1..].iter().map(|&p| s.spawn(move || sweep(p))).collect();
                sweep(parts[0]);
                hs.into_iter().for_each(|h| h.join().expect("a floor thread panicked"));
            });
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
    /// vCPUs waiting on a full dirty ring.
    ring_waiters: Arc<AtomicU64>,
    /// Their pause and state exchange.
    gate: Arc<VcpuGate>,
}

/// Words of a sweeper's saved state: the passes it completed, then its
/// guest's ([`WorkloadGuest::save`]).
const SWEEPER_STATE_WORDS: usize = 1 + WORKLOAD_STATE_WORDS;

/// A sweeper's state for the gate: passes completed and the guest's state.
fn save_sweeper(guest: &WorkloadGuest, done: u64) -> Vec<u8> {
    let mut w = vec![done];
    w.extend_from_slice(&guest.save());
    encode_words(&w)
}

/// Decodes a sweeper state of [`save_sweeper`]: passes completed, guest state.
fn decode_sweeper(state: &[u8]) -> Option<(u64, [u64; WORKLOAD_STATE_WORDS])> {
    let w = decode_words(state, SWEEPER_STATE_WORDS)?;
    Some((w[0], w[1..].try_into().ok()?))
}

/// Outside guest mode, before the next pass: takes a restored state, holds
/// while paused, and returns when pass `done + 1` is released or a stop is
/// requested.
fn await_release(
    id: u32,
    guest: &mut WorkloadGuest,
    done: &mut u64,
    clock: &PassClock,
    allowed: &AtomicU64,
    ctl: &GuestControl,
    gate: &VcpuGate,
) {
    let idle = IdleWait::new();
    loop {
        gate.apply_restore(id, |state| {
            // Checked by `PassVm::restore_vcpus` before it was given.
            let (passes, g) = decode_sweeper(state).expect("a checked sweeper state");
            guest.restore(&g).expect("a checked sweeper state");
            *done = passes;
            // Release: as the store after a pass.
            clock.passes.store(passes, Ordering::Release);
        });
        // A stop wins over a pause.
        if ctl.stop_requested() {
            return;
        }
        if gate.pause_requested() {
            gate.hold(id, || save_sweeper(guest, *done), || ctl.stop_requested());
            continue;
        }
        // Acquire: pairs with `release`.
        if allowed.load(Ordering::Acquire) > *done {
            return;
        }
        idle.wait();
    }
}

/// What a sweeper thread returns: its vCPU's counters and its probe.
type SweeperExit = Result<(VcpuStats, Option<Box<LatencyProbe>>), String>;

/// The latency probe a sweeper installed on `vcpu`, taken back.
fn take_probe(vcpu: &mut shadow_mmu_engine::Vcpu) -> Option<Box<LatencyProbe>> {
    vcpu.set_fault_observer(None).map(|o| {
        let o: Box<dyn std::any::Any> = o;
        o.downcast::<LatencyProbe>().expect("the probe we installed")
    })
}

/// What the sweepers leave when they stop.
#[derive(Debug, Default)]
struct SweepResult {
    stats: VcpuStats,
    harvest: LatencyHistogram,
    idle: LatencyHistogram,
}

impl Sweepers {
    /// Starts `vcpus` sweepers, allowed `allowed` passes before they wait
    /// (0: they wait before the first).
    fn start(
        vm: &Vm,
        vcpus: u32,
        npages: u64,
        spec: WorkloadSpec,
        allowed: u64,
        clock: Option<(Arc<HarvestClock>, Arc<parking_lot::Mutex<LatencyHistogram>>)>,
    ) -> Result<Self, HarnessError> {
        let ctl = GuestControl::new(vcpus);
        let passes: Arc<[CachePadded<PassClock>]> =
            (0..vcpus).map(|_| CachePadded::new(PassClock::default())).collect();
        let allowed = Arc::new(AtomicU64::new(allowed));
        let ring_waiters = Arc::new(AtomicU64::new(0));
        let kicker = vm.kicker();
        let gate = Arc::new(VcpuGate::new(vcpus, Box::new(move || kicker.kick())));
        let mut threads = Vec::new();
        for id in 0..vcpus {
            let mut vcpu = vm.create_vcpu(id)?;
            if let Some((c, shared)) = &clock {
                vcpu.set_fault_observer(Some(Box::new(LatencyProbe::new(c.clone()).sharing(shared.clone()))));
            }
            let mut guest = WorkloadGuest::new(spec, id, vcpus, 0, npages, ctl.clone());
            let (passes, ctl, allowed) = (passes.clone(), ctl.clone(), allowed.clone());
            let ring_waiters = ring_waiters.clone();
            let gate = gate.clone();
            threads.push(std::thread::spawn(move || {
                let clock = &passes[id as usize];
                let mut done = 0;
                // The first pass too waits for its release (or a stop, which
                // the guest then sees at its first access).
                await_release(id, &mut guest, &mut done, clock, &allowed, &ctl, &gate);
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
                            await_release(id, &mut guest, &mut done, clock, &allowed, &ctl, &gate);
                            pass_start = Instant::now();
                        }
                        Ok(VcpuExit::Intr) => {
                            // Kicked (a pause): the last access is complete.
                            guest.park_outside();
                            gate.hold(id, || save_sweeper(&guest, done), || ctl.stop_requested());
                        }
                        Ok(VcpuExit::DirtyRingFull) => {
                            // Out of the guest until the host reaps the rings
                            // (`wait_passes` does, seeing us wait).
                            guest.park_outside();
                            // Relaxed: a hint for the reaper; the ring's own
                            // orderings carry the data.
                            ring_waiters.fetch_add(1, Ordering::Relaxed);
                            while vcpu.dirty_ring_full() && !ctl.stop_requested() {
                                gate.hold(id, || save_sweeper(&guest, done), || ctl.stop_requested());
                                std::thread::sleep(Duration::from_micros(20));
                            }
                            ring_waiters.fetch_sub(1, Ordering::Relaxed);
                            // Stopped while full: a run would only exit again
                            // (the guest never gets to see the stop).
                            if vcpu.dirty_ring_full() && ctl.stop_requested() {
                                break Ok((vcpu.stats(), take_probe(&mut vcpu)));
                            }
                        }
                        Ok(VcpuExit::Hypercall(HC_STOP)) => break Ok((vcpu.stats(), take_probe(&mut vcpu))),
                        Ok(other) => break Err(format!("vCPU {id}: unexpected exit {other:?}")),
                        Err(e) => break Err(format!("vCPU {id}: {e}")),
                    }
                };
                ctl.park(id);
                r
            }));
        }
        Ok(Self { ctl, passes, allowed, threads, ring_waiters, gate })
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
    /// returns the longest of their last passes. While waiting, calls `reap`
    /// whenever a vCPU waits on a full dirty ring.
    fn wait_passes(&self, since: &[u64], reap: &mut dyn FnMut()) -> u64 {
        for (p, &s) in self.passes.iter().zip(since) {
            // Acquire: as in `passes`.
            while p.passes.load(Ordering::Acquire) <= s {
                // Relaxed: see the vCPU loop.
                if self.ring_waiters.load(Ordering::Relaxed) > 0 {
                    reap();
                }
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

/// A VM with one slot of `guest_bytes` at guest physical 0. With
/// `populate`, over pre-populated host memory: the first pass then measures
/// shadow page faults, not the host kernel's first-touch faults (which would
/// also make whichever design runs first look slower).
pub(crate) fn vm_with_memory(
    config: VmConfig,
    guest_bytes: u64,
    populate: bool,
) -> Result<(Vm, Arc<HostMemory>), HarnessError> {
    let vm = Vm::new(config)?;
    let mem = if populate {
        HostMemory::anonymous_populated(guest_bytes)?
    } else {
        HostMemory::anonymous(guest_bytes)?
    };
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

/// The engine's [`PassVm`]: a VM with one slot over populated host memory
/// (so the first pass measures shadow page faults, not the host kernel's
/// first-touch faults), and sweeper threads with latency probes.
pub type EnginePassVm = EngineVm<EnginePasses>;

/// What runs in an [`EnginePassVm`].
pub struct EnginePasses {
    fast_page_fault: bool,
    sweepers: Sweepers,
    clock: Arc<HarvestClock>,
    /// Faults that met a harvest since the host last took them.
    harvest_latency: Arc<parking_lot::Mutex<LatencyHistogram>>,
    vcpus: u32,
    /// Pages the sweepers sweep.
    swept: u64,
    /// What their guests run.
    workload: WorkloadSpec,
}

impl EnginePassVm {
    /// A VM built from `config` (with the dirty ring of `dirty_ring` entries,
    /// if given), with `spec`'s sweepers started and none released.
    pub fn start(
        name: String,
        config: VmConfig,
        dirty_ring: Option<u32>,
        spec: &PassSpec,
    ) -> Result<Self, HarnessError> {
        if spec.vcpus == 0 || spec.guest_bytes / PAGE_SIZE < u64::from(spec.vcpus) || spec.write_pct > 100 {
            return Err(HarnessError::BadConfig(format!("{spec:?}")));
        }
        let fast_page_fault = config.fast_page_fault;
        let npages = spec.guest_bytes / PAGE_SIZE;
        let swept = match spec.dirty_pages {
            Some(n) if n == 0 || !n.is_multiple_of(64) || n > npages || n < u64::from(spec.vcpus) => {
                return Err(HarnessError::BadConfig(format!(
                    "--dirty-pages {n}: a positive multiple of 64, at least one per vCPU, at most the guest's {npages}"
                )));
            }
            Some(n) => n,
            None => npages,
        };
        // A working set is swept in a lazily mapped guest (`MAP_NORESERVE`):
        // populating it all would defeat the point of a large guest.
        let (vm, mem) = vm_with_memory(config, spec.guest_bytes, spec.dirty_pages.is_none())?;
        if let Some(n) = dirty_ring {
            vm.enable_dirty_ring(n * 16)?;
        }
        let workload = WorkloadSpec {
            pattern: if spec.random { AccessPattern::Random } else { AccessPattern::Seq },
            write_pct: spec.write_pct,
            exit_each_pass: true,
            seed: spec.seed,
            ..WorkloadSpec::default()
        };
        let clock = Arc::new(HarvestClock::default());
        let harvest_latency = Arc::new(parking_lot::Mutex::new(LatencyHistogram::default()));
        let probes = Some((clock.clone(), harvest_latency.clone()));
        let sweepers = Sweepers::start(&vm, spec.vcpus, swept, workload, 0, probes)?;
        let work = EnginePasses {
            fast_page_fault,
            sweepers,
            clock,
            harvest_latency,
            vcpus: spec.vcpus,
            swept,
            workload,
        };
        Ok(EngineVm { name, vm, mem, work, ring: shadow_mmu_vmm::RingState::default() })
    }
}

impl PassWorkload for EnginePassVm {
    fn release(&self, n: u64) {
        self.work.sweepers.release(n);
    }

    fn wait_passes(&self, since: u64) -> Result<u64, BackendError> {
        // A vCPU whose ring is full waits for us: reap as a VMM's reaper
        // thread does, keeping the pages for the next harvest.
        let mut failed = None;
        let mut reap = || {
            if let Err(e) = crate::backend::collect_engine_rings(&self.vm, &mut self.ring.collected.lock()) {
                failed = Some(e);
            }
        };
        let ns = self.work.sweepers.wait_passes(&vec![since; self.work.vcpus as usize], &mut reap);
        match failed {
            Some(e) => Err(self.fail("reaping the dirty rings", e)),
            None => Ok(ns),
        }
    }

    fn cut(&self) -> Option<u64> {
        Some(self.work.sweepers.ctl.cut())
    }

    fn passes_done(&self) -> u64 {
        self.work.sweepers.passes().into_iter().min().unwrap_or(0)
    }

    fn iteration_floor(&self) -> u64 {
        // Every store is tagged with the iteration current at the store.
        self.work.sweepers.ctl.iteration()
    }

    fn swept_pages(&self) -> u64 {
        self.work.swept
    }

    fn stored_iteration(&self, word: u64) -> u64 {
        crate::workload::value_tag(word)
    }
}

/// How long a vCPU thread has to take its restored state.
const RESTORE_WITHIN: Duration = Duration::from_secs(5);

impl VcpuControl for EnginePassVm {
    fn vcpu_gate(&self) -> Arc<VcpuGate> {
        self.work.sweepers.gate.clone()
    }

    fn restore_vcpus(&self, states: Vec<Vec<u8>>) -> Result<(), BackendError> {
        check_vcpu_states(&states, self.work.vcpus, &self.name, |s| {
            let (_, g) = decode_sweeper(s).ok_or("not a sweeper state")?;
            // The guest's own check, on a guest of the same slice.
            let spec = self.work.workload;
            let ctl = GuestControl::new(self.work.vcpus);
            let mut probe = WorkloadGuest::new(spec, 0, self.work.vcpus, 0, self.work.swept, ctl);
            probe.restore(&g).ok_or("its position is outside the vCPU's slice")?;
            Ok(())
        })?;
        self.work.sweepers.gate.restore(states);
        if !self.work.sweepers.gate.wait_restored(RESTORE_WITHIN) {
            let why = VcpuStateError::NotTaken(RESTORE_WITHIN);
            return Err(BackendError::new(&self.name, "restoring the vCPUs", why));
        }
        Ok(())
    }

    fn stop(&mut self) -> Result<PassExtras, BackendError> {
        let swept = self
            .work
            .sweepers
            .stop()
            .map_err(|e| self.fail("stopping the vCPUs", HarnessError::BadConfig(e)))?;
        let s = self.vm.stats();
        let lines = vec![
            format!(
                "vCPU write faults: {} ({} fixed by fast_page_fault{}), mmu_lock held {:.1} ms",
                swept.stats.write_faults,
                s.mmu.fast_page_faults,
                if self.work.fast_page_fault { "" } else { ", which is off" },
                s.mmu_lock_hold_ns as f64 / 1e6
            ),
            format!(
                "Pool backlog waits under mmu_lock: {} (longest {:.1} us)",
                s.pool_backlog_waits,
                s.pool_backlog_wait_max_ns as f64 / 1e3
            ),
        ];
        Ok(PassExtras {
            latency: Some((swept.harvest.summary(), swept.idle.summary())),
            figures: vec![
                ("vcpu_write_faults", swept.stats.write_faults),
                ("fast_page_faults", s.mmu.fast_page_faults),
                ("mmu_lock_hold_ns", s.mmu_lock_hold_ns),
                ("pool_backlog_waits", s.pool_backlog_waits),
                ("pool_backlog_wait_max_ns", s.pool_backlog_wait_max_ns),
                ("harvest_read_sections", s.mmu.harvest_read_sections),
                ("remote_tlb_flushes", s.mmu.remote_tlb_flushes),
                ("ring_full_exits", swept.stats.dirty_ring_full_exits),
                ("ring_entries_harvested", s.mmu.ring_entries_harvested),
                ("clear_dirty_log_calls", s.mmu.clear_dirty_log_calls),
                ("mmu_lock_max_hold_ns", s.mmu_lock_max_hold_ns),
                ("harvest_mmu_lock_hold_ns", s.mmu.harvest_mmu_lock_hold_ns),
                ("harvest_mmu_lock_max_hold_ns", s.mmu.harvest_mmu_lock_max_hold_ns),
                ("harvest_thread_start_max_ns", s.mmu.harvest_thread_start_max_ns),
            ],
            lines,
        })
    }
}

impl HarvestProbe for EnginePassVm {
    fn prepare_harvest(&self, within: Duration) {
        self.vm.prepare_harvest(within);
    }

    fn harvest_begin(&self) {
        self.work.clock.tick();
    }

    fn harvest_end(&self) {
        self.work.clock.tick();
    }

    fn take_harvest_latency(&self) -> Option<LatencySummary> {
        Some(std::mem::take(&mut *self.work.harvest_latency.lock()).summary())
    }
}

/// How long before the stop-and-copy harvest its helper threads are woken:
/// the last pass of the vCPUs, at most this long.
pub const STOP_AND_COPY_NOTICE: Duration = Duration::from_millis(250);

/// Runs `migrate-perf` on `vm`, whichever its backend (module docs);
/// `on_iteration` sees each iteration as it completes. Lost pages are
/// counted by the oracle: at every harvest where the backend's stores carry
/// iteration tags ([`PassVm::cut`]), and exactly at the end, with the vCPUs
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

    let pages = vm.pages();
    // The oracle covers the pages the vCPUs sweep (all of them, or a working
    // set at the start of a larger guest, which no store ever leaves): a
    // page outside it reported dirty is an error, not a copy.
    let swept = vm.swept_pages();
    let (swept_words, swept_mem) = (bitmap_words(swept), swept as usize * WORDS_PER_PAGE);
    let mut oracle = Oracle::new(0, swept);
    let mut bitmap = vec![0u64; bitmap_words(pages)];
    vm.cut();
    let t = Instant::now();
    vm.set_dirty_logging(true)?;
    run.enable_dirty_logging_ns = t.elapsed().as_nanos() as u64;
    oracle.full_copy(&vm.memory()[..swept_mem]);
    let outside = |vm: &dyn PassVm, bitmap: &[u64]| match bitmap[swept_words..].iter().position(|&w| w != 0) {
        Some(w) => Err(BackendError::new(
            &vm.name(),
            "harvest",
            HarnessError::BadConfig(format!(
                "pages from {} reported dirty, outside the {swept} swept pages",
                (swept_words + w) * 64
            )),
        )),
        None => Ok(()),
    };
    let collect = |oracle: &mut Oracle, vm: &dyn PassVm, bitmap: &[u64], cut: Option<u64>| {
        // The first pass runs with logging off and INITIALLY_SET reports every
        // page at first: only checked pages are the swept ones.
        let (mem, bits) = (&vm.memory()[..swept_mem], &bitmap[..swept_words]);
        match cut {
            Some(cut) => oracle.collect(mem, bits, cut).lost_pages,
            None => oracle.copy_dirty(mem, bits).lost_pages,
        }
    };

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
        let it = harvest(vm, spec, &mut bitmap, dirty_memory_ns, true)?;
        if i > 0 || !spec.initially_set {
            outside(vm, &bitmap)?;
        }
        run.lost_pages += collect(&mut oracle, vm, &bitmap, cut);
        on_iteration(i + 1, &it);
        run.iterations.push(it);
    }
    // The harvest alone: the vCPUs finish the pass they are in (harvested
    // untimed), then make one more full pass and park, and one harvesting
    // thread write-protects a fully dirtied guest with nothing running
    // beside it.
    let pass = 2 + u64::from(iterations);
    vm.wait_passes(pass - 1)?;
    let cut = vm.cut();
    harvest(vm, spec, &mut bitmap, 0, false)?;
    outside(vm, &bitmap)?;
    run.lost_pages += collect(&mut oracle, vm, &bitmap, cut);
    // The last pass before the stop-and-copy harvest: a VMM that pauses its
    // vCPUs for the final harvest knows it is coming, and wakes the
    // harvest's helper threads as it starts (`Vm::prepare_harvest`).
    vm.prepare_harvest(STOP_AND_COPY_NOTICE);
    vm.release(pass + 1);
    let dirty_memory_ns = vm.wait_passes(pass)?;
    let cut = vm.cut();
    run.quiet = harvest(vm, spec, &mut bitmap, dirty_memory_ns, false)?;
    outside(vm, &bitmap)?;
    run.lost_pages += collect(&mut oracle, vm, &bitmap, cut);

    let extras = vm.stop()?;
    // Nothing runs now: a last harvest, and the oracle's exact check.
    harvest(vm, spec, &mut bitmap, 0, false)?;
    outside(vm, &bitmap)?;
    run.lost_pages += oracle.finish(&vm.memory()[..swept_mem], &bitmap[..swept_words]).lost_pages;
    Ok((run, extras))
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
        clock.tick();
        p.fault_begin();
        p.fault_end(true, 200);
        clock.tick();
        // Begins before a harvest that ends before the fault does.
        p.fault_begin();
        clock.tick();
        clock.tick();
        p.fault_end(true, 300);
        // Begins inside a harvest, ends after it.
        clock.tick();
        p.fault_begin();
        clock.tick();
        p.fault_end(true, 400);
        // Read faults are not write faults: not recorded.
        clock.tick();
        p.fault_begin();
        p.fault_end(false, 500);
        clock.tick();
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

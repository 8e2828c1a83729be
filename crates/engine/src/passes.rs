//! The engine's pass VM: `dirty_log_perf_test`'s vCPU threads (the
//! sweepers), each sweeping its slice of guest memory pass by pass as far as
//! the host releases it, pausing through the VM's [`VcpuGate`], saving and
//! restoring its guest's state; and their write-fault latency probes. As a
//! `vmm` [`PassVm`](shadow_mmu_vmm::PassVm) ([`EnginePassVm`]), it is what migrate-perf, the oracle's
//! pass runs and live migration drive on the engine.
//!
//! Every vCPU carries a [`LatencyProbe`]: each write fault's latency, from
//! the exit of guest mode to the re-entry, goes into one HDR histogram if a
//! harvest ran at any time during the fault, into another if none did. The
//! host brackets each harvest with two ticks of a [`HarvestClock`] (odd: a
//! harvest runs), which the probe reads at both ends of the fault.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_utils::CachePadded;
use hdrhistogram::Histogram;
use shadow_mmu_vmm::vcpu_gate::{IdleWait, decode_words, encode_words};
use shadow_mmu_vmm::{
    BackendError, HarvestProbe, LatencySummary, PassExtras, PassSpec, PassWorkload, RingEntries, VcpuControl,
    VcpuGate, VcpuStateError, check_vcpu_states,
};
use thiserror::Error;

use crate::backend::{EngineVm, EngineWork, collect_engine_rings, vm_with_memory};
use crate::notifier_thread::{Invalidations, MmuNotifierThread, NotifierError};
use crate::vcpu::{FaultObserver, VcpuExit, VcpuStats};
use crate::vm::{Vm, VmConfig};
use crate::workload::{
    AccessPattern, GuestControl, HC_PASS_DONE, HC_STOP, ReserveCounts, WORKLOAD_STATE_WORDS, WorkloadGuest,
    WorkloadSpec,
};
use crate::{DirtyRingError, MemoryError, MemslotError, VcpuError, VmError};
use shadow_mmu_core::spte::PAGE_SIZE;

/// Why the passes could not start, or ended badly.
#[derive(Debug, Error)]
pub enum PassesError {
    /// The spec cannot run: no vCPU, fewer pages than vCPUs, or a share of
    /// stores above 100%.
    #[error("passes of {vcpus} vCPUs over {pages} pages with {write_pct}% stores cannot run")]
    BadSpec {
        /// vCPUs asked for.
        vcpus: u32,
        /// Pages of the guest.
        pages: u64,
        /// Stores, percent.
        write_pct: u8,
    },
    /// A working set that is not a positive multiple of 64 pages, at least
    /// one per vCPU, at most the guest's.
    #[error(
        "--dirty-pages {pages}: a positive multiple of 64, at least one per vCPU, at most the guest's {guest_pages}"
    )]
    BadWorkingSet {
        /// The working set asked for.
        pages: u64,
        /// Pages of the guest.
        guest_pages: u64,
    },
    /// Lock faults that need a reserve (`LockFaults`) in a guest without
    /// room for it after the swept pages.
    #[error(
        "fresh or split faults need a reserve as large as the {swept} swept pages after them; the guest has \
         {guest_pages} (sweep at most half of it)"
    )]
    NoReserve {
        /// The pages swept.
        swept: u64,
        /// Pages of the guest.
        guest_pages: u64,
    },
    /// The mmu notifier thread failed.
    #[error(transparent)]
    Notifier(#[from] NotifierError),
    /// The VM refused.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Host memory could not be mapped.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The memslot was refused.
    #[error(transparent)]
    Memslot(#[from] MemslotError),
    /// The dirty ring was refused.
    #[error(transparent)]
    DirtyRing(#[from] DirtyRingError),
    /// A vCPU could not be created or run.
    #[error("vCPU {vcpu}")]
    Vcpu {
        /// The vCPU.
        vcpu: u32,
        /// Why.
        #[source]
        source: VcpuError,
    },
    /// A vCPU exited in a way the pass guest never asks for.
    #[error("vCPU {vcpu}: unexpected exit {exit:?}")]
    UnexpectedExit {
        /// The vCPU.
        vcpu: u32,
        /// Its exit.
        exit: VcpuExit,
    },
    /// A vCPU thread panicked.
    #[error("a vCPU thread panicked")]
    Panicked,
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
    /// host to take per harvest ([`HarvestProbe::take_harvest_latency`]).
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

/// A vCPU's pass count and the duration of its last pass.
#[derive(Default)]
struct PassClock {
    passes: AtomicU64,
    last_pass_ns: AtomicU64,
}

/// vCPU threads that sweep their memory pass by pass, as far as the host
/// releases them (`allowed`), counting and timing their passes.
pub struct Sweepers {
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

/// What a sweeper thread returns: its vCPU's counters, its guest's reserve
/// touches and its probe.
type SweeperExit = Result<(VcpuStats, ReserveCounts, Option<Box<LatencyProbe>>), PassesError>;

/// The latency probe a sweeper installed on `vcpu`, taken back.
fn take_probe(vcpu: &mut crate::vcpu::Vcpu) -> Option<Box<LatencyProbe>> {
    vcpu.set_fault_observer(None).map(|o| {
        let o: Box<dyn std::any::Any> = o;
        o.downcast::<LatencyProbe>().expect("the probe we installed")
    })
}

/// What the sweepers leave when they stop.
#[derive(Debug, Default)]
pub struct SweepResult {
    /// Their vCPUs' counters, summed.
    pub stats: VcpuStats,
    /// Write faults that overlapped a harvest.
    pub harvest: LatencyHistogram,
    /// Write faults with no harvest running.
    pub idle: LatencyHistogram,
    /// Their guests' reserve touches (`LockFaults`), summed.
    pub reserve: ReserveCounts,
}

impl Sweepers {
    /// Starts `vcpus` sweepers over the first `npages` pages of `vm`'s slot
    /// 0, allowed `allowed` passes before they wait (0: they wait before the
    /// first), with latency probes on `clock` (and the harvest's faults
    /// shared) if given.
    pub fn start(
        vm: &Vm,
        vcpus: u32,
        npages: u64,
        spec: WorkloadSpec,
        allowed: u64,
        clock: Option<(Arc<HarvestClock>, Arc<parking_lot::Mutex<LatencyHistogram>>)>,
    ) -> Result<Self, PassesError> {
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
                                break Ok((vcpu.stats(), guest.reserve_touches(), take_probe(&mut vcpu)));
                            }
                        }
                        Ok(VcpuExit::Hypercall(HC_STOP)) => {
                            break Ok((vcpu.stats(), guest.reserve_touches(), take_probe(&mut vcpu)));
                        }
                        Ok(exit) => break Err(PassesError::UnexpectedExit { vcpu: id, exit }),
                        Err(source) => break Err(PassesError::Vcpu { vcpu: id, source }),
                    }
                };
                ctl.park(id);
                r
            }));
        }
        Ok(Self { ctl, passes, allowed, threads, ring_waiters, gate })
    }

    /// Lets every vCPU go on up to pass `n`.
    pub fn release(&self, n: u64) {
        // Release: pairs with the vCPUs' acquire load.
        self.allowed.store(n, Ordering::Release);
    }

    /// Passes each vCPU has completed.
    pub fn passes(&self) -> Vec<u64> {
        // Acquire: pairs with the vCPU's release increment.
        self.passes.iter().map(|p| p.passes.load(Ordering::Acquire)).collect()
    }

    /// Waits until every vCPU has completed more passes than `since`;
    /// returns the longest of their last passes. While waiting, calls `reap`
    /// whenever a vCPU waits on a full dirty ring.
    pub fn wait_passes(&self, since: &[u64], reap: &mut dyn FnMut()) -> u64 {
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

    /// Stops every sweeper (each finishes the access it is in) and joins
    /// them: their counters and latencies.
    pub fn stop(&mut self) -> Result<SweepResult, PassesError> {
        self.ctl.request_stop();
        let mut r = SweepResult::default();
        for t in self.threads.drain(..) {
            let (stats, reserve, probe) = t.join().map_err(|_| PassesError::Panicked)??;
            r.stats += stats;
            r.reserve += reserve;
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
    /// Pages of the reserve after them (`LockFaults`), or 0.
    reserve: u64,
    /// What their guests run.
    workload: WorkloadSpec,
    /// The mmu notifier thread of the lock faults, while logging is on.
    notifier: Option<MmuNotifierThread>,
    /// Invalidations it made, over every logging period so far.
    invalidations: u64,
    /// Why it stopped, if it failed.
    notifier_error: Option<NotifierError>,
}

impl EnginePasses {
    /// Stops the mmu notifier thread, if it runs, and counts its work.
    fn stop_notifier(&mut self) {
        match self.notifier.take().map(MmuNotifierThread::stop) {
            Some(Ok(n)) => self.invalidations += n,
            Some(Err(e)) => self.notifier_error = Some(e),
            None => {}
        }
    }
}

impl EngineWork for EnginePasses {
    fn logging_changed(&mut self, vm: &Vm, on: bool) {
        self.sweepers.ctl.set_lock_faults(on);
        self.stop_notifier();
        if on {
            let lock = &self.workload.lock_faults;
            self.notifier = Invalidations::of_lock_faults(lock, self.vcpus, self.swept, self.workload.seed)
                .map(|what| MmuNotifierThread::start(vm, what));
        }
    }
}

impl EnginePassVm {
    /// A VM built from `config` (with the dirty ring of `dirty_ring` entries,
    /// if given), with `spec`'s sweepers started and none released.
    pub fn start(
        name: String,
        config: VmConfig,
        dirty_ring: Option<RingEntries>,
        spec: &PassSpec,
    ) -> Result<Self, PassesError> {
        let npages = spec.guest_bytes / PAGE_SIZE;
        if spec.vcpus == 0 || npages < u64::from(spec.vcpus) || spec.write_pct > 100 {
            return Err(PassesError::BadSpec { vcpus: spec.vcpus, pages: npages, write_pct: spec.write_pct });
        }
        let fast_page_fault = config.fast_page_fault;
        let reserve_needed = spec.lock_faults.needs_reserve();
        let swept = match spec.dirty_pages {
            Some(n) if n == 0 || !n.is_multiple_of(64) || n > npages || n < u64::from(spec.vcpus) => {
                return Err(PassesError::BadWorkingSet { pages: n, guest_pages: npages });
            }
            Some(n) => n,
            None if reserve_needed => npages / 2,
            None => npages,
        };
        let reserve = if reserve_needed { swept } else { 0 };
        if swept + reserve > npages || swept < u64::from(spec.vcpus) {
            return Err(PassesError::NoReserve { swept, guest_pages: npages });
        }
        // A working set is swept in a lazily mapped guest (`MAP_NORESERVE`):
        // populating it all would defeat the point of a large guest.
        let (vm, mem) = vm_with_memory(config, spec.guest_bytes, spec.dirty_pages.is_none())?;
        if let Some(n) = dirty_ring {
            vm.enable_dirty_ring(n.bytes())?;
        }
        let workload = WorkloadSpec {
            pattern: if spec.random { AccessPattern::Random } else { AccessPattern::Seq },
            write_pct: spec.write_pct,
            exit_each_pass: true,
            seed: spec.seed,
            lock_faults: spec.lock_faults,
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
            reserve,
            workload,
            notifier: None,
            invalidations: 0,
            notifier_error: None,
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
            if let Err(e) = collect_engine_rings(&self.vm, &mut self.ring.collected.lock()) {
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

    fn stored_pages(&self) -> u64 {
        self.work.swept + self.work.reserve
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
        self.work.stop_notifier();
        if let Some(e) = self.work.notifier_error.take() {
            return Err(self.fail("invalidating guest memory", e));
        }
        let swept = self.work.sweepers.stop().map_err(|e| self.fail("stopping the vCPUs", e))?;
        let s = self.vm.stats();
        let mut lines = vec![
            format!(
                "vCPU write faults: {} ({} fixed by fast_page_fault{}), mmu_lock held {:.1} ms for write, \
                 {:.1} ms for read (summed over readers)",
                swept.stats.write_faults,
                s.mmu.fast_page_faults,
                if self.work.fast_page_fault { "" } else { ", which is off" },
                s.mmu_lock_hold_ns as f64 / 1e6,
                s.mmu_lock_read_hold_ns as f64 / 1e6
            ),
            format!(
                "mmu_lock taken by slow faults: {} for read, {} for write; by harvests: {} for read, {} for \
                 write; vCPUs and harvesters waited {:.1} ms for read, {:.1} ms for write",
                s.mmu.fault_mmu_lock_reads,
                s.mmu.fault_mmu_lock_writes,
                s.mmu.harvest_mmu_lock_reads,
                s.mmu.harvest_mmu_lock_writes,
                s.mmu_lock_read_wait_ns as f64 / 1e6,
                s.mmu_lock_wait_ns as f64 / 1e6
            ),
            format!(
                "Pool backlog waits under mmu_lock: {} (longest {:.1} us)",
                s.pool_backlog_waits,
                s.pool_backlog_wait_max_ns as f64 / 1e3
            ),
        ];
        let lock = self.work.workload.lock_faults;
        if lock.any() {
            let r = swept.reserve;
            let note =
                |spent: bool| if spent { " (a vCPU touched all of its part: fewer than asked)" } else { "" };
            lines.push(format!(
                "Lock faults ({}): {} fresh touches{}, {} split touches{}, {} mmu notifier invalidations",
                lock.label(),
                r.fresh,
                note(r.fresh_exhausted),
                r.split,
                note(r.split_exhausted),
                self.work.invalidations
            ));
        }
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
                ("harvest_mmu_lock_reads", s.mmu.harvest_mmu_lock_reads),
                ("harvest_mmu_lock_writes", s.mmu.harvest_mmu_lock_writes),
                ("fault_mmu_lock_reads", s.mmu.fault_mmu_lock_reads),
                ("fault_mmu_lock_writes", s.mmu.fault_mmu_lock_writes),
                ("mmu_lock_write_acquisitions", s.mmu_lock_acquisitions),
                ("mmu_lock_write_wait_ns", s.mmu_lock_wait_ns),
                ("mmu_lock_read_acquisitions", s.mmu_lock_read_acquisitions),
                ("mmu_lock_read_wait_ns", s.mmu_lock_read_wait_ns),
                ("mmu_lock_read_hold_ns", s.mmu_lock_read_hold_ns),
                ("mmu_lock_read_max_hold_ns", s.mmu_lock_read_max_hold_ns),
                ("tdp_huge_pages_split", s.mmu.tdp_huge_pages_split),
                ("tdp_eager_splits", s.mmu.tdp_eager_splits),
                ("fresh_touches", swept.reserve.fresh),
                ("split_touches", swept.reserve.split),
                ("mmu_notifier_invalidations", self.work.invalidations),
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
}

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
use shadow_mmu_vmm::vcpu_gate::{decode_words, encode_words};
use shadow_mmu_vmm::{
    BackendError, ChunkPacer, DirtyPace, HarvestProbe, HarvestWindow, LatencySummary, PassExtras, PassSpec,
    PassWorkload, ProgressTrace, RingEntries, RingFullLimit, RingState, VcpuControl, VcpuGate, VcpuLoss,
    VcpuStateError, check_vcpu_states,
};
use thiserror::Error;

use crate::backend::{EngineVm, EngineWork, collect_engine_rings, vm_with_memory};
use crate::notifier_thread::{Invalidations, MmuNotifierThread, NotifierError};
use crate::vcpu::{FaultObserver, VcpuExit, VcpuLossCounters, VcpuStats};
use crate::vm::{Vm, VmConfig};
use crate::workload::{
    AccessPattern, GuestControl, HC_CHUNK, HC_PASS_DONE, HC_STOP, ReserveCounts, WORKLOAD_STATE_WORDS,
    WorkloadGuest, WorkloadSpec,
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
    /// ns the faults that overlapped a harvest (reads too) waited for
    /// `mmu_lock`: (for read, for write).
    pub harvest_lock_wait_ns: (u64, u64),
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
            harvest_lock_wait_ns: (0, 0),
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

    fn fault_end(&mut self, write: bool, ns: u64, lock_wait_ns: (u64, u64)) {
        let end = self.clock.now();
        // A harvest ran at some time during the fault if one was running at
        // either end, or one started or ended in between.
        let met_harvest = self.begin % 2 == 1 || end != self.begin;
        if met_harvest {
            self.harvest_lock_wait_ns.0 += lock_wait_ns.0;
            self.harvest_lock_wait_ns.1 += lock_wait_ns.1;
        }
        if !write {
            return;
        }
        if met_harvest {
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

/// How often the guests' progress is sampled for [`ProgressTrace`]: often
/// enough to draw harvests of a millisecond, rarely enough that the sampler
/// takes no CPU the vCPUs would miss on a small host.
const PROGRESS_SAMPLE_EVERY: Duration = Duration::from_millis(1);

/// Most samples kept (over 15 minutes at one a millisecond).
const PROGRESS_MAX_SAMPLES: usize = 1 << 20;

/// The guests' progress over a run ([`ProgressTrace`]): a thread samples
/// their accesses, where the spec asks (`PassSpec::progress_samples`); the
/// host marks each probed harvest's window.
struct ProgressRecorder {
    /// The sweepers' start: the base of every time here, and of their
    /// `PassClock::idle_since`.
    t0: Instant,
    ctl: Arc<GuestControl>,
    /// The sweepers' clocks, for their idle time.
    passes: Arc<[CachePadded<PassClock>]>,
    vcpus: u32,
    windows: parking_lot::Mutex<Vec<HarvestWindow>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<JoinHandle<Vec<(u64, u64)>>>,
}

impl ProgressRecorder {
    fn start(sweepers: &Sweepers, samples: bool) -> Self {
        let (ctl, t0) = (sweepers.ctl.clone(), sweepers.t0);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (ctl2, stop2) = (ctl.clone(), stop.clone());
        let thread = samples.then(|| {
            std::thread::spawn(move || {
                let mut samples = Vec::new();
                // Relaxed: joined after the flag is set.
                while !stop2.load(Ordering::Relaxed) && samples.len() < PROGRESS_MAX_SAMPLES {
                    samples.push((t0.elapsed().as_nanos() as u64, ctl2.accesses()));
                    std::thread::sleep(PROGRESS_SAMPLE_EVERY);
                }
                samples
            })
        });
        Self {
            t0,
            ctl,
            passes: sweepers.passes.clone(),
            vcpus: sweepers.losses.len() as u32,
            windows: parking_lot::Mutex::new(Vec::new()),
            stop,
            thread,
        }
    }

    /// ns since the start, accesses and idle vCPU-ns so far.
    fn now(&self) -> (u64, u64, u64) {
        let idle = idle_now(&self.passes, self.t0);
        (self.t0.elapsed().as_nanos() as u64, self.ctl.accesses(), idle)
    }

    fn harvest_begin(&self) {
        let (ns, accesses, idle) = self.now();
        self.windows.lock().push(HarvestWindow {
            begin_ns: ns,
            end_ns: ns,
            begin_accesses: accesses,
            end_accesses: accesses,
            begin_idle_ns: idle,
            end_idle_ns: idle,
        });
    }

    fn harvest_end(&self) {
        let (ns, accesses, idle) = self.now();
        if let Some(w) = self.windows.lock().last_mut() {
            w.end_ns = ns;
            w.end_accesses = accesses;
            w.end_idle_ns = idle;
        }
    }

    /// Stops the sampler: the trace.
    fn finish(&mut self) -> ProgressTrace {
        // Relaxed: the join orders everything after.
        self.stop.store(true, Ordering::Relaxed);
        let samples = self.thread.take().and_then(|t| t.join().ok()).unwrap_or_default();
        ProgressTrace { vcpus: self.vcpus, samples, windows: std::mem::take(&mut *self.windows.lock()) }
    }
}

impl Drop for ProgressRecorder {
    fn drop(&mut self) {
        self.finish();
    }
}

/// A vCPU's pass count and the duration of its last pass.
#[derive(Default)]
struct PassClock {
    passes: AtomicU64,
    last_pass_ns: AtomicU64,
    /// ns it waited for releases (the workload's own rhythm: the host
    /// releases passes), over its completed waits.
    idle_ns: AtomicU64,
    /// Since when it waits now: ns since `Sweepers::t0`, plus one; 0 while
    /// it runs.
    idle_since: AtomicU64,
}

impl PassClock {
    fn begin_idle(&self, t0: Instant) {
        // Relaxed: statistics (read by `idle_now`, which tolerates a
        // reading between the two stores of a transition).
        self.idle_since.store(t0.elapsed().as_nanos() as u64 + 1, Ordering::Relaxed);
    }

    fn end_idle(&self, t0: Instant) {
        // Relaxed: as in `begin_idle`.
        let since = self.idle_since.swap(0, Ordering::Relaxed);
        if since > 0 {
            let now = t0.elapsed().as_nanos() as u64 + 1;
            self.idle_ns.fetch_add(now.saturating_sub(since), Ordering::Relaxed);
        }
    }

    /// ns waited for releases so far, the current wait included.
    fn idle_now(&self, t0: Instant) -> u64 {
        // Relaxed: as in `begin_idle`. Read at a transition, the current
        // wait may count twice or not at all, for one reading.
        let (done, since) = (self.idle_ns.load(Ordering::Relaxed), self.idle_since.load(Ordering::Relaxed));
        let now = t0.elapsed().as_nanos() as u64 + 1;
        done + if since > 0 { now.saturating_sub(since) } else { 0 }
    }
}

/// ns every vCPU of `passes` waited for releases so far, summed.
fn idle_now(passes: &[CachePadded<PassClock>], t0: Instant) -> u64 {
    passes.iter().map(|p| p.idle_now(t0)).sum()
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
    /// What they reaped of their own rings under a dirty-limit, for the
    /// host's next harvest.
    ring: Arc<RingState>,
    /// What each vCPU lost, live.
    losses: Vec<Arc<VcpuLossCounters>>,
    /// The base of their `PassClock::idle_since`.
    t0: Instant,
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
    /// Per vCPU: what it lost, and of its `mmu_lock` waits those in faults
    /// that overlapped a harvest (read, write).
    pub losses: Vec<(VcpuLoss, (u64, u64))>,
}

/// What a sweeper thread shares with the host.
struct SweeperLinks {
    id: u32,
    passes: Arc<[CachePadded<PassClock>]>,
    allowed: Arc<AtomicU64>,
    ctl: Arc<GuestControl>,
    gate: Arc<VcpuGate>,
    /// vCPUs waiting on a full dirty ring.
    ring_waiters: Arc<AtomicU64>,
    /// Where it reaps its own ring under a dirty-limit.
    ring: Arc<RingState>,
    /// What its vCPU lost; the thread adds its holds and ring waits.
    loss: Arc<VcpuLossCounters>,
    /// The base of `PassClock::idle_since`.
    t0: Instant,
}

impl SweeperLinks {
    /// `gate.hold`, its time counted as the vCPU's throttle loss.
    fn hold(&self, guest: &WorkloadGuest, done: u64) {
        let t = Instant::now();
        self.gate.hold(self.id, || save_sweeper(guest, done), || self.ctl.stop_requested());
        self.loss.throttle_ns.add(t.elapsed().as_nanos() as u64);
    }

    /// A chunk ended (the pace's exit, or the pass's end): counts its
    /// stores, and keeps the vCPU out for the pace's or the limit's share.
    fn chunk_done(&self, pacer: &mut ChunkPacer, guest: &mut WorkloadGuest) {
        let (pace, bytes) = (self.ctl.pace(), guest.take_chunk_bytes());
        pace.count(bytes);
        let held = pacer.chunk_done(pace, bytes, |d| self.hold_off(d));
        self.loss.throttle_ns.add(held.as_nanos() as u64);
    }

    /// Outside guest mode: keeps the vCPU out for `d` (a chunk's pace or
    /// dirty-limit), or until a pause or a stop.
    fn hold_off(&self, d: Duration) -> Duration {
        self.gate.hold_off(d, || self.ctl.stop_requested())
    }

    /// Outside guest mode, before the next pass: takes a restored state,
    /// holds while paused, and returns when pass `done + 1` is released or
    /// a stop is requested.
    ///
    /// The whole wait is the vCPU's idle time (a hold in it too: the guest
    /// was not running, so a pause costs it nothing).
    fn await_release(&self, guest: &mut WorkloadGuest, done: &mut u64) {
        let clock = &self.passes[self.id as usize];
        clock.begin_idle(self.t0);
        self.wait_for_release(guest, done);
        clock.end_idle(self.t0);
    }

    fn wait_for_release(&self, guest: &mut WorkloadGuest, done: &mut u64) {
        let clock = &self.passes[self.id as usize];
        loop {
            // Before the checks: a change after them rings after it.
            let ticket = self.gate.bell().ticket();
            self.gate.apply_restore(self.id, |state| {
                // Checked by `PassVm::restore_vcpus` before it was given.
                let (passes, g) = decode_sweeper(state).expect("a checked sweeper state");
                guest.restore(&g).expect("a checked sweeper state");
                *done = passes;
                // Release: as the store after a pass.
                clock.passes.store(passes, Ordering::Release);
            });
            // A stop wins over a pause.
            if self.ctl.stop_requested() {
                return;
            }
            if self.gate.pause_requested() {
                self.gate.hold(self.id, || save_sweeper(guest, *done), || self.ctl.stop_requested());
                continue;
            }
            // Acquire: pairs with `release`.
            if self.allowed.load(Ordering::Acquire) > *done {
                return;
            }
            self.gate.bell().wait(ticket);
        }
    }

    /// Out of the guest until the host reaps the rings (`wait_passes` does,
    /// seeing us wait), or a stop; the wait counted as ring-full loss.
    fn await_ring(&self, vcpu: &crate::vcpu::Vcpu, guest: &WorkloadGuest, done: u64) {
        let t = Instant::now();
        // Relaxed: a hint for the reaper; the ring's own orderings carry the
        // data.
        self.ring_waiters.fetch_add(1, Ordering::Relaxed);
        while vcpu.dirty_ring_full() && !self.ctl.stop_requested() {
            self.gate.hold(self.id, || save_sweeper(guest, done), || self.ctl.stop_requested());
            std::thread::sleep(Duration::from_micros(20));
        }
        self.ring_waiters.fetch_sub(1, Ordering::Relaxed);
        self.loss.ring_full_ns.add(t.elapsed().as_nanos() as u64);
    }

    /// Under a dirty-limit, at a ring-full exit (QEMU's `kvm_cpu_exec` with
    /// `dirtylimit_in_service()`): reaps this vCPU's own ring, for the
    /// host's next harvest, then keeps the vCPU out for what its pages since
    /// its last hold exceed at the limit, or until a pause (then holds it)
    /// or a stop. The time out counts as throttle loss.
    fn limit_at_ring_full(
        &self,
        vcpu: &crate::vcpu::Vcpu,
        guest: &WorkloadGuest,
        done: u64,
        limit: &mut RingFullLimit,
    ) -> Result<(), DirtyRingError> {
        let harvested = {
            let mut collected = self.ring.collected.lock();
            vcpu.reap_own_dirty_ring(|slot, offset| {
                if slot == 0 {
                    collected.push(offset);
                }
            })?
        };
        let d = limit.hold_for(self.ctl.pace(), harvested);
        // A limit lifted ends the hold too (`set_dirty_limit` rings).
        let held =
            self.gate.hold_off(d, || self.ctl.stop_requested() || self.ctl.pace().ring_full_limit() == 0);
        self.loss.throttle_ns.add(held.as_nanos() as u64);
        self.hold(guest, done);
        Ok(())
    }

    /// The thread: passes as far as released, until a stop.
    fn sweep(self, mut vcpu: crate::vcpu::Vcpu, mut guest: WorkloadGuest) -> SweeperExit {
        let (id, clock) = (self.id, &self.passes[self.id as usize]);
        let mut done = 0;
        let finish = |vcpu: &mut crate::vcpu::Vcpu, guest: &WorkloadGuest| {
            Ok((vcpu.stats(), guest.reserve_touches(), take_probe(vcpu)))
        };
        // The first pass too waits for its release (or a stop, which the
        // guest then sees at its first access).
        self.await_release(&mut guest, &mut done);
        let mut pass_start = Instant::now();
        let pace = self.ctl.pace().clone();
        let mut pacer = ChunkPacer::default();
        let mut limit = RingFullLimit::default();
        let r = loop {
            match vcpu.run(&mut guest) {
                Ok(VcpuExit::Hypercall(HC_CHUNK)) => {
                    self.chunk_done(&mut pacer, &mut guest);
                    self.hold(&guest, done);
                }
                Ok(VcpuExit::Hypercall(HC_PASS_DONE)) => {
                    self.chunk_done(&mut pacer, &mut guest);
                    // Relaxed: published by the release increment below.
                    clock.last_pass_ns.store(pass_start.elapsed().as_nanos() as u64, Ordering::Relaxed);
                    done += 1;
                    // Release: pairs with `wait_passes`' acquire load.
                    clock.passes.store(done, Ordering::Release);
                    // Outside guest mode (the guest parked): wait until the
                    // host releases the next pass, or stops us.
                    self.await_release(&mut guest, &mut done);
                    pass_start = Instant::now();
                    pacer.restart();
                }
                Ok(VcpuExit::Intr) => {
                    // Kicked (a pause): the last access is complete.
                    guest.park_outside();
                    self.hold(&guest, done);
                }
                Ok(VcpuExit::DirtyRingFull) if pace.ring_full_limit() > 0 => {
                    guest.park_outside();
                    if let Err(e) = self.limit_at_ring_full(&vcpu, &guest, done, &mut limit) {
                        break Err(e.into());
                    }
                }
                Ok(VcpuExit::DirtyRingFull) => {
                    guest.park_outside();
                    self.await_ring(&vcpu, &guest, done);
                    // Stopped while full: a run would only exit again (the
                    // guest never gets to see the stop).
                    if vcpu.dirty_ring_full() && self.ctl.stop_requested() {
                        break finish(&mut vcpu, &guest);
                    }
                }
                Ok(VcpuExit::Hypercall(HC_STOP)) => break finish(&mut vcpu, &guest),
                Ok(exit) => break Err(PassesError::UnexpectedExit { vcpu: id, exit }),
                Err(source) => break Err(PassesError::Vcpu { vcpu: id, source }),
            }
        };
        self.ctl.park(id);
        r
    }
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
        let ctl = GuestControl::with_pace(vcpus, DirtyPace::new(vcpus, vm.dirty_ring_entries().is_some()));
        let ring = Arc::new(RingState::default());
        let t0 = Instant::now();
        let passes: Arc<[CachePadded<PassClock>]> =
            (0..vcpus).map(|_| CachePadded::new(PassClock::default())).collect();
        let allowed = Arc::new(AtomicU64::new(allowed));
        let ring_waiters = Arc::new(AtomicU64::new(0));
        let kicker = vm.kicker();
        let gate = Arc::new(VcpuGate::new(vcpus, Box::new(move || kicker.kick())));
        let mut threads = Vec::new();
        let mut losses = Vec::new();
        for id in 0..vcpus {
            let mut vcpu = vm.create_vcpu(id)?;
            if let Some((c, shared)) = &clock {
                vcpu.set_fault_observer(Some(Box::new(LatencyProbe::new(c.clone()).sharing(shared.clone()))));
            }
            let guest = WorkloadGuest::new(spec, id, vcpus, 0, npages, ctl.clone());
            losses.push(vcpu.loss_counters());
            let links = SweeperLinks {
                id,
                passes: passes.clone(),
                allowed: allowed.clone(),
                ctl: ctl.clone(),
                gate: gate.clone(),
                ring_waiters: ring_waiters.clone(),
                ring: ring.clone(),
                loss: vcpu.loss_counters(),
                t0,
            };
            threads.push(std::thread::spawn(move || links.sweep(vcpu, guest)));
        }
        Ok(Self { ctl, passes, allowed, threads, ring_waiters, gate, ring, losses, t0 })
    }

    /// Lets every vCPU go on up to pass `n`.
    pub fn release(&self, n: u64) {
        // Release: pairs with the vCPUs' acquire load.
        self.allowed.store(n, Ordering::Release);
        self.gate.bell().ring();
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
        self.gate.bell().ring();
        let mut r = SweepResult::default();
        for t in self.threads.drain(..) {
            let (stats, reserve, probe) = t.join().map_err(|_| PassesError::Panicked)??;
            r.stats += stats;
            r.reserve += reserve;
            let mut harvest_waits = (0, 0);
            if let Some(p) = probe {
                r.harvest.add(&p.harvest);
                r.idle.add(&p.idle);
                harvest_waits = p.harvest_lock_wait_ns;
            }
            r.losses.push((self.losses[r.losses.len()].snapshot(), harvest_waits));
        }
        Ok(r)
    }
}

impl Drop for Sweepers {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// The engine's [`PassVm`](shadow_mmu_vmm::PassVm): a VM with one slot over populated host memory
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
    /// The guests' progress, and the harvest windows.
    progress: ProgressRecorder,
}

impl EnginePasses {
    /// The run's closing lines: faults, `mmu_lock`, the pool, the lock
    /// faults made.
    fn stop_lines(&self, swept: &SweepResult, s: &crate::vm::VmStats) -> Vec<String> {
        let mut lines = vec![
            format!(
                "vCPU write faults: {} ({} fixed by fast_page_fault{}), mmu_lock held {:.1} ms for write, \
                 {:.1} ms for read (summed over readers)",
                swept.stats.write_faults,
                s.mmu.fast_page_faults,
                if self.fast_page_fault { "" } else { ", which is off" },
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
        let lock = self.workload.lock_faults;
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
                self.invalidations
            ));
        }
        lines
    }

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
            None => spec.lock_faults.swept_pages(npages),
        };
        let reserve = if reserve_needed { swept } else { 0 };
        if swept + reserve > npages || swept < u64::from(spec.vcpus) {
            return Err(PassesError::NoReserve { swept, guest_pages: npages });
        }
        // A working set is swept in a lazily mapped guest (`MAP_NORESERVE`):
        // populating it all would defeat the point of a large guest. A
        // destination's is lazy too (`PassSpec::lazy_memory`).
        let populate = spec.dirty_pages.is_none() && !spec.lazy_memory;
        let (vm, mem) = vm_with_memory(config, spec.guest_bytes, populate)?;
        if let Some(n) = dirty_ring {
            vm.enable_dirty_ring(n.bytes())?;
        }
        let workload = WorkloadSpec {
            pattern: if spec.random { AccessPattern::Random } else { AccessPattern::Seq },
            write_pct: spec.write_pct,
            exit_each_pass: true,
            seed: spec.seed,
            lock_faults: spec.lock_faults,
            compute_vcpus: spec.compute_vcpus,
            ..WorkloadSpec::default()
        };
        let clock = Arc::new(HarvestClock::default());
        let harvest_latency = Arc::new(parking_lot::Mutex::new(LatencyHistogram::default()));
        let probes = Some((clock.clone(), harvest_latency.clone()));
        let sweepers = Sweepers::start(&vm, spec.vcpus, swept, workload, 0, probes)?;
        let progress = ProgressRecorder::start(&sweepers, spec.progress_samples);
        let ring = sweepers.ring.clone();
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
            progress,
        };
        Ok(EngineVm { name, vm, mem, work, ring })
    }
}

impl PassWorkload for EnginePassVm {
    fn release(&self, n: u64) {
        self.work.sweepers.release(n);
    }

    fn dirty_pace(&self) -> Arc<DirtyPace> {
        self.work.sweepers.ctl.pace().clone()
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

    fn vcpu_passes(&self) -> Vec<u64> {
        self.work.sweepers.passes()
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

    fn set_dirty_limit(&self, limit: Option<u64>) -> Result<(), BackendError> {
        self.work.sweepers.ctl.pace().set_limit(limit);
        // A vCPU held at its ring-full exit sees a lifted limit at once.
        self.work.sweepers.gate.bell().ring();
        Ok(())
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
        let lines = self.work.stop_lines(&swept, &s);
        Ok(PassExtras {
            latency: Some((swept.harvest.summary(), swept.idle.summary())),
            vcpu_losses: swept.losses,
            progress: Some(self.work.progress.finish()),
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
        self.work.progress.harvest_begin();
        self.work.clock.tick();
    }

    fn harvest_end(&self) {
        self.work.clock.tick();
        self.work.progress.harvest_end();
    }

    fn vcpu_losses(&self) -> Vec<VcpuLoss> {
        self.work.sweepers.losses.iter().map(|l| l.snapshot()).collect()
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
        p.fault_end(true, 100, (0, 7));
        // Begins and ends inside one harvest.
        clock.tick();
        p.fault_begin();
        p.fault_end(true, 200, (0, 1));
        clock.tick();
        // Begins before a harvest that ends before the fault does.
        p.fault_begin();
        clock.tick();
        clock.tick();
        p.fault_end(true, 300, (0, 1));
        // Begins inside a harvest, ends after it.
        clock.tick();
        p.fault_begin();
        clock.tick();
        p.fault_end(true, 400, (0, 1));
        // Read faults are not write faults: not recorded.
        clock.tick();
        p.fault_begin();
        p.fault_end(false, 500, (2, 0));
        clock.tick();
        assert_eq!((p.idle.count(), p.harvest.count()), (1, 3));
        assert_eq!(p.idle.max_ns(), 100);
        assert_eq!((p.harvest.quantile_ns(0.0), p.harvest.max_ns()), (200, 400));
        // Lock waits of faults that met a harvest, reads included; not the
        // idle fault's.
        assert_eq!(p.harvest_lock_wait_ns, (2, 3));
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

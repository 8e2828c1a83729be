//! Running a VM under dirty logging, checked by the oracle: what
//! `shadow-mmu run` and `shadow-mmu stress` do, and what the tests call.
//!
//! 1. Build a VM with one memslot over `guest_bytes` of host memory, start a
//!    thread per vCPU running the workload, let them populate memory.
//! 2. Cut, enable dirty logging, copy all of memory (the bulk copy).
//! 3. Every `interval`: cut, `get_dirty_log`, let the oracle check the clean
//!    pages and copy the dirty ones.
//! 4. Stop the vCPUs, audit the MMU (with the dirty logging invariant), take
//!    a last harvest and run the oracle's exact final check.
//!
//! With `slots` above 1, guest memory is that many memslots over the same
//! host mapping, all logged; each collection harvests each, and each has its
//! own oracle.
//!
//! With `slot_churn`, one more memslot (the next id, above guest memory) is
//! deleted and re-added over and over by another thread during all of this,
//! while an extra vCPU writes to it (and takes MMIO exits while it is gone):
//! deletions zap sptes under the same shadow pages, in the same rmaps' pools,
//! as the harvest of guest memory.
//!
//! With `invalidate_every`, a host thread plays the mmu notifier during
//! logging: it drops the sptes of a random 64 KiB of guest memory each time
//! (`Vm::mmu_notifier_invalidate_range`), and the vCPUs fault them back in.
//!
//! With `relog_every`, logging is turned off and on again with the vCPUs
//! running, every so many collections.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::oracle::{CollectStats, LostWrite, Oracle};
use shadow_mmu_core::dirty_bitmap::bitmap_words;
use shadow_mmu_core::spte::{PAGE_SIZE, WORDS_PER_PAGE};
use shadow_mmu_engine::audit::{AuditError, AuditOptions, AuditReport};
use shadow_mmu_engine::dirty_log::{ClearDirtyLogError, DirtyLogError};
use shadow_mmu_engine::dirty_ring::DirtyRingError;
use shadow_mmu_engine::memory::{HostMemory, MemoryError};
use shadow_mmu_engine::memslot::{MemFlags, MemslotError, UserMemoryRegion};
use shadow_mmu_engine::mmu::MmuDesign;
use shadow_mmu_engine::notifier_thread::{Invalidations, MmuNotifierThread, NotifierError};
use shadow_mmu_engine::vcpu::tlb::DEFAULT_TLB_ENTRIES;
use shadow_mmu_engine::vcpu::{VcpuError, VcpuExit, VcpuStats};
use shadow_mmu_engine::vm::{Vm, VmConfig, VmError, VmStats};
use shadow_mmu_engine::workload::{
    AccessPattern, GuestControl, HC_PASS_DONE, HC_STOP, MAX_WORKLOAD_VCPUS, ReserveCounts, WorkloadGuest,
    WorkloadSpec,
};
use shadow_mmu_vmm::LockFaults;
use shadow_mmu_vmm::interface::{BadHarvestSpec, DirtyLogInterface, HarvestSpec, clear_chunks};

/// A run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunConfig {
    /// Dirty logging design.
    pub mmu: MmuDesign,
    /// `fast_page_fault` on (`VmConfig::fast_page_fault`).
    pub fast_page_fault: bool,
    /// Every this many collections, turn logging off for one interval and
    /// on again with the vCPUs running (the migration restarts: a full copy
    /// follows); `None`: never.
    pub relog_every: Option<u64>,
    /// vCPU threads.
    pub vcpus: u32,
    /// Guest memory, bytes.
    pub guest_bytes: u64,
    /// How long to harvest for (after the warm-up).
    pub duration: Duration,
    /// Stop after this many collections, if sooner.
    pub max_collections: Option<u64>,
    /// Time between collections.
    pub interval: Duration,
    /// Time the vCPUs run before dirty logging is enabled.
    pub warmup: Duration,
    /// The workload.
    pub workload: WorkloadSpec,
    /// Shadow page budget (`None`: KVM's default).
    pub max_mmu_pages: Option<usize>,
    /// TLB entries per vCPU.
    pub tlb_entries: usize,
    /// Map 2 MiB pages where possible.
    pub large_pages: bool,
    /// The TDP design's eager page splitting (`VmConfig::eager_page_split`).
    pub eager_page_split: bool,
    /// The TDP design's PML (`VmConfig::pml`).
    pub pml: bool,
    /// Delete and re-add a second memslot during the run (module docs).
    pub slot_churn: bool,
    /// Memslots guest memory is split into, all logged (module docs).
    pub slots: u32,
    /// Time between two mmu notifier invalidations during logging (module
    /// docs); `None`: none.
    pub invalidate_every: Option<Duration>,
    /// Freed shadow pages kept for reuse (the rest go back to the system
    /// after a grace period); `None`: the VM's default.
    pub max_free_shadow_pages: Option<usize>,
    /// The dirty-log interface each collection harvests with.
    pub harvest: HarvestSpec,
    /// Rules to break (tests only).
    #[cfg(feature = "break-rules")]
    pub breakage: shadow_mmu_core::breakage::Breakage,
}

impl RunConfig {
    /// The defaults, in the design `d` describes (its MMU design,
    /// `fast_page_fault`, eager split and PML).
    pub fn for_design(d: &VmConfig) -> Self {
        Self {
            mmu: d.mmu,
            fast_page_fault: d.fast_page_fault,
            eager_page_split: d.eager_page_split,
            pml: d.pml,
            ..Self::default()
        }
    }
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            mmu: MmuDesign::Locked,
            fast_page_fault: true,
            relog_every: None,
            vcpus: 2,
            guest_bytes: 256 << 20,
            duration: Duration::from_secs(5),
            max_collections: None,
            interval: Duration::from_millis(50),
            warmup: Duration::from_millis(200),
            workload: WorkloadSpec::default(),
            max_mmu_pages: None,
            tlb_entries: DEFAULT_TLB_ENTRIES,
            large_pages: true,
            eager_page_split: true,
            pml: false,
            slot_churn: false,
            slots: 1,
            invalidate_every: None,
            max_free_shadow_pages: None,
            harvest: HarvestSpec::default(),
            #[cfg(feature = "break-rules")]
            breakage: shadow_mmu_core::breakage::Breakage::default(),
        }
    }
}

/// What went wrong before the run could be judged.
#[derive(Debug, Error)]
pub enum HarnessError {
    /// A configuration value is out of range.
    #[error("bad run configuration: {0}")]
    BadConfig(String),
    /// The VM refused.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Host memory could not be mapped.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The memslot was refused.
    #[error(transparent)]
    Memslot(#[from] MemslotError),
    /// `get_dirty_log` was refused.
    #[error(transparent)]
    DirtyLog(#[from] DirtyLogError),
    /// `clear_dirty_log` was refused.
    #[error(transparent)]
    ClearDirtyLog(#[from] ClearDirtyLogError),
    /// The dirty ring was refused.
    #[error(transparent)]
    DirtyRing(#[from] DirtyRingError),
    /// The harvest spec cannot run.
    #[error(transparent)]
    Harvest(#[from] BadHarvestSpec),
    /// The engine's passes could not start or ended badly.
    #[error(transparent)]
    Passes(#[from] shadow_mmu_engine::PassesError),
}

/// Something that went wrong during a run. The report keeps each one, and a
/// run with any is judged failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RunError {
    /// A vCPU exited in a way the workload never asks for.
    #[error("vCPU {id}: unexpected exit {exit:?}")]
    UnexpectedExit {
        /// The vCPU.
        id: u32,
        /// Its exit.
        exit: VcpuExit,
    },
    /// A vCPU's run failed.
    #[error("vCPU {id} failed")]
    Vcpu {
        /// The vCPU.
        id: u32,
        /// Why.
        source: VcpuError,
    },
    /// A thread of the run panicked.
    #[error("the {0} thread panicked")]
    Panicked(&'static str),
    /// The mmu notifier thread's invalidation was refused.
    #[error(transparent)]
    Notifier(NotifierError),
    /// The slot churn thread's memslot change was refused.
    #[error("slot churn")]
    SlotChurn(#[source] MemslotError),
    /// The MMU audit at the end found a broken invariant.
    #[error("MMU audit")]
    Audit(#[from] AuditError),
}

/// What happened in a run.
#[derive(Debug, Clone, Default)]
pub struct RunReport {
    /// Time from enabling dirty logging to the final check.
    pub elapsed: Duration,
    /// Collections checked (not counting the final one).
    pub collections: u64,
    /// vCPU counters, summed.
    pub vcpu: VcpuStats,
    /// MMU figures at the end.
    pub vm: VmStats,
    /// Time to enable dirty logging.
    pub enable_logging_ns: u64,
    /// Time of each `get_dirty_log` (including the final one).
    pub get_dirty_log_ns: Vec<u64>,
    /// Pages the harvests reported dirty (including the final one).
    pub harvested_pages: u64,
    /// ... whose content had not changed since the copy.
    pub dirty_unchanged: u64,
    /// Lost dirty pages found.
    pub lost_pages: u64,
    /// The first of them, in detail.
    pub lost: Vec<LostWrite>,
    /// Bits set past the end of the slot.
    pub stray_bits: u64,
    /// Deletions and re-additions of the churned slot.
    pub slot_churn_cycles: u64,
    /// Times logging was turned off and on again (`RunConfig::relog_every`).
    pub relogs: u64,
    /// mmu notifier invalidations during logging (`RunConfig::invalidate_every`).
    pub invalidations: u64,
    /// The guests' reserve touches (`LockFaults`).
    pub reserve: ReserveCounts,
    /// The audit after the vCPUs stopped.
    pub audit: AuditReport,
    /// vCPU errors, unexpected exits, audit failures.
    pub errors: Vec<RunError>,
}

impl RunReport {
    /// Did the run pass: no lost page, no stray bit, no error?
    pub fn ok(&self) -> bool {
        self.lost_pages == 0 && self.stray_bits == 0 && self.errors.is_empty()
    }

    /// Mean `get_dirty_log` time, in ns.
    pub fn get_dirty_log_avg_ns(&self) -> u64 {
        let n = self.get_dirty_log_ns.len().max(1) as u64;
        self.get_dirty_log_ns.iter().sum::<u64>() / n
    }
}

impl RunConfig {
    fn validate(&self) -> Result<(), HarnessError> {
        self.harvest.validate()?;
        let bad = |m: String| Err(HarnessError::BadConfig(m));
        if self.vcpus == 0 || self.vcpus > MAX_WORKLOAD_VCPUS {
            return bad(format!("vcpus must be 1..={MAX_WORKLOAD_VCPUS}, not {}", self.vcpus));
        }
        if self.guest_bytes == 0 || !self.guest_bytes.is_multiple_of(PAGE_SIZE) {
            return bad(format!(
                "guest size {:#x} is not a non-zero multiple of {PAGE_SIZE}",
                self.guest_bytes
            ));
        }
        if swept_pages(self) < u64::from(self.vcpus) {
            return bad(format!("{} vCPUs need at least {} pages", self.vcpus, self.vcpus));
        }
        if self.workload.write_pct > 100 {
            return bad(format!("write percentage {} is over 100", self.workload.write_pct));
        }
        if let AccessPattern::Hot { hot_pages_pct, hot_access_pct } = self.workload.pattern
            && (!(1..=100).contains(&hot_pages_pct) || hot_access_pct > 100)
        {
            return bad(format!("hot set {hot_pages_pct}% / {hot_access_pct}% out of range"));
        }
        if self.workload.address_spaces == 0 || self.workload.switch_every == 0 {
            return bad("address spaces and switch interval must be at least 1".into());
        }
        if !(1..=MAX_SLOTS).contains(&self.slots)
            || !self.guest_bytes.is_multiple_of(u64::from(self.slots) * PAGE_SIZE)
        {
            return bad(format!(
                "{} slots: must be 1..={MAX_SLOTS} and divide guest memory into whole pages",
                self.slots
            ));
        }
        Ok(())
    }
}

type VcpuResult = (VcpuStats, ReserveCounts, Vec<RunError>);

/// Stops the vCPU threads when dropped, so that an error return never leaves
/// them running.
struct Vcpus {
    ctl: Arc<GuestControl>,
    threads: Vec<JoinHandle<VcpuResult>>,
}

impl Vcpus {
    fn stop(&mut self) -> VcpuResult {
        self.ctl.request_stop();
        let mut stats = VcpuStats::default();
        let mut reserve = ReserveCounts::default();
        let mut errors = Vec::new();
        for t in self.threads.drain(..) {
            match t.join() {
                Ok((s, r, e)) => {
                    stats += s;
                    reserve += r;
                    errors.extend(e);
                }
                Err(_) => errors.push(RunError::Panicked("vCPU")),
            }
        }
        (stats, reserve, errors)
    }
}

impl Drop for Vcpus {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Pages the vCPUs sweep (`LockFaults::swept_pages`).
fn swept_pages(cfg: &RunConfig) -> u64 {
    cfg.workload.lock_faults.swept_pages(cfg.guest_bytes / PAGE_SIZE)
}

fn spawn_vcpus(
    vm: &Vm,
    cfg: &RunConfig,
    npages: u64,
    ctl: &Arc<GuestControl>,
) -> Result<Vcpus, HarnessError> {
    let mut vcpus = Vcpus { ctl: ctl.clone(), threads: Vec::new() };
    for id in 0..cfg.vcpus {
        let mut vcpu = vm.create_vcpu(id)?;
        let mut guest = WorkloadGuest::new(cfg.workload, id, cfg.vcpus, 0, npages, ctl.clone());
        let ctl = ctl.clone();
        let t = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                let mut errors = Vec::new();
                loop {
                    match vcpu.run(&mut guest) {
                        Ok(VcpuExit::Hypercall(HC_STOP)) => break,
                        Ok(VcpuExit::Hypercall(HC_PASS_DONE)) => continue,
                        Ok(VcpuExit::DirtyRingFull) => {
                            // Out of the guest: cuts must not wait for us
                            // while we wait for the harvest.
                            guest.park_outside();
                            while vcpu.dirty_ring_full() && !ctl.stop_requested() {
                                std::thread::sleep(Duration::from_micros(20));
                            }
                            if ctl.stop_requested() {
                                break;
                            }
                            continue;
                        }
                        Ok(exit) => {
                            errors.push(RunError::UnexpectedExit { id, exit });
                            break;
                        }
                        Err(source) => {
                            errors.push(RunError::Vcpu { id, source });
                            break;
                        }
                    }
                }
                // A vCPU that stopped on an error must not hold up cuts.
                ctl.park(id);
                (vcpu.stats(), guest.reserve_touches(), errors)
            })
            .expect("spawning a vCPU thread");
        vcpus.threads.push(t);
    }
    Ok(vcpus)
}

/// Most memslots guest memory may be split into.
pub const MAX_SLOTS: u32 = 16;

/// Bytes each mmu notifier invalidation of a run drops.
const INVALIDATE_BYTES: u64 = 64 << 10;

/// Size of the churned slot.
const CHURN_SLOT_BYTES: u64 = 8 << 20;

/// The guest of the churn vCPU: random stores to the churned slot until told
/// to stop; stores to it while it is deleted exit as MMIO, and go on.
struct ChurnGuest {
    base_gfn: u64,
    pages: u64,
    rng: fastrand::Rng,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl shadow_mmu_engine::guest::GuestCode for ChurnGuest {
    fn next_op(&mut self, _: u64) -> shadow_mmu_engine::guest::GuestOp {
        // Relaxed: the host joins this thread after setting the flag.
        if self.stop.load(std::sync::atomic::Ordering::Relaxed) {
            return shadow_mmu_engine::guest::GuestOp::Hypercall(HC_STOP);
        }
        let gfn = self.base_gfn + self.rng.u64(..self.pages);
        shadow_mmu_engine::guest::GuestOp::Write(gfn << shadow_mmu_core::spte::PAGE_SHIFT, self.rng.u64(..))
    }
}

/// The churn of the slot after guest memory's (id `RunConfig::slots`): an
/// extra vCPU writing to it, and a thread deleting and re-adding it. Stopped
/// and joined by `stop`, or when dropped (an error return).
struct Churn {
    stop: Arc<std::sync::atomic::AtomicBool>,
    vcpu: Option<JoinHandle<Vec<RunError>>>,
    churner: Option<JoinHandle<Result<u64, MemslotError>>>,
}

impl Churn {
    fn start(vm: &Vm, cfg: &RunConfig, seed: u64) -> Result<Self, HarnessError> {
        let base = cfg.guest_bytes.next_multiple_of(2 << 20) + (2 << 20);
        let mem = HostMemory::anonymous(CHURN_SLOT_BYTES)?;
        let slot = cfg.slots;
        let region = UserMemoryRegion {
            slot,
            flags: MemFlags::empty(),
            guest_phys_addr: base,
            memory_size: CHURN_SLOT_BYTES,
            memory: Some(mem),
            memory_offset: 0,
        };
        vm.set_user_memory_region(region.clone())?;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let id = cfg.vcpus;
        let mut vcpu = vm.create_vcpu(id)?;
        let mut guest = ChurnGuest {
            base_gfn: base >> shadow_mmu_core::spte::PAGE_SHIFT,
            pages: CHURN_SLOT_BYTES / PAGE_SIZE,
            rng: fastrand::Rng::with_seed(seed),
            stop: stop.clone(),
        };
        let stop_ring = stop.clone();
        let vcpu = std::thread::spawn(move || {
            let mut errors = Vec::new();
            loop {
                match vcpu.run(&mut guest) {
                    Ok(VcpuExit::Hypercall(HC_STOP)) => break,
                    Ok(VcpuExit::Mmio { .. }) => continue,
                    // Its slot does not log, so its ring never fills; if it
                    // did, a stop must still end the loop.
                    // Relaxed: as the guest's own check of the flag.
                    Ok(VcpuExit::DirtyRingFull) if !stop_ring.load(std::sync::atomic::Ordering::Relaxed) => {
                        std::thread::sleep(Duration::from_micros(20));
                        continue;
                    }
                    Ok(VcpuExit::DirtyRingFull) => break,
                    Ok(exit) => errors.push(RunError::UnexpectedExit { id, exit }),
                    Err(source) => errors.push(RunError::Vcpu { id, source }),
                }
                break;
            }
            errors
        });
        let (vm2, stop2) = (vm.clone(), stop.clone());
        let churner = std::thread::spawn(move || {
            let mut rng = fastrand::Rng::with_seed(seed ^ 0xc4u64);
            let mut cycles = 0;
            // Relaxed: joined after the flag is set.
            while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_micros(rng.u64(0..2000)));
                vm2.delete_memory_region(slot)?;
                std::thread::sleep(Duration::from_micros(rng.u64(0..2000)));
                let mut r = region.clone();
                if rng.bool() {
                    r.flags = MemFlags::LOG_DIRTY_PAGES;
                }
                vm2.set_user_memory_region(r)?;
                cycles += 1;
            }
            Ok(cycles)
        });
        Ok(Self { stop, vcpu: Some(vcpu), churner: Some(churner) })
    }

    fn stop(mut self, report: &mut RunReport) {
        // Relaxed: the joins below order everything after.
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        match self.vcpu.take().map(JoinHandle::join) {
            Some(Ok(errors)) => report.errors.extend(errors),
            Some(Err(_)) => report.errors.push(RunError::Panicked("churn vCPU")),
            None => {}
        }
        match self.churner.take().map(JoinHandle::join) {
            Some(Ok(Ok(cycles))) => report.slot_churn_cycles = cycles,
            Some(Ok(Err(e))) => report.errors.push(RunError::SlotChurn(e)),
            Some(Err(_)) => report.errors.push(RunError::Panicked("slot churn")),
            None => {}
        }
    }
}

impl Drop for Churn {
    fn drop(&mut self) {
        // Relaxed: as in `stop`.
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        // Errors are reported by `stop`; here we only make sure nothing runs on.
        let _ = self.vcpu.take().map(JoinHandle::join);
        let _ = self.churner.take().map(JoinHandle::join);
    }
}

/// Runs `cfg`; calls `on_collection` after each checked collection.
pub fn run(
    cfg: &RunConfig,
    mut on_collection: impl FnMut(u64, &CollectStats),
) -> Result<RunReport, HarnessError> {
    cfg.validate()?;
    let (vm, mem) = build_vm(cfg)?;
    if let Some(ring) = cfg.harvest.ring() {
        vm.enable_dirty_ring(ring.bytes())?;
    }
    let ctl = GuestControl::new(cfg.vcpus);
    let swept = swept_pages(cfg);
    let mut vcpus = spawn_vcpus(&vm, cfg, swept, &ctl)?;
    let churn = if cfg.slot_churn { Some(Churn::start(&vm, cfg, cfg.workload.seed)?) } else { None };
    std::thread::sleep(cfg.warmup);

    // Collection 0: enable dirty logging, bulk copy.
    let mut c = Collector::new(&vm, &mem, cfg);
    let mut report = RunReport::default();
    ctl.cut();
    let start = Instant::now();
    c.enable_logging()?;
    report.enable_logging_ns = start.elapsed().as_nanos() as u64;
    ctl.set_lock_faults(true);
    let lock_notifier =
        Invalidations::of_lock_faults(&cfg.workload.lock_faults, cfg.vcpus, swept, cfg.workload.seed)
            .map(|what| MmuNotifierThread::start(&vm, what));
    let notifier = cfg.invalidate_every.map(|every| {
        let what = Invalidations {
            gpa: 0,
            bytes: cfg.guest_bytes,
            range_bytes: INVALIDATE_BYTES,
            per_sec: 1.0 / every.as_secs_f64(),
            seed: cfg.workload.seed,
        };
        MmuNotifierThread::start(&vm, what)
    });
    while start.elapsed() < cfg.duration && cfg.max_collections.is_none_or(|m| report.collections < m) {
        std::thread::sleep(cfg.interval);
        let st = c.collect(ctl.cut(), &mut report)?;
        on_collection(report.collections - 1, &st);
        if st.lost_pages > 0 || st.stray_bits > 0 {
            break;
        }
        if cfg.relog_every.is_some_and(|n| report.collections.is_multiple_of(n)) {
            c.relog(&ctl)?;
            report.relogs += 1;
        }
    }

    // The vCPUs stop; the last collection and the audit.
    for n in [notifier, lock_notifier].into_iter().flatten() {
        match n.stop() {
            Ok(n) => report.invalidations += n,
            Err(e) => report.errors.push(RunError::Notifier(e)),
        }
    }
    let (vcpu_stats, reserve, errors) = vcpus.stop();
    report.vcpu = vcpu_stats;
    report.reserve = reserve;
    report.errors.extend(errors);
    if let Some(churn) = churn {
        churn.stop(&mut report);
    }
    match vm.audit(AuditOptions { dirty_log: true }) {
        Ok(a) => report.audit = a,
        Err(e) => report.errors.push(RunError::Audit(e)),
    }
    c.finish(&mut report)?;
    report.elapsed = start.elapsed();
    report.lost = c.oracles.iter().flat_map(|o| o.lost().iter().cloned()).collect();
    report.vm = vm.stats();
    Ok(report)
}

/// The VM `cfg` describes: its memory split among `cfg.slots` memslots.
fn build_vm(cfg: &RunConfig) -> Result<(Vm, Arc<HostMemory>), HarnessError> {
    let vm = Vm::new(VmConfig {
        mmu: cfg.mmu,
        fast_page_fault: cfg.fast_page_fault,
        max_mmu_pages: cfg.max_mmu_pages,
        address_spaces: cfg.workload.address_spaces,
        tlb_entries: cfg.tlb_entries,
        large_pages: cfg.large_pages,
        eager_page_split: cfg.eager_page_split,
        pml: cfg.pml,
        max_free_shadow_pages: cfg.max_free_shadow_pages.unwrap_or(VmConfig::default().max_free_shadow_pages),
        dirty_log_protect: cfg.harvest.protect(),
        harvest_threads: cfg.harvest.harvest_threads,
        #[cfg(feature = "break-rules")]
        breakage: cfg.breakage,
        ..VmConfig::default()
    })?;
    let mem = HostMemory::anonymous(cfg.guest_bytes)?;
    let slot_bytes = cfg.guest_bytes / u64::from(cfg.slots);
    for i in 0..cfg.slots {
        vm.set_user_memory_region(UserMemoryRegion {
            slot: i,
            flags: MemFlags::empty(),
            guest_phys_addr: u64::from(i) * slot_bytes,
            memory_size: slot_bytes,
            memory: Some(mem.clone()),
            memory_offset: u64::from(i) * slot_bytes,
        })?;
    }
    Ok((vm, mem))
}

/// The harvests of a run and their checks: one oracle and one bitmap per
/// slot.
struct Collector<'a> {
    vm: &'a Vm,
    mem: &'a HostMemory,
    cfg: &'a RunConfig,
    slot_pages: u64,
    oracles: Vec<Oracle>,
    bitmaps: Vec<Vec<u64>>,
}

impl<'a> Collector<'a> {
    fn new(vm: &'a Vm, mem: &'a HostMemory, cfg: &'a RunConfig) -> Self {
        let slot_pages = cfg.guest_bytes / u64::from(cfg.slots) / PAGE_SIZE;
        let oracles = (0..cfg.slots).map(|i| Oracle::new(u64::from(i) * slot_pages, slot_pages)).collect();
        let bitmaps = vec![vec![0u64; bitmap_words(slot_pages)]; cfg.slots as usize];
        Self { vm, mem, cfg, slot_pages, oracles, bitmaps }
    }

    /// Slot `i`'s words of guest memory.
    fn words(&self, i: u32) -> &'a [std::sync::atomic::AtomicU64] {
        let w = self.slot_pages as usize * WORDS_PER_PAGE;
        &self.mem.words()[i as usize * w..(i as usize + 1) * w]
    }

    /// Logging on in every slot, and each oracle's bulk copy.
    fn enable_logging(&mut self) -> Result<(), HarnessError> {
        for i in 0..self.cfg.slots {
            self.vm.enable_dirty_logging(i)?;
        }
        for i in 0..self.cfg.slots {
            let words = self.words(i);
            self.oracles[i as usize].full_copy(words);
        }
        Ok(())
    }

    /// One harvest, checked by the oracles against the guest's writes up
    /// to `cut`.
    fn collect(&mut self, cut: u64, report: &mut RunReport) -> Result<CollectStats, HarnessError> {
        let harvest_ns = harvest_slots(self.vm, &self.cfg.harvest, &mut self.bitmaps)?;
        let mut st = CollectStats::default();
        for i in 0..self.cfg.slots {
            let words = self.words(i);
            st += self.oracles[i as usize].collect(words, &self.bitmaps[i as usize], cut);
        }
        report.get_dirty_log_ns.push(harvest_ns);
        report.collections += 1;
        report.accumulate(&st);
        Ok(st)
    }

    /// Logging off for an interval, with the vCPUs running (faults now map
    /// writable and large pages again, and the fast path fixes read-only
    /// sptes without marking), then on again: the oracle's copy starts
    /// over, as a migration that restarts does.
    fn relog(&mut self, ctl: &GuestControl) -> Result<(), HarnessError> {
        for i in 0..self.cfg.slots {
            self.vm.disable_dirty_logging(i)?;
        }
        std::thread::sleep(self.cfg.interval);
        ctl.cut();
        for i in 0..self.cfg.slots {
            self.vm.enable_dirty_logging(i)?;
            let words = self.words(i);
            self.oracles[i as usize].full_copy(words);
        }
        Ok(())
    }

    /// The last harvest, with every vCPU stopped: every write is reported.
    fn finish(&mut self, report: &mut RunReport) -> Result<(), HarnessError> {
        let harvest_ns = harvest_slots(self.vm, &self.cfg.harvest, &mut self.bitmaps)?;
        let mut st = CollectStats::default();
        for i in 0..self.cfg.slots {
            let words = self.words(i);
            st += self.oracles[i as usize].finish(words, &self.bitmaps[i as usize]);
        }
        report.get_dirty_log_ns.push(harvest_ns);
        report.accumulate(&st);
        Ok(())
    }
}

impl RunReport {
    /// Adds a collection's counts.
    fn accumulate(&mut self, st: &CollectStats) {
        self.harvested_pages += st.dirty_pages;
        self.dirty_unchanged += st.dirty_unchanged;
        self.lost_pages += st.lost_pages;
        self.stray_bits += st.stray_bits;
    }
}

/// One harvest of slots `0..bitmaps.len()` by `spec`, into one bitmap
/// each: per slot GET, then with manual protect the CLEARs of its chunks;
/// or, with the ring, every vCPU's ring collected into the bitmaps, then
/// the reset. Returns the time taken, ns.
fn harvest_slots(vm: &Vm, spec: &HarvestSpec, bitmaps: &mut [Vec<u64>]) -> Result<u64, HarnessError> {
    let t0 = Instant::now();
    if spec.interface == DirtyLogInterface::Ring {
        bitmaps.iter_mut().for_each(|b| b.fill(0));
        for vcpu in vm.dirty_ring_vcpus() {
            vm.harvest_dirty_ring(vcpu, |slot, offset| {
                // Other slots (the churned one) are not the oracle's.
                if let Some(b) = bitmaps.get_mut(slot as usize) {
                    b[(offset / 64) as usize] |= 1 << (offset % 64);
                }
            })?;
        }
        vm.reset_dirty_rings()?;
        return Ok(t0.elapsed().as_nanos() as u64);
    }
    for (slot, bitmap) in bitmaps.iter_mut().enumerate() {
        let slot = slot as u32;
        vm.get_dirty_log(slot, bitmap)?;
        if spec.interface == DirtyLogInterface::Clear {
            let npages = vm.memslots().get(slot).map_or(bitmap.len() as u64 * 64, |s| s.npages());
            for (first, n, mask) in clear_chunks(bitmap, npages, spec.clear_chunk_pages) {
                vm.clear_dirty_log(slot, first, n, mask)?;
            }
        }
    }
    Ok(t0.elapsed().as_nanos() as u64)
}

/// A random configuration for the stress run, from `seed`, harvesting for at
/// most `max_duration`. The same seed gives the same configuration (not the
/// same thread interleaving).
pub fn random_config(seed: u64, max_duration: Duration) -> RunConfig {
    let mut rng = fastrand::Rng::with_seed(seed);
    let vcpus = rng.u32(1..=4);
    let guest_mib = [8u64, 16, 32, 64, 128, 256][rng.usize(..6)];
    let pattern = match rng.u8(..3) {
        0 => AccessPattern::Seq,
        1 => AccessPattern::Random,
        _ => AccessPattern::Hot { hot_pages_pct: rng.u8(1..=30), hot_access_pct: rng.u8(50..=99) },
    };
    let address_spaces = if rng.bool() { 1 } else { rng.u16(2..=6) };
    let guest_pages = guest_mib << 8;
    let max_mmu_pages = if rng.u8(..3) == 0 {
        // Tight: well below what the map needs, so the shrinker runs.
        Some((guest_pages as usize / 512 * usize::from(address_spaces) / 2).max(64))
    } else {
        None
    };
    let max_ms = max_duration.as_millis().max(200) as u64;
    let mut cfg = RunConfig {
        mmu: MmuDesign::ALL[rng.usize(..MmuDesign::ALL.len())],
        fast_page_fault: rng.u8(..4) != 0,
        relog_every: if rng.u8(..4) == 0 { Some(rng.u64(2..=10)) } else { None },
        vcpus,
        guest_bytes: guest_mib << 20,
        duration: Duration::from_millis(rng.u64(max_ms / 4..=max_ms)),
        max_collections: None,
        interval: Duration::from_millis(rng.u64(1..=40)),
        warmup: Duration::from_millis(rng.u64(0..=300)),
        workload: WorkloadSpec {
            pattern,
            write_pct: [100, 100, 90, 50, 10][rng.usize(..5)],
            address_spaces,
            switch_every: rng.u32(64..=8192),
            exit_each_pass: rng.bool(),
            seed: rng.u64(..),
            lock_faults: LockFaults::default(),
            compute_vcpus: 0,
        },
        max_mmu_pages,
        tlb_entries: [1, 64, 1 << 10, 1 << 12][rng.usize(..4)],
        large_pages: rng.u8(..4) != 0,
        slot_churn: rng.bool(),
        slots: if rng.u8(..3) == 0 { [2, 4][rng.usize(..2)] } else { 1 },
        invalidate_every: rng.bool().then(|| Duration::from_micros(rng.u64(100..=5000))),
        max_free_shadow_pages: if rng.bool() { Some(rng.usize(0..64)) } else { None },
        // Drawn last, so that the fields above stay what earlier seeds gave.
        harvest: match rng.u8(..3) {
            0 => HarvestSpec { harvest_threads: rng.u32(1..=4), ..HarvestSpec::default() },
            1 => HarvestSpec {
                interface: DirtyLogInterface::Clear,
                clear_chunk_pages: 64 << rng.u32(0..=12),
                initially_set: rng.bool(),
                harvest_threads: rng.u32(1..=4),
                ..HarvestSpec::default()
            },
            _ => HarvestSpec {
                interface: DirtyLogInterface::Ring,
                ring_entries: 256 << rng.u32(0..=8),
                harvest_threads: rng.u32(1..=4),
                ..HarvestSpec::default()
            },
        },
        eager_page_split: rng.u8(..4) != 0,
        // Not drawn: PML's ring reserve (576 entries) is above the smaller
        // rings drawn above; the every-design tests run it.
        pml: false,
        #[cfg(feature = "break-rules")]
        breakage: shadow_mmu_core::breakage::Breakage::default(),
    };
    // Drawn after everything else, for the same reason.
    if rng.u8(..3) == 0 {
        let mut rate = || [0, 1_000, 20_000, 100_000][rng.usize(..4)];
        cfg.workload.lock_faults =
            LockFaults { fresh_per_sec: rate(), split_per_sec: rate(), invalidations_per_sec: rate() };
    }
    cfg
}

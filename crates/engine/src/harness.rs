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
//! With `slot_churn`, a second memslot (slot 1, above guest memory) is
//! deleted and re-added over and over by another thread during all of this,
//! while an extra vCPU writes to it (and takes MMIO exits while it is gone):
//! deletions zap sptes under the same shadow pages, in the same rmaps' pools,
//! as the harvest of slot 0.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::audit::{AuditOptions, AuditReport};
use crate::dirty_bitmap::bitmap_words;
use crate::dirty_log::DirtyLogError;
use crate::memory::{HostMemory, MemoryError};
use crate::memslot::{MemFlags, MemslotError, UserMemoryRegion};
use crate::mmu::MmuDesign;
use crate::oracle::{CollectStats, LostWrite, Oracle};
use crate::spte::PAGE_SIZE;
use crate::vcpu::tlb::DEFAULT_TLB_ENTRIES;
use crate::vcpu::{VcpuExit, VcpuStats};
use crate::vm::{Vm, VmConfig, VmError, VmStats};
use crate::workload::{
    AccessPattern, GuestControl, HC_PASS_DONE, HC_STOP, MAX_WORKLOAD_VCPUS, WorkloadGuest, WorkloadSpec,
};

/// A run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunConfig {
    /// Dirty logging design.
    pub mmu: MmuDesign,
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
    /// Delete and re-add a second memslot during the run (module docs).
    pub slot_churn: bool,
    /// Freed shadow pages kept for reuse (the rest go back to the system
    /// after a grace period); `None`: the VM's default.
    pub max_free_shadow_pages: Option<usize>,
    /// Rules to break (tests only).
    #[cfg(feature = "break-rules")]
    pub breakage: crate::breakage::Breakage,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            mmu: MmuDesign::Locked,
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
            slot_churn: false,
            max_free_shadow_pages: None,
            #[cfg(feature = "break-rules")]
            breakage: crate::breakage::Breakage::default(),
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
    /// The audit after the vCPUs stopped.
    pub audit: AuditReport,
    /// vCPU errors, unexpected exits, audit failures.
    pub errors: Vec<String>,
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
        let bad = |m: String| Err(HarnessError::BadConfig(m));
        if self.vcpus == 0 || self.vcpus > MAX_WORKLOAD_VCPUS {
            return bad(format!("vcpus must be 1..={MAX_WORKLOAD_VCPUS}, not {}", self.vcpus));
        }
        if self.guest_bytes == 0 || !self.guest_bytes.is_multiple_of(PAGE_SIZE) {
            return bad(format!("guest size {:#x} is not a non-zero multiple of 4096", self.guest_bytes));
        }
        if self.guest_bytes / PAGE_SIZE < u64::from(self.vcpus) {
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
        Ok(())
    }
}

type VcpuResult = (VcpuStats, Vec<String>);

/// Stops the vCPU threads when dropped, so that an error return never leaves
/// them running.
struct Vcpus {
    ctl: Arc<GuestControl>,
    threads: Vec<JoinHandle<VcpuResult>>,
}

impl Vcpus {
    fn stop(&mut self) -> (VcpuStats, Vec<String>) {
        self.ctl.request_stop();
        let mut stats = VcpuStats::default();
        let mut errors = Vec::new();
        for t in self.threads.drain(..) {
            match t.join() {
                Ok((s, e)) => {
                    stats += s;
                    errors.extend(e);
                }
                Err(_) => errors.push("a vCPU thread panicked".to_string()),
            }
        }
        (stats, errors)
    }
}

impl Drop for Vcpus {
    fn drop(&mut self) {
        self.stop();
    }
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
                        Ok(other) => {
                            errors.push(format!("vCPU {id}: unexpected exit {other:?}"));
                            break;
                        }
                        Err(e) => {
                            errors.push(format!("vCPU {id}: {e}"));
                            break;
                        }
                    }
                }
                // A vCPU that stopped on an error must not hold up cuts.
                ctl.park(id);
                (vcpu.stats(), errors)
            })
            .expect("spawning a vCPU thread");
        vcpus.threads.push(t);
    }
    Ok(vcpus)
}

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

impl crate::guest::GuestCode for ChurnGuest {
    fn next_op(&mut self, _: u64) -> crate::guest::GuestOp {
        // Relaxed: the host joins this thread after setting the flag.
        if self.stop.load(std::sync::atomic::Ordering::Relaxed) {
            return crate::guest::GuestOp::Hypercall(HC_STOP);
        }
        let gfn = self.base_gfn + self.rng.u64(..self.pages);
        crate::guest::GuestOp::Write(gfn << crate::spte::PAGE_SHIFT, self.rng.u64(..))
    }
}

/// The churn of slot 1: an extra vCPU writing to it, and a thread deleting
/// and re-adding it. Stopped and joined by `stop`, or when dropped (an error
/// return).
struct Churn {
    stop: Arc<std::sync::atomic::AtomicBool>,
    vcpu: Option<JoinHandle<Vec<String>>>,
    churner: Option<JoinHandle<Result<u64, MemslotError>>>,
}

impl Churn {
    fn start(vm: &Vm, cfg: &RunConfig, seed: u64) -> Result<Self, HarnessError> {
        let base = cfg.guest_bytes.next_multiple_of(2 << 20) + (2 << 20);
        let mem = HostMemory::anonymous(CHURN_SLOT_BYTES)?;
        let region = UserMemoryRegion {
            slot: 1,
            flags: MemFlags::empty(),
            guest_phys_addr: base,
            memory_size: CHURN_SLOT_BYTES,
            memory: Some(mem),
            memory_offset: 0,
        };
        vm.set_user_memory_region(region.clone())?;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut vcpu = vm.create_vcpu(cfg.vcpus)?;
        let mut guest = ChurnGuest {
            base_gfn: base >> crate::spte::PAGE_SHIFT,
            pages: CHURN_SLOT_BYTES / PAGE_SIZE,
            rng: fastrand::Rng::with_seed(seed),
            stop: stop.clone(),
        };
        let vcpu = std::thread::spawn(move || {
            let mut errors = Vec::new();
            loop {
                match vcpu.run(&mut guest) {
                    Ok(VcpuExit::Hypercall(HC_STOP)) => break,
                    Ok(VcpuExit::Mmio { .. }) => continue,
                    Ok(other) => errors.push(format!("churn vCPU: unexpected exit {other:?}")),
                    Err(e) => errors.push(format!("churn vCPU: {e}")),
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
                vm2.delete_memory_region(1)?;
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
            Some(Err(_)) => report.errors.push("the churn vCPU thread panicked".into()),
            None => {}
        }
        match self.churner.take().map(JoinHandle::join) {
            Some(Ok(Ok(cycles))) => report.slot_churn_cycles = cycles,
            Some(Ok(Err(e))) => report.errors.push(format!("slot churn: {e}")),
            Some(Err(_)) => report.errors.push("the slot churn thread panicked".into()),
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
    let vm = Vm::new(VmConfig {
        mmu: cfg.mmu,
        max_mmu_pages: cfg.max_mmu_pages,
        address_spaces: cfg.workload.address_spaces,
        tlb_entries: cfg.tlb_entries,
        large_pages: cfg.large_pages,
        max_free_shadow_pages: cfg.max_free_shadow_pages.unwrap_or(VmConfig::default().max_free_shadow_pages),
        #[cfg(feature = "break-rules")]
        breakage: cfg.breakage,
        ..VmConfig::default()
    })?;
    let mem = HostMemory::anonymous(cfg.guest_bytes)?;
    vm.set_user_memory_region(UserMemoryRegion {
        slot: 0,
        flags: MemFlags::empty(),
        guest_phys_addr: 0,
        memory_size: cfg.guest_bytes,
        memory: Some(mem.clone()),
        memory_offset: 0,
    })?;
    let npages = cfg.guest_bytes / PAGE_SIZE;
    let ctl = GuestControl::new(cfg.vcpus);
    let mut vcpus = spawn_vcpus(&vm, cfg, npages, &ctl)?;
    let churn = if cfg.slot_churn { Some(Churn::start(&vm, cfg, cfg.workload.seed)?) } else { None };
    std::thread::sleep(cfg.warmup);

    let mut report = RunReport::default();
    let mut oracle = Oracle::new(0, npages);
    let mut bitmap = vec![0u64; bitmap_words(npages)];

    // Collection 0: enable dirty logging, bulk copy.
    ctl.cut();
    let start = Instant::now();
    vm.enable_dirty_logging(0)?;
    report.enable_logging_ns = start.elapsed().as_nanos() as u64;
    oracle.full_copy(mem.words());

    let accumulate = |report: &mut RunReport, st: &CollectStats| {
        report.harvested_pages += st.dirty_pages;
        report.dirty_unchanged += st.dirty_unchanged;
        report.lost_pages += st.lost_pages;
        report.stray_bits += st.stray_bits;
    };
    while start.elapsed() < cfg.duration && cfg.max_collections.is_none_or(|m| report.collections < m) {
        std::thread::sleep(cfg.interval);
        let cut = ctl.cut();
        let t0 = Instant::now();
        vm.get_dirty_log(0, &mut bitmap)?;
        report.get_dirty_log_ns.push(t0.elapsed().as_nanos() as u64);
        let st = oracle.collect(mem.words(), &bitmap, cut);
        on_collection(report.collections, &st);
        report.collections += 1;
        accumulate(&mut report, &st);
        if st.lost_pages > 0 || st.stray_bits > 0 {
            break;
        }
    }

    let (vcpu_stats, errors) = vcpus.stop();
    report.vcpu = vcpu_stats;
    report.errors = errors;
    if let Some(churn) = churn {
        churn.stop(&mut report);
    }
    match vm.audit(AuditOptions { dirty_log: true }) {
        Ok(a) => report.audit = a,
        Err(e) => report.errors.push(format!("MMU audit: {e}")),
    }
    let t0 = Instant::now();
    vm.get_dirty_log(0, &mut bitmap)?;
    report.get_dirty_log_ns.push(t0.elapsed().as_nanos() as u64);
    let st = oracle.finish(mem.words(), &bitmap);
    accumulate(&mut report, &st);
    report.elapsed = start.elapsed();
    report.lost = oracle.lost().to_vec();
    report.vm = vm.stats();
    Ok(report)
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
    RunConfig {
        mmu: MmuDesign::ALL[rng.usize(..MmuDesign::ALL.len())],
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
        },
        max_mmu_pages,
        tlb_entries: [1, 64, 1024, 4096][rng.usize(..4)],
        large_pages: rng.u8(..4) != 0,
        slot_churn: rng.bool(),
        max_free_shadow_pages: if rng.bool() { Some(rng.usize(0..64)) } else { None },
        #[cfg(feature = "break-rules")]
        breakage: crate::breakage::Breakage::default(),
    }
}

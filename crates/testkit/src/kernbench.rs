//! `kernbench`: the seed's no-regression claim, as a fault-heavy workload
//! with dirty logging off.
//!
//! The seed ran kernbench in a 12-vCPU guest under shadow paging and saw no
//! change. What a kernel compile asks of the MMU is faults: processes come
//! and go, memory is faulted in, the host reclaims and migrates pages behind
//! the guest (mmu notifier invalidations), and the shadow page budget is
//! always full, so the shrinker zaps pages as fast as faults build them.
//! Here, for the run's duration:
//! - each vCPU runs its guest program: a sweep over its slice of guest
//!   memory ([`Workload::Sweep`]), or a replay of a recorded page-access trace
//!   of a real program ([`Workload::Replay`]) over and over, as a kernel
//!   build runs one compiler process after another: guest memory is cut into
//!   as many copies of the trace's pages as fit, each lap of the trace runs
//!   in the next copy along (a new process in memory an old one left), and
//!   vCPUs start in different copies;
//! - a host thread plays the mmu notifier: every `invalidate_every` it
//!   invalidates a random 2 MiB of guest memory, whose pages then fault in
//!   again;
//! - the shadow page budget is `max_mmu_pages`, far below what the guest's
//!   map needs.
//!
//! The figure is guest accesses (loads and stores) completed per second, the
//! stand-in for kernbench's compile time. Nothing is oracle-checked here: no
//! slot logs dirty pages.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::harness::HarnessError;
use shadow_mmu_core::spte::{PAGE_SHIFT, PAGE_SIZE};
use shadow_mmu_engine::backend::vm_with_memory;
use shadow_mmu_engine::guest::{GuestCode, GuestOp};
use shadow_mmu_engine::mmu::MmuDesign;
use shadow_mmu_engine::notifier_thread::{Invalidations, MmuNotifierThread};
use shadow_mmu_engine::passes::Sweepers;
use shadow_mmu_engine::vcpu::{VcpuExit, VcpuStats};
use shadow_mmu_engine::vm::VmConfig;
use shadow_mmu_engine::workload::{GuestControl, HC_STOP, WorkloadGuest, WorkloadSpec};

/// Bytes each invalidation covers: one 2 MiB region, as THP collapse or a
/// reclaim batch would.
pub const INVALIDATE_BYTES: u64 = 2 << 20;

/// What the vCPUs run.
#[derive(Debug, Clone)]
pub enum Workload {
    /// Each vCPU sweeps its slice of guest memory, one store per page.
    Sweep,
    /// Each vCPU replays a page-level trace: entries `page << 1 | write`,
    /// pages dense from 0 to `pages`.
    Replay {
        /// The trace's entries.
        entries: Arc<[u32]>,
        /// Distinct pages in the trace.
        pages: u32,
    },
}

/// A kernbench run.
#[derive(Debug, Clone)]
pub struct KernbenchConfig {
    /// Design.
    pub mmu: MmuDesign,
    /// `fast_page_fault` on (`VmConfig::fast_page_fault`).
    pub fast_page_fault: bool,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest memory. A replay needs room for one copy of the trace's pages
    /// per vCPU.
    pub guest_bytes: u64,
    /// The guest program.
    pub workload: Workload,
    /// Shadow page budget (`KVM_SET_NR_MMU_PAGES`).
    pub max_mmu_pages: usize,
    /// Interval between two invalidations; `None`: no notifier.
    pub invalidate_every: Option<Duration>,
    /// Measured duration.
    pub duration: Duration,
    /// Seed of the random choices.
    pub seed: u64,
}

/// What a kernbench run measured.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct KernbenchRun {
    /// Guest accesses per second, all vCPUs together.
    pub ops_per_sec: f64,
    /// Page faults per second.
    pub faults_per_sec: f64,
    /// Invalidations the notifier made.
    pub invalidations: u64,
    /// Shadow pages the shrinker zapped.
    pub sp_shrunk: u64,
    /// Guest bytes.
    pub guest_bytes: u64,
}

/// A replaying vCPU: walks the trace, mapping trace page `p` to guest page
/// `copy * pages + p`; one 8-byte access per entry, at a word that moves
/// with the entry index so a page's accesses spread over it. At the end of
/// the trace it moves `stride` copies on and starts again.
struct ReplayGuest {
    entries: Arc<[u32]>,
    pages: u64,
    pos: usize,
    copy: u64,
    copies: u64,
    stride: u64,
    stop: Arc<AtomicBool>,
}

impl GuestCode for ReplayGuest {
    fn next_op(&mut self, _last_read: u64) -> GuestOp {
        // Relaxed: a stop request needs no ordering; the host joins the thread.
        if self.stop.load(Ordering::Relaxed) {
            return GuestOp::Hypercall(HC_STOP);
        }
        let e = self.entries[self.pos];
        let gfn = self.copy * self.pages + u64::from(e >> 1);
        let gpa = (gfn << PAGE_SHIFT) | ((self.pos as u64 % 512) * 8);
        self.pos += 1;
        if self.pos == self.entries.len() {
            self.pos = 0;
            self.copy = (self.copy + self.stride) % self.copies;
        }
        if e & 1 == 1 { GuestOp::Write(gpa, self.pos as u64) } else { GuestOp::Read(gpa) }
    }
}

/// Runs one kernbench configuration.
pub fn kernbench(cfg: &KernbenchConfig) -> Result<KernbenchRun, HarnessError> {
    let guest_bytes = cfg.guest_bytes;
    if let Workload::Replay { entries, pages } = &cfg.workload {
        if entries.is_empty() || entries.iter().any(|e| e >> 1 >= *pages) {
            return Err(HarnessError::BadConfig("the trace is empty or names a page past its count".into()));
        }
        if guest_bytes / PAGE_SIZE / u64::from(*pages) < u64::from(cfg.vcpus) {
            return Err(HarnessError::BadConfig(format!(
                "{guest_bytes} bytes of guest memory do not hold a copy of the trace's {pages} pages per vCPU"
            )));
        }
    }
    if cfg.vcpus == 0
        || guest_bytes / PAGE_SIZE < u64::from(cfg.vcpus)
        || !guest_bytes.is_multiple_of(PAGE_SIZE)
    {
        return Err(HarnessError::BadConfig(format!("{} vCPUs on {guest_bytes} bytes", cfg.vcpus)));
    }
    let config = VmConfig {
        mmu: cfg.mmu,
        fast_page_fault: cfg.fast_page_fault,
        large_pages: false,
        max_mmu_pages: Some(cfg.max_mmu_pages),
        ..VmConfig::default()
    };
    let (vm, _mem) = vm_with_memory(config, guest_bytes, true)?;
    let npages = guest_bytes / PAGE_SIZE;
    let ctl = GuestControl::new(cfg.vcpus);
    let stop = Arc::new(AtomicBool::new(false));
    let spec = WorkloadSpec { seed: cfg.seed, ..WorkloadSpec::default() };
    let mut threads = Vec::new();
    let stats0 = vm.stats();
    let t0 = Instant::now();
    for id in 0..cfg.vcpus {
        let mut vcpu = vm.create_vcpu(id)?;
        let mut guest: Box<dyn GuestCode + Send> = match &cfg.workload {
            Workload::Sweep => Box::new(WorkloadGuest::new(spec, id, cfg.vcpus, 0, npages, ctl.clone())),
            Workload::Replay { entries, pages } => Box::new(ReplayGuest {
                entries: entries.clone(),
                pages: u64::from(*pages),
                pos: 0,
                copy: u64::from(id),
                copies: npages / u64::from(*pages),
                stride: u64::from(cfg.vcpus),
                stop: stop.clone(),
            }),
        };
        threads.push(std::thread::spawn(move || -> Result<VcpuStats, String> {
            match vcpu.run(&mut *guest) {
                Ok(VcpuExit::Hypercall(HC_STOP)) => Ok(vcpu.stats()),
                Ok(other) => Err(format!("vCPU {id}: unexpected exit {other:?}")),
                Err(e) => Err(format!("vCPU {id}: {e}")),
            }
        }));
    }
    let notifier = cfg.invalidate_every.map(|every| {
        let what = Invalidations {
            gpa: 0,
            bytes: guest_bytes,
            range_bytes: INVALIDATE_BYTES,
            per_sec: 1.0 / every.as_secs_f64(),
            seed: cfg.seed,
        };
        MmuNotifierThread::start(&vm, what)
    });
    std::thread::sleep(cfg.duration);
    let invalidations = match notifier.map(MmuNotifierThread::stop).transpose() {
        Ok(n) => n.unwrap_or(0),
        Err(e) => return Err(HarnessError::BadConfig(e.to_string())),
    };
    ctl.request_stop();
    // Relaxed: see `ReplayGuest::next_op`.
    stop.store(true, Ordering::Relaxed);
    let mut total = VcpuStats::default();
    for t in threads {
        total += t
            .join()
            .map_err(|_| HarnessError::BadConfig("a vCPU thread panicked".into()))?
            .map_err(HarnessError::BadConfig)?;
    }
    // The vCPUs stop within one access of the request: the window is the
    // measured time up to the request.
    let secs = t0.elapsed().as_secs_f64();
    let stats = vm.stats();
    Ok(KernbenchRun {
        ops_per_sec: (total.reads + total.writes) as f64 / secs,
        faults_per_sec: total.page_faults as f64 / secs,
        invalidations,
        sp_shrunk: stats.mmu.sp_shrunk - stats0.mmu.sp_shrunk,
        guest_bytes,
    })
}

/// What [`populate`] measured.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Populate {
    /// From the release to the last vCPU's last first touch, ns.
    pub ns: u64,
    /// The slow faults' waits for `mmu_lock`, all vCPUs: (read, write), ns.
    pub lock_wait_ns: (u64, u64),
    /// Slow faults that took `mmu_lock` for read, and for write.
    pub fault_locks: (u64, u64),
}

/// `vcpus` vCPUs populate a fresh guest of `guest_bytes` in parallel, each
/// its own slice, one store per page, with 4 KiB mappings (every store a
/// slow fault): `dirty_log_perf_test`'s "populate memory time". The shadow
/// MMU designs' faults take `mmu_lock` for write, one at a time; the TDP
/// design's take it for read, side by side (Gardon's parallel faults).
pub fn populate(design: &VmConfig, vcpus: u32, guest_bytes: u64) -> Result<Populate, HarnessError> {
    let config = VmConfig { large_pages: false, ..design.clone() };
    let (vm, _mem) = vm_with_memory(config, guest_bytes, true)?;
    let spec = WorkloadSpec { exit_each_pass: true, ..WorkloadSpec::default() };
    let mut sweepers = Sweepers::start(&vm, vcpus, guest_bytes / PAGE_SIZE, spec, 0, None)?;
    let t0 = Instant::now();
    sweepers.release(1);
    sweepers.wait_passes(&vec![0; vcpus as usize], &mut || {});
    let ns = t0.elapsed().as_nanos() as u64;
    let swept = sweepers.stop()?;
    let loss: shadow_mmu_vmm::VcpuLoss = swept.losses.iter().map(|(l, _)| *l).sum();
    let waits = (loss.mmu_lock_read_wait_ns, loss.mmu_lock_write_wait_ns);
    let s = vm.stats();
    Ok(Populate {
        ns,
        lock_wait_ns: waits,
        fault_locks: (s.mmu.fault_mmu_lock_reads, s.mmu.fault_mmu_lock_writes),
    })
}

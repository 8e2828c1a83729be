//! Software vCPUs.
//!
//! A [`Vcpu`] is driven by one OS thread calling [`Vcpu::run`]. It executes a
//! guest program's accesses in guest mode: TLB lookup, else a walk of the
//! shadow page tables (what the hardware page walker does), else a VM exit
//! to the page fault handler. Every access ends as a real load or store in
//! the host memory that backs the guest page.
//!
//! The remote TLB flush protocol, and the modes it relies on, are in
//! [`requests`]; the TLB is in [`tlb`].
//!
//! Invariants:
//! - the vCPU is in guest mode exactly while it may use TLB entries, walk
//!   shadow page tables or touch guest memory for the guest;
//! - it checks its requests at every access boundary and before every entry
//!   to guest mode;
//! - it never blocks in guest mode: before it waits for `mmu_lock` (or
//!   anything else) it leaves guest mode, so a flusher holding `mmu_lock`
//!   never waits for a vCPU waiting for `mmu_lock`.

pub(crate) mod pml;
pub use shadow_mmu_core::requests;
pub mod tlb;

use std::sync::Arc;
use std::time::Instant;

use thiserror::Error;

use crate::guest::{GuestCode, GuestOp};
use crate::memory::host_word;
use crate::mmu::MmuCaches;
use crate::mmu::fault::{FaultExit, PageFault};
use crate::mmu::walk::InGuestMode;
use crate::shadow_page::SpPtr;
use crate::vm::Kvm;
use requests::{KVM_REQ_TLB_FLUSH, VcpuShared};
use shadow_mmu_core::spte::{
    PAGE_SHIFT, PT_DIRTY_MASK, PT64_ROOT_LEVEL, is_last_spte, is_shadow_present_pte, is_writable_pte,
    pages_per_spte, spte_index, spte_to_pfn,
};
use shadow_mmu_core::stats::Counter;
use shadow_mmu_core::sync::atomic::Ordering;
use shadow_mmu_vmm::VcpuLoss;
use tlb::{Tlb, Translation};

/// Why [`Vcpu::run`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuExit {
    /// The guest made a hypercall (`KVM_EXIT_HYPERCALL`).
    Hypercall(u64),
    /// The guest accessed an address no memslot backs, or wrote to a
    /// read-only slot (`KVM_EXIT_MMIO`). Running again continues with the
    /// next operation, as if userspace had emulated this one.
    Mmio {
        /// Guest physical address.
        gpa: u64,
        /// Was it a store?
        write: bool,
        /// The stored value (0 for a load).
        value: u64,
    },
    /// A kick ([`crate::Vm::kick_vcpus`]): the run returned to userspace
    /// at an access boundary, every access before it complete
    /// (`KVM_EXIT_INTR`). Running again goes on with the next operation.
    Intr,
    /// The vCPU's dirty ring reached its soft limit
    /// (`KVM_EXIT_DIRTY_RING_FULL`): harvest and reset the rings, then run
    /// again. Until then every run exits at once with this.
    DirtyRingFull,
    /// The guest wrote to a write-tracked page ([`crate::Vm::track_write`]);
    /// the store did not happen. Userspace emulates it (or not), then runs
    /// again.
    WriteTracked {
        /// Guest physical address.
        gpa: u64,
        /// The value the guest stored.
        value: u64,
    },
}

/// A guest operation the vCPU cannot execute.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum VcpuError {
    /// Accesses are 8 bytes, 8-aligned.
    #[error("guest access at {0:#x} is not 8-byte aligned")]
    Unaligned(u64),
    /// The address space does not exist.
    #[error("address space {asid} does not exist (the VM has {max})")]
    BadAddressSpace {
        /// Asked for.
        asid: u16,
        /// Configured.
        max: u16,
    },
}

/// Counters of one vCPU, kept by its thread.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VcpuStats {
    /// Guest loads executed.
    pub reads: u64,
    /// Guest stores executed.
    pub writes: u64,
    /// Accesses served by the TLB.
    pub tlb_hits: u64,
    /// Walks of the shadow page tables.
    pub page_walks: u64,
    /// Page faults handled.
    pub page_faults: u64,
    /// ... of which on stores.
    pub write_faults: u64,
    /// Nanoseconds spent handling page faults.
    pub fault_ns: u64,
    /// TLB flush requests handled.
    pub tlb_flushes: u64,
    /// MMIO exits.
    pub mmio_exits: u64,
    /// `DirtyRingFull` exits.
    pub dirty_ring_full_exits: u64,
    /// PML-full exits (`VmConfig::pml`).
    pub pml_full_exits: u64,
    /// Entries drained from the PML log.
    pub pml_entries_drained: u64,
}

impl std::ops::AddAssign for VcpuStats {
    fn add_assign(&mut self, o: Self) {
        self.reads += o.reads;
        self.writes += o.writes;
        self.tlb_hits += o.tlb_hits;
        self.page_walks += o.page_walks;
        self.page_faults += o.page_faults;
        self.write_faults += o.write_faults;
        self.fault_ns += o.fault_ns;
        self.tlb_flushes += o.tlb_flushes;
        self.dirty_ring_full_exits += o.dirty_ring_full_exits;
        self.mmio_exits += o.mmio_exits;
        self.pml_full_exits += o.pml_full_exits;
        self.pml_entries_drained += o.pml_entries_drained;
    }
}

/// What a vCPU lost to the host's work so far, live: bumped by its thread
/// (and by the thread that runs it, for waits outside `Vcpu::run`), read by
/// anyone (a migration, per round). Relaxed counters, each in its own line
/// (`shadow_mmu_core::stats`): bumped only when something was lost, so a
/// fault that waited for nothing costs no atomic.
#[derive(Debug, Default)]
pub struct VcpuLossCounters {
    /// ns waiting for `mmu_lock` for read, in page faults.
    pub mmu_lock_read_wait_ns: Counter,
    /// ... for write.
    pub mmu_lock_write_wait_ns: Counter,
    /// Of those, ns of waits that began behind a harvest.
    pub harvest_lock_wait_ns: Counter,
    /// ns handling remote TLB flush requests.
    pub tlb_flush_ns: Counter,
    /// ns held out of the guest by a throttle or a pause (the thread that
    /// runs the vCPU adds it).
    pub throttle_ns: Counter,
    /// ns waiting for a full dirty ring to be reaped (likewise).
    pub ring_full_ns: Counter,
}

impl VcpuLossCounters {
    /// The counters now.
    pub fn snapshot(&self) -> VcpuLoss {
        VcpuLoss {
            mmu_lock_read_wait_ns: self.mmu_lock_read_wait_ns.get(),
            mmu_lock_write_wait_ns: self.mmu_lock_write_wait_ns.get(),
            harvest_lock_wait_ns: self.harvest_lock_wait_ns.get(),
            tlb_flush_ns: self.tlb_flush_ns.get(),
            throttle_ns: self.throttle_ns.get(),
            ring_full_ns: self.ring_full_ns.get(),
        }
    }
}

/// A probe that sees every page fault of one vCPU, for benchmarks (the
/// fault latency histograms of `bench migrate-perf`). It runs on the vCPU's
/// thread, outside guest mode.
pub trait FaultObserver: std::any::Any + Send {
    /// A page fault exits guest mode.
    fn fault_begin(&mut self);
    /// The vCPU is back in guest mode, `ns` after the exit: the fault's
    /// latency as the guest sees it, including waits for `mmu_lock` (of
    /// which `lock_wait_ns`) and the requests handled on entry.
    fn fault_end(&mut self, write: bool, ns: u64, lock_wait_ns: (u64, u64));
}

/// A vCPU (the `kvm_vcpu` of one thread). Create with
/// [`crate::Vm::create_vcpu`], move to a thread, call [`Vcpu::run`].
pub struct Vcpu {
    kvm: Arc<Kvm>,
    shared: Arc<VcpuShared>,
    tlb: Tlb,
    caches: MmuCaches,
    asid: u16,
    stats: VcpuStats,
    observer: Option<Box<dyn FaultObserver>>,
    /// What it lost, live.
    loss: Arc<VcpuLossCounters>,
    /// This vCPU's dirty ring, when the ring is on.
    ring: Option<Arc<crate::dirty_ring::VcpuRing>>,
    /// A fault filled the ring to its soft limit: exit at the next access
    /// boundary.
    ring_full: bool,
    /// A kick was taken on entry: exit at the next access boundary.
    exit_pending: bool,
    /// The PML log, with `VmConfig::pml`.
    pml: Option<pml::PmlLog>,
}

impl std::fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vcpu").field("id", &self.id()).field("asid", &self.asid).finish()
    }
}

enum Stop {
    Exit(VcpuExit),
    Error(VcpuError),
}

/// What the page walk found.
enum Walk {
    Hit(Translation),
    /// A page fault; `present`: on a present, read-only leaf.
    Fault {
        present: bool,
    },
    /// A store that would set a D bit with the PML log full.
    PmlFull,
}

impl Vcpu {
    pub(crate) fn new(
        kvm: Arc<Kvm>,
        shared: Arc<VcpuShared>,
        ring: Option<Arc<crate::dirty_ring::VcpuRing>>,
    ) -> Self {
        let tlb = Tlb::new(kvm.config.tlb_entries);
        Self {
            shared,
            tlb,
            caches: MmuCaches::default(),
            asid: 0,
            stats: VcpuStats::default(),
            observer: None,
            loss: Arc::default(),
            ring,
            ring_full: false,
            exit_pending: false,
            pml: kvm.mmu.tdp.pml.then(pml::PmlLog::new),
            kvm,
        }
    }

    /// Installs (or with `None` removes) a probe that sees every page fault;
    /// returns the previous one.
    pub fn set_fault_observer(
        &mut self,
        observer: Option<Box<dyn FaultObserver>>,
    ) -> Option<Box<dyn FaultObserver>> {
        std::mem::replace(&mut self.observer, observer)
    }

    /// Is this vCPU's dirty ring at its soft limit (a run would exit at once
    /// with `DirtyRingFull`)? What a VMM computes from the indices of the
    /// ring it maps; false without the ring.
    pub fn dirty_ring_full(&self) -> bool {
        self.ring.as_ref().is_some_and(|r| r.ring.soft_full())
    }

    /// The vCPU id.
    pub fn id(&self) -> u32 {
        self.shared.id()
    }

    /// Reaps this vCPU's own dirty ring, as QEMU's vCPU thread does at a
    /// ring-full exit under a dirty-limit (`kvm_dirty_ring_reap_one`, then
    /// `KVM_RESET_DIRTY_RINGS`, which resets what any harvester marked):
    /// `f(slot, offset)` for each entry pushed since the last harvest, in
    /// order. Returns the ring's entries harvested so far, by any harvester
    /// (wrapping): the vCPU's dirty pages.
    pub fn reap_own_dirty_ring(&self, f: impl FnMut(u32, u64)) -> Result<u32, crate::DirtyRingError> {
        let ring = self.ring.as_ref().ok_or(crate::DirtyRingError::NotEnabled)?;
        self.kvm.harvest_dirty_ring(self.id(), f)?;
        self.kvm.reset_dirty_rings()?;
        Ok(ring.ring.harvested())
    }

    /// What it has lost so far, live (the thread that runs it adds its own
    /// waits: throttle, ring full).
    pub fn loss_counters(&self) -> Arc<VcpuLossCounters> {
        self.loss.clone()
    }

    /// Counters so far.
    pub fn stats(&self) -> VcpuStats {
        self.stats
    }

    /// The current address space.
    pub fn address_space(&self) -> u16 {
        self.asid
    }

    /// `KVM_RUN`: executes `guest` until it makes a hypercall or an access
    /// exits to userspace.
    pub fn run<G: GuestCode + ?Sized>(&mut self, guest: &mut G) -> Result<VcpuExit, VcpuError> {
        // `kvm_dirty_ring_check_request` on entry: still soft-full, exit.
        self.ring_full = self.ring.as_ref().is_some_and(|r| r.ring.soft_full());
        if self.ring_full {
            self.stats.dirty_ring_full_exits += 1;
            return Ok(VcpuExit::DirtyRingFull);
        }
        self.enter_guest();
        let mut last_read = 0;
        let stop = loop {
            if self.ring_full {
                // The access that filled the ring is complete.
                self.stats.dirty_ring_full_exits += 1;
                break Stop::Exit(VcpuExit::DirtyRingFull);
            }
            // The access boundary: take pending requests (the IPI).
            if self.shared.pending_requests() != 0 {
                // Drained before we leave guest mode: a GET's kick that
                // sees us out (or acked) sees the drain done (pml.rs).
                self.flush_pml_buffer();
                self.shared.exit_guest_mode();
                self.enter_guest();
            }
            if std::mem::take(&mut self.exit_pending) {
                // A kick: every access before this boundary is complete.
                break Stop::Exit(VcpuExit::Intr);
            }
            match guest.next_op(last_read) {
                GuestOp::Read(gpa) => match self.access(gpa, false, 0) {
                    Ok(v) => last_read = v,
                    Err(stop) => break stop,
                },
                GuestOp::Write(gpa, value) => {
                    if let Err(stop) = self.access(gpa, true, value) {
                        break stop;
                    }
                }
                GuestOp::SetAddressSpace(asid) => {
                    let max = self.kvm.mmu.address_spaces();
                    if asid >= max {
                        break Stop::Error(VcpuError::BadAddressSpace { asid, max });
                    }
                    self.asid = asid;
                    self.tlb.flush();
                }
                GuestOp::Hypercall(code) => break Stop::Exit(VcpuExit::Hypercall(code)),
            }
        };
        self.flush_pml_buffer();
        self.shared.exit_guest_mode();
        match stop {
            Stop::Exit(e) => Ok(e),
            Stop::Error(e) => Err(e),
        }
    }

    /// `vmx_flush_pml_buffer`: marks every page in the PML log dirty, in
    /// write order (pml.rs). Runs at every exit, before the vCPU leaves
    /// guest mode.
    fn flush_pml_buffer(&mut self) {
        let Some(log) = self.pml.as_mut() else { return };
        let (kvm, ring) = (&self.kvm, self.ring.as_deref().map(|r| &r.ring));
        let slots = kvm.memslots.load();
        let n = log.drain(|gfn| {
            // `kvm_vcpu_mark_page_dirty`: only where the slot logs.
            if let Some(slot) = slots.find(gfn)
                && slot.dirty_logging()
            {
                kvm.mark_page_dirty_in_slot(slot, gfn, ring);
            }
        });
        self.stats.pml_entries_drained += n as u64;
        self.ring_full |= ring.is_some_and(|r| r.soft_full());
    }

    /// Handles requests outside guest mode, then enters guest mode with none
    /// pending (`vcpu_enter_guest`).
    fn enter_guest(&mut self) {
        loop {
            // A kick is taken here and honoured at the next access boundary,
            // so that an access interrupted by a fault completes first (the
            // guest's operation is not lost).
            if self.shared.take_exit_request() {
                self.exit_pending = true;
            }
            if self.shared.pending_requests() & KVM_REQ_TLB_FLUSH != 0 {
                let t = Instant::now();
                // Flush first, then clear the request (requests.rs, point 2):
                // nothing is cached between the two.
                self.tlb.flush();
                self.shared.ack_tlb_flush();
                self.stats.tlb_flushes += 1;
                self.loss.tlb_flush_ns.add(t.elapsed().as_nanos() as u64);
            }
            if self.shared.try_enter_guest_mode() {
                return;
            }
        }
    }

    /// One guest access, in guest mode.
    #[inline]
    fn access(&mut self, gpa: u64, write: bool, value: u64) -> Result<u64, Stop> {
        if !gpa.is_multiple_of(8) {
            return Err(Stop::Error(VcpuError::Unaligned(gpa)));
        }
        let gfn = gpa >> PAGE_SHIFT;
        loop {
            let t = match self.tlb.lookup(gfn) {
                Some(t) if !write || t.writable => {
                    self.stats.tlb_hits += 1;
                    t
                }
                _ => match self.page_walk(gfn, write) {
                    Walk::Hit(t) => {
                        self.tlb.insert(gfn, t);
                        t
                    }
                    Walk::Fault { present } => {
                        self.page_fault(gpa, write, present, value)?;
                        continue;
                    }
                    Walk::PmlFull => {
                        // The PML-full exit: drained, and back in.
                        self.stats.pml_full_exits += 1;
                        self.flush_pml_buffer();
                        self.shared.exit_guest_mode();
                        self.enter_guest();
                        continue;
                    }
                },
            };
            // SAFETY: `t.pfn` comes from a present leaf spte read by our page
            // walk in guest mode, or from a TLB entry filled that way since our
            // last flush, and we have stayed in guest mode since. Host memory
            // is unmapped only after the sptes into it are zapped and a remote
            // TLB flush has waited for every vCPU in guest mode to leave it or
            // flush (requests.rs); so the page is mapped until this access,
            // which completes before our next access boundary, is done.
            let word = unsafe { host_word(t.pfn, gpa & (shadow_mmu_core::spte::PAGE_SIZE - 1)) };
            // Relaxed: guest data. Ordering with the harvester comes from the
            // flush protocol (the release store of our mode or request ack).
            return Ok(if write {
                word.store(value, std::sync::atomic::Ordering::Relaxed);
                self.stats.writes += 1;
                value
            } else {
                self.stats.reads += 1;
                // Relaxed: guest data, as the store above.
                word.load(std::sync::atomic::Ordering::Relaxed)
            });
        }
    }

    /// The hardware page walk over the shadow page tables of our address
    /// space.
    #[inline]
    fn page_walk(&mut self, gfn: u64, write: bool) -> Walk {
        self.stats.page_walks += 1;
        let Some(mut sp) = self.kvm.mmu.root(self.asid) else { return Walk::Fault { present: false } };
        let mut level = PT64_ROOT_LEVEL;
        // SAFETY: we are called from `access`, in guest mode, and leave it
        // only after the walk returns.
        let in_guest_mode = unsafe { InGuestMode::assume() };
        loop {
            // Acquire: pairs with the release stores that make sptes present
            // (mmu_spte_set, mmu_spte_update), so a child table or a mapping
            // is seen fully set up. A table cannot be freed and reused during
            // the walk: that needs a remote TLB flush, which waits for us.
            let spte = sp.get(&in_guest_mode).spte(spte_index(gfn, level)).load(Ordering::Acquire);
            if !is_shadow_present_pte(spte) {
                return Walk::Fault { present: false };
            }
            if is_last_spte(spte, level) {
                if write && !is_writable_pte(spte) {
                    return Walk::Fault { present: true };
                }
                let pfn = spte_to_pfn(spte) + (gfn & (pages_per_spte(level) - 1));
                let mut writable = is_writable_pte(spte);
                if let Some(log) = self.pml.as_mut()
                    && writable
                    && spte & PT_DIRTY_MASK == 0
                {
                    if !write {
                        // Cached read-only: the first store walks again, to
                        // set D (the hardware caches D with the entry).
                        writable = false;
                    } else if log.is_full() {
                        return Walk::PmlFull;
                    } else {
                        let sptep = sp.get(&in_guest_mode).spte(spte_index(gfn, level));
                        if !shadow_mmu_core::tdp::hardware_set_dirty(sptep, spte) {
                            // The spte changed under us: walk again.
                            return self.page_walk(gfn, write);
                        }
                        log.log(gfn);
                    }
                }
                return Walk::Hit(Translation { pfn, writable });
            }
            // SAFETY: a present non-leaf spte of one of our tables.
            sp = unsafe { SpPtr::from_nonleaf_spte(spte) };
            level -= 1;
        }
    }

    /// A VM exit for a page fault: leave guest mode, handle, re-enter.
    fn page_fault(&mut self, gpa: u64, write: bool, present: bool, value: u64) -> Result<(), Stop> {
        let exit = self.observer.as_mut().map(|o| {
            o.fault_begin();
            Instant::now()
        });
        self.flush_pml_buffer();
        self.shared.exit_guest_mode();
        let t0 = Instant::now();
        let waited0 = shadow_mmu_core::lockdep::mmu_lock_waits();
        let fault = PageFault { gfn: gpa >> PAGE_SHIFT, write, present, asid: self.asid };
        let ring = self.ring.as_deref().map(|r| &r.ring);
        let r = self.kvm.page_fault(&self.shared, &mut self.caches, ring, fault);
        self.ring_full = ring.is_some_and(|r| r.soft_full());
        self.stats.fault_ns += t0.elapsed().as_nanos() as u64;
        let waited1 = shadow_mmu_core::lockdep::mmu_lock_waits();
        let waited = (waited1.0 - waited0.0, waited1.1 - waited0.1);
        if waited.0 > 0 {
            self.loss.mmu_lock_read_wait_ns.add(waited.0);
        }
        if waited.1 > 0 {
            self.loss.mmu_lock_write_wait_ns.add(waited.1);
        }
        if waited1.2 > waited0.2 {
            self.loss.harvest_lock_wait_ns.add(waited1.2 - waited0.2);
        }
        self.stats.page_faults += 1;
        self.stats.write_faults += u64::from(write);
        self.enter_guest();
        if let (Some(o), Some(exit)) = (self.observer.as_mut(), exit) {
            o.fault_end(write, exit.elapsed().as_nanos() as u64, waited);
        }
        r.map_err(|e| match e {
            FaultExit::NoSlot | FaultExit::ReadOnly => {
                self.stats.mmio_exits += 1;
                Stop::Exit(VcpuExit::Mmio { gpa, write, value })
            }
            FaultExit::WriteTracked => Stop::Exit(VcpuExit::WriteTracked { gpa, value }),
        })
    }
}

impl Drop for Vcpu {
    fn drop(&mut self) {
        self.shared.exit_guest_mode();
        self.kvm.mmu.free_memory_caches(&mut self.caches);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use std::time::Duration;

    use crate::backend::vm_with_memory;
    use crate::guest::{GuestOp, Script};
    use crate::vm::VmConfig;

    /// A fault that waits for `mmu_lock` counts the wait as its vCPU's
    /// loss, in the mode it took (here the shadow MMU's write lock, held by
    /// the test while the vCPU faults on a page no spte maps), and as the
    /// harvest's doing only when a harvest held the lock.
    #[test]
    fn a_fault_that_waits_for_mmu_lock_counts_the_wait_as_the_vcpus_loss() {
        let (vm, _mem) = vm_with_memory(VmConfig::default(), 4 << 20, true).unwrap();
        let mut vcpu = vm.create_vcpu(0).unwrap();
        let loss = vcpu.loss_counters();
        let lock = &vm.kvm().mmu.lock;
        // Two 2 MiB regions: the first fault maps the whole of its own.
        for (gpa, harvest) in [(0x5000, false), (0x20_5000, true)] {
            let before = loss.snapshot();
            let run = |mut v: super::Vcpu| {
                let held = lock.lock();
                let t = std::thread::spawn(move || {
                    v.run(&mut Script::new([GuestOp::Write(gpa, 1)])).unwrap();
                    v
                });
                std::thread::sleep(Duration::from_millis(30));
                drop(held);
                t.join().unwrap()
            };
            vcpu = if harvest { lock.harvesting(|| run(vcpu)) } else { run(vcpu) };
            let l = loss.snapshot().since(&before);
            assert!(l.mmu_lock_write_wait_ns >= 10_000_000, "{l:?}");
            assert_eq!(l.mmu_lock_read_wait_ns, 0, "{l:?}");
            assert_eq!(l.harvest_lock_wait_ns, if harvest { l.mmu_lock_write_wait_ns } else { 0 }, "{l:?}");
        }
    }
}

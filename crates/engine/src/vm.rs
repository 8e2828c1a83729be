//! The VM: [`Vm`] is the public handle, shaped after KVM's VM ioctls;
//! `Kvm` is the shared state (`struct kvm`) the MMU and the vCPUs use.
//!
//! Locks, in the order they are taken: `slots_lock` (memslot changes and
//! `get_dirty_log`, as `kvm->slots_lock`), then `mmu_lock`, then the pools'
//! internal locks.
//!
//! Memslot deletion, and why a vCPU never touches unmapped memory:
//! 1. under `mmu_lock`: mark the slot invalid (faults that get the lock
//!    later look the slot up again instead of mapping it), zap every spte
//!    that maps it, flush remote TLBs (waits for vCPUs in guest mode);
//! 2. publish the memslot set without the slot;
//! 3. drop our reference: the host memory is unmapped when the last
//!    reference goes, and no spte or TLB entry points into it any more.

use std::sync::Arc;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use thiserror::Error;

use crate::dirty_log::{ClearDirtyLogError, DirtyLogError};
use crate::dirty_ring::DirtyRingError;
use crate::memslot::{MemFlags, MemslotChange, MemslotError, Memslots, UserMemoryRegion};
use crate::mmu::{KVM_MIN_ALLOC_MMU_PAGES, Mmu, MmuDesign, MmuParams, default_max_mmu_pages};
use crate::vcpu::Vcpu;
use crate::vcpu::requests::{VcpuSet, VcpuShared};
use crate::vcpu::tlb::DEFAULT_TLB_ENTRIES;
use shadow_mmu_core::pool::PoolLimits;
use shadow_mmu_vmm::DirtyLogProtect;

/// Most vCPUs a VM may have (`KVM_MAX_VCPUS`).
pub const KVM_MAX_VCPUS: u32 = 1024;
/// Most address spaces a VM may have.
pub const MAX_ADDRESS_SPACES: u16 = 64;

/// How to build a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// The dirty logging design.
    pub mmu: MmuDesign,
    /// Fix write faults on pages protected only for dirty logging with
    /// `fast_page_fault` (one compare-exchange, no `mmu_lock`), in either
    /// design. On by default, as in KVM since 3.6; off gives the baseline of
    /// the first measurements, where every such fault takes the slow path and the
    /// locked design updates sptes with plain stores.
    pub fast_page_fault: bool,
    /// Shadow page budget (`KVM_SET_NR_MMU_PAGES`); `None` follows the size
    /// of guest memory, as KVM does (2%, at least 64 pages).
    pub max_mmu_pages: Option<usize>,
    /// Guest address spaces (see `SpRole::asid`); 1 for a plain direct map.
    pub address_spaces: u16,
    /// Entries of each vCPU's TLB.
    pub tlb_entries: usize,
    /// Map 2 MiB pages where possible.
    pub large_pages: bool,
    /// The TDP design's eager page splitting (`kvm.eager_page_split`, on by
    /// default): huge pages are split when logging is enabled (or, under
    /// `INITIALLY_SET`, at each CLEAR) instead of at the first write.
    pub eager_page_split: bool,
    /// The TDP design's D-bit dirty logging, a model of Intel PML
    /// (`enable_pml`; off by default): 4 KiB pages are re-armed by clearing
    /// D instead of W, and each vCPU logs the pages whose D bit it sets.
    /// The other designs refuse it.
    pub pml: bool,
    /// Freed shadow pages kept for immediate reuse; more go back to the
    /// system after a grace period.
    pub max_free_shadow_pages: usize,
    /// Freed pte_list descriptors kept for immediate reuse.
    pub max_free_descs: usize,
    /// Bytes of freed shadow pages that may wait for a grace period before
    /// the freeing side waits for one itself (the review's bound on deferred
    /// frees).
    pub max_deferred_bytes: usize,
    /// The same bound for pte_list descriptors.
    pub max_deferred_desc_bytes: usize,
    /// Threads that split each GET, CLEAR and dirty ring reset (1..=64),
    /// each with its own read-side section in the lockless design; the
    /// locked design runs them one after the other on `mmu_lock`.
    pub harvest_threads: u32,
    /// Manual protect (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`) from the start;
    /// [`Vm::set_dirty_log_protect`] changes it later, as the capability can.
    pub dirty_log_protect: DirtyLogProtect,
    /// Rules to break, for tests that show they are load-bearing.
    #[cfg(feature = "break-rules")]
    pub breakage: shadow_mmu_core::breakage::Breakage,
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            mmu: MmuDesign::default(),
            fast_page_fault: true,
            max_mmu_pages: None,
            address_spaces: 1,
            tlb_entries: DEFAULT_TLB_ENTRIES,
            large_pages: true,
            eager_page_split: true,
            pml: false,
            max_free_shadow_pages: 256,
            max_free_descs: 1 << 12,
            max_deferred_bytes: 16 << 20,
            max_deferred_desc_bytes: 1 << 20,
            dirty_log_protect: DirtyLogProtect::Auto,
            harvest_threads: 1,
            #[cfg(feature = "break-rules")]
            breakage: shadow_mmu_core::breakage::Breakage::default(),
        }
    }
}

/// VM-level errors.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum VmError {
    /// A configuration value is out of range.
    #[error("bad VM configuration: {field} must be {min}..={max}, not {value}")]
    BadConfig {
        /// The [`VmConfig`] field.
        field: &'static str,
        /// Its value.
        value: u64,
        /// The least it may be.
        min: u64,
        /// The most it may be.
        max: u64,
    },
    /// The vCPU id is taken or out of range.
    #[error("vCPU id {id} is taken or not below {max}")]
    BadVcpuId {
        /// Asked for.
        id: u32,
        /// `KVM_MAX_VCPUS`.
        max: u32,
    },
    /// A guest physical range that is not page aligned, or overflows.
    #[error("guest physical range [{gpa:#x}, +{size:#x}) is not page aligned or overflows")]
    BadRange {
        /// Start.
        gpa: u64,
        /// Length in bytes.
        size: u64,
    },
    /// PML asked for in a design other than `tdp` (we model it for the TDP
    /// MMU only).
    #[error("PML needs the tdp design, not {0}")]
    PmlNeedsTdp(MmuDesign),
    /// The shadow page budget is too small.
    #[error("shadow page budget {0} is below the minimum of {KVM_MIN_ALLOC_MMU_PAGES}")]
    BudgetTooSmall(usize),
}

/// The shared state of a VM (`struct kvm`).
pub(crate) struct Kvm {
    pub(crate) config: VmConfig,
    pub(crate) memslots: ArcSwap<Memslots>,
    pub(crate) slots_lock: Mutex<()>,
    pub(crate) mmu: Mmu,
    pub(crate) vcpus: VcpuSet,
    /// `kvm->manual_dirty_log_protect`, as `DirtyLogProtect as u8`.
    pub(crate) dirty_log_protect: std::sync::atomic::AtomicU8,
    /// `kvm->lock`: vCPU creation and the dirty ring's size.
    pub(crate) lock: Mutex<()>,
    /// Entries of each vCPU's dirty ring; 0: the ring is off.
    pub(crate) dirty_ring_entries: std::sync::atomic::AtomicU32,
    /// Every vCPU's ring, for the harvest and the reset.
    pub(crate) dirty_rings: Mutex<Vec<Arc<crate::dirty_ring::VcpuRing>>>,
    /// `kvm->dirty_ring_lock`: one reset at a time.
    pub(crate) dirty_ring_lock: Mutex<()>,
    /// The parallel harvest's helper threads (`harvest_threads - 1`), if any.
    pub(crate) harvest_pool: Option<crate::harvest_pool::HarvestPool>,
}

impl Drop for Kvm {
    fn drop(&mut self) {
        // Every vCPU handle is gone (each holds an `Arc<Kvm>`); zap all so the
        // pools hold no page or descriptor that is still linked.
        if self.mmu.design == MmuDesign::Tdp {
            self.kvm_tdp_mmu_zap_all();
            return;
        }
        let mut g = self.mmu.lock.lock();
        self.kvm_mmu_zap_all(&mut g);
    }
}

/// A VM. Cheap to clone: clones share the VM.
#[derive(Clone)]
pub struct Vm {
    kvm: Arc<Kvm>,
}

/// Kicks a VM's vCPUs ([`Vm::kicker`]).
pub struct VcpuKicker {
    kvm: Arc<Kvm>,
}

impl std::fmt::Debug for VcpuKicker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuKicker").finish_non_exhaustive()
    }
}

impl VcpuKicker {
    /// [`Vm::kick_vcpus`].
    pub fn kick(&self) {
        self.kvm.vcpus.request_all_exit();
    }
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm").field("config", &self.kvm.config).finish()
    }
}

/// A snapshot of a VM's MMU figures.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmStats {
    /// The MMU's counters.
    pub mmu: crate::stats::MmuCounts,
    /// Shadow pages in use (`n_used_mmu_pages`).
    pub mmu_pages_used: usize,
    /// Shadow page budget (`n_max_mmu_pages`).
    pub mmu_pages_max: usize,
    /// Grace periods waited for (`synchronize`).
    pub grace_periods_waited: u64,
    /// Pool objects returned to the system after their grace period.
    pub pool_objects_returned: u64,
    /// Times a free waited for a grace period because the backlog was full.
    pub pool_backlog_waits: u64,
    /// The longest of those waits, nanoseconds (under `mmu_lock`).
    pub pool_backlog_wait_max_ns: u64,
    /// Bytes waiting for a grace period now.
    pub pool_deferred_bytes: usize,
    /// `mmu_lock` acquisitions for write (every one, in the shadow MMU
    /// designs).
    pub mmu_lock_acquisitions: u64,
    /// ... that had to wait.
    pub mmu_lock_contended: u64,
    /// Nanoseconds waiting for `mmu_lock` for write.
    pub mmu_lock_wait_ns: u64,
    /// Nanoseconds `mmu_lock` was held for write.
    pub mmu_lock_hold_ns: u64,
    /// Longest single write hold of `mmu_lock`, ns.
    pub mmu_lock_max_hold_ns: u64,
    /// `mmu_lock` acquisitions for read (the TDP design's).
    pub mmu_lock_read_acquisitions: u64,
    /// ... that had to wait.
    pub mmu_lock_read_contended: u64,
    /// Nanoseconds waiting for `mmu_lock` for read.
    pub mmu_lock_read_wait_ns: u64,
    /// Nanoseconds `mmu_lock` was held for read, summed over readers.
    pub mmu_lock_read_hold_ns: u64,
    /// Longest single read hold of `mmu_lock`, ns.
    pub mmu_lock_read_max_hold_ns: u64,
    /// Shadow pages whose memory the pool holds.
    pub sp_pool_allocated: usize,
    /// pte_list descriptors whose memory the pool holds.
    pub desc_pool_allocated: usize,
    /// ... in use.
    pub desc_pool_in_use: usize,
}

impl Vm {
    /// Creates a VM with no memory and no vCPUs (`KVM_CREATE_VM`).
    pub fn new(config: VmConfig) -> Result<Self, VmError> {
        let in_range = |field, value: u64, max: u64| {
            let ok = (1..=max).contains(&value);
            if ok { Ok(()) } else { Err(VmError::BadConfig { field, value, min: 1, max }) }
        };
        in_range("address_spaces", u64::from(config.address_spaces), u64::from(MAX_ADDRESS_SPACES))?;
        in_range("harvest_threads", u64::from(config.harvest_threads), 64)?;
        in_range("tlb_entries", config.tlb_entries as u64, 1 << 20)?;
        if let Some(n) = config.max_mmu_pages
            && n < KVM_MIN_ALLOC_MMU_PAGES
        {
            return Err(VmError::BudgetTooSmall(n));
        }
        if config.pml && config.mmu != MmuDesign::Tdp {
            return Err(VmError::PmlNeedsTdp(config.mmu));
        }
        let mmu = Mmu::new(MmuParams {
            design: config.mmu,
            fast_page_fault: config.fast_page_fault,
            address_spaces: config.address_spaces,
            large_pages: config.large_pages,
            eager_page_split: config.eager_page_split,
            pml: config.pml,
            max_mmu_pages: config.max_mmu_pages,
            sp_limits: PoolLimits {
                max_free: config.max_free_shadow_pages,
                max_deferred_bytes: config.max_deferred_bytes,
            },
            desc_limits: PoolLimits {
                max_free: config.max_free_descs,
                max_deferred_bytes: config.max_deferred_desc_bytes,
            },
            #[cfg(feature = "break-rules")]
            breakage: config.breakage,
            #[cfg(not(feature = "break-rules"))]
            breakage: shadow_mmu_core::breakage::Breakage::SEED,
        });
        let kvm = Kvm {
            dirty_log_protect: std::sync::atomic::AtomicU8::new(config.dirty_log_protect as u8),
            lock: Mutex::new(()),
            dirty_ring_entries: std::sync::atomic::AtomicU32::new(0),
            dirty_rings: Mutex::new(Vec::new()),
            dirty_ring_lock: Mutex::new(()),
            harvest_pool: (config.harvest_threads > 1)
                .then(|| crate::harvest_pool::HarvestPool::new(config.harvest_threads as usize - 1)),
            config,
            memslots: ArcSwap::from_pointee(Memslots::default()),
            slots_lock: Mutex::new(()),
            mmu,
            vcpus: VcpuSet::default(),
        };
        Ok(Self { kvm: Arc::new(kvm) })
    }

    /// The configuration.
    pub fn config(&self) -> &VmConfig {
        &self.kvm.config
    }

    /// The shared state, for the engine's own tests.
    #[cfg(test)]
    pub(crate) fn kvm(&self) -> &Arc<Kvm> {
        &self.kvm
    }

    /// The MMU design.
    pub fn design(&self) -> MmuDesign {
        self.kvm.mmu.design
    }

    /// `KVM_SET_USER_MEMORY_REGION`: creates, deletes (size 0) or re-flags a
    /// slot. A refused change leaves the VM as it was.
    pub fn set_user_memory_region(&self, r: UserMemoryRegion) -> Result<(), MemslotError> {
        let kvm = &*self.kvm;
        let _slots = kvm.slots_lock.lock();
        let cur = kvm.memslots.load_full();
        match cur.prepare(&r)? {
            MemslotChange::Create(slot) => {
                if slot.dirty_logging()
                    && kvm.dirty_log_protect().initially_set()
                    && kvm.dirty_ring_entries() == 0
                {
                    // KVM sets the new slot's log all ones (`INITIALLY_SET`).
                    slot.dirty_bitmap().set_all();
                }
                kvm.memslots.store(Arc::new(cur.with(slot)));
                kvm.update_default_mmu_pages();
            }
            MemslotChange::Delete(slot) => {
                {
                    let g = kvm.mmu.lock.lock();
                    slot.set_invalid();
                    kvm.kvm_mmu_zap_memslot(&g, &slot);
                }
                kvm.memslots.store(Arc::new(cur.without(slot.id())));
                kvm.update_default_mmu_pages();
            }
            MemslotChange::FlagsOnly(slot, flags) => {
                let enabling = !slot.dirty_logging() && flags.contains(MemFlags::LOG_DIRTY_PAGES);
                // With the dirty ring on, INITIALLY_SET does not apply (dirty_ring.rs).
                let initially_set = kvm.dirty_log_protect().initially_set() && kvm.dirty_ring_entries() == 0;
                {
                    let _g = kvm.mmu.lock.lock();
                    if enabling && initially_set {
                        // All ones: every page counts as dirty until a CLEAR
                        // protects it (`KVM_DIRTY_LOG_INITIALLY_SET`).
                        slot.dirty_bitmap().set_all();
                    } else if enabling {
                        // A fresh, clean log, as KVM allocates a zeroed bitmap.
                        slot.dirty_bitmap().clear_all();
                    }
                    // Under mmu_lock: the slow fault path reads the flags under
                    // it, so each fault maps by the old flags (and is then
                    // protected by the walk below) or by the new ones.
                    slot.set_flags(flags);
                }
                if enabling && !initially_set {
                    // With `INITIALLY_SET` nothing is protected now: CLEAR
                    // protects chunk by chunk (`kvm_mmu_slot_apply_flags`
                    // returns early). Otherwise, KVM 3.11's order: install the new flags, wait for every
                    // fast page fault that may have read the old ones
                    // (`synchronize_srcu_expedited`), then write-protect
                    // (`kvm_arch_commit_memory_region`). See `fast_fault.rs`.
                    if !kvm.mmu.breakage.skip_memslot_synchronize() {
                        kvm.vcpus.synchronize_lockless_walks();
                    }
                    match kvm.mmu.design {
                        MmuDesign::Locked => {
                            let mut g = kvm.mmu.lock.lock();
                            kvm.kvm_mmu_slot_remove_write_access(&mut g, &slot);
                        }
                        MmuDesign::Lockless => kvm.kvm_mmu_slot_remove_write_access_lockless(&slot),
                        MmuDesign::RmapLock => kvm.kvm_mmu_slot_remove_write_access_rmap_locked(&slot),
                        MmuDesign::Tdp => kvm.kvm_tdp_mmu_enable_logging(&slot),
                    }
                }
            }
        }
        Ok(())
    }

    /// Deletes slot `slot` (`KVM_SET_USER_MEMORY_REGION` with size 0).
    pub fn delete_memory_region(&self, slot: u32) -> Result<(), MemslotError> {
        self.set_user_memory_region(UserMemoryRegion {
            slot,
            flags: MemFlags::empty(),
            guest_phys_addr: 0,
            memory_size: 0,
            memory: None,
            memory_offset: 0,
        })
    }

    fn set_log_flag(&self, slot: u32, on: bool) -> Result<(), MemslotError> {
        let cur = self.kvm.memslots.load_full();
        let s = cur.get(slot).ok_or(MemslotError::NoSuchSlot { slot })?;
        let flags = if on {
            s.flags().union(MemFlags::LOG_DIRTY_PAGES)
        } else {
            s.flags().difference(MemFlags::LOG_DIRTY_PAGES)
        };
        self.set_user_memory_region(UserMemoryRegion {
            slot,
            flags,
            guest_phys_addr: s.guest_phys_addr(),
            memory_size: s.memory_size(),
            memory: None,
            memory_offset: s.host_page_index(s.base_gfn()) << shadow_mmu_core::spte::PAGE_SHIFT,
        })
    }

    /// Turns dirty logging on for `slot` (re-flags it with
    /// `KVM_MEM_LOG_DIRTY_PAGES`), write-protecting all of it.
    pub fn enable_dirty_logging(&self, slot: u32) -> Result<(), MemslotError> {
        self.set_log_flag(slot, true)
    }

    /// Turns dirty logging off for `slot`.
    pub fn disable_dirty_logging(&self, slot: u32) -> Result<(), MemslotError> {
        self.set_log_flag(slot, false)
    }

    /// The mmu notifier's `invalidate_range_start` for the host memory behind
    /// guest physical `[gpa, gpa + size)`: drops every spte that maps it and
    /// flushes remote TLBs (see `mmu/notifier.rs`). vCPUs fault the pages in
    /// again on their next access. Returns how many rmaps had sptes to drop.
    pub fn mmu_notifier_invalidate_range(&self, gpa: u64, size: u64) -> Result<u64, VmError> {
        let page = shadow_mmu_core::spte::PAGE_SIZE;
        if !gpa.is_multiple_of(page) || !size.is_multiple_of(page) || gpa.checked_add(size).is_none() {
            return Err(VmError::BadRange { gpa, size });
        }
        let shift = shadow_mmu_core::spte::PAGE_SHIFT;
        Ok(self.kvm.kvm_unmap_gfn_range(gpa >> shift, (gpa + size) >> shift))
    }

    /// `KVM_GET_DIRTY_LOG`: copies the dirty bitmap of `slot` into `bitmap`
    /// (KVM's layout, one `u64` per 64 pages), clears it, and write-protects
    /// the dirty pages. Returns the number of dirty pages.
    pub fn get_dirty_log(&self, slot: u32, bitmap: &mut [u64]) -> Result<u64, DirtyLogError> {
        self.kvm.kvm_vm_ioctl_get_dirty_log(slot, bitmap)
    }

    /// `kvm_read_guest`: reads guest memory at `gpa` (8-aligned, inside one
    /// memslot) into `out`, from the host's side.
    pub fn read_guest(&self, gpa: u64, out: &mut [u64]) -> Result<(), shadow_mmu_vmm::GuestAccessError> {
        self.kvm.kvm_read_guest(gpa, out)
    }

    /// `kvm_write_guest`: writes `words` into guest memory at `gpa`
    /// (8-aligned, inside one writable memslot), from the host's side, and
    /// marks the pages dirty where the slot logs, as KVM does for its own
    /// writes to guest memory. Checked whole first: a refusal writes nothing.
    pub fn write_guest(&self, gpa: u64, words: &[u64]) -> Result<(), shadow_mmu_vmm::GuestAccessError> {
        self.kvm.kvm_write_guest(gpa, words)
    }

    /// `KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)`: who clears the
    /// dirty log from now on. `INITIALLY_SET` applies to logs enabled after
    /// this call.
    pub fn set_dirty_log_protect(&self, p: DirtyLogProtect) {
        self.kvm.set_dirty_log_protect(p);
    }

    /// The VM's manual-protect mode.
    pub fn dirty_log_protect(&self) -> DirtyLogProtect {
        self.kvm.dirty_log_protect()
    }

    /// `KVM_CLEAR_DIRTY_LOG` (manual protect): clears the bits of `slot`'s log
    /// that are set in `mask` and write-protects those pages. Bit `i` of word
    /// `w` of `mask` is page `first_page + 64 * w + i` of the slot; `mask` has
    /// one word per 64 of the `num_pages` pages. `first_page` is a multiple
    /// of 64, and `num_pages` too unless the range ends at the slot's end.
    /// Returns the number of pages cleared (bits that were set).
    pub fn clear_dirty_log(
        &self,
        slot: u32,
        first_page: u64,
        num_pages: u64,
        mask: &[u64],
    ) -> Result<u64, ClearDirtyLogError> {
        self.kvm.kvm_vm_ioctl_clear_dirty_log(slot, first_page, num_pages, mask)
    }

    /// Tracks guest writes to page `gfn` (KVM's page tracking,
    /// `KVM_PAGE_TRACK_WRITE`): from the return on, every write to it exits
    /// to userspace as [`crate::VcpuExit::WriteTracked`]. Counted.
    pub fn track_write(&self, gfn: u64) -> Result<(), crate::TrackError> {
        self.kvm.kvm_slot_page_track_add_page(gfn)
    }

    /// Drops one write-tracking reference of page `gfn`.
    pub fn untrack_write(&self, gfn: u64) -> Result<(), crate::TrackError> {
        self.kvm.kvm_slot_page_track_remove_page(gfn)
    }

    /// `KVM_CREATE_VCPU`.
    pub fn create_vcpu(&self, id: u32) -> Result<Vcpu, VmError> {
        let _kvm_lock = self.kvm.lock.lock();
        if id >= KVM_MAX_VCPUS || self.kvm.vcpus.ids().contains(&id) {
            return Err(VmError::BadVcpuId { id, max: KVM_MAX_VCPUS });
        }
        let entries = self.kvm.dirty_ring_entries();
        let ring = (entries > 0).then(|| {
            Arc::new(crate::dirty_ring::VcpuRing::new(id, entries, self.kvm.dirty_ring_rsvd_entries()))
        });
        if let Some(r) = &ring {
            self.kvm.dirty_rings.lock().push(r.clone());
        }
        let shared = Arc::new(VcpuShared::new(id));
        self.kvm.vcpus.add(shared.clone());
        Ok(Vcpu::new(self.kvm.clone(), shared, ring))
    }

    /// `KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING_ACQ_REL)`: every vCPU created
    /// from now on logs its dirty pages to a ring of `bytes` bytes
    /// (16-byte entries) instead of the bitmaps. KVM's size rules apply:
    /// a power of two, at least a page, at most 65536 entries, set once,
    /// before any vCPU exists.
    pub fn enable_dirty_ring(&self, bytes: u32) -> Result<(), DirtyRingError> {
        self.kvm.enable_dirty_ring(bytes)
    }

    /// Kicks every vCPU out of `run` at its next access boundary
    /// (`VcpuExit::Intr`), as a VMM's signal does before it pauses them for
    /// the stop-and-copy; does not wait: each vCPU's thread sees its run
    /// return.
    pub fn kick_vcpus(&self) {
        self.kvm.vcpus.request_all_exit();
    }

    /// A handle that kicks this VM's vCPUs ([`Self::kick_vcpus`]) from
    /// any thread, for as long as it lives (it keeps the VM's state alive).
    pub fn kicker(&self) -> VcpuKicker {
        VcpuKicker { kvm: self.kvm.clone() }
    }

    /// Wakes the parallel harvest's helper threads and keeps them spinning,
    /// ready, for `within`: for a harvest whose start matters, as a VMM
    /// calls it when it begins the stop-and-copy (pausing the vCPUs) before
    /// the final harvest. Without it a helper can get its CPU late (a halted
    /// vCPU of the host wakes in about a millisecond). No-op on one thread.
    pub fn prepare_harvest(&self, within: std::time::Duration) {
        if let Some(p) = &self.kvm.harvest_pool {
            p.prepare(within);
        }
    }

    /// The vCPUs that have a dirty ring (every vCPU, once the ring is on).
    pub fn dirty_ring_vcpus(&self) -> Vec<u32> {
        self.kvm.dirty_rings.lock().iter().map(|r| r.vcpu).collect()
    }

    /// Entries of each vCPU's dirty ring, if the ring is on.
    pub fn dirty_ring_entries(&self) -> Option<u32> {
        Some(self.kvm.dirty_ring_entries()).filter(|&n| n > 0)
    }

    /// Harvests vCPU `vcpu`'s dirty ring, as userspace reads the ring KVM
    /// maps: `f(slot, offset)` for each page pushed since the last harvest,
    /// in order, each marked harvested. Returns how many. Copy a page only
    /// after the [`Vm::reset_dirty_rings`] that follows.
    pub fn harvest_dirty_ring(&self, vcpu: u32, f: impl FnMut(u32, u64)) -> Result<u32, DirtyRingError> {
        self.kvm.harvest_dirty_ring(vcpu, f)
    }

    /// `KVM_RESET_DIRTY_RINGS`: re-protects the pages of every harvested
    /// entry of every ring and gives the entries back. Returns how many.
    pub fn reset_dirty_rings(&self) -> Result<u64, DirtyRingError> {
        self.kvm.reset_dirty_rings()
    }

    /// `KVM_SET_NR_MMU_PAGES`: sets the shadow page budget, zapping the
    /// oldest pages down to it.
    pub fn set_nr_mmu_pages(&self, n: usize) -> Result<(), VmError> {
        if n < KVM_MIN_ALLOC_MMU_PAGES {
            return Err(VmError::BudgetTooSmall(n));
        }
        let mut g = self.kvm.mmu.lock.lock();
        g.n_requested_mmu_pages = Some(n);
        self.kvm.kvm_mmu_change_mmu_pages(&mut g, n);
        Ok(())
    }

    /// The current memslots.
    pub fn memslots(&self) -> Arc<Memslots> {
        self.kvm.memslots.load_full()
    }

    /// `kvm_flush_remote_tlbs`, for tests and tools.
    pub fn flush_remote_tlbs(&self) {
        self.kvm.kvm_flush_remote_tlbs();
    }

    /// A snapshot of the MMU's figures.
    pub fn stats(&self) -> VmStats {
        let kvm = &*self.kvm;
        let (used, max) = {
            let g = kvm.mmu.lock.lock();
            let tdp = kvm.mmu.tdp.pages.load(std::sync::atomic::Ordering::Relaxed).max(0) as usize;
            (g.n_used_mmu_pages + tdp, g.n_max_mmu_pages)
        };
        let s = &kvm.mmu.stats;
        let l = &kvm.mmu.lock.stats;
        let r = &kvm.mmu.lock.read_stats;
        VmStats {
            mmu: s.snapshot(),
            mmu_pages_used: used,
            mmu_pages_max: max,
            grace_periods_waited: kvm.mmu.rcu.synchronize_calls.get(),
            pool_objects_returned: kvm.mmu.sp_pool.stats.returned.get()
                + kvm.mmu.desc_pool.stats.returned.get(),
            pool_backlog_waits: kvm.mmu.sp_pool.stats.backlog_waits.get()
                + kvm.mmu.desc_pool.stats.backlog_waits.get(),
            pool_backlog_wait_max_ns: kvm
                .mmu
                .sp_pool
                .stats
                .backlog_wait_max_ns
                .get()
                .max(kvm.mmu.desc_pool.stats.backlog_wait_max_ns.get()),
            pool_deferred_bytes: kvm.mmu.sp_pool.deferred_bytes() + kvm.mmu.desc_pool.deferred_bytes(),
            mmu_lock_acquisitions: l.acquisitions.get(),
            mmu_lock_contended: l.contended.get(),
            mmu_lock_wait_ns: l.wait_ns.get(),
            mmu_lock_hold_ns: l.hold_ns.get(),
            mmu_lock_max_hold_ns: l.max_hold_ns.get(),
            mmu_lock_read_acquisitions: r.acquisitions.get(),
            mmu_lock_read_contended: r.contended.get(),
            mmu_lock_read_wait_ns: r.wait_ns.get(),
            mmu_lock_read_hold_ns: r.hold_ns.get(),
            mmu_lock_read_max_hold_ns: r.max_hold_ns.get(),
            sp_pool_allocated: kvm.mmu.sp_pool.allocated(),
            desc_pool_allocated: kvm.mmu.desc_pool.allocated(),
            desc_pool_in_use: kvm.mmu.desc_pool.in_use(),
        }
    }

    /// Checks the MMU's invariants (KVM's `mmu_audit.c`); see
    /// [`crate::audit`]. Takes `mmu_lock`.
    pub fn audit(
        &self,
        opts: crate::audit::AuditOptions,
    ) -> Result<crate::audit::AuditReport, crate::audit::AuditError> {
        self.kvm.audit(opts)
    }
}

impl Kvm {
    /// Follows the size of guest memory with the shadow page budget, unless
    /// the user set it.
    fn update_default_mmu_pages(&self) {
        let pages = self.memslots.load().total_pages();
        let mut g = self.mmu.lock.lock();
        if g.n_requested_mmu_pages.is_none() {
            self.kvm_mmu_change_mmu_pages(&mut g, default_max_mmu_pages(pages));
        }
    }
}

#[cfg(all(test, feature = "break-rules", not(loom)))]
mod tests {
    use super::*;
    use crate::guest::{GuestOp, Script};
    use crate::memory::HostMemory;
    use shadow_mmu_core::breakage::Breakage;
    use shadow_mmu_core::spte::SPTE_POISON;
    use shadow_mmu_core::sync::atomic::Ordering;

    /// A lockless reader holds a pointer into a shadow page (taken from an
    /// rmap inside a read-side section) while another thread zaps every
    /// shadow page and returns their memory. With the grace period, the
    /// memory cannot go back while the reader is inside its section; without
    /// it (the switch), the reader reads what was given back (poison, in a
    /// `break-rules` build).
    fn reader_sees_poison(breakage: Breakage) -> bool {
        let vm = Vm::new(VmConfig {
            mmu: MmuDesign::Lockless,
            max_free_shadow_pages: 0,
            large_pages: false,
            breakage,
            ..VmConfig::default()
        })
        .unwrap();
        let mem = HostMemory::anonymous(2 << 20).unwrap();
        vm.set_user_memory_region(UserMemoryRegion {
            slot: 0,
            flags: MemFlags::empty(),
            guest_phys_addr: 0,
            memory_size: 2 << 20,
            memory: Some(mem),
            memory_offset: 0,
        })
        .unwrap();
        let mut vcpu = vm.create_vcpu(0).unwrap();
        vcpu.run(&mut Script::new([GuestOp::Write(0x3000, 1)])).unwrap();
        let kvm = vm.kvm.clone();
        let slot = vm.memslots().get(0).unwrap().clone();
        let guard = kvm.mmu.rcu.read_lock();
        let mut sptep = None;
        // SAFETY: inside a read-side section; the walk only records the pointer.
        unsafe {
            slot.rmap(3, 1).walk_lockless(&guard, &Breakage::SEED, |p| sptep = Some(p as *const _ as usize))
        };
        let sptep = sptep.expect("gfn 3 is mapped");
        let zapper = {
            let kvm = kvm.clone();
            std::thread::spawn(move || {
                let mut g = kvm.mmu.lock.lock();
                kvm.kvm_mmu_change_mmu_pages(&mut g, 0);
            })
        };
        zapper.join().unwrap();
        // SAFETY: the pointer is into type-stable shadow page memory, which the
        // grace period (or, in this build, the poisoned leak) keeps allocated.
        let spte =
            unsafe { &*(sptep as *const shadow_mmu_core::sync::atomic::AtomicU64) }.load(Ordering::Relaxed);
        drop(guard);
        drop(vcpu);
        spte == SPTE_POISON
    }

    #[test]
    fn a_reader_never_sees_returned_shadow_page_memory_unless_the_grace_period_is_skipped() {
        assert!(!reader_sees_poison(Breakage::SEED), "memory returned under a reader");
        let b = Breakage { free_shadow_pages_without_grace_period: true, ..Breakage::SEED };
        assert!(reader_sees_poison(b), "the switch must return memory at once");
    }
}

//! The VM's dirty rings: `KVM_CAP_DIRTY_LOG_RING_ACQ_REL`
//! (`kvm_vm_ioctl_enable_dirty_log_ring`), the harvest userspace makes of
//! each vCPU's ring, and `KVM_RESET_DIRTY_RINGS`
//! (`kvm_vm_ioctl_reset_dirty_pages`). The ring itself, its orderings and
//! its loom models are the core's (`shadow_mmu_core::dirty_ring`).
//!
//! Invariants:
//! - the size is set once, before any vCPU exists, and follows KVM's rules
//!   (a power of two in bytes, at least a page and the reserve, at most
//!   `KVM_DIRTY_RING_MAX_ENTRIES` entries); each refusal is a
//!   [`DirtyRingError`] and changes nothing;
//! - with the ring on, a write fault that dirties a page pushes
//!   (slot, offset) to its vCPU's ring instead of setting a bitmap bit, after
//!   the spte is writable and in its rmap (patch 06's order; the push's
//!   release store is the fence); the bitmap ioctls are refused;
//! - a ring is harvested by one thread at a time (its `harvest` lock) and
//!   reset by one thread at a time (the VM's `dirty_ring_lock`, KVM's);
//! - the reset re-protects each coalesced run, checking the slot first: a
//!   slot deleted (or shrunk) since the push is skipped, as KVM does.
//!
//! Where we differ from KVM:
//! - the locked design (3.11's rules) holds `mmu_lock` over each ring's
//!   reset and flushes before it lets go, where KVM takes it per run and
//!   flushes after the last ring (the reason is CLEAR's, `dirty_log.rs`);
//!   the lockless design takes no lock and flushes once, after every ring
//!   (and every harvest thread, `harvest.rs`);
//! - a host write (`Vm::write_guest`) to a logged slot with the ring on is
//!   refused: KVM has no vCPU ring to push it to and, without
//!   `KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP`, drops it with a warning;
//! - `INITIALLY_SET` does not apply with the ring: enabling logging
//!   write-protects the slot (KVM would protect nothing and log nothing).

use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use thiserror::Error;

use crate::vm::Kvm;
use shadow_mmu_core::dirty_ring::DirtyRing;
pub use shadow_mmu_core::dirty_ring::{
    DIRTY_GFN_BYTES, KVM_DIRTY_RING_MAX_ENTRIES, KVM_DIRTY_RING_RSVD_ENTRIES,
};
use shadow_mmu_core::spte::PAGE_SIZE;

/// Why `enable_dirty_ring` (or a ring operation) was refused. Nothing
/// changed.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum DirtyRingError {
    /// The size is not a power of two.
    #[error("dirty ring size {0} bytes is not a power of two")]
    NotPowerOfTwo(u32),
    /// Below a page, or below the reserved entries.
    #[error(
        "dirty ring size {0} bytes is below a page or the {KVM_DIRTY_RING_RSVD_ENTRIES} reserved entries"
    )]
    TooSmall(u32),
    /// Above `KVM_DIRTY_RING_MAX_ENTRIES` entries (KVM's `E2BIG`).
    #[error("dirty ring size {0} bytes is above {KVM_DIRTY_RING_MAX_ENTRIES} entries")]
    TooBig(u32),
    /// The size was set already.
    #[error("the dirty ring size is set already")]
    AlreadySet,
    /// A vCPU exists already.
    #[error("the dirty ring size must be set before any vCPU is created")]
    VcpusExist,
    /// The ring is not on.
    #[error("the dirty ring is not enabled on this VM")]
    NotEnabled,
    /// No vCPU has this id.
    #[error("vCPU {0} does not exist")]
    NoSuchVcpu(u32),
}

/// One vCPU's ring, as the VM keeps it.
pub(crate) struct VcpuRing {
    pub(crate) vcpu: u32,
    pub(crate) ring: DirtyRing,
    /// One harvester at a time (the ring's `fetch_index` is its own).
    harvest: Mutex<()>,
}

impl VcpuRing {
    pub(crate) fn new(vcpu: u32, entries: u32, reserved: u32) -> Self {
        Self { vcpu, ring: DirtyRing::new(entries, reserved), harvest: Mutex::new(()) }
    }
}

impl Kvm {
    /// Ring entries per vCPU, 0 when the ring is off.
    #[inline]
    pub(crate) fn dirty_ring_entries(&self) -> u32 {
        // Relaxed: set once before any vCPU exists, under `kvm.lock`, which
        // `create_vcpu` takes too; every later reader comes after a vCPU's
        // creation or reads 0 harmlessly (nothing logs to a ring yet).
        self.dirty_ring_entries.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// `kvm_dirty_ring_get_rsvd_entries`: entries each ring keeps beyond its
    /// soft limit, with room for a whole PML log's drain where PML is on.
    pub(crate) fn dirty_ring_rsvd_entries(&self) -> u32 {
        let pml = if self.mmu.tdp.pml { crate::vcpu::pml::PML_LOG_NR_ENTRIES as u32 } else { 0 };
        KVM_DIRTY_RING_RSVD_ENTRIES + pml
    }

    /// `kvm_vm_ioctl_enable_dirty_log_ring`.
    pub(crate) fn enable_dirty_ring(&self, bytes: u32) -> Result<(), DirtyRingError> {
        if !bytes.is_power_of_two() {
            return Err(DirtyRingError::NotPowerOfTwo(bytes));
        }
        if u64::from(bytes) < PAGE_SIZE || bytes < self.dirty_ring_rsvd_entries() * DIRTY_GFN_BYTES {
            return Err(DirtyRingError::TooSmall(bytes));
        }
        if bytes > KVM_DIRTY_RING_MAX_ENTRIES * DIRTY_GFN_BYTES {
            return Err(DirtyRingError::TooBig(bytes));
        }
        let _kvm_lock = self.lock.lock();
        if self.dirty_ring_entries() != 0 {
            return Err(DirtyRingError::AlreadySet);
        }
        if !self.vcpus.ids().is_empty() {
            return Err(DirtyRingError::VcpusExist);
        }
        // Relaxed: see `dirty_ring_entries`.
        self.dirty_ring_entries.store(bytes / DIRTY_GFN_BYTES, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// The ring of vCPU `id`.
    fn vcpu_ring(&self, id: u32) -> Result<Arc<VcpuRing>, DirtyRingError> {
        if self.dirty_ring_entries() == 0 {
            return Err(DirtyRingError::NotEnabled);
        }
        self.dirty_rings.lock().iter().find(|r| r.vcpu == id).cloned().ok_or(DirtyRingError::NoSuchVcpu(id))
    }

    /// Userspace's harvest of vCPU `id`'s ring: `f(slot, offset)` for each
    /// entry pushed since the last harvest, in order; each is marked
    /// harvested. Returns how many.
    pub(crate) fn harvest_dirty_ring(&self, id: u32, f: impl FnMut(u32, u64)) -> Result<u32, DirtyRingError> {
        let r = self.vcpu_ring(id)?;
        self.kvm_arch_sync_dirty_log();
        let _one_harvester = r.harvest.lock();
        let n = r.ring.harvest(f);
        self.mmu.stats.ring_entries_harvested.add(u64::from(n));
        Ok(n)
    }

    /// `KVM_RESET_DIRTY_RINGS`: gives back every harvested entry of every
    /// ring and re-protects its pages, then flushes remote TLBs once.
    /// Returns the number of entries reset.
    pub(crate) fn reset_dirty_rings(&self) -> Result<u64, DirtyRingError> {
        if self.dirty_ring_entries() == 0 {
            return Err(DirtyRingError::NotEnabled);
        }
        let t0 = Instant::now();
        let _one_reset = self.dirty_ring_lock.lock();
        let rings: Vec<Arc<VcpuRing>> = self.dirty_rings.lock().clone();
        let slots = self.memslots.load_full();
        let b = &self.mmu.breakage;
        // One chunk per ring (`harvest.rs`): a thread resets whole rings.
        let total = self.walk_in_parallel(rings.len(), |k| {
            self.walk_chunk(|p, t| {
                let n = rings[k].ring.reset(b, |slot, offset, mask| {
                    if let Some(s) = slots.get(slot).filter(|s| valid_run(s, offset, mask)) {
                        self.protect_run(p, (s, offset, mask), false, t);
                    }
                });
                t.pages += u64::from(n);
            })
        });
        let reset = total.pages;
        let stats = &self.mmu.stats;
        stats.ring_resets.inc();
        stats.ring_entries_reset.add(reset);
        stats.ring_reset_ns.add(t0.elapsed().as_nanos() as u64);
        Ok(reset)
    }
}

/// `kvm_reset_dirty_gfn`'s check: the run lies inside the slot (which may
/// have been deleted or re-created since the push).
fn valid_run(slot: &crate::memslot::Memslot, offset: u64, mask: u64) -> bool {
    offset + 63 - u64::from(mask.leading_zeros()) < slot.npages()
}

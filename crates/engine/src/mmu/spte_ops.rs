//! Updating one spte, and keeping its rmap in step (`mmu_spte_set`,
//! `mmu_spte_update`, `drop_spte`, `rmap_add`, `rmap_remove`, parent ptes).
//!
//! All functions here are called with `mmu_lock` held; the guard is passed
//! as the proof. Every store that makes an spte present is a release store:
//! vCPU page walks load sptes with acquire ordering and must see the table
//! or page the spte points to fully set up.

use std::ptr::NonNull;

use super::lock::MmuGuard;
use super::{MmuCaches, MmuDesign};
use crate::memslot::Memslot;
use crate::shadow_page::{SpPtr, page_header};
use crate::vm::Kvm;
use shadow_mmu_core::pte_list::PteListDesc;
use shadow_mmu_core::spte::{is_large_pte, is_shadow_present_pte};
use shadow_mmu_core::sync::atomic::{AtomicU64, Ordering};

impl Kvm {
    /// `mmu_spte_set`: makes a non-present spte present.
    pub(crate) fn mmu_spte_set(&self, _g: &MmuGuard<'_>, sptep: &AtomicU64, new: u64) {
        debug_assert!(!is_shadow_present_pte(sptep.load(Ordering::Relaxed)));
        // Release: pairs with the acquire loads of vCPU page walks (and of
        // lockless readers): what the spte points to is initialised first.
        sptep.store(new, Ordering::Release);
    }

    /// `mmu_spte_update`: replaces a (possibly present) spte; returns whether
    /// remote TLBs must be flushed because a vCPU may still cache a more
    /// permissive translation: when W is lost (locked design, read by `xchg`
    /// as KVM 3.11 does when the fast path may set it), or when the old spte
    /// was locklessly modifiable (lockless design, patch 04). See
    /// `lockless::SpteUpdate`.
    pub(crate) fn mmu_spte_update(&self, _g: &MmuGuard<'_>, sptep: &AtomicU64, new: u64) -> bool {
        super::lockless::__mmu_spte_update(sptep, new, self.mmu.spte_update, &self.mmu.breakage)
    }

    /// `mmu_spte_clear_track_bits`: makes an spte non-present, returns the old
    /// value. A walker that reads 0 faults; one that read the old value is
    /// covered by the remote TLB flush the caller owes.
    pub(crate) fn mmu_spte_clear_track_bits(&self, _g: &MmuGuard<'_>, sptep: &AtomicU64) -> u64 {
        super::lockless::spte_exchange(sptep, 0, self.mmu.spte_update)
    }

    /// `mmu_spte_clear_no_track`: clears a non-leaf spte.
    pub(crate) fn mmu_spte_clear_no_track(&self, _g: &MmuGuard<'_>, sptep: &AtomicU64) {
        // Release: as in `mmu_spte_clear_track_bits`.
        sptep.store(0, Ordering::Release);
    }

    /// `rmap_add`: records that `sptep` maps `gfn` at `level`; returns the
    /// rmap's length before.
    pub(crate) fn rmap_add(
        &self,
        _g: &MmuGuard<'_>,
        caches: &mut MmuCaches,
        slot: &Memslot,
        sptep: &AtomicU64,
        gfn: u64,
        level: u8,
    ) -> usize {
        let head = slot.rmap(gfn, level);
        let mut alloc = || caches.desc.alloc();
        if self.mmu.design == MmuDesign::RmapLock {
            // SAFETY: as below; in this design every rmap writer takes the
            // rmap lock (here and in `rmap_remove`), so the harvest's walks
            // under it see the chain still.
            return unsafe { head.add_rmap_locked(NonNull::from(sptep), &mut alloc) };
        }
        // SAFETY: we hold mmu_lock (the guard), which serialises every writer
        // of every rmap; descriptors come from this VM's type-stable pool
        // through the vCPU's cache, clean.
        unsafe { head.add_with(NonNull::from(sptep), &mut alloc, &self.mmu.breakage) }
    }

    /// `rmap_remove`: forgets that the leaf `sptep` maps its gfn. The gfn and
    /// level come from the shadow page the spte sits in.
    pub(crate) fn rmap_remove(&self, g: &MmuGuard<'_>, sptep: &AtomicU64) {
        // SAFETY: every leaf spte with an rmap entry sits in a shadow page
        // table of this VM.
        let sp = unsafe { page_header(sptep) }.get(g);
        let gfn = sp.spte_gfn(sp.spte_index_of(sptep));
        let level = sp.role().level;
        let slots = self.memslots.load();
        // Memslot deletion zaps every spte of a slot while the slot is still
        // published (marked invalid), so a mapped gfn always has its slot.
        let slot = slots.find(gfn).expect("rmap_remove: mapped gfn has no memslot");
        let head = slot.rmap(gfn, level);
        if self.mmu.design == MmuDesign::RmapLock {
            // SAFETY: as below, and every rmap writer of this design takes
            // the rmap lock (`rmap_add`): the entry leaves the chain under
            // the bit, before the caller may free the spte's table.
            unsafe { head.remove_rmap_locked(NonNull::from(sptep), &mut self.free_desc()) };
            return;
        }
        // SAFETY: we hold mmu_lock; freed descriptors go back to the VM's
        // type-stable pool, whose memory outlives lockless readers' read-side
        // sections (`pool.rs`).
        unsafe { head.remove_with(NonNull::from(sptep), &mut self.free_desc(), &self.mmu.breakage) };
    }

    /// What an rmap or a parent list calls with each descriptor it unlinks.
    fn free_desc(&self) -> impl FnMut(NonNull<PteListDesc>) + '_ {
        // SAFETY: every descriptor of an rmap or parent list came from
        // `desc_pool` (the lists allocate from it alone), and a list hands
        // each it unlinked over once (`PteListHead::remove_with`).
        |d| unsafe { self.mmu.desc_pool.free(d) }
    }

    /// `drop_spte`: makes a leaf non-present and removes it from its rmap.
    /// The caller owes a remote TLB flush.
    pub(crate) fn drop_spte(&self, g: &MmuGuard<'_>, sptep: &AtomicU64) {
        let old = self.mmu_spte_clear_track_bits(g, sptep);
        if is_shadow_present_pte(old) {
            self.rmap_remove(g, sptep);
        }
    }

    /// `mmu_page_add_parent_pte`.
    pub(crate) fn mmu_page_add_parent_pte(
        &self,
        g: &MmuGuard<'_>,
        caches: &mut MmuCaches,
        sp: SpPtr,
        parent_pte: &AtomicU64,
    ) {
        // SAFETY: we hold mmu_lock, which serialises the writers of every
        // parent_ptes list; descriptors come from the vCPU's cache.
        unsafe {
            sp.get(g).parent_ptes().add_with(
                NonNull::from(parent_pte),
                &mut || caches.desc.alloc(),
                &self.mmu.breakage,
            )
        };
    }

    /// `drop_parent_pte`: unlinks `sp` from the table of `parent_pte`.
    pub(crate) fn drop_parent_pte(&self, g: &MmuGuard<'_>, sp: SpPtr, parent_pte: &AtomicU64) {
        // SAFETY: as in `rmap_remove`.
        unsafe { sp.get(g).parent_ptes().remove(NonNull::from(parent_pte), &mut self.free_desc()) };
        self.mmu_spte_clear_no_track(g, parent_pte);
    }

    /// `__drop_large_spte`: drops `sptep` if it is a large leaf. Returns
    /// whether it did (and a remote TLB flush is owed).
    pub(crate) fn __drop_large_spte(&self, g: &MmuGuard<'_>, sptep: &AtomicU64) -> bool {
        let spte = sptep.load(Ordering::Relaxed);
        if is_shadow_present_pte(spte) && is_large_pte(spte) {
            self.drop_spte(g, sptep);
            self.mmu.stats.large_sptes_dropped.inc();
            return true;
        }
        false
    }

    /// `drop_large_spte`: drops a large leaf in the way of a smaller mapping,
    /// and flushes.
    pub(crate) fn drop_large_spte(&self, g: &MmuGuard<'_>, sptep: &AtomicU64) {
        if self.__drop_large_spte(g, sptep) {
            self.kvm_flush_remote_tlbs();
        }
    }
}

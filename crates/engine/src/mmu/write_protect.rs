//! Write protection for dirty logging, locked design (KVM before the seed).
//!
//! - Enabling logging on a slot (`kvm_mmu_slot_remove_write_access`) walks
//!   every rmap of the slot, at every level, under `mmu_lock`: writable
//!   4 KiB sptes lose W, writable large sptes are dropped (zapped), so that
//!   later faults map 4 KiB pages one by one and each first write is seen.
//! - `get_dirty_log` (`kvm_mmu_write_protect_pt_masked`) write-protects the
//!   4 KiB sptes of the gfns whose bits it harvested, under `mmu_lock`.
//!
//! Both flush remote TLBs before they release `mmu_lock`: with W cleared
//! under the lock, the next taker of the lock (say, a fault that syncs a
//! page) must not see a read-only spte that some vCPU can still write
//! through its TLB.

use super::lock::MmuGuard;
use crate::memslot::Memslot;
use crate::pte_list::PteListHead;
use crate::spte::{KVM_NR_PAGE_SIZES, PT_PAGE_TABLE_LEVEL, PT_WRITABLE_MASK, is_writable_pte};
use crate::sync::atomic::{AtomicU64, Ordering};
use crate::vm::Kvm;

impl Kvm {
    /// `spte_write_protect` (with `pt_protect` false: dirty logging).
    /// Returns `(flush, dropped)`: whether a remote TLB flush is owed, and
    /// whether the spte was dropped (a large spte), which changes the rmap.
    fn spte_write_protect(&self, g: &MmuGuard<'_>, sptep: &AtomicU64) -> (bool, bool) {
        let spte = sptep.load(Ordering::Relaxed);
        if !is_writable_pte(spte) {
            return (false, false);
        }
        if self.__drop_large_spte(g, sptep) {
            return (true, true);
        }
        self.mmu.stats.sptes_write_protected.inc();
        (self.mmu_spte_update(g, sptep, spte & !PT_WRITABLE_MASK), false)
    }

    /// `__rmap_write_protect`: write-protects every spte in one rmap.
    /// Returns whether a remote TLB flush is owed.
    pub(crate) fn __rmap_write_protect(&self, g: &MmuGuard<'_>, head: &PteListHead) -> bool {
        let mut flush = false;
        // SAFETY: we hold mmu_lock (no other writer); after a drop changes the
        // list, we start a new iterator (as KVM restarts at `rmap_get_first`).
        let mut it = unsafe { head.iter() };
        while let Some(sptep) = it.next() {
            // SAFETY: rmap entries point to sptes in our type-stable tables.
            let (f, dropped) = self.spte_write_protect(g, unsafe { sptep.as_ref() });
            flush |= f;
            if dropped {
                // SAFETY: as above.
                it = unsafe { head.iter() };
            }
        }
        flush
    }

    /// `kvm_mmu_write_protect_pt_masked`: write-protects the 4 KiB sptes of
    /// the gfns set in `mask`, which covers pages `gfn_offset..gfn_offset+64`
    /// of `slot`.
    pub(crate) fn kvm_mmu_write_protect_pt_masked(
        &self,
        g: &MmuGuard<'_>,
        slot: &Memslot,
        gfn_offset: u64,
        mut mask: u64,
    ) {
        while mask != 0 {
            let gfn = slot.base_gfn() + gfn_offset + u64::from(mask.trailing_zeros());
            self.__rmap_write_protect(g, slot.rmap(gfn, PT_PAGE_TABLE_LEVEL));
            // Clear the lowest set bit.
            mask &= mask - 1;
        }
    }

    /// `kvm_mmu_slot_remove_write_access`: write-protects all of `slot`, at
    /// every level, for enabling dirty logging.
    pub(crate) fn kvm_mmu_slot_remove_write_access(&self, g: &mut MmuGuard<'_>, slot: &Memslot) {
        for level in PT_PAGE_TABLE_LEVEL..PT_PAGE_TABLE_LEVEL + KVM_NR_PAGE_SIZES as u8 {
            for head in slot.rmaps(level) {
                if !head.is_empty() {
                    self.__rmap_write_protect(g, head);
                }
                if g.needbreak() {
                    // Flush before letting anyone in (see the module docs).
                    self.kvm_flush_remote_tlbs();
                    g.cond_resched();
                }
            }
        }
        self.kvm_flush_remote_tlbs();
    }
}

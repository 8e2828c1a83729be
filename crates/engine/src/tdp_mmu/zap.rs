//! Taking sptes and tables out of the TDP MMU's trees: `handle_removed_pt`,
//! `tdp_mmu_zap_leafs` (mmu notifier, memslot deletion), write protection
//! of one gfn (write tracking), and the teardown.

use super::tdp_iter::TdpIter;
use crate::shadow_page::{PinsShadowPages, SpPtr};
use crate::vm::Kvm;
use shadow_mmu_core::spte::{
    PT_PAGE_TABLE_LEVEL, PT_WRITABLE_MASK, SPTE_MMU_WRITEABLE, is_last_spte, is_shadow_present_pte,
};
use shadow_mmu_core::sync::atomic::Ordering;
use shadow_mmu_core::tdp::{FROZEN_SPTE, freeze_removed_pt, tdp_mmu_write_spte};

impl Kvm {
    /// `handle_removed_pt`: `sp` was just unlinked. Parks each of its
    /// entries at `FROZEN_SPTE` (by `xchg`, spinning on a frozen one, if
    /// `shared`: other read-lock holders may still be writing them), takes
    /// apart the tables below, and hands `sp` to `call_rcu`. The caller
    /// flushes remote TLBs before its read-side section ends.
    pub(crate) fn handle_removed_pt(&self, pin: &impl PinsShadowPages, sp: SpPtr, shared: bool) {
        let level = sp.get(pin).role().level;
        // Recursion, not a list: nothing is allocated under mmu_lock, and
        // the depth is at most the tree's.
        let take = |old: u64| {
            if is_shadow_present_pte(old) && !is_last_spte(old, level) {
                // SAFETY: a present non-leaf spte of one of our tables.
                self.handle_removed_pt(pin, unsafe { SpPtr::from_nonleaf_spte(old) }, shared);
            }
        };
        let table = sp.get(pin).spt();
        if shared {
            freeze_removed_pt(table, &self.mmu.breakage, |_, old| take(old));
        } else {
            for sptep in table {
                // Relaxed: under the write lock no other thread writes a
                // table entry; the fast path's writes are caught by the
                // atomic write below.
                let old = sptep.load(Ordering::Relaxed);
                if is_shadow_present_pte(old) {
                    take(tdp_mmu_write_spte(sptep, old, FROZEN_SPTE));
                }
            }
        }
        self.mmu.tdp.pages.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        self.mmu.stats.sp_zapped.inc();
        self.tdp_mmu_rcu_free(sp);
    }

    /// `tdp_mmu_zap_leafs` over `[start, end)` in every root, under the
    /// write lock: every present leaf that maps part of the range goes (a
    /// huge one whole). Tables stay. Returns how many leaves went; the
    /// caller flushes if any did.
    pub(crate) fn tdp_mmu_zap_leafs(&self, g: &crate::mmu::lock::MmuGuard<'_>, start: u64, end: u64) -> u64 {
        let mut zapped = 0;
        for root in self.tdp_mmu_roots() {
            let mut iter = TdpIter::start(g, root, PT_PAGE_TABLE_LEVEL, start);
            while iter.within(end) {
                let old = iter.old_spte;
                if is_shadow_present_pte(old) && is_last_spte(old, iter.level) {
                    tdp_mmu_write_spte(iter.sptep(g), old, 0);
                    zapped += 1;
                }
                iter.next(g);
            }
        }
        zapped
    }

    /// `kvm_tdp_mmu_write_protect_gfn`: under the write lock, clears W and
    /// MMU-writable on every leaf at or above `min_level` that maps `gfn`,
    /// so that the fast path cannot undo it. Returns whether a leaf lost
    /// MMU-writable (it needs a flush at once).
    pub(crate) fn tdp_mmu_write_protect_gfn(
        &self,
        g: &crate::mmu::lock::MmuGuard<'_>,
        gfn: u64,
        min_level: u8,
    ) -> bool {
        let mut changed = false;
        for root in self.tdp_mmu_roots() {
            let mut iter = TdpIter::start(g, root, min_level, gfn);
            while iter.within(gfn + 1) {
                let old = iter.old_spte;
                let bits = PT_WRITABLE_MASK | SPTE_MMU_WRITEABLE;
                if is_shadow_present_pte(old) && is_last_spte(old, iter.level) && old & bits != 0 {
                    tdp_mmu_write_spte(iter.sptep(g), old, old & !bits);
                    changed = true;
                }
                iter.next(g);
            }
        }
        changed
    }

    /// The teardown (`kvm_mmu_uninit_tdp_mmu`): takes every tree apart under
    /// the write lock, then waits for the grace period (`rcu_barrier`) and
    /// hands every table back.
    pub(crate) fn kvm_tdp_mmu_zap_all(&self) {
        {
            let g = self.mmu.lock.lock();
            for asid in 0..self.mmu.address_spaces() {
                if let Some(root) = self.mmu.root(asid) {
                    self.mmu.set_root(asid, None);
                    // Its root reference goes when the table is cleaned.
                    self.handle_removed_pt(&g, root, false);
                }
            }
        }
        self.mmu.rcu.synchronize();
        self.tdp_mmu_reclaim();
        self.mmu.tdp.split_cache.lock().release(&self.mmu.sp_pool);
    }
}

//! The TDP MMU's dirty logging: enable-logging under the read lock, and
//! the 64-page re-arm of GET, CLEAR and the ring reset under the write lock.
//!
//! - **Enable** (`kvm_mmu_slot_apply_flags` without `INITIALLY_SET`): under
//!   the read lock, eager split of the slot, then `wrprot_gfn_range` clears
//!   W by compare-exchange on every writable leaf (MMU-writable stays, so
//!   the fast path can give W back without the lock), yielding without a
//!   flush; after unlock, one remote TLB flush.
//! - **Re-arm** (`kvm_tdp_mmu_clear_dirty_pt_masked`): under the write lock,
//!   W cleared on the 4 KiB leaves of the mask's pages, by `fetch_and` when
//!   the spte is volatile (a fast path's W set since we read it is seen and
//!   cleared, not lost) or a plain store; no yield; the flush comes once,
//!   after unlock (`harvest.rs`). Under `INITIALLY_SET` a CLEAR first splits
//!   the mask's range (eager split, write lock) and write-protects, W and
//!   MMU-writable, the 2 MiB pages at its two ends
//!   (`kvm_arch_mmu_enable_log_dirty_pt_masked`).

use super::tdp_iter::TdpIter;
use crate::memslot::Memslot;
use crate::mmu::lock::MmuGuard;
use crate::shadow_page::ShadowPage;
use crate::vm::Kvm;
use shadow_mmu_core::pool::MemoryCache;
use shadow_mmu_core::rcu::ReadGuard;
use shadow_mmu_core::spte::{
    PT_DIRECTORY_LEVEL, PT_DIRTY_MASK, PT_PAGE_TABLE_LEVEL, PT_WRITABLE_MASK, is_last_spte,
    is_shadow_present_pte,
};
use shadow_mmu_core::tdp::{tdp_mmu_clear_spte_bits, tdp_mmu_set_spte_atomic};

impl Kvm {
    /// Enable-logging's protection of `slot` in the TDP design
    /// (`kvm_mmu_slot_try_split_huge_pages` and `kvm_tdp_mmu_wrprot_slot`,
    /// both under the read lock), then one flush after unlock.
    pub(crate) fn kvm_tdp_mmu_enable_logging(&self, slot: &Memslot) {
        let (start, end) = (slot.base_gfn(), slot.base_gfn() + slot.npages());
        {
            // Before mmu_lock (`TdpMmu::split_cache`).
            let mut cache = self.mmu.tdp.split_cache.lock();
            let mut g = self.mmu.lock.read();
            let mut section = self.mmu.rcu.read_lock();
            if self.mmu.tdp.eager_page_split {
                self.tdp_mmu_try_split_huge_pages(&mut g, &mut section, &mut cache, start, end);
            }
            // With PML only huge leaves lose W (so that they are split);
            // 4 KiB ones lose D (`kvm_mmu_slot_leaf_clear_dirty`).
            let min_level = if self.mmu.tdp.pml { PT_DIRECTORY_LEVEL } else { PT_PAGE_TABLE_LEVEL };
            let mut cleared = 0;
            for root in self.tdp_mmu_roots() {
                let (g, section) = (&mut g, &mut section);
                cleared +=
                    self.clear_leaf_bit_gfn_range(g, section, root, start, end, min_level, PT_WRITABLE_MASK);
                if self.mmu.tdp.pml {
                    cleared += self.clear_leaf_bit_gfn_range(
                        g,
                        section,
                        root,
                        start,
                        end,
                        PT_PAGE_TABLE_LEVEL,
                        PT_DIRTY_MASK,
                    );
                }
            }
            self.mmu.stats.sptes_write_protected.add(cleared);
        }
        self.kvm_flush_remote_tlbs();
        self.tdp_mmu_reclaim();
    }

    /// `wrprot_gfn_range` (`bit` W, only W: MMU-writable stays) and, with
    /// PML, `clear_dirty_gfn_range` (`bit` D): clears `bit` on every present
    /// leaf at or above `min_level` in `[start, end)` of `root` that has it,
    /// by compare-exchange, re-evaluating an entry that changed under it.
    /// Returns how many lost it.
    #[allow(clippy::too_many_arguments)]
    fn clear_leaf_bit_gfn_range(
        &self,
        g: &mut crate::mmu::lock::MmuReadGuard<'_>,
        section: &mut ReadGuard<'_>,
        root: crate::shadow_page::SpPtr,
        start: u64,
        end: u64,
        min_level: u8,
        bit: u64,
    ) -> u64 {
        let mut cleared = 0;
        let mut iter = TdpIter::start(&*section, root, min_level, start);
        while iter.within(end) {
            if self.tdp_mmu_iter_cond_resched(g, section, &mut iter, false) {
                iter.next(&*section);
                continue;
            }
            let old = iter.old_spte;
            if !is_shadow_present_pte(old) || !is_last_spte(old, iter.level) || old & bit == 0 {
                iter.next(&*section);
                continue;
            }
            let sptep = iter.sptep(&*section);
            if tdp_mmu_set_spte_atomic(sptep, &mut iter.old_spte, old & !bit, &self.mmu.breakage) {
                cleared += 1;
                iter.next(&*section);
            } else {
                self.mmu.stats.tdp_cmpxchg_failures.inc();
            }
        }
        cleared
    }

    /// `kvm_arch_mmu_enable_log_dirty_pt_masked` for the TDP design, under
    /// the write lock: CLEAR's split and end protection under
    /// `INITIALLY_SET`, then `kvm_tdp_mmu_clear_dirty_pt_masked`. Returns how
    /// many sptes lost W.
    pub(crate) fn kvm_tdp_mmu_enable_log_dirty_pt_masked(
        &self,
        g: &mut MmuGuard<'_>,
        cache: &mut MemoryCache<ShadowPage>,
        slot: &Memslot,
        gfn_offset: u64,
        mask: u64,
        initially_set: bool,
    ) -> u64 {
        let base = slot.base_gfn() + gfn_offset;
        let mut protected = 0;
        if initially_set {
            let first = base + u64::from(mask.trailing_zeros());
            let last = base + 63 - u64::from(mask.leading_zeros());
            if self.mmu.tdp.eager_page_split {
                let mut section = self.mmu.rcu.read_lock();
                self.tdp_mmu_try_split_huge_pages(g, &mut section, cache, first, last + 1);
            }
            for gfn in crate::mmu::write_protect::masked_large_gfns(slot, gfn_offset, mask) {
                if self.tdp_mmu_write_protect_gfn(g, gfn, PT_DIRECTORY_LEVEL) {
                    protected += 1;
                }
            }
        }
        protected + self.kvm_tdp_mmu_clear_dirty_pt_masked(g, base, mask)
    }

    /// `kvm_tdp_mmu_clear_dirty_pt_masked`: clears W (D with PML) on the
    /// 4 KiB leaves of the pages in `mask` (from `gfn`), in every root.
    /// Never yields.
    fn kvm_tdp_mmu_clear_dirty_pt_masked(&self, g: &MmuGuard<'_>, gfn: u64, mask: u64) -> u64 {
        let dbit = if self.mmu.tdp.pml { PT_DIRTY_MASK } else { PT_WRITABLE_MASK };
        let mut cleared = 0;
        for root in self.tdp_mmu_roots() {
            let mut left = mask;
            let start = gfn + u64::from(mask.trailing_zeros());
            let mut iter = TdpIter::start(g, root, PT_PAGE_TABLE_LEVEL, start);
            while left != 0 && iter.within(gfn + 64) {
                if iter.level > PT_PAGE_TABLE_LEVEL {
                    iter.next(g);
                    continue;
                }
                let bit = 1u64 << (iter.gfn - gfn);
                if left & bit == 0 {
                    iter.next(g);
                    continue;
                }
                left &= !bit;
                let old = iter.old_spte;
                if old & dbit != 0 && is_shadow_present_pte(old) {
                    tdp_mmu_clear_spte_bits(iter.sptep(g), old, dbit);
                    cleared += 1;
                }
                iter.next(g);
            }
        }
        cleared
    }
}

//! The mmu notifier's `invalidate_range_start`: the host is about to change
//! the host pages behind a range of guest memory (reclaim, page migration,
//! KSM, THP collapse), so every spte that maps them is dropped, and remote
//! TLBs are flushed before the host may touch the pages
//! (`kvm_mmu_notifier_invalidate_range_start` -> `kvm_unmap_hva_range` ->
//! `kvm_unmap_rmapp`).
//!
//! Where we differ from KVM, and why:
//! - KVM is told a host virtual range and maps it onto the gfns of every slot
//!   that covers it (`hva_to_gfn_memslot`). Each of our slots owns its host
//!   memory, so we take the guest physical range directly.
//! - KVM's faults resolve the pfn before they take `mmu_lock`, so they check
//!   `mmu_notifier_seq`/`mmu_notifier_count` under the lock and retry if an
//!   invalidation ran in between. Ours resolve it under `mmu_lock`
//!   (`gfn_to_pfn` in `__direct_map`: the memory is pinned), so a fault runs
//!   wholly before the invalidation (and is zapped by it) or wholly after
//!   (and maps the page again, as a refault after reclaim does). No retry
//!   protocol is needed.
//!
//! Invariants: the sptes are dropped under `mmu_lock` (as every spte is);
//! when this returns, no vCPU can reach the range through a TLB entry or an
//! spte until it faults again.

use crate::vm::Kvm;
use shadow_mmu_core::spte::{level_base_gfn, mapping_levels, pages_per_spte};

impl Kvm {
    /// Drops every spte that maps a gfn in `[start, end)`, at every level,
    /// then flushes remote TLBs if any was dropped. Returns how many rmaps
    /// had sptes to drop.
    pub(crate) fn kvm_unmap_gfn_range(&self, start: u64, end: u64) -> u64 {
        let slots = self.memslots.load();
        let g = self.mmu.lock.lock();
        if self.mmu.design == super::MmuDesign::Tdp {
            // `kvm_tdp_mmu_unmap_gfn_range`: the leaves, by walking the trees.
            let unmapped = self.tdp_mmu_zap_leafs(&g, start, end);
            if unmapped > 0 {
                self.kvm_flush_remote_tlbs();
            }
            return unmapped;
        }
        let mut unmapped = 0;
        for slot in slots.iter() {
            let lo = start.max(slot.base_gfn());
            let hi = end.min(slot.base_gfn() + slot.npages());
            if lo >= hi {
                continue;
            }
            for level in mapping_levels() {
                // One rmap per level-sized region: a large spte maps the range
                // if its region overlaps it at all.
                let mut gfn = level_base_gfn(lo, level).max(slot.base_gfn());
                while gfn < hi {
                    unmapped += u64::from(self.kvm_unmap_rmapp(&g, slot.rmap(gfn, level)));
                    gfn = level_base_gfn(gfn, level) + pages_per_spte(level);
                }
            }
        }
        if unmapped > 0 {
            // Under mmu_lock, as KVM flushes before `invalidate_range_start`
            // returns: after this the host may free or change the pages.
            self.kvm_flush_remote_tlbs();
        }
        unmapped
    }
}

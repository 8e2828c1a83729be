//! Eager page splitting (`tdp_mmu_split_huge_pages_root`, Matlack 2022):
//! huge leaves of a logged range are split into 4 KiB ones before the
//! guest writes, so that its first writes after enabling logging take the
//! fast path instead of each splitting (and waiting for `mmu_lock`) at
//! fault time.
//!
//! - On enable without `INITIALLY_SET`: the whole slot, under the read lock
//!   (`dirty_log.rs`).
//! - On each CLEAR under `INITIALLY_SET`: the mask's range, under the write
//!   lock (`harvest.rs`).
//!
//! Needing a table and having none, the walk drops its section and the
//! lock, allocates, takes both back and restarts from the root (upstream
//! allocates one page per drop; we top up a cache of `KVM_NR_MEM_OBJS`).
//! A split links the new table with no TLB flush: every translation stays.
//! Best effort: what is left huge is write-protected and split at fault
//! time.

use super::TdpLock;
use super::tdp_iter::TdpIter;
use crate::shadow_page::ShadowPage;
use crate::vm::Kvm;
use shadow_mmu_core::pool::MemoryCache;
use shadow_mmu_core::rcu::ReadGuard;
use shadow_mmu_core::spte::{PT_DIRECTORY_LEVEL, is_large_pte, is_shadow_present_pte};
use shadow_mmu_core::tdp::is_frozen_spte;

impl Kvm {
    /// `kvm_tdp_mmu_try_split_huge_pages` over `[start, end)` in every root,
    /// holding `lock` (read or write), with `cache`, the VM's split cache
    /// (upstream's `split_page_header_cache`), which the caller locked
    /// before `mmu_lock` (see [`super::TdpMmu::split_cache`]). Returns how
    /// many huge leaves it split.
    pub(crate) fn tdp_mmu_try_split_huge_pages<L: TdpLock>(
        &self,
        lock: &mut L,
        section: &mut ReadGuard<'_>,
        cache: &mut MemoryCache<ShadowPage>,
        start: u64,
        end: u64,
    ) -> u64 {
        let mut split = 0;
        for root in self.tdp_mmu_roots() {
            split += self.tdp_mmu_split_huge_pages_root(lock, section, cache, root, start, end);
        }
        split
    }

    fn tdp_mmu_split_huge_pages_root<L: TdpLock>(
        &self,
        lock: &mut L,
        section: &mut ReadGuard<'_>,
        cache: &mut MemoryCache<ShadowPage>,
        root: crate::shadow_page::SpPtr,
        start: u64,
        end: u64,
    ) -> u64 {
        let asid = root.get(&*section).role().asid;
        let mut split = 0;
        // From 2 MiB up: pre-order meets a huge leaf before the children
        // its split creates, which are 4 KiB and need no more splitting.
        let mut iter = TdpIter::start(&*section, root, PT_DIRECTORY_LEVEL, start);
        while iter.within(end) {
            if self.tdp_mmu_iter_cond_resched(lock, section, &mut iter, false) {
                iter.next(&*section);
                continue;
            }
            let old = iter.old_spte;
            if !is_shadow_present_pte(old) || !is_large_pte(old) || is_frozen_spte(old) {
                iter.next(&*section);
                continue;
            }
            if cache.is_empty() {
                // Allocate with the lock and the section dropped, then restart.
                section.unlocked(|| lock.unlocked_for(|| cache.topup(&self.mmu.sp_pool, 1)));
                iter.set_yielded();
                iter.next(&*section);
                continue;
            }
            let sp = Self::tdp_mmu_alloc_sp(cache, iter.gfn, iter.level, asid);
            if self.tdp_mmu_link_sp(section, &mut iter, sp, L::SHARED) {
                split += 1;
                iter.next(&*section);
            }
            // Else re-evaluate the refreshed entry.
        }
        self.mmu.stats.tdp_eager_splits.add(split);
        split
    }
}

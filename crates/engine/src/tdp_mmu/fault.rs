//! The TDP MMU's page faults: the slow path under the read lock
//! (`kvm_tdp_mmu_map`) and the fast path with no lock
//! (`kvm_tdp_mmu_fast_pf_get_last_sptep` and `fast_pf_fix_direct_spte`).
//!
//! Slow path: tables come from the vCPU's caches, filled before the lock.
//! The walk goes down to the goal level; an empty entry above it gets a new
//! table, linked by compare-exchange (a loser re-evaluates the entry and
//! its table waits for a grace period like any unlinked one); a huge leaf
//! above it is split in place, its 512 children inheriting W, D and
//! MMU-writable, so the other 511 pages stay mapped and their first writes
//! take the fast path; a table where a huge leaf goes is replaced, taken
//! apart (`handle_removed_pt`) and flushed for before the read-side section
//! ends. A frozen entry means someone is mid-change: retry.
//!
//! The dirty bit is set after the compare-exchange that made the spte
//! writable, under the read lock; the harvest takes the bit, then clears W
//! under the write lock, so it finds the spte writable (the lock orders
//! the two). The fast path marks after its compare-exchange, whose release
//! the harvest's `fetch_and` (or `xchg`) acquires.

use super::tdp_iter::TdpIter;
use crate::memslot::Memslot;
use crate::mmu::MmuCaches;
use crate::mmu::fault::{FaultExit, Mapped, PageFault};
use crate::mmu::lock::MmuReadGuard;
use crate::mmu::walk::LocklessWalk;
use crate::shadow_page::SpPtr;
use crate::vcpu::requests::VcpuShared;
use crate::vm::Kvm;
use shadow_mmu_core::dirty_ring::DirtyRing;
use shadow_mmu_core::rcu::ReadGuard;
use shadow_mmu_core::spte::{
    PT_PAGE_SIZE_MASK, PT_PAGE_TABLE_LEVEL, SPTE_LEVEL_MASK, SPTE_MMU_WRITEABLE, is_large_pte, is_last_spte,
    is_shadow_present_pte, is_writable_pte, level_bits, make_leaf_spte, make_nonleaf_spte, pages_per_spte,
    spte_to_pfn,
};
use shadow_mmu_core::tdp::{is_frozen_spte, tdp_fast_pf_fix_spte, tdp_mmu_set_spte_atomic};

/// Tries of the fast path before it gives up (upstream's loop bound).
const FAST_PF_TRIES: usize = 4;

/// What `kvm_tdp_mmu_map` did.
enum Map {
    /// Mapped, or found mapped (spurious).
    Done,
    /// Lost a race (a frozen entry, a failed compare-exchange at the
    /// target): fault again (`RET_PF_RETRY`).
    Retry,
    /// Mapped over a table, whose flush the `tdp_flush_after_section`
    /// switch moved after the read-side section (broken on purpose).
    DoneFlushAfterSection,
}

/// The mapping a fault installs.
struct Target<'a> {
    slot: &'a Memslot,
    gfn: u64,
    goal: u8,
    write: bool,
    asid: u16,
    ring: Option<&'a DirtyRing>,
}

/// `make_small_spte`: child `index` of a huge leaf being split, one level
/// down: same permissions and bits, its part of the pfn range.
pub(crate) fn make_small_spte(huge: u64, huge_level: u8, index: usize) -> u64 {
    let child_level = huge_level - 1;
    let pfn = spte_to_pfn(huge) + index as u64 * pages_per_spte(child_level);
    let mut spte = (huge & !(SPTE_LEVEL_MASK | shadow_mmu_core::spte::PT64_BASE_ADDR_MASK))
        | level_bits(child_level)
        | (pfn << shadow_mmu_core::spte::PAGE_SHIFT);
    if child_level == PT_PAGE_TABLE_LEVEL {
        spte &= !PT_PAGE_SIZE_MASK;
    }
    spte
}

impl Kvm {
    /// `kvm_tdp_mmu_page_fault`: the fast path first for a write to a
    /// present page, then the slow path under the read lock.
    pub(crate) fn kvm_tdp_mmu_page_fault(
        &self,
        vcpu: &VcpuShared,
        caches: &mut MmuCaches,
        ring: Option<&DirtyRing>,
        fault: PageFault,
    ) -> Result<(), FaultExit> {
        let PageFault { gfn, write, present, asid } = fault;
        if self.mmu.fast_page_fault && write && present && self.tdp_fast_page_fault(vcpu, ring, gfn, asid) {
            return Ok(());
        }
        self.slow_page_fault(
            caches,
            fault,
            || {
                let g = self.mmu.lock.read();
                self.mmu.stats.fault_mmu_lock_reads.inc();
                g
            },
            |g, slot, caches| {
                let goal = self.mapping_level(slot, gfn);
                let root = self.tdp_mmu_root(asid, caches);
                let section = self.mmu.rcu.read_lock();
                let t = Target { slot, gfn, goal, write, asid, ring };
                let r = self.kvm_tdp_mmu_map(&g, &section, caches, root, &t);
                drop(section);
                drop(g);
                self.tdp_mmu_reclaim();
                match r {
                    Map::Done => Mapped::Done,
                    Map::DoneFlushAfterSection => {
                        self.kvm_flush_remote_tlbs();
                        Mapped::Done
                    }
                    Map::Retry => {
                        self.mmu.stats.tdp_fault_retries.inc();
                        Mapped::Retry
                    }
                }
            },
        )
    }

    /// `kvm_tdp_mmu_map`: walks to the goal level, linking and splitting on
    /// the way, then installs the leaf.
    fn kvm_tdp_mmu_map(
        &self,
        _g: &MmuReadGuard<'_>,
        section: &ReadGuard<'_>,
        caches: &mut MmuCaches,
        root: SpPtr,
        t: &Target<'_>,
    ) -> Map {
        let mut iter = TdpIter::start(section, root, t.goal, t.gfn);
        while iter.within(t.gfn + 1) {
            if is_frozen_spte(iter.old_spte) {
                return Map::Retry;
            }
            if iter.level == t.goal {
                return self.tdp_mmu_map_handle_target_level(section, &mut iter, t);
            }
            let old = iter.old_spte;
            if is_shadow_present_pte(old) && !is_large_pte(old) {
                iter.next(section);
                continue;
            }
            // Empty, or a huge leaf where a table must go: link a table,
            // filled from the huge leaf if there is one (split in place).
            let sp = Self::tdp_mmu_alloc_sp(&mut caches.sp, t.gfn, iter.level, t.asid);
            if self.tdp_mmu_link_sp(section, &mut iter, sp, true) {
                iter.next(section);
            }
            // Else `iter.old_spte` is the value found: re-evaluate it.
        }
        Map::Retry
    }

    /// `tdp_mmu_link_sp` (with `tdp_mmu_split_huge_page`'s filling when the
    /// entry is a huge leaf): links `sp` at the iterator's entry by
    /// compare-exchange if `shared`, else by a plain store (the write lock's
    /// holder is the only writer of a non-leaf entry). No TLB flush: a split
    /// keeps every translation. On failure `sp` waits for a grace period
    /// like an unlinked table and `iter.old_spte` is refreshed.
    pub(crate) fn tdp_mmu_link_sp(
        &self,
        section: &ReadGuard<'_>,
        iter: &mut TdpIter,
        sp: SpPtr,
        shared: bool,
    ) -> bool {
        let old = iter.old_spte;
        let split = is_shadow_present_pte(old) && is_last_spte(old, iter.level);
        if split {
            for (i, child) in sp.get(section).spt().iter().enumerate() {
                // Relaxed: the table is not reachable yet; the link's release
                // store publishes it.
                child.store(
                    make_small_spte(old, iter.level, i),
                    shadow_mmu_core::sync::atomic::Ordering::Relaxed,
                );
            }
        }
        let new = make_nonleaf_spte(sp.get(section).table_addr(), iter.level);
        let sptep = iter.sptep(section);
        let linked = if shared {
            tdp_mmu_set_spte_atomic(sptep, &mut iter.old_spte, new, &self.mmu.breakage)
        } else {
            shadow_mmu_core::tdp::tdp_mmu_write_spte(sptep, old, new);
            true
        };
        if linked {
            self.mmu.tdp.pages.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.mmu.stats.sp_created.inc();
            if split {
                self.mmu.stats.tdp_huge_pages_split.inc();
            }
        } else {
            self.tdp_mmu_rcu_free(sp);
        }
        linked
    }

    /// `tdp_mmu_map_handle_target_level`: `make_spte`, then one
    /// compare-exchange.
    fn tdp_mmu_map_handle_target_level(
        &self,
        section: &ReadGuard<'_>,
        iter: &mut TdpIter,
        t: &Target<'_>,
    ) -> Map {
        let Target { slot, gfn, goal, write, ring, .. } = *t;
        let old = iter.old_spte;
        let base = shadow_mmu_core::spte::level_base_gfn(gfn, goal);
        let pfn = slot.gfn_to_pfn(base);
        if is_shadow_present_pte(old)
            && is_last_spte(old, goal)
            && spte_to_pfn(old) == pfn
            && (!write || is_writable_pte(old))
        {
            // Someone mapped it first: `RET_PF_SPURIOUS`.
            return Map::Done;
        }
        let host_writable = !slot.readonly();
        let logging = slot.dirty_logging();
        let tracked = goal == PT_PAGE_TABLE_LEVEL && slot.is_write_tracked(gfn);
        let writable = host_writable && !tracked && (write || !logging);
        let mut new = make_leaf_spte(pfn, goal, host_writable, writable);
        if tracked {
            new &= !SPTE_MMU_WRITEABLE;
        }
        let mut cur = old;
        if !tdp_mmu_set_spte_atomic(iter.sptep(section), &mut cur, new, &self.mmu.breakage) {
            return Map::Retry;
        }
        if is_shadow_present_pte(old) && !is_last_spte(old, goal) {
            // A table where the huge leaf went: take it apart, and flush
            // before our section ends (its memory waits for the section).
            // SAFETY: a present non-leaf spte of one of our tables.
            let child = unsafe { SpPtr::from_nonleaf_spte(old) };
            self.handle_removed_pt(section, child, true);
            if self.mmu.breakage.tdp_flush_after_section() {
                if writable && logging {
                    self.mark_page_dirty_in_slot(slot, base, ring);
                }
                return Map::DoneFlushAfterSection;
            }
            self.kvm_flush_remote_tlbs();
        } else if !is_shadow_present_pte(old) {
            self.mmu.stats.sptes_mapped.inc();
            if goal > PT_PAGE_TABLE_LEVEL {
                self.mmu.stats.large_sptes_mapped.inc();
            }
        }
        if writable && logging && !self.mmu.breakage.slow_fault_skips_mark_dirty() {
            self.mark_page_dirty_in_slot(slot, base, ring);
        }
        Map::Done
    }

    /// The TDP MMU's `fast_page_fault`: in a read-side section, with no
    /// lock, sets W on a present, MMU-writable leaf by compare-exchange, at
    /// most [`FAST_PF_TRIES`] times; never on a huge leaf of a logged slot
    /// (only one 4 KiB page would be marked). Returns true when the access
    /// can be retried (fixed, or already writable).
    fn tdp_fast_page_fault(&self, vcpu: &VcpuShared, ring: Option<&DirtyRing>, gfn: u64, asid: u16) -> bool {
        let Some(root) = self.mmu.root(asid) else { return false };
        // The vCPU's walk mode stands for `kvm->srcu`, which orders this path
        // with enable-logging's memslot update (mmu/fast_fault.rs); the
        // section keeps the tables.
        let _srcu = LocklessWalk::begin(vcpu);
        let section = self.mmu.rcu.read_lock();
        for _ in 0..FAST_PF_TRIES {
            // `kvm_tdp_mmu_fast_pf_get_last_sptep`: the last entry on gfn's path.
            let mut iter = TdpIter::start(&section, root, PT_PAGE_TABLE_LEVEL, gfn);
            let (mut level, mut spte, mut sptep) = (iter.level, iter.old_spte, iter.sptep(&section));
            while iter.within(gfn + 1) {
                (level, spte, sptep) = (iter.level, iter.old_spte, iter.sptep(&section));
                iter.next(&section);
            }
            if !is_shadow_present_pte(spte) || !is_last_spte(spte, level) {
                return false;
            }
            if is_writable_pte(spte) {
                return true;
            }
            if spte & SPTE_MMU_WRITEABLE == 0 {
                return false;
            }
            let slots = self.memslots.load();
            let Some(slot) = slots.find(gfn) else { return false };
            if level > PT_PAGE_TABLE_LEVEL && slot.dirty_logging() {
                return false;
            }
            // `sptep` is bound to `section`: its table is not freed under us.
            if tdp_fast_pf_fix_spte(sptep, spte, &self.mmu.breakage) {
                if slot.dirty_logging() {
                    self.mark_page_dirty_in_slot(slot, gfn, ring);
                }
                self.mmu.stats.fast_page_faults.inc();
                return true;
            }
        }
        false
    }
}

//! The seed's lock-free operations, as free functions over the primitive
//! structures (one spte, one pte_list, one dirty bitmap), so that the engine
//! and the loom models (`crate::loom_models`) run the very same code.
//!
//! # The ordering argument (patch 06, in our words)
//!
//! A page is safe to report clean only if no spte can write it without a
//! fault. The lockless harvester learns which pages to write-protect from the
//! dirty bitmap: it swaps a word with 0 (acquire), then walks the rmaps of the
//! bits it took and clears W on every writable leaf spte it finds. For that
//! walk to find every writable spte behind a bit, the side that makes an spte
//! writable must publish it in this order:
//!
//! 1. the spte is writable;
//! 2. the spte is in its gfn's rmap;
//! 3. a release fence;
//! 4. the dirty bit is set.
//!
//! The harvester's acquire swap reads the bit set in (4), so it
//! synchronises with the fence (3) and sees (1) and (2): its rmap walk finds
//! the spte and finds it writable, and clears W. The two interleavings of
//! patch 06's comment are exactly what goes wrong without (3): the bit is
//! seen and the rmap walked before the spte is in it, or before it is
//! writable; either way the bit is gone and the spte stays writable, and the
//! page's next writes are lost to the log.
//!
//! The fast page fault follows the same order: its compare-exchange makes
//! the spte writable (1; the spte is in its rmap already, 2), then the fence
//! (3), then the bit (4).

use crate::breakage::Breakage;
use crate::dirty_bitmap::DirtyBitmap;
use crate::pte_list::PteListHead;
use crate::spte::{
    PT_WRITABLE_MASK, is_last_spte_by_encoding, is_writable_pte, spte_is_locklessly_modifiable,
};
use crate::sync::atomic::{AtomicU64, Ordering, fence};

/// Steps 3 and 4 of the module docs: the release fence, then the dirty bit
/// of page `rel_gfn` (`smp_wmb(); mark_page_dirty()` in `set_spte`).
#[inline]
pub(crate) fn mark_page_dirty_after_publish(bitmap: &DirtyBitmap, rel_gfn: u64, b: &Breakage) {
    if !b.skip_dirty_bit_fence {
        // Release: pairs with the harvester's AcqRel swap of the word
        // (`DirtyBitmap::take_word`); orders the spte update and rmap add
        // before the bit (module docs).
        fence(Ordering::Release);
    }
    bitmap.mark(rel_gfn);
}

/// `mmu_spte_update`'s answer: must remote TLBs be flushed after replacing
/// `old` by `new`?
///
/// Patch 04: in the lockless design an spte may lose W without `mmu_lock`
/// (lockless write protection) and without a flush yet (that comes after the
/// walk). A locked path that then makes the same spte read-only must not
/// conclude from "W was already clear" that no vCPU can write through it:
/// the vCPU's TLB may still hold W. So it asks whether the spte *could* be
/// writable without the lock (host- and MMU-writable), not whether it is.
#[inline]
pub(crate) fn spte_update_needs_flush(old: u64, new: u64, lockless: bool, b: &Breakage) -> bool {
    if lockless && !b.skip_patch04_flush_rule {
        spte_is_locklessly_modifiable(old) && !is_writable_pte(new)
    } else {
        is_writable_pte(old) && !is_writable_pte(new)
    }
}

/// `__rmap_write_protect_lockless` (patch 13): clears W on `sptep` if it is a
/// present, last-level, writable spte, in a compare-exchange loop. Returns
/// whether it cleared W (so a remote TLB flush is owed).
///
/// The level comes from the spte itself, not from the shadow page header
/// (the review of patch 12): the walker may hold a pointer into a shadow page
/// that was zapped and reused for another table since. Then it sees either a
/// non-leaf entry (never touched) or some other leaf (W cleared, which costs
/// that leaf one extra fault), never freed memory (shadow pages are
/// type-stable).
#[inline]
pub(crate) fn spte_write_protect_lockless(sptep: &AtomicU64) -> bool {
    // Relaxed: the compare-exchange below is what orders; a stale value only
    // makes it fail and retry.
    let mut spte = sptep.load(Ordering::Relaxed);
    loop {
        #[cfg(feature = "break-rules")]
        if spte == crate::spte::SPTE_POISON {
            crate::stats::POISON_READS.inc();
            return false;
        }
        if !is_last_spte_by_encoding(spte) || !is_writable_pte(spte) {
            return false;
        }
        // AcqRel: the release half orders our clear of W before the remote TLB
        // flush request that follows the walk; the acquire half pairs with the
        // fast path's compare-exchange that set W.
        match sptep.compare_exchange_weak(spte, spte & !PT_WRITABLE_MASK, Ordering::AcqRel, Ordering::Relaxed)
        {
            Ok(_) => return true,
            Err(now) => spte = now,
        }
    }
}

/// `rmap_write_protect_lockless`: write-protects every spte in `head`'s
/// list without `mmu_lock`. Returns how many sptes lost W, and how many
/// times the walk restarted.
///
/// # Safety
/// As [`PteListHead::walk_lockless`]: the caller is inside a read-side
/// section of the grace period guarding descriptor and shadow page memory.
#[inline]
pub(crate) unsafe fn rmap_write_protect_lockless(head: &PteListHead, b: &Breakage) -> (usize, usize) {
    let mut cleared = 0;
    let protect = |sptep: crate::pte_list::SptePtr| {
        // SAFETY: each entry points into a type-stable shadow page table,
        // valid memory for the whole read-side section (contract).
        let sptep = unsafe { sptep.as_ref() };
        cleared += usize::from(spte_write_protect_lockless(sptep));
    };
    // SAFETY: forwarded contract.
    let restarts = unsafe { head.walk_lockless(b, protect) };
    (cleared, restarts)
}

/// `fast_pf_fix_direct_spte` (patch 02): sets W on a locklessly modifiable
/// spte that still holds the value `spte` the caller saw. Returns whether the
/// compare-exchange won; the caller then marks the page dirty with
/// [`mark_page_dirty_after_publish`].
#[inline]
pub(crate) fn fast_pf_fix_direct_spte(sptep: &AtomicU64, spte: u64) -> bool {
    debug_assert!(spte_is_locklessly_modifiable(spte));
    // AcqRel: acquire pairs with the harvester's compare-exchange that cleared
    // W (we fail if it got in between); release orders nothing by itself: the
    // dirty bit is ordered by the fence in `mark_page_dirty_after_publish`.
    sptep.compare_exchange(spte, spte | PT_WRITABLE_MASK, Ordering::AcqRel, Ordering::Relaxed).is_ok()
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::spte::{make_leaf_spte, make_nonleaf_spte};

    #[test]
    fn lockless_write_protect_touches_only_writable_leaves() {
        let leaf = AtomicU64::new(make_leaf_spte(7, 1, true, true));
        assert!(spte_write_protect_lockless(&leaf));
        assert!(!is_writable_pte(leaf.load(Ordering::Relaxed)));
        assert!(!spte_write_protect_lockless(&leaf), "already read-only: nothing to do");
        let large = AtomicU64::new(make_leaf_spte(0x200, 2, true, true));
        assert!(spte_write_protect_lockless(&large), "large leaves are made read-only (patch 03)");
        let table = AtomicU64::new(make_nonleaf_spte(0x1000, 2));
        assert!(!spte_write_protect_lockless(&table), "never clear W on a table pointer");
        assert!(is_writable_pte(table.load(Ordering::Relaxed)));
        let empty = AtomicU64::new(0);
        assert!(!spte_write_protect_lockless(&empty));
    }

    #[test]
    fn the_patch_04_flush_rule() {
        let protected = make_leaf_spte(7, 1, true, false);
        let ro_host = make_leaf_spte(7, 1, false, false);
        let b = Breakage::SEED;
        assert!(spte_update_needs_flush(protected, protected & !crate::spte::SPTE_MMU_WRITEABLE, true, &b));
        assert!(!spte_update_needs_flush(protected, protected, false, &b), "locked: W was clear");
        assert!(!spte_update_needs_flush(ro_host, ro_host, true, &b), "never writable: no flush");
        let broken = Breakage { skip_patch04_flush_rule: true, ..b };
        assert!(!spte_update_needs_flush(protected, protected, true, &broken));
    }

    #[test]
    fn fast_fix_loses_to_a_concurrent_change() {
        let s = make_leaf_spte(7, 1, true, false);
        let sptep = AtomicU64::new(s);
        assert!(fast_pf_fix_direct_spte(&sptep, s));
        assert!(is_writable_pte(sptep.load(Ordering::Relaxed)));
        assert!(!fast_pf_fix_direct_spte(&sptep, s), "the value changed: no fix");
    }
}

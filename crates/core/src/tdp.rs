//! The TDP MMU's spte operations (`arch/x86/kvm/mmu/tdp_mmu.c`,
//! `tdp_iter.h`, `spte.c`), with nothing of the tree around them, so that
//! loom checks the code the engine's `tdp` design runs.
//!
//! Upstream's rules, by the lock a writer holds:
//! - **read lock** (faults, enable-logging, eager split): every store is a
//!   compare-exchange ([`tdp_mmu_set_spte_atomic`]); a loser re-reads and
//!   re-evaluates the same entry. A multi-step change parks the entry at
//!   [`FROZEN_SPTE`], which nobody else overwrites.
//! - **write lock** (the dirty-log re-arm, zaps): plain stores, unless the
//!   spte is volatile ([`spte_needs_atomic_update`]): then `xchg` or
//!   `fetch_and`, so a W the fast path set, or a D the CPU set, since the
//!   writer read the spte is kept ([`tdp_mmu_clear_spte_bits`],
//!   [`tdp_mmu_write_spte`]).
//! - **no lock** (the fast path): one compare-exchange that sets W on an
//!   MMU-writable spte, and the CPU, which sets D (`pml`).

use crate::breakage::Breakage;
use crate::spte::{
    PT_DIRTY_MASK, PT_WRITABLE_MASK, SPTE_MMU_WRITEABLE, is_last_spte_by_encoding, is_shadow_present_pte,
    is_writable_pte,
};
use crate::sync::atomic::{AtomicU64, Ordering};

/// `FROZEN_SPTE` (once `REMOVED_SPTE`): a non-present value no spte ever
/// holds otherwise (no present bit, no pfn), that parks an entry while a
/// read-lock holder changes it in several steps. Upstream's value is
/// `SHADOW_NONPRESENT_VALUE | 0x1a0`; our non-present value is 0.
pub const FROZEN_SPTE: u64 = 0x1a0;

/// Is the spte parked?
#[inline]
pub const fn is_frozen_spte(spte: u64) -> bool {
    spte == FROZEN_SPTE
}

/// `spte_needs_atomic_update`: may a writer that does not hold `mmu_lock`
/// for write change this spte, so that a write-lock holder must update it
/// atomically? A present leaf that is read-only but MMU-writable (the fast
/// path may set W), or writable but not dirty (the CPU may set D). Accessed
/// alone does not count (upstream's rule); we model no A/D-disabled sptes.
#[inline]
pub const fn spte_needs_atomic_update(spte: u64) -> bool {
    if !is_last_spte_by_encoding(spte) {
        return false;
    }
    let mmu_writable = spte & SPTE_MMU_WRITEABLE != 0;
    (!is_writable_pte(spte) && mmu_writable) || (is_writable_pte(spte) && spte & PT_DIRTY_MASK == 0)
}

/// `__tdp_mmu_set_spte_atomic`: under the read lock, replaces `*old` with
/// `new` if the entry still holds it. On failure `*old` is the value found
/// (`try_cmpxchg64`'s refresh) and the caller re-evaluates the same entry.
///
/// A frozen entry is never the expected value: its owner finishes with a
/// plain store (module docs).
#[inline]
pub fn tdp_mmu_set_spte_atomic(sptep: &AtomicU64, old: &mut u64, new: u64, breakage: &Breakage) -> bool {
    debug_assert!(!is_frozen_spte(*old), "a frozen spte is its owner's");
    if breakage.tdp_plain_store_under_read_lock() {
        // Broken on purpose: a plain store of a value computed from a
        // snapshot, as a write-lock holder would make it.
        sptep.store(new, Ordering::Release);
        return true;
    }
    // AcqRel: release publishes a child table linked by this store (its
    // entries, written before) to walkers that load the entry with acquire;
    // acquire pairs with the fast path's release compare-exchange and with
    // other read-lock holders', so a value we replace is one we have seen
    // whole. Failure: acquire, for the same reason on the refreshed value.
    match sptep.compare_exchange(*old, new, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => true,
        Err(cur) => {
            *old = cur;
            false
        }
    }
}

/// `kvm_tdp_mmu_write_spte`: under the write lock, stores `new` over an
/// entry last seen as `old`; returns the value it replaced. Atomic (`xchg`)
/// when `old` is volatile, so that a W or D set since is returned, not lost.
#[inline]
pub fn tdp_mmu_write_spte(sptep: &AtomicU64, old: u64, new: u64) -> u64 {
    if spte_needs_atomic_update(old) {
        // AcqRel: acquire pairs with the fast path's compare-exchange (its W
        // is in the value returned); release publishes `new`.
        sptep.swap(new, Ordering::AcqRel)
    } else {
        // Release: pairs with walkers' acquire loads.
        sptep.store(new, Ordering::Release);
        old
    }
}

/// `tdp_mmu_clear_spte_bits`: under the write lock, clears `mask` in an
/// entry last seen as `old`; returns the value before. `fetch_and` when the
/// spte is volatile (a fast path's W or the CPU's D set since we read it
/// survives in every bit we do not clear), else a plain store.
#[inline]
pub fn tdp_mmu_clear_spte_bits(sptep: &AtomicU64, old: u64, mask: u64) -> u64 {
    if spte_needs_atomic_update(old) {
        // AcqRel: as in `tdp_mmu_write_spte`.
        sptep.fetch_and(!mask, Ordering::AcqRel)
    } else {
        // Release: as in `tdp_mmu_write_spte`.
        sptep.store(old & !mask, Ordering::Release);
        old
    }
}

/// `fast_pf_fix_direct_spte` on the TDP MMU: sets W on a present,
/// MMU-writable leaf that still holds `spte`, without `mmu_lock`. Returns
/// whether the compare-exchange won. It never sets D (upstream's comment:
/// with PML the write itself logs the page again).
#[inline]
pub fn tdp_fast_pf_fix_spte(sptep: &AtomicU64, spte: u64) -> bool {
    debug_assert!(is_shadow_present_pte(spte) && spte & SPTE_MMU_WRITEABLE != 0);
    // AcqRel: acquire pairs with the write-lock holder's `fetch_and` or
    // `xchg` (we fail if it got in between), release publishes W to it.
    sptep.compare_exchange(spte, spte | PT_WRITABLE_MASK, Ordering::AcqRel, Ordering::Relaxed).is_ok()
}

/// The CPU's dirty-bit update on a write through a writable spte with D
/// clear (Intel PML's trigger): sets D if the entry still holds `spte`.
/// Returns whether this write set it (and so logs the page).
#[inline]
pub fn hardware_set_dirty(sptep: &AtomicU64, spte: u64) -> bool {
    debug_assert!(is_writable_pte(spte) && spte & PT_DIRTY_MASK == 0);
    // AcqRel: as the fast path's.
    sptep.compare_exchange(spte, spte | PT_DIRTY_MASK, Ordering::AcqRel, Ordering::Relaxed).is_ok()
}

/// `handle_removed_pt`'s first step, shared (read lock): parks each entry
/// of an unlinked table at [`FROZEN_SPTE`] with `xchg`, spinning while one
/// is already frozen (its owner is mid-change and finishes with a plain
/// store), and hands each old value to `f`. The entries stay frozen: the
/// table goes back to its pool only after a grace period, cleaned then.
pub fn freeze_removed_pt(table: &[AtomicU64], mut f: impl FnMut(usize, u64)) {
    for (i, sptep) in table.iter().enumerate() {
        let backoff = crate::sync::Backoff::new();
        let old = loop {
            // AcqRel: acquire takes whatever the last writer published (a
            // fast path's W); release orders nothing we need.
            let old = sptep.swap(FROZEN_SPTE, Ordering::AcqRel);
            if !is_frozen_spte(old) {
                break old;
            }
            backoff.snooze();
        };
        f(i, old);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::spte::make_leaf_spte;

    #[test]
    fn volatile_sptes_are_the_ones_others_may_change() {
        let rw_dirty = make_leaf_spte(7, 1, true, true);
        assert!(!spte_needs_atomic_update(rw_dirty), "W and D set: nothing left for others to set");
        assert!(spte_needs_atomic_update(rw_dirty & !PT_DIRTY_MASK), "the CPU may set D");
        assert!(spte_needs_atomic_update(rw_dirty & !PT_WRITABLE_MASK), "the fast path may set W");
        let ro = make_leaf_spte(7, 1, false, false);
        assert!(!spte_needs_atomic_update(ro), "read-only for good");
        assert!(!spte_needs_atomic_update(0));
        assert!(!spte_needs_atomic_update(FROZEN_SPTE));
    }

    #[test]
    fn a_failed_compare_exchange_refreshes_the_snapshot() {
        let s = make_leaf_spte(7, 1, true, false);
        let sptep = AtomicU64::new(s | PT_WRITABLE_MASK);
        let mut old = s;
        assert!(!tdp_mmu_set_spte_atomic(&sptep, &mut old, 0, &Breakage::SEED));
        assert_eq!(old, s | PT_WRITABLE_MASK);
        assert!(tdp_mmu_set_spte_atomic(&sptep, &mut old, 0, &Breakage::SEED));
        assert_eq!(sptep.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn clearing_bits_keeps_what_others_set_since() {
        let s = make_leaf_spte(7, 1, true, false);
        let sptep = AtomicU64::new(s);
        // The fast path sets W after our snapshot `s`.
        assert!(tdp_fast_pf_fix_spte(&sptep, s));
        let before = tdp_mmu_clear_spte_bits(&sptep, s, PT_DIRTY_MASK);
        assert!(is_writable_pte(before), "the W set since is seen");
        assert!(is_writable_pte(sptep.load(Ordering::Relaxed)), "and kept");
    }

    #[test]
    fn freezing_hands_out_every_old_value() {
        let table: Vec<AtomicU64> = (0..4).map(AtomicU64::new).collect();
        let mut seen = Vec::new();
        freeze_removed_pt(&table, |i, old| seen.push((i, old)));
        assert_eq!(seen, [(0, 0), (1, 1), (2, 2), (3, 3)]);
        assert!(table.iter().all(|s| is_frozen_spte(s.load(Ordering::Relaxed))));
    }
}

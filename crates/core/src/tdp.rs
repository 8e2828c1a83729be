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
pub fn tdp_fast_pf_fix_spte(sptep: &AtomicU64, spte: u64, breakage: &Breakage) -> bool {
    debug_assert!(is_shadow_present_pte(spte) && spte & SPTE_MMU_WRITEABLE != 0);
    if breakage.tdp_fast_path_plain_store() {
        // Broken on purpose: the snapshot, with W, stored over whatever is
        // there now.
        sptep.store(spte | PT_WRITABLE_MASK, Ordering::Release);
        return true;
    }
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
pub fn freeze_removed_pt(table: &[AtomicU64], breakage: &Breakage, mut f: impl FnMut(usize, u64)) {
    for (i, sptep) in table.iter().enumerate() {
        if breakage.tdp_removed_pt_without_freeze() {
            // Broken on purpose: read, and left for anyone to change.
            f(i, sptep.load(Ordering::Acquire));
            continue;
        }
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
        assert!(tdp_fast_pf_fix_spte(&sptep, s, &Breakage::SEED));
        let before = tdp_mmu_clear_spte_bits(&sptep, s, PT_DIRTY_MASK);
        assert!(is_writable_pte(before), "the W set since is seen");
        assert!(is_writable_pte(sptep.load(Ordering::Relaxed)), "and kept");
    }

    #[test]
    fn freezing_hands_out_every_old_value() {
        let table: Vec<AtomicU64> = (0..4).map(AtomicU64::new).collect();
        let mut seen = Vec::new();
        freeze_removed_pt(&table, &Breakage::SEED, |i, old| seen.push((i, old)));
        assert_eq!(seen, [(0, 0), (1, 1), (2, 2), (3, 3)]);
        assert!(table.iter().all(|s| is_frozen_spte(s.load(Ordering::Relaxed))));
    }
}

/// loom models of the TDP MMU's races, over the primitives above (the code
/// the engine's `tdp` design runs); see `loom_support`.
#[cfg(all(test, loom))]
mod loom_tests {
    use loom::sync::Arc;

    use super::*;
    use crate::loom_support::{check, two};
    use crate::spte::{PT_PAGE_SIZE_MASK, make_leaf_spte};

    /// A stand-in for a table's address in a non-leaf entry (present, W, no
    /// PS): the models' trees have one table.
    const TABLE: u64 = 0x7000 | crate::spte::PT_PRESENT_MASK | PT_WRITABLE_MASK;

    /// One 2 MiB entry, and the table of two 4 KiB children a split links
    /// under it (512 in the engine; two show the race).
    struct Huge {
        entry: AtomicU64,
        children: [AtomicU64; 2],
    }

    impl Huge {
        fn new(entry: u64) -> Arc<Self> {
            Arc::new(Self { entry: AtomicU64::new(entry), children: [AtomicU64::new(0), AtomicU64::new(0)] })
        }

        /// A fault's split in place under the read lock
        /// (`tdp_mmu_link_sp` after `tdp_mmu_split_huge_page`): children
        /// from the huge leaf as last read, then the link; a loser
        /// re-evaluates the entry (here: refills from the new value).
        fn split(&self, b: &Breakage) {
            let mut old = self.entry.load(Ordering::Acquire);
            loop {
                if old & PT_PAGE_SIZE_MASK == 0 {
                    return; // Someone split it first.
                }
                for c in &self.children {
                    // Relaxed: unreachable until the link publishes it.
                    c.store(old & !PT_PAGE_SIZE_MASK, Ordering::Relaxed);
                }
                if tdp_mmu_set_spte_atomic(&self.entry, &mut old, TABLE, b) {
                    return;
                }
            }
        }

        /// `wrprot_gfn_range` under the read lock: W off every writable
        /// leaf, re-evaluating an entry that changed, stepping down into a
        /// table (after re-reading the entry). Returns whether it found the
        /// table.
        fn wrprot(&self, b: &Breakage) -> bool {
            let mut old = self.entry.load(Ordering::Acquire);
            loop {
                if old == TABLE {
                    for c in &self.children {
                        let mut o = c.load(Ordering::Acquire);
                        while is_writable_pte(o) {
                            let new = o & !PT_WRITABLE_MASK;
                            if tdp_mmu_set_spte_atomic(c, &mut o, new, b) {
                                break;
                            }
                        }
                    }
                    return true;
                }
                let new = old & !PT_WRITABLE_MASK;
                if !is_writable_pte(old) || tdp_mmu_set_spte_atomic(&self.entry, &mut old, new, b) {
                    return false;
                }
            }
        }

        /// After write protection: no writable leaf is reachable.
        fn assert_protected(&self) {
            let e = self.entry.load(Ordering::SeqCst);
            let leaves: Vec<u64> = if e == TABLE {
                self.children.iter().map(|c| c.load(Ordering::SeqCst)).collect()
            } else {
                vec![e]
            };
            assert!(
                leaves.iter().all(|&s| !is_writable_pte(s)),
                "a writable leaf left after write protection: {e:#x} {leaves:x?}"
            );
        }
    }

    /// Enable-logging's W-clear against a fault that splits the same huge
    /// leaf, both under the read lock: whichever compare-exchange comes
    /// second sees the first's value and re-evaluates.
    fn split_against_wrprot(b: Breakage) {
        check(move || {
            let h = Huge::new(make_leaf_spte(0x200, 2, true, true));
            let (h1, h2) = (h.clone(), h.clone());
            let (_, found_table) = two(move || h1.split(&b), move || h2.wrprot(&b));
            h.assert_protected();
            found_table
        });
    }

    #[test]
    fn loom_a_split_against_the_w_clear() {
        split_against_wrprot(Breakage::SEED);
    }

    /// The fast path's W-set against a write-lock holder's zap of the same
    /// spte (`tdp_mmu_zap_leafs`: memslot deletion, an mmu notifier): a zap
    /// stays a zap.
    fn fast_path_against_zap(b: Breakage) {
        check(move || {
            let s = make_leaf_spte(7, 1, true, false);
            let sptep = Arc::new(AtomicU64::new(s));
            let (f, z) = (sptep.clone(), sptep.clone());
            let (fixed, _) = two(
                move || {
                    // Acquire: as the fast path's walk.
                    let old = f.load(Ordering::Acquire);
                    is_shadow_present_pte(old) && !is_writable_pte(old) && tdp_fast_pf_fix_spte(&f, old, &b)
                },
                move || {
                    // Relaxed: under the write lock; the atomic write below
                    // returns what the fast path did.
                    let old = z.load(Ordering::Relaxed);
                    tdp_mmu_write_spte(&z, old, 0)
                },
            );
            assert_eq!(sptep.load(Ordering::SeqCst), 0, "a zapped spte came back");
            fixed
        });
    }

    #[test]
    fn loom_the_fast_path_against_a_zap() {
        fast_path_against_zap(Breakage::SEED);
    }

    /// A read-lock holder that reached a table before it was unlinked links
    /// a child table into it, against the unlinker taking the table apart
    /// (`handle_removed_pt`, shared): either the link fails on a frozen
    /// entry, or the unlinker sees the child and takes it apart too.
    fn frozen_against_a_link(b: Breakage) {
        check(move || {
            let table = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
            let (t1, t2) = (table.clone(), table.clone());
            let (linked, freed) = two(
                move || {
                    let mut old = t1[1].load(Ordering::Acquire);
                    // `kvm_tdp_mmu_map`: a frozen entry is a retry.
                    !is_frozen_spte(old) && old == 0 && tdp_mmu_set_spte_atomic(&t1[1], &mut old, TABLE, &b)
                },
                move || {
                    let mut freed = false;
                    freeze_removed_pt(&*t2, &b, |_, old| freed |= old == TABLE);
                    freed
                },
            );
            assert!(!linked || freed, "a table linked into a removed table leaked");
            (linked, freed)
        });
    }

    #[test]
    fn loom_frozen_against_a_link() {
        frozen_against_a_link(Breakage::SEED);
    }

    /// One 4 KiB page logged by D bits (PML): its spte, its dirty bit, and
    /// a vCPU's TLB entry, which caches W with D set (a store through it
    /// sets nothing and logs nothing).
    struct DPage {
        spte: AtomicU64,
        bitmap: crate::dirty_bitmap::DirtyBitmap,
        tlb_dirty: loom::sync::atomic::AtomicBool,
    }

    impl DPage {
        /// Written and logged, the vCPU's TLB holding the entry.
        fn new() -> Arc<Self> {
            let p = Arc::new(Self {
                spte: AtomicU64::new(make_leaf_spte(7, 1, true, true)),
                bitmap: crate::dirty_bitmap::DirtyBitmap::new(1),
                tlb_dirty: loom::sync::atomic::AtomicBool::new(true),
            });
            p.bitmap.mark(0);
            p
        }

        /// GET's re-arm with PML (`kvm_tdp_mmu_clear_dirty_pt_masked`,
        /// under the write lock), then the flush after unlock.
        fn harvest(&self, b: &Breakage) -> u64 {
            let mask = self.bitmap.take_word(0);
            if mask != 0 {
                // Relaxed: under the write lock; the fetch_and below reads
                // what the CPU set since.
                let old = self.spte.load(Ordering::Relaxed);
                if old & PT_DIRTY_MASK != 0 {
                    tdp_mmu_clear_spte_bits(&self.spte, old, PT_DIRTY_MASK);
                }
                if !b.skip_get_dirty_log_flush() {
                    self.tlb_dirty.store(false, Ordering::SeqCst);
                }
            }
            mask
        }

        /// A store by the vCPU: through its TLB entry if it has one; else a
        /// walk that sets D (appending to the PML log, drained into the
        /// bitmap) if it was clear, and fills the TLB.
        fn store(&self) {
            if self.tlb_dirty.load(Ordering::SeqCst) {
                return;
            }
            loop {
                // Acquire: as the page walk.
                let s = self.spte.load(Ordering::Acquire);
                if s & PT_DIRTY_MASK != 0 {
                    break;
                }
                if hardware_set_dirty(&self.spte, s) {
                    self.bitmap.mark(0);
                    break;
                }
            }
            self.tlb_dirty.store(true, Ordering::SeqCst);
        }
    }

    /// The D-bit clear against a store through a TLB entry that caches D:
    /// after the harvest's flush no entry caches D over an spte whose D is
    /// clear, so the next store sets D and logs the page.
    fn d_clear_against_a_stale_tlb(b: Breakage) {
        check(move || {
            let p = DPage::new();
            let (h, v) = (p.clone(), p.clone());
            let (mask, _) = two(move || h.harvest(&b), move || v.store());
            let d = p.spte.load(Ordering::SeqCst) & PT_DIRTY_MASK != 0;
            assert!(d || !p.tlb_dirty.load(Ordering::SeqCst), "a TLB entry caches D over a clean spte");
            (mask, d)
        });
    }

    #[test]
    fn loom_the_d_clear_against_a_stale_tlb_entry() {
        d_clear_against_a_stale_tlb(Breakage::SEED);
    }

    /// GET with PML against a vCPU whose store is still in its PML log: the
    /// harvest kicks the vCPU and waits until it drained (at its next
    /// access boundary, or at its exit, whichever comes first) before it
    /// takes the bits, so the store is reported by this harvest.
    fn pml_drain_before_the_harvest(b: Breakage) {
        use loom::sync::atomic::AtomicBool;
        check(move || {
            let bitmap = Arc::new(crate::dirty_bitmap::DirtyBitmap::new(1));
            // The vCPU set D and logged the page; the log is not drained.
            let logged = Arc::new(AtomicBool::new(true));
            let (kick, drained) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
            let (bm, lg, k, dr) = (bitmap.clone(), logged.clone(), kick.clone(), drained.clone());
            let vcpu = move || {
                let drain = || {
                    if lg.swap(false, Ordering::AcqRel) {
                        bm.mark(0);
                    }
                    // Release: the drain's mark before the harvester's
                    // acquire load.
                    dr.store(true, Ordering::Release);
                };
                for _ in 0..2 {
                    if k.load(Ordering::SeqCst) {
                        return drain();
                    }
                    loom::thread::yield_now();
                }
                // Its exit, which drains too.
                drain()
            };
            let harvester = move || {
                let mut waited = false;
                if !b.pml_skip_sync() {
                    kick.store(true, Ordering::SeqCst);
                    // Acquire: pairs with the drain's release store.
                    while !drained.load(Ordering::Acquire) {
                        waited = true;
                        loom::thread::yield_now();
                    }
                }
                let mask = bitmap.take_word(0);
                assert_eq!(mask, 1, "a store made before the harvest is not reported by it");
                waited
            };
            let (_, waited) = two(vcpu, harvester);
            waited
        });
    }

    #[test]
    fn loom_the_pml_drain_before_the_harvest() {
        pml_drain_before_the_harvest(Breakage::SEED);
    }

    /// The read-side section that unlinks a table (a fault maps a huge leaf
    /// where it was) against a vCPU in guest mode walking that table, and a
    /// third thread that reclaims it after its grace period. vCPUs in guest
    /// mode are in no section: the unlinker's remote flush, which waits for
    /// them to leave guest mode, must come before its section ends, so that
    /// the grace period ends after them.
    fn flush_before_the_section_ends(b: Breakage) {
        use loom::sync::atomic::AtomicBool;
        const LEAF: u64 = PT_PAGE_SIZE_MASK | crate::spte::PT_PRESENT_MASK;
        struct World {
            /// The unlinker's read-side section is open: the grace period
            /// the reclaimer waits for (the one reader that matters here;
            /// `rcu.rs` has the grace period's own model).
            section: AtomicBool,
            entry: AtomicU64,
            freed: AtomicBool,
            guest_mode: AtomicBool,
            request: AtomicBool,
        }
        check(move || {
            let w = Arc::new(World {
                section: AtomicBool::new(true),
                entry: AtomicU64::new(TABLE),
                freed: AtomicBool::new(false),
                guest_mode: AtomicBool::new(true),
                request: AtomicBool::new(false),
            });
            // `kvm_flush_remote_tlbs`: the request, then wait for the vCPU
            // to leave guest mode.
            let flush = |w: &World| {
                w.request.store(true, Ordering::SeqCst);
                while w.guest_mode.load(Ordering::SeqCst) {
                    loom::thread::yield_now();
                }
            };
            let (wv, wu, wr) = (w.clone(), w.clone(), w.clone());
            let vcpu = loom::thread::spawn(move || {
                let mut walked = false;
                for _ in 0..2 {
                    // The hardware walk: through the table while it is linked.
                    if wv.entry.load(Ordering::Acquire) == TABLE {
                        walked = true;
                        assert!(
                            !wv.freed.load(Ordering::SeqCst),
                            "a vCPU in guest mode walked a freed table"
                        );
                    }
                    // The access boundary: a request makes it leave.
                    if wv.request.load(Ordering::SeqCst) {
                        break;
                    }
                }
                wv.guest_mode.store(false, Ordering::SeqCst);
                walked
            });
            let unlinker = loom::thread::spawn(move || {
                // In its section from the start.
                let mut old = TABLE;
                assert!(tdp_mmu_set_spte_atomic(&wu.entry, &mut old, LEAF, &b));
                if !b.tdp_flush_after_section() {
                    flush(&wu);
                }
                wu.section.store(false, Ordering::SeqCst);
                if b.tdp_flush_after_section() {
                    flush(&wu);
                }
            });
            let reclaimer = loom::thread::spawn(move || {
                // Another thread's reclaim: a table it finds unlinked goes
                // back to the pool after a grace period.
                if wr.entry.load(Ordering::Acquire) != TABLE && !wr.section.load(Ordering::SeqCst) {
                    wr.freed.store(true, Ordering::SeqCst);
                }
            });
            unlinker.join().unwrap();
            reclaimer.join().unwrap();
            vcpu.join().unwrap()
        });
    }

    #[test]
    fn loom_the_flush_before_the_unlinking_section_ends() {
        flush_before_the_section_ends(Breakage::SEED);
    }

    /// A walk that yields (`tdp_mmu_iter_cond_resched`: it leaves its
    /// read-side section, lets a waiter take the lock, and comes back)
    /// against a fault that replaces the table it was walking by a huge leaf
    /// and a reclaim of that table: the walk restarts from the root, so it
    /// never touches a table unlinked while it was out.
    fn restart_after_a_yield(b: Breakage) {
        use loom::sync::atomic::AtomicBool;
        const LEAF: u64 = PT_PAGE_SIZE_MASK | crate::spte::PT_PRESENT_MASK | PT_WRITABLE_MASK;
        struct World {
            /// The walker's read-side section is open.
            section: AtomicBool,
            entry: AtomicU64,
            table: [AtomicU64; 2],
            freed: AtomicBool,
        }
        check(move || {
            let leaf = make_leaf_spte(7, 1, true, true);
            let w = Arc::new(World {
                section: AtomicBool::new(true),
                entry: AtomicU64::new(TABLE),
                table: [AtomicU64::new(leaf), AtomicU64::new(leaf)],
                freed: AtomicBool::new(false),
            });
            let (ww, wf) = (w.clone(), w.clone());
            let (went_down, _) = two(
                move || {
                    // W off the table's first entry, then a yield.
                    let mut o = ww.table[0].load(Ordering::Acquire);
                    let new = o & !PT_WRITABLE_MASK;
                    let _ = tdp_mmu_set_spte_atomic(&ww.table[0], &mut o, new, &b);
                    ww.section.store(false, Ordering::SeqCst);
                    ww.section.store(true, Ordering::SeqCst);
                    // SeqCst fence: the reader's half (`Rcu::read_lock`),
                    // between the re-entry and the restart's re-read.
                    crate::sync::atomic::fence(Ordering::SeqCst);
                    // Acquire: as the iterator's re-read.
                    let down =
                        b.tdp_walk_resumes_without_restart() || ww.entry.load(Ordering::Acquire) == TABLE;
                    if down {
                        assert!(!ww.freed.load(Ordering::SeqCst), "a walk resumed in a freed table");
                        let mut o = ww.table[1].load(Ordering::Acquire);
                        let new = o & !PT_WRITABLE_MASK;
                        let _ = tdp_mmu_set_spte_atomic(&ww.table[1], &mut o, new, &b);
                    }
                    ww.section.store(false, Ordering::SeqCst);
                    down
                },
                move || {
                    // The fault maps a huge leaf over the table; a reclaim
                    // frees it if no section can still reach it.
                    let mut old = TABLE;
                    if tdp_mmu_set_spte_atomic(&wf.entry, &mut old, LEAF, &b) {
                        // SeqCst fence: the updater's half of the grace
                        // period (`Rcu::tag`, `poll`), after the unlink.
                        crate::sync::atomic::fence(Ordering::SeqCst);
                        if !wf.section.load(Ordering::SeqCst) {
                            wf.freed.store(true, Ordering::SeqCst);
                        }
                    }
                },
            );
            went_down
        });
    }

    #[test]
    fn loom_a_yield_restarts_from_the_root() {
        restart_after_a_yield(Breakage::SEED);
    }

    /// The fast path's W-set (then its mark of the page) against GET's
    /// W-clear under the write lock (after it took the page's bit): a
    /// harvest that takes the bit finds the spte writable and clears it, or
    /// the bit is left for the next harvest. Either way no writable spte is
    /// left with its page unmarked.
    fn w_clear_against_the_fast_path(b: Breakage) {
        check(move || {
            let s = make_leaf_spte(7, 1, true, false);
            let page = Arc::new((AtomicU64::new(s), crate::dirty_bitmap::DirtyBitmap::new(1)));
            let (f, h) = (page.clone(), page.clone());
            let (fixed, mask) = two(
                move || {
                    // Acquire: as the fast path's walk.
                    let old = f.0.load(Ordering::Acquire);
                    let fixed = !is_writable_pte(old) && tdp_fast_pf_fix_spte(&f.0, old, &b);
                    if fixed {
                        crate::lockless::mark_page_dirty_after_publish(&f.1, 0, &b);
                    }
                    fixed
                },
                move || {
                    let mask = h.1.take_word(0);
                    if mask != 0 {
                        // Acquire: as the iterator's read of the entry.
                        let old = h.0.load(Ordering::Acquire);
                        if is_writable_pte(old) {
                            tdp_mmu_clear_spte_bits(&h.0, old, PT_WRITABLE_MASK);
                        }
                    }
                    mask
                },
            );
            let w = is_writable_pte(page.0.load(Ordering::SeqCst));
            assert!(!w || page.1.test(0), "a writable spte with its page unmarked");
            (fixed, mask)
        });
    }

    #[test]
    fn loom_the_w_clear_against_the_fast_path() {
        w_clear_against_the_fast_path(Breakage::SEED);
    }

    // The switches: each must make its model fail.

    #[test]
    #[cfg(feature = "break-rules")]
    #[should_panic(expected = "a writable leaf left after write protection")]
    fn loom_plain_stores_under_the_read_lock_are_caught() {
        split_against_wrprot(Breakage { tdp_plain_store_under_read_lock: true, ..Breakage::SEED });
    }

    #[test]
    #[cfg(feature = "break-rules")]
    #[should_panic(expected = "a zapped spte came back")]
    fn loom_a_plain_store_in_the_fast_path_is_caught() {
        fast_path_against_zap(Breakage { tdp_fast_path_plain_store: true, ..Breakage::SEED });
    }

    #[test]
    #[cfg(feature = "break-rules")]
    #[should_panic(expected = "a TLB entry caches D over a clean spte")]
    fn loom_a_d_clear_without_the_flush_is_caught() {
        d_clear_against_a_stale_tlb(Breakage { skip_get_dirty_log_flush: true, ..Breakage::SEED });
    }

    #[test]
    #[cfg(feature = "break-rules")]
    #[should_panic(expected = "a store made before the harvest is not reported by it")]
    fn loom_a_harvest_that_does_not_drain_the_pml_logs_is_caught() {
        pml_drain_before_the_harvest(Breakage { pml_skip_sync: true, ..Breakage::SEED });
    }

    #[test]
    #[cfg(feature = "break-rules")]
    #[should_panic(expected = "a vCPU in guest mode walked a freed table")]
    fn loom_a_flush_after_the_section_is_caught() {
        flush_before_the_section_ends(Breakage { tdp_flush_after_section: true, ..Breakage::SEED });
    }

    #[test]
    #[cfg(feature = "break-rules")]
    #[should_panic(expected = "a walk resumed in a freed table")]
    fn loom_a_walk_resumed_without_a_restart_is_caught() {
        restart_after_a_yield(Breakage { tdp_walk_resumes_without_restart: true, ..Breakage::SEED });
    }

    #[test]
    #[cfg(feature = "break-rules")]
    #[should_panic(expected = "a writable spte with its page unmarked")]
    fn loom_the_fast_path_marking_without_its_fence_is_caught() {
        w_clear_against_the_fast_path(Breakage { skip_dirty_bit_fence: true, ..Breakage::SEED });
    }

    #[test]
    #[cfg(feature = "break-rules")]
    #[should_panic(expected = "a table linked into a removed table leaked")]
    fn loom_a_removed_table_left_unfrozen_is_caught() {
        frozen_against_a_link(Breakage { tdp_removed_pt_without_freeze: true, ..Breakage::SEED });
    }
}

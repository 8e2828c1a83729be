//! The seed's lock-free operations, as free functions over the primitive
//! structures (one spte, one pte_list, one dirty bitmap), so that the engine
//! and the loom models (`loom_tests` below, and `pte_list.rs`'s) run the very
//! same code.
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
use crate::rcu::ReadSection;
use crate::spte::{
    PT_WRITABLE_MASK, SPTE_MMU_WRITEABLE, is_last_spte_by_encoding, is_shadow_present_pte, is_writable_pte,
    spte_has_volatile_bits, spte_is_locklessly_modifiable,
};
use crate::sync::atomic::{AtomicU64, Ordering, fence};

/// Steps 3 and 4 of the module docs: the release fence, then the dirty bit
/// of page `rel_gfn` (`smp_wmb(); mark_page_dirty()` in `set_spte`).
#[inline]
pub fn mark_page_dirty_after_publish(bitmap: &DirtyBitmap, rel_gfn: u64, b: &Breakage) {
    if !b.skip_dirty_bit_fence() {
        // Release: pairs with the harvester's AcqRel swap of the word
        // (`DirtyBitmap::take_word`); orders the spte update and rmap add
        // before the bit (module docs).
        fence(Ordering::Release);
    }
    bitmap.mark(rel_gfn);
}

/// CLEAR's step on word `word` of a dirty bitmap
/// (`mask &= atomic_long_fetch_andnot(mask, word)` in
/// `kvm_clear_dirty_log_protect`): clears the bits of `mask` that are set and
/// returns them, the pages the caller must write-protect. The AcqRel RMW
/// pairs with the markers' release fences as `take_word`'s swap does, so the
/// walk that follows finds the writable spte behind every bit returned
/// (`DirtyBitmap::clear_mask`).
#[inline]
pub fn clear_dirty_mask(bitmap: &DirtyBitmap, word: usize, mask: u64, b: &Breakage) -> u64 {
    if b.clear_whole_word() { bitmap.take_word(word) & mask } else { bitmap.clear_mask(word, mask) }
}

/// How `mmu_spte_update` replaces an spte under `mmu_lock`, and when it asks
/// for a remote TLB flush. One per VM, fixed when the VM is built
/// ([`SpteUpdate::for_mmu`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpteUpdate {
    /// KVM 3.11, the locked design with `fast_page_fault`: an spte with
    /// volatile bits (`spte_has_volatile_bits`) is replaced by `xchg`
    /// (`__update_clear_spte_slow`), others by a load and a store
    /// (`__update_clear_spte_fast`); a flush is owed when the old spte, as
    /// the exchange read it, was writable and the new one is not.
    Xchg,
    /// No writer outside `mmu_lock` at all (the locked design with
    /// `fast_page_fault` off, our first measurements' baseline): a load and a
    /// store, and a flush when W is lost. Exact, since nothing can change the
    /// spte between the two.
    Plain,
    /// The seed (lockless design): a load and a store, and patch 04's flush
    /// rule: a flush when the old spte was locklessly modifiable and the new
    /// one is not writable, whatever its W (see [`spte_update_needs_flush`]
    /// for the proof that the plain store then loses nothing).
    Patch04,
}

impl SpteUpdate {
    /// The rule of a VM of `design` (lockless or not) with the fast page
    /// fault on or off; `b` may break the rule (tests only).
    pub fn for_mmu(lockless: bool, fast_page_fault: bool, b: &Breakage) -> Self {
        if lockless {
            SpteUpdate::Patch04
        } else if fast_page_fault && !b.locked_plain_spte_update() {
            SpteUpdate::Xchg
        } else {
            SpteUpdate::Plain
        }
    }
}

/// `mmu_spte_update`'s answer: must remote TLBs be flushed after replacing
/// `old` by `new`?
///
/// - `Xchg` and `Plain`: when W is lost. With `Xchg`, `old` was read by the
///   same `xchg` that wrote `new`, so a W that the fast page fault set a
///   moment before is seen; with `Plain` no such writer exists.
/// - `Patch04`: in the lockless design an spte may lose W without
///   `mmu_lock` (lockless write protection) and without a flush yet (that
///   comes after the walk). A locked path that then makes the same spte
///   read-only must not conclude from "W was already clear" that no vCPU can
///   write through it: the vCPU's TLB may still hold W. So it asks whether
///   the spte *could* be writable without the lock (host- and MMU-writable),
///   not whether it is. This is also why the seed's design may keep the
///   plain store: a W that the fast path sets between our load and our store
///   is either kept (our new spte is writable, and the caller marks the page
///   dirty, patch 06) or taken away (then the old spte was locklessly
///   modifiable, and the rule flushes). Presence, host- and MMU-writable,
///   all that decides rmap membership and this rule, change only under
///   `mmu_lock`. We model no hardware A/D bits that a plain store could lose.
#[inline]
pub fn spte_update_needs_flush(old: u64, new: u64, rule: SpteUpdate, b: &Breakage) -> bool {
    if rule == SpteUpdate::Patch04 && !b.skip_patch04_flush_rule() {
        spte_is_locklessly_modifiable(old) && !is_writable_pte(new)
    } else {
        is_writable_pte(old) && !is_writable_pte(new)
    }
}

/// Replaces the spte under `mmu_lock`, returning the old value: `xchg` for an
/// spte with volatile bits under [`SpteUpdate::Xchg`], otherwise a load and a
/// release store (KVM's `__update_clear_spte_fast`). Why the plain store is
/// exact under the other two rules: see [`SpteUpdate`] and
/// [`spte_update_needs_flush`].
#[inline]
pub fn spte_exchange(sptep: &AtomicU64, new: u64, rule: SpteUpdate) -> u64 {
    // Relaxed: under mmu_lock, which every writer of an spte's presence and
    // of HW/MW holds; only W may change under us, and only where the rule
    // says (see above).
    let old = sptep.load(Ordering::Relaxed);
    if rule == SpteUpdate::Xchg && spte_has_volatile_bits(old) {
        // AcqRel: the acquire half pairs with the fast path's compare-exchange
        // that set W, so the W we return is the latest; the release half is
        // the store below's.
        return sptep.swap(new, Ordering::AcqRel);
    }
    // Release: pairs with the acquire loads of page walks and of the fast
    // path: the table or page the spte points to is set up first.
    sptep.store(new, Ordering::Release);
    old
}

/// The body of `mmu_spte_update`, under `mmu_lock`: replaces the spte by
/// `rule`, returns whether remote TLBs must be flushed. `Kvm::mmu_spte_update`
/// (`spte_ops.rs`) calls it with the VM's rule and the lock's guard; the
/// loom models call it directly.
#[inline]
pub fn __mmu_spte_update(sptep: &AtomicU64, new: u64, rule: SpteUpdate, b: &Breakage) -> bool {
    let old = spte_exchange(sptep, new, rule);
    is_shadow_present_pte(old) && spte_update_needs_flush(old, new, rule, b)
}

/// `spte_write_protect` with `pt_protect` (patch 14's form), under
/// `mmu_lock`: write-protects an spte for good (page write tracking; KVM
/// also uses it to shadow guest page tables), clearing W *and* MW so that no
/// fast path makes it writable again. Returns whether remote TLBs must be
/// flushed, by `mmu_spte_update`'s rule. Two races meet here:
/// - patch 04's (lockless design): a lockless write protection cleared W and
///   has not flushed yet;
/// - KVM 3.11's (locked design with the fast path): the fast path sets W
///   between our load and our store; only the `xchg` of [`SpteUpdate::Xchg`]
///   sees it and flushes (`locked_plain_spte_update` breaks this).
#[inline]
pub fn spte_write_protect_pt(sptep: &AtomicU64, rule: SpteUpdate, b: &Breakage) -> bool {
    // Relaxed: a hint; the exchange in `mmu_spte_update` reads the real old
    // value.
    let spte = sptep.load(Ordering::Relaxed);
    if !is_shadow_present_pte(spte) || (!is_writable_pte(spte) && !spte_is_locklessly_modifiable(spte)) {
        return false;
    }
    __mmu_spte_update(sptep, spte & !(PT_WRITABLE_MASK | SPTE_MMU_WRITEABLE), rule, b)
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
pub fn spte_write_protect_lockless(sptep: &AtomicU64) -> bool {
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
/// As [`PteListHead::walk_lockless`]: `section` covers the pools of the
/// list's descriptors and of the shadow pages its sptes sit in.
#[inline]
pub unsafe fn rmap_write_protect_lockless(
    head: &PteListHead,
    section: &impl ReadSection,
    b: &Breakage,
) -> (usize, usize) {
    let mut cleared = 0;
    let protect = |sptep: &AtomicU64| cleared += usize::from(spte_write_protect_lockless(sptep));
    // SAFETY: forwarded contract.
    let restarts = unsafe { head.walk_lockless(section, b, protect) };
    (cleared, restarts)
}

/// `rmap_write_protect` of the `rmap-lock` design: write-protects every
/// spte in `head`'s list under the list's rmap lock, without `mmu_lock`,
/// each by compare-exchange as the seed's walk does (a fault may set W on
/// it meanwhile, or a zap clear it). Returns how many sptes lost W.
///
/// # Safety
/// As [`PteListHead::walk_rmap_locked`].
#[inline]
pub unsafe fn rmap_write_protect_rmap_locked(head: &PteListHead, b: &Breakage) -> usize {
    let mut cleared = 0;
    // SAFETY: forwarded contract.
    unsafe { head.walk_rmap_locked(b, |sptep| cleared += usize::from(spte_write_protect_lockless(sptep))) };
    cleared
}

/// `fast_pf_fix_direct_spte` (patch 02): sets W on a locklessly modifiable
/// spte that still holds the value `spte` the caller saw. Returns whether the
/// compare-exchange won; the caller then marks the page dirty with
/// [`mark_page_dirty_after_publish`].
#[inline]
pub fn fast_pf_fix_direct_spte(sptep: &AtomicU64, spte: u64) -> bool {
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
        let p04 = SpteUpdate::Patch04;
        assert!(spte_update_needs_flush(protected, protected & !crate::spte::SPTE_MMU_WRITEABLE, p04, &b));
        for locked in [SpteUpdate::Xchg, SpteUpdate::Plain] {
            assert!(!spte_update_needs_flush(protected, protected, locked, &b), "locked: W was clear");
        }
        assert!(!spte_update_needs_flush(ro_host, ro_host, p04, &b), "never writable: no flush");
        #[cfg(feature = "break-rules")]
        {
            let broken = Breakage { skip_patch04_flush_rule: true, ..b };
            assert!(!spte_update_needs_flush(protected, protected, p04, &broken));
        }
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

/// loom models of the seed's races, over the primitives above (the code the
/// engine runs); see `loom_support` for how loom is driven.
#[cfg(all(test, loom))]
mod loom_tests {
    use std::ptr::NonNull;

    use loom::sync::Arc;
    use loom::sync::atomic::AtomicBool;

    use super::*;
    use crate::loom_support::{check, two};
    use crate::spte::{make_leaf_spte, make_nonleaf_spte};

    /// One gfn: its spte, its rmap, its dirty bitmap, and a vCPU's cached W.
    struct Gfn {
        spte: AtomicU64,
        rmap: PteListHead,
        bitmap: DirtyBitmap,
        tlb_writable: AtomicBool,
    }

    impl Gfn {
        fn new(spte: u64, in_rmap: bool, dirty: bool) -> Arc<Self> {
            let g = Arc::new(Self {
                spte: AtomicU64::new(spte),
                rmap: PteListHead::new(),
                bitmap: DirtyBitmap::new(1),
                tlb_writable: AtomicBool::new(is_writable_pte(spte)),
            });
            if in_rmap {
                g.rmap_add();
            }
            if dirty {
                g.bitmap.mark(0);
            }
            g
        }
        fn sptep(&self) -> NonNull<AtomicU64> {
            NonNull::from(&self.spte)
        }
        /// rmap_add, by the single writer (mmu_lock).
        fn rmap_add(&self) {
            // SAFETY: one writer (the model's mmu_lock holder); a single entry
            // needs no descriptor.
            unsafe { self.rmap.add(self.sptep(), &mut || unreachable!("one entry needs no descriptor")) };
        }
        /// The harvester of `get_dirty_log_lockless`, for this one gfn.
        fn harvest(&self, b: &Breakage) -> u64 {
            let mask = self.bitmap.take_word(0);
            if mask != 0 {
                // SAFETY: the rmap's sptes live for the whole model.
                let section = unsafe { crate::rcu::NeverReturned::new() };
                // SAFETY: as above.
                unsafe { rmap_write_protect_lockless(&self.rmap, &section, b) };
                // kvm_flush_remote_tlbs, after the walk (patch 05).
                self.tlb_writable.store(false, Ordering::SeqCst);
            }
            mask
        }
        /// The lockless `clear_dirty_log` of this gfn with the caller's mask
        /// (bit 0: the page), as `clear_dirty_log_protect` does per word:
        /// clear only the set bits of the mask, protect those pages, flush.
        fn clear(&self, user_mask: u64, b: &Breakage) -> u64 {
            let mask = clear_dirty_mask(&self.bitmap, 0, user_mask, b);
            if mask != 0 {
                // SAFETY: the rmap's sptes live for the whole model.
                let section = unsafe { crate::rcu::NeverReturned::new() };
                // SAFETY: as above.
                unsafe { rmap_write_protect_lockless(&self.rmap, &section, b) };
                self.tlb_writable.store(false, Ordering::SeqCst);
            }
            mask
        }
        /// The harvester of the locked design's `get_dirty_log` for this one
        /// gfn: the bit, then (under `mmu_lock`, which the fast path does not
        /// take) `spte_write_protect` by `rule`, then the flush.
        fn harvest_locked(&self, rule: SpteUpdate, b: &Breakage) -> u64 {
            let mask = self.bitmap.take_word(0);
            if mask != 0 {
                let s = self.spte.load(Ordering::Relaxed);
                if is_writable_pte(s) && __mmu_spte_update(&self.spte, s & !PT_WRITABLE_MASK, rule, b) {
                    self.tlb_writable.store(false, Ordering::SeqCst);
                }
            }
            mask
        }
        /// `fast_page_fault` on this gfn: the compare-exchange that sets W,
        /// then the vCPU's retried store fills its TLB with W.
        fn fast_page_fault(&self) -> bool {
            // Acquire: as the fast path's walk.
            let s = self.spte.load(Ordering::Acquire);
            let fixed = !is_writable_pte(s)
                && spte_is_locklessly_modifiable(s)
                && fast_pf_fix_direct_spte(&self.spte, s);
            if fixed {
                self.tlb_writable.store(true, Ordering::SeqCst);
            }
            fixed
        }
        /// The dirty logging invariant: writable implies marked dirty.
        fn assert_logged(&self) {
            let s = self.spte.load(Ordering::SeqCst);
            assert!(
                !is_writable_pte(s) || self.bitmap.test(0),
                "lost dirty page: the spte is writable and its dirty bit was harvested"
            );
        }
    }

    /// Patch 06, first interleaving: `set_spte` of a new writable spte (spte,
    /// then rmap, then fence, then bit) against `get_dirty_log`.
    fn set_spte_new_vs_get_dirty_log(b: Breakage) {
        check(move || {
            let g = Gfn::new(0, false, false);
            let (w, h) = (g.clone(), g.clone());
            let (_, mask) = two(
                move || {
                    __mmu_spte_update(&w.spte, make_leaf_spte(7, 1, true, true), SpteUpdate::Patch04, &b);
                    w.rmap_add();
                    mark_page_dirty_after_publish(&w.bitmap, 0, &b);
                },
                move || h.harvest(&b),
            );
            g.assert_logged();
            mask
        });
    }

    /// Patch 06, second interleaving: `set_spte` making an spte that is
    /// already in the rmap writable (a remap after a read fault).
    fn set_spte_remap_vs_get_dirty_log(b: Breakage) {
        check(move || {
            let g = Gfn::new(make_leaf_spte(7, 1, true, false), true, false);
            let (w, h) = (g.clone(), g.clone());
            let (_, mask) = two(
                move || {
                    __mmu_spte_update(&w.spte, make_leaf_spte(7, 1, true, true), SpteUpdate::Patch04, &b);
                    mark_page_dirty_after_publish(&w.bitmap, 0, &b);
                },
                move || h.harvest(&b),
            );
            g.assert_logged();
            mask
        });
    }

    #[test]
    fn loom_set_spte_against_get_dirty_log() {
        set_spte_new_vs_get_dirty_log(Breakage::SEED);
        set_spte_remap_vs_get_dirty_log(Breakage::SEED);
    }

    /// Patch 06's argument again, for the lockless CLEAR: `set_spte` of a new
    /// writable spte (a page the GET reported, so in the caller's mask)
    /// against CLEAR's `fetch_andnot` and rmap walk, and a fast page fault
    /// against it. Either the CLEAR's AcqRel `fetch_andnot` takes the bit
    /// the marker set, and then its walk sees the writable spte, or the bit
    /// stays set for the next GET.
    fn set_spte_and_fast_fault_vs_clear(b: Breakage) {
        check(move || {
            let g = Gfn::new(0, false, false);
            let (w, h) = (g.clone(), g.clone());
            let (_, mask) = two(
                move || {
                    __mmu_spte_update(&w.spte, make_leaf_spte(7, 1, true, true), SpteUpdate::Patch04, &b);
                    w.rmap_add();
                    mark_page_dirty_after_publish(&w.bitmap, 0, &b);
                },
                move || h.clear(1, &b),
            );
            g.assert_logged();
            mask
        });
        check(move || {
            // Read-only for logging, in the rmap, reported by the GET: a fast
            // fault sets W and marks, the CLEAR clears and protects.
            let g = Gfn::new(make_leaf_spte(7, 1, true, false), true, true);
            let (f, h) = (g.clone(), g.clone());
            let (fixed, mask) = two(
                move || {
                    let fixed = f.fast_page_fault();
                    if fixed {
                        mark_page_dirty_after_publish(&f.bitmap, 0, &b);
                    }
                    fixed
                },
                move || h.clear(1, &b),
            );
            g.assert_logged();
            // Whether the fault came last shows in the bit left set.
            (fixed, mask, g.bitmap.test(0))
        });
    }

    #[test]
    fn loom_set_spte_and_fast_page_fault_against_clear_dirty_log() {
        set_spte_and_fast_fault_vs_clear(Breakage::SEED);
    }

    #[test]
    #[cfg(feature = "break-rules")]
    #[should_panic(expected = "lost dirty page")]
    fn loom_no_fence_before_the_dirty_bit_is_caught_against_clear() {
        set_spte_and_fast_fault_vs_clear(Breakage { skip_dirty_bit_fence: true, ..Breakage::SEED });
    }

    /// Two pages of one word: the GET reported page 0 only; while the CLEAR of
    /// its mask runs, a fault makes page 1 writable and marks it. Only the
    /// mask's bits may go: page 1's bit must survive for the next GET, since
    /// the CLEAR does not protect page 1.
    fn clear_against_a_fault_on_another_page_of_the_word(b: Breakage) {
        check(move || {
            let bitmap = Arc::new(DirtyBitmap::new(2));
            let spte1 = Arc::new(AtomicU64::new(make_leaf_spte(8, 1, true, false)));
            bitmap.mark(0);
            let (bm, bh, s1) = (bitmap.clone(), bitmap.clone(), spte1.clone());
            let (_, cleared) = two(
                move || {
                    // Page 1's fault: W, then the bit (its rmap is not walked
                    // by this CLEAR: its bit is not in the mask).
                    s1.fetch_or(PT_WRITABLE_MASK, Ordering::Relaxed);
                    mark_page_dirty_after_publish(&bm, 1, &b);
                },
                move || {
                    // Did page 1's mark come first? (The outcome record only.)
                    let before = bh.peek_word(0);
                    let cleared = clear_dirty_mask(&bh, 0, 0b01, &b);
                    (before, cleared)
                },
            );
            let writable = is_writable_pte(spte1.load(Ordering::SeqCst));
            assert!(!writable || bitmap.test(1), "page 1 is writable and its dirty bit is gone");
            cleared
        });
    }

    #[test]
    fn loom_clear_against_a_fault_on_another_page_of_the_word() {
        clear_against_a_fault_on_another_page_of_the_word(Breakage::SEED);
    }

    #[test]
    #[cfg(feature = "break-rules")]
    #[should_panic(expected = "dirty bit is gone")]
    fn loom_clearing_the_whole_word_is_caught() {
        clear_against_a_fault_on_another_page_of_the_word(Breakage {
            clear_whole_word: true,
            ..Breakage::SEED
        });
    }

    /// Patch 04: lockless write protection (W cleared, TLB flush not yet
    /// done) against a locked write protection (write tracking) of the same
    /// spte, which must not return while a vCPU may still write through a
    /// stale TLB entry.
    fn patch_04_race(b: Breakage) {
        check(move || {
            let g = Gfn::new(make_leaf_spte(7, 1, true, true), true, true);
            let (h, t) = (g.clone(), g.clone());
            let (mask, (flushed, saw_writable)) = two(
                move || h.harvest(&b),
                move || {
                    // Which side went first (for the outcome record only).
                    let saw_writable = is_writable_pte(t.spte.load(Ordering::SeqCst));
                    let flush = spte_write_protect_pt(&t.spte, SpteUpdate::Patch04, &b);
                    if flush {
                        t.tlb_writable.store(false, Ordering::SeqCst);
                    }
                    assert!(
                        !t.tlb_writable.load(Ordering::SeqCst),
                        "write tracking returned with a writable TLB entry left"
                    );
                    (flush, saw_writable)
                },
            );
            (mask, flushed, saw_writable)
        });
    }

    #[test]
    fn loom_patch_04_race() {
        patch_04_race(Breakage::SEED);
    }

    /// `fast_page_fault` (the compare-exchange, then patch 06's fence and
    /// bit) against a harvest of the same page, with the page's bit set or
    /// clear before: the lockless design's (`locked` false) or KVM 3.11's,
    /// under `mmu_lock`, which the fast path does not take.
    fn fast_page_fault_vs_harvest(b: Breakage, dirty: bool, locked: bool) {
        check(move || {
            let rule = SpteUpdate::for_mmu(false, true, &b);
            let g = Gfn::new(make_leaf_spte(7, 1, true, false), true, dirty);
            let (v, h) = (g.clone(), g.clone());
            let (fixed, mask) = two(
                move || {
                    let fixed = v.fast_page_fault();
                    if fixed {
                        mark_page_dirty_after_publish(&v.bitmap, 0, &b);
                    }
                    fixed
                },
                move || if locked { h.harvest_locked(rule, &b) } else { h.harvest(&b) },
            );
            g.assert_logged();
            (fixed, mask, is_writable_pte(g.spte.load(Ordering::SeqCst)))
        });
    }

    #[test]
    fn loom_fast_page_fault_against_lockless_write_protect() {
        fast_page_fault_vs_harvest(Breakage::SEED, false, false);
        fast_page_fault_vs_harvest(Breakage::SEED, true, false);
    }

    /// KVM 3.11's race, the shape of patch 04 in the locked design: the fast
    /// page fault sets W on a read-only, locklessly modifiable spte while
    /// write tracking write-protects it for good under `mmu_lock`. Tracking
    /// must see that W and flush, or the vCPU goes on writing the tracked page
    /// through its TLB. The flush waits for the vCPU (its fast path runs in
    /// `READING_SHADOW_PAGE_TABLES`), so it is modelled after the join.
    fn fast_page_fault_vs_write_tracking(rule: SpteUpdate, b: Breakage) {
        check(move || {
            let g = Gfn::new(make_leaf_spte(7, 1, true, false), true, false);
            let (v, t) = (g.clone(), g.clone());
            let (fixed, flushed) =
                two(move || v.fast_page_fault(), move || spte_write_protect_pt(&t.spte, rule, &b));
            if flushed {
                g.tlb_writable.store(false, Ordering::SeqCst);
            }
            let s = g.spte.load(Ordering::SeqCst);
            assert!(
                !g.tlb_writable.load(Ordering::SeqCst) || is_writable_pte(s),
                "write tracking returned with a writable TLB entry left"
            );
            (fixed, flushed)
        });
    }

    #[test]
    fn loom_fast_page_fault_against_write_tracking() {
        // KVM 3.11's locked design, and the seed.
        fast_page_fault_vs_write_tracking(SpteUpdate::for_mmu(false, true, &Breakage::SEED), Breakage::SEED);
        fast_page_fault_vs_write_tracking(SpteUpdate::for_mmu(true, true, &Breakage::SEED), Breakage::SEED);
    }

    #[test]
    fn loom_fast_page_fault_against_locked_get_dirty_log() {
        fast_page_fault_vs_harvest(Breakage::SEED, false, true);
        fast_page_fault_vs_harvest(Breakage::SEED, true, true);
    }

    /// Enabling dirty logging while a vCPU fast-faults the same page (KVM
    /// 3.11's memslot update, the engine's `mmu/fast_fault.rs`): the enabler sets the
    /// flag, waits for the lockless walks that may have read the old one,
    /// then write-protects; the vCPU, in `READING_SHADOW_PAGE_TABLES`, sets
    /// W and marks the page if it reads the flag set. A writable spte must
    /// have its bit set after both. The write protection is the lockless
    /// one; the locked design's differs only in holding `mmu_lock`, which
    /// the fast path does not take.
    fn enable_logging_vs_fast_page_fault(b: Breakage) {
        use crate::requests::{VcpuSet, VcpuShared};
        check(move || {
            let g = Gfn::new(make_leaf_spte(7, 1, true, false), true, false);
            let flag = Arc::new(AtomicBool::new(false));
            // std's Arc: what `VcpuSet` holds (the atomics inside are loom's).
            let vcpus = std::sync::Arc::new(VcpuSet::default());
            let v = std::sync::Arc::new(VcpuShared::new(0));
            vcpus.add(v.clone());
            let (gv, ge, fv, fe) = (g.clone(), g.clone(), flag.clone(), flag);
            let (fixed, ()) = two(
                move || {
                    v.begin_lockless_walk();
                    let fixed = gv.fast_page_fault();
                    // Relaxed: as `Memslot::flags`.
                    if fixed && fv.load(Ordering::Relaxed) {
                        mark_page_dirty_after_publish(&gv.bitmap, 0, &b);
                    }
                    v.exit_guest_mode();
                    fixed
                },
                move || {
                    // Relaxed: as `Memslot::set_flags`.
                    fe.store(true, Ordering::Relaxed);
                    if !b.skip_memslot_synchronize() {
                        vcpus.synchronize_lockless_walks();
                    }
                    spte_write_protect_lockless(&ge.spte);
                },
            );
            g.assert_logged();
            (fixed, is_writable_pte(g.spte.load(Ordering::SeqCst)))
        });
    }

    #[test]
    fn loom_enabling_logging_against_fast_page_fault() {
        enable_logging_vs_fast_page_fault(Breakage::SEED);
    }

    /// A shadow page zapped and reused while a lockless walker holds a
    /// pointer into it (patch 12's review): the leaf the walker found becomes
    /// a pointer to a table in the reused page. The walker must never clear W
    /// on it.
    #[test]
    fn loom_shadow_page_reused_under_a_walker() {
        check(|| {
            let table = make_nonleaf_spte(0x5000, 2);
            let g = Gfn::new(make_leaf_spte(7, 1, true, true), true, true);
            let (z, h) = (g.clone(), g.clone());
            let (_, cleared) = two(
                move || {
                    // Zap (under mmu_lock): clear the spte, drop it from its
                    // rmap; the page is freed and at once reused as a level-2
                    // table whose entry at this index points to a table.
                    // The engine clears and sets with plain stores
                    // (`spte_exchange`); here they are swaps, because loom lets
                    // a compare-exchange read a value older than two later
                    // plain stores (tokio-rs/loom#282; `loom_support::loom_probe`),
                    // which C++ forbids. The property under test is the
                    // walker's: it never clears W on a table pointer.
                    z.spte.swap(0, Ordering::AcqRel);
                    // SAFETY: the model's only writer.
                    unsafe { z.rmap.remove(z.sptep(), &mut |_| unreachable!("no descriptor")) };
                    z.spte.swap(table, Ordering::AcqRel);
                },
                move || {
                    // SAFETY: the spte's memory lives for the whole model
                    // (type-stable).
                    let section = unsafe { crate::rcu::NeverReturned::new() };
                    // SAFETY: as above.
                    let (cleared, _) =
                        unsafe { rmap_write_protect_lockless(&h.rmap, &section, &Breakage::SEED) };
                    cleared
                },
            );
            let s = g.spte.load(Ordering::SeqCst);
            assert_eq!(s, table, "a table pointer lost W");
            cleared
        });
    }

    // The switches.

    #[test]
    #[cfg(feature = "break-rules")]
    #[should_panic(expected = "lost dirty page")]
    fn loom_no_fence_before_the_dirty_bit_is_caught() {
        set_spte_remap_vs_get_dirty_log(Breakage { skip_dirty_bit_fence: true, ..Breakage::SEED });
    }

    #[test]
    #[cfg(feature = "break-rules")]
    #[should_panic(expected = "lost dirty page")]
    fn loom_no_fence_before_the_dirty_bit_is_caught_for_new_sptes() {
        set_spte_new_vs_get_dirty_log(Breakage { skip_dirty_bit_fence: true, ..Breakage::SEED });
    }

    #[test]
    #[cfg(feature = "break-rules")]
    #[should_panic(expected = "lost dirty page")]
    fn loom_enabling_logging_without_the_memslot_synchronize_is_caught() {
        enable_logging_vs_fast_page_fault(Breakage { skip_memslot_synchronize: true, ..Breakage::SEED });
    }

    #[test]
    #[cfg(feature = "break-rules")]
    #[should_panic(expected = "writable TLB entry left")]
    fn loom_a_plain_store_in_the_locked_design_is_caught() {
        let b = Breakage { locked_plain_spte_update: true, ..Breakage::SEED };
        fast_page_fault_vs_write_tracking(SpteUpdate::for_mmu(false, true, &b), b);
    }

    #[test]
    #[cfg(feature = "break-rules")]
    #[should_panic(expected = "writable TLB entry left")]
    fn loom_skipping_the_patch_04_rule_is_caught() {
        patch_04_race(Breakage { skip_patch04_flush_rule: true, ..Breakage::SEED });
    }
}

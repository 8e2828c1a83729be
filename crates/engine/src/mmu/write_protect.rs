//! Write protection for dirty logging, in both designs.
//!
//! # Locked design (KVM 3.11, before the seed)
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
//! through its TLB. W is cleared by `mmu_spte_update`, which is an `xchg`
//! here (KVM 3.11's `spte_has_volatile_bits`: `fast_page_fault` may set W
//! on these sptes without the lock), or a plain store with the fast path
//! off. A W the fast path sets after our load saw it clear is followed by
//! its mark of the page (patch 06's order, which 3.11's fast path already
//! had), so the next harvest has it.
//!
//! # Lockless design (patches 03, 05, 13)
//!
//! The same walks without `mmu_lock`, inside a read-side section of the
//! VM's grace period, clearing W by compare-exchange
//! (`lockless::spte_write_protect_lockless`). Large sptes are made read-only
//! like any other (patch 03), and dropped later by the fault path when it
//! needs 4 KiB mappings. Remote TLBs are flushed after the walk, with no
//! lock held (patch 05): a locked path that meets one of our read-only sptes
//! before that flush flushes itself, by patch 04's rule.
//!
//! # rmap-lock design (6.15's rmap lock bit)
//!
//! The lockless design's walks, each rmap walked under its own lock bit
//! (`lockless::rmap_write_protect_rmap_locked`) instead of locklessly in a
//! read-side section: the same compare-exchange on W, the same flush after
//! the walk by patch 05's rule, the same patch 04 rule for the locked
//! paths that meet a read-only spte before it.
use super::lock::MmuGuard;
use super::lockless::{rmap_write_protect_lockless, rmap_write_protect_rmap_locked};
use crate::memslot::Memslot;
use crate::vm::Kvm;
use shadow_mmu_core::pte_list::PteListHead;
use shadow_mmu_core::rcu::ReadGuard;
use shadow_mmu_core::spte::{PT_PAGE_TABLE_LEVEL, PT_WRITABLE_MASK, is_writable_pte, mapping_levels};
use shadow_mmu_core::sync::atomic::{AtomicU64, Ordering};

impl Kvm {
    /// `spte_write_protect` (with `pt_protect` false: dirty logging).
    /// Returns `(flush, dropped)`: whether a remote TLB flush is owed, and
    /// whether the spte was dropped (a large spte), which changes the rmap.
    fn spte_write_protect(&self, g: &MmuGuard<'_>, sptep: &AtomicU64) -> (bool, bool) {
        // Relaxed: under mmu_lock, which every spte writer of this design holds.
        let spte = sptep.load(Ordering::Relaxed);
        if !is_writable_pte(spte) {
            return (false, false);
        }
        if self.__drop_large_spte(g, sptep) {
            return (true, true);
        }
        (self.mmu_spte_update(g, sptep, spte & !PT_WRITABLE_MASK), false)
    }

    /// `__rmap_write_protect`: write-protects every spte in one rmap.
    /// Returns how many needed a remote TLB flush.
    pub(crate) fn __rmap_write_protect(&self, g: &MmuGuard<'_>, head: &PteListHead) -> u64 {
        let mut flush = 0;
        // SAFETY: we hold mmu_lock (no other writer); after a drop changes the
        // list, we start a new iterator (as KVM restarts at `rmap_get_first`).
        let mut it = unsafe { head.iter() };
        while let Some(sptep) = it.next() {
            // SAFETY: rmap entries point to sptes in our type-stable tables.
            let (f, dropped) = self.spte_write_protect(g, unsafe { sptep.as_ref() });
            flush += u64::from(f);
            if dropped {
                // SAFETY: as above.
                it = unsafe { head.iter() };
            }
        }
        flush
    }

    /// `kvm_mmu_write_protect_pt_masked`: write-protects the 4 KiB sptes of
    /// the gfns set in `mask`, which covers pages `gfn_offset..gfn_offset+64`
    /// of `slot`. Returns how many sptes lost W.
    pub(crate) fn kvm_mmu_write_protect_pt_masked(
        &self,
        g: &MmuGuard<'_>,
        slot: &Memslot,
        gfn_offset: u64,
        mut mask: u64,
    ) -> u64 {
        let mut protected = 0;
        while mask != 0 {
            let gfn = slot.base_gfn() + gfn_offset + u64::from(mask.trailing_zeros());
            protected += self.__rmap_write_protect(g, slot.rmap(gfn, PT_PAGE_TABLE_LEVEL));
            // Clear the lowest set bit.
            mask &= mask - 1;
        }
        protected
    }

    /// `kvm_arch_mmu_enable_log_dirty_pt_masked`: CLEAR's protection of
    /// the pages in `mask` (from page `gfn_offset` of `slot`). With
    /// `INITIALLY_SET` the pages may still be mapped large (nothing was
    /// protected when logging was enabled), so the 2 MiB pages under the
    /// mask's first and last page are write-protected first
    /// (`kvm_mmu_slot_gfn_write_protect` from `PG_LEVEL_2M`; a mask spans 64
    /// pages, so at most two). Returns how many sptes lost W (or were
    /// dropped).
    pub(crate) fn kvm_arch_mmu_enable_log_dirty_pt_masked(
        &self,
        g: &MmuGuard<'_>,
        slot: &Memslot,
        gfn_offset: u64,
        mask: u64,
        initially_set: bool,
    ) -> u64 {
        let mut protected = 0;
        if initially_set {
            for gfn in masked_large_gfns(slot, gfn_offset, mask) {
                for level in mapping_levels().filter(|&l| l > PT_PAGE_TABLE_LEVEL) {
                    protected += self.__rmap_write_protect(g, slot.rmap(gfn, level));
                }
            }
        }
        protected + self.kvm_mmu_write_protect_pt_masked(g, slot, gfn_offset, mask)
    }

    /// `kvm_mmu_write_protect_pt_masked_lockless` (patch 13), and CLEAR's
    /// protection: [`Kvm::kvm_arch_mmu_enable_log_dirty_pt_masked`] without
    /// `mmu_lock`, inside `section`, a read-side section of `self.mmu.rcu`.
    /// Large sptes are made read-only, not dropped (patch 03). Adds to
    /// `tally` the sptes that lost W and the walk restarts.
    pub(crate) fn kvm_arch_mmu_enable_log_dirty_pt_masked_lockless(
        &self,
        section: &ReadGuard<'_>,
        slot: &Memslot,
        gfn_offset: u64,
        mask: u64,
        initially_set: bool,
        tally: &mut (usize, usize),
    ) {
        for_each_masked_rmap(slot, gfn_offset, mask, initially_set, |head| {
            // SAFETY: descriptors and shadow pages come from this VM's pools,
            // whose grace period domain is `self.mmu.rcu`, the section's.
            let (cleared, restarts) =
                unsafe { rmap_write_protect_lockless(head, section, &self.mmu.breakage) };
            tally.0 += cleared;
            tally.1 += restarts;
        });
    }

    /// [`Kvm::kvm_arch_mmu_enable_log_dirty_pt_masked`] without `mmu_lock`,
    /// each rmap under its lock bit (the rmap-lock design). Large sptes are
    /// made read-only, not dropped. Adds the sptes that lost W to
    /// `cleared`.
    pub(crate) fn kvm_arch_mmu_enable_log_dirty_pt_masked_rmap_locked(
        &self,
        slot: &Memslot,
        gfn_offset: u64,
        mask: u64,
        initially_set: bool,
        cleared: &mut usize,
    ) {
        for_each_masked_rmap(slot, gfn_offset, mask, initially_set, |head| {
            // SAFETY: in this design every rmap writer takes the rmap lock
            // (`rmap_add`, `rmap_remove`), and a leaf leaves its rmap before
            // its shadow page is freed (`drop_spte`).
            *cleared += unsafe { rmap_write_protect_rmap_locked(head, &self.mmu.breakage) };
        });
    }

    /// `kvm_mmu_slot_remove_write_access` of the rmap-lock design: every
    /// rmap of `slot`, at every level, under its lock bit, then one remote
    /// TLB flush out of any lock (patch 05).
    pub(crate) fn kvm_mmu_slot_remove_write_access_rmap_locked(&self, slot: &Memslot) {
        let mut cleared = 0;
        for level in mapping_levels() {
            for head in slot.rmaps(level) {
                // SAFETY: as in `kvm_arch_mmu_enable_log_dirty_pt_masked_rmap_locked`.
                cleared += unsafe { rmap_write_protect_rmap_locked(head, &self.mmu.breakage) };
            }
        }
        self.account_lockless_walks((cleared, 0));
        self.kvm_flush_remote_tlbs();
    }

    /// `kvm_mmu_slot_remove_write_access`: write-protects all of `slot`, at
    /// every level, for enabling dirty logging.
    pub(crate) fn kvm_mmu_slot_remove_write_access(&self, g: &mut MmuGuard<'_>, slot: &Memslot) {
        let mut protected = 0;
        for level in mapping_levels() {
            for head in slot.rmaps(level) {
                if !head.is_empty() {
                    protected += self.__rmap_write_protect(g, head);
                }
                if g.needbreak() {
                    // Flush before letting anyone in (see the module docs).
                    self.kvm_flush_remote_tlbs();
                    g.cond_resched();
                }
            }
        }
        self.mmu.stats.sptes_write_protected.add(protected);
        self.kvm_flush_remote_tlbs();
    }

    /// Adds a lockless walk's tally to the VM's figures (once per call, not
    /// per page: a shared counter bumped per page would bounce between the
    /// harvester and the vCPUs).
    pub(crate) fn account_lockless_walks(&self, (cleared, restarts): (usize, usize)) {
        self.mmu.stats.sptes_write_protected.add(cleared as u64);
        self.mmu.stats.lockless_walk_restarts.add(restarts as u64);
    }

    /// `kvm_mmu_slot_remove_write_access_lockless` (patch 13): write-protects
    /// all of `slot`, at every level, without `mmu_lock`, then flushes remote
    /// TLBs out of any lock (patch 05). Leaves the read-side section now and
    /// then, as the seed does when `need_resched()`, so that a freeing side
    /// waiting for a grace period is not held up by a long walk.
    pub(crate) fn kvm_mmu_slot_remove_write_access_lockless(&self, slot: &Memslot) {
        /// rmaps walked between two quiescent points.
        const RMAPS_PER_SECTION: usize = 1024;
        let mut guard = self.mmu.rcu.read_lock();
        let mut tally = (0, 0);
        for level in mapping_levels() {
            for (i, head) in slot.rmaps(level).iter().enumerate() {
                // SAFETY: as in `kvm_arch_mmu_enable_log_dirty_pt_masked_lockless`:
                // `guard` is a section of this VM's pools' domain.
                let (cleared, restarts) =
                    unsafe { rmap_write_protect_lockless(head, &guard, &self.mmu.breakage) };
                tally.0 += cleared;
                tally.1 += restarts;
                if i % RMAPS_PER_SECTION == RMAPS_PER_SECTION - 1 {
                    guard.quiesce();
                }
            }
        }
        drop(guard);
        self.account_lockless_walks(tally);
        self.kvm_flush_remote_tlbs();
    }
}

/// The rmaps that the protection of `mask` (pages `gfn_offset..+64` of
/// `slot`) walks, in order: under `INITIALLY_SET` (`initially_set`) the
/// large pages' under the mask's first and last page first, then each
/// masked page's 4 KiB rmap.
fn for_each_masked_rmap(
    slot: &Memslot,
    gfn_offset: u64,
    mut mask: u64,
    initially_set: bool,
    mut f: impl FnMut(&PteListHead),
) {
    if initially_set {
        for gfn in masked_large_gfns(slot, gfn_offset, mask) {
            for level in mapping_levels().filter(|&l| l > PT_PAGE_TABLE_LEVEL) {
                f(slot.rmap(gfn, level));
            }
        }
    }
    while mask != 0 {
        let gfn = slot.base_gfn() + gfn_offset + u64::from(mask.trailing_zeros());
        f(slot.rmap(gfn, PT_PAGE_TABLE_LEVEL));
        // Clear the lowest set bit.
        mask &= mask - 1;
    }
}

/// The gfns whose 2 MiB pages CLEAR protects first under `INITIALLY_SET`:
/// the mask's first page, and its last if that is in another 2 MiB page.
pub(crate) fn masked_large_gfns(slot: &Memslot, gfn_offset: u64, mask: u64) -> impl Iterator<Item = u64> {
    debug_assert!(mask != 0);
    let base = slot.base_gfn() + gfn_offset;
    let start = base + u64::from(mask.trailing_zeros());
    let end = base + 63 - u64::from(mask.leading_zeros());
    let pages = shadow_mmu_core::spte::pages_per_spte(PT_PAGE_TABLE_LEVEL + 1);
    std::iter::once(start).chain((start / pages != end / pages).then_some(end))
}

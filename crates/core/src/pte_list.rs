//! pte_list: the list of spte pointers behind every rmap head and every shadow
//! page's `parent_ptes`, with the algorithm of the seed (patches 07, 08, 10
//! and 15 of "KVM: MMU: locklessly write-protect").
//!
//! # Layout
//!
//! A head ([`PteListHead`]) is one word:
//! - `0`: empty;
//! - an spte pointer (bit 0 clear): exactly one entry;
//! - a descriptor pointer | 1: a chain of [`PteListDesc`], each holding up to
//!   [`PTE_LIST_EXT`] spte pointers and a `more` link.
//!
//! The last descriptor's `more` is the *nulls marker*: the address of the head
//! | 1 (patch 08). A reader that ends on a nulls marker that is not its own
//! head's has been carried into another list by a descriptor that was freed
//! and reused, and must restart.
//!
//! # Invariants (kept by the writers, under the caller's lock)
//!
//! 1. Only the first descriptor may have free entries; every later one is
//!    full. Entries of a descriptor are packed from index 0.
//! 2. New descriptors are pushed at the head (patch 07), so the chain after
//!    the first descriptor never changes while entries are added.
//! 3. Removal moves the *last used entry of the first descriptor* into the
//!    hole (forward move, patch 07). An entry therefore only ever moves to a
//!    position that a top-down, head-to-tail walker reaches later.
//! 4. A descriptor that is handed back to the allocator has entries 1.. equal
//!    to 0; entry 0 and `more` may hold stale values. Its fields are set once
//!    by a constructor ([`PteListDesc::new`]) and never zeroed wholesale
//!    again (patch 10); the allocation paths of `add` overwrite entry 0 and
//!    `more` before they publish a descriptor.
//! 5. A list never uses a descriptor for a single entry.
//! 6. A descriptor taken from the allocator gets `more` = 0 ("being
//!    initialised") before any entry is written; its real `more` is written
//!    after its entries (see "Reuse by another list").
//!
//! # Where we differ from the seed: the single-entry collapse
//!
//! When the only descriptor is down to one entry, the seed (patches 07, 10,
//! 15) moves that entry into the head, then clears the descriptor's entry 0,
//! then frees it. A lockless walker already inside the descriptor can read
//! entry 0 after the clear, reach the nulls marker (its own: nothing was
//! reused) and stop, never having seen the entry that now lives in the head,
//! though that entry was in the list for the whole walk: if it is a writable
//! spte whose dirty bit was just harvested, the page's next writes are lost.
//! Our loom model `loom_collapse_to_a_single_entry` finds this in the seed's
//! algorithm. We do not clear entry 0 on the collapse: the freed descriptor
//! keeps a stale copy of the entry until it is reused, and whoever reuses it
//! overwrites entry 0 before publishing it (invariant 4). A walker that races
//! with the collapse then sees the entry in the descriptor, or in the head
//! after a restart; at worst it visits it twice, which is harmless. The
//! `break-rules` switch `seed_collapse_clears_entry0` puts the seed's clear
//! back, and the model catches it.
//!
//! # Reuse by another list (invariant 6)
//!
//! A freed descriptor is handed out again at once, possibly to another list,
//! while a walker of its old list may still be inside it. The stale state it
//! carries is entry 0 (after a collapse) and `more`, which after a collapse is
//! still the old list's own nulls marker. If the new owner wrote its entries
//! first and `more` last (the seed's 1 -> many order, and ours until issue
//! 9), a walker could read a new
//! entry at index 0, then the stale `more`, match its own marker and stop:
//! - R0's only descriptor F holds [A, B]; a walker of R0 has loaded F;
//! - B is removed: A moves into R0's head, F is freed (entry 0 still A);
//! - R1 (one entry X) takes F: `F[0] = X`, `F[1] = Y`, then `F.more` = R1's marker;
//! - the walker reads `F[0] = X`, then `F.more` = R0's marker: done, A unseen.
//!
//! A was in R0 for the whole walk and its spte keeps W after its dirty bit
//! was harvested: its next writes are lost. Pushing F at the head of a full
//! list has the same shape (`F[0]` first, `more` after). Hence invariant 6.
//! Proof that a walker of R0 inside a reused F still visits every entry that
//! stays in R0:
//! - The walker reads F's entries top-down, then `more`, all with acquire.
//! - If every entry it read is from R0's time, it saw F's entries as R0 had
//!   them (a collapse leaves entry 0 a copy of the entry that moved into the
//!   head). Its load of `more` then returns R0's marker (F was R0's only
//!   descriptor, all of whose entries it saw), R0's next descriptor (F was an
//!   emptied first descriptor: the walk goes on in R0), 0 (restart), or the
//!   new owner's pointer or marker (restart, by the nulls check, at the end
//!   of the new owner's chain).
//! - If it read an entry the new owner wrote, that acquire load
//!   synchronises with the owner's release store of the entry, which is
//!   sequenced after the owner's store of 0 to `more`; the walker's later
//!   load of `more` therefore reads 0 or a later value: the new owner's
//!   pointer or marker. 0 restarts; the new owner's chain ends on a marker
//!   that is not R0's and restarts. It never reads R0's stale marker.
//! - A restart reloads R0's head, where every entry that stayed is found.
//!
//! Freeing the emptied first descriptor leaves `more` pointing at R0's next
//! descriptor; a walker that reads it goes on in R0, which is correct, so
//! that path was never lost, and invariant 6 keeps it so. The loom models
//! below cover all four ways a freed descriptor reaches another list (from
//! a collapse or as an emptied first descriptor, reused as a new single
//! descriptor or pushed at a head); the switch `entries_before_more_on_reuse`
//! puts the old order back, and the model of the shape above catches it.
//!
//! # Publication
//!
//! Every store a writer makes to a head, an entry or a `more` field is a
//! release store (the seed's `rcu_assign_pointer`, patch 15), so that a
//! lockless reader's acquire load of a pointer also sees what it points to.
//! The one exception is invariant 6's "being initialised" 0, a relaxed store
//! that the release stores of the entries after it publish.
//! Writers' own loads are relaxed: writers are serialised by the caller's
//! lock (`mmu_lock`), which orders them.
//!
//! # The rmap lock (6.15's `KVM_RMAP_LOCKED`)
//!
//! The `rmap-lock` design walks rmaps without `mmu_lock` the way upstream's
//! shadow MMU has since 6.15 (commit 4834eaded91e, for aging), not as the
//! seed does. A reader takes bit 1 of the head ([`KVM_RMAP_LOCKED`]) by an
//! acquire compare-exchange, walks the chain as its last holder left it,
//! and stores the head back with release
//! ([`PteListHead::walk_rmap_locked`]). Writers take the same bit as well as
//! `mmu_lock` ([`PteListHead::add_rmap_locked`],
//! [`PteListHead::remove_rmap_locked`]); their last store of the head
//! publishes it and drops the bit in one release store. An empty head is
//! never locked: only writers fill it, and a reader that finds it empty has
//! nothing to walk.
//!
//! The bit guards the chain, not the sptes. While a reader holds it no
//! descriptor of its list is freed, moved or reused, so the reader needs no
//! nulls marker, no restart, no read-side section and no type-stable
//! descriptors: a descriptor freed by a writer is out of every chain before
//! the writer drops the bit. The sptes the entries name stay allocated for
//! as long as the reader holds the bit because an spte leaves its rmap,
//! taking the bit, before the shadow page it sits in may be freed (the
//! caller's contract); the value of an spte may still change under the
//! reader (a zap, a fault), so readers change sptes only by
//! compare-exchange. The cost is one compare-exchange and one store per
//! non-empty rmap walked, and a reader waits while a writer holds its rmap
//! (and the other way round).
//!
//! # Safety contract
//!
//! The writer methods are `unsafe`: the caller must serialise every writer of
//! the same list, and every descriptor in a list must come from an allocator
//! whose memory stays a valid `PteListDesc` for as long as any reader may
//! hold a pointer to it (a type-stable pool). The list knows nothing of
//! vCPUs, locks or pools beyond that.

use std::ptr::NonNull;

use crate::breakage::Breakage;
use crate::rcu::ReadSection;
use crate::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Entries per descriptor (`PTE_LIST_EXT`).
pub const PTE_LIST_EXT: usize = 3;

/// A pointer to an spte, as stored in a pte_list.
pub type SptePtr = NonNull<AtomicU64>;

/// A descriptor: `PTE_LIST_EXT` spte pointers and the link to the next one.
#[repr(C, align(8))]
#[derive(Debug)]
pub struct PteListDesc {
    sptes: [AtomicUsize; PTE_LIST_EXT],
    more: AtomicUsize,
}

impl PteListDesc {
    /// The constructor (`pte_list_desc_ctor`, patch 10): all entries and
    /// `more` null. Runs once per object, when the pool first creates it.
    pub fn new() -> Self {
        Self { sptes: std::array::from_fn(|_| AtomicUsize::new(0)), more: AtomicUsize::new(0) }
    }

    /// Are entries 1.. all 0, as a free descriptor's must be (invariant 4;
    /// entry 0 may hold a stale copy after the single-entry collapse)?
    pub fn is_clean(&self) -> bool {
        self.sptes[1..].iter().all(|s| s.load(Ordering::Relaxed) == 0)
    }
}

impl Default for PteListDesc {
    fn default() -> Self {
        Self::new()
    }
}

impl crate::pool::PoolObject for PteListDesc {
    /// `pte_list_desc_ctor`, the constructor of the type-stable pool.
    fn construct() -> Box<Self> {
        Box::new(Self::new())
    }

    fn is_clean(&self) -> bool {
        PteListDesc::is_clean(self)
    }

    #[cfg(feature = "break-rules")]
    fn poison(&self) {
        for s in &self.sptes {
            // Relaxed: see `ShadowPage::poison`.
            s.store(DESC_POISON, Ordering::Relaxed);
        }
        self.more.store(DESC_POISON, Ordering::Relaxed);
    }
}

/// What a descriptor holds after its memory was "returned" in a
/// `break-rules` build (an even, non-null value no allocation has).
#[cfg(feature = "break-rules")]
pub const DESC_POISON: usize = 0xdead_0000_0000_0000;

/// Is this `more` value a nulls marker (`desc_is_a_nulls`)?
#[inline]
pub const fn desc_is_a_nulls(more: usize) -> bool {
    more & 1 != 0
}

/// The head address a nulls marker names (`desc_get_nulls_value`).
#[inline]
pub const fn desc_get_nulls_value(more: usize) -> usize {
    more & !1
}

/// Dereferences a descriptor pointer taken from a list.
///
/// # Safety
/// `desc` must be a descriptor pointer read from a list whose descriptors
/// come from a type-stable allocator that is still alive (the module's
/// safety contract).
#[inline]
pub(crate) unsafe fn desc_ref<'a>(desc: usize) -> &'a PteListDesc {
    debug_assert!(desc != 0 && desc & 1 == 0);
    // SAFETY: by the caller's contract the address is a live, type-stable
    // `PteListDesc`, whose fields are all atomics and so may be shared.
    unsafe { &*(desc as *const PteListDesc) }
}

/// An spte entry of a list, as a reference bound to the read-side section
/// that keeps its memory allocated.
///
/// # Safety
/// `entry` is a non-zero entry read from a list whose sptes come from
/// type-stable memory that `_section` covers.
#[inline]
unsafe fn spte_ref(entry: usize, _section: &impl ReadSection) -> &AtomicU64 {
    debug_assert!(entry != 0 && entry & 1 == 0);
    // SAFETY: by the caller's contract the address is a live `AtomicU64` for
    // as long as the section is borrowed; atomics may be shared.
    unsafe { &*(entry as *const AtomicU64) }
}

/// Bit 1 of a head: the rmap lock of 6.15's shadow MMU (`KVM_RMAP_LOCKED`),
/// for lists whose readers take it instead of walking locklessly (module
/// docs, "The rmap lock"). Bit 0 tags a descriptor; entries and descriptors
/// are 8-byte aligned, so bit 1 is free in every head value.
pub const KVM_RMAP_LOCKED: usize = 1 << 1;

/// A pte_list head: an rmap slot or a shadow page's `parent_ptes`.
#[repr(transparent)]
#[derive(Debug)]
pub struct PteListHead {
    val: AtomicUsize,
}

impl Default for PteListHead {
    fn default() -> Self {
        Self::new()
    }
}

/// Invariant 6: a descriptor taken from the allocator reads "being
/// initialised" (`more` = 0) before any of its entries is written. The store
/// is relaxed: the release stores of the entries that follow order it before
/// them, so a walker whose acquire load returns a new entry reads a `more`
/// of 0 or later, never the stale nulls marker of the list the descriptor
/// was freed from (module docs, "Reuse by another list").
#[inline]
fn mark_being_initialised(d: &PteListDesc, b: &Breakage) {
    if !b.entries_before_more_on_reuse() {
        d.more.store(0, Ordering::Relaxed);
    }
}

/// Number of free entries at the front of a descriptor's packed entries
/// (`__find_first_free`).
#[inline]
fn find_first_free(desc: &PteListDesc) -> usize {
    desc.sptes.iter().position(|s| s.load(Ordering::Relaxed) == 0).unwrap_or(PTE_LIST_EXT)
}

impl PteListHead {
    /// An empty list.
    pub fn new() -> Self {
        Self { val: AtomicUsize::new(0) }
    }

    /// The nulls marker of this list: its address | 1 (`desc_mark_nulls`).
    #[inline]
    pub fn nulls_marker(&self) -> usize {
        (self as *const Self as usize) | 1
    }

    /// The head word without the rmap lock bit (`kvm_rmap_get`), relaxed:
    /// for writers, who exclude each other, and statistics.
    #[inline]
    pub fn raw(&self) -> usize {
        self.val.load(Ordering::Relaxed) & !KVM_RMAP_LOCKED
    }

    /// Is the list empty?
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.raw() == 0
    }

    /// Does someone hold the rmap lock ([`KVM_RMAP_LOCKED`])? For audits:
    /// with no walker running, nobody should.
    pub fn is_rmap_locked(&self) -> bool {
        // Relaxed: a snapshot for an audit, which runs with walkers stopped.
        self.val.load(Ordering::Relaxed) & KVM_RMAP_LOCKED != 0
    }

    #[inline]
    fn publish_head(&self, val: usize) {
        // Release: pairs with a lockless reader's acquire load of the head,
        // or with the acquire compare-exchange of the next taker of the rmap
        // lock (a value without the bit drops it), so the descriptor or spte
        // it names is initialised as far as the reader can see.
        self.val.store(val, Ordering::Release);
    }

    /// `__kvm_rmap_lock`: takes the rmap lock of a non-empty list and
    /// returns the head without the bit; returns 0, taking nothing, for an
    /// empty one (module docs, "The rmap lock").
    fn rmap_lock(&self) -> usize {
        let backoff = crate::sync::Backoff::new();
        // Relaxed: only finds the value to swap; the compare-exchange orders.
        let mut old = self.val.load(Ordering::Relaxed);
        loop {
            if old == 0 {
                return 0;
            }
            if old & KVM_RMAP_LOCKED != 0 {
                backoff.snooze();
                old = self.val.load(Ordering::Relaxed);
                continue;
            }
            // Acquire: pairs with the release store that dropped the bit
            // last ([`Self::rmap_unlock`], [`Self::publish_head`]), so the
            // chain is read as its last holder left it.
            match self.val.compare_exchange_weak(
                old,
                old | KVM_RMAP_LOCKED,
                Ordering::Acquire,
                Ordering::Relaxed,
            ) {
                Ok(_) => return old,
                Err(now) => old = now,
            }
        }
    }

    /// `__kvm_rmap_unlock`: stores `val` as the head, dropping the rmap lock
    /// in the same release store (it pairs with the next taker's acquire
    /// compare-exchange in [`Self::rmap_lock`]).
    fn rmap_unlock(&self, val: usize) {
        debug_assert!(val & KVM_RMAP_LOCKED == 0);
        self.val.store(val, Ordering::Release);
    }

    /// After a writer that took the rmap lock on a head of `v`: drops the
    /// lock if the writer did not store a new head (which dropped it).
    ///
    /// Whether the bit is set does not say whether it is still ours: a
    /// reader may have taken it right after our new head dropped it, and
    /// storing `v` then would put back the old head under the reader's
    /// feet. The head is still ours only if it reads `v | LOCKED`: a writer
    /// stores a head only when it changes (every `publish_head` in `add`
    /// and `remove` stores a value other than the head it read), so after
    /// our store the head is never `v` again.
    fn rmap_unlock_unless_published(&self, v: usize) {
        if v != 0 {
            // Release on success: as `rmap_unlock`. Relaxed on failure: we
            // published, and our release store dropped the bit.
            let _ = self.val.compare_exchange(v | KVM_RMAP_LOCKED, v, Ordering::Release, Ordering::Relaxed);
        }
    }

    /// [`Self::add`] under the rmap lock (`kvm_rmap_lock`, the add,
    /// `kvm_rmap_unlock` of the new head).
    ///
    /// # Safety
    /// As [`Self::add`], and every writer of this list goes through the
    /// `_rmap_locked` writers (module docs, "The rmap lock").
    pub unsafe fn add_rmap_locked(
        &self,
        spte: SptePtr,
        alloc: &mut impl FnMut() -> NonNull<PteListDesc>,
    ) -> usize {
        let v = self.rmap_lock();
        // SAFETY: forwarded contract; the bit keeps readers out of the chain
        // while it changes.
        let before = unsafe { self.add_with(spte, alloc, &Breakage::SEED) };
        self.rmap_unlock_unless_published(v);
        before
    }

    /// [`Self::remove`] under the rmap lock. A descriptor it frees is out
    /// of the chain before the bit drops, so no reader can be inside it.
    ///
    /// # Safety
    /// As [`Self::remove`], and every writer of this list goes through the
    /// `_rmap_locked` writers.
    pub unsafe fn remove_rmap_locked(&self, spte: SptePtr, free: &mut impl FnMut(NonNull<PteListDesc>)) {
        let v = self.rmap_lock();
        // SAFETY: forwarded contract, as in `add_rmap_locked`.
        unsafe { self.remove_with(spte, free, &Breakage::SEED) };
        self.rmap_unlock_unless_published(v);
    }

    /// A walk under the rmap lock (`kvm_rmap_lock_readonly`, the walk,
    /// `kvm_rmap_unlock_readonly`): calls `f` on every entry, in list
    /// order, with no writer of the list running. `f` may change the spte
    /// only by compare-exchange (a zap may race with it; module docs). `b`
    /// may break the rule (tests only).
    ///
    /// # Safety
    /// Every writer of the list takes the rmap lock (the `_rmap_locked`
    /// writers), and an spte leaves the list before the memory it sits in
    /// is freed.
    pub unsafe fn walk_rmap_locked(&self, b: &Breakage, mut f: impl FnMut(&AtomicU64)) {
        let unlocked = b.rmap_walk_without_lock();
        // Acquire (the switch's walk only): as a lockless reader's load.
        let v = if unlocked { self.val.load(Ordering::Acquire) & !KVM_RMAP_LOCKED } else { self.rmap_lock() };
        if v == 0 {
            return;
        }
        if v & 1 == 0 {
            // SAFETY: an entry of this list, read under its lock: its spte
            // stays allocated while we hold the lock (contract).
            f(unsafe { &*(v as *const AtomicU64) });
        } else {
            let mut desc = v & !1;
            // 0 ("being initialised") is seen only by the switch's walk.
            while desc != 0 && !desc_is_a_nulls(desc) {
                // SAFETY: a descriptor of this list, which the lock keeps in
                // it (and so allocated) until we drop the lock.
                let d = unsafe { desc_ref(desc) };
                for s in &d.sptes {
                    // Relaxed: the lock's acquire ordered the writers'
                    // stores before us, and none runs while we hold it.
                    let s = s.load(Ordering::Relaxed);
                    if s == 0 {
                        break;
                    }
                    // SAFETY: as for a single entry.
                    f(unsafe { &*(s as *const AtomicU64) });
                }
                // Relaxed: as above.
                desc = d.more.load(Ordering::Relaxed);
            }
        }
        if !unlocked {
            // Release: orders our loads of the chain before the next
            // writer's change of it (its acquire compare-exchange), so that
            // no descriptor is freed and reused under them. The kernel's
            // `kvm_rmap_unlock_readonly` writes the value back with a plain
            // `atomic_long_set`; on x86 every store is a release.
            self.rmap_unlock(v);
        }
    }

    /// `pte_list_add`: adds `spte`, returns the number of entries the list
    /// had before.
    ///
    /// # Safety
    /// The module's safety contract: the caller serialises all writers of this
    /// list; `alloc` returns clean descriptors (all entries 0) from a
    /// type-stable allocator, never one that is in a list.
    pub unsafe fn add(&self, spte: SptePtr, alloc: &mut impl FnMut() -> NonNull<PteListDesc>) -> usize {
        // SAFETY: forwarded contract.
        unsafe { self.add_with(spte, alloc, &Breakage::SEED) }
    }

    /// [`Self::add`], with the rules `b` may break (tests only).
    ///
    /// # Safety
    /// As [`Self::add`].
    pub unsafe fn add_with(
        &self,
        spte: SptePtr,
        alloc: &mut impl FnMut() -> NonNull<PteListDesc>,
        b: &Breakage,
    ) -> usize {
        let spte = spte.as_ptr() as usize;
        debug_assert!(spte & 1 == 0);
        let v = self.raw();
        if v == 0 {
            self.publish_head(spte);
            return 0;
        }
        if v & 1 == 0 {
            // 1 -> many.
            let desc = alloc();
            // SAFETY: `alloc` hands out live, type-stable descriptors.
            let d = unsafe { desc.as_ref() };
            debug_assert!(d.is_clean());
            // Invariant 6: "being initialised" before any entry is written.
            mark_being_initialised(d, b);
            d.sptes[0].store(v, Ordering::Release);
            d.sptes[1].store(spte, Ordering::Release);
            // desc_mark_nulls: the new tail ends on our marker.
            d.more.store(self.nulls_marker(), Ordering::Release);
            self.publish_head(desc.as_ptr() as usize | 1);
            return 1;
        }
        // many -> many.
        // SAFETY: a tagged head names a live descriptor of this list (contract).
        let d = unsafe { desc_ref(v & !1) };
        if d.sptes[PTE_LIST_EXT - 1].load(Ordering::Relaxed) != 0 {
            // No free entry in the first descriptor: push a new one at the
            // head (patch 07), holding the new entry and linked to the old
            // first before publication. Entry 0 is written before the
            // descriptor is published, since it may hold a stale copy
            // (invariant 4); the seed writes the entry after publication,
            // which is equivalent for a walker.
            let new = alloc();
            // SAFETY: as above.
            let n = unsafe { new.as_ref() };
            debug_assert!(n.is_clean());
            // Invariant 6, as above.
            mark_being_initialised(n, b);
            n.sptes[0].store(spte, Ordering::Release);
            n.more.store(v & !1, Ordering::Release);
            self.publish_head(new.as_ptr() as usize | 1);
            // SAFETY: `n` is now this list's first descriptor (contract).
            return unsafe { count_spte_number(n) - 1 };
        }
        let free_pos = find_first_free(d);
        debug_assert!(free_pos < PTE_LIST_EXT);
        // Release: publishes the entry to lockless readers' acquire loads.
        d.sptes[free_pos].store(spte, Ordering::Release);
        // SAFETY: `d` is this list's first descriptor (contract).
        unsafe { count_spte_number(d) - 1 }
    }

    /// `pte_list_remove`: removes `spte`, which must be in the list.
    ///
    /// # Panics
    /// If `spte` is not in the list (KVM's `BUG()`): the MMU's bookkeeping is
    /// corrupt and continuing could lose dirty pages.
    ///
    /// # Safety
    /// The module's safety contract; `free` receives each descriptor that
    /// leaves the list, clean, and must not release its memory to the system
    /// while lockless readers may hold it.
    pub unsafe fn remove(&self, spte: SptePtr, free: &mut impl FnMut(NonNull<PteListDesc>)) {
        // SAFETY: forwarded contract.
        unsafe { self.remove_with(spte, free, &Breakage::SEED) }
    }

    /// [`Self::remove`], with the rules `b` may break (tests only).
    ///
    /// # Safety
    /// As [`Self::remove`].
    pub unsafe fn remove_with(
        &self,
        spte: SptePtr,
        free: &mut impl FnMut(NonNull<PteListDesc>),
        b: &Breakage,
    ) {
        let spte = spte.as_ptr() as usize;
        let v = self.raw();
        assert!(v != 0, "pte_list_remove: {spte:#x} 0->BUG");
        if v & 1 == 0 {
            assert_eq!(v, spte, "pte_list_remove: {spte:#x} 1->BUG");
            self.publish_head(0);
            return;
        }
        let mut desc = v & !1;
        while !desc_is_a_nulls(desc) {
            // SAFETY: `desc` is a descriptor of this list (contract).
            let d = unsafe { desc_ref(desc) };
            for i in 0..PTE_LIST_EXT {
                let s = d.sptes[i].load(Ordering::Relaxed);
                if s == 0 {
                    break;
                }
                if s == spte {
                    if b.remove_from_last_desc() {
                        // SAFETY: as below.
                        unsafe { self.desc_remove_entry_from_last(d, i, free) };
                    } else {
                        // SAFETY: `d` is in this list, `i` holds `spte`; contract.
                        unsafe { self.desc_remove_entry(d, i, free, b) };
                    }
                    return;
                }
            }
            // Relaxed: writers are serialised by the caller's lock.
            desc = d.more.load(Ordering::Relaxed);
        }
        panic!("pte_list_remove: {spte:#x} many->BUG");
    }

    /// `pte_list_desc_remove_entry`: fills the hole at `desc.sptes[i]` with the
    /// last used entry of the first descriptor (forward move, patch 07).
    ///
    /// # Safety
    /// As [`Self::remove`]; `desc` is in this list and `desc.sptes[i]` is used.
    unsafe fn desc_remove_entry(
        &self,
        desc: &PteListDesc,
        i: usize,
        free: &mut impl FnMut(NonNull<PteListDesc>),
        b: &Breakage,
    ) {
        let first_ptr = self.raw() & !1;
        // SAFETY: the head names this list's first descriptor (contract).
        let first = unsafe { desc_ref(first_ptr) };
        let free_pos = find_first_free(first);
        assert!(free_pos > 0, "pte_list: first descriptor is empty");
        let last_used = free_pos - 1;

        // Move the entry from the first descriptor into the hole. The order
        // matters to a lockless walker: the entry is written at its new place
        // (reached later by a top-down, head-to-tail walk) before it is
        // cleared at its old place, so a walker sees it at least once.
        let moved = first.sptes[last_used].load(Ordering::Relaxed);
        desc.sptes[i].store(moved, Ordering::Release);
        first.sptes[last_used].store(0, Ordering::Release);

        if first.sptes[0].load(Ordering::Relaxed) == 0 {
            // The first descriptor is empty: unlink and free it. The seed
            // frees before it updates the head; we unpublish first, since our
            // pool may hand the descriptor out again at once.
            let next = first.more.load(Ordering::Relaxed);
            assert!(!desc_is_a_nulls(next), "pte_list: one entry left in a descriptor chain");
            self.publish_head(next | 1);
            free(NonNull::from(first));
            return;
        }

        // Relaxed: writers are serialised by the caller's lock (module docs).
        if first.sptes[1].load(Ordering::Relaxed) == 0 && desc_is_a_nulls(first.more.load(Ordering::Relaxed))
        {
            // One entry left in the only descriptor: move it into the head and
            // free the descriptor (invariant 5). Entry 0 is left as it is (see
            // the module docs: clearing it here, as the seed does, lets a
            // concurrent walker miss the entry).
            let only = first.sptes[0].load(Ordering::Relaxed);
            self.publish_head(only);
            if b.seed_collapse_clears_entry0() {
                // The seed's order (patches 07, 10, 15): head, then clear.
                first.sptes[0].store(0, Ordering::Release);
            }
            free(NonNull::from(first));
        }
    }

    /// The pre-seed removal, kept only as a `break-rules` switch: fill the hole
    /// with the last used entry of the *last* descriptor, which a head-to-tail
    /// walker reaches last, so a walker that already passed the hole misses
    /// the moved entry (the bug patch 07 fixes).
    ///
    /// # Safety
    /// As [`Self::desc_remove_entry`].
    unsafe fn desc_remove_entry_from_last(
        &self,
        desc: &PteListDesc,
        i: usize,
        free: &mut impl FnMut(NonNull<PteListDesc>),
    ) {
        // Find the last descriptor and the one before it.
        let mut prev: Option<&PteListDesc> = None;
        // SAFETY: the head names this list's first descriptor (contract).
        let mut last = unsafe { desc_ref(self.raw() & !1) };
        loop {
            // Relaxed: writers are serialised by the caller's lock.
            let more = last.more.load(Ordering::Relaxed);
            if desc_is_a_nulls(more) {
                break;
            }
            prev = Some(last);
            // SAFETY: a descriptor of this list (contract).
            last = unsafe { desc_ref(more) };
        }
        let last_used = find_first_free(last) - 1;
        let moved = last.sptes[last_used].load(Ordering::Relaxed);
        desc.sptes[i].store(moved, Ordering::Release);
        last.sptes[last_used].store(0, Ordering::Release);
        if last_used > 0 {
            return;
        }
        // The last descriptor is empty: unlink it.
        match prev {
            Some(p) => p.more.store(self.nulls_marker(), Ordering::Release),
            None => self.publish_head(0),
        }
        free(NonNull::from(last));
        // Never leave a single entry in a descriptor (invariant 5).
        let v = self.raw();
        if v & 1 != 0 {
            // SAFETY: a tagged head names a descriptor of this list.
            let first = unsafe { desc_ref(v & !1) };
            if first.sptes[1].load(Ordering::Relaxed) == 0
                && desc_is_a_nulls(first.more.load(Ordering::Relaxed))
            {
                let only = first.sptes[0].load(Ordering::Relaxed);
                self.publish_head(only);
                free(NonNull::from(first));
            }
        }
    }

    /// `pte_list_walk_lockless` (patch 09): calls `f` on the entries of the
    /// list without the writers' lock. Every entry that is in the list for
    /// the whole walk is passed to `f` at least once; entries that come or go
    /// during the walk may or may not be, and an entry may be passed twice.
    ///
    /// - Reload the head on every (re)start.
    /// - Walk each descriptor top-down, highest index first: the forward move
    ///   of removal only ever moves an entry to a lower index of the first
    ///   descriptor or into a later descriptor, both still ahead of a walker.
    /// - Restart when `more` is 0: the descriptor is fresh from its
    ///   constructor and being initialised.
    /// - Restart when the chain ends on another list's nulls marker: a
    ///   descriptor was freed and reused by another list under us.
    ///
    /// Returns the number of restarts. `b` may break rules (tests only).
    ///
    /// `section` proves that the memory the walk reaches stays allocated;
    /// `f` gets each spte as a reference bound to it, so no spte outlives the
    /// section (or a quiescent point of it).
    ///
    /// # Safety
    /// Descriptors and sptes of the list come from type-stable pools that
    /// `section` covers (those of its grace period domain).
    #[inline]
    pub unsafe fn walk_lockless<'g>(
        &self,
        section: &'g impl ReadSection,
        b: &Breakage,
        mut f: impl FnMut(&'g AtomicU64),
    ) -> usize {
        // The common case, an empty or single-entry head, inline; chains out
        // of line (a harvest walks one rmap per dirty page, and a call per
        // page cost the lockless harvest about 8% against the locked one's
        // inlined iterator).
        // Acquire: pairs with the writers' release stores of the head.
        let v = self.val.load(Ordering::Acquire);
        if v & 1 == 0 {
            if v != 0 {
                // SAFETY: an entry read with acquire from this list: an spte
                // of a type-stable table that `section` covers (contract).
                f(unsafe { spte_ref(v, section) });
            }
            return 0;
        }
        // SAFETY: forwarded contract.
        unsafe { self.walk_lockless_chain(v, section, b, f) }
    }

    /// [`Self::walk_lockless`] from a head `v` that named a descriptor chain.
    ///
    /// # Safety
    /// As [`Self::walk_lockless`].
    #[inline(never)]
    unsafe fn walk_lockless_chain<'g>(
        &self,
        mut v: usize,
        section: &'g impl ReadSection,
        b: &Breakage,
        mut f: impl FnMut(&'g AtomicU64),
    ) -> usize {
        let mut restarts = 0;
        'restart: loop {
            if restarts > 0 {
                // Acquire: pairs with the writers' release stores of the head.
                v = self.val.load(Ordering::Acquire);
            }
            if v == 0 {
                return restarts;
            }
            if v & 1 == 0 {
                // SAFETY: as in `walk_lockless`.
                f(unsafe { spte_ref(v, section) });
                return restarts;
            }
            let mut desc = v & !1;
            while !desc_is_a_nulls(desc) {
                #[cfg(feature = "break-rules")]
                if desc == DESC_POISON {
                    crate::stats::POISON_READS.inc();
                    restarts += 1;
                    continue 'restart;
                }
                // SAFETY: a descriptor pointer read from this list with acquire
                // ordering, inside a read-side section: type-stable memory that
                // is not returned to the system before we leave the section.
                let d = unsafe { desc_ref(desc) };
                for k in 0..PTE_LIST_EXT {
                    let i = if b.bottom_up_walk() { k } else { PTE_LIST_EXT - 1 - k };
                    // Acquire: pairs with the writers' release stores of entries,
                    // so the spte the entry names is initialised.
                    let s = d.sptes[i].load(Ordering::Acquire);
                    #[cfg(feature = "break-rules")]
                    if s == DESC_POISON {
                        crate::stats::POISON_READS.inc();
                        continue;
                    }
                    if s != 0 {
                        // SAFETY: as in `walk_lockless`.
                        f(unsafe { spte_ref(s, section) });
                    }
                }
                // Acquire: pairs with the release stores of `more`.
                desc = d.more.load(Ordering::Acquire);
                if desc == 0 {
                    // Being initialised (invariant 6): its writer is between
                    // two stores; wait for it a little.
                    restarts += 1;
                    crate::sync::spin_loop();
                    continue 'restart;
                }
            }
            if !b.skip_nulls_check() && desc_get_nulls_value(desc) != self as *const Self as usize {
                // Moved to another list under us.
                restarts += 1;
                continue 'restart;
            }
            return restarts;
        }
    }

    /// `pte_list_walk`: calls `f` on every entry, in list order (locked).
    ///
    /// # Safety
    /// The module's contract; no writer runs concurrently (the caller holds
    /// the writers' lock), and `f` does not modify this list.
    #[inline]
    pub unsafe fn walk(&self, mut f: impl FnMut(SptePtr)) {
        // SAFETY: forwarded contract.
        for spte in unsafe { self.iter() } {
            f(spte);
        }
    }

    /// `rmap_get_first`: an iterator over the entries (locked).
    ///
    /// # Safety
    /// The module's contract; no writer modifies the list while the iterator
    /// is in use (a caller that removes an entry starts a new iterator, as
    /// KVM's callers of `rmap_get_first` do).
    #[inline]
    pub unsafe fn iter(&self) -> RmapIter<'_> {
        let v = self.raw();
        let state = if v == 0 {
            IterState::Done
        } else if v & 1 == 0 {
            IterState::Single(v)
        } else {
            IterState::Desc { desc: v & !1, pos: 0 }
        };
        RmapIter { head: self, state }
    }

    /// Number of entries (locked).
    ///
    /// # Safety
    /// As [`Self::iter`].
    pub unsafe fn count(&self) -> usize {
        // SAFETY: forwarded contract.
        unsafe { self.iter() }.count()
    }

    /// Checks invariants 1, 4 (for the head), 5 and the nulls marker; returns
    /// the number of entries. For tests and debug assertions.
    ///
    /// # Safety
    /// As [`Self::iter`].
    pub unsafe fn check_invariants(&self) -> usize {
        let v = self.raw();
        if v == 0 {
            return 0;
        }
        if v & 1 == 0 {
            return 1;
        }
        let mut desc = v & !1;
        let mut n = 0;
        let mut first = true;
        // Relaxed loads below: the caller excludes writers, as for `iter`.
        while !desc_is_a_nulls(desc) {
            // SAFETY: forwarded contract.
            let d = unsafe { desc_ref(desc) };
            let used = find_first_free(d);
            assert!(
                d.sptes[used..].iter().all(|s| s.load(Ordering::Relaxed) == 0),
                "pte_list: entries not packed"
            );
            assert!(first || used == PTE_LIST_EXT, "pte_list: a non-first descriptor is not full");
            assert!(used > 0, "pte_list: empty descriptor in a list");
            n += used;
            first = false;
            desc = d.more.load(Ordering::Relaxed);
        }
        assert_eq!(desc, self.nulls_marker(), "pte_list: chain ends on another list's nulls");
        assert!(n >= 2, "pte_list: a descriptor holds a single entry");
        n
    }
}

/// `count_spte_number`: entries in a chain, from its first descriptor.
///
/// # Safety
/// `first` is the first descriptor of a list, under the module's contract.
unsafe fn count_spte_number(first: &PteListDesc) -> usize {
    let first_free = find_first_free(first);
    let mut desc_num = 0;
    let mut more = first.more.load(Ordering::Relaxed);
    while !desc_is_a_nulls(more) {
        desc_num += 1;
        // SAFETY: `more` is a descriptor of the same list (contract).
        more = unsafe { desc_ref(more) }.more.load(Ordering::Relaxed);
    }
    first_free + desc_num * PTE_LIST_EXT
}

enum IterState {
    Done,
    Single(usize),
    Desc { desc: usize, pos: usize },
}

/// Locked iterator over a pte_list (`rmap_get_first` / `rmap_get_next`).
pub struct RmapIter<'a> {
    head: &'a PteListHead,
    state: IterState,
}

impl Iterator for RmapIter<'_> {
    type Item = SptePtr;

    #[inline]
    fn next(&mut self) -> Option<SptePtr> {
        loop {
            match self.state {
                IterState::Done => return None,
                IterState::Single(v) => {
                    self.state = IterState::Done;
                    return NonNull::new(v as *mut AtomicU64);
                }
                IterState::Desc { desc, pos } => {
                    if desc_is_a_nulls(desc) {
                        debug_assert_eq!(desc, self.head.nulls_marker());
                        self.state = IterState::Done;
                        return None;
                    }
                    // SAFETY: the iterator was created under the module's
                    // contract and the list is not modified while it lives.
                    let d = unsafe { desc_ref(desc) };
                    if pos < PTE_LIST_EXT {
                        let s = d.sptes[pos].load(Ordering::Relaxed);
                        if s != 0 {
                            self.state = IterState::Desc { desc, pos: pos + 1 };
                            return NonNull::new(s as *mut AtomicU64);
                        }
                    }
                    // Relaxed: the locked iterator runs with writers excluded.
                    self.state = IterState::Desc { desc: d.more.load(Ordering::Relaxed), pos: 0 };
                }
            }
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// A test allocator: boxes descriptors and keeps every one alive until
    /// drop, so freed descriptors stay type-stable (and get reused).
    #[derive(Default)]
    struct TestPool {
        all: Vec<NonNull<PteListDesc>>,
        free: Vec<NonNull<PteListDesc>>,
    }

    impl TestPool {
        fn alloc(&mut self) -> NonNull<PteListDesc> {
            if let Some(d) = self.free.pop() {
                return d;
            }
            let d = NonNull::from(Box::leak(Box::new(PteListDesc::new())));
            self.all.push(d);
            d
        }
        fn free(&mut self, d: NonNull<PteListDesc>) {
            // SAFETY: `d` came from this pool and is still allocated.
            assert!(unsafe { d.as_ref() }.is_clean(), "descriptor freed dirty");
            self.free.push(d);
        }
        fn live(&self) -> usize {
            self.all.len() - self.free.len()
        }
    }

    impl Drop for TestPool {
        fn drop(&mut self) {
            for d in self.all.drain(..) {
                // SAFETY: every pointer came from `Box::leak` and is freed once.
                drop(unsafe { Box::from_raw(d.as_ptr()) });
            }
        }
    }

    fn sptes(n: usize) -> Vec<AtomicU64> {
        (0..n).map(|_| AtomicU64::new(0)).collect()
    }

    fn ptr(s: &AtomicU64) -> SptePtr {
        NonNull::from(s)
    }

    fn contents(head: &PteListHead) -> BTreeSet<usize> {
        // SAFETY: single-threaded test; the pool outlives the list.
        unsafe { head.iter() }.map(|p| p.as_ptr() as usize).collect()
    }

    #[test]
    fn add_counts_and_pushes_descriptors_at_the_head() {
        let mut pool = TestPool::default();
        let s = sptes(10);
        let head = PteListHead::new();
        for (i, spte) in s.iter().enumerate() {
            // SAFETY: single writer; pool outlives the list.
            let before = unsafe { head.add(ptr(spte), &mut || pool.alloc()) };
            assert_eq!(before, i, "count before add");
            // SAFETY: as above.
            assert_eq!(unsafe { head.check_invariants() }, i + 1);
        }
        // 10 entries: 3 full descriptors behind a first one holding 1.
        assert_eq!(pool.live(), 4);
        let v = head.raw();
        assert_eq!(v & 1, 1);
        // SAFETY: the head names a live descriptor.
        let first = unsafe { desc_ref(v & !1) };
        assert_eq!(find_first_free(first), 1, "newest descriptor is first and holds the newest entry");
        assert_eq!(first.sptes[0].load(Ordering::Relaxed), ptr(&s[9]).as_ptr() as usize);
        assert_eq!(contents(&head).len(), 10);
    }

    #[test]
    fn remove_moves_the_first_descriptors_last_entry_forward() {
        let mut pool = TestPool::default();
        let s = sptes(7);
        let head = PteListHead::new();
        for spte in &s {
            // SAFETY: single writer; pool outlives the list.
            unsafe { head.add(ptr(spte), &mut || pool.alloc()) };
        }
        // Layout now: first = [s6], then [s3, s4, s5], then [s0, s1, s2].
        // Remove s1 (in the last descriptor): s6 must move into its hole and
        // the emptied first descriptor must be freed.
        // SAFETY: single writer; pool outlives the list; every descriptor came
        // from `pool`, and `remove` frees each it unlinks once.
        unsafe { head.remove(ptr(&s[1]), &mut |d| pool.free(d)) };
        assert_eq!(pool.live(), 2);
        // SAFETY: as above.
        assert_eq!(unsafe { head.check_invariants() }, 6);
        let last = {
            // SAFETY: as above.
            let first = unsafe { desc_ref(head.raw() & !1) };
            // SAFETY: as above.
            unsafe { desc_ref(first.more.load(Ordering::Relaxed)) }
        };
        assert_eq!(last.sptes[1].load(Ordering::Relaxed), ptr(&s[6]).as_ptr() as usize);
        let expect: BTreeSet<usize> =
            [0, 2, 3, 4, 5, 6].iter().map(|&i| ptr(&s[i]).as_ptr() as usize).collect();
        assert_eq!(contents(&head), expect);
    }

    #[test]
    fn shrinks_back_to_a_single_entry_and_empty() {
        let mut pool = TestPool::default();
        let s = sptes(3);
        let head = PteListHead::new();
        for spte in &s {
            // SAFETY: single writer; pool outlives the list.
            unsafe { head.add(ptr(spte), &mut || pool.alloc()) };
        }
        // SAFETY: as above; every descriptor came from `pool`, and `remove`
        // frees each it unlinks once.
        unsafe { head.remove(ptr(&s[0]), &mut |d| pool.free(d)) };
        // SAFETY: as above; every descriptor came from `pool`, and `remove`
        // frees each it unlinks once.
        unsafe { head.remove(ptr(&s[2]), &mut |d| pool.free(d)) };
        assert_eq!(head.raw(), ptr(&s[1]).as_ptr() as usize, "single entry lives in the head");
        assert_eq!(pool.live(), 0, "descriptor freed (and clean)");
        // SAFETY: as above; every descriptor came from `pool`, and `remove`
        // frees each it unlinks once.
        unsafe { head.remove(ptr(&s[1]), &mut |d| pool.free(d)) };
        assert!(head.is_empty());
    }

    #[test]
    fn nulls_marker_names_the_head() {
        let mut pool = TestPool::default();
        let s = sptes(2);
        let head = PteListHead::new();
        for spte in &s {
            // SAFETY: single writer; pool outlives the list.
            unsafe { head.add(ptr(spte), &mut || pool.alloc()) };
        }
        // SAFETY: as above.
        let d = unsafe { desc_ref(head.raw() & !1) };
        let more = d.more.load(Ordering::Relaxed);
        assert!(desc_is_a_nulls(more));
        assert_eq!(desc_get_nulls_value(more), &head as *const _ as usize);
    }

    #[test]
    #[should_panic(expected = "1->BUG")]
    fn removing_a_missing_entry_is_a_bug() {
        let mut pool = TestPool::default();
        let s = sptes(2);
        let head = PteListHead::new();
        // SAFETY: single writer; pool outlives the list.
        unsafe { head.add(ptr(&s[0]), &mut || pool.alloc()) };
        // SAFETY: as above; every descriptor came from `pool`, and `remove`
        // frees each it unlinks once.
        unsafe { head.remove(ptr(&s[1]), &mut |d| pool.free(d)) };
    }

    /// The rmap-locked writers and walk against a model set: the same lists
    /// as the plain writers make, the bit dropped after every call.
    #[test]
    fn rmap_locked_writers_and_walks_match_a_model() {
        let mut rng = fastrand::Rng::with_seed(0x10c6);
        let mut pool = TestPool::default();
        let s = sptes(40);
        let heads: Vec<PteListHead> = (0..3).map(|_| PteListHead::new()).collect();
        let mut model: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); heads.len()];
        let walked = |h: &PteListHead| {
            let mut seen = BTreeSet::new();
            // SAFETY: every writer below takes the rmap lock; the sptes
            // outlive the lists.
            unsafe { h.walk_rmap_locked(&Breakage::SEED, |p| assert!(seen.insert(p as *const _ as usize))) };
            seen
        };
        for _ in 0..10_000 {
            let h = rng.usize(..heads.len());
            let i = rng.usize(..s.len());
            let p = ptr(&s[i]).as_ptr() as usize;
            if model[h].contains(&p) {
                // SAFETY: single writer, through the rmap-locked writers;
                // every descriptor came from `pool`.
                unsafe { heads[h].remove_rmap_locked(ptr(&s[i]), &mut |d| pool.free(d)) };
                model[h].remove(&p);
            } else if !model.iter().any(|m| m.contains(&p)) {
                // SAFETY: as above.
                let before = unsafe { heads[h].add_rmap_locked(ptr(&s[i]), &mut || pool.alloc()) };
                assert_eq!(before, model[h].len());
                model[h].insert(p);
            }
            assert_eq!(heads[h].val.load(Ordering::Relaxed) & KVM_RMAP_LOCKED, 0, "the bit is dropped");
            // SAFETY: as above.
            assert_eq!(unsafe { heads[h].check_invariants() }, model[h].len());
            assert_eq!(walked(&heads[h]), model[h], "a locked walk sees the list");
            assert_eq!(heads[h].val.load(Ordering::Relaxed) & KVM_RMAP_LOCKED, 0, "the walk drops it");
        }
        let descs_needed: usize =
            model.iter().map(|m| if m.len() < 2 { 0 } else { m.len().div_ceil(PTE_LIST_EXT) }).sum();
        assert_eq!(pool.live(), descs_needed, "no descriptor leaked or double-freed");
    }

    #[test]
    fn a_walk_under_the_rmap_lock_keeps_writers_out() {
        use std::sync::atomic::AtomicBool;
        let s = sptes(4);
        let head = PteListHead::new();
        let mut pool = TestPool::default();
        for x in &s[..3] {
            // SAFETY: single writer; rmap-locked writers throughout.
            unsafe { head.add_rmap_locked(ptr(x), &mut || pool.alloc()) };
        }
        let inside = AtomicBool::new(false);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|sc| {
            sc.spawn(|| {
                let mut first = true;
                // SAFETY: writers take the lock; the sptes outlive the walk.
                unsafe {
                    head.walk_rmap_locked(&Breakage::SEED, |_| {
                        if std::mem::take(&mut first) {
                            inside.store(true, Ordering::SeqCst);
                            tx.send(()).unwrap();
                            std::thread::sleep(std::time::Duration::from_millis(50));
                            inside.store(false, Ordering::SeqCst);
                        }
                    })
                };
            });
            rx.recv().unwrap();
            // SAFETY: the only writer, through the rmap lock.
            unsafe { head.add_rmap_locked(ptr(&s[3]), &mut || pool.alloc()) };
            assert!(!inside.load(Ordering::SeqCst), "the add waited for the walk to drop the lock");
        });
        // An empty list is walked without taking anything.
        let empty = PteListHead::new();
        // SAFETY: no writer.
        unsafe { empty.walk_rmap_locked(&Breakage::SEED, |_| panic!("no entry")) };
        assert_eq!(empty.val.load(Ordering::Relaxed), 0);
        let mut pool2 = pool;
        for x in &s {
            // SAFETY: as above.
            unsafe { head.remove_rmap_locked(ptr(x), &mut |d| pool2.free(d)) };
        }
        assert!(head.is_empty());
    }

    /// Random adds and removes against a model set, checking the invariants
    /// and the contents after every step, with descriptors reused at once.
    #[test]
    fn random_operations_match_a_model() {
        let mut rng = fastrand::Rng::with_seed(0x5eed);
        let mut pool = TestPool::default();
        let s = sptes(64);
        let heads: Vec<PteListHead> = (0..4).map(|_| PteListHead::new()).collect();
        let mut model: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); heads.len()];
        for _ in 0..20_000 {
            let h = rng.usize(..heads.len());
            let i = rng.usize(..s.len());
            let p = ptr(&s[i]).as_ptr() as usize;
            let in_any = model.iter().any(|m| m.contains(&p));
            if model[h].contains(&p) {
                // SAFETY: single writer; pool outlives the lists; every
                // descriptor came from `pool`, and `remove` frees each it
                // unlinks once.
                unsafe { heads[h].remove(ptr(&s[i]), &mut |d| pool.free(d)) };
                model[h].remove(&p);
            } else if !in_any {
                // SAFETY: as above.
                let before = unsafe { heads[h].add(ptr(&s[i]), &mut || pool.alloc()) };
                assert_eq!(before, model[h].len());
                model[h].insert(p);
            }
            // SAFETY: as above.
            assert_eq!(unsafe { heads[h].check_invariants() }, model[h].len());
            assert_eq!(contents(&heads[h]), model[h]);
            // SAFETY: as above.
            assert_eq!(unsafe { heads[h].count() }, model[h].len());
        }
        let descs_needed: usize =
            model.iter().map(|m| if m.len() < 2 { 0 } else { m.len().div_ceil(PTE_LIST_EXT) }).sum();
        assert_eq!(pool.live(), descs_needed, "no descriptor leaked or double-freed");
    }
}

/// loom models of the pte_list against a concurrent lockless walker. The
/// property: every entry that is in the list for the whole walk is visited.
#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::Arc;
    use loom::sync::atomic::AtomicU64;

    /// Type-stable descriptors for one model: all stay allocated until the
    /// model ends; freed ones are reused last-in first-out, like the pool.
    struct Descs {
        /// Built once, never grown: the elements do not move.
        all: Vec<PteListDesc>,
    }

    impl Descs {
        fn new(n: usize) -> Arc<Self> {
            Arc::new(Self { all: (0..n).map(|_| PteListDesc::new()).collect() })
        }
        fn ptrs(&self) -> Vec<usize> {
            self.all.iter().map(|d| d as *const PteListDesc as usize).collect()
        }
    }

    /// A writer's allocator over `Descs`.
    struct Alloc {
        free: Vec<usize>,
    }

    impl Alloc {
        fn alloc(&mut self) -> NonNull<PteListDesc> {
            NonNull::new(self.free.pop().expect("model has enough descriptors") as *mut PteListDesc).unwrap()
        }
        fn free(&mut self, d: NonNull<PteListDesc>) {
            self.free.push(d.as_ptr() as usize);
        }
    }

    struct World {
        heads: Vec<PteListHead>,
        sptes: Vec<AtomicU64>,
        _descs: Arc<Descs>,
    }

    impl World {
        fn spte(&self, i: usize) -> SptePtr {
            NonNull::from(&self.sptes[i])
        }
        fn id(&self, p: usize) -> usize {
            (p - &self.sptes[0] as *const AtomicU64 as usize) / std::mem::size_of::<AtomicU64>()
        }
        /// Writers: a model has exactly one, the setup and then the writer
        /// thread, which owns the only `Alloc`.
        fn add(&self, head: usize, spte: usize, a: &mut Alloc) {
            self.add_with(head, spte, a, &Breakage::SEED);
        }
        fn add_with(&self, head: usize, spte: usize, a: &mut Alloc, b: &Breakage) {
            // SAFETY: single writer (see above); descriptors live for the
            // whole model.
            unsafe { self.heads[head].add_with(self.spte(spte), &mut || a.alloc(), b) };
        }
        fn remove(&self, head: usize, spte: usize, a: &mut Alloc, b: &Breakage) {
            // SAFETY: as `add`.
            unsafe { self.heads[head].remove_with(self.spte(spte), &mut |d| a.free(d), b) };
        }
        fn walk(&self, head: usize, b: &Breakage) -> Vec<usize> {
            let mut seen = Vec::new();
            // SAFETY: descriptors and sptes live for the whole model, so no
            // grace period is needed.
            let section = unsafe { crate::rcu::NeverReturned::new() };
            // SAFETY: as above.
            unsafe {
                self.heads[head]
                    .walk_lockless(&section, b, |p| seen.push(self.id(p as *const AtomicU64 as usize)))
            };
            seen
        }
    }

    /// The `rmap-lock` design's writers and walk.
    impl World {
        fn add_locked(&self, head: usize, spte: usize, a: &mut Alloc) {
            // SAFETY: single writer, through the rmap-locked writers; the
            // descriptors live for the whole model.
            unsafe { self.heads[head].add_rmap_locked(self.spte(spte), &mut || a.alloc()) };
        }
        fn remove_locked(&self, head: usize, spte: usize, a: &mut Alloc) {
            // SAFETY: as `add_locked`.
            unsafe { self.heads[head].remove_rmap_locked(self.spte(spte), &mut |d| a.free(d)) };
        }
        fn walk_locked(&self, head: usize, b: &Breakage) -> Vec<usize> {
            let mut seen = Vec::new();
            // SAFETY: every writer takes the rmap lock; the sptes live for
            // the whole model.
            unsafe {
                self.heads[head].walk_rmap_locked(b, |p| seen.push(self.id(p as *const AtomicU64 as usize)))
            };
            seen
        }
    }

    fn world(heads: usize, sptes: usize, descs: usize) -> (Arc<World>, Alloc) {
        let d = Descs::new(descs);
        let mut free = d.ptrs();
        free.reverse();
        let w = World {
            heads: (0..heads).map(|_| PteListHead::new()).collect(),
            sptes: (0..sptes).map(|_| AtomicU64::new(0)).collect(),
            _descs: d,
        };
        (Arc::new(w), Alloc { free })
    }

    /// Runs a model: `setup` builds the world, then `writer` and a walker of
    /// rmap `walk_head` run on two threads (`loom_support::two`), and the
    /// walker must have visited every entry of `stable`.
    #[allow(clippy::too_many_arguments)]
    fn model(
        heads: usize,
        sptes: usize,
        descs: usize,
        b: Breakage,
        setup: fn(&World, &mut Alloc),
        writer: fn(&World, &mut Alloc, &Breakage),
        walk_head: usize,
        stable: &'static [usize],
    ) {
        crate::loom_support::check(move || {
            let (w, mut a) = world(heads, sptes, descs);
            setup(&w, &mut a);
            let (w2, w3) = (w.clone(), w.clone());
            let ((), mut seen) =
                crate::loom_support::two(move || writer(&w2, &mut a, &b), move || w3.walk(walk_head, &b));
            assert_visited(&seen, stable);
            seen.sort();
            seen
        });
    }

    fn assert_visited(seen: &[usize], stable: &[usize]) {
        for s in stable {
            assert!(seen.contains(s), "walker missed stable entry {s}; visited {seen:?}");
        }
    }

    fn add_all(n: usize) -> impl Fn(&World, &mut Alloc) {
        move |w, a| (0..n).for_each(|i| w.add(0, i, a))
    }

    /// Removal by forward move within the first descriptor, against a
    /// top-down walker: [A, B, C], remove A: C moves into index 0.
    fn forward_move_in_first_desc(b: Breakage) {
        model(1, 3, 2, b, |w, a| add_all(3)(w, a), |w, a, b| w.remove(0, 0, a, b), 0, &[1, 2]);
    }

    #[test]
    fn loom_forward_move_against_a_walker() {
        forward_move_in_first_desc(Breakage::SEED);
    }

    /// Removal from a later descriptor: first [D], then [A, B, C]; remove D.
    /// The seed empties and frees the first descriptor.
    fn remove_first_of_two(b: Breakage) {
        model(1, 4, 3, b, |w, a| add_all(4)(w, a), |w, a, b| w.remove(0, 3, a, b), 0, &[0, 1, 2]);
    }

    #[test]
    fn loom_removal_that_frees_the_first_descriptor() {
        remove_first_of_two(Breakage::SEED);
    }

    /// A descriptor freed from one rmap and reused by another while a walker
    /// is in it: R0 = [D] -> [A, B, C], R1 = X; remove D from R0 (its first
    /// descriptor is freed), add Y to R1 (which reuses it, 1 -> many).
    fn desc_moved_to_another_rmap(b: Breakage) {
        model(
            2,
            6,
            3,
            b,
            |w, a| {
                add_all(4)(w, a);
                w.add(1, 4, a);
            },
            |w, a, b| {
                w.remove(0, 3, a, b);
                w.add(1, 5, a);
            },
            0,
            &[0, 1, 2],
        );
    }

    #[test]
    fn loom_descriptor_moved_to_another_rmap_mid_walk() {
        desc_moved_to_another_rmap(Breakage::SEED);
    }

    /// The list shrinks to one entry, which moves into the head: [A, B],
    /// remove B.
    fn collapse_to_single(b: Breakage) {
        model(1, 2, 1, b, |w, a| add_all(2)(w, a), |w, a, b| w.remove(0, 1, a, b), 0, &[0]);
    }

    #[test]
    fn loom_collapse_to_a_single_entry() {
        collapse_to_single(Breakage::SEED);
    }

    /// Descriptor reuse within one rmap (ABA): R = [D] -> [A, B, C]; remove
    /// D (the first descriptor is freed), A and B (the other collapses to C
    /// in the head and is freed), then add X, which reuses the last freed
    /// descriptor for this very list (1 -> many, ending on the same nulls
    /// marker). C is in the list throughout.
    #[test]
    fn loom_collapse_then_reuse_in_the_same_rmap() {
        model(
            1,
            5,
            3,
            Breakage::SEED,
            |w, a| add_all(4)(w, a),
            |w, a, b| {
                w.remove(0, 3, a, b);
                w.remove(0, 0, a, b);
                w.remove(0, 1, a, b);
                w.add(0, 4, a);
            },
            0,
            &[2],
        );
    }

    /// A freed first descriptor pushed back at the head of the same list:
    /// R = [D] -> [A, B, C]; remove D, then add E (the full [A, B, C] gets a
    /// new first descriptor: the one just freed).
    #[test]
    fn loom_freed_first_descriptor_pushed_back() {
        model(
            1,
            5,
            3,
            Breakage::SEED,
            |w, a| add_all(4)(w, a),
            |w, a, b| {
                w.remove(0, 3, a, b);
                w.add(0, 4, a);
            },
            0,
            &[0, 1, 2],
        );
    }

    /// The lost-page race of the walker: a descriptor freed by the single-entry collapse is
    /// reused at once by another rmap (1 -> many) while a walker of the old
    /// one is inside it. R0 = [A, B], R1 = X; remove B from R0 (A moves into
    /// the head, the descriptor is freed with entry 0 still A), add Y to R1
    /// (which takes the descriptor). A is in R0 throughout.
    fn collapse_then_reuse_by_another_rmap(b: Breakage) {
        model(
            2,
            4,
            1,
            b,
            |w, a| {
                add_all(2)(w, a);
                w.add(1, 2, a);
            },
            |w, a, b| {
                w.remove(0, 1, a, b);
                w.add_with(1, 3, a, b);
            },
            0,
            &[0],
        );
    }

    #[test]
    fn loom_collapse_then_reuse_by_another_rmap() {
        collapse_then_reuse_by_another_rmap(Breakage::SEED);
    }

    /// The same descriptor, pushed at the head of another rmap's full chain:
    /// R0 = [A, B], R1 = [X, Y, Z]; remove B from R0, add W to R1.
    #[test]
    fn loom_collapse_then_push_at_another_rmaps_head() {
        model(
            2,
            6,
            2,
            Breakage::SEED,
            |w, a| {
                add_all(2)(w, a);
                (2..5).for_each(|i| w.add(1, i, a));
            },
            |w, a, b| {
                w.remove(0, 1, a, b);
                w.add_with(1, 5, a, b);
            },
            0,
            &[0],
        );
    }

    /// An emptied first descriptor pushed at the head of another rmap's full
    /// chain: R0 = [D] -> [A, B, C], R1 = [X, Y, Z]; remove D from R0, add W
    /// to R1. (The 1 -> many reuse of an emptied first descriptor is
    /// `loom_descriptor_moved_to_another_rmap_mid_walk`.)
    #[test]
    fn loom_freed_first_descriptor_pushed_at_another_rmaps_head() {
        model(
            2,
            8,
            3,
            Breakage::SEED,
            |w, a| {
                add_all(4)(w, a);
                (4..7).for_each(|i| w.add(1, i, a));
            },
            |w, a, b| {
                w.remove(0, 3, a, b);
                w.add_with(1, 7, a, b);
            },
            0,
            &[0, 1, 2],
        );
    }

    /// The `rmap-lock` design: a walk under the lock bit against writers
    /// that take it. R0 = [D] -> [A, B, C], R1 = X: remove D from R0 (its
    /// first descriptor is freed), add Y to R1 (which reuses it). The walk
    /// of R0 sees A, B and C, with no nulls check and no restart: the bit
    /// keeps the descriptor in R0 until the walk is done.
    fn rmap_locked_descriptor_reuse(b: Breakage) {
        crate::loom_support::check(move || {
            let (w, mut a) = world(2, 6, 3);
            (0..4).for_each(|i| w.add_locked(0, i, &mut a));
            w.add_locked(1, 4, &mut a);
            let (w2, w3) = (w.clone(), w.clone());
            let ((), mut seen) = crate::loom_support::two(
                move || {
                    w2.remove_locked(0, 3, &mut a);
                    w2.add_locked(1, 5, &mut a);
                },
                move || w3.walk_locked(0, &b),
            );
            assert_visited(&seen, &[0, 1, 2]);
            seen.sort();
            seen
        });
    }

    /// Two writers' calls in a row against a walk: R0 = [D] -> [A, B, C];
    /// remove D (its new head drops the bit), then A. A walk may take the
    /// bit between the first call's new head and its return: the writer
    /// must not mistake the walk's bit for its own and put the old head
    /// back. The list ends as [B, C], whole and unlocked.
    #[test]
    fn loom_rmap_locked_writers_back_to_back_against_a_walk() {
        crate::loom_support::check(|| {
            let (w, mut a) = world(1, 4, 3);
            (0..4).for_each(|i| w.add_locked(0, i, &mut a));
            let (w2, w3) = (w.clone(), w.clone());
            let ((), seen) = crate::loom_support::two(
                move || {
                    w2.remove_locked(0, 3, &mut a);
                    w2.remove_locked(0, 0, &mut a);
                },
                move || w3.walk_locked(0, &Breakage::SEED),
            );
            assert_visited(&seen, &[1, 2]);
            let head = &w.heads[0];
            assert!(!head.is_rmap_locked(), "the bit is dropped");
            // SAFETY: both threads are done.
            assert_eq!(unsafe { head.check_invariants() }, 2);
            let mut left = Vec::new();
            // SAFETY: as above.
            unsafe { head.walk(|p| left.push(w.id(p.as_ptr() as usize))) };
            left.sort();
            assert_eq!(left, [1, 2]);
            seen
        });
    }

    #[test]
    fn loom_rmap_locked_walk_against_descriptor_reuse() {
        rmap_locked_descriptor_reuse(Breakage::SEED);
    }

    /// The collapse under the rmap lock: R0 = [A, B], R1 = X; remove B from
    /// R0 (A moves into the head, the descriptor is freed), add Y to R1
    /// (which takes it).
    #[test]
    fn loom_rmap_locked_walk_against_a_collapse_and_reuse() {
        crate::loom_support::check(|| {
            let (w, mut a) = world(2, 4, 1);
            (0..2).for_each(|i| w.add_locked(0, i, &mut a));
            w.add_locked(1, 2, &mut a);
            let (w2, w3) = (w.clone(), w.clone());
            let ((), seen) = crate::loom_support::two(
                move || {
                    w2.remove_locked(0, 1, &mut a);
                    w2.add_locked(1, 3, &mut a);
                },
                move || w3.walk_locked(0, &Breakage::SEED),
            );
            assert_visited(&seen, &[0]);
            seen
        });
    }

    /// The rmap-lock design's harvest against a zap: the writer makes the
    /// spte non-present, takes it out of its rmap and frees its table
    /// (here: writes a "freed" value into it, as a reused page would hold
    /// anything). A walk under the bit never touches the freed spte: it ran
    /// before the removal (which waited for it) or finds the entry gone.
    /// R = [A, B]; zap B.
    fn rmap_locked_harvest_against_a_zap(b: Breakage) {
        const FREED: u64 = u64::MAX;
        crate::loom_support::check(move || {
            let (w, mut a) = world(1, 2, 1);
            (0..2).for_each(|i| w.add_locked(0, i, &mut a));
            w.sptes[0].store(0x1000, Ordering::Relaxed);
            w.sptes[1].store(0x2000, Ordering::Relaxed);
            let (w2, w3) = (w.clone(), w.clone());
            let ((), seen) = crate::loom_support::two(
                move || {
                    // Relaxed: the model's stand-in values; the rmap lock
                    // orders them against the walk.
                    w2.sptes[1].store(0, Ordering::Relaxed);
                    w2.remove_locked(0, 1, &mut a);
                    w2.sptes[1].store(FREED, Ordering::Relaxed);
                },
                move || {
                    let mut seen = Vec::new();
                    // SAFETY: every writer takes the rmap lock; the sptes
                    // live for the whole model.
                    unsafe {
                        w3.heads[0].walk_rmap_locked(&b, |p| {
                            assert_ne!(p.load(Ordering::Relaxed), FREED, "the walk touched a freed spte");
                            seen.push(w3.id(p as *const AtomicU64 as usize));
                        })
                    };
                    seen
                },
            );
            assert_visited(&seen, &[0]);
            seen
        });
    }

    #[test]
    fn loom_rmap_locked_harvest_against_a_zap() {
        rmap_locked_harvest_against_a_zap(Breakage::SEED);
    }

    // The switches: each must make its model fail.

    #[test]
    #[cfg(feature = "break-rules")]
    #[should_panic(expected = "the walk touched a freed spte")]
    fn loom_an_rmap_walk_without_the_lock_touches_a_zapped_spte() {
        rmap_locked_harvest_against_a_zap(Breakage { rmap_walk_without_lock: true, ..Breakage::SEED });
    }

    #[test]
    #[cfg(feature = "break-rules")]
    #[should_panic(expected = "missed stable entry")]
    fn loom_an_rmap_walk_without_the_lock_is_caught() {
        rmap_locked_descriptor_reuse(Breakage { rmap_walk_without_lock: true, ..Breakage::SEED });
    }

    #[test]
    #[cfg(feature = "break-rules")]
    #[should_panic(expected = "missed stable entry")]
    fn loom_the_seeds_collapse_is_caught() {
        collapse_to_single(Breakage { seed_collapse_clears_entry0: true, ..Breakage::SEED });
    }

    #[test]
    #[cfg(feature = "break-rules")]
    #[should_panic(expected = "missed stable entry")]
    fn loom_entries_before_more_on_reuse_is_caught() {
        collapse_then_reuse_by_another_rmap(Breakage {
            entries_before_more_on_reuse: true,
            ..Breakage::SEED
        });
    }

    #[test]
    #[cfg(feature = "break-rules")]
    #[should_panic(expected = "missed stable entry")]
    fn loom_bottom_up_walk_is_caught() {
        forward_move_in_first_desc(Breakage { bottom_up_walk: true, ..Breakage::SEED });
    }

    #[test]
    #[cfg(feature = "break-rules")]
    #[should_panic(expected = "missed stable entry")]
    fn loom_removal_from_the_last_descriptor_is_caught() {
        remove_first_of_two(Breakage { remove_from_last_desc: true, ..Breakage::SEED });
    }

    #[test]
    #[cfg(feature = "break-rules")]
    #[should_panic(expected = "missed stable entry")]
    fn loom_skipping_the_nulls_check_is_caught() {
        desc_moved_to_another_rmap(Breakage { skip_nulls_check: true, ..Breakage::SEED });
    }
}

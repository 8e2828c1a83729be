//! Test-only switches, each breaking one rule of the design, so that the
//! tests can show they catch it.
//!
//! One mechanism, read in one place: the engine asks `breakage.rule()` of
//! the [`Breakage`] its MMU holds, and the loom models pass one to the
//! lock-free primitives they share with the engine. Only a
//! `--features break-rules` build has the switches as fields (and lets a VM
//! be configured with one on, the engine's `VmConfig::breakage`). In every other
//! build `Breakage` has no field and each `rule()` is a `const fn` that
//! returns `false`, so every check folds away; the assertion at the end of
//! this file, evaluated by every build without the feature (CI's clippy run
//! without features is one), checks that the type is empty.

/// Declares the switches: the struct (fields only with the feature) and a
/// `const fn` per switch.
macro_rules! switches {
    ($( $(#[doc = $doc:literal])* $name:ident, )*) => {
        /// Which rules to break. All false: the seed's design.
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        pub struct Breakage {
            $(
                $(#[doc = $doc])*
                #[cfg(feature = "break-rules")]
                pub $name: bool,
            )*
        }

        impl Breakage {
            /// The seed's design: nothing broken.
            pub const SEED: Breakage = Breakage {
                $(
                    #[cfg(feature = "break-rules")]
                    $name: false,
                )*
            };

            $(
                $(#[doc = $doc])*
                #[inline(always)]
                pub const fn $name(&self) -> bool {
                    #[cfg(feature = "break-rules")]
                    return self.$name;
                    #[cfg(not(feature = "break-rules"))]
                    false
                }
            )*
        }
    };
}

switches! {
    /// `get_dirty_log` does not flush remote TLBs after write-protecting: a
    /// vCPU keeps writing through its stale writable TLB entry, unlogged.
    skip_get_dirty_log_flush,
    /// `get_dirty_log` harvests bits without write-protecting the pages.
    skip_write_protect,
    /// No release fence between making an spte writable (and adding it to its
    /// rmap) and setting the dirty bit (patch 06).
    skip_dirty_bit_fence,
    /// The lockless walker reads each descriptor bottom-up (index 0 first)
    /// instead of top-down (patch 09).
    bottom_up_walk,
    /// Removal moves the last entry of the *last* descriptor into the hole,
    /// as before the seed (patch 07).
    remove_from_last_desc,
    /// The lockless walker stops at any nulls marker, without checking that it
    /// is its own rmap's (patch 08/09).
    skip_nulls_check,
    /// `mmu_spte_update` asks for a TLB flush only when the old spte was
    /// writable, not when it was locklessly modifiable (patch 04).
    skip_patch04_flush_rule,
    /// `fast_page_fault` fixes large sptes too (the bug KVM reverted in
    /// commit 6b73a9606; patch 03).
    fast_fix_large_sptes,
    /// Shadow page memory goes back to the system with no grace period
    /// (patch 12 and its review).
    free_shadow_pages_without_grace_period,
    /// The single-entry collapse clears the freed descriptor's entry 0 after
    /// moving it into the head, as the seed does (patches 07, 10, 15).
    seed_collapse_clears_entry0,
    /// A descriptor taken from the allocator gets its entries before its
    /// `more` (no "being initialised" 0 first): our order before the walker's lost-page race was fixed.
    entries_before_more_on_reuse,
    /// Locked design with `fast_page_fault` on: spte updates under
    /// `mmu_lock` are a plain load and store, not KVM 3.11's `xchg` for
    /// sptes with volatile bits.
    locked_plain_spte_update,
    /// Enabling dirty logging write-protects without first waiting for the
    /// fast page faults that may have read the old flags (KVM 3.11's
    /// `synchronize_srcu_expedited` in the memslot update).
    skip_memslot_synchronize,
    /// `clear_dirty_log` clears the whole word of each mask it is given
    /// (a swap with 0) instead of only the mask's bits
    /// (`atomic_long_fetch_andnot`): bits set since the GET are lost with
    /// their pages left writable.
    clear_whole_word,
    /// The dirty ring's reset gives back entries that are pushed but not
    /// yet harvested (`DIRTY`, not `RESET`): their pages are re-protected
    /// before anyone reported them.
    ring_reset_before_harvest,
    /// A fault pushes its page to the dirty ring before the spte is
    /// writable and in its rmap (patch 06's order, through the ring).
    ring_push_before_rmap,
    /// With several harvest threads, remote TLBs are flushed before the
    /// threads are done (before they start), and not after the join: the
    /// sptes they protect stay writable in TLBs.
    harvest_thread_flushes_early,
    /// A vCPU leaving a pause hold leaves the count after its last look at
    /// the pause request: a new pause that comes in between counts it held
    /// while it goes back to its guest.
    pause_leaves_without_recheck,
    /// The `rmap-lock` design's harvest walks an rmap without taking its
    /// lock bit: a writer may free and reuse a descriptor under it.
    rmap_walk_without_lock,
    /// The `tdp` design's read-lock writers store sptes plainly instead of
    /// by compare-exchange: a fast path's W, or another reader's change,
    /// made since the snapshot is overwritten.
    tdp_plain_store_under_read_lock,
    /// With PML, GET, CLEAR and the ring harvest do not kick the vCPUs to
    /// drain their logs first: pages still in a log are not reported.
    pml_skip_sync,
    /// The `tdp` design hands an unlinked table back to its pool at once,
    /// with no grace period: a walker under the read lock may read, or
    /// write, a table that is someone else's.
    tdp_free_table_without_grace_period,
    /// The `tdp` design's fault path, having replaced a table by a huge
    /// leaf, flushes remote TLBs only after its read-side section ended: the
    /// table's grace period may end, and the table be freed, while a vCPU in
    /// guest mode still walks it.
    tdp_flush_after_section,
    /// A `tdp` walk that yielded (left its read-side section and the lock)
    /// goes on from the table it was in, instead of restarting from the
    /// root: that table may have been unlinked and freed meanwhile.
    tdp_walk_resumes_without_restart,
    /// The `tdp` design's fast path sets W with a plain store of its
    /// snapshot, not a compare-exchange: a zap (or write tracking) made
    /// since is undone.
    tdp_fast_path_plain_store,
    /// The `tdp` design takes a removed table apart with plain loads,
    /// without parking its entries at `FROZEN_SPTE`: a read-lock holder that
    /// reached the table before it was unlinked links a table into it,
    /// which nobody frees.
    tdp_removed_pt_without_freeze,
    /// A migration's source resumes its guest when the destination's
    /// `Running` does not come after it sent `Commit`, as if the `Commit`
    /// had been lost, instead of asking the destination.
    source_resumes_without_answer,
    /// The slow page fault maps a page writable in a logged slot without
    /// marking it dirty: the first store to fresh memory (or after an
    /// invalidation, or to a broken-up huge page) is lost.
    slow_fault_skips_mark_dirty,
}

// Folds away: without the feature, a `Breakage` holds nothing.
#[cfg(not(feature = "break-rules"))]
const _: () = assert!(std::mem::size_of::<Breakage>() == 0);

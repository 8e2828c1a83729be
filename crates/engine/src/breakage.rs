//! Test-only switches, each breaking one rule of the design, so that the
//! tests can show they catch it.
//!
//! The type is always compiled, because the lock-free primitives take it as a
//! parameter (so that the loom models run the very code the engine runs), but
//! only a `--features break-rules` build lets a VM be configured with a
//! switch on ([`crate::VmConfig::breakage`]); every normal build passes
//! `Breakage::SEED`, all off, and the checks fold away.

/// Which rules to break. All false: the seed's design.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Breakage {
    /// Locked design: `get_dirty_log` does not flush remote TLBs after
    /// write-protecting: a vCPU keeps writing through its stale writable TLB
    /// entry, unlogged.
    pub skip_get_dirty_log_flush: bool,
    /// Locked design: `get_dirty_log` harvests bits without write-protecting
    /// the pages.
    pub skip_write_protect: bool,
    /// No release fence between making an spte writable (and adding it to its
    /// rmap) and setting the dirty bit (patch 06).
    pub skip_dirty_bit_fence: bool,
    /// The lockless walker reads each descriptor bottom-up (index 0 first)
    /// instead of top-down (patch 09).
    pub bottom_up_walk: bool,
    /// Removal moves the last entry of the *last* descriptor into the hole,
    /// as before the seed (patch 07).
    pub remove_from_last_desc: bool,
    /// The lockless walker stops at any nulls marker, without checking that it
    /// is its own rmap's (patch 08/09).
    pub skip_nulls_check: bool,
    /// `mmu_spte_update` asks for a TLB flush only when the old spte was
    /// writable, not when it was locklessly modifiable (patch 04).
    pub skip_patch04_flush_rule: bool,
    /// `fast_page_fault` fixes large sptes too (the bug KVM reverted in
    /// commit 6b73a9606; patch 03).
    pub fast_fix_large_sptes: bool,
    /// Shadow page memory goes back to the system with no grace period
    /// (patch 12 and its review).
    pub free_shadow_pages_without_grace_period: bool,
    /// The single-entry collapse clears the freed descriptor's entry 0 after
    /// moving it into the head, as the seed does (patches 07, 10, 15).
    pub seed_collapse_clears_entry0: bool,
    /// A descriptor taken from the allocator gets its entries before its
    /// `more` (no "being initialised" 0 first): our order before issue 9.
    pub entries_before_more_on_reuse: bool,
    /// Locked design with `fast_page_fault` on: spte updates under
    /// `mmu_lock` are a plain load and store, not KVM 3.11's `xchg` for
    /// sptes with volatile bits.
    pub locked_plain_spte_update: bool,
    /// Enabling dirty logging write-protects without first waiting for the
    /// fast page faults that may have read the old flags (KVM 3.11's
    /// `synchronize_srcu_expedited` in the memslot update).
    pub skip_memslot_synchronize: bool,
}

impl Breakage {
    /// The seed's design: nothing broken.
    pub const SEED: Breakage = Breakage {
        skip_get_dirty_log_flush: false,
        skip_write_protect: false,
        skip_dirty_bit_fence: false,
        bottom_up_walk: false,
        remove_from_last_desc: false,
        skip_nulls_check: false,
        skip_patch04_flush_rule: false,
        fast_fix_large_sptes: false,
        free_shadow_pages_without_grace_period: false,
        seed_collapse_clears_entry0: false,
        entries_before_more_on_reuse: false,
        locked_plain_spte_update: false,
        skip_memslot_synchronize: false,
    };
}

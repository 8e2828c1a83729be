//! The VM's MMU figures, one [`Counter`] each (relaxed atomics, alone in
//! their cache lines; see `shadow_mmu_core::stats`).

pub use shadow_mmu_core::stats::Counter;

/// VM-wide MMU statistics.
#[derive(Debug, Default)]
pub struct MmuStats {
    /// Shadow pages created (`kvm_mmu_get_page` misses).
    pub sp_created: Counter,
    /// Shadow pages zapped.
    pub sp_zapped: Counter,
    /// Shadow pages zapped by the shrinker (`n_max_mmu_pages` pressure).
    pub sp_shrunk: Counter,
    /// Leaf sptes installed by `set_spte` (not counting remaps).
    pub sptes_mapped: Counter,
    /// Large (2 MiB) leaf sptes installed.
    pub large_sptes_mapped: Counter,
    /// Large sptes dropped (write protection in the locked design, or at
    /// fault time).
    pub large_sptes_dropped: Counter,
    /// Leaf sptes write-protected for dirty logging.
    pub sptes_write_protected: Counter,
    /// Remote TLB flushes (`kvm_flush_remote_tlbs`).
    pub remote_tlb_flushes: Counter,
    /// Nanoseconds spent in remote TLB flushes, waiting for vCPUs.
    pub remote_tlb_flush_ns: Counter,
    /// Pages marked in dirty bitmaps (`mark_page_dirty`).
    pub pages_marked_dirty: Counter,
    /// Dirty pages returned by `get_dirty_log`.
    pub pages_harvested: Counter,
    /// `get_dirty_log` calls.
    pub get_dirty_log_calls: Counter,
    /// Write faults fixed by `fast_page_fault`.
    pub fast_page_faults: Counter,
    /// Restarts of lockless rmap walks.
    pub lockless_walk_restarts: Counter,
    /// Read-side sections the lockless harvest opened: one per call, and one
    /// more at each quiescent point between chunks (`dirty_log.rs`).
    pub harvest_read_sections: Counter,
    /// Nanoseconds spent in `get_dirty_log`.
    pub get_dirty_log_ns: Counter,
}

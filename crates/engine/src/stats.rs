//! Counters shared between threads.
//!
//! Every counter is a relaxed atomic: counters are statistics, read after the
//! threads that update them are joined or as approximate live figures; no
//! other memory access is ordered by them.

use std::sync::atomic::{AtomicU64, Ordering};

/// A statistic counter, alone in its cache line: counters that different
/// threads bump (vCPUs, the harvester) must not share a line, or every bump
/// is a cache miss for the others.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct Counter(AtomicU64);

impl Counter {
    /// Zero.
    pub const fn new() -> Self {
        Self(AtomicU64::new(0))
    }

    /// Adds one.
    #[inline]
    pub fn inc(&self) {
        self.add(1);
    }

    /// Adds `n`.
    #[inline]
    pub fn add(&self, n: u64) {
        // Relaxed: a statistic (module docs).
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// Raises the value to `n` if it is lower (a running maximum).
    #[inline]
    pub fn max(&self, n: u64) {
        // Relaxed: a statistic (module docs).
        self.0.fetch_max(n, Ordering::Relaxed);
    }

    /// Current value.
    #[inline]
    pub fn get(&self) -> u64 {
        // Relaxed: a statistic (module docs).
        self.0.load(Ordering::Relaxed)
    }
}

/// Reads of poisoned (returned) descriptor or shadow page memory by lockless
/// walkers, process-wide. Only `break-rules` builds poison returned memory;
/// a correct grace period keeps this at 0.
#[cfg(feature = "break-rules")]
pub static POISON_READS: Counter = Counter::new();

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

//! The VM's MMU figures, one [`Counter`] each (relaxed atomics, alone in
//! their cache lines; see `shadow_mmu_core::stats`).

pub use shadow_mmu_core::stats::Counter;

/// Declares the MMU's counters once: the live [`MmuStats`] the VM bumps,
/// and the [`MmuCounts`] snapshot `Vm::stats` returns.
macro_rules! mmu_stats {
    ($( $(#[doc = $doc:literal])* $name:ident, )*) => {
        /// VM-wide MMU statistics, live.
        #[derive(Debug, Default)]
        pub struct MmuStats {
            $( $(#[doc = $doc])* pub $name: Counter, )*
        }

        /// A snapshot of [`MmuStats`].
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        pub struct MmuCounts {
            $( $(#[doc = $doc])* pub $name: u64, )*
        }

        impl MmuStats {
            /// The counters now (each read on its own: not one instant).
            pub fn snapshot(&self) -> MmuCounts {
                MmuCounts { $( $name: self.$name.get(), )* }
            }
        }
    };
}

mmu_stats! {
    /// Shadow pages created (`kvm_mmu_get_page` misses).
    sp_created,
    /// Shadow pages zapped.
    sp_zapped,
    /// Shadow pages zapped by the shrinker (`n_max_mmu_pages` pressure).
    sp_shrunk,
    /// Leaf sptes installed by `set_spte` (not counting remaps).
    sptes_mapped,
    /// Large (2 MiB) leaf sptes installed.
    large_sptes_mapped,
    /// Large sptes dropped (write protection in the locked design, or at
    /// fault time).
    large_sptes_dropped,
    /// Leaf sptes write-protected for dirty logging.
    sptes_write_protected,
    /// Remote TLB flushes (`kvm_flush_remote_tlbs`).
    remote_tlb_flushes,
    /// Nanoseconds spent in remote TLB flushes, waiting for vCPUs.
    remote_tlb_flush_ns,
    /// Pages marked in dirty bitmaps (`mark_page_dirty`).
    pages_marked_dirty,
    /// Dirty pages returned by `get_dirty_log`.
    pages_harvested,
    /// `get_dirty_log` calls.
    get_dirty_log_calls,
    /// Write faults fixed by `fast_page_fault`.
    fast_page_faults,
    /// Restarts of lockless rmap walks.
    lockless_walk_restarts,
    /// Read-side sections the lockless harvest opened: one per call, and one
    /// more at each quiescent point between chunks (`dirty_log.rs`).
    harvest_read_sections,
    /// Nanoseconds spent in `get_dirty_log`.
    get_dirty_log_ns,
    /// `clear_dirty_log` calls (manual protect).
    clear_dirty_log_calls,
    /// Nanoseconds spent in `clear_dirty_log`.
    clear_dirty_log_ns,
    /// Dirty bits `clear_dirty_log` found set, cleared and re-protected.
    pages_cleared,
    /// Dirty ring entries harvested.
    ring_entries_harvested,
    /// `reset_dirty_rings` calls.
    ring_resets,
    /// Dirty ring entries reset (given back and re-protected).
    ring_entries_reset,
    /// Nanoseconds spent in `reset_dirty_rings`.
    ring_reset_ns,
    /// Nanoseconds the harvest's walks (GET, CLEAR, ring reset) held
    /// `mmu_lock`, measured per thread (lockdep).
    harvest_mmu_lock_hold_ns,
    /// The longest of those holds, ns.
    harvest_mmu_lock_max_hold_ns,
    /// Times the harvest's walks (GET, CLEAR, ring reset) took `mmu_lock`
    /// for read (lockdep's per-thread count).
    harvest_mmu_lock_reads,
    /// ... and for write.
    harvest_mmu_lock_writes,
    /// Slow page faults that took `mmu_lock` for read (the TDP design's).
    fault_mmu_lock_reads,
    /// ... and for write (the shadow MMU designs').
    fault_mmu_lock_writes,
    /// PML syncs (`kvm_arch_sync_dirty_log`) before GET, CLEAR and ring
    /// harvests.
    pml_syncs,
    /// TDP MMU walks that yielded `mmu_lock` to a waiter.
    tdp_mmu_yields,
    /// TDP MMU slow faults that lost a race and faulted again (`RET_PF_RETRY`).
    tdp_fault_retries,
    /// Huge leaves split in place by TDP MMU faults or eager split.
    tdp_huge_pages_split,
    /// ... of which by eager split.
    tdp_eager_splits,
    /// Compare-exchanges the TDP MMU's read-lock walks lost, re-evaluated.
    tdp_cmpxchg_failures,
    /// With several harvest threads: the latest a helper thread started
    /// after its harvest began, ns.
    harvest_thread_start_max_ns,
}

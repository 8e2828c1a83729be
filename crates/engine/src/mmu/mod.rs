//! The shadow MMU: a direct map of guest physical memory built from shadow
//! pages, with rmaps from every gfn to the sptes that map it.
//!
//! The functions are named after `arch/x86/kvm/mmu.c` and `x86.c` and live in
//! `impl Kvm` blocks, one file per concern:
//! - `spte_ops.rs`: updating one spte and its rmap (`mmu_spte_*`,
//!   `drop_spte`, `rmap_add`/`rmap_remove`);
//! - `page.rs`: shadow page life (`kvm_mmu_get_page`, `link_shadow_page`,
//!   prepare/commit zapping, the shrinker);
//! - `fault.rs`: the slow page fault (`__direct_map`, `set_spte`);
//! - `write_protect.rs`: dirty logging (enable-logging and
//!   `get_dirty_log`'s write protection).
//!
//! # Locking
//!
//! `mmu_lock` (`lock::MmuLock`) serialises every writer of shadow page
//! tables, rmaps and shadow page headers. Readers outside it: vCPUs in guest
//! mode walking the tables (like the hardware page walker), and the
//! statistics. Shadow pages and pte_list descriptors come from type-stable
//! pools, so a reader that races with a zap never touches freed memory;
//! a zapped page's memory is reused only after `kvm_flush_remote_tlbs`
//! has waited for every vCPU in guest mode.
//!
//! # Designs
//!
//! [`MmuDesign`] selects, at run time, how dirty logging write-protects.
//! - `Locked` is KVM 3.11, the kernel the seed patched: enable-logging and
//!   `get_dirty_log` walk rmaps under `mmu_lock` and flush TLBs inside it;
//!   large sptes are dropped when write-protected; write faults on 4 KiB
//!   pages protected only for logging are fixed by `fast_page_fault`
//!   (`fast_fault.rs`, KVM since 3.6), so spte updates under the lock use
//!   `xchg` on sptes it may change (`lockless::SpteUpdate::Xchg`).
//! - `Lockless` is the seed (patches 02-15) with its review's outcome:
//!   write protection walks the rmaps without `mmu_lock`
//!   (`shadow_mmu_core::lockless`, `pte_list`), inside a grace period (`rcu`)
//!   that keeps descriptor and shadow page memory from going back to the
//!   system; large sptes are made read-only and dropped at fault time; TLB
//!   flushes happen after the walk, out of any lock, and `mmu_spte_update`
//!   flushes by patch 04's rule (with a plain store under the lock; the proof
//!   is at `lockless::spte_update_needs_flush`).
//! - `RmapLock` is the shadow MMU of 6.15 with its rmap lock bit
//!   (`KVM_RMAP_LOCKED`, upstream's for aging) applied to write protection:
//!   rmap writers take the bit of the rmap they change as well as
//!   `mmu_lock`; enable-logging, GET, CLEAR and the ring reset take only
//!   the bit of each rmap they walk (`pte_list`'s "The rmap lock") and clear
//!   W by compare-exchange, as the seed does; flushes and spte updates
//!   follow the seed's rules (patches 04, 05). No nulls markers, restarts
//!   or read-side sections: the bit keeps the chain still, and an spte
//!   leaves its rmap (taking the bit) before its shadow page can be freed
//!   (`drop_spte` before `kvm_mmu_commit_zap_page`), so every spte a walker
//!   reaches is in a live table. Shadow pages and descriptors still come
//!   from the same pools as in the other designs; this design's harvest
//!   relies on neither their type stability nor their grace period.
//!
//! - `Tdp` is upstream's TDP MMU (`tdp_mmu.c`, the default on EPT/NPT hosts
//!   since 5.15), in its own module tree (`crate::tdp_mmu`): no rmap, the
//!   same direct map walked as a tree, `mmu_lock` taken for read by faults
//!   and enable-logging and for write by the re-arm, atomic sptes, tables
//!   freed after a grace period, eager page splitting.
//!
//! `VmConfig::fast_page_fault` turns the fast path off in either design (the
//! baseline of the first measurements): every write fault then takes the slow path,
//! and the locked design, with no lockless writer left, updates sptes with
//! plain stores (`SpteUpdate::Plain`).

pub(crate) mod fast_fault;
pub(crate) mod fault;
pub(crate) mod lock;
/// The seed's lock-free spte operations live in the lock-free core, where
/// loom checks them.
pub(crate) use shadow_mmu_core::lockless;
pub(crate) mod notifier;
pub(crate) mod page;
pub(crate) mod spte_ops;
pub(crate) mod walk;
pub(crate) mod write_protect;

use std::sync::Arc;

use crate::shadow_page::{ShadowPage, SpPtr};
use crate::stats::MmuStats;
use lock::MmuLock;
use lockless::SpteUpdate;
use shadow_mmu_core::breakage::Breakage;
use shadow_mmu_core::pool::{MemoryCache, Pool, PoolLimits};
use shadow_mmu_core::pte_list::PteListDesc;
use shadow_mmu_core::rcu::Rcu;
use shadow_mmu_core::sync::atomic::{AtomicPtr, Ordering};

/// How dirty logging write-protects guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum MmuDesign {
    /// KVM before the seed: write protection under `mmu_lock`.
    #[default]
    Locked,
    /// The seed: lockless write protection.
    Lockless,
    /// The shadow MMU with 6.15's rmap lock bit, applied to write
    /// protection: each rmap walked under its own bit, not `mmu_lock`.
    RmapLock,
    /// Upstream's TDP MMU: no rmap, an rwlock `mmu_lock`, atomic sptes,
    /// tables freed after a grace period, eager split.
    Tdp,
}

impl MmuDesign {
    /// All designs, for tests and benchmarks that run each.
    pub const ALL: [MmuDesign; 4] =
        [MmuDesign::Locked, MmuDesign::Lockless, MmuDesign::RmapLock, MmuDesign::Tdp];

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            MmuDesign::Locked => "locked",
            MmuDesign::Lockless => "lockless",
            MmuDesign::RmapLock => "rmap-lock",
            MmuDesign::Tdp => "tdp",
        }
    }

    /// Is this the seed's lockless design (nulls lists, grace periods)?
    pub fn is_lockless(self) -> bool {
        self == MmuDesign::Lockless
    }

    /// Does dirty logging write-protect without `mmu_lock` (the seed, or
    /// the rmap lock)? Then an spte may lose W outside `mmu_lock`, with the
    /// flush after the walk: updates under the lock follow patch 04's rule.
    pub fn protects_without_mmu_lock(self) -> bool {
        matches!(self, MmuDesign::Lockless | MmuDesign::RmapLock)
    }

    /// Does the harvest's remote TLB flush come once, after every walking
    /// thread let go of its lock (the seed's patch 05, and upstream's
    /// batching in the TDP MMU), rather than inside `mmu_lock` (3.11)?
    pub fn flushes_after_harvest(self) -> bool {
        self != MmuDesign::Locked
    }
}

impl std::fmt::Display for MmuDesign {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is not an [`MmuDesign`]'s.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown MMU design {0:?} (known: locked, lockless, rmap-lock, tdp)")]
pub struct UnknownMmuDesign(pub String);

impl std::str::FromStr for MmuDesign {
    type Err = UnknownMmuDesign;
    fn from_str(s: &str) -> Result<Self, UnknownMmuDesign> {
        match s {
            "locked" => Ok(MmuDesign::Locked),
            "lockless" => Ok(MmuDesign::Lockless),
            "rmap-lock" => Ok(MmuDesign::RmapLock),
            "tdp" => Ok(MmuDesign::Tdp),
            other => Err(UnknownMmuDesign(other.to_string())),
        }
    }
}

/// Fewest pages a VM's shadow page budget may be (`KVM_MIN_ALLOC_MMU_PAGES`).
pub const KVM_MIN_ALLOC_MMU_PAGES: usize = 64;
/// Shadow pages per 1000 guest pages by default (`KVM_PERMILLE_MMU_PAGES`).
pub const KVM_PERMILLE_MMU_PAGES: u64 = 20;
/// The fault path zaps when fewer pages than this are left (`KVM_MIN_FREE_MMU_PAGES`).
pub const KVM_MIN_FREE_MMU_PAGES: usize = 5;
/// ... until this many are free again (`KVM_REFILL_PAGES`).
pub const KVM_REFILL_PAGES: usize = 25;
/// An rmap longer than this is recycled on add (`RMAP_RECYCLE_THRESHOLD`).
pub const RMAP_RECYCLE_THRESHOLD: usize = 1000;
/// Descriptors a fault may need: one per level for parent ptes, one for the
/// rmap, with KVM's margin (`8 + PTE_PREFETCH_NUM`).
pub const PTE_LIST_DESC_CACHE_MIN: usize = 16;
/// Shadow pages a fault may need: one per level below the root, and a root.
pub const MMU_PAGE_CACHE_MIN: usize = 4;

/// `kvm_mmu_calculate_mmu_pages`: the default shadow page budget for a VM
/// with `guest_pages` pages of memory.
pub fn default_max_mmu_pages(guest_pages: u64) -> usize {
    ((guest_pages * KVM_PERMILLE_MMU_PAGES / 1000) as usize).max(KVM_MIN_ALLOC_MMU_PAGES)
}

/// Buckets of `mmu_page_hash` (`KVM_NUM_MMU_PAGES`).
pub const KVM_NUM_MMU_PAGES: usize = 1 << 12;

/// State guarded by `mmu_lock`. Nothing here allocates after the VM is
/// built: the hash has a fixed number of buckets chained through the shadow
/// pages' headers, and the lists are intrusive, as in KVM.
pub(crate) struct MmuLocked {
    /// `mmu_page_hash`: shadow pages by (gfn, role).
    pub(crate) hash: Box<[Option<SpPtr>]>,
    /// `active_mmu_pages`: newest at the head, oldest at the tail.
    pub(crate) active_head: Option<SpPtr>,
    pub(crate) active_tail: Option<SpPtr>,
    /// `n_used_mmu_pages`.
    pub(crate) n_used_mmu_pages: usize,
    /// `n_max_mmu_pages`.
    pub(crate) n_max_mmu_pages: usize,
    /// Did the user set the budget (`n_requested_mmu_pages`)? If not, it
    /// follows the size of guest memory.
    pub(crate) n_requested_mmu_pages: Option<usize>,
}

/// A vCPU's memory caches (`mmu_pte_list_desc_cache`, `mmu_page_cache`).
#[derive(Default)]
pub struct MmuCaches {
    pub(crate) desc: MemoryCache<PteListDesc>,
    pub(crate) sp: MemoryCache<ShadowPage>,
}

impl std::fmt::Debug for MmuCaches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmuCaches").field("desc", &self.desc.len()).field("sp", &self.sp.len()).finish()
    }
}

/// How one VM's MMU is built.
#[derive(Debug, Clone)]
pub(crate) struct MmuParams {
    pub(crate) design: MmuDesign,
    pub(crate) fast_page_fault: bool,
    pub(crate) address_spaces: u16,
    pub(crate) large_pages: bool,
    pub(crate) eager_page_split: bool,
    pub(crate) pml: bool,
    pub(crate) max_mmu_pages: Option<usize>,
    pub(crate) sp_limits: PoolLimits,
    pub(crate) desc_limits: PoolLimits,
    pub(crate) breakage: Breakage,
}

impl MmuParams {
    #[cfg(all(test, not(loom)))]
    pub(crate) fn for_tests(design: MmuDesign) -> Self {
        let limits = PoolLimits { max_free: 64, max_deferred_bytes: 1 << 20 };
        Self {
            design,
            fast_page_fault: true,
            address_spaces: 1,
            large_pages: true,
            eager_page_split: true,
            pml: false,
            max_mmu_pages: None,
            sp_limits: limits,
            desc_limits: limits,
            breakage: Breakage::SEED,
        }
    }
}

/// The MMU of one VM.
pub(crate) struct Mmu {
    pub(crate) design: MmuDesign,
    /// Does a write fault on a page protected only for logging try
    /// `fast_page_fault` first (both designs; `VmConfig::fast_page_fault`)?
    pub(crate) fast_page_fault: bool,
    /// How spte updates under `mmu_lock` are made, and when they flush.
    pub(crate) spte_update: SpteUpdate,
    /// Rules broken on purpose (`Breakage::SEED` unless a `break-rules`
    /// build configured otherwise).
    pub(crate) breakage: Breakage,
    pub(crate) lock: MmuLock,
    /// Grace periods for lockless walkers: descriptor and shadow page memory
    /// goes back to the system only after one.
    pub(crate) rcu: Arc<Rcu>,
    pub(crate) sp_pool: Pool<ShadowPage>,
    pub(crate) desc_pool: Pool<PteListDesc>,
    /// Root of each address space (`root_hpa`), published with release
    /// stores under `mmu_lock`, read by vCPU page walks with acquire loads.
    roots: Box<[AtomicPtr<ShadowPage>]>,
    pub(crate) large_pages: bool,
    /// The TDP design's trees' bookkeeping (unused by the others).
    pub(crate) tdp: crate::tdp_mmu::TdpMmu,
    pub(crate) stats: MmuStats,
}

impl Mmu {
    pub(crate) fn new(p: MmuParams) -> Self {
        let rcu = Arc::new(Rcu::default());
        // `mut` only for the break-rules switch below.
        #[allow(unused_mut)]
        let mut sp_pool = Pool::new(p.sp_limits, rcu.clone());
        #[cfg(feature = "break-rules")]
        if p.breakage.free_shadow_pages_without_grace_period() {
            sp_pool.break_grace_period();
        }
        let max = p.max_mmu_pages;
        Self {
            design: p.design,
            fast_page_fault: p.fast_page_fault,
            spte_update: SpteUpdate::for_mmu(
                p.design.protects_without_mmu_lock(),
                p.fast_page_fault,
                &p.breakage,
            ),
            breakage: p.breakage,
            rcu: rcu.clone(),
            lock: MmuLock::new(MmuLocked {
                hash: vec![None; KVM_NUM_MMU_PAGES].into_boxed_slice(),
                active_head: None,
                active_tail: None,
                n_used_mmu_pages: 0,
                n_max_mmu_pages: max.unwrap_or(KVM_MIN_ALLOC_MMU_PAGES),
                n_requested_mmu_pages: max,
            }),
            sp_pool,
            desc_pool: Pool::new(p.desc_limits, rcu),
            roots: (0..p.address_spaces).map(|_| AtomicPtr::new(std::ptr::null_mut())).collect(),
            large_pages: p.large_pages,
            tdp: crate::tdp_mmu::TdpMmu::new(p.eager_page_split, p.pml),
            stats: MmuStats::default(),
        }
    }

    /// Number of address spaces.
    pub(crate) fn address_spaces(&self) -> u16 {
        self.roots.len() as u16
    }

    /// The root of `asid`, if built (a vCPU's page walk reads it).
    #[inline]
    pub(crate) fn root(&self, asid: u16) -> Option<SpPtr> {
        // Acquire: pairs with the release store in `set_root`, so the walker
        // sees the root's initialised (empty) table.
        let p = self.roots[asid as usize].load(Ordering::Acquire);
        std::ptr::NonNull::new(p).map(SpPtr::from_pool)
    }

    /// Where the root of `asid` is published.
    pub(crate) fn root_slot(&self, asid: u16) -> &AtomicPtr<ShadowPage> {
        &self.roots[asid as usize]
    }

    /// Publishes (or clears) the root of `asid`. Under `mmu_lock`.
    pub(crate) fn set_root(&self, asid: u16, sp: Option<SpPtr>) {
        let p = sp.map_or(std::ptr::null_mut(), |sp| sp.as_non_null().as_ptr());
        // Release: see `root`.
        self.roots[asid as usize].store(p, Ordering::Release);
    }

    /// `mmu_topup_memory_caches`: called before taking `mmu_lock`.
    pub(crate) fn topup_memory_caches(&self, caches: &mut MmuCaches) {
        caches.desc.topup(&self.desc_pool, PTE_LIST_DESC_CACHE_MIN);
        caches.sp.topup(&self.sp_pool, MMU_PAGE_CACHE_MIN);
    }

    /// `mmu_free_memory_caches`.
    pub(crate) fn free_memory_caches(&self, caches: &mut MmuCaches) {
        caches.desc.release(&self.desc_pool);
        caches.sp.release(&self.sp_pool);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    #[should_panic(expected = "pool allocation under mmu_lock")]
    fn allocating_under_mmu_lock_is_caught() {
        let mmu = Mmu::new(MmuParams::for_tests(MmuDesign::Locked));
        let _g = mmu.lock.lock();
        let mut caches = MmuCaches::default();
        mmu.topup_memory_caches(&mut caches);
    }

    #[test]
    fn topping_up_outside_the_lock_is_fine() {
        let mmu = Mmu::new(MmuParams::for_tests(MmuDesign::Locked));
        let mut caches = MmuCaches::default();
        mmu.topup_memory_caches(&mut caches);
        {
            let _g = mmu.lock.lock();
            // Taking from a cache under the lock is what the fault path does.
            // SAFETY: the cache took it from `desc_pool`, and hands it out once.
            unsafe { mmu.desc_pool.free(caches.desc.alloc()) };
        }
        mmu.topup_memory_caches(&mut caches);
        mmu.free_memory_caches(&mut caches);
        assert_eq!(mmu.desc_pool.in_use(), 0);
    }
}

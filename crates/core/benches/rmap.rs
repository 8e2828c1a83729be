//! rmap (pte_list) operations and the write protection of one spte, on one
//! thread with nothing contending, at rmap lengths 1, 3, 30 and 300:
//! - `rmap_add`: one `pte_list_add` to an rmap of N entries (descriptor from
//!   a vCPU's memory cache, as `rmap_add` takes it). The rmap is built by N
//!   adds in order, so for N = 3, 30, 300 the first descriptor is full and
//!   the add pushes a new one; every add to a chain also counts the chain
//!   (`count_spte_number`), so it walks all N/3 descriptors.
//! - `rmap_remove`: one `pte_list_remove` of the oldest entry, which sits in
//!   the last descriptor: the worst case, the search walks the whole chain
//!   (then the forward move from the first descriptor). A descriptor that
//!   leaves the list goes back to the type-stable pool, as `rmap_remove`'s do.
//! - `rmap_walk_locked`: `pte_list_walk` (the walk used under `mmu_lock`)
//!   over all N entries; counts entries visited.
//! - `rmap_walk_lockless`: `pte_list_walk_lockless` (patch 09) over all N
//!   entries, inside a read-side section of the grace period that is entered
//!   once, outside the timed part (the harvester, too, walks many rmaps per
//!   section); counts entries visited. `rcu_read_section` is the cost of
//!   entering and leaving one section, for reference.
//! - `write_protect_one_spte_locked`: the locked design's write protection
//!   of a writable, present 4 KiB spte (`Kvm::spte_write_protect`: a relaxed
//!   load and a release store via `mmu_spte_update`), as done under
//!   `mmu_lock`, whose cost is not included (it is taken once per harvest).
//! - `write_protect_one_spte_lockless`: the lockless one
//!   (`spte_write_protect_lockless`, patch 13): a compare-exchange loop.
//!
//! Each iteration of the mutating benchmarks gets its own rmap or spte, built
//! (or made writable again) outside the timed part, and torn down after the
//! sample. The sptes are plain `AtomicU64`s in a `Vec`: a pte_list only needs
//! their addresses, and the write protection only their values.
//!
//! `cargo bench -p shadow-mmu-core --bench rmap`

use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use divan::counter::ItemsCount;
use divan::{Bencher, black_box};
use shadow_mmu_core::breakage::Breakage;
use shadow_mmu_core::lockless::{__mmu_spte_update, SpteUpdate, spte_write_protect_lockless};
use shadow_mmu_core::pool::{MemoryCache, Pool, PoolLimits};
use shadow_mmu_core::pte_list::{PteListDesc, PteListHead, SptePtr};
use shadow_mmu_core::rcu::Rcu;
use shadow_mmu_core::spte::{
    PT_PAGE_TABLE_LEVEL, PT_WRITABLE_MASK, is_large_pte, is_writable_pte, make_leaf_spte,
};

/// rmap lengths.
const LENS: [usize; 4] = [1, 3, 30, 300];

/// A writable, present, last-level (4 KiB) spte.
const WRITABLE_4K: u64 = make_leaf_spte(0x1234, PT_PAGE_TABLE_LEVEL, true, true);

fn main() {
    divan::main();
}

/// A type-stable descriptor pool, as a VM's `desc_pool`, whose grace
/// periods are `rcu`'s, large enough that frees never wait for one.
fn desc_pool(rcu: &Arc<Rcu>) -> Pool<PteListDesc> {
    let limits = PoolLimits { max_free: 1 << 16, max_deferred_bytes: 1 << 20 };
    Pool::new(limits, rcu.clone())
}

/// One rmap of `n` entries, with its sptes (one spare, for `add`) and a
/// memory cache topped up from `pool`.
struct Rmap<'p> {
    pool: &'p Pool<PteListDesc>,
    cache: MemoryCache<PteListDesc>,
    /// Boxed: the list's nulls marker is the head's address, so it must not
    /// move while the list has descriptors.
    head: Box<PteListHead>,
    sptes: Box<[AtomicU64]>,
}

impl<'p> Rmap<'p> {
    fn new(n: usize, pool: &'p Pool<PteListDesc>) -> Self {
        let sptes = (0..=n)
            .map(|i| AtomicU64::new(make_leaf_spte(i as u64, PT_PAGE_TABLE_LEVEL, true, true)))
            .collect();
        let mut r = Self { pool, cache: MemoryCache::default(), head: Box::default(), sptes };
        for i in 0..n {
            let p = r.spte(i);
            // SAFETY: one thread, so writers are serialised; descriptors come
            // clean from `pool`, which outlives the list (`'p`); the sptes
            // live as long as the list (`Drop` empties it first).
            unsafe { r.head.add(p, &mut || pool.alloc()) };
        }
        r.cache.topup(pool, 1);
        r
    }

    fn spte(&self, i: usize) -> SptePtr {
        NonNull::from(&self.sptes[i])
    }

    /// Adds the spare spte (timed by `rmap_add`).
    #[inline]
    fn add_spare(&mut self) -> usize {
        let p = self.spte(self.sptes.len() - 1);
        let cache = &mut self.cache;
        // SAFETY: as in `new`; the cache holds clean descriptors of `pool`.
        unsafe { self.head.add(p, &mut || cache.alloc()) }
    }

    /// Removes the oldest entry (timed by `rmap_remove`).
    #[inline]
    fn remove_oldest(&mut self) {
        let p = self.spte(0);
        let pool = self.pool;
        // SAFETY: descriptors leave the list clean, each once, to the
        // type-stable pool they came from.
        let mut free = |d| unsafe { pool.free(d) };
        // SAFETY: as in `new`; entry 0 is in the list.
        unsafe { self.head.remove(p, &mut free) };
    }
}

impl Drop for Rmap<'_> {
    fn drop(&mut self) {
        let pool = self.pool;
        // SAFETY: as in `new`; a fresh iterator after each removal.
        while let Some(p) = unsafe { self.head.iter() }.next() {
            // SAFETY: as in `remove_oldest`.
            let mut free = |d| unsafe { pool.free(d) };
            // SAFETY: as in `remove_oldest`; `p` is in the list.
            unsafe { self.head.remove(p, &mut free) };
        }
        self.cache.release(pool);
    }
}

#[divan::bench(args = LENS)]
fn rmap_add(bencher: Bencher, n: usize) {
    let pool = desc_pool(&Arc::default());
    bencher.with_inputs(|| Rmap::new(n, &pool)).bench_local_refs(|r| r.add_spare());
}

#[divan::bench(args = LENS)]
fn rmap_remove(bencher: Bencher, n: usize) {
    let pool = desc_pool(&Arc::default());
    bencher.with_inputs(|| Rmap::new(n, &pool)).bench_local_refs(|r| r.remove_oldest());
}

#[divan::bench(args = LENS)]
fn rmap_walk_locked(bencher: Bencher, n: usize) {
    let pool = desc_pool(&Arc::default());
    let r = Rmap::new(n, &pool);
    bencher.counter(ItemsCount::new(n)).bench_local(|| {
        let mut seen = 0usize;
        // SAFETY: one thread: no writer runs during the walk, as under
        // mmu_lock; the callback does not modify the list.
        unsafe {
            r.head.walk(|p| {
                black_box(p);
                seen += 1;
            })
        };
        seen
    });
}

#[divan::bench(args = LENS)]
fn rmap_walk_lockless(bencher: Bencher, n: usize) {
    let rcu = Arc::default();
    let pool = desc_pool(&rcu);
    let r = Rmap::new(n, &pool);
    // One read-side section of the pool's grace periods for the whole
    // benchmark (module docs).
    let section = rcu.read_lock();
    bencher.counter(ItemsCount::new(n)).bench_local(|| {
        let mut seen = 0usize;
        // SAFETY: descriptors come from a type-stable pool of `rcu`, the
        // section's domain, and the sptes outlive `r`; no writer runs.
        let restarts = unsafe {
            r.head.walk_lockless(&section, &Breakage::SEED, |p| {
                black_box(p);
                seen += 1;
            })
        };
        debug_assert_eq!(restarts, 0);
        seen
    });
}

#[divan::bench]
fn rcu_read_section(bencher: Bencher) {
    let rcu = Rcu::default();
    bencher.bench_local(|| drop(black_box(rcu.read_lock())));
}

/// `Kvm::spte_write_protect` (`write_protect.rs`) for a 4 KiB spte, with
/// `mmu_lock` held by the caller: a large spte would be dropped instead.
/// `rule`: KVM 3.11's `xchg`, or the plain store of a locked design with no
/// fast path.
#[inline]
fn spte_write_protect_locked(sptep: &AtomicU64, rule: SpteUpdate) -> bool {
    // Relaxed: under mmu_lock, which every spte writer of this design holds.
    let spte = sptep.load(Ordering::Relaxed);
    if !is_writable_pte(spte) {
        return false;
    }
    assert!(!is_large_pte(spte), "4 KiB sptes only");
    __mmu_spte_update(sptep, spte & !PT_WRITABLE_MASK, rule, &Breakage::SEED)
}

/// The locked design, KVM 3.11 (`fast_page_fault` on): `xchg`.
#[divan::bench]
fn write_protect_one_spte_locked(bencher: Bencher) {
    bencher.with_inputs(|| AtomicU64::new(WRITABLE_4K)).bench_local_refs(|s| {
        let flush = spte_write_protect_locked(s, SpteUpdate::Xchg);
        debug_assert!(flush && !is_writable_pte(s.load(Ordering::Relaxed)));
        flush
    });
}

/// The locked design with `fast_page_fault` off: a load and a store.
#[divan::bench]
fn write_protect_one_spte_locked_no_fast_page_fault(bencher: Bencher) {
    bencher.with_inputs(|| AtomicU64::new(WRITABLE_4K)).bench_local_refs(|s| {
        let flush = spte_write_protect_locked(s, SpteUpdate::Plain);
        debug_assert!(flush && !is_writable_pte(s.load(Ordering::Relaxed)));
        flush
    });
}

#[divan::bench]
fn write_protect_one_spte_lockless(bencher: Bencher) {
    bencher.with_inputs(|| AtomicU64::new(WRITABLE_4K)).bench_local_refs(|s| {
        let cleared = spte_write_protect_lockless(s);
        debug_assert!(cleared && !is_writable_pte(s.load(Ordering::Relaxed)));
        cleared
    });
}

//! Type-stable object pools and the per-vCPU memory caches.
//!
//! # Type stability
//!
//! A [`Pool`] is our `kmem_cache` created with `SLAB_DESTROY_BY_RCU`: an
//! object handed back with [`Pool::free`] may be handed out again at once, to
//! any user, but its memory goes back to the system only after a grace period
//! of the VM's [`Rcu`] domain. Objects are built once by
//! [`PoolObject::construct`] (the slab constructor, patch 10/15) and never
//! re-initialised wholesale: users hand objects back in the state the
//! constructor produces ([`PoolObject::is_clean`]).
//!
//! Invariant: a pointer this pool returned stays a valid `T` for any reader
//! inside a read-side section that began before the object was handed back,
//! and for everyone while the object is in use or in the free list. That is
//! what lets a lockless rmap walker keep dereferencing a descriptor or spte
//! pointer it loaded: at worst it reads an object that now belongs to someone
//! else, never freed memory.
//!
//! # Returning memory, bounded (the review of patch 12)
//!
//! Up to `max_free` handed-back objects stay in the free list for reuse. The
//! rest are *retired*: tagged with the current epoch and queued until a grace
//! period has passed, then deallocated. The queue is bounded by
//! `max_deferred_bytes`: a free that would exceed it waits for a grace period
//! (`synchronize`) and releases the whole queue, instead of queueing more.
//! That is the throttle Marcelo asked for in place of unbounded `call_rcu`.
//!
//! # Memory caches
//!
//! The page fault path never allocates under `mmu_lock`: a vCPU tops up its
//! [`MemoryCache`]s before it takes the lock (`mmu_topup_memory_caches`) and
//! takes objects from them under the lock (checked: see `lockdep`).

use std::collections::VecDeque;
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;

use crate::rcu::Rcu;
use crate::stats::Counter;

/// Objects per vCPU memory cache (`KVM_NR_MEM_OBJS`).
pub const KVM_NR_MEM_OBJS: usize = 40;

/// An object a [`Pool`] manages.
pub trait PoolObject: Sized + Send + Sync {
    /// Builds one object in its clean state: the slab constructor. Runs once
    /// per object's memory, never on reuse.
    fn construct() -> Box<Self>;

    /// Is the object in the clean state free objects must be in?
    fn is_clean(&self) -> bool;

    /// Overwrites the object with a recognisable poison, in place of
    /// returning its memory (`break-rules` builds only: readers check for the
    /// poison to catch reads of memory returned too early).
    #[cfg(feature = "break-rules")]
    fn poison(&self);
}

/// An owned pointer to a pool object (sendable, unlike `NonNull`).
struct Owned<T>(NonNull<T>);

// SAFETY: an `Owned` is the pool's record of an object it owns; `T` is
// `Send + Sync` (a `PoolObject` bound on every use), so moving the record
// between threads moves nothing that is not already shareable.
unsafe impl<T: Send + Sync> Send for Owned<T> {}

/// How much a pool keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolLimits {
    /// Handed-back objects kept for immediate reuse.
    pub max_free: usize,
    /// Bytes of retired objects that may wait for a grace period before the
    /// freeing side has to wait itself.
    pub max_deferred_bytes: usize,
}

/// Figures of a pool.
#[derive(Debug, Default)]
pub struct PoolStats {
    /// Objects returned to the system (after their grace period).
    pub returned: Counter,
    /// Times a free waited for a grace period because the backlog was full.
    pub backlog_waits: Counter,
    /// The longest such wait, nanoseconds. Frees run under `mmu_lock`, so
    /// this is how long a full backlog can hold the lock (and every fault
    /// behind it) waiting for lockless readers.
    pub backlog_wait_max_ns: Counter,
}

/// A type-stable pool of `T`.
///
/// Freeing never allocates (it runs under `mmu_lock`): the free list and the
/// retired queue are reserved up front for their bounds (`max_free + 1`
/// objects; the backlog's bytes), and past the backlog's bound the freeing
/// side waits for a grace period and returns everything instead of queueing.
pub struct Pool<T: PoolObject> {
    free: Mutex<Vec<Owned<T>>>,
    retired: Mutex<VecDeque<(u64, Owned<T>)>>,
    retired_bytes: AtomicUsize,
    allocated: AtomicUsize,
    in_use: AtomicUsize,
    limits: PoolLimits,
    rcu: Arc<Rcu>,
    /// Figures.
    pub stats: PoolStats,
    /// Return memory with no grace period (the `break-rules` switch).
    #[cfg(feature = "break-rules")]
    no_grace_period: bool,
}

impl<T: PoolObject> std::fmt::Debug for Pool<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("allocated", &self.allocated())
            .field("in_use", &self.in_use())
            .field("limits", &self.limits)
            .finish()
    }
}

impl<T: PoolObject> Pool<T> {
    /// An empty pool whose grace periods are `rcu`'s.
    pub fn new(limits: PoolLimits, rcu: Arc<Rcu>) -> Self {
        let backlog = limits.max_deferred_bytes / std::mem::size_of::<T>() + 1;
        Self {
            free: Mutex::new(Vec::with_capacity(limits.max_free + 1)),
            retired: Mutex::new(VecDeque::with_capacity(backlog)),
            retired_bytes: AtomicUsize::new(0),
            allocated: AtomicUsize::new(0),
            in_use: AtomicUsize::new(0),
            limits,
            rcu,
            stats: PoolStats::default(),
            #[cfg(feature = "break-rules")]
            no_grace_period: false,
        }
    }

    /// Breaks the grace period rule: memory "returned" at once.
    #[cfg(feature = "break-rules")]
    pub fn break_grace_period(&mut self) {
        self.no_grace_period = true;
    }

    /// Moves `n` objects into `out`: reused ones first, new ones after.
    ///
    /// # Panics
    /// If the calling thread holds `mmu_lock`: the fault path tops up its
    /// caches before it takes the lock, and nothing else allocates.
    pub fn alloc_into(&self, n: usize, out: &mut Vec<NonNull<T>>) {
        assert!(!crate::lockdep::holds_mmu_lock(), "pool allocation under mmu_lock");
        let mut free = self.free.lock();
        let reuse = n.min(free.len());
        let at = free.len() - reuse;
        out.extend(free.drain(at..).map(|o| o.0));
        drop(free);
        for _ in reuse..n {
            out.push(NonNull::from(Box::leak(T::construct())));
        }
        // Relaxed: statistics.
        self.allocated.fetch_add(n - reuse, Ordering::Relaxed);
        self.in_use.fetch_add(n, Ordering::Relaxed);
    }

    /// One object.
    pub fn alloc(&self) -> NonNull<T> {
        let mut v = Vec::with_capacity(1);
        self.alloc_into(1, &mut v);
        v[0]
    }

    /// Hands `obj` back: reused at once, or retired (module docs).
    ///
    /// # Safety
    ///
    /// `obj` came from this pool (`alloc`, `alloc_into`, or a
    /// [`MemoryCache`] topped up from it) and is in use: it was not handed
    /// back since, and nobody hands it back again until the pool allocates
    /// it anew (two frees would give one object to two owners). The caller
    /// has unlinked it from everything a new reader could reach it through;
    /// readers that already hold it may go on reading it (the memory stays
    /// a `T` of this pool: type stability).
    ///
    /// # Panics
    /// In debug builds, if the object is not clean.
    pub unsafe fn free(&self, obj: NonNull<T>) {
        // SAFETY: `obj` came from this pool and is in use, so its memory is a
        // live `T`.
        debug_assert!(unsafe { obj.as_ref() }.is_clean(), "pool object freed dirty");
        // Relaxed: a statistic.
        self.in_use.fetch_sub(1, Ordering::Relaxed);
        let mut free = self.free.lock();
        if free.len() < self.limits.max_free {
            // Within the reserved capacity: no allocation.
            free.push(Owned(obj));
            return;
        }
        drop(free);
        self.retire(Owned(obj));
    }

    /// Hands back many objects.
    ///
    /// # Safety
    ///
    /// Each of `objs` is one [`Pool::free`] may take (its `# Safety`), and
    /// none comes twice.
    pub unsafe fn free_all(&self, objs: impl IntoIterator<Item = NonNull<T>>) {
        for obj in objs {
            // SAFETY: the caller's contract, object by object.
            unsafe { self.free(obj) };
        }
    }

    /// Queues `o` for return to the system after a grace period, or, if the
    /// backlog is full, waits for one and returns everything queued.
    fn retire(&self, o: Owned<T>) {
        #[cfg(feature = "break-rules")]
        if self.no_grace_period {
            self.release(o);
            return;
        }
        let size = std::mem::size_of::<T>();
        let tag = self.rcu.tag();
        let mut retired = self.retired.lock();
        // Relaxed: only changed under the `retired` lock.
        if self.retired_bytes.load(Ordering::Relaxed) + size > self.limits.max_deferred_bytes {
            // The backlog is full: wait for a grace period instead of
            // queueing more. Everything queued, and `o`, was unlinked before
            // now.
            self.stats.backlog_waits.inc();
            let t0 = std::time::Instant::now();
            self.rcu.synchronize();
            self.stats.backlog_wait_max_ns.max(t0.elapsed().as_nanos() as u64);
            while let Some((_, q)) = retired.pop_front() {
                self.release(q);
            }
            self.retired_bytes.store(0, Ordering::Relaxed);
            self.release(o);
            return;
        }
        // Within the reserved capacity: no allocation.
        retired.push_back((tag, o));
        self.retired_bytes.fetch_add(size, Ordering::Relaxed);
        // Opportunistically return what has waited long enough; tags only
        // grow along the queue, so one poll answers for a run of equal tags.
        while let Some(&(t, _)) = retired.front() {
            if !self.rcu.poll(t) {
                break;
            }
            while retired.front().is_some_and(|&(u, _)| u <= t) {
                let (_, q) = retired.pop_front().expect("front exists");
                self.release(q);
                self.retired_bytes.fetch_sub(size, Ordering::Relaxed);
            }
        }
    }

    /// Returns one object's memory to the system: its grace period has
    /// passed (or, in a `break-rules` build, is being skipped on purpose).
    fn release(&self, o: Owned<T>) {
        self.stats.returned.inc();
        // Relaxed: a statistic.
        self.allocated.fetch_sub(1, Ordering::Relaxed);
        // In a `break-rules` build the object is poisoned and its memory
        // kept, never freed: a reader that comes too late (the switch) reads
        // poison, which it counts, rather than freed memory.
        #[cfg(feature = "break-rules")]
        // SAFETY: the object is owned by the pool and alive.
        unsafe { o.0.as_ref() }.poison();
        #[cfg(not(feature = "break-rules"))]
        // SAFETY: the object was made by `Box::leak` in `alloc_into`, handed
        // back and unlinked, and a grace period has passed since, so no reader
        // holds it; it is released exactly once, here.
        drop(unsafe { Box::from_raw(o.0.as_ptr()) });
    }

    /// Objects whose memory the pool holds (in use, free or retired).
    pub fn allocated(&self) -> usize {
        // Relaxed: a statistic.
        self.allocated.load(Ordering::Relaxed)
    }

    /// Objects handed out and not handed back.
    pub fn in_use(&self) -> usize {
        // Relaxed: a statistic.
        self.in_use.load(Ordering::Relaxed)
    }

    /// Objects in the free list.
    pub fn free_len(&self) -> usize {
        self.free.lock().len()
    }

    /// Bytes waiting for a grace period.
    pub fn deferred_bytes(&self) -> usize {
        // Relaxed: a statistic.
        self.retired_bytes.load(Ordering::Relaxed)
    }

    /// Bytes of memory the pool holds.
    pub fn bytes(&self) -> usize {
        self.allocated() * std::mem::size_of::<T>()
    }
}

impl<T: PoolObject> Drop for Pool<T> {
    fn drop(&mut self) {
        debug_assert_eq!(self.in_use(), 0, "pool dropped with objects in use");
        let free = self.free.get_mut().drain(..);
        let retired = self.retired.get_mut().drain(..).map(|(_, o)| o);
        for Owned(obj) in free.chain(retired) {
            // SAFETY: every object here was made by `Box::leak` in `alloc_into`
            // and is owned by the pool, which is being dropped (`&mut self`):
            // no user and no reader remain. Each is released once.
            drop(unsafe { Box::from_raw(obj.as_ptr()) });
        }
    }
}

/// A vCPU's cache of pool objects (`kvm_mmu_memory_cache`).
pub struct MemoryCache<T: PoolObject> {
    objs: Vec<NonNull<T>>,
}

// SAFETY: the cache exclusively owns the objects in it (nobody else holds
// them until `alloc` hands one out), and `T: Send + Sync`.
unsafe impl<T: PoolObject> Send for MemoryCache<T> {}

impl<T: PoolObject> Default for MemoryCache<T> {
    fn default() -> Self {
        Self { objs: Vec::with_capacity(KVM_NR_MEM_OBJS) }
    }
}

impl<T: PoolObject> MemoryCache<T> {
    /// `mmu_topup_memory_cache`: refills to capacity if fewer than `min`
    /// objects are left. Called without `mmu_lock`.
    pub fn topup(&mut self, pool: &Pool<T>, min: usize) {
        debug_assert!(min <= KVM_NR_MEM_OBJS);
        if self.objs.len() >= min {
            return;
        }
        pool.alloc_into(KVM_NR_MEM_OBJS - self.objs.len(), &mut self.objs);
    }

    /// `mmu_memory_cache_alloc`: one object.
    ///
    /// # Panics
    /// If the cache is empty: the caller did not top it up enough before
    /// taking `mmu_lock`, a bug (KVM `BUG_ON`s likewise).
    pub fn alloc(&mut self) -> NonNull<T> {
        self.objs.pop().expect("memory cache exhausted: not topped up before taking mmu_lock")
    }

    /// Objects left.
    pub fn len(&self) -> usize {
        self.objs.len()
    }

    /// Is the cache empty?
    pub fn is_empty(&self) -> bool {
        self.objs.is_empty()
    }

    /// Hands every object back to `pool` (`mmu_free_memory_cache`).
    pub fn release(&mut self, pool: &Pool<T>) {
        // SAFETY: a cache holds objects it took from `pool` (its top-ups) and
        // has not handed out; draining it hands each back once.
        unsafe { pool.free_all(self.objs.drain(..)) };
    }
}

impl<T: PoolObject> Drop for MemoryCache<T> {
    fn drop(&mut self) {
        debug_assert!(self.objs.is_empty(), "memory cache dropped without release()");
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    struct Obj {
        v: AtomicU64,
    }
    impl PoolObject for Obj {
        fn construct() -> Box<Self> {
            Box::new(Obj { v: AtomicU64::new(0) })
        }
        fn is_clean(&self) -> bool {
            self.v.load(Ordering::Relaxed) == 0
        }
        #[cfg(feature = "break-rules")]
        fn poison(&self) {
            self.v.store(u64::MAX, Ordering::Relaxed);
        }
    }

    fn pool(max_free: usize, max_deferred_bytes: usize) -> (Pool<Obj>, Arc<Rcu>) {
        let rcu = Arc::new(Rcu::new(4));
        (Pool::new(PoolLimits { max_free, max_deferred_bytes }, rcu.clone()), rcu)
    }

    #[test]
    fn freed_objects_are_reused_at_once() {
        let (pool, _) = pool(8, 1 << 20);
        let a = pool.alloc();
        // SAFETY: allocated just above, freed once.
        unsafe { pool.free(a) };
        let b = pool.alloc();
        assert_eq!(a, b, "reused at once");
        assert_eq!((pool.allocated(), pool.in_use()), (1, 1));
        // SAFETY: allocated again just above, freed once.
        unsafe { pool.free(b) };
        assert_eq!((pool.allocated(), pool.in_use(), pool.free_len()), (1, 0, 1));
    }

    #[test]
    fn the_excess_is_returned_only_after_a_grace_period() {
        let (pool, rcu) = pool(2, 1 << 20);
        let mut objs = Vec::new();
        pool.alloc_into(6, &mut objs);
        let guard = rcu.read_lock();
        // SAFETY: the six allocated above, each once.
        unsafe { pool.free_all(objs) };
        assert_eq!(pool.free_len(), 2);
        assert_eq!(pool.allocated(), 6, "4 retired, not returned: a reader may hold them");
        assert_eq!(pool.deferred_bytes(), 4 * std::mem::size_of::<Obj>());
        drop(guard);
        // The next retirement finds the grace period over and returns them.
        let more = pool.alloc();
        let extra = pool.alloc();
        let third = pool.alloc();
        // SAFETY: the three allocated just above, each once.
        unsafe { pool.free_all([more, extra, third]) };
        assert_eq!(pool.allocated(), 2);
        assert_eq!(pool.stats.returned.get(), 5);
        assert_eq!(pool.deferred_bytes(), 0);
    }

    #[test]
    fn a_full_backlog_makes_the_freeing_side_wait() {
        let size = std::mem::size_of::<Obj>();
        let (pool, rcu) = pool(0, 3 * size);
        let pool = Arc::new(pool);
        let mut objs = Vec::new();
        pool.alloc_into(4, &mut objs);
        let guard = rcu.read_lock();
        let objs: Vec<usize> = objs.into_iter().map(|p| p.as_ptr() as usize).collect();
        // SAFETY: three of the four allocated above, each once.
        unsafe { pool.free_all(objs[..3].iter().map(|&p| NonNull::new(p as *mut Obj).unwrap())) };
        assert_eq!(pool.deferred_bytes(), 3 * size, "within the bound: queued");
        let freer = {
            let pool = pool.clone();
            let last = objs[3];
            // SAFETY: the fourth allocated above, freed once, here.
            std::thread::spawn(move || unsafe { pool.free(NonNull::new(last as *mut Obj).unwrap()) })
        };
        std::thread::sleep(std::time::Duration::from_millis(30));
        assert!(!freer.is_finished(), "past the bound the freeing side waits for the reader");
        drop(guard);
        freer.join().unwrap();
        assert_eq!((pool.deferred_bytes(), pool.allocated()), (0, 0));
        assert_eq!(pool.stats.backlog_waits.get(), 1);
    }

    #[test]
    fn cache_tops_up_to_capacity_below_min() {
        let (pool, _) = pool(1000, 1 << 20);
        let mut cache = MemoryCache::<Obj>::default();
        cache.topup(&pool, 4);
        assert_eq!(cache.len(), KVM_NR_MEM_OBJS);
        for _ in 0..KVM_NR_MEM_OBJS - 4 {
            // SAFETY: the cache took it from `pool` and hands it out once.
            unsafe { pool.free(cache.alloc()) };
        }
        cache.topup(&pool, 4);
        assert_eq!(cache.len(), 4, "no refill while min is met");
        cache.topup(&pool, 5);
        assert_eq!(cache.len(), KVM_NR_MEM_OBJS);
        assert_eq!(pool.allocated(), KVM_NR_MEM_OBJS, "refill reused freed objects");
        cache.release(&pool);
        assert_eq!(pool.in_use(), 0);
    }
}

//! Type-stable object pools and the per-vCPU memory caches.
//!
//! # Type stability
//!
//! A [`Pool`] is our `kmem_cache` created with `SLAB_DESTROY_BY_RCU`: an
//! object handed back with [`Pool::free`] may be handed out again at once, to
//! any user, but its memory stays a valid `T` for as long as the pool lives.
//! Objects are built once by [`PoolObject::construct`] (the slab constructor,
//! patch 10/15) and never re-initialised wholesale: users hand objects back
//! in the "clean" state the constructor produces ([`PoolObject::is_clean`]).
//!
//! Invariant: every pointer this pool ever returned points to a live `T`
//! until the pool is dropped. That is what makes it sound for a reader that
//! raced with a free (a vCPU's page walk, a lockless rmap walker) to keep
//! dereferencing a pointer it loaded earlier: at worst it reads an object that
//! now belongs to someone else, never freed memory.
//!
//! This pool keeps the memory of freed objects until the VM is dropped; it
//! never needs more than the peak number of objects in use, which the
//! shrinker bounds for shadow pages (`n_max_mmu_pages`) and the rmaps bound
//! for descriptors.
//!
//! # Memory caches
//!
//! The page fault path never allocates under `mmu_lock`: a vCPU tops up its
//! [`MemoryCache`]s before it takes the lock (`mmu_topup_memory_caches`) and
//! takes objects from them under the lock.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;

/// Objects per vCPU memory cache (`KVM_NR_MEM_OBJS`).
pub const KVM_NR_MEM_OBJS: usize = 40;

/// An object a [`Pool`] manages.
pub trait PoolObject: Sized + Send + Sync {
    /// Builds one object in its clean state: the slab constructor. Runs once
    /// per object's memory, never on reuse.
    fn construct() -> Box<Self>;

    /// Is the object in the clean state free objects must be in?
    fn is_clean(&self) -> bool;
}

/// An owned pointer to a pool object (sendable, unlike `NonNull`).
struct Owned<T>(NonNull<T>);

// SAFETY: an `Owned` is the pool's record of an object it owns; `T` is
// `Send + Sync` (a `PoolObject` bound on every use), so moving the record
// between threads moves nothing that is not already shareable.
unsafe impl<T: Send + Sync> Send for Owned<T> {}

/// A type-stable pool of `T`.
pub struct Pool<T: PoolObject> {
    free: Mutex<Vec<Owned<T>>>,
    all: Mutex<Vec<Owned<T>>>,
    in_use: AtomicUsize,
}

impl<T: PoolObject> Default for Pool<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: PoolObject> std::fmt::Debug for Pool<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("allocated", &self.allocated()).field("in_use", &self.in_use()).finish()
    }
}

impl<T: PoolObject> Pool<T> {
    /// An empty pool.
    pub fn new() -> Self {
        Self { free: Mutex::new(Vec::new()), all: Mutex::new(Vec::new()), in_use: AtomicUsize::new(0) }
    }

    /// Moves up to `n` objects into `out`: reused ones first, new ones after.
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
        let fresh = n - reuse;
        if fresh > 0 {
            let mut all = self.all.lock();
            for _ in 0..fresh {
                let obj = NonNull::from(Box::leak(T::construct()));
                all.push(Owned(obj));
                out.push(obj);
            }
        }
        // Relaxed: a statistic.
        self.in_use.fetch_add(n, Ordering::Relaxed);
    }

    /// One object.
    pub fn alloc(&self) -> NonNull<T> {
        let mut v = Vec::with_capacity(1);
        self.alloc_into(1, &mut v);
        v[0]
    }

    /// Hands `obj` back for immediate reuse. The memory stays a `T` until the
    /// pool is dropped.
    ///
    /// # Panics
    /// In debug builds, if the object is not clean.
    pub fn free(&self, obj: NonNull<T>) {
        // SAFETY: `obj` came from this pool (caller's use of the API), and pool
        // memory is live until the pool drops.
        debug_assert!(unsafe { obj.as_ref() }.is_clean(), "pool object freed dirty");
        self.free.lock().push(Owned(obj));
        // Relaxed: a statistic.
        self.in_use.fetch_sub(1, Ordering::Relaxed);
    }

    /// Hands back many objects.
    pub fn free_all(&self, objs: impl IntoIterator<Item = NonNull<T>>) {
        let mut free = self.free.lock();
        let mut n = 0;
        for obj in objs {
            // SAFETY: as in `free`.
            debug_assert!(unsafe { obj.as_ref() }.is_clean(), "pool object freed dirty");
            free.push(Owned(obj));
            n += 1;
        }
        // Relaxed: a statistic.
        self.in_use.fetch_sub(n, Ordering::Relaxed);
    }

    /// Objects whose memory the pool holds.
    pub fn allocated(&self) -> usize {
        self.all.lock().len()
    }

    /// Objects handed out and not handed back.
    pub fn in_use(&self) -> usize {
        // Relaxed: a statistic.
        self.in_use.load(Ordering::Relaxed)
    }

    /// Bytes of memory the pool holds.
    pub fn bytes(&self) -> usize {
        self.allocated() * std::mem::size_of::<T>()
    }
}

impl<T: PoolObject> Drop for Pool<T> {
    fn drop(&mut self) {
        for Owned(obj) in self.all.get_mut().drain(..) {
            // SAFETY: every object in `all` was made by `Box::leak` in
            // `alloc_into` and is released exactly once, here. Dropping the pool
            // requires `&mut self`, so no user of the pool remains.
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
        pool.free_all(self.objs.drain(..));
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
    }

    #[test]
    fn freed_objects_are_reused_and_memory_kept() {
        let pool = Pool::<Obj>::new();
        let a = pool.alloc();
        pool.free(a);
        let b = pool.alloc();
        assert_eq!(a, b, "reused at once");
        assert_eq!(pool.allocated(), 1);
        assert_eq!(pool.in_use(), 1);
        pool.free(b);
        assert_eq!(pool.in_use(), 0);
        assert_eq!(pool.allocated(), 1, "memory kept until drop");
    }

    #[test]
    fn cache_tops_up_to_capacity_below_min() {
        let pool = Pool::<Obj>::new();
        let mut cache = MemoryCache::<Obj>::default();
        cache.topup(&pool, 4);
        assert_eq!(cache.len(), KVM_NR_MEM_OBJS);
        for _ in 0..KVM_NR_MEM_OBJS - 4 {
            pool.free(cache.alloc());
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

//! A minimal lockdep: which of our locks the current thread holds, so that
//! rules like "the fault path never allocates under `mmu_lock`" are checked
//! on every run, not just believed.

use std::cell::Cell;

thread_local! {
    static HOLDS_MMU_LOCK: Cell<bool> = const { Cell::new(false) };
    /// Nanoseconds this thread has held `mmu_lock`, and its longest hold.
    static HELD_NS: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
    /// Times this thread took `mmu_lock`: (for read, for write).
    static TAKEN: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
    /// Nanoseconds this thread waited for `mmu_lock`: (for read, for
    /// write, of either behind a harvest).
    static WAITED_NS: Cell<(u64, u64, u64)> = const { Cell::new((0, 0, 0)) };
}

/// Adds one wait for `mmu_lock` by this thread, `ns` long; `behind_harvest`:
/// a harvest held the lock (or was between its holds) when it began.
#[inline]
pub fn add_mmu_lock_wait(write: bool, ns: u64, behind_harvest: bool) {
    WAITED_NS.with(|c| {
        let (r, w, h) = c.get();
        let h = h + if behind_harvest { ns } else { 0 };
        c.set(if write { (r, w + ns, h) } else { (r + ns, w, h) });
    });
}

/// This thread's waits for `mmu_lock` so far, ns: (for read, for write, of
/// either behind a harvest). A vCPU reads it around each fault, so that
/// what it lost to the lock is its own, not the VM's.
#[inline]
pub fn mmu_lock_waits() -> (u64, u64, u64) {
    WAITED_NS.with(Cell::get)
}

/// Counts one acquisition of `mmu_lock` by this thread.
#[inline]
pub fn count_mmu_lock(write: bool) {
    TAKEN.with(|c| {
        let (r, w) = c.get();
        c.set(if write { (r, w + 1) } else { (r + 1, w) });
    });
}

/// This thread's acquisitions of `mmu_lock` so far: (for read, for write).
/// A harvest reads it before and after, so that the counters show which
/// mode it took.
#[inline]
pub fn mmu_lock_takes() -> (u64, u64) {
    TAKEN.with(Cell::get)
}

/// Adds one hold of `mmu_lock` by this thread, `ns` long.
#[inline]
pub fn add_mmu_lock_hold(ns: u64) {
    HELD_NS.with(|c| {
        let (total, max) = c.get();
        c.set((total + ns, max.max(ns)));
    });
}

/// This thread's holds of `mmu_lock` so far: (total ns, longest ns). A
/// harvest reads it before and after, so that the time it held the lock is
/// measured, not assumed.
#[inline]
pub fn mmu_lock_holds() -> (u64, u64) {
    HELD_NS.with(Cell::get)
}

/// Starts a new longest-hold window for this thread (the total goes on).
#[inline]
pub fn reset_mmu_lock_max_hold() {
    HELD_NS.with(|c| c.set((c.get().0, 0)));
}

/// Records that this thread took (`true`) or released (`false`) `mmu_lock`.
#[inline]
pub fn set_holds_mmu_lock(held: bool) {
    HOLDS_MMU_LOCK.with(|c| c.set(held));
}

/// Does this thread hold `mmu_lock`? (Public for the allocation test.)
#[inline]
pub fn holds_mmu_lock() -> bool {
    HOLDS_MMU_LOCK.with(Cell::get)
}

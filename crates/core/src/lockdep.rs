//! A minimal lockdep: which of our locks the current thread holds, so that
//! rules like "the fault path never allocates under `mmu_lock`" are checked
//! on every run, not just believed.

use std::cell::Cell;

thread_local! {
    static HOLDS_MMU_LOCK: Cell<bool> = const { Cell::new(false) };
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

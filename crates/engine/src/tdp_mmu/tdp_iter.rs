//! `tdp_iter.c`: a pre-order walk of one root's paging tree over a gfn
//! range, the TDP MMU's only way to reach an spte (it has no rmap).
//!
//! The walk visits every entry on the way from the root to `min_level`
//! whose region overlaps the range, parents before children. It
//! re-reads an entry before stepping down into it, so that it never
//! descends into a table that was just unlinked, and after a yield
//! ([`TdpIter::set_yielded`]) it restarts from the root at the gfn it had
//! reached, since any table may have been freed meanwhile.
//!
//! The walker holds the iterator and a separate pin (a read-side section of
//! the VM's `rcu`, or the write lock), and passes the pin to each step: the
//! tables on `pt_path` are valid only while it lives, and a walk that drops
//! it must set `yielded` before its next step.

use crate::shadow_page::{PinsShadowPages, SpPtr};
use shadow_mmu_core::spte::{
    PT64_ENT_PER_PAGE, PT64_ROOT_LEVEL, is_last_spte, is_shadow_present_pte, level_base_gfn, pages_per_spte,
    spte_index,
};
use shadow_mmu_core::sync::atomic::{AtomicU64, Ordering};

/// `struct tdp_iter`.
pub(crate) struct TdpIter {
    /// The gfn the walk heads for: where it resumes after a restart.
    next_last_level_gfn: u64,
    /// `next_last_level_gfn` at the last yield: a walk yields again only
    /// after it moved past it (forward progress).
    yielded_gfn: u64,
    /// The table walked at each level (index: level).
    pt_path: [Option<SpPtr>; PT64_ROOT_LEVEL as usize + 1],
    root_level: u8,
    min_level: u8,
    /// The entry's level.
    pub(crate) level: u8,
    /// The first gfn the entry maps.
    pub(crate) gfn: u64,
    /// The entry as last read.
    pub(crate) old_spte: u64,
    /// Is there an entry (not walked off the end)?
    pub(crate) valid: bool,
    /// Did the walker drop its pin since the last step?
    yielded: bool,
}

impl TdpIter {
    /// `tdp_iter_start`: the walk of `root` from `start`, down to `min_level`.
    pub(crate) fn start(pin: &impl PinsShadowPages, root: SpPtr, min_level: u8, start: u64) -> Self {
        let mut pt_path = [None; PT64_ROOT_LEVEL as usize + 1];
        pt_path[PT64_ROOT_LEVEL as usize] = Some(root);
        let mut it = Self {
            next_last_level_gfn: start,
            yielded_gfn: start,
            pt_path,
            root_level: PT64_ROOT_LEVEL,
            min_level,
            level: PT64_ROOT_LEVEL,
            gfn: 0,
            old_spte: 0,
            valid: true,
            yielded: false,
        };
        it.restart(pin);
        it
    }

    /// The entry.
    #[inline]
    pub(crate) fn sptep<'p>(&self, pin: &'p impl PinsShadowPages) -> &'p AtomicU64 {
        let table = self.pt_path[self.level as usize].expect("a table at every level walked");
        table.get(pin).spte(spte_index(self.gfn, self.level))
    }

    /// Reads the entry again (`kvm_tdp_mmu_read_spte`).
    #[inline]
    fn refresh(&mut self, pin: &impl PinsShadowPages) {
        // Acquire: pairs with the release (or AcqRel) stores that link a
        // table or install a leaf, so what it points to is seen whole.
        self.old_spte = self.sptep(pin).load(Ordering::Acquire);
    }

    /// `tdp_iter_restart`: from the root again, at `next_last_level_gfn`.
    fn restart(&mut self, pin: &impl PinsShadowPages) {
        self.yielded = false;
        self.yielded_gfn = self.next_last_level_gfn;
        self.level = self.root_level;
        self.gfn = level_base_gfn(self.next_last_level_gfn, self.level);
        self.refresh(pin);
        self.valid = true;
    }

    /// The walker dropped its pin (and maybe the lock): the next step
    /// restarts from the root.
    pub(crate) fn set_yielded(&mut self) {
        self.yielded = true;
    }

    /// `tdp_mmu_iter_need_resched`'s progress test: has the walk moved
    /// since it last yielded (or started)?
    pub(crate) fn made_progress(&self) -> bool {
        self.next_last_level_gfn != self.yielded_gfn
    }

    /// The table the entry points to, if it is a present non-leaf.
    fn child(&self) -> Option<SpPtr> {
        if !is_shadow_present_pte(self.old_spte) || is_last_spte(self.old_spte, self.level) {
            return None;
        }
        // SAFETY: a present non-leaf spte read from one of our tables.
        Some(unsafe { SpPtr::from_nonleaf_spte(self.old_spte) })
    }

    fn try_step_down(&mut self, pin: &impl PinsShadowPages) -> bool {
        if self.level == self.min_level {
            return false;
        }
        // Re-read: never step into a table unlinked since we read the entry.
        self.refresh(pin);
        let Some(child) = self.child() else { return false };
        self.level -= 1;
        self.pt_path[self.level as usize] = Some(child);
        self.gfn = level_base_gfn(self.next_last_level_gfn, self.level);
        self.refresh(pin);
        true
    }

    fn try_step_side(&mut self, pin: &impl PinsShadowPages) -> bool {
        if spte_index(self.gfn, self.level) == PT64_ENT_PER_PAGE - 1 {
            return false;
        }
        self.gfn += pages_per_spte(self.level);
        self.next_last_level_gfn = self.gfn;
        self.refresh(pin);
        true
    }

    fn try_step_up(&mut self, pin: &impl PinsShadowPages) -> bool {
        if self.level == self.root_level {
            return false;
        }
        self.level += 1;
        self.gfn = level_base_gfn(self.gfn, self.level);
        self.refresh(pin);
        true
    }

    /// `tdp_iter_next`: down if it can, else sideways, else up and sideways.
    pub(crate) fn next(&mut self, pin: &impl PinsShadowPages) {
        if self.yielded {
            self.restart(pin);
            return;
        }
        if self.try_step_down(pin) {
            return;
        }
        loop {
            if self.try_step_side(pin) {
                return;
            }
            if !self.try_step_up(pin) {
                break;
            }
        }
        self.valid = false;
    }

    /// Does the walk have an entry before `end`
    /// (`for_each_tdp_pte_min_level`'s loop test)?
    #[inline]
    pub(crate) fn within(&self, end: u64) -> bool {
        self.valid && self.gfn < end
    }
}

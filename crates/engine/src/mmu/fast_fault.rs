//! `fast_page_fault` (KVM 3.6, with the seed's patches 02 and 03), in both
//! designs unless the VM is built without it (`VmConfig::fast_page_fault`).
//!
//! A write fault on a present leaf spte that is read-only only because dirty
//! logging write-protected it ([`spte_is_locklessly_modifiable`]) is fixed by
//! one compare-exchange that sets W, without `mmu_lock`, then the page is
//! marked dirty (in patch 06's order, see `shadow_mmu_core::lockless`).
//!
//! - The vCPU walks the shadow page tables in `READING_SHADOW_PAGE_TABLES`
//!   mode (`walk_shadow_page_lockless_begin`), so a remote TLB flush, which
//!   every shadow page free waits for, waits for the walk: the tables it
//!   reads are not freed or reused under it, and their headers are stable.
//! - The level is the shadow page's (patch 02), not the caller's.
//! - Large sptes are never fixed here (patch 03): marking the first 4 KiB of
//!   the 2 MiB dirty would leave the other 511 pages writable and unlogged,
//!   the bug KVM reverted once (commit 6b73a9606). They take the slow path,
//!   which maps 4 KiB pages.
//!
//! - In the locked design the spte updates under `mmu_lock` use `xchg` on
//!   sptes this path may change (KVM 3.11's `spte_has_volatile_bits`), so
//!   that a W we set between a locked writer's load and store is seen and
//!   flushed for (`lockless::SpteUpdate`); the lockless design keeps a plain
//!   store and patch 04's flush rule instead.
//!
//! Enabling dirty logging races with this path: the enabler sets the slot's
//! flag, then walks the rmaps clearing W; we set W, then read the flag to
//! decide whether to mark. KVM 3.11 orders the two with its SRCU memslot
//! update: the new memslots are installed, `synchronize_srcu_expedited` waits
//! for every vCPU that may still use the old ones, and only then does
//! `kvm_arch_commit_memory_region` write-protect. Our read-side section is
//! the `READING_SHADOW_PAGE_TABLES` mode this walk runs in, and the
//! enabler's wait is `VcpuSet::synchronize_lockless_walks`. Either our walk
//! began after the enabler's fence (`begin_lockless_walk`'s fence and the
//! enabler's are both SeqCst, so one precedes the other), and then we read
//! the new flag and mark the page; or the enabler saw us in this mode and
//! waited for our release store of `OUTSIDE_GUEST_MODE`, and then its walk
//! happens after our compare-exchange, sees W and clears it.

use super::lockless::fast_pf_fix_direct_spte;
use super::walk::LocklessWalk;
use crate::shadow_page::{SpPtr, page_header};
use crate::vcpu::requests::VcpuShared;
use crate::vm::Kvm;
use shadow_mmu_core::dirty_ring::DirtyRing;
use shadow_mmu_core::spte::{
    PT_PAGE_TABLE_LEVEL, PT64_ROOT_LEVEL, is_last_spte, is_shadow_present_pte, is_writable_pte, spte_index,
    spte_is_locklessly_modifiable,
};
use shadow_mmu_core::sync::atomic::Ordering;

impl Kvm {
    /// `fast_page_fault`: tries to fix a write fault on `gfn` without
    /// `mmu_lock`. Returns true when the access can be retried (fixed, or
    /// found already writable: a spurious fault), false to take the slow path.
    pub(crate) fn fast_page_fault(
        &self,
        vcpu: &VcpuShared,
        ring: Option<&DirtyRing>,
        gfn: u64,
        asid: u16,
    ) -> bool {
        let Some(root) = self.mmu.root(asid) else { return false };
        let walk = LocklessWalk::begin(vcpu);
        self.fast_page_fault_walk(&walk, ring, root, gfn)
        // `walk` drops here: walk_shadow_page_lockless_end.
    }

    fn fast_page_fault_walk(
        &self,
        walk: &LocklessWalk<'_>,
        ring: Option<&DirtyRing>,
        root: SpPtr,
        gfn: u64,
    ) -> bool {
        let mut sp = root;
        let mut level = PT64_ROOT_LEVEL;
        let (sptep, spte) = loop {
            let sptep = sp.get(walk).spte(spte_index(gfn, level));
            // Acquire: pairs with the release stores that make sptes present.
            let spte = sptep.load(Ordering::Acquire);
            if !is_shadow_present_pte(spte) {
                return false;
            }
            if is_last_spte(spte, level) {
                break (sptep, spte);
            }
            // SAFETY: a present non-leaf spte of one of our tables.
            sp = unsafe { SpPtr::from_nonleaf_spte(spte) };
            level -= 1;
        };
        // Patch 02: the level of the shadow page the spte sits in.
        // SAFETY: `sptep` points into one of our tables.
        let sp = unsafe { page_header(sptep) }.get(walk);
        let sp_level = sp.role().level;
        if !is_last_spte(spte, sp_level) {
            return false;
        }
        if is_writable_pte(spte) {
            // Someone fixed it already.
            return true;
        }
        if !spte_is_locklessly_modifiable(spte) {
            return false;
        }
        // Patch 03: never fix a large spte here.
        if sp_level > PT_PAGE_TABLE_LEVEL && !self.mmu.breakage.fast_fix_large_sptes() {
            return false;
        }
        let gfn = sp.spte_gfn(sp.spte_index_of(sptep));
        if fast_pf_fix_direct_spte(sptep, spte) {
            // The flag is read inside our read-side section (module docs).
            let slots = self.memslots.load();
            if let Some(slot) = slots.find(gfn)
                && slot.dirty_logging()
            {
                self.mark_page_dirty_in_slot(slot, gfn, ring);
            }
            self.mmu.stats.fast_page_faults.inc();
        }
        true
    }
}

//! The life of a shadow page: lookup and creation (`kvm_mmu_get_page`),
//! linking into its parent (`link_shadow_page`), zapping in two steps
//! (`kvm_mmu_prepare_zap_page`, `kvm_mmu_commit_zap_page`) and the shrinker
//! (`make_mmu_pages_available`).
//!
//! Zapping is prepare, then commit:
//! - prepare (under `mmu_lock`): unlink the page's children and parents,
//!   mark it invalid, move it from the active list to an invalid list. It is
//!   unreachable from any root afterwards, but a vCPU that loaded a pointer
//!   to it before may still be walking it.
//! - commit: flush remote TLBs, which waits for every vCPU in guest mode to
//!   reach an access boundary, so no walk of the page is in flight; then
//!   isolate it (remove it from the hash, patch 11) and free it to the
//!   type-stable pool.
//!
//! Roots are pinned: each address space's root holds a root reference
//! (`root_count`) for the life of the VM, and the shrinker skips pages with
//! root references, so only [`Kvm::kvm_mmu_zap_all`] zaps roots.

use super::lock::MmuGuard;
use super::{KVM_MIN_FREE_MMU_PAGES, KVM_NUM_MMU_PAGES, KVM_REFILL_PAGES, MmuCaches, MmuLocked};
use crate::memslot::Memslot;
use crate::shadow_page::{SpPtr, SpRole};
use crate::vm::Kvm;
use shadow_mmu_core::pte_list::PteListHead;
use shadow_mmu_core::spte::{
    PT64_ROOT_LEVEL, is_last_spte, is_shadow_present_pte, make_nonleaf_spte, mapping_levels,
};
use shadow_mmu_core::sync::atomic::{AtomicU64, Ordering};

impl MmuLocked {
    fn active_push_head(&mut self, sp: SpPtr) {
        let p = sp.get(self);
        p.set_link_prev(None);
        p.set_link_next(self.active_head);
        match self.active_head {
            Some(h) => h.get(self).set_link_prev(Some(sp)),
            None => self.active_tail = Some(sp),
        }
        self.active_head = Some(sp);
    }

    fn active_remove(&mut self, sp: SpPtr) {
        let p = sp.get(self);
        let (prev, next) = (p.link_prev(), p.link_next());
        p.set_link_prev(None);
        p.set_link_next(None);
        match prev {
            Some(prev) => prev.get(self).set_link_next(next),
            None => self.active_head = next,
        }
        match next {
            Some(next) => next.get(self).set_link_prev(prev),
            None => self.active_tail = prev,
        }
    }

    /// Shadow pages on the active list, newest first.
    pub(crate) fn active_pages(&self) -> impl Iterator<Item = SpPtr> + '_ {
        std::iter::successors(self.active_head, |sp| sp.get(self).link_next())
    }

    /// `kvm_page_table_hashfn`, over gfn and role (direct pages at one level
    /// have gfns aligned alike, so the role must spread them too).
    fn bucket(gfn: u64, role: SpRole) -> usize {
        let key = gfn ^ (u64::from(role.level) << 56) ^ (u64::from(role.asid) << 40);
        (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - KVM_NUM_MMU_PAGES.trailing_zeros())) as usize
    }

    /// The page for (`gfn`, `role`), if hashed (`for_each_gfn_sp`).
    pub(crate) fn hash_lookup(&self, gfn: u64, role: SpRole) -> Option<SpPtr> {
        let mut cur = self.hash[Self::bucket(gfn, role)];
        while let Some(sp) = cur {
            let p = sp.get(self);
            if p.gfn() == gfn && p.role() == role {
                return Some(sp);
            }
            cur = p.hash_next();
        }
        None
    }

    fn hash_insert(&mut self, sp: SpPtr) {
        let p = sp.get(self);
        let b = Self::bucket(p.gfn(), p.role());
        p.set_hash_next(self.hash[b]);
        self.hash[b] = Some(sp);
    }

    fn hash_remove(&mut self, sp: SpPtr) {
        let p = sp.get(self);
        let b = Self::bucket(p.gfn(), p.role());
        let next = p.hash_next();
        p.set_hash_next(None);
        if self.hash[b] == Some(sp) {
            self.hash[b] = next;
            return;
        }
        let mut cur = self.hash[b];
        while let Some(c) = cur {
            if c.get(self).hash_next() == Some(sp) {
                c.get(self).set_hash_next(next);
                return;
            }
            cur = c.get(self).hash_next();
        }
        panic!("{:?} is not in mmu_page_hash", sp.get(self));
    }

    /// Pages in the hash (walks every bucket; for the audit).
    pub(crate) fn hash_len(&self) -> usize {
        self.hash.iter().map(|b| std::iter::successors(*b, |sp| sp.get(self).hash_next()).count()).sum()
    }
}

/// Pages between prepare and commit (`invalid_list`), chained through the
/// links they no longer use on the active list.
#[derive(Default)]
pub(crate) struct InvalidList {
    head: Option<SpPtr>,
}

impl InvalidList {
    fn push(&mut self, g: &MmuGuard<'_>, sp: SpPtr) {
        sp.get(g).set_link_next(self.head);
        self.head = Some(sp);
    }

    fn pop(&mut self, g: &MmuGuard<'_>) -> Option<SpPtr> {
        let sp = self.head?;
        self.head = sp.get(g).link_next();
        sp.get(g).set_link_next(None);
        Some(sp)
    }
}

impl Kvm {
    /// `kvm_mmu_get_page`: the shadow page for (`gfn`, `level`, `asid`),
    /// found in the hash or made from the vCPU's cache.
    pub(crate) fn kvm_mmu_get_page(
        &self,
        g: &mut MmuGuard<'_>,
        caches: &mut MmuCaches,
        gfn: u64,
        level: u8,
        asid: u16,
    ) -> SpPtr {
        let role = SpRole { level, direct: true, asid };
        if let Some(sp) = g.hash_lookup(gfn, role) {
            debug_assert!(!sp.get(g).is_invalid());
            return sp;
        }
        let sp = SpPtr::from_pool(caches.sp.alloc());
        let p = sp.get(g);
        debug_assert!(p.is_empty() && p.parent_ptes().is_empty());
        p.init(gfn, role);
        g.hash_insert(sp);
        g.active_push_head(sp);
        g.n_used_mmu_pages += 1;
        self.mmu.stats.sp_created.inc();
        sp
    }

    /// `link_shadow_page`: points `sptep`, in a table of `level`, at `child`.
    pub(crate) fn link_shadow_page(
        &self,
        g: &MmuGuard<'_>,
        caches: &mut MmuCaches,
        sptep: &AtomicU64,
        child: SpPtr,
        level: u8,
    ) {
        self.mmu_page_add_parent_pte(g, caches, child, sptep);
        self.mmu_spte_set(g, sptep, make_nonleaf_spte(child.get(g).table_addr(), level));
    }

    /// `mmu_alloc_direct_roots`: the root of `asid`, built and pinned on first
    /// use.
    pub(crate) fn mmu_alloc_direct_root(
        &self,
        g: &mut MmuGuard<'_>,
        caches: &mut MmuCaches,
        asid: u16,
    ) -> SpPtr {
        if let Some(root) = self.mmu.root(asid) {
            return root;
        }
        let root = self.kvm_mmu_get_page(g, caches, 0, PT64_ROOT_LEVEL, asid);
        root.get(g).get_root();
        self.mmu.set_root(asid, Some(root));
        root
    }

    /// `mmu_page_zap_pte`: clears one spte of `sp`, dropping a leaf from its
    /// rmap or unlinking a child table.
    pub(crate) fn mmu_page_zap_pte(&self, g: &MmuGuard<'_>, sp: SpPtr, sptep: &AtomicU64) {
        let pte = sptep.load(Ordering::Relaxed);
        if !is_shadow_present_pte(pte) {
            return;
        }
        if is_last_spte(pte, sp.get(g).role().level) {
            self.drop_spte(g, sptep);
        } else {
            // SAFETY: a present non-leaf spte of one of our tables.
            let child = unsafe { SpPtr::from_nonleaf_spte(pte) };
            self.drop_parent_pte(g, child, sptep);
        }
    }

    /// `kvm_mmu_page_unlink_children`.
    fn kvm_mmu_page_unlink_children(&self, g: &MmuGuard<'_>, sp: SpPtr) {
        for sptep in sp.get(g).spt() {
            self.mmu_page_zap_pte(g, sp, sptep);
        }
    }

    /// `kvm_mmu_unlink_parents`.
    fn kvm_mmu_unlink_parents(&self, g: &MmuGuard<'_>, sp: SpPtr) {
        loop {
            // SAFETY: we hold mmu_lock; the list is not modified while the
            // iterator is used (we take one entry, then start over).
            let first = unsafe { sp.get(g).parent_ptes().iter() }.next();
            let Some(parent) = first else { break };
            // SAFETY: parent_ptes holds pointers to sptes in our tables, which
            // are type-stable.
            let parent = unsafe { parent.as_ref() };
            self.drop_parent_pte(g, sp, parent);
        }
    }

    /// `kvm_mmu_prepare_zap_page`: unlinks `sp` and queues it on
    /// `invalid_list`. Returns the number of pages queued.
    pub(crate) fn kvm_mmu_prepare_zap_page(
        &self,
        g: &mut MmuGuard<'_>,
        sp: SpPtr,
        invalid_list: &mut InvalidList,
    ) -> usize {
        let p = sp.get(g);
        assert_eq!(p.root_count(), 0, "zapping a pinned root");
        debug_assert!(!p.is_invalid());
        self.kvm_mmu_page_unlink_children(g, sp);
        self.kvm_mmu_unlink_parents(g, sp);
        p.set_invalid();
        g.active_remove(sp);
        g.n_used_mmu_pages -= 1;
        invalid_list.push(g, sp);
        self.mmu.stats.sp_zapped.inc();
        1
    }

    /// `kvm_mmu_isolate_page` (patch 11): removes `sp` from the hash; the
    /// table is still valid memory for walkers that hold it.
    fn kvm_mmu_isolate_page(&self, g: &mut MmuGuard<'_>, sp: SpPtr) {
        let p = sp.get(g);
        debug_assert!(p.is_empty(), "isolating a shadow page with present sptes");
        g.hash_remove(sp);
    }

    /// `kvm_mmu_free_page`: hands `sp` back to the pool. It takes the guard
    /// mutably, though it changes nothing under it, so that no reference to
    /// a shadow page bound to the guard survives a free (`PinsShadowPages`).
    fn kvm_mmu_free_page(&self, _g: &mut MmuGuard<'_>, sp: SpPtr) {
        // SAFETY: every shadow page comes from `sp_pool`; the zap path calls
        // this once per page, after it left the hash and every list
        // (`kvm_mmu_isolate_page`, the invalid list), so no new walker finds
        // it, and the ones that hold it read type-stable memory.
        unsafe { self.mmu.sp_pool.free(sp.as_non_null()) };
    }

    /// `kvm_mmu_commit_zap_page`: flushes remote TLBs, then frees the pages.
    pub(crate) fn kvm_mmu_commit_zap_page(&self, g: &mut MmuGuard<'_>, invalid_list: &mut InvalidList) {
        if invalid_list.head.is_none() {
            return;
        }
        // Wait for every vCPU in guest mode: none can still walk or use a
        // translation through the pages we are about to reuse.
        self.kvm_flush_remote_tlbs();
        while let Some(sp) = invalid_list.pop(g) {
            self.kvm_mmu_isolate_page(g, sp);
            self.kvm_mmu_free_page(g, sp);
        }
    }

    /// `prepare_zap_oldest_mmu_page`: zaps the oldest page that is not a
    /// root.
    fn prepare_zap_oldest_mmu_page(&self, g: &mut MmuGuard<'_>, invalid_list: &mut InvalidList) -> bool {
        let mut cur = g.active_tail;
        while let Some(sp) = cur {
            if sp.get(g).root_count() == 0 {
                self.kvm_mmu_prepare_zap_page(g, sp, invalid_list);
                self.mmu.stats.sp_shrunk.inc();
                return true;
            }
            cur = sp.get(g).link_prev();
        }
        false
    }

    /// `make_mmu_pages_available`: the shrinker, run by the fault path before
    /// it may create shadow pages.
    pub(crate) fn make_mmu_pages_available(&self, g: &mut MmuGuard<'_>) {
        if g.n_max_mmu_pages.saturating_sub(g.n_used_mmu_pages) >= KVM_MIN_FREE_MMU_PAGES {
            return;
        }
        let mut invalid_list = InvalidList::default();
        while g.n_max_mmu_pages.saturating_sub(g.n_used_mmu_pages) < KVM_REFILL_PAGES {
            if !self.prepare_zap_oldest_mmu_page(g, &mut invalid_list) {
                break;
            }
        }
        self.kvm_mmu_commit_zap_page(g, &mut invalid_list);
    }

    /// `kvm_mmu_change_mmu_pages`: sets the budget and zaps down to it.
    pub(crate) fn kvm_mmu_change_mmu_pages(&self, g: &mut MmuGuard<'_>, goal: usize) {
        let mut invalid_list = InvalidList::default();
        while g.n_used_mmu_pages > goal {
            if !self.prepare_zap_oldest_mmu_page(g, &mut invalid_list) {
                break;
            }
        }
        self.kvm_mmu_commit_zap_page(g, &mut invalid_list);
        g.n_max_mmu_pages = goal;
    }

    /// `kvm_mmu_zap_all`: unpins the roots and zaps every shadow page.
    pub(crate) fn kvm_mmu_zap_all(&self, g: &mut MmuGuard<'_>) {
        for asid in 0..self.mmu.address_spaces() {
            if let Some(root) = self.mmu.root(asid) {
                self.mmu.set_root(asid, None);
                root.get(g).put_root();
            }
        }
        let mut invalid_list = InvalidList::default();
        while let Some(sp) = g.active_head {
            self.kvm_mmu_prepare_zap_page(g, sp, &mut invalid_list);
        }
        self.kvm_mmu_commit_zap_page(g, &mut invalid_list);
        debug_assert_eq!(g.n_used_mmu_pages, 0);
    }

    /// `kvm_unmap_rmapp`: drops every spte in one rmap. Returns whether it
    /// dropped any (and the caller owes a remote TLB flush).
    pub(crate) fn kvm_unmap_rmapp(&self, g: &MmuGuard<'_>, head: &PteListHead) -> bool {
        let mut dropped = false;
        loop {
            // SAFETY: we hold mmu_lock; one entry at a time, then over.
            let first = unsafe { head.iter() }.next();
            let Some(sptep) = first else { return dropped };
            // SAFETY: rmap entries point to sptes in our type-stable tables.
            self.drop_spte(g, unsafe { sptep.as_ref() });
            dropped = true;
        }
    }

    /// Zaps every spte that maps `slot`, through its rmaps
    /// (`kvm_arch_flush_shadow_memslot`), then flushes remote TLBs. Shadow
    /// pages stay; they are reused or shrunk later.
    pub(crate) fn kvm_mmu_zap_memslot(&self, g: &MmuGuard<'_>, slot: &Memslot) {
        if self.mmu.design == super::MmuDesign::Tdp {
            if self.tdp_mmu_zap_leafs(g, slot.base_gfn(), slot.base_gfn() + slot.npages()) > 0 {
                self.kvm_flush_remote_tlbs();
            }
            return;
        }
        let mut zapped = false;
        for level in mapping_levels() {
            for head in slot.rmaps(level) {
                zapped |= self.kvm_unmap_rmapp(g, head);
            }
        }
        if zapped {
            self.kvm_flush_remote_tlbs();
        }
    }
}

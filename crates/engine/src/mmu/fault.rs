//! The slow page fault path of a direct map: `tdp_page_fault` ->
//! `__direct_map` -> `mmu_set_spte` -> `set_spte`, under `mmu_lock`.
//!
//! The order inside `set_spte` is the seed's (patch 06/15): the spte is made
//! present (and writable, if it is to be) first, then added to its rmap, then
//! a release fence, then the dirty bit is set. Whoever harvests that bit
//! (with an acquire swap) and walks the rmap is then sure to find the
//! writable spte; the locked design gets this from `mmu_lock` anyway, the
//! lockless one depends on it.

use std::time::Instant;

use super::lock::MmuGuard;
use super::{MmuCaches, RMAP_RECYCLE_THRESHOLD};
use crate::memslot::Memslot;
use crate::shadow_page::SpPtr;
use crate::vcpu::requests::VcpuShared;
use crate::vm::Kvm;
use shadow_mmu_core::dirty_ring::DirtyRing;
use shadow_mmu_core::spte::{
    PT_DIRECTORY_LEVEL, PT_PAGE_TABLE_LEVEL, PT64_ROOT_LEVEL, SPTE_MMU_WRITEABLE, is_large_pte,
    is_shadow_present_pte, is_writable_pte, level_base_gfn, make_leaf_spte, spte_index, spte_to_pfn,
};
use shadow_mmu_core::sync::atomic::{AtomicU64, Ordering};

/// The mapping a fault installs: `gfn` (the first of the region for a large
/// page) of `slot`, at `level`, to host `pfn`.
struct MapRequest<'a> {
    slot: &'a Memslot,
    gfn: u64,
    level: u8,
    pfn: u64,
    write: bool,
    /// The faulting vCPU's dirty ring, when the ring is on.
    ring: Option<&'a DirtyRing>,
}

/// A page fault, as the vCPU's page walk found it (its error code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PageFault {
    /// The faulting gfn.
    pub(crate) gfn: u64,
    /// A store?
    pub(crate) write: bool,
    /// Did the walk find a present (read-only) leaf?
    pub(crate) present: bool,
    /// The vCPU's address space.
    pub(crate) asid: u16,
}

/// What a slow path's map under `mmu_lock` came to.
pub(crate) enum Mapped {
    /// The mapping is installed (or another vCPU's fault installed it).
    Done,
    /// The walk lost a race: fault again, from the slot lookup.
    Retry,
}

/// Why a fault could not be fixed: the access goes to userspace as MMIO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FaultExit {
    /// No memslot holds the gfn.
    NoSlot,
    /// A write to a read-only memslot.
    ReadOnly,
    /// A write to a write-tracked page: userspace (the tracker) handles it.
    WriteTracked,
}

impl Kvm {
    /// The page fault handler for `gfn` in address space `asid`
    /// (`tdp_page_fault`). Runs with the vCPU outside guest mode. `present`:
    /// the fault hit a present spte (a write to a read-only one).
    pub(crate) fn page_fault(
        &self,
        vcpu: &VcpuShared,
        caches: &mut MmuCaches,
        ring: Option<&DirtyRing>,
        fault: PageFault,
    ) -> Result<(), FaultExit> {
        if self.mmu.design == crate::mmu::MmuDesign::Tdp {
            return self.kvm_tdp_mmu_page_fault(vcpu, caches, ring, fault);
        }
        let PageFault { gfn, write, present, asid } = fault;
        // `page_fault_can_be_fast`: a write to a present page, in both designs
        // (KVM has had it since 3.6), unless the VM was built without it.
        if self.mmu.fast_page_fault && write && present && self.fast_page_fault(vcpu, ring, gfn, asid) {
            return Ok(());
        }
        self.slow_page_fault(
            caches,
            fault,
            || {
                let g = self.mmu.lock.lock();
                self.mmu.stats.fault_mmu_lock_writes.inc();
                g
            },
            |mut g, slot, caches| {
                self.make_mmu_pages_available(&mut g);
                let level = self.mapping_level(slot, gfn);
                self.__direct_map(&mut g, caches, ring, slot, gfn, level, write, asid);
                Mapped::Done
            },
        )
    }

    /// The slow path's loop, both designs' (the slot checks of
    /// `kvm_mmu_faultin_pfn`, then the design's map under its side of
    /// `mmu_lock`). Outside the lock: the caches topped up (never allocate
    /// under `mmu_lock`), then `gfn`'s memslot and whether a write may map
    /// it. Under the guard `lock` takes, what only the lock keeps
    /// consistent: a slot being deleted, whose sptes are zapped under the
    /// write lock before the set without it is published (look it up
    /// again), and write tracking, which changes under the write lock (a
    /// write to a tracked page is never mapped). Then `map` installs the
    /// mapping, or asks for another try.
    pub(crate) fn slow_page_fault<G>(
        &self,
        caches: &mut MmuCaches,
        PageFault { gfn, write, .. }: PageFault,
        lock: impl Fn() -> G,
        mut map: impl FnMut(G, &Memslot, &mut MmuCaches) -> Mapped,
    ) -> Result<(), FaultExit> {
        loop {
            self.mmu.topup_memory_caches(caches);
            // A guard, not a clone: no shared refcount bounces between vCPUs.
            let slots = self.memslots.load();
            let slot = slots.find(gfn).ok_or(FaultExit::NoSlot)?;
            if write && slot.readonly() {
                return Err(FaultExit::ReadOnly);
            }
            let g = lock();
            if slot.is_invalid() {
                drop(g);
                std::thread::yield_now();
                continue;
            }
            if write && slot.is_write_tracked(gfn) {
                return Err(FaultExit::WriteTracked);
            }
            if let Mapped::Done = map(g, slot, caches) {
                return Ok(());
            }
        }
    }

    /// `mapping_level`: 2 MiB where the whole 2 MiB lies in one slot that does
    /// not log dirty pages; 4 KiB otherwise. Under `mmu_lock`, so that it is
    /// consistent with enabling dirty logging.
    pub(crate) fn mapping_level(&self, slot: &Memslot, gfn: u64) -> u8 {
        if self.mmu.large_pages && !slot.dirty_logging() && slot.lpage_ok(gfn) && !slot.lpage_tracked(gfn) {
            PT_DIRECTORY_LEVEL
        } else {
            PT_PAGE_TABLE_LEVEL
        }
    }

    /// `__direct_map`: walks from the root to `level`, creating and linking
    /// the missing tables, then maps `gfn`.
    #[allow(clippy::too_many_arguments)]
    fn __direct_map(
        &self,
        g: &mut MmuGuard<'_>,
        caches: &mut MmuCaches,
        ring: Option<&DirtyRing>,
        slot: &Memslot,
        gfn: u64,
        level: u8,
        write: bool,
        asid: u16,
    ) {
        let mut sp = self.mmu_alloc_direct_root(g, caches, asid);
        let mut cur = PT64_ROOT_LEVEL;
        while cur > level {
            let index = spte_index(gfn, cur);
            let sptep = sp.get(g).spte(index);
            // A large leaf where we need a table: drop it (patch 03's
            // `drop_large_spte` in `__direct_map`). The locked design drops
            // large sptes when it write-protects them, so this only fires
            // there if a slot's logging was enabled after a large mapping was
            // made read-only, which it never is; it is kept in both designs
            // so that the walk below never treats a leaf as a table.
            self.drop_large_spte(g, sptep);
            let spte = sptep.load(Ordering::Relaxed);
            sp = if is_shadow_present_pte(spte) {
                // SAFETY: a present non-leaf spte of one of our tables.
                unsafe { SpPtr::from_nonleaf_spte(spte) }
            } else {
                let child = self.kvm_mmu_get_page(g, caches, level_base_gfn(gfn, cur), cur - 1, asid);
                // `kvm_mmu_get_page` took the guard mutably (for the hash), so
                // the borrow checker ended `sptep`; `sp` is still linked (the
                // lookup zaps nothing), so its spte is re-read from it.
                self.link_shadow_page(g, caches, sp.get(g).spte(index), child, cur);
                child
            };
            cur -= 1;
        }
        let base = level_base_gfn(gfn, level);
        let sptep = sp.get(g).spte(spte_index(gfn, level));
        let req = MapRequest { slot, gfn: base, level, pfn: slot.gfn_to_pfn(base), write, ring };
        self.mmu_set_spte(g, caches, sptep, &req);
    }

    /// `mmu_set_spte`: clears whatever `sptep` held that the new mapping
    /// replaces, then `set_spte`.
    fn mmu_set_spte(
        &self,
        g: &MmuGuard<'_>,
        caches: &mut MmuCaches,
        sptep: &AtomicU64,
        req: &MapRequest<'_>,
    ) {
        // Relaxed: under mmu_lock, which every spte writer of this design holds.
        let old = sptep.load(Ordering::Relaxed);
        if is_shadow_present_pte(old) {
            if req.level > PT_PAGE_TABLE_LEVEL && !is_large_pte(old) {
                // A table where a large page goes (logging was turned off):
                // unlink the child table; it stays until shrunk.
                // SAFETY: a present non-leaf spte of one of our tables.
                let child = unsafe { SpPtr::from_nonleaf_spte(old) };
                self.drop_parent_pte(g, child, sptep);
                self.kvm_flush_remote_tlbs();
            } else if spte_to_pfn(old) != req.pfn {
                self.drop_spte(g, sptep);
                self.kvm_flush_remote_tlbs();
            }
        }
        self.set_spte(g, caches, sptep, req);
    }

    /// `set_spte`, in the order of patch 06/15.
    fn set_spte(&self, g: &MmuGuard<'_>, caches: &mut MmuCaches, sptep: &AtomicU64, req: &MapRequest<'_>) {
        let MapRequest { slot, gfn, level, pfn, write, ring } = *req;
        let remap = is_shadow_present_pte(sptep.load(Ordering::Relaxed));
        let host_writable = !slot.readonly();
        // In a logged slot only a write makes the spte writable, and it marks
        // the page dirty below. A read maps the page read-only (with MW set,
        // so the lockless design may fix a later write fault fast).
        let logging = slot.dirty_logging();
        let tracked = level == PT_PAGE_TABLE_LEVEL && slot.is_write_tracked(gfn);
        let writable = host_writable && !tracked && (write || !logging);
        let mut spte = make_leaf_spte(pfn, level, host_writable, writable);
        if tracked {
            // Write-protected for good, not only for logging: no fast path
            // may make it writable (MW clear).
            spte &= !SPTE_MMU_WRITEABLE;
        }

        let push_early = ring.is_some() && self.mmu.breakage.ring_push_before_rmap();
        if push_early && is_writable_pte(spte) && logging {
            // Broken on purpose: the ring entry is out before the spte is
            // writable and in its rmap. The pause widens the window so that
            // a test sees a harvest and reset fall into it.
            self.mark_page_dirty_in_slot(slot, gfn, ring);
            std::thread::sleep(std::time::Duration::from_micros(50));
        }
        // (1) The spte becomes present/writable.
        if self.mmu_spte_update(g, sptep, spte) {
            self.kvm_flush_remote_tlbs();
        }
        // (2) It is added to the rmap.
        if !remap {
            if self.rmap_add(g, caches, slot, sptep, gfn, level) > RMAP_RECYCLE_THRESHOLD {
                self.rmap_recycle(g, slot, gfn, level);
            }
            self.mmu.stats.sptes_mapped.inc();
            if level > PT_PAGE_TABLE_LEVEL {
                self.mmu.stats.large_sptes_mapped.inc();
            }
        }
        // (3) smp_wmb(), then (4) the dirty bit: both stores above are
        // ordered before the bit. Pairs with the AcqRel swap of
        // `get_dirty_log` (`take_word`), which then walks the rmap. Without it
        // a lockless harvester could take the bit and walk the rmap before the
        // writable spte is in it (the first race of patch 06), or see the spte
        // in the rmap while still read-only and leave it writable afterwards
        // (the second). See `shadow_mmu_core::lockless`.
        // With the dirty ring, the push's release store of the entry's flags
        // is the fence, and the harvester's acquire load of them pairs with
        // it (`shadow_mmu_core::dirty_ring`).
        if is_writable_pte(spte) && logging && !push_early && !self.mmu.breakage.slow_fault_skips_mark_dirty()
        {
            self.mark_page_dirty_in_slot(slot, gfn, ring);
        }
    }

    /// `rmap_recycle`: an rmap grew past `RMAP_RECYCLE_THRESHOLD`: zap every
    /// spte in it, and flush.
    fn rmap_recycle(&self, g: &MmuGuard<'_>, slot: &Memslot, gfn: u64, level: u8) {
        if self.kvm_unmap_rmapp(g, slot.rmap(gfn, level)) {
            self.kvm_flush_remote_tlbs();
        }
    }

    /// `kvm_flush_remote_tlbs`, with accounting.
    pub(crate) fn kvm_flush_remote_tlbs(&self) {
        let t0 = Instant::now();
        self.vcpus.kvm_flush_remote_tlbs();
        self.mmu.stats.remote_tlb_flushes.inc();
        self.mmu.stats.remote_tlb_flush_ns.add(t0.elapsed().as_nanos() as u64);
    }
}

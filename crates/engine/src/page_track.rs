//! Page write tracking (KVM's `page_track.c`, `KVM_PAGE_TRACK_WRITE`).
//!
//! A tracked page is never mapped writable: tracking write-protects every
//! spte that maps it, at every level, under `mmu_lock`, clearing W and MW
//! (`spte_write_protect` with `pt_protect`), and from then on a write to it
//! exits to userspace ([`crate::VcpuExit::WriteTracked`]), which emulates it.
//! KVM uses this to shadow guest page tables (and GVT-g to watch a GPU's
//! page tables); here it is the locked path on which patch 04's flush rule
//! bites. A lockless write protection may just have cleared W on the same
//! spte, with its remote TLB flush still to come. Judged by "W was already
//! clear", tracking would then skip its own flush and return while a vCPU can
//! still write the page through its TLB, unseen. Judged by "the spte was
//! locklessly modifiable", it flushes.

use thiserror::Error;

use crate::mmu::lockless::spte_write_protect_pt;
use crate::vm::Kvm;
use shadow_mmu_core::spte::mapping_levels;

/// Why a tracking change was refused. Nothing changed when one is returned.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TrackError {
    /// No memslot holds the page.
    #[error("gfn {0:#x} is in no memslot")]
    NoSlot(u64),
    /// Untracking a page that is not tracked.
    #[error("gfn {0:#x} is not write-tracked")]
    NotTracked(u64),
    /// The tracking count would overflow.
    #[error("gfn {0:#x} is tracked too many times")]
    TooMany(u64),
}

impl Kvm {
    /// `kvm_slot_page_track_add_page`: tracks writes to `gfn` (counted: each
    /// add needs a remove).
    pub(crate) fn kvm_slot_page_track_add_page(&self, gfn: u64) -> Result<(), TrackError> {
        let slots = self.memslots.load();
        let slot = slots.find(gfn).ok_or(TrackError::NoSlot(gfn))?;
        let g = self.mmu.lock.lock();
        if !slot.update_write_track(gfn, 1) {
            return Err(TrackError::TooMany(gfn));
        }
        // kvm_mmu_slot_gfn_write_protect: every spte that maps the page.
        if self.mmu.design == crate::mmu::MmuDesign::Tdp {
            // W and MMU-writable go: a flush now (upstream's
            // `leaf_spte_change_needs_tlb_flush`).
            if self.tdp_mmu_write_protect_gfn(&g, gfn, shadow_mmu_core::spte::PT_PAGE_TABLE_LEVEL) {
                self.kvm_flush_remote_tlbs();
            }
            return Ok(());
        }
        let mut flush = false;
        for level in mapping_levels() {
            // SAFETY: we hold mmu_lock, so no writer changes the rmap while we
            // iterate; its entries point into our type-stable tables.
            for sptep in unsafe { slot.rmap(gfn, level).iter() } {
                // SAFETY: as above.
                let sptep = unsafe { sptep.as_ref() };
                flush |= spte_write_protect_pt(sptep, self.mmu.spte_update, &self.mmu.breakage);
            }
        }
        if flush {
            self.kvm_flush_remote_tlbs();
        }
        drop(g);
        Ok(())
    }

    /// `kvm_slot_page_track_remove_page`: drops one tracking reference of
    /// `gfn`. The page becomes writable again at its next write fault.
    pub(crate) fn kvm_slot_page_track_remove_page(&self, gfn: u64) -> Result<(), TrackError> {
        let slots = self.memslots.load();
        let slot = slots.find(gfn).ok_or(TrackError::NoSlot(gfn))?;
        let _g = self.mmu.lock.lock();
        if slot.update_write_track(gfn, -1) { Ok(()) } else { Err(TrackError::NotTracked(gfn)) }
    }
}

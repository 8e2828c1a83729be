//! Host access to guest memory: `kvm_read_guest` and `kvm_write_guest`, the
//! way a VMM (device emulation, or the destination of a migration) reads and
//! writes a guest's pages from outside the vCPUs.
//!
//! Invariants:
//! - an access is checked whole before any word moves: 8-aligned, inside one
//!   memslot (KVM splits accesses at page boundaries and fails at the first
//!   page with no slot; we refuse the access instead, so that a refusal
//!   writes nothing), and a write is refused on a read-only slot (KVM's
//!   `KVM_HVA_ERR_RO_BAD`);
//! - a write marks every page it touched in the slot's dirty bitmap when the
//!   slot logs (`mark_page_dirty_in_slot`), after its data: the data, then a
//!   release fence, then the bit, so a harvester whose acquire swap
//!   (`DirtyBitmap::take_word`) takes the bit reads the data when it copies
//!   the page. No spte is involved: the host writes through its own mapping.

use shadow_mmu_vmm::GuestAccessError;

use crate::memslot::Memslot;
use crate::vm::Kvm;
use shadow_mmu_core::spte::{PAGE_SHIFT, PAGE_SIZE};
use shadow_mmu_core::sync::atomic::{Ordering, fence};

impl Kvm {
    /// The slot holding all of `[gpa, gpa + words * 8)`.
    fn slot_for_access(&self, gpa: u64, words: usize) -> Result<std::sync::Arc<Memslot>, GuestAccessError> {
        let bytes = words as u64 * 8;
        let end = gpa.checked_add(bytes);
        if words == 0 || !gpa.is_multiple_of(8) || end.is_none() {
            return Err(GuestAccessError::Unaligned { gpa, bytes });
        }
        let last_gfn = (end.expect("checked") - 1) >> PAGE_SHIFT;
        let slots = self.memslots.load();
        match slots.find(gpa >> PAGE_SHIFT) {
            Some(s) if s.contains(last_gfn) && !s.is_invalid() => Ok(s.clone()),
            _ => Err(GuestAccessError::NoSlot { gpa, bytes }),
        }
    }

    /// `kvm_read_guest`: copies guest memory from `gpa` into `out`.
    pub(crate) fn kvm_read_guest(&self, gpa: u64, out: &mut [u64]) -> Result<(), GuestAccessError> {
        let slot = self.slot_for_access(gpa, out.len())?;
        for (i, w) in out.iter_mut().enumerate() {
            let a = gpa + 8 * i as u64;
            let page = slot.memory().page(slot.host_page_index(a >> PAGE_SHIFT));
            // Relaxed: guest data; a reader that needs it ordered after a
            // harvest gets that from the harvest's acquire swap.
            *w = page[(a % PAGE_SIZE) as usize / 8].load(Ordering::Relaxed);
        }
        Ok(())
    }

    /// `kvm_write_guest`: copies `words` into guest memory at `gpa`, then
    /// marks the pages dirty if the slot logs (module docs).
    pub(crate) fn kvm_write_guest(&self, gpa: u64, words: &[u64]) -> Result<(), GuestAccessError> {
        let slot = self.slot_for_access(gpa, words.len())?;
        if slot.readonly() {
            return Err(GuestAccessError::ReadOnly { gpa, slot: slot.id() });
        }
        if slot.dirty_logging() && self.dirty_ring_entries() != 0 {
            return Err(GuestAccessError::DirtyRing { gpa, slot: slot.id() });
        }
        // Page by page: one page lookup for each page's run of words.
        let (mut a, mut rest) = (gpa, words);
        while !rest.is_empty() {
            let page = slot.memory().page(slot.host_page_index(a >> PAGE_SHIFT));
            let at = (a % PAGE_SIZE) as usize / 8;
            let n = rest.len().min(page.len() - at);
            for (dst, &w) in page[at..at + n].iter().zip(&rest[..n]) {
                // Relaxed: guest data, published by the fence below.
                dst.store(w, Ordering::Relaxed);
            }
            (a, rest) = (a + 8 * n as u64, &rest[n..]);
        }
        if slot.dirty_logging() {
            // Release: pairs with the harvester's AcqRel swap of the word
            // (`DirtyBitmap::take_word`): the data above is visible to a
            // harvester that takes a bit set below.
            fence(Ordering::Release);
            let first = gpa >> PAGE_SHIFT;
            let last = (gpa + words.len() as u64 * 8 - 1) >> PAGE_SHIFT;
            for gfn in first..=last {
                slot.mark_page_dirty(gfn);
                self.mmu.stats.pages_marked_dirty.inc();
            }
        }
        Ok(())
    }
}

//! A vCPU's software TLB: a direct-mapped cache of gfn -> (host pfn, W),
//! owned by the vCPU thread.
//!
//! Entries are filled by the vCPU's page walk over the shadow page tables,
//! in guest mode, and dropped all at once by [`Tlb::flush`] (a generation
//! bump), which the vCPU runs when it handles `KVM_REQ_TLB_FLUSH` or
//! switches address space. Like a hardware TLB it is never told about
//! individual spte changes: whoever makes an spte less permissive must flush
//! remote TLBs (see `shadow_mmu_core::requests`).

/// Default number of entries (about an x86 second-level TLB).
pub const DEFAULT_TLB_ENTRIES: usize = 1024;

#[derive(Clone, Copy, Default)]
struct Entry {
    /// gfn + 1 (0: never filled).
    tag: u64,
    generation: u64,
    pfn: u64,
    writable: bool,
}

/// A translation the TLB returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translation {
    /// Host pfn of the guest page.
    pub pfn: u64,
    /// May the guest write through it?
    pub writable: bool,
}

/// The software TLB.
pub struct Tlb {
    entries: Box<[Entry]>,
    mask: u64,
    generation: u64,
}

impl std::fmt::Debug for Tlb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tlb").field("entries", &self.entries.len()).finish()
    }
}

impl Tlb {
    /// A TLB of `entries` entries, rounded up to a power of two (at least 1).
    pub fn new(entries: usize) -> Self {
        let n = entries.max(1).next_power_of_two();
        Self { entries: vec![Entry::default(); n].into_boxed_slice(), mask: n as u64 - 1, generation: 1 }
    }

    /// Looks up `gfn`.
    #[inline]
    pub fn lookup(&self, gfn: u64) -> Option<Translation> {
        let e = &self.entries[(gfn & self.mask) as usize];
        (e.tag == gfn + 1 && e.generation == self.generation)
            .then_some(Translation { pfn: e.pfn, writable: e.writable })
    }

    /// Caches a translation of `gfn`.
    #[inline]
    pub fn insert(&mut self, gfn: u64, t: Translation) {
        self.entries[(gfn & self.mask) as usize] =
            Entry { tag: gfn + 1, generation: self.generation, pfn: t.pfn, writable: t.writable };
    }

    /// Drops every entry.
    #[inline]
    pub fn flush(&mut self) {
        self.generation += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_lookup_conflict_flush() {
        let mut tlb = Tlb::new(3);
        let t = Translation { pfn: 7, writable: true };
        assert_eq!(tlb.lookup(5), None);
        tlb.insert(5, t);
        assert_eq!(tlb.lookup(5), Some(t));
        tlb.insert(9, Translation { pfn: 8, writable: false });
        assert_eq!(tlb.lookup(5), None, "4 entries: 9 evicts 5");
        tlb.flush();
        assert_eq!(tlb.lookup(9), None);
    }
}

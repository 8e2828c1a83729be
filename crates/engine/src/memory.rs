//! Host memory that backs guest memory: anonymous mappings of the process.
//!
//! A [`HostMemory`] is what a VMM would `mmap` and hand to
//! `KVM_SET_USER_MEMORY_REGION` as `userspace_addr`. vCPUs, the harvester and
//! the oracle all touch it at the same time, so every access goes through
//! `AtomicU64` words: a vCPU's guest store is a relaxed atomic store, a page
//! copy is a run of relaxed atomic loads. No `&[u8]` or `&mut` view of the
//! contents is ever created after the mapping is made.
//!
//! Lazily populated mappings are `MAP_NORESERVE`, as a VMM maps a large
//! guest: the kernel reserves no swap for them, so a guest larger than the
//! host's memory maps, and only the pages it touches cost memory (a 64 GiB
//! guest that dirties a working set runs on a 24 GiB machine).
//!
//! The "host pfn" of a page is its virtual address >> 12: that is what a leaf
//! spte and a TLB entry hold, and what a vCPU dereferences. The mapping stays
//! alive as long as any `Arc<HostMemory>` does; memslot deletion drops its
//! reference only after every spte into it is zapped and remote TLBs are
//! flushed (see `vm.rs`), so a pfn read from an spte or TLB entry by a vCPU in
//! guest mode always points into a live mapping.

use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use thiserror::Error;

use shadow_mmu_core::spte::{PAGE_SHIFT, PAGE_SIZE, WORDS_PER_PAGE};

/// One guest page seen as words.
pub type PageWords = [AtomicU64; WORDS_PER_PAGE];

/// Errors creating host memory.
#[derive(Debug, Error)]
pub enum MemoryError {
    /// The size is zero or not a multiple of the page size.
    #[error("host memory size {0:#x} is not a non-zero multiple of {PAGE_SIZE} bytes")]
    BadSize(u64),
    /// `mmap` failed.
    #[error("mmap of {bytes} bytes failed")]
    Mmap {
        /// Requested size.
        bytes: u64,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// An anonymous, private, page-aligned mapping.
pub struct HostMemory {
    // Kept only to unmap on drop; its `Deref` to bytes is never used.
    map: memmap2::MmapMut,
    base: NonNull<AtomicU64>,
    pages: u64,
}

// SAFETY: the contents are only ever accessed through `AtomicU64`, which is
// `Sync`; the pointer and page count are immutable after construction.
unsafe impl Send for HostMemory {}
// SAFETY: as above.
unsafe impl Sync for HostMemory {}

impl std::fmt::Debug for HostMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostMemory").field("base", &self.base).field("pages", &self.pages).finish()
    }
}

impl HostMemory {
    /// Maps `bytes` of zeroed anonymous memory. Pages are populated lazily by
    /// the host kernel on first touch, as for a real VMM.
    pub fn anonymous(bytes: u64) -> Result<Arc<Self>, MemoryError> {
        Self::map(bytes, false)
    }

    /// As [`Self::anonymous`], with every page populated up front
    /// (`MAP_POPULATE`), so that benchmarks measure the shadow MMU and not the
    /// host kernel's first-touch faults.
    pub fn anonymous_populated(bytes: u64) -> Result<Arc<Self>, MemoryError> {
        Self::map(bytes, true)
    }

    fn map(bytes: u64, populate: bool) -> Result<Arc<Self>, MemoryError> {
        if bytes == 0 || !bytes.is_multiple_of(PAGE_SIZE) {
            return Err(MemoryError::BadSize(bytes));
        }
        let len = usize::try_from(bytes).map_err(|_| MemoryError::BadSize(bytes))?;
        let mut opts = memmap2::MmapOptions::new();
        opts.len(len);
        if populate {
            opts.populate();
        } else {
            opts.no_reserve_swap();
        }
        let mut map = opts.map_anon().map_err(|source| MemoryError::Mmap { bytes, source })?;
        if !populate {
            // Transparent huge pages where the host gives them on request
            // (`madvise` mode), as QEMU asks for its RAM: a lazily mapped
            // guest then takes a host fault per 2 MiB, not per 4 KiB. Only a
            // hint: refused, the mapping works the same.
            let _ = map.advise(memmap2::Advice::HugePage);
        }
        let base =
            NonNull::new(map.as_mut_ptr().cast::<AtomicU64>()).expect("mmap never returns a null mapping");
        Ok(Arc::new(Self { map, base, pages: bytes / PAGE_SIZE }))
    }

    /// Size in bytes.
    pub fn len(&self) -> u64 {
        self.pages * PAGE_SIZE
    }

    /// Always false: a mapping has at least one page.
    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }

    /// Size in pages.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// The whole mapping as words.
    pub fn words(&self) -> &[AtomicU64] {
        let len = self.pages as usize * WORDS_PER_PAGE;
        debug_assert_eq!(len * 8, self.map.len());
        // SAFETY: `base` is the start of a live mapping of `len * 8` bytes
        // (owned by `self.map`, unmapped only on drop, which the borrow of
        // `self` excludes). mmap returns page-aligned memory, so the pointer
        // is aligned for `AtomicU64`; every bit pattern is a valid `u64`; and
        // all access to the contents goes through atomics, so sharing the
        // slice between threads is race-free.
        unsafe { std::slice::from_raw_parts(self.base.as_ptr(), len) }
    }

    /// Page `index` of the mapping as words.
    ///
    /// # Panics
    /// If `index` is out of range.
    pub fn page(&self, index: u64) -> &PageWords {
        assert!(index < self.pages, "page {index} out of {} pages", self.pages);
        let start = index as usize * WORDS_PER_PAGE;
        self.words()[start..start + WORDS_PER_PAGE].try_into().expect("slice has exactly one page of words")
    }

    /// Host pfn (virtual address >> 12) of page `index`.
    pub fn host_pfn(&self, index: u64) -> u64 {
        debug_assert!(index < self.pages);
        ((self.base.as_ptr() as u64) >> PAGE_SHIFT) + index
    }
}

/// The word at byte `offset` (8-aligned) of the host page `pfn`.
///
/// # Safety
/// `pfn` must be a page of a live [`HostMemory`] mapping, and must stay
/// mapped for `'a`. A vCPU establishes this by reading the pfn from an spte
/// or TLB entry while in guest mode: memory is unmapped only after every spte
/// that points into it is zapped and a remote TLB flush, which waits for
/// every vCPU in guest mode, has returned.
#[inline]
pub(crate) unsafe fn host_word<'a>(pfn: u64, offset: u64) -> &'a AtomicU64 {
    debug_assert!(offset < PAGE_SIZE && offset.is_multiple_of(8));
    let addr = ((pfn << PAGE_SHIFT) + offset) as usize as *const AtomicU64;
    // SAFETY: by the caller's contract the address is inside a live mapping
    // for 'a; it is 8-aligned because the page is 4 KiB-aligned and the offset
    // is a multiple of 8; the mapping's contents are only accessed atomically.
    unsafe { &*addr }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn rejects_bad_sizes() {
        assert!(matches!(HostMemory::anonymous(0).unwrap_err(), MemoryError::BadSize(0)));
        assert!(matches!(HostMemory::anonymous(4097).unwrap_err(), MemoryError::BadSize(4097)));
        // More than any address space holds: the OS refuses, and its error
        // is kept as the source.
        let e = HostMemory::anonymous(1 << 60).unwrap_err();
        assert!(matches!(e, MemoryError::Mmap { bytes, .. } if bytes == 1 << 60), "{e:?}");
        assert!(std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>()));
    }

    #[test]
    fn pfn_addresses_the_same_words() {
        let mem = HostMemory::anonymous(4 * PAGE_SIZE).unwrap();
        assert_eq!(mem.pages(), 4);
        mem.page(2)[5].store(0xabcd, Ordering::Relaxed);
        let pfn = mem.host_pfn(2);
        // SAFETY: `mem` is alive for the whole test and pfn is its page 2.
        let w = unsafe { host_word(pfn, 5 * 8) };
        assert_eq!(w.load(Ordering::Relaxed), 0xabcd);
        assert_eq!(mem.words()[2 * WORDS_PER_PAGE + 5].load(Ordering::Relaxed), 0xabcd);
    }
}

//! A vCPU's dirty ring as KVM maps it into userspace
//! (`KVM_CAP_DIRTY_LOG_RING_ACQ_REL`; the vCPU fd's pages from
//! `KVM_DIRTY_LOG_PAGE_OFFSET`), harvested with the core's
//! [`harvest_entries`], the very loop the engine's rings use.
//!
//! Invariants: the mapping lives as long as this value (KVM keeps the pages
//! while they are mapped, even after the vCPU fd closes); only KVM writes an
//! entry's slot and offset, and the flags are accessed with acquire and
//! release, as ACQ_REL asks; one harvester at a time (the `fetch` lock).

use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::Mutex;

use kvm_ioctls::VcpuFd;
use shadow_mmu_core::dirty_ring::{DIRTY_GFN_BYTES, DirtyGfn, harvest_entries};

use crate::error::KvmError;
use shadow_mmu_core::spte::PAGE_SIZE;

// Our entry has `struct kvm_dirty_gfn`'s layout: u32 flags, u32 slot, u64
// offset.
const _: () = assert!(std::mem::size_of::<DirtyGfn>() == DIRTY_GFN_BYTES as usize);
const _: () = assert!(std::mem::size_of::<DirtyGfn>() == std::mem::size_of::<kvm_bindings::kvm_dirty_gfn>());

/// One vCPU's mapped ring.
#[derive(Debug)]
pub struct KvmRing {
    base: NonNull<DirtyGfn>,
    entries: u32,
    /// The harvester's `fetch_index`.
    fetch: Mutex<u32>,
}

// SAFETY: the mapping is only accessed through the atomics of `DirtyGfn`
// (`Sync`) and by KVM; the pointer never changes after `map`.
unsafe impl Send for KvmRing {}
// SAFETY: as above.
unsafe impl Sync for KvmRing {}

impl KvmRing {
    /// Maps the ring of `bytes` bytes of vCPU `fd`.
    pub(crate) fn map(fd: &VcpuFd, bytes: u32) -> Result<Self, KvmError> {
        let offset = i64::from(kvm_bindings::KVM_DIRTY_LOG_PAGE_OFFSET) * PAGE_SIZE as i64;
        // SAFETY: a shared mapping of the vCPU fd's ring pages at an address
        // of the kernel's choosing (NULL hint, no MAP_FIXED): it overlaps
        // nothing of ours. KVM sized the ring to `bytes` when the capability
        // was enabled, before this vCPU existed. The result is checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(KvmError::last_os_error("mmap of the dirty ring"));
        }
        let base = NonNull::new(p.cast::<DirtyGfn>()).ok_or_else(|| KvmError::last_os_error("mmap"))?;
        Ok(Self { base, entries: bytes / DIRTY_GFN_BYTES, fetch: Mutex::new(0) })
    }

    fn gfns(&self) -> &[DirtyGfn] {
        // SAFETY: `base` starts a live mapping of `entries` 16-byte entries
        // (unmapped only in `drop`, excluded by the borrow of `self`),
        // page-aligned, so aligned for `DirtyGfn`; its fields are atomics,
        // valid for any bits, and KVM writes the memory only as ACQ_REL's
        // protocol says (module docs), so sharing it is race-free.
        unsafe { std::slice::from_raw_parts(self.base.as_ptr(), self.entries as usize) }
    }

    /// Entries.
    pub fn entries(&self) -> u32 {
        self.entries
    }

    /// Entries harvested from this ring since it was mapped, by any
    /// harvester (wrapping).
    pub fn harvested(&self) -> u32 {
        *self.fetch.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Collects the entries KVM pushed since the last harvest, in order,
    /// and marks them harvested (for `KVM_RESET_DIRTY_RINGS`).
    pub fn harvest(&self, f: impl FnMut(u32, u64)) -> u32 {
        let mut fetch = self.fetch.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        harvest_entries(self.gfns(), &mut fetch, f)
    }
}

impl Drop for KvmRing {
    fn drop(&mut self) {
        // SAFETY: `base` and the length are what mmap returned, unmapped once
        // (here); no reference from `gfns` outlives `self`.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.entries as usize * DIRTY_GFN_BYTES as usize) };
    }
}

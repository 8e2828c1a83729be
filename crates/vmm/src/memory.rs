//! Guest memory as the host sees it: the test slot at guest physical 0,
//! read and written from outside the vCPUs (`kvm_read_guest`,
//! `kvm_write_guest`), as a device model or a migration's destination does.

use std::sync::atomic::AtomicU64;

use shadow_mmu_core::spte::PAGE_SIZE;
use thiserror::Error;

/// Why a host access to guest memory was refused. Nothing was read or
/// written.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum GuestAccessError {
    /// The range is not 8-aligned, is empty, or overflows.
    #[error("guest access [{gpa:#x}, +{bytes:#x}) is not 8-aligned, is empty or overflows")]
    Unaligned {
        /// Start.
        gpa: u64,
        /// Length in bytes.
        bytes: u64,
    },
    /// The range is not inside one memslot.
    #[error("guest access [{gpa:#x}, +{bytes:#x}) is not inside one memslot")]
    NoSlot {
        /// Start.
        gpa: u64,
        /// Length in bytes.
        bytes: u64,
    },
    /// A write to a logged slot while the dirty ring is on: no vCPU ring
    /// can take it, and it would be lost.
    #[error("guest write at {gpa:#x}: slot {slot} logs to the dirty ring, which host writes cannot reach")]
    DirtyRing {
        /// Start.
        gpa: u64,
        /// The slot.
        slot: u32,
    },
    /// A write to a read-only memslot.
    #[error("guest write at {gpa:#x}: memslot {slot} is read-only")]
    ReadOnly {
        /// Start.
        gpa: u64,
        /// The slot.
        slot: u32,
    },
}

/// The test slot's memory (module docs).
pub trait GuestMemory {
    /// Pages of the test slot.
    fn pages(&self) -> u64;

    /// The test slot's memory, as the host sees it (one word per 8 bytes):
    /// the same slice, at the same address, for the VM's whole life (the
    /// slot is mapped once and never moved), so that a migration's page
    /// streams may read it while the VM is borrowed for its harvests.
    fn memory(&self) -> &[AtomicU64];

    /// Reads `out.len()` words of guest memory from byte `offset` of the test
    /// slot, as the host (`kvm_read_guest`); the range is checked first
    /// ([`check_guest_access`]).
    fn read_guest(&self, offset: u64, out: &mut [u64]) -> Result<(), crate::BackendError>;

    /// Writes `words` to guest memory at byte `offset` of the test slot, as
    /// the host (`kvm_write_guest`), and, while the slot logs, puts the pages
    /// written in the next dirty log. Checked first: a refusal writes
    /// nothing.
    fn write_guest(&mut self, offset: u64, words: &[u64]) -> Result<(), crate::BackendError>;
}

/// Checks a host access of `words` words at byte `offset` of a test slot of
/// `pages` pages: 8-aligned, not empty, inside the slot. The one check every
/// backend makes before [`GuestMemory::read_guest`] and
/// [`GuestMemory::write_guest`] touch memory.
pub fn check_guest_access(pages: u64, offset: u64, words: usize) -> Result<(), GuestAccessError> {
    let bytes = words as u64 * 8;
    match offset.checked_add(bytes) {
        Some(_) if words == 0 || !offset.is_multiple_of(8) => {
            Err(GuestAccessError::Unaligned { gpa: offset, bytes })
        }
        Some(end) if end <= pages * PAGE_SIZE => Ok(()),
        Some(_) => Err(GuestAccessError::NoSlot { gpa: offset, bytes }),
        None => Err(GuestAccessError::Unaligned { gpa: offset, bytes }),
    }
}

//! [`KvmError`]: everything the KVM backend can fail with.
//!
//! Invariants: library code returns these instead of panicking on anything
//! that depends on the machine or on the caller's input (a missing
//! `/dev/kvm`, a failed ioctl, a bitmap of the wrong size, a bad workload
//! configuration, a guest that exits in an unexpected way). A refused call
//! leaves the VM as it was and usable.

use thiserror::Error;

/// Errors of the KVM backend.
#[derive(Debug, Error)]
pub enum KvmError {
    /// `/dev/kvm` cannot be used on this machine (see [`crate::probe`]).
    #[error("KVM unavailable: {0}")]
    Unavailable(String),
    /// A system call failed: an ioctl, `mmap`, or creating a vCPU thread.
    #[error("{op} failed: {source}")]
    Ioctl {
        /// The operation, named after the ioctl (`KVM_GET_DIRTY_LOG`, ...) or call.
        op: &'static str,
        /// The error the kernel returned.
        #[source]
        source: std::io::Error,
    },
    /// A dirty bitmap buffer does not have one `u64` per 64 pages of the slot.
    #[error("dirty bitmap has {got} u64 words; a slot of {pages} pages needs {expected}")]
    BadBitmapSize {
        /// Pages in the slot (or in the range being cleared).
        pages: u64,
        /// Words needed.
        expected: usize,
        /// Words given.
        got: usize,
    },
    /// A configuration or argument value is out of range.
    #[error("bad configuration: {0}")]
    BadConfig(String),
    /// The guest exited to the host in a way the workload does not expect,
    /// or a vCPU thread failed.
    #[error("unexpected vCPU exit: {0}")]
    UnexpectedExit(String),
    /// `KVM_CLEAR_DIRTY_LOG` needs `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` enabled
    /// on the VM.
    #[error("KVM_CLEAR_DIRTY_LOG needs KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, not enabled on this VM")]
    ManualProtectNotEnabled,
    /// `KVM_GET_DIRTY_LOG` / `KVM_CLEAR_DIRTY_LOG` on a slot without
    /// `KVM_MEM_LOG_DIRTY_PAGES` (KVM answers `ENOENT`).
    #[error("the test slot does not log dirty pages (KVM_MEM_LOG_DIRTY_PAGES is off)")]
    NotLogging,
    /// A vCPU's dirty ring was found completely full: KVM pushed past its
    /// soft limit and reserve (it warns in `kvm_dirty_ring_push`) and
    /// overwrote entries not yet reset, so dirty pages were lost.
    #[error("KVM's dirty ring overflowed: entries were overwritten and dirty pages lost (use a larger ring)")]
    DirtyRingOverflow,
}

impl KvmError {
    /// An [`KvmError::Ioctl`] from a `kvm-ioctls` error.
    pub(crate) fn ioctl(op: &'static str, e: kvm_ioctls::Error) -> Self {
        Self::Ioctl { op, source: std::io::Error::from_raw_os_error(e.errno()) }
    }

    /// An [`KvmError::Ioctl`] from `errno`.
    pub(crate) fn last_os_error(op: &'static str) -> Self {
        Self::Ioctl { op, source: std::io::Error::last_os_error() }
    }
}

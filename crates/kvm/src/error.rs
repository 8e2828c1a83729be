//! [`KvmError`]: everything the KVM backend can fail with.
//!
//! Invariants:
//! - library code returns these instead of panicking on anything that
//!   depends on the machine or on the caller's input (a missing
//!   `/dev/kvm`, a failed ioctl, a bitmap of the wrong size, a bad workload
//!   configuration, a guest that exits in an unexpected way). A refused call
//!   leaves the VM as it was and usable;
//! - errors hold data (numbers, names, paths, the offending value), never
//!   text made up at the failure, so callers can match on what went wrong;
//! - a message never repeats its cause: the cause is the error's `source`,
//!   and a chain printer (`shadow_mmu_vmm::error_chain`, `outer: cause:
//!   root`) prints each link once.

use std::io;
use std::sync::Arc;

use thiserror::Error;

use crate::guest::{PassProgram, Program};
use crate::perf::{CODE_STRIDE, MAX_PERF_VCPUS};
use crate::vm::{DEVICE_ENV, GuestExit, MAX_TEST_BYTES, VCPU_STATE_WORDS, XSAVE_WORDS};

/// Errors of the KVM backend.
#[derive(Debug, Error)]
pub enum KvmError {
    /// `/dev/kvm` cannot be used on this machine (see [`crate::probe()`]).
    #[error("KVM unavailable")]
    Unavailable(#[from] Unavailable),
    /// A system call failed: an ioctl, `mmap`, or creating a vCPU thread.
    #[error("{op} failed")]
    Ioctl {
        /// The operation, named after the ioctl (`KVM_GET_DIRTY_LOG`, ...) or call.
        op: &'static str,
        /// The error the kernel returned.
        #[source]
        source: io::Error,
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
    #[error("bad configuration")]
    BadConfig(#[from] BadConfig),
    /// The guest exited to the host in a way the workload does not expect,
    /// or a vCPU thread panicked.
    #[error("unexpected vCPU exit")]
    UnexpectedExit(#[from] UnexpectedExit),
    /// A vCPU thread of a [`crate::KvmPerfVm`] failed and stopped. Shared:
    /// every wait for the passes and the final stop report the same failure.
    #[error("vCPU {vcpu}'s thread failed")]
    VcpuThread {
        /// The vCPU.
        vcpu: u32,
        /// Why its thread stopped.
        #[source]
        source: Arc<KvmError>,
    },
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

/// Why `/dev/kvm` (or the device in [`DEVICE_ENV`]) cannot run the
/// workloads.
#[derive(Debug, Error)]
pub enum Unavailable {
    /// The device path has a NUL byte, so no `open` can take it.
    #[error("{env}={path:?} has a NUL byte", env = DEVICE_ENV)]
    NulInPath {
        /// The path, as [`DEVICE_ENV`] gave it.
        path: String,
    },
    /// Opening the device failed (no KVM module, no permission, ...).
    #[error("cannot open {path}")]
    Open {
        /// The device.
        path: String,
        /// The error `open` returned.
        #[source]
        source: io::Error,
    },
    /// `KVM_GET_API_VERSION` failed: the device is not KVM.
    #[error("KVM_GET_API_VERSION on {path} failed")]
    ApiVersionFailed {
        /// The device.
        path: String,
        /// The error the ioctl returned.
        #[source]
        source: io::Error,
    },
    /// `KVM_GET_API_VERSION` is not the one stable version (`KVM_API_VERSION`).
    #[error("KVM_GET_API_VERSION is {got}, not {want}", want = kvm_bindings::KVM_API_VERSION)]
    ApiVersion {
        /// The version the device answered.
        got: i32,
    },
    /// `KVM_CREATE_VM` failed.
    #[error("KVM_CREATE_VM failed")]
    CreateVm(#[source] io::Error),
    /// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` lacks a flag the VM asked for.
    #[error("KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 is {caps}: flags {flags} are not supported")]
    ManualProtect {
        /// The flags KVM supports (`KVM_CHECK_EXTENSION`).
        caps: i32,
        /// The flags asked for.
        flags: u64,
    },
    /// A dirty ring was asked for, and KVM has no
    /// `KVM_CAP_DIRTY_LOG_RING_ACQ_REL`.
    #[error("no KVM_CAP_DIRTY_LOG_RING_ACQ_REL")]
    NoDirtyRingAcqRel,
}

/// A configuration or argument value out of range, with the value.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BadConfig {
    /// A control slot that is empty, not whole pages, or reaches the test slot.
    #[error("control slot of {bytes:#x} bytes: must be a multiple of 4 KiB in 4 KiB..=1 GiB")]
    ControlSlot {
        /// The size asked for.
        bytes: u64,
    },
    /// A test slot that is empty, not whole pages, or past 32-bit reach.
    #[error("test slot of {bytes:#x} bytes: must be a multiple of 4 KiB in 4 KiB..=2 GiB")]
    TestSlot {
        /// The size asked for.
        bytes: u64,
    },
    /// A host mapping for a slot that is empty or not whole pages.
    #[error("{bytes:#x} bytes is not a non-zero multiple of 4 KiB")]
    MappingSize {
        /// The size asked for.
        bytes: u64,
    },
    /// A host mapping larger than this process's address space.
    #[error("{bytes:#x} bytes do not fit the address space")]
    MappingTooLarge {
        /// The size asked for.
        bytes: u64,
    },
    /// Code or a table written to a slot at an offset that is not 8-aligned,
    /// or running past its end.
    #[error("{bytes} bytes at {offset:#x} do not fit a {slot_bytes:#x}-byte slot")]
    WriteOutsideSlot {
        /// Bytes to write.
        bytes: usize,
        /// Where, in bytes from the slot's start.
        offset: u64,
        /// The slot's size.
        slot_bytes: u64,
    },
    /// A script write that is not 8-aligned or not inside the test slot.
    #[error("write at offset {offset:#x}: must be 8-aligned and below {slot_bytes:#x}")]
    ScriptWrite {
        /// The write's offset in the test slot.
        offset: u64,
        /// The test slot's size.
        slot_bytes: u64,
    },
    /// A `KVM_CLEAR_DIRTY_LOG` range that does not start on a 64-page
    /// boundary inside the slot, as KVM requires.
    #[error("first_page {first_page} must be a multiple of 64 below {pages}")]
    ClearFirstPage {
        /// The range's first page.
        first_page: u64,
        /// Pages of the test slot.
        pages: u64,
    },
    /// More pages than `KVM_CLEAR_DIRTY_LOG`'s `u32` count holds.
    #[error("{pages} pages in one KVM_CLEAR_DIRTY_LOG")]
    ClearTooManyPages {
        /// The pages asked for.
        pages: u64,
    },
    /// A vCPU state to restore that is not [`VCPU_STATE_WORDS`] words.
    #[error("a vCPU state of {words} words, not {want}", want = VCPU_STATE_WORDS)]
    VcpuStateSize {
        /// Words given.
        words: usize,
    },
    /// The vCPU's XSAVE state is larger than the traditional area our saved
    /// state holds (dynamically enabled features, such as AMX).
    #[error("an XSAVE state of {bytes} bytes: vCPU state moves only in {max}", max = XSAVE_WORDS * 8)]
    XsaveTooLarge {
        /// What `KVM_CAP_XSAVE2` says `KVM_GET_XSAVE` fills.
        bytes: usize,
    },
    /// A perf VM with no vCPU or more than [`MAX_PERF_VCPUS`].
    #[error("{vcpus} vCPUs: must be 1..={max}", max = MAX_PERF_VCPUS)]
    PerfVcpus {
        /// vCPUs asked for.
        vcpus: u32,
    },
    /// A perf VM's guest memory that is not whole pages.
    #[error("guest_bytes {bytes:#x} must be a multiple of 4 KiB")]
    GuestBytesNotPages {
        /// The size asked for.
        bytes: u64,
    },
    /// A perf VM's guest memory that leaves a vCPU without a page to dirty.
    #[error("guest_bytes {bytes:#x} must give each of {vcpus} vCPUs at least one page")]
    GuestBytesPerVcpu {
        /// The size asked for.
        bytes: u64,
        /// vCPUs asked for.
        vcpus: u32,
    },
    /// A perf VM's guest memory larger than the test slot can be.
    #[error("guest_bytes {bytes:#x} must be at most {max:#x} (the test slot ends below 4 GiB)", max = MAX_TEST_BYTES)]
    GuestBytesTooLarge {
        /// The size asked for.
        bytes: u64,
    },
    /// A share of stores above 100%.
    #[error("write_pct {pct} must be 0..=100")]
    WritePct {
        /// The share asked for.
        pct: u8,
    },
    /// A pass program with no page, a share of stores above 100%, a slice
    /// past 4 GiB or an unaligned pass word.
    #[error("pass program out of range: {0:?}")]
    PassProgram(PassProgram),
    /// A vCPU's pass program longer than the control slot space it has.
    #[error("pass program of {bytes} bytes: each vCPU has {max}", max = CODE_STRIDE)]
    PassProgramTooLarge {
        /// The program's size.
        bytes: usize,
    },
    /// A generated guest program with a jump to a label never placed.
    #[error("guest program with an unresolved jump")]
    UnresolvedJump,
    /// A wait for the passes without one pass count per vCPU.
    #[error("wait_passes needs one entry per vCPU ({vcpus}), not {got}")]
    WaitPassesEntries {
        /// vCPUs of the VM.
        vcpus: usize,
        /// Entries given.
        got: usize,
    },
    /// A working set (`--dirty-pages`): KVM's passes sweep every page.
    #[error("a working set (--dirty-pages) runs on the engine only")]
    WorkingSet,
    /// Lock faults (`--fresh-faults`, `--split-faults`, `--invalidations`,
    /// `--lock-faults`): KVM's guest code sweeps its pages only, and the
    /// host cannot invalidate a page of a live KVM guest without losing
    /// its data (`MADV_DONTNEED`).
    #[error("lock faults (fresh, split, invalidations) run on the engine only")]
    LockFaults,
    /// A host write to a logged slot with the dirty ring on: no vCPU ring
    /// takes a host write (KVM would drop it), as on the engine.
    #[error("host write to a logged slot with the dirty ring on")]
    HostWriteWithDirtyRing,
    /// A ring harvest on a VM without the dirty ring.
    #[error("the dirty ring is not on")]
    NoDirtyRing,
}

/// A guest that exited to the host in a way its workload does not expect,
/// or a vCPU thread that panicked.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum UnexpectedExit {
    /// A `KVM_RUN` exit the guest program does not make (another ucall, an
    /// emulation failure, a dirty ring full where nothing reaps it, ...).
    #[error("vCPU {vcpu} ({program} guest): {exit}")]
    Exit {
        /// The vCPU.
        vcpu: u32,
        /// The program it ran.
        program: Program,
        /// How `KVM_RUN` ended.
        exit: GuestExit,
    },
    /// `KVM_RUN` with `immediate_exit` set entered the guest instead of
    /// returning `EINTR`, so the state to save moved on.
    #[error("vCPU {vcpu}: KVM_RUN with immediate_exit ran the guest")]
    ImmediateExitRan {
        /// The vCPU.
        vcpu: u32,
    },
    /// A vCPU thread panicked.
    #[error("vCPU {vcpu}'s thread panicked")]
    Panicked {
        /// The vCPU.
        vcpu: u32,
    },
}

impl KvmError {
    /// An [`KvmError::Ioctl`] from a `kvm-ioctls` error.
    pub(crate) fn ioctl(op: &'static str, e: kvm_ioctls::Error) -> Self {
        Self::Ioctl { op, source: e.into() }
    }

    /// An [`KvmError::Ioctl`] from `errno`.
    pub(crate) fn last_os_error(op: &'static str) -> Self {
        Self::Ioctl { op, source: io::Error::last_os_error() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::{OtherExit, UCALL_PORT};
    use shadow_mmu_vmm::error_chain;

    #[test]
    fn each_cause_is_printed_once() {
        let enoent = || io::Error::from_raw_os_error(libc::ENOENT);
        let open = KvmError::from(Unavailable::Open { path: "/dev/kvm".into(), source: enoent() });
        assert_eq!(error_chain(&open), format!("KVM unavailable: cannot open /dev/kvm: {}", enoent()));
        let ioctl = KvmError::Ioctl { op: "KVM_GET_DIRTY_LOG", source: enoent() };
        assert_eq!(error_chain(&ioctl), format!("KVM_GET_DIRTY_LOG failed: {}", enoent()));
        let thread = KvmError::VcpuThread { vcpu: 2, source: Arc::new(ioctl) };
        assert_eq!(
            error_chain(&thread),
            format!("vCPU 2's thread failed: KVM_GET_DIRTY_LOG failed: {}", enoent())
        );
    }

    #[test]
    fn messages_say_what_was_wrong() {
        let xsave = KvmError::from(BadConfig::XsaveTooLarge { bytes: 11008 });
        let traditional = (XSAVE_WORDS * 8).to_string();
        assert_eq!(
            error_chain(&xsave),
            format!(
                "bad configuration: an XSAVE state of 11008 bytes: vCPU state moves only in {traditional}"
            )
        );
        let exit = GuestExit::Other {
            exit: OtherExit::IoOut { port: UCALL_PORT + 1, data: vec![7] },
            eip: Ok(0x40),
        };
        let e = KvmError::from(UnexpectedExit::Exit { vcpu: 1, program: Program::Script, exit });
        assert_eq!(
            error_chain(&e),
            "unexpected vCPU exit: vCPU 1 (script guest): out to port 0x11 of [7] at eip 0x40"
        );
        let exit =
            GuestExit::Other { exit: OtherExit::Reason(kvm_bindings::KVM_EXIT_HLT), eip: Err(libc::EBADF) };
        let e = UnexpectedExit::Exit { vcpu: 0, program: Program::Probe, exit };
        let ebadf = io::Error::from_raw_os_error(libc::EBADF);
        assert_eq!(
            e.to_string(),
            format!("vCPU 0 (probe guest): KVM_EXIT_HLT at eip ? (KVM_GET_REGS: {ebadf})")
        );
    }
}

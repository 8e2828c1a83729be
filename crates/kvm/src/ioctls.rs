//! The dirty-log ioctls that `kvm-ioctls` does not wrap (or wraps only with
//! an allocation per call), declared with `vmm-sys-util`'s macros as
//! `include/uapi/linux/kvm.h` defines them:
//!
//! ```c
//! #define KVM_GET_DIRTY_LOG     _IOW(KVMIO,  0x42, struct kvm_dirty_log)
//! #define KVM_CLEAR_DIRTY_LOG   _IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log)
//! #define KVM_RESET_DIRTY_RINGS _IO(KVMIO,   0xc7)
//! ```
//!
//! `kvm-ioctls`' own `VmFd::get_dirty_log` allocates a fresh bitmap on every
//! call; ours writes into the caller's buffer, so a timed harvest times the
//! ioctl and nothing else, as in `dirty_log_perf_test`.
//!
//! Invariants: every wrapper passes the kernel a pointer to memory that is
//! valid, for the whole call, for as many bytes as the kernel reads or
//! writes through it; where that size depends on the slot (which only the
//! caller knows) the wrapper is `unsafe` and says so.

use std::io;
use std::os::raw::c_void;

use kvm_bindings::{kvm_clear_dirty_log, kvm_dirty_log};
use kvm_ioctls::VmFd;
use vmm_sys_util::ioctl::{ioctl, ioctl_with_ref};

use self::nr::{KVM_CLEAR_DIRTY_LOG, KVM_GET_DIRTY_LOG, KVM_RESET_DIRTY_RINGS};

/// The request numbers (each a `fn() -> c_ulong`, as the macros make them).
mod nr {
    use kvm_bindings::{KVMIO, kvm_clear_dirty_log, kvm_dirty_log};
    use vmm_sys_util::{ioctl_io_nr, ioctl_iow_nr, ioctl_iowr_nr};

    ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
    ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);
    ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);
}

/// `KVM_GET_DIRTY_LOG` of `slot` into `bitmap` (bit `i` of word `w` is page
/// `64 * w + i` of the slot).
///
/// Without manual protection KVM also clears its log and write-protects the
/// pages it reports; with `KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE` it only
/// copies the log (clearing is then [`clear_dirty_log`]'s job).
///
/// # Safety
/// `slot` must have at most `64 * bitmap.len()` pages: KVM writes
/// `ALIGN(npages, 64) / 8` bytes through the pointer, with no length check
/// of its own.
pub unsafe fn get_dirty_log(vm: &VmFd, slot: u32, bitmap: &mut [u64]) -> io::Result<()> {
    let log = kvm_dirty_log {
        slot,
        padding1: 0,
        __bindgen_anon_1: kvm_bindings::kvm_dirty_log__bindgen_ty_1 {
            dirty_bitmap: bitmap.as_mut_ptr().cast::<c_void>(),
        },
    };
    // SAFETY: `vm` is an open VM fd and `log` is a fully initialised
    // `kvm_dirty_log` that lives across the call. The kernel writes
    // ALIGN(npages, 64) / 8 bytes through `dirty_bitmap`, which by the
    // caller's contract is at most `8 * bitmap.len()`: inside the buffer we
    // borrow mutably for the call. It keeps no pointer after returning.
    let ret = unsafe { ioctl_with_ref(vm, KVM_GET_DIRTY_LOG(), &log) };
    if ret == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// `KVM_CLEAR_DIRTY_LOG`: clears, in `slot`'s log, the bits of pages
/// `[first_page, first_page + num_pages)` that are set in `bitmap` (bit `i`
/// of word `w` is page `first_page + 64 * w + i`), and write-protects those
/// pages again. KVM wants `first_page` a multiple of 64, and `num_pages` a
/// multiple of 64 unless the range ends at the end of the slot (else
/// `EINVAL`); it needs manual protection enabled on the VM.
///
/// Returns `EINVAL` without calling the kernel if `bitmap` is shorter than
/// `num_pages` bits.
pub fn clear_dirty_log(
    vm: &VmFd,
    slot: u32,
    first_page: u64,
    num_pages: u32,
    bitmap: &[u64],
) -> io::Result<()> {
    if (bitmap.len() as u64) < u64::from(num_pages).div_ceil(64) {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let log = kvm_clear_dirty_log {
        slot,
        num_pages,
        first_page,
        __bindgen_anon_1: kvm_bindings::kvm_clear_dirty_log__bindgen_ty_1 {
            // The kernel only reads the bitmap (copy_from_user); the field is
            // `*mut` because the uapi union is shared with other uses.
            dirty_bitmap: bitmap.as_ptr().cast_mut().cast::<c_void>(),
        },
    };
    // SAFETY: `vm` is an open VM fd and `log` a fully initialised
    // `kvm_clear_dirty_log` living across the call. The kernel reads
    // ALIGN(num_pages, 64) / 8 bytes from `dirty_bitmap`, which the check
    // above keeps inside `bitmap`, borrowed for the call; it never writes
    // through the pointer nor keeps it.
    let ret = unsafe { ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &log) };
    if ret == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// `KVM_RESET_DIRTY_RINGS`: re-protects the pages userspace has collected
/// from the vCPUs' dirty rings. Returns the number of ring entries reset.
/// `EINVAL` on a VM without `KVM_CAP_DIRTY_LOG_RING` enabled.
pub fn reset_dirty_rings(vm: &VmFd) -> io::Result<u32> {
    // SAFETY: `vm` is an open VM fd; the ioctl takes no argument, so no
    // memory of ours is read or written.
    let ret = unsafe { ioctl(vm, KVM_RESET_DIRTY_RINGS()) };
    u32::try_from(ret).map_err(|_| io::Error::last_os_error())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_numbers_match_linux_uapi_kvm_h() {
        // printf("%lx", KVM_...) of a C program including <linux/kvm.h>.
        assert_eq!(KVM_GET_DIRTY_LOG(), 0x4010_ae42);
        assert_eq!(KVM_CLEAR_DIRTY_LOG(), 0xc018_aec0);
        assert_eq!(KVM_RESET_DIRTY_RINGS(), 0xaec7);
        assert_eq!(std::mem::size_of::<kvm_dirty_log>(), 16);
        assert_eq!(std::mem::size_of::<kvm_clear_dirty_log>(), 24);
    }
}

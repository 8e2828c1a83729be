//! The proofs that let a walk outside `mmu_lock` dereference shadow pages.
//!
//! A shadow page is freed only by `kvm_mmu_commit_zap_page`, after a remote
//! TLB flush (`kvm_flush_remote_tlbs`) that waits for every vCPU in guest
//! mode or in `READING_SHADOW_PAGE_TABLES` mode (requests.rs, point 2). So a
//! vCPU in either mode pins every shadow page it reads from the tables until
//! it leaves the mode. The two types here are that pin, as values:
//! [`LocklessWalk`] for `fast_page_fault` (`walk_shadow_page_lockless_begin`
//! .. `_end`), [`InGuestMode`] for the hardware page walk. References that
//! [`SpPtr::get`](crate::shadow_page::SpPtr::get) hands out are bound to
//! their borrow, so none survives the end of the walk.

use crate::shadow_page::PinsShadowPages;
use crate::vcpu::requests::VcpuShared;

/// `walk_shadow_page_lockless_begin` .. `walk_shadow_page_lockless_end`:
/// the vCPU is in `READING_SHADOW_PAGE_TABLES` mode while this lives.
pub(crate) struct LocklessWalk<'v> {
    vcpu: &'v VcpuShared,
}

impl<'v> LocklessWalk<'v> {
    /// `walk_shadow_page_lockless_begin`, from outside guest mode.
    #[inline]
    pub(crate) fn begin(vcpu: &'v VcpuShared) -> Self {
        vcpu.begin_lockless_walk();
        Self { vcpu }
    }
}

impl Drop for LocklessWalk<'_> {
    /// `walk_shadow_page_lockless_end`.
    #[inline]
    fn drop(&mut self) {
        self.vcpu.exit_guest_mode();
    }
}

// SAFETY: while this lives the vCPU's mode is READING_SHADOW_PAGE_TABLES,
// stored before `begin_lockless_walk`'s SeqCst fence; a shadow page is freed
// only after a remote TLB flush whose SeqCst fence and load of `mode` come
// after its unlinking, so the flush either sees us and waits for the release
// store in `drop`, or we began after its fence and read no table it unlinked
// (module docs; requests.rs, point 2).
unsafe impl PinsShadowPages for LocklessWalk<'_> {}

/// A vCPU in guest mode, for the hardware page walk: it cannot leave the
/// mode during a walk, so the walk makes this value itself, on its stack.
pub(crate) struct InGuestMode(());

impl InGuestMode {
    /// # Safety
    /// The calling vCPU is in guest mode (`try_enter_guest_mode` returned
    /// true and it has not exited since), and stays in it while the value
    /// lives.
    #[inline]
    pub(crate) unsafe fn assume() -> Self {
        Self(())
    }
}

// SAFETY: by `assume`'s contract the vCPU is in guest mode; a shadow page is
// freed only after a remote TLB flush, which waits for that vCPU to leave
// guest mode or to flush at its next access boundary, and a hardware walk
// ends before that boundary (module docs).
unsafe impl PinsShadowPages for InGuestMode {}

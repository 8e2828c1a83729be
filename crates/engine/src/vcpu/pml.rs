//! A model of Intel PML (Page-Modification Logging), for the `tdp` design's
//! `VmConfig::pml`.
//!
//! Each vCPU has a log of [`PML_LOG_NR_ENTRIES`] guest physical addresses.
//! When the vCPU's page walk sets an spte's D bit (0 to 1) on a store, it
//! appends the page's gpa, filling the log from the top
//! ([`PML_HEAD_INDEX`] down, as the hardware does). A store that would
//! need an entry in a full log exits first (the PML-full exit), and KVM
//! drains the log; so does every other exit (`vmx_flush_pml_buffer` at the
//! start of `__vmx_handle_exit`), and GET and CLEAR kick every vCPU to drain
//! theirs first (`kvm_arch_sync_dirty_log`). The drain marks each page
//! dirty in write order, so that the dirty ring keeps the CPU's order.
//!
//! Where we differ: KVM's GET kicks the vCPUs and goes on; ours waits
//! until each has drained (the remote flush handshake), so that a store
//! made before GET is reported by that GET. A vCPU drains before it
//! leaves guest mode, so the handshake sees the drain done.

/// Entries in a vCPU's log (`PML_LOG_NR_ENTRIES`).
pub const PML_LOG_NR_ENTRIES: usize = 512;
/// The first entry the CPU writes (`PML_HEAD_INDEX`).
pub const PML_HEAD_INDEX: usize = PML_LOG_NR_ENTRIES - 1;

/// One vCPU's log (its page and `GUEST_PML_INDEX`).
pub(crate) struct PmlLog {
    gfns: Box<[u64; PML_LOG_NR_ENTRIES]>,
    /// The next entry to write; `None`: full (the 16-bit index wrapped).
    index: Option<usize>,
}

impl PmlLog {
    pub(crate) fn new() -> Self {
        Self { gfns: Box::new([0; PML_LOG_NR_ENTRIES]), index: Some(PML_HEAD_INDEX) }
    }

    /// Would a store that sets a D bit need a PML-full exit first?
    pub(crate) fn is_full(&self) -> bool {
        self.index.is_none()
    }

    /// The CPU's append, after it set a D bit.
    pub(crate) fn log(&mut self, gfn: u64) {
        let i = self.index.expect("a full log exits before the store");
        self.gfns[i] = gfn;
        self.index = i.checked_sub(1);
    }

    /// `kvm_flush_pml_buffer`: hands every entry to `f`, oldest first, and
    /// resets the index. Returns how many.
    pub(crate) fn drain(&mut self, mut f: impl FnMut(u64)) -> usize {
        let first = self.index.map_or(0, |i| i + 1);
        for i in (first..=PML_HEAD_INDEX).rev() {
            f(self.gfns[i]);
        }
        self.index = Some(PML_HEAD_INDEX);
        PML_LOG_NR_ENTRIES - first
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn fills_top_down_and_drains_in_write_order() {
        let mut log = PmlLog::new();
        for g in 0..PML_LOG_NR_ENTRIES as u64 {
            assert!(!log.is_full());
            log.log(100 + g);
        }
        assert!(log.is_full());
        let mut seen = Vec::new();
        assert_eq!(log.drain(|g| seen.push(g)), PML_LOG_NR_ENTRIES);
        assert_eq!(seen, (100..100 + PML_LOG_NR_ENTRIES as u64).collect::<Vec<_>>());
        assert!(!log.is_full());
        assert_eq!(log.drain(|_| panic!("empty")), 0);
    }
}

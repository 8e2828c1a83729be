//! The VM's vCPUs as the host controls them: their [`VcpuGate`] (pause,
//! hold, the state each saves), the restore of states another VM's vCPUs
//! saved, and their stop.

use std::sync::Arc;

use crate::{BackendError, PassExtras, VcpuGate, VcpuStateError};

/// The host's control of a VM's vCPU threads (module docs).
pub trait VcpuControl {
    /// The vCPUs' pause and state exchange: a migration's stop-and-copy
    /// pauses them through it, the auto-converge throttle too, and the
    /// source reads their states there.
    fn vcpu_gate(&self) -> Arc<VcpuGate>;

    /// Gives each vCPU the state another VM's vCPU saved (through its gate),
    /// to continue from before it next runs: a migration's destination,
    /// before the guest starts. Checked first (one state per vCPU, each of
    /// this backend and this workload): a refusal changes nothing.
    fn restore_vcpus(&self, states: Vec<Vec<u8>>) -> Result<(), BackendError>;

    /// Stops the vCPUs (each finishes what it is in) and joins them;
    /// returns what only this backend measured.
    fn stop(&mut self) -> Result<PassExtras, BackendError>;

    /// QEMU's dirty-limit: caps each vCPU's dirty rate at `limit` bytes a
    /// second (`None`: no cap), holding that vCPU alone
    /// ([`crate::DirtyPace`]). A VM that cannot says so.
    fn set_dirty_limit(&self, limit: Option<u64>) -> Result<(), BackendError> {
        match limit {
            None => Ok(()),
            Some(_) => Err(BackendError::new(
                "this VM",
                "setting a dirty-limit",
                "its vCPUs cannot be held one by one",
            )),
        }
    }
}

/// The check every backend's [`VcpuControl::restore_vcpus`] makes first: one
/// state per vCPU, each accepted by `check`.
pub fn check_vcpu_states(
    states: &[Vec<u8>],
    vcpus: u32,
    backend: &str,
    check: impl Fn(&[u8]) -> Result<(), &'static str>,
) -> Result<(), BackendError> {
    let refuse = |e: VcpuStateError| BackendError::new(backend, "restoring the vCPUs", e);
    if states.len() != vcpus as usize {
        return Err(refuse(VcpuStateError::Count { got: states.len(), vcpus }));
    }
    for (id, s) in states.iter().enumerate() {
        check(s).map_err(|why| refuse(VcpuStateError::Refused { vcpu: id as u32, bytes: s.len(), why }))?;
    }
    Ok(())
}

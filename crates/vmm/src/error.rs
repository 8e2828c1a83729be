//! Why a VM refused an operation, whichever backend runs it.

use thiserror::Error;

/// Why a backend refused an operation. The VM goes on; nothing was done.
#[derive(Debug, Error)]
#[error("{backend}: {op} refused")]
pub struct BackendError {
    /// The backend's name.
    pub backend: String,
    /// The operation.
    pub op: &'static str,
    /// The backend's own error.
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

impl BackendError {
    /// Wraps `source`, the error `backend` gave for `op`.
    pub fn new(
        backend: &str,
        op: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self { backend: backend.to_string(), op, source: source.into() }
    }
}

/// An error and each of its causes, on one line: `outer: cause: root` (how
/// the CLI, the benches and the migration's statistics print errors).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    use std::fmt::Write;
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let _ = write!(s, ": {c}");
        cause = c.source();
    }
    s
}

/// A set of vCPU states this VM cannot continue from
/// ([`crate::VcpuControl::restore_vcpus`]). Nothing was restored.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum VcpuStateError {
    /// Not one state per vCPU.
    #[error("{got} vCPU states for {vcpus} vCPUs")]
    Count {
        /// States given.
        got: usize,
        /// vCPUs of this VM.
        vcpus: u32,
    },
    /// A state this backend and workload do not read.
    #[error("vCPU {vcpu}: a state of {bytes} bytes: {why}")]
    Refused {
        /// The vCPU.
        vcpu: u32,
        /// The state's length.
        bytes: usize,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A vCPU thread did not take its state in time (it stopped?).
    #[error("a vCPU thread did not take its state within {0:?} (it stopped?)")]
    NotTaken(std::time::Duration),
}

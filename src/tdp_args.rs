//! The `tdp` design's knobs that `run`, `migrate outgoing` and
//! `dirty-log-test` share (`bench migrate-perf` takes them as lists).

use clap::Args;

/// `--no-eager-split`, `--pml`.
#[derive(Debug, Clone, Args)]
pub struct TdpKnobs {
    /// The `tdp` design without eager page splitting
    /// (`kvm.eager_page_split=0`): huge pages are split at the first write
    /// after logging is enabled (or at CLEAR), not at enable.
    #[arg(long)]
    pub no_eager_split: bool,
    /// The `tdp` design with PML: 4 KiB pages re-armed by clearing D, each
    /// vCPU logging the pages whose D bit it sets (a model of Intel PML).
    #[arg(long)]
    pub pml: bool,
}

impl TdpKnobs {
    /// `VmConfig::eager_page_split`.
    pub fn eager_page_split(&self) -> bool {
        !self.no_eager_split
    }
}

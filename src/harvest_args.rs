//! The dirty-log knobs `run` and `bench migrate-perf` share (each takes the
//! interface and the thread count itself: one value for `run`, lists for the
//! bench).

use clap::Args;
use shadow_mmu_vmm::interface::{
    DEFAULT_CLEAR_CHUNK_PAGES, DEFAULT_RING_ENTRIES, DirtyLogInterface, HarvestSpec,
};

/// `--clear-chunk-pages`, `--initially-set`, `--ring-entries`.
#[derive(Debug, Clone, Args)]
pub struct HarvestKnobs {
    /// Pages per CLEAR with --dirty-log clear (a multiple of 64; QEMU's 1 GiB).
    #[arg(long, default_value_t = DEFAULT_CLEAR_CHUNK_PAGES)]
    pub clear_chunk_pages: u64,
    /// KVM_DIRTY_LOG_INITIALLY_SET with --dirty-log clear: each log starts
    /// all ones and nothing is write-protected until CLEAR reaches it.
    #[arg(long)]
    pub initially_set: bool,
    /// Entries of each vCPU's dirty ring with --dirty-log ring (a power of
    /// two, 256 to 65536).
    #[arg(long, default_value_t = DEFAULT_RING_ENTRIES)]
    pub ring_entries: u32,
}

impl HarvestKnobs {
    /// The spec for `interface` on `harvest_threads` threads (INITIALLY_SET
    /// only where the interface is `clear`).
    pub fn spec(&self, interface: DirtyLogInterface, harvest_threads: u32) -> HarvestSpec {
        HarvestSpec {
            interface,
            clear_chunk_pages: self.clear_chunk_pages,
            initially_set: self.initially_set && interface == DirtyLogInterface::Clear,
            ring_entries: self.ring_entries,
            harvest_threads,
        }
    }
}

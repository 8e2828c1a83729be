//! Which dirty-log interface a harvest uses (`--dirty-log`), and the one
//! chunking rule every harvester of manual protect shares.
//!
//! - `get`: `KVM_GET_DIRTY_LOG` clears and re-protects what it reports.
//! - `clear`: manual protect. GET only copies; then `KVM_CLEAR_DIRTY_LOG`
//!   clears and re-protects, one chunk of `clear_chunk_pages` at a time
//!   (QEMU clears 1 GiB chunks, `clear_bitmap_shift` 18), skipping chunks
//!   with no bit set. The pages of a chunk are copied after its CLEAR.
//!   `initially_set` starts each log all ones, with nothing protected.
//! - `ring`: the per-vCPU dirty ring of `ring_entries` entries. A harvest
//!   collects every vCPU's ring, then resets the rings (which re-protects),
//!   then copies the pages; a vCPU whose ring reaches the soft limit exits
//!   and waits for the next harvest.

use std::fmt;
use std::str::FromStr;

use shadow_mmu_core::dirty_ring::DIRTY_GFN_BYTES;

use crate::DirtyLogProtect;

/// QEMU's CLEAR chunk: 1 GiB of 4 KiB pages.
pub const DEFAULT_CLEAR_CHUNK_PAGES: u64 = 1 << 18;

/// KVM's selftests' ring: 65536 entries (`dirty_log_test -c`).
pub const DEFAULT_RING_ENTRIES: u32 = 65536;

/// A dirty ring's size, in entries. KVM sizes its rings in bytes
/// (`KVM_CAP_DIRTY_LOG_RING`), [`DIRTY_GFN_BYTES`] to an entry
/// (`struct kvm_dirty_gfn`): [`RingEntries::bytes`] and
/// [`RingEntries::of_bytes`] are the one conversion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RingEntries(pub u32);

impl RingEntries {
    /// The ring's size in bytes, as KVM takes it.
    pub fn bytes(self) -> u32 {
        self.0 * DIRTY_GFN_BYTES
    }

    /// The entries of a ring of `bytes` bytes.
    pub fn of_bytes(bytes: u32) -> Self {
        Self(bytes / DIRTY_GFN_BYTES)
    }
}

impl fmt::Display for RingEntries {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The interface (`--dirty-log get|clear|ring`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DirtyLogInterface {
    /// `KVM_GET_DIRTY_LOG`, classic.
    #[default]
    Get,
    /// GET, then `KVM_CLEAR_DIRTY_LOG` in chunks (manual protect).
    Clear,
    /// The per-vCPU dirty ring.
    Ring,
}

impl DirtyLogInterface {
    /// The name on the command line and in the JSON.
    pub fn name(self) -> &'static str {
        match self {
            Self::Get => "get",
            Self::Clear => "clear",
            Self::Ring => "ring",
        }
    }
}

impl fmt::Display for DirtyLogInterface {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An interface name that is none of ours.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown dirty-log interface {0:?} (expected get, clear or ring)")]
pub struct UnknownInterface(pub String);

impl FromStr for DirtyLogInterface {
    type Err = UnknownInterface;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "get" => Ok(Self::Get),
            "clear" => Ok(Self::Clear),
            "ring" => Ok(Self::Ring),
            _ => Err(UnknownInterface(s.to_string())),
        }
    }
}

/// How every harvest of a run reads and re-protects the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HarvestSpec {
    /// The interface.
    pub interface: DirtyLogInterface,
    /// Pages per CLEAR (a multiple of 64), for `clear`.
    pub clear_chunk_pages: u64,
    /// `KVM_DIRTY_LOG_INITIALLY_SET`, for `clear`.
    pub initially_set: bool,
    /// Entries of each vCPU's ring, for `ring` (KVM's size rules apply to
    /// 16 bytes each).
    pub ring_entries: u32,
    /// Threads each GET, CLEAR and ring reset is split over
    /// (`VmConfig::harvest_threads`).
    pub harvest_threads: u32,
}

impl Default for HarvestSpec {
    fn default() -> Self {
        Self {
            interface: DirtyLogInterface::Get,
            clear_chunk_pages: DEFAULT_CLEAR_CHUNK_PAGES,
            initially_set: false,
            ring_entries: DEFAULT_RING_ENTRIES,
            harvest_threads: 1,
        }
    }
}

/// A spec that cannot run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadHarvestSpec {
    /// The chunk is not a positive multiple of 64 pages.
    #[error("--clear-chunk-pages {0} must be a positive multiple of 64")]
    ChunkPages(u64),
    /// `initially_set` without manual protect.
    #[error("--initially-set needs --dirty-log clear")]
    InitiallySetWithoutClear,
    /// A thread count out of range.
    #[error("--harvest-threads {0}: must be 1 to 64")]
    HarvestThreads(u32),
    /// A ring size KVM would refuse.
    #[error("--ring-entries {0}: must be a power of two from 256 to 65536 (KVM's rules for 16-byte entries)")]
    RingEntries(u32),
}

impl HarvestSpec {
    /// Checks the spec.
    pub fn validate(&self) -> Result<(), BadHarvestSpec> {
        if self.clear_chunk_pages == 0 || !self.clear_chunk_pages.is_multiple_of(64) {
            return Err(BadHarvestSpec::ChunkPages(self.clear_chunk_pages));
        }
        if self.initially_set && self.interface != DirtyLogInterface::Clear {
            return Err(BadHarvestSpec::InitiallySetWithoutClear);
        }
        if !(1..=64).contains(&self.harvest_threads) {
            return Err(BadHarvestSpec::HarvestThreads(self.harvest_threads));
        }
        if !self.ring_entries.is_power_of_two() || !(256..=65536).contains(&self.ring_entries) {
            return Err(BadHarvestSpec::RingEntries(self.ring_entries));
        }
        Ok(())
    }

    /// The VM's manual-protect mode this spec needs.
    pub fn protect(&self) -> DirtyLogProtect {
        match (self.interface, self.initially_set) {
            (DirtyLogInterface::Get | DirtyLogInterface::Ring, _) => DirtyLogProtect::Auto,
            (DirtyLogInterface::Clear, false) => DirtyLogProtect::Manual,
            (DirtyLogInterface::Clear, true) => DirtyLogProtect::ManualInitiallySet,
        }
    }

    /// The ring's size, when the spec uses the ring.
    pub fn ring(&self) -> Option<RingEntries> {
        (self.interface == DirtyLogInterface::Ring).then_some(RingEntries(self.ring_entries))
    }

    /// A short label: `get`, `clear`, `clear+initially-set`, `ring`, with
    /// `x N threads` when the harvest is split.
    pub fn label(&self) -> String {
        let base = self.interface_label();
        if self.harvest_threads > 1 { format!("{base} x {} threads", self.harvest_threads) } else { base }
    }

    /// The interface's part of [`Self::label`].
    pub fn interface_label(&self) -> String {
        if self.initially_set {
            format!("{}+initially-set", self.interface)
        } else {
            self.interface.to_string()
        }
    }
}

/// The CLEARs of one harvest of a slot of `npages` pages whose GET gave
/// `bitmap`: `(first_page, num_pages, mask)` per chunk of `chunk_pages`
/// (a multiple of 64) with any bit set, in order.
pub fn clear_chunks(
    bitmap: &[u64],
    npages: u64,
    chunk_pages: u64,
) -> impl Iterator<Item = (u64, u64, &[u64])> {
    debug_assert!(chunk_pages > 0 && chunk_pages.is_multiple_of(64));
    let words = (chunk_pages / 64) as usize;
    bitmap.chunks(words).enumerate().filter(|(_, m)| m.iter().any(|&w| w != 0)).map(move |(i, m)| {
        let first = i as u64 * chunk_pages;
        (first, chunk_pages.min(npages - first), m)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_skip_clean_ones_and_end_at_the_slot() {
        // 300 pages, chunks of 128: [0,128) [128,256) [256,300).
        let bm = [1u64, 0, 0, 0, 1 << 43];
        let c: Vec<_> = clear_chunks(&bm, 300, 128).collect();
        assert_eq!(c, vec![(0, 128, &bm[0..2]), (256, 44, &bm[4..5])]);
        assert_eq!(clear_chunks(&[0; 5], 300, 64).count(), 0);
    }

    #[test]
    fn specs_are_checked() {
        assert!(HarvestSpec::default().validate().is_ok());
        let bad = HarvestSpec { clear_chunk_pages: 100, ..HarvestSpec::default() };
        assert_eq!(bad.validate(), Err(BadHarvestSpec::ChunkPages(100)));
        let bad = HarvestSpec { initially_set: true, ..HarvestSpec::default() };
        assert_eq!(bad.validate(), Err(BadHarvestSpec::InitiallySetWithoutClear));
        assert_eq!("rings".parse::<DirtyLogInterface>(), Err(UnknownInterface("rings".into())));
        let bad = HarvestSpec { ring_entries: 100, ..HarvestSpec::default() };
        assert_eq!(bad.validate(), Err(BadHarvestSpec::RingEntries(100)));
        let s = HarvestSpec {
            interface: DirtyLogInterface::Clear,
            initially_set: true,
            ..HarvestSpec::default()
        };
        assert_eq!(
            (s.protect(), s.label().as_str()),
            (DirtyLogProtect::ManualInitiallySet, "clear+initially-set")
        );
    }
}

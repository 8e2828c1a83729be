//! The dirty log of the test slot, by whichever interface the VM has:
//! `KVM_GET_DIRTY_LOG`, with manual protect `KVM_CLEAR_DIRTY_LOG`, or the
//! per-vCPU dirty ring; and one harvest of it, as a migration makes it.
//!
//! The host's own writes ([`crate::GuestMemory::write_guest`]) are in the
//! next dirty log, as KVM's `kvm_write_guest` is (on KVM itself a write
//! through the userspace mapping is not, so its backend keeps the host's
//! bitmap beside KVM's and merges the two, as QEMU does with its own).

use std::time::Instant;

use crate::BackendError;
use crate::interface::{HarvestSpec, clear_chunks};

/// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`: who clears and re-protects the
/// dirty log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(u8)]
pub enum DirtyLogProtect {
    /// `KVM_GET_DIRTY_LOG` clears and re-protects what it reports (KVM
    /// before 4.20, and the seed).
    #[default]
    Auto = 0,
    /// `KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE`: GET only copies the log;
    /// `clear_dirty_log` clears and re-protects.
    Manual = 1,
    /// `Manual` with `KVM_DIRTY_LOG_INITIALLY_SET`: a slot's log starts all
    /// ones when logging is enabled, and nothing is write-protected then.
    ManualInitiallySet = 2,
}

impl DirtyLogProtect {
    /// Does GET leave clearing to CLEAR?
    pub fn is_manual(self) -> bool {
        self != Self::Auto
    }

    /// Does the log start all ones?
    pub fn initially_set(self) -> bool {
        self == Self::ManualInitiallySet
    }

    /// The capability's `args[0]` (`KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE` = 1,
    /// `KVM_DIRTY_LOG_INITIALLY_SET` = 2).
    pub fn cap_flags(self) -> u64 {
        match self {
            Self::Auto => 0,
            Self::Manual => 1,
            Self::ManualInitiallySet => 3,
        }
    }

    /// The mode stored as `self as u8` (an atomic's), if it is one.
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Self::Auto,
            1 => Self::Manual,
            2 => Self::ManualInitiallySet,
            _ => return None,
        })
    }
}

/// What a VM's dirty log offers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// Manual protect (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`): with it,
    /// [`DirtyLog::get_dirty_log`] only copies the log, and
    /// [`DirtyLog::clear_dirty_log`] clears and re-protects; with
    /// `INITIALLY_SET` too, each log starts all ones.
    pub protect: DirtyLogProtect,
    /// The dirty ring, of this size per vCPU: the bitmap calls are refused
    /// and [`DirtyLog::harvest_dirty_ring`] answers.
    pub dirty_ring: Option<crate::RingEntries>,
    /// [`crate::BackendVm::large_sptes_mapped`] answers (the engine shows its
    /// shadow page tables; KVM does not).
    pub mmu_figures: bool,
}

/// The test slot's dirty log (module docs).
pub trait DirtyLog {
    /// The VM's name, as reports give it ("engine locked", "KVM (manual
    /// protect)").
    fn name(&self) -> String;

    /// What its log offers.
    fn capabilities(&self) -> Capabilities;

    /// Turns dirty logging of the test slot on (write-protecting it, with a
    /// clean log; with `INITIALLY_SET`, protecting nothing, all ones) or off.
    fn set_dirty_logging(&mut self, on: bool) -> Result<(), BackendError>;

    /// `KVM_GET_DIRTY_LOG` into `bitmap` (one bit per page); returns the
    /// pages set. Clears and re-protects, unless the VM protects manually.
    fn get_dirty_log(&mut self, bitmap: &mut [u64]) -> Result<u64, BackendError>;

    /// `KVM_CLEAR_DIRTY_LOG` of the pages set in `bitmap`, from page
    /// `first_page`: manual protect only.
    fn clear_dirty_log(&mut self, first_page: u64, bitmap: &[u64]) -> Result<(), BackendError>;

    /// With the dirty ring: collects every vCPU's ring (and what was
    /// collected at ring-full exits since the last call), then
    /// `KVM_RESET_DIRTY_RINGS`; appends the test slot's page offsets to
    /// `out`, in push order, and returns how many. Refused without the ring.
    fn harvest_dirty_ring(&mut self, out: &mut Vec<u64>) -> Result<u64, BackendError>;
}

/// What a backend VM keeps of its dirty ring between harvests: the test
/// slot's offsets collected at ring-full exits (by whichever thread reaped
/// them), and how many exits.
#[derive(Debug, Default)]
pub struct RingState {
    /// Collected at ring-full exits, not yet handed out.
    pub collected: parking_lot::Mutex<Vec<u64>>,
    /// Ring-full exits so far.
    pub full_exits: std::sync::atomic::AtomicU64,
}

impl RingState {
    /// Hands out what was collected, appended to `out`.
    pub fn drain_into(&self, out: &mut Vec<u64>) {
        out.append(&mut self.collected.lock());
    }

    /// Counts `n` ring-full exits.
    pub fn count_exits(&self, n: u64) {
        // Relaxed: a statistic.
        self.full_exits.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Ring-full exits so far.
    pub fn exits(&self) -> u64 {
        // Relaxed: a statistic.
        self.full_exits.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A harvest as a migration makes it: `get_dirty_log`, then, on a VM that
/// protects manually, `clear_dirty_log` of what it got, so that either way
/// the pages reported are write-protected again when this returns.
pub fn harvest(
    vm: &mut (impl crate::GuestMemory + DirtyLog + ?Sized),
    bitmap: &mut [u64],
) -> Result<u64, BackendError> {
    let whole =
        HarvestSpec { clear_chunk_pages: vm.pages().next_multiple_of(64).max(64), ..HarvestSpec::default() };
    Ok(timed_harvest(vm, &whole, bitmap)?.0)
}

/// A harvest by the VM's interface, timed: the pages reported, the time of
/// `get_dirty_log` (or, with the dirty ring, of collecting and resetting
/// the rings into `bitmap`), and that of the CLEARs, in `spec`'s chunks,
/// where the VM protects manually, ns.
pub fn timed_harvest(
    vm: &mut (impl crate::GuestMemory + DirtyLog + ?Sized),
    spec: &HarvestSpec,
    bitmap: &mut [u64],
) -> Result<(u64, u64, Option<u64>), BackendError> {
    let t = Instant::now();
    let caps = vm.capabilities();
    if caps.dirty_ring.is_some() {
        let mut offsets = Vec::new();
        vm.harvest_dirty_ring(&mut offsets)?;
        bitmap.fill(0);
        for o in offsets {
            bitmap[(o / 64) as usize] |= 1 << (o % 64);
        }
        let pages = bitmap.iter().map(|w| u64::from(w.count_ones())).sum();
        return Ok((pages, t.elapsed().as_nanos() as u64, None));
    }
    let dirty_pages = vm.get_dirty_log(bitmap)?;
    let get_ns = t.elapsed().as_nanos() as u64;
    let mut clear_ns = None;
    if caps.protect.is_manual() {
        let t = Instant::now();
        for (first, _, mask) in clear_chunks(bitmap, vm.pages(), spec.clear_chunk_pages) {
            vm.clear_dirty_log(first, mask)?;
        }
        clear_ns = Some(t.elapsed().as_nanos() as u64);
    }
    Ok((dirty_pages, get_ns, clear_ns))
}

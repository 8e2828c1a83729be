//! One interface to a dirty-logging VM, whichever runs it: the engine, in
//! either design ([`EngineBackend`]), or the machine's KVM (the kvm crate's
//! `KvmBackend`). Tests and tools written against [`Backend`] and
//! [`BackendVm`] run unchanged on both, so their bitmaps and figures can be
//! compared with the real thing.
//!
//! A [`BackendVm`] has one memslot of test memory at guest physical 0 and
//! one vCPU that runs host-chosen stores ([`BackendVm::run_writes`]); between
//! calls no vCPU runs, so the memory holds still while the host reads it or
//! harvests its log. What only some backends do is in [`Capabilities`].
//!
//! For `migrate-perf`, [`Backend::start_passes`] gives a [`PassVm`]: vCPUs
//! on threads of their own making `dirty_log_perf_test`'s passes, each
//! released by the host; `perf::migrate_perf` drives any of them.
//!
//! The host reads and writes guest memory through the VM too
//! ([`DirtyLogVm::read_guest`], [`DirtyLogVm::write_guest`]), as a device
//! model or a migration's destination does; a host write is in the next
//! dirty log, as KVM's own `kvm_write_guest` is (on KVM itself a write
//! through the userspace mapping is not, so its backend keeps the host's
//! bitmap beside KVM's and merges the two, as QEMU does with its own).

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

/// Manual protect's flags, on every backend.
pub use shadow_mmu_engine::DirtyLogProtect;
/// Why a host access was refused, on every backend.
pub use shadow_mmu_engine::GuestAccessError;
/// How the engine's VMs are built (`EngineBackend::config`).
pub use shadow_mmu_engine::VmConfig;
use shadow_mmu_engine::{GuestOp, HostMemory, Script, Vcpu, VcpuExit, Vm};

use crate::interface::{HarvestSpec, clear_chunks};
pub use crate::vcpu_gate::VcpuGate;
use thiserror::Error;

/// What a backend's VM does beyond the common interface.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// Manual protect (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`): with it,
    /// [`DirtyLogVm::get_dirty_log`] only copies the log, and
    /// [`DirtyLogVm::clear_dirty_log`] clears and re-protects; with
    /// `INITIALLY_SET` too, each log starts all ones.
    pub protect: DirtyLogProtect,
    /// The dirty ring, with this many entries per vCPU: the bitmap calls are
    /// refused and [`DirtyLogVm::harvest_dirty_ring`] answers.
    pub dirty_ring: Option<u32>,
    /// [`BackendVm::large_sptes_mapped`] answers (the engine shows its shadow
    /// page tables; KVM does not).
    pub mmu_figures: bool,
}

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
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self { backend: backend.to_string(), op, source: Box::new(source) }
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

/// A way to run dirty-logging VMs.
pub trait Backend {
    /// A name for reports ("engine locked", "KVM (manual protect)").
    fn name(&self) -> String;

    /// A VM with `guest_bytes` of test memory at guest physical 0 (dirty
    /// logging off) and one vCPU.
    fn create_vm(&self, guest_bytes: u64) -> Result<Box<dyn BackendVm>, BackendError>;

    /// A VM whose `spec.vcpus` vCPUs make passes over their slices of the
    /// test slot, each on a thread of its own, none released yet.
    fn start_passes(&self, spec: &PassSpec) -> Result<Box<dyn PassVm>, BackendError>;
}

/// `dirty_log_perf_test`'s workload: each vCPU makes passes over its slice
/// of the test slot (pages `[id * n / vcpus, (id + 1) * n / vcpus)`), one
/// 8-byte access per page, and waits for the host after each pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassSpec {
    /// vCPUs, one thread each.
    pub vcpus: u32,
    /// Bytes of the test slot.
    pub guest_bytes: u64,
    /// Share of accesses that are stores, percent.
    pub write_pct: u8,
    /// Random pages instead of a sequential sweep.
    pub random: bool,
    /// Seed of the random choices.
    pub seed: u64,
    /// Only the first this many pages (a multiple of 64) are swept, split
    /// among the vCPUs: a fixed working set in a guest of any size, mapped
    /// lazily (`bench migrate-perf --dirty-pages`). `None`: all of them.
    pub dirty_pages: Option<u64>,
}

/// A VM running passes ([`Backend::start_passes`]). Between a completed pass
/// and the next release a vCPU runs nothing.
pub trait PassVm: DirtyLogVm {
    /// Lets every vCPU go on up to pass `n`.
    fn release(&self, n: u64);

    /// The iteration a word the guest stored carries: the pass number on
    /// KVM (its guest stores it), the workload's tag on the engine.
    fn stored_iteration(&self, word: u64) -> u64 {
        word
    }

    /// Pages the vCPUs sweep: all of the test slot, or the working set of
    /// [`PassSpec::dirty_pages`].
    fn swept_pages(&self) -> u64 {
        self.pages()
    }

    /// Waits until every vCPU has completed more than `since` passes;
    /// returns the longest of their last passes, ns.
    fn wait_passes(&self, since: u64) -> Result<u64, BackendError>;

    /// Where the vCPUs tag their stores with an iteration (the engine's
    /// workload): starts a new one and returns the last whose stores are all
    /// complete, so that the oracle can check each harvest; `None` where the
    /// stores carry no tag (the oracle then checks at the end only). Called
    /// with every vCPU waiting for a release.
    fn cut(&self) -> Option<u64>;

    /// The vCPUs' pause and state exchange: the stop-and-copy pauses them
    /// through it, the auto-converge throttle too, and a migration's source
    /// reads their states there ([`VcpuGate`]).
    fn vcpu_gate(&self) -> Arc<VcpuGate>;

    /// Passes every vCPU has completed (the least of their counts).
    fn passes_done(&self) -> u64;

    /// The least iteration ([`Self::stored_iteration`]) any store the vCPUs
    /// make from now on carries: after [`Self::restore_vcpus`], what a
    /// migration's destination checks the guest's new stores against.
    fn iteration_floor(&self) -> u64;

    /// Gives each vCPU the state another VM's vCPU saved (through its gate),
    /// to continue from before it next runs: a migration's destination,
    /// before the first release. Checked first (one state per vCPU, each of
    /// this backend and this workload): a refusal changes nothing.
    fn restore_vcpus(&self, states: Vec<Vec<u8>>) -> Result<(), BackendError>;

    /// The final harvest is coming (the stop-and-copy): wake whatever
    /// threads it will use so that they are ready within `within`.
    fn prepare_harvest(&self, _within: std::time::Duration) {}

    /// Marks the start of a harvest, for backends that time each vCPU fault
    /// and tell faults during a harvest from others.
    fn harvest_begin(&self) {}

    /// Marks the end of a harvest.
    fn harvest_end(&self) {}

    /// The vCPUs' write faults that overlapped a harvest since the last
    /// call, where the backend times its faults (the engine; KVM does not
    /// show its faults).
    fn take_harvest_latency(&self) -> Option<crate::perf::LatencyHistogram> {
        None
    }

    /// Stops the vCPUs (each finishes the pass it is in) and joins them;
    /// returns what only this backend measured.
    fn stop(&mut self) -> Result<PassExtras, BackendError>;
}

/// What a [`PassVm`] measured beyond the common figures.
#[derive(Debug, Clone, Default)]
pub struct PassExtras {
    /// vCPU write-fault latencies: during a harvest, and with none running.
    pub latency: Option<(crate::perf::LatencyHistogram, crate::perf::LatencyHistogram)>,
    /// Named figures, for the JSON's `details`.
    pub figures: Vec<(&'static str, u64)>,
    /// Lines for the report.
    pub lines: Vec<String>,
}

/// What every backend's VM has: the test slot at guest physical 0, and its
/// dirty log (module docs).
pub trait DirtyLogVm {
    /// The backend's name.
    fn name(&self) -> String;

    /// What it can do beyond the common interface.
    fn capabilities(&self) -> Capabilities;

    /// Pages of the test slot.
    fn pages(&self) -> u64;

    /// The test slot's memory, as the host sees it (one word per 8 bytes).
    fn memory(&self) -> &[AtomicU64];

    /// Reads `out.len()` words of guest memory from byte `offset` of the test
    /// slot, as the host (`kvm_read_guest`); the range is checked first
    /// ([`check_guest_access`]).
    fn read_guest(&self, offset: u64, out: &mut [u64]) -> Result<(), BackendError>;

    /// Writes `words` to guest memory at byte `offset` of the test slot, as
    /// the host (`kvm_write_guest`), and, while the slot logs, puts the pages
    /// written in the next dirty log. Checked first: a refusal writes
    /// nothing.
    fn write_guest(&mut self, offset: u64, words: &[u64]) -> Result<(), BackendError>;

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

/// A VM of some backend whose one vCPU runs host-chosen stores (module docs).
pub trait BackendVm: DirtyLogVm {
    /// Runs the vCPU through these guest stores, in order: 8 bytes of
    /// `value` at byte `offset` of the test slot. Checked first: a refused
    /// list stores nothing.
    fn run_writes(&mut self, writes: &[(u64, u64)]) -> Result<(), BackendError>;

    /// Dirty-ring-full exits so far (the backend harvests and resets at each
    /// one, keeping what it collected for the next `harvest_dirty_ring`).
    fn ring_full_exits(&self) -> u64 {
        0
    }

    /// Large (2 MiB) sptes installed so far, where
    /// [`Capabilities::mmu_figures`].
    fn large_sptes_mapped(&self) -> Option<u64> {
        None
    }
}

/// Checks a host access of `words` words at byte `offset` of a test slot of
/// `pages` pages: 8-aligned, not empty, inside the slot. The one check every
/// backend makes before [`DirtyLogVm::read_guest`] and
/// [`DirtyLogVm::write_guest`] touch memory.
pub fn check_guest_access(pages: u64, offset: u64, words: usize) -> Result<(), GuestAccessError> {
    let bytes = words as u64 * 8;
    match offset.checked_add(bytes) {
        Some(_) if words == 0 || !offset.is_multiple_of(8) => {
            Err(GuestAccessError::Unaligned { gpa: offset, bytes })
        }
        Some(end) if end <= pages * crate::spte::PAGE_SIZE => Ok(()),
        Some(_) => Err(GuestAccessError::NoSlot { gpa: offset, bytes }),
        None => Err(GuestAccessError::Unaligned { gpa: offset, bytes }),
    }
}

/// The check every backend's [`PassVm::restore_vcpus`] makes first: one
/// state per vCPU, each accepted by `check`.
pub fn check_vcpu_states(
    states: &[Vec<u8>],
    vcpus: u32,
    backend: &str,
    check: impl Fn(&[u8]) -> Result<(), &'static str>,
) -> Result<(), BackendError> {
    let refuse = |why: String| BackendError::new(backend, "restoring the vCPUs", VcpuStateError(why));
    if states.len() != vcpus as usize {
        return Err(refuse(format!("{} vCPU states for {vcpus} vCPUs", states.len())));
    }
    for (id, s) in states.iter().enumerate() {
        check(s).map_err(|why| refuse(format!("vCPU {id}: a state of {} bytes: {why}", s.len())))?;
    }
    Ok(())
}

/// A vCPU state this VM cannot continue from.
#[derive(Debug, Error)]
#[error("{0}")]
pub struct VcpuStateError(pub String);

/// A harvest as a migration makes it: `get_dirty_log`, then, on a VM that
/// protects manually, `clear_dirty_log` of what it got, so that either way
/// the pages reported are write-protected again when this returns.
pub fn harvest(vm: &mut (impl DirtyLogVm + ?Sized), bitmap: &mut [u64]) -> Result<u64, BackendError> {
    let whole =
        HarvestSpec { clear_chunk_pages: vm.pages().next_multiple_of(64).max(64), ..HarvestSpec::default() };
    Ok(timed_harvest(vm, &whole, bitmap)?.0)
}

/// A harvest by the VM's interface, timed: the pages reported, the time of
/// `get_dirty_log` (or, with the dirty ring, of collecting and resetting
/// the rings into `bitmap`), and that of the CLEARs, in `spec`'s chunks,
/// where the VM protects manually, ns.
pub fn timed_harvest(
    vm: &mut (impl DirtyLogVm + ?Sized),
    spec: &HarvestSpec,
    bitmap: &mut [u64],
) -> Result<(u64, u64, Option<u64>), BackendError> {
    let t = std::time::Instant::now();
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
        let t = std::time::Instant::now();
        for (first, _, mask) in clear_chunks(bitmap, vm.pages(), spec.clear_chunk_pages) {
            vm.clear_dirty_log(first, mask)?;
        }
        clear_ns = Some(t.elapsed().as_nanos() as u64);
    }
    Ok((dirty_pages, get_ns, clear_ns))
}

/// Collects every ring of `vm` (the test slot's offsets into `out`), then
/// resets them.
pub(crate) fn collect_engine_rings(
    vm: &Vm,
    out: &mut Vec<u64>,
) -> Result<(), shadow_mmu_engine::DirtyRingError> {
    for vcpu in vm.dirty_ring_vcpus() {
        vm.harvest_dirty_ring(vcpu, |slot, offset| {
            if slot == 0 {
                out.push(offset);
            }
        })?;
    }
    vm.reset_dirty_rings().map(|_| ())
}

/// The engine as a backend: VMs built from `config` (design, fast path,
/// and the rest).
#[derive(Debug, Clone, Default)]
pub struct EngineBackend {
    /// How each VM is built.
    pub config: VmConfig,
    /// The dirty ring's entries per vCPU, if on.
    pub dirty_ring: Option<u32>,
}

impl Backend for EngineBackend {
    fn name(&self) -> String {
        let fast = if self.config.fast_page_fault { "" } else { ", no fast_page_fault" };
        let log = match (self.dirty_ring, self.config.dirty_log_protect) {
            (Some(n), _) => format!(", dirty ring of {n}"),
            (None, DirtyLogProtect::Auto) => String::new(),
            (None, DirtyLogProtect::Manual) => ", manual protect".into(),
            (None, DirtyLogProtect::ManualInitiallySet) => ", manual protect, initially set".into(),
        };
        format!("engine {}{fast}{log}", self.config.mmu)
    }

    fn create_vm(&self, guest_bytes: u64) -> Result<Box<dyn BackendVm>, BackendError> {
        let name = self.name();
        let (vm, mem) = crate::perf::vm_with_memory(self.config.clone(), guest_bytes, false)
            .map_err(|e| BackendError::new(&name, "creating the VM", e))?;
        if let Some(n) = self.dirty_ring {
            vm.enable_dirty_ring(n * 16)
                .map_err(|e| BackendError::new(&name, "enabling the dirty ring", e))?;
        }
        let vcpu = vm.create_vcpu(0).map_err(|e| BackendError::new(&name, "creating the vCPU", e))?;
        Ok(Box::new(EngineVm { name, vm, mem, work: vcpu, ring: RingState::default() }))
    }

    fn start_passes(&self, spec: &PassSpec) -> Result<Box<dyn PassVm>, BackendError> {
        let name = self.name();
        let vm = crate::perf::EnginePassVm::start(name.clone(), self.config.clone(), self.dirty_ring, spec)
            .map_err(|e| BackendError::new(&name, "starting the passes", e))?;
        Ok(Box::new(vm))
    }
}

/// A VM of [`EngineBackend`]: its test slot, and what runs in it (`W`: one
/// vCPU for host-chosen stores, or the passes' vCPU threads of
/// `perf::EnginePasses`).
pub struct EngineVm<W> {
    pub(crate) name: String,
    pub(crate) vm: Vm,
    pub(crate) mem: Arc<HostMemory>,
    pub(crate) work: W,
    pub(crate) ring: RingState,
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

impl<W> EngineVm<W> {
    pub(crate) fn fail(
        &self,
        op: &'static str,
        e: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> BackendError {
        BackendError { backend: self.name.clone(), op, source: e.into() }
    }
}

impl<W> DirtyLogVm for EngineVm<W> {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            protect: self.vm.dirty_log_protect(),
            dirty_ring: self.vm.dirty_ring_entries(),
            mmu_figures: true,
        }
    }

    fn pages(&self) -> u64 {
        self.mem.pages()
    }

    fn memory(&self) -> &[AtomicU64] {
        self.mem.words()
    }

    fn read_guest(&self, offset: u64, out: &mut [u64]) -> Result<(), BackendError> {
        self.vm.read_guest(offset, out).map_err(|e| self.fail("read_guest", e))
    }

    fn write_guest(&mut self, offset: u64, words: &[u64]) -> Result<(), BackendError> {
        self.vm.write_guest(offset, words).map_err(|e| self.fail("write_guest", e))
    }

    fn set_dirty_logging(&mut self, on: bool) -> Result<(), BackendError> {
        let r = if on { self.vm.enable_dirty_logging(0) } else { self.vm.disable_dirty_logging(0) };
        r.map_err(|e| self.fail("setting dirty logging", e))
    }

    fn get_dirty_log(&mut self, bitmap: &mut [u64]) -> Result<u64, BackendError> {
        self.vm.get_dirty_log(0, bitmap).map_err(|e| self.fail("get_dirty_log", e))
    }

    fn clear_dirty_log(&mut self, first_page: u64, bitmap: &[u64]) -> Result<(), BackendError> {
        // The kvm crate's convention: the range runs from `first_page` for
        // the mask's words, or to the slot's end if that comes first.
        let pages = (64 * bitmap.len() as u64).min(self.mem.pages().saturating_sub(first_page));
        self.vm
            .clear_dirty_log(0, first_page, pages, bitmap)
            .map(|_| ())
            .map_err(|e| self.fail("clear_dirty_log", e))
    }

    fn harvest_dirty_ring(&mut self, out: &mut Vec<u64>) -> Result<u64, BackendError> {
        let before = out.len();
        self.ring.drain_into(out);
        collect_engine_rings(&self.vm, out).map_err(|e| self.fail("harvest_dirty_ring", e))?;
        Ok((out.len() - before) as u64)
    }
}

impl BackendVm for EngineVm<Vcpu> {
    fn run_writes(&mut self, writes: &[(u64, u64)]) -> Result<(), BackendError> {
        let bytes = self.mem.words().len() as u64 * 8;
        if let Some(&(off, _)) = writes.iter().find(|&&(off, _)| !off.is_multiple_of(8) || off >= bytes) {
            let why = format!("store at {off:#x}: not 8-aligned inside the {bytes:#x}-byte slot");
            return Err(self.fail("run_writes", why));
        }
        let mut script = Script::new(writes.iter().map(|&(off, v)| GuestOp::Write(off, v)));
        loop {
            match self.work.run(&mut script) {
                Ok(VcpuExit::Hypercall(0)) => return Ok(()),
                Ok(VcpuExit::DirtyRingFull) => {
                    // As a VMM's reaper: collect and reset, then run on.
                    self.ring.count_exits(1);
                    collect_engine_rings(&self.vm, &mut self.ring.collected.lock())
                        .map_err(|e| self.fail("run_writes", e))?;
                }
                Ok(exit) => return Err(self.fail("run_writes", format!("unexpected exit {exit:?}"))),
                Err(e) => return Err(self.fail("run_writes", e)),
            }
        }
    }

    fn ring_full_exits(&self) -> u64 {
        self.ring.exits()
    }

    fn large_sptes_mapped(&self) -> Option<u64> {
        Some(self.vm.stats().mmu.large_sptes_mapped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{MIB, every_design, set_pages};

    #[test]
    fn the_engine_as_a_backend() {
        for config in every_design() {
            let backend = EngineBackend { config, dirty_ring: None };
            let mut vm = backend.create_vm(2 * MIB).unwrap();
            assert_eq!(vm.pages(), 512);
            let mut bitmap = vec![0u64; 8];
            assert!(harvest(vm.as_mut(), &mut bitmap).is_err(), "{}: logging is off", backend.name());
            vm.set_dirty_logging(true).unwrap();
            vm.run_writes(&[(3 * 4096 + 8, 7), (9 * 4096, 1)]).unwrap();
            assert_eq!(harvest(vm.as_mut(), &mut bitmap).unwrap(), 2);
            assert_eq!(set_pages(&bitmap), vec![3, 9]);
            assert_eq!(vm.memory()[3 * 512 + 1].load(std::sync::atomic::Ordering::Relaxed), 7);
            // Refused stores store nothing, and the VM goes on.
            let e = vm.run_writes(&[(0, 1), (4, 2)]).unwrap_err();
            assert!(e.to_string().contains("run_writes refused"), "{e}");
            assert_eq!(harvest(vm.as_mut(), &mut bitmap).unwrap(), 0);
            assert!(vm.clear_dirty_log(0, &bitmap).is_err(), "no manual protect on the engine yet");
            assert!(vm.large_sptes_mapped().is_some());
        }
    }
}

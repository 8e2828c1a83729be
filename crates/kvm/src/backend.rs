//! The machine's KVM as a `vmm` [`Backend`]: each VM is a [`KvmScriptVm`]
//! (a test slot and one vCPU that runs host-chosen stores), or, for
//! `migrate-perf`, a [`KvmPerfVm`] (vCPU threads making passes), with or
//! without manual protect.

use std::ops::DerefMut;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use shadow_mmu_core::dirty_bitmap::DirtyBitmap;
use shadow_mmu_core::spte::PAGE_SIZE;
use shadow_mmu_vmm::{
    Backend, BackendError, BackendVm, Capabilities, DirtyLog, DirtyPace, GuestMemory, HarvestProbe,
    PassExtras, PassSpec, PassVm, PassWorkload, RingEntries, RingState, VcpuControl, VcpuGate, VcpuLoss,
    VcpuStateError, check_guest_access, check_vcpu_states,
};

use crate::error::{BadConfig, KvmError};
use crate::perf::{KvmPerfConfig, KvmPerfVm};
use crate::script::KvmScriptVm;
use crate::vm::{KvmVm, TEST_SLOT};
use shadow_mmu_vmm::DirtyLogProtect;

/// Collects every vCPU ring of `vm` (the test slot's offsets into `out`),
/// then `KVM_RESET_DIRTY_RINGS`.
///
/// A harvest that finds a ring completely full means KVM pushed past its
/// reserve and overwrote entries it had not given back (it warns in
/// `kvm_dirty_ring_push`): pages are lost, and this is an error.
fn collect_kvm_rings(vm: &KvmVm, out: &mut Vec<u64>) -> Result<(), KvmError> {
    let harvested = vm.harvest_dirty_rings(|slot, offset| {
        if slot == TEST_SLOT {
            out.push(offset);
        }
    });
    vm.reset_dirty_rings()?;
    harvested.map(|_| ())
}

/// ` (manual protect)`, ` (manual protect, initially set)` or nothing: the
/// backend's name says which.
fn protect_label(p: DirtyLogProtect) -> &'static str {
    match p {
        DirtyLogProtect::Auto => "",
        DirtyLogProtect::Manual => " (manual protect)",
        DirtyLogProtect::ManualInitiallySet => " (manual protect, initially set)",
    }
}

/// KVM through `/dev/kvm`, classic (`KVM_GET_DIRTY_LOG` clears and
/// re-protects) or with `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` (and
/// `INITIALLY_SET`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvmBackend {
    /// Manual protect's flags on each VM.
    pub protect: DirtyLogProtect,
    /// The dirty ring's entries per vCPU, if on.
    pub dirty_ring: Option<RingEntries>,
}

impl Backend for KvmBackend {
    fn name(&self) -> String {
        match self.dirty_ring {
            Some(n) => format!("KVM (dirty ring of {n})"),
            None => format!("KVM{}", protect_label(self.protect)),
        }
    }

    fn create_vm(&self, guest_bytes: u64) -> Result<Box<dyn BackendVm>, BackendError> {
        let name = self.name();
        let vm = match self.dirty_ring {
            Some(n) => KvmScriptVm::with_dirty_ring(guest_bytes, n.bytes()),
            None => KvmScriptVm::new(guest_bytes, self.protect),
        }
        .map_err(|e| BackendError::new(&name, "creating the VM", e))?;
        Ok(Box::new(KvmBackendVm::new(name, self.protect, vm, Arc::default())))
    }

    fn start_passes(&self, spec: &PassSpec) -> Result<Box<dyn PassVm>, BackendError> {
        let name = self.name();
        if spec.dirty_pages.is_some() {
            let why = KvmError::BadConfig(BadConfig::WorkingSet);
            return Err(BackendError::new(&name, "starting the passes", why));
        }
        if spec.lock_faults.any() {
            let why = KvmError::BadConfig(BadConfig::LockFaults);
            return Err(BackendError::new(&name, "starting the passes", why));
        }
        let cfg = KvmPerfConfig {
            vcpus: spec.vcpus,
            guest_bytes: spec.guest_bytes,
            write_pct: spec.write_pct,
            random: spec.random,
            seed: spec.seed,
            protect: self.protect,
            dirty_ring_bytes: self.dirty_ring.map(RingEntries::bytes),
            lazy_memory: spec.lazy_memory,
            compute_vcpus: spec.compute_vcpus,
        };
        let vm = KvmPerfVm::new(&cfg).map_err(|e| BackendError::new(&name, "starting the passes", e))?;
        let ring = vm.ring_state().clone();
        Ok(Box::new(KvmBackendVm::new(name, self.protect, vm, ring)))
    }
}

/// A VM of [`KvmBackend`]: a [`KvmScriptVm`] (host-chosen stores) or a
/// [`KvmPerfVm`] (the passes' vCPU threads). The passes' guests store the
/// pass number, with no iteration tag: the oracle checks their harvests at
/// the end only.
///
/// KVM does not log what the host writes through its own mapping of guest
/// memory, so `host_dirty` does, for [`DirtyLogVm::write_guest`]: its bits
/// are merged into each `get_dirty_log` and cleared as KVM's own are (by
/// the GET, or with manual protect by the CLEAR), as QEMU merges its own
/// bitmap with KVM's.
struct KvmBackendVm<V> {
    name: String,
    protect: DirtyLogProtect,
    inner: V,
    host_dirty: DirtyBitmap,
    /// Shared with the vCPU threads, which reap their own rings into it
    /// under a dirty-limit.
    ring: Arc<RingState>,
}

impl<V: DerefMut<Target = KvmVm>> KvmBackendVm<V> {
    fn new(name: String, protect: DirtyLogProtect, inner: V, ring: Arc<RingState>) -> Self {
        let host_dirty = DirtyBitmap::new(inner.test_pages());
        Self { name, protect, inner, host_dirty, ring }
    }
}

impl<V> KvmBackendVm<V> {
    fn fail(&self, op: &'static str, e: KvmError) -> BackendError {
        BackendError::new(&self.name, op, e)
    }
}

impl<V: DerefMut<Target = KvmVm>> GuestMemory for KvmBackendVm<V> {
    fn pages(&self) -> u64 {
        self.inner.test_pages()
    }

    fn memory(&self) -> &[AtomicU64] {
        self.inner.memory().test.words()
    }

    fn read_guest(&self, offset: u64, out: &mut [u64]) -> Result<(), BackendError> {
        check_guest_access(self.pages(), offset, out.len())
            .map_err(|e| BackendError::new(&self.name, "read_guest", e))?;
        let words = &self.memory()[offset as usize / 8..][..out.len()];
        for (o, w) in out.iter_mut().zip(words) {
            // Relaxed: no vCPU runs a store this read must see ordered
            // (module docs of the testkit's backend); guest data.
            *o = w.load(Ordering::Relaxed);
        }
        Ok(())
    }

    fn write_guest(&mut self, offset: u64, words: &[u64]) -> Result<(), BackendError> {
        check_guest_access(self.pages(), offset, words.len())
            .map_err(|e| BackendError::new(&self.name, "write_guest", e))?;
        for (m, &w) in self.memory()[offset as usize / 8..].iter().zip(words) {
            // Relaxed: guest data; the harvest that reports the page runs in
            // this thread, after.
            m.store(w, Ordering::Relaxed);
        }
        if self.inner.dirty_logging() && self.inner.dirty_ring_bytes().is_some() {
            // As the engine: no vCPU ring takes a host write (KVM would drop it).
            let why = KvmError::BadConfig(BadConfig::HostWriteWithDirtyRing);
            return Err(self.fail("write_guest", why));
        }
        if self.inner.dirty_logging() {
            let (first, last) = (offset / PAGE_SIZE, (offset + words.len() as u64 * 8 - 1) / PAGE_SIZE);
            (first..=last).for_each(|p| self.host_dirty.mark(p));
        }
        Ok(())
    }
}

impl<V: DerefMut<Target = KvmVm>> DirtyLog for KvmBackendVm<V> {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            protect: self.protect,
            dirty_ring: self.inner.dirty_ring_bytes().map(RingEntries::of_bytes),
            mmu_figures: false,
        }
    }

    fn set_dirty_logging(&mut self, on: bool) -> Result<(), BackendError> {
        let vm = &mut *self.inner;
        let r = if on { vm.enable_dirty_logging() } else { vm.disable_dirty_logging() };
        r.map(|_| ()).map_err(|e| self.fail("setting dirty logging", e))?;
        // KVM starts each log afresh; so does the host's.
        self.host_dirty.clear_all();
        Ok(())
    }

    fn get_dirty_log(&mut self, bitmap: &mut [u64]) -> Result<u64, BackendError> {
        self.inner.get_dirty_log(bitmap).map_err(|e| self.fail("KVM_GET_DIRTY_LOG", e))?;
        let mut dirty = 0;
        for (i, w) in bitmap.iter_mut().enumerate() {
            *w |= if self.protect.is_manual() {
                self.host_dirty.peek_word(i)
            } else {
                self.host_dirty.take_word(i)
            };
            dirty += u64::from(w.count_ones());
        }
        Ok(dirty)
    }

    fn clear_dirty_log(&mut self, first_page: u64, bitmap: &[u64]) -> Result<(), BackendError> {
        self.inner.clear_dirty_log(first_page, bitmap).map_err(|e| self.fail("KVM_CLEAR_DIRTY_LOG", e))?;
        // KVM checked the range: `first_page` is a multiple of 64 inside the
        // slot and `bitmap` no longer than the rest.
        for (i, &mask) in bitmap.iter().enumerate() {
            self.host_dirty.clear_mask(first_page as usize / 64 + i, mask);
        }
        Ok(())
    }

    fn harvest_dirty_ring(&mut self, out: &mut Vec<u64>) -> Result<u64, BackendError> {
        if self.inner.dirty_ring_bytes().is_none() {
            return Err(self.fail("harvest_dirty_ring", BadConfig::NoDirtyRing.into()));
        }
        let before = out.len();
        self.ring.drain_into(out);
        collect_kvm_rings(&self.inner, out).map_err(|e| self.fail("harvest_dirty_ring", e))?;
        Ok((out.len() - before) as u64)
    }
}

impl BackendVm for KvmBackendVm<KvmScriptVm> {
    fn run_writes(&mut self, writes: &[(u64, u64)]) -> Result<(), BackendError> {
        let ring = &self.ring;
        let mut on_full = |vm: &KvmVm| collect_kvm_rings(vm, &mut ring.collected.lock());
        match self.inner.run_writes_with(writes, &mut on_full) {
            Ok(exits) => {
                self.ring.count_exits(exits);
                Ok(())
            }
            Err(e) => Err(self.fail("run_writes", e)),
        }
    }

    fn ring_full_exits(&self) -> u64 {
        self.ring.exits()
    }
}

impl PassWorkload for KvmBackendVm<KvmPerfVm> {
    fn release(&self, n: u64) {
        self.inner.release(n);
    }

    fn dirty_pace(&self) -> Arc<DirtyPace> {
        self.inner.dirty_pace().clone()
    }

    fn set_dirty_rate(&self, rate: Option<u64>) -> Result<(), BackendError> {
        self.inner.set_dirty_rate(rate).map_err(|e| self.fail("setting the dirty rate", e))
    }

    fn wait_passes(&self, since: u64) -> Result<u64, BackendError> {
        let since = vec![since; self.inner.config().vcpus as usize];
        // A vCPU whose ring is full waits for us: reap as a VMM's reaper
        // thread does, keeping the pages for the next harvest.
        let mut reap = || collect_kvm_rings(&self.inner, &mut self.ring.collected.lock());
        self.inner.wait_passes_reaping(&since, &mut reap).map_err(|e| self.fail("waiting for the passes", e))
    }

    fn cut(&self) -> Option<u64> {
        None
    }

    fn swept_pages(&self) -> u64 {
        self.pages()
    }

    fn passes_done(&self) -> u64 {
        self.inner.passes().into_iter().min().unwrap_or(0)
    }

    fn vcpu_passes(&self) -> Vec<u64> {
        self.inner.passes()
    }

    fn iteration_floor(&self) -> u64 {
        // A vCPU in or before pass `done + 1` stores `done + 1` (the pass
        // number it loaded into mm0 at the pass's start).
        self.passes_done() + 1
    }
}

/// How long a vCPU thread has to take its restored state.
const RESTORE_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);

impl VcpuControl for KvmBackendVm<KvmPerfVm> {
    fn vcpu_gate(&self) -> Arc<VcpuGate> {
        self.inner.gate().clone()
    }

    fn set_dirty_limit(&self, limit: Option<u64>) -> Result<(), BackendError> {
        self.inner.set_dirty_limit(limit).map_err(|e| self.fail("setting the dirty-limit", e))
    }

    fn restore_vcpus(&self, states: Vec<Vec<u8>>) -> Result<(), BackendError> {
        let words = crate::perf::PASS_VCPU_STATE_WORDS;
        check_vcpu_states(&states, self.inner.config().vcpus, &self.name, |s| {
            (s.len() == 8 * words).then_some(()).ok_or("not a KVM pass vCPU's state")
        })?;
        self.inner.gate().restore(states);
        if !self.inner.gate().wait_restored(RESTORE_WITHIN) {
            let why = VcpuStateError::NotTaken(RESTORE_WITHIN);
            return Err(BackendError::new(&self.name, "restoring the vCPUs", why));
        }
        Ok(())
    }

    fn stop(&mut self) -> Result<PassExtras, BackendError> {
        self.inner.stop().map_err(|e| self.fail("stopping the vCPUs", e))?;
        let figures = match self.inner.dirty_ring_bytes() {
            Some(_) => vec![("ring_full_exits", self.inner.ring_full_exits())],
            None => Vec::new(),
        };
        Ok(PassExtras { figures, ..PassExtras::default() })
    }
}

/// KVM shows userspace no fault of its vCPUs: nothing to time; the vCPU
/// threads see their holds and ring-full waits.
impl HarvestProbe for KvmBackendVm<KvmPerfVm> {
    fn vcpu_losses(&self) -> Vec<VcpuLoss> {
        self.inner.vcpu_losses()
    }
}

//! The engine as a `vmm` [`Backend`]: [`EngineBackend`] builds engine VMs in
//! either design; [`EngineVm`] is one, with what runs in it (one vCPU for
//! host-chosen stores, or the passes' vCPU threads of
//! [`crate::passes::EnginePasses`]).

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use crate::guest::{GuestOp, Script};
use crate::memory::HostMemory;
use crate::memslot::{MemFlags, UserMemoryRegion};
use crate::passes::{EnginePassVm, PassesError};
use crate::vcpu::{Vcpu, VcpuExit};
use crate::vm::{Vm, VmConfig};
use shadow_mmu_vmm::{
    Backend, BackendError, BackendVm, Capabilities, DirtyLog, DirtyLogProtect, GuestMemory, PassSpec, PassVm,
    RingEntries, RingState,
};

/// Collects every ring of `vm` (the test slot's offsets into `out`), then
/// resets them.
pub(crate) fn collect_engine_rings(vm: &Vm, out: &mut Vec<u64>) -> Result<(), crate::DirtyRingError> {
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
    pub dirty_ring: Option<RingEntries>,
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
        let (vm, mem) = vm_with_memory(self.config.clone(), guest_bytes, false)
            .map_err(|e| BackendError::new(&name, "creating the VM", e))?;
        if let Some(n) = self.dirty_ring {
            vm.enable_dirty_ring(n.bytes())
                .map_err(|e| BackendError::new(&name, "enabling the dirty ring", e))?;
        }
        let vcpu = vm.create_vcpu(0).map_err(|e| BackendError::new(&name, "creating the vCPU", e))?;
        Ok(Box::new(EngineVm { name, vm, mem, work: vcpu, ring: Arc::default() }))
    }

    fn start_passes(&self, spec: &PassSpec) -> Result<Box<dyn PassVm>, BackendError> {
        let name = self.name();
        let vm = EnginePassVm::start(name.clone(), self.config.clone(), self.dirty_ring, spec)
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
    /// Shared with the passes' vCPU threads, which reap their own rings
    /// into it under a dirty-limit.
    pub(crate) ring: Arc<RingState>,
}

impl<W> EngineVm<W> {
    pub(crate) fn fail(
        &self,
        op: &'static str,
        e: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> BackendError {
        BackendError::new(&self.name, op, e)
    }
}

impl<W> GuestMemory for EngineVm<W> {
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
}

/// What runs in an [`EngineVm`], told when dirty logging goes on or off
/// (the passes' lock faults run only while it is on).
pub trait EngineWork {
    /// Dirty logging of the test slot of `vm` was just turned on (`true`)
    /// or off.
    fn logging_changed(&mut self, vm: &Vm, on: bool) {
        let _ = (vm, on);
    }
}

impl EngineWork for Vcpu {}

impl<W: EngineWork> DirtyLog for EngineVm<W> {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            protect: self.vm.dirty_log_protect(),
            dirty_ring: self.vm.dirty_ring_entries().map(RingEntries),
            mmu_figures: true,
        }
    }

    fn set_dirty_logging(&mut self, on: bool) -> Result<(), BackendError> {
        let r = if on { self.vm.enable_dirty_logging(0) } else { self.vm.disable_dirty_logging(0) };
        r.map_err(|e| self.fail("setting dirty logging", e))?;
        self.work.logging_changed(&self.vm, on);
        Ok(())
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

/// A VM with one slot of `guest_bytes` at guest physical 0. With
/// `populate`, over pre-populated host memory: the first pass then measures
/// shadow page faults, not the host kernel's first-touch faults (which would
/// also make whichever design runs first look slower).
pub fn vm_with_memory(
    config: VmConfig,
    guest_bytes: u64,
    populate: bool,
) -> Result<(Vm, Arc<HostMemory>), PassesError> {
    let vm = Vm::new(config)?;
    let mem = if populate {
        HostMemory::anonymous_populated(guest_bytes)?
    } else {
        HostMemory::anonymous(guest_bytes)?
    };
    vm.set_user_memory_region(UserMemoryRegion {
        slot: 0,
        flags: MemFlags::empty(),
        guest_phys_addr: 0,
        memory_size: guest_bytes,
        memory: Some(mem.clone()),
        memory_offset: 0,
    })?;
    Ok((vm, mem))
}

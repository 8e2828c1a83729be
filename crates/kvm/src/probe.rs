//! What KVM this machine has, and whether the KVM runs can use it.
//!
//! [`probe`] opens `/dev/kvm`, checks `KVM_GET_API_VERSION`, creates a VM,
//! reads the dirty-log capabilities, names the flavour from the loaded
//! modules (`/sys/module/kvm_pvm`, `kvm_intel`, `kvm_amd`) and then *runs*
//! a tiny guest ([`crate::guest::probe_program`]) whose first instruction,
//! `movd mm0, eax`, is one that hardware executes and KVM's instruction
//! emulator does not implement: a ucall means the guest runs on the CPU, an
//! emulation failure means plain guests are executed by the emulator (as on
//! PVM, "Pagetable-based Virtual Machine", for a guest that is not
//! PVM-aware).
//!
//! Invariants: [`probe`] never fails or panics; whatever goes wrong makes
//! [`Probe::usable`] an `Err` with the reason, and its `Display` is one line
//! (the line tools print before their KVM runs, or instead of them).

use std::fmt;
use std::path::Path;

use kvm_bindings::{
    KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
};

use shadow_mmu_core::spte::PAGE_SIZE;
use shadow_mmu_vmm::error_chain;

use crate::error::{KvmError, UnexpectedExit};
use crate::guest::{Program, UCALL_PROBE, probe_program};
use crate::vm::{GuestExit, KvmVm, VmSetup, open_vm};

/// Which KVM module runs the guests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    /// PVM (`kvm_pvm`): guests run de-privileged on page tables, without
    /// hardware virtualisation.
    Pvm,
    /// Intel VT-x (`kvm_intel`).
    Vmx,
    /// AMD-V (`kvm_amd`).
    Svm,
    /// None of the above is loaded.
    Unknown,
}

impl Flavour {
    /// The module's name.
    pub fn module(self) -> &'static str {
        match self {
            Flavour::Pvm => "kvm_pvm",
            Flavour::Vmx => "kvm_intel",
            Flavour::Svm => "kvm_amd",
            Flavour::Unknown => "kvm",
        }
    }
}

/// How the probe guest's instructions were executed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Execution {
    /// On the CPU (`movd` ran).
    Hardware,
    /// By KVM's instruction emulator (`movd` failed with
    /// `KVM_INTERNAL_ERROR_EMULATION`).
    Emulated,
    /// Not found out (KVM unusable, or the probe guest exited otherwise).
    Unknown,
}

/// The dirty-logging capabilities, as `KVM_CHECK_EXTENSION` on a VM
/// returns them (0: not supported).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`: the supported flags
    /// (`KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE` = 1, `INITIALLY_SET` = 2).
    pub manual_dirty_log_protect2: i32,
    /// `KVM_CAP_DIRTY_LOG_RING`: the largest ring, in bytes.
    pub dirty_log_ring: i32,
    /// `KVM_CAP_DIRTY_LOG_RING_ACQ_REL`: the same, for the acquire/release
    /// ring protocol.
    pub dirty_log_ring_acq_rel: i32,
}

/// What [`probe`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// `Ok` when the KVM runs can go ahead, else why not: the error and its
    /// causes, one line.
    pub usable: Result<(), String>,
    /// The KVM flavour.
    pub flavour: Flavour,
    /// Two-dimensional paging (EPT / NPT module parameter), where the
    /// flavour has one.
    pub tdp: Option<bool>,
    /// How guest instructions run.
    pub execution: Execution,
    /// Are vCPU timings comparable with hardware-virtualised shadow
    /// paging? Only for a guest on the CPU with TDP off.
    pub vcpu_timings_comparable: bool,
    /// Dirty-logging capabilities.
    pub caps: Capabilities,
}

impl Probe {
    /// Can the KVM runs go ahead?
    pub fn is_usable(&self) -> bool {
        self.usable.is_ok()
    }

    /// Does this KVM offer `KVM_CLEAR_DIRTY_LOG` (manual protect)?
    pub fn has_manual_protect(&self) -> bool {
        self.caps.manual_dirty_log_protect2 & kvm_bindings::KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE as i32 != 0
    }

    /// Does KVM have the dirty ring with acquire/release ordering
    /// (`KVM_CAP_DIRTY_LOG_RING_ACQ_REL`)?
    pub fn has_dirty_ring(&self) -> bool {
        self.caps.dirty_log_ring_acq_rel > 0
    }
}

fn module_loaded(name: &str) -> bool {
    Path::new("/sys/module").join(name).exists()
}

/// A `Y`/`N` (or `1`/`0`) module parameter.
fn module_flag(module: &str, param: &str) -> Option<bool> {
    let v =
        std::fs::read_to_string(Path::new("/sys/module").join(module).join("parameters").join(param)).ok()?;
    match v.trim() {
        "Y" | "y" | "1" => Some(true),
        "N" | "n" | "0" => Some(false),
        _ => None,
    }
}

fn flavour() -> (Flavour, Option<bool>) {
    if module_loaded("kvm_pvm") {
        (Flavour::Pvm, None)
    } else if module_loaded("kvm_intel") {
        (Flavour::Vmx, module_flag("kvm_intel", "ept"))
    } else if module_loaded("kvm_amd") {
        (Flavour::Svm, module_flag("kvm_amd", "npt"))
    } else {
        (Flavour::Unknown, None)
    }
}

fn capabilities() -> Result<Capabilities, KvmError> {
    let vm = open_vm()?;
    Ok(Capabilities {
        manual_dirty_log_protect2: vm.check_extension_raw(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2.into()),
        dirty_log_ring: vm.check_extension_raw(KVM_CAP_DIRTY_LOG_RING.into()),
        dirty_log_ring_acq_rel: vm.check_extension_raw(KVM_CAP_DIRTY_LOG_RING_ACQ_REL.into()),
    })
}

/// Runs the probe guest: how are its instructions executed?
fn execution() -> Result<Execution, KvmError> {
    let vm = KvmVm::new(VmSetup {
        control_bytes: PAGE_SIZE,
        test_bytes: PAGE_SIZE,
        protect: shadow_mmu_vmm::DirtyLogProtect::Auto,
        populate: false,
        dirty_ring_bytes: None,
    })?;
    vm.write_control(0, &probe_program()?)?;
    let mut vcpu = vm.create_vcpu(0, 0, [0; 8])?;
    match vcpu.run()? {
        GuestExit::Ucall(UCALL_PROBE) => Ok(Execution::Hardware),
        GuestExit::EmulationFailure => Ok(Execution::Emulated),
        exit => Err(UnexpectedExit::Exit { vcpu: vcpu.id(), program: Program::Probe, exit }.into()),
    }
}

/// The probe, run once per process ([`probe`]).
pub fn probed() -> &'static Probe {
    static PROBE: std::sync::OnceLock<Probe> = std::sync::OnceLock::new();
    PROBE.get_or_init(probe)
}

/// The environment variable that turns every KVM skip of a test suite into
/// a failure: set it to `1` where `/dev/kvm` is usable (CI does), so that a
/// green run cannot hide missing KVM coverage.
pub const REQUIRE_KVM: &str = "SHADOW_MMU_REQUIRE_KVM";

/// For test suites: whether KVM can run them here. Where it cannot, prints
/// one line saying why and returns `false` (the test then passes without
/// running), unless [`REQUIRE_KVM`] is `1`: then it panics with the reason.
pub fn usable_or_skip() -> bool {
    match &probed().usable {
        Ok(()) => true,
        Err(why) if std::env::var(REQUIRE_KVM).is_ok_and(|v| v == "1") => {
            panic!("{REQUIRE_KVM}=1, and KVM cannot run here: {why}")
        }
        Err(why) => {
            println!("skipped: {why}");
            false
        }
    }
}

/// Probes `/dev/kvm` (module docs).
pub fn probe() -> Probe {
    let (flavour, tdp) = flavour();
    let mut p = Probe {
        usable: Ok(()),
        flavour,
        tdp,
        execution: Execution::Unknown,
        vcpu_timings_comparable: false,
        caps: Capabilities::default(),
    };
    let found = capabilities().and_then(|caps| {
        p.caps = caps;
        execution()
    });
    match found {
        Ok(e) => p.execution = e,
        // The report is a line for people: the error and its causes.
        Err(KvmError::Unavailable(why)) => p.usable = Err(error_chain(&why)),
        Err(e) => p.usable = Err(format!("a test guest does not run: {}", error_chain(&e))),
    }
    p.vcpu_timings_comparable = p.execution == Execution::Hardware && p.tdp == Some(false);
    p
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Err(why) = &self.usable {
            return write!(f, "kvm: unavailable: {why}; KVM runs skipped");
        }
        let module = self.flavour.module();
        match (self.flavour, &self.execution) {
            (Flavour::Pvm, Execution::Emulated) => write!(
                f,
                "kvm: PVM ({module}): plain guests run in KVM's instruction emulator; vCPU timings are not comparable"
            )?,
            (_, Execution::Emulated) => write!(
                f,
                "kvm: {:?} ({module}): guests run in KVM's instruction emulator; vCPU timings are not comparable",
                self.flavour
            )?,
            (_, _) if self.vcpu_timings_comparable => write!(
                f,
                "kvm: {:?} ({module}), shadow paging (TDP off): guests run on the CPU; vCPU timings are comparable",
                self.flavour
            )?,
            (_, Execution::Hardware) => write!(
                f,
                "kvm: {:?} ({module}), TDP {}: guests run on the CPU without shadow paging; vCPU timings are not comparable",
                self.flavour,
                match self.tdp {
                    Some(true) => "on",
                    _ => "unknown",
                }
            )?,
            (_, Execution::Unknown) => write!(
                f,
                "kvm: {:?} ({module}): execution unknown; vCPU timings are not comparable",
                self.flavour
            )?,
        }
        let ring = if self.caps.dirty_log_ring > 0 {
            format!("up to {} bytes", self.caps.dirty_log_ring)
        } else {
            "no".into()
        };
        write!(
            f,
            " (manual dirty log protect: {}, dirty ring: {ring})",
            if self.has_manual_protect() { "yes" } else { "no" }
        )
    }
}

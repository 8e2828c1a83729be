//! The KVM backend of `bench migrate-perf`: the same workload, through the
//! same procedure (`shadow_mmu_testkit::perf::migrate_perf` over the `Backend` trait),
//! on the machine's `/dev/kvm` (crate `shadow-mmu-kvm`), reported like the
//! engine's runs. What is KVM's own here is the probe and its details.

use serde_json::{Value, json};
use shadow_mmu_kvm::Probe;

use shadow_mmu_vmm::{DirtyLogInterface, HarvestSpec};

use super::args::MigratePerfArgs;
use super::run::{Record, backend_run};
use crate::backend_kind::BackendKind;
use crate::cmd::bench::BenchResult;
use crate::output::Progress;

/// The machine's KVM, as probed once per run.
pub struct KvmBench(Probe);

impl KvmBench {
    /// Probes `/dev/kvm`.
    pub fn probe() -> Self {
        Self(shadow_mmu_kvm::probe())
    }

    /// One line: usable or not and why, emulated or not.
    pub fn describe(&self) -> String {
        self.0.to_string()
    }

    /// Can we run on it?
    pub fn usable(&self) -> bool {
        self.0.is_usable()
    }

    /// Of `specs`, those KVM runs: `get` as the classic `KVM_GET_DIRTY_LOG`,
    /// `clear` with manual protect (where the kernel has it), each with one
    /// harvest thread (KVM's harvest is one ioctl). `say` gets a line for
    /// each one skipped, and why.
    pub fn runnable(&self, specs: &[HarvestSpec], say: &dyn Fn(String)) -> Vec<HarvestSpec> {
        let mut v = Vec::new();
        for s in specs {
            let why = match s.interface {
                _ if s.harvest_threads != 1 => continue,
                DirtyLogInterface::Clear if !self.0.has_manual_protect() => {
                    Some("KVM has no KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2")
                }
                _ => None,
            };
            match why {
                Some(why) => say(format!("(KVM, --dirty-log {}: skipped: {why})", s.label())),
                None => v.push(*s),
            }
        }
        v
    }

    /// One migrate-perf run on KVM.
    pub fn run(
        &self,
        a: &MigratePerfArgs,
        p: &Progress,
        guest_bytes: u64,
        spec: &HarvestSpec,
    ) -> BenchResult<Record> {
        let manual_protect = spec.interface == DirtyLogInterface::Clear;
        let header = format!(
            "== backend=kvm ({}) dirty-log={} vcpus={} guest={} MiB ({} MiB per vCPU){}",
            self.0.flavour.module(),
            spec.label(),
            a.vcpus,
            guest_bytes >> 20,
            (guest_bytes / u64::from(a.vcpus)) >> 20,
            if manual_protect { ", KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2" } else { "" }
        );
        let Value::Object(details) = json!({
            "write_pct": a.write_pct,
            "random": a.random,
            "kvm": self.describe(),
            "flavour": self.0.flavour.module(),
            "vcpu_timings_comparable": self.0.vcpu_timings_comparable,
            "manual_protect": manual_protect,
        }) else {
            unreachable!("an object")
        };
        let mode = match spec.interface {
            DirtyLogInterface::Ring => "dirty-ring",
            _ if manual_protect => "manual-protect",
            _ => "classic",
        };
        let backend = BackendKind::Kvm.backend(&Default::default(), spec);
        let rec = backend_run(a, p, &*backend, "kvm", mode.to_string(), spec, guest_bytes, header, details)?;
        if !self.0.vcpu_timings_comparable {
            p.line(
                "(KVM's vCPU times above come from its instruction emulator: not comparable with the engine)",
            );
        }
        Ok(rec)
    }
}

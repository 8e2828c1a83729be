//! The KVM backend of `bench migrate-perf`: the same workload on the
//! machine's `/dev/kvm` (crate `shadow-mmu-kvm`), reported like the engine's
//! runs. The driver knows nothing of the engine; the report does not need to
//! know which backend it prints.

use serde_json::json;
use shadow_mmu_kvm::{KvmPerfConfig, Probe};

use super::migrate_perf::{MigratePerfArgs, Record, print_summary};
use super::{BenchResult, Progress, secs};

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

    /// The modes to run: the classic `KVM_GET_DIRTY_LOG` (harvest and
    /// write-protect in one call, as the engine's `get_dirty_log`), and
    /// manual protect (`KVM_GET_DIRTY_LOG` copies, `KVM_CLEAR_DIRTY_LOG`
    /// write-protects) where the kernel has it.
    pub fn modes(&self) -> Vec<bool> {
        if self.0.has_manual_protect() { vec![false, true] } else { vec![false] }
    }

    /// One migrate-perf run on KVM.
    pub fn run(
        &self,
        a: &MigratePerfArgs,
        p: &Progress,
        guest_bytes: u64,
        manual_protect: bool,
    ) -> BenchResult<Record> {
        let cfg = KvmPerfConfig {
            vcpus: a.vcpus,
            guest_bytes,
            write_pct: a.write_pct,
            random: a.random,
            seed: a.seed,
            manual_protect,
        };
        p.line(format!(
            "== backend=kvm ({}) vcpus={} guest={} MiB ({} MiB per vCPU){}",
            self.0.flavour.module(),
            a.vcpus,
            guest_bytes >> 20,
            (guest_bytes / u64::from(a.vcpus)) >> 20,
            if manual_protect { ", KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2" } else { "" }
        ));
        let r = shadow_mmu_kvm::migrate_perf(&cfg, a.iterations, |i, it| {
            p.line(format!("Iteration {i} dirty memory time: {}", secs(it.dirty_memory_ns)));
            p.line(format!("Iteration {i} get dirty log time: {}", secs(it.get_dirty_log_ns)));
            if let Some(ns) = it.clear_dirty_log_ns {
                p.line(format!("Iteration {i} clear dirty log time: {}", secs(ns)));
            }
            p.step(format!("kvm {} MiB", guest_bytes >> 20));
        })?;
        let rec = Record {
            backend: "kvm",
            mmu: if manual_protect { "manual-protect" } else { "classic" }.to_string(),
            vcpus: a.vcpus,
            guest_bytes,
            floor_ns_per_page: testkit::perf::cmpxchg_floor(r.dirty_pages_avg()),
            latency: None,
            fault_heavy_faults_per_sec: None,
            run: r,
            extra: json!({
                "write_pct": a.write_pct,
                "random": a.random,
                "kvm": self.describe(),
                "flavour": self.0.flavour.module(),
                "vcpu_timings_comparable": self.0.vcpu_timings_comparable,
                "manual_protect": manual_protect,
            }),
        };
        p.line(format!("Populate memory time: {}", secs(rec.run.populate_ns)));
        p.line(format!("Enabling dirty logging time: {}", secs(rec.run.enable_dirty_logging_ns)));
        print_summary(p, &rec);
        if !self.0.vcpu_timings_comparable {
            p.line(
                "(KVM's vCPU times above come from its instruction emulator: not comparable with the engine)",
            );
        }
        Ok(rec)
    }
}

//! `shadow-mmu bench pace`: how closely a guest keeps the dirty rate asked
//! of it (`--dirty-rate-mibps`), with nothing else running: the engine's
//! guest paced at its chunk exits, KVM's by its calibrated delay loop.
//! For each backend and vCPU count, the guest runs flat out, then at each
//! rate in turn; each rate settles, then the rate reached is measured.

use std::time::Duration;

use clap::Args;
use serde_json::json;
use shadow_mmu_engine::VmConfig;
use shadow_mmu_vmm::{HarvestSpec, PassSpec, ReachedRate, error_chain};

use super::BenchResult;
use crate::backend_kind::BackendKind;

const MIB: u64 = 1 << 20;

#[derive(Debug, Args)]
pub struct PaceArgs {
    /// Backends, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "engine,kvm")]
    pub backend: Vec<BackendKind>,
    /// vCPU counts, comma-separated: each sweeps its slice of the guest.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub vcpus: Vec<u32>,
    /// Guest memory, MiB.
    #[arg(long, default_value_t = 1024)]
    pub guest_mib: u64,
    /// Rates asked for, MiB/s, comma-separated, in this order.
    #[arg(long, value_delimiter = ',', default_value = "100,300,600,800,1000")]
    pub dirty_rate_mibps: Vec<u64>,
    /// How long each rate settles before it is measured (the KVM guest
    /// calibrates its delay and corrects it meanwhile), ms.
    #[arg(long, default_value_t = 1000)]
    pub settle_ms: u64,
    /// How long each rate is measured, ms.
    #[arg(long, default_value_t = 1000)]
    pub measure_ms: u64,
    /// Write every measure as JSON here.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

/// Runs the bench: one line per backend, vCPU count and rate.
pub fn main(a: &PaceArgs) -> BenchResult {
    let mut runs = Vec::new();
    println!("backend vcpus    asked MiB/s  reached MiB/s  reached/asked");
    for &backend in &a.backend {
        if backend == BackendKind::Kvm
            && let Err(why) = &shadow_mmu_kvm::probed().usable
        {
            println!("(KVM: skipped: {why})");
            continue;
        }
        for &vcpus in &a.vcpus {
            let spec = PassSpec::sweep(vcpus, a.guest_mib * MIB, 1);
            let b = backend.backend(&VmConfig::default(), &HarvestSpec::default());
            let vm = b.start_passes(&spec).map_err(|e| error_chain(&e))?;
            vm.release(u64::MAX);
            let pace = vm.dirty_pace();
            let measure = || {
                let r = ReachedRate::start(&pace);
                std::thread::sleep(Duration::from_millis(a.measure_ms));
                r.bytes_per_s(&pace) / MIB as f64
            };
            std::thread::sleep(Duration::from_millis(a.settle_ms));
            let flat = measure();
            println!("{:<7} {vcpus:>5} {:>12} {flat:>14.1}", backend.name(), "flat out");
            runs.push(json!({"backend": backend.name(), "vcpus": vcpus, "asked_mibps": null, "reached_mibps": flat}));
            for &asked in &a.dirty_rate_mibps {
                vm.set_dirty_rate(Some(asked * MIB)).map_err(|e| error_chain(&e))?;
                std::thread::sleep(Duration::from_millis(a.settle_ms));
                let reached = measure();
                let ratio = reached / asked as f64;
                println!("{:<7} {vcpus:>5} {asked:>12} {reached:>14.1} {ratio:>14.3}", backend.name());
                runs.push(json!({
                    "backend": backend.name(), "vcpus": vcpus, "asked_mibps": asked, "reached_mibps": reached,
                }));
            }
        }
    }
    if let Some(path) = &a.json {
        let cmd: Vec<String> = std::env::args().collect();
        std::fs::write(
            path,
            serde_json::to_string_pretty(&json!({"command": cmd.join(" "), "runs": runs}))?,
        )?;
    }
    Ok(true)
}

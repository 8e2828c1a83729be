//! `shadow-mmu dirty-log-test`: KVM's `dirty_log_test`, in its words, on
//! the engine (each design) and on the machine's KVM, through the testkit's
//! one procedure (`shadow_mmu_testkit::dirty_log_test`).

use std::time::Duration;

use crate::backend_kind::BackendKind;
use clap::{Args, ValueEnum};
use shadow_mmu_core::spte::PAGE_SIZE;
use shadow_mmu_engine::{MmuDesign, VmConfig};
use shadow_mmu_testkit::dirty_log_test::dirty_log_test;
use shadow_mmu_vmm::{Backend, PassSpec};
use shadow_mmu_vmm::{DirtyLogInterface, HarvestSpec};

/// `dirty_log_test -M`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// `KVM_GET_DIRTY_LOG`.
    DirtyLog,
    /// `KVM_GET_DIRTY_LOG` then `KVM_CLEAR_DIRTY_LOG` (manual protect).
    ClearLog,
    /// The dirty ring.
    DirtyRing,
    /// Each of the three in turn.
    All,
}

#[derive(Debug, Args)]
pub struct DirtyLogTestArgs {
    /// The dirty-log mode (`-M`).
    #[arg(short = 'M', long, value_enum, default_value = "all")]
    pub mode: Mode,
    /// Iterations (`-i`).
    #[arg(short = 'i', long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub iterations: u32,
    /// Milliseconds per iteration; the first reap comes at a random point of
    /// it (`-I`).
    #[arg(short = 'I', long, default_value_t = 10)]
    pub interval_ms: u64,
    /// Ring entries for the dirty ring (`-c`).
    #[arg(short = 'c', long, default_value_t = 65536)]
    pub ring_entries: u32,
    /// Backends, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "engine,kvm")]
    pub backend: Vec<BackendKind>,
    /// The `tdp` design's knobs; the other designs ignore them.
    #[command(flatten)]
    pub tdp: crate::tdp_args::TdpKnobs,
    /// The engine's designs, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "locked,lockless,rmap-lock,tdp")]
    pub mmu: Vec<MmuDesign>,
    /// Pages of the slot: dirty_log_test's 1 GiB + 3 pages, on purpose not a
    /// multiple of 64.
    #[arg(long, default_value_t = (1 << 18) + 3)]
    pub guest_pages: u64,
    /// Seed of the guest's and the host's random choices.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

fn specs(a: &DirtyLogTestArgs) -> Vec<(&'static str, HarvestSpec)> {
    let spec = |interface| HarvestSpec {
        interface,
        clear_chunk_pages: a.guest_pages.next_multiple_of(64),
        ring_entries: a.ring_entries,
        ..HarvestSpec::default()
    };
    let all = [
        (Mode::DirtyLog, "dirty-log", spec(DirtyLogInterface::Get)),
        (Mode::ClearLog, "clear-log", spec(DirtyLogInterface::Clear)),
        (Mode::DirtyRing, "dirty-ring", spec(DirtyLogInterface::Ring)),
    ];
    all.into_iter().filter(|(m, _, _)| a.mode == Mode::All || a.mode == *m).map(|(_, n, s)| (n, s)).collect()
}

pub fn main(a: &DirtyLogTestArgs) -> Result<bool, Box<dyn std::error::Error>> {
    if a.guest_pages == 0 || a.guest_pages > 1 << 19 {
        return Err(format!("--guest-pages {}: 1 to 524288 (2 GiB, KVM's test slot)", a.guest_pages).into());
    }
    let mut ok = true;
    let probe = a.backend.contains(&BackendKind::Kvm).then(shadow_mmu_kvm::probe);
    for (mode, spec) in specs(a) {
        spec.validate()?;
        let mut backends: Vec<(String, Box<dyn Backend>)> = Vec::new();
        if a.backend.contains(&BackendKind::Engine) {
            for &mmu in &a.mmu {
                let engine = VmConfig {
                    mmu,
                    eager_page_split: a.tdp.eager_page_split(),
                    pml: a.tdp.pml && mmu == MmuDesign::Tdp,
                    ..VmConfig::default()
                };
                backends.push((format!("engine mmu={mmu}"), BackendKind::Engine.backend(&engine, &spec)));
            }
        }
        match &probe {
            Some(p) if !p.is_usable() => println!("(KVM: skipped: {p})"),
            Some(p) if spec.interface == DirtyLogInterface::Clear && !p.has_manual_protect() => {
                println!("(KVM, {mode}: skipped: no KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)");
            }
            Some(_) => backends.push(("kvm".into(), BackendKind::Kvm.backend(&VmConfig::default(), &spec))),
            None => {}
        }
        for (name, backend) in backends {
            println!(
                "== dirty-log-test: backend={name} mode={mode} pages={} iterations={}",
                a.guest_pages, a.iterations
            );
            let pass = PassSpec { random: true, ..PassSpec::sweep(1, a.guest_pages * PAGE_SIZE, a.seed) };
            let mut vm = backend.start_passes(&pass)?;
            let r = dirty_log_test(
                vm.as_mut(),
                &spec,
                a.iterations,
                Duration::from_millis(a.interval_ms),
                a.seed,
                |i, c| {
                    println!(
                        "Iteration {i:2}: dirty: {:<6} clean: {:<6} writes: {:<6}",
                        c.dirty, c.clean, c.writes
                    );
                },
            );
            match r {
                Ok(r) => {
                    println!("Total bits checked: dirty ({}), clear ({})", r.dirty_checked, r.clear_checked)
                }
                Err(e) => {
                    println!("FAILED: {}", crate::report::error_chain(&e));
                    ok = false;
                }
            }
        }
    }
    Ok(ok)
}

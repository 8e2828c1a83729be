//! A steady dirty rate inside passes, on both backends: a paced guest never
//! stores faster than its rate (plus a chunk a vCPU), spreads its stores
//! over the pass instead of making it at full speed, and counts what it
//! stored; unpaced, it runs flat out. Only upper bounds on speed are
//! asserted: a loaded host makes a guest slower, never faster.

use std::time::{Duration, Instant};

use shadow_mmu_engine::EngineBackend;
use shadow_mmu_kvm::{KvmBackend, usable_or_skip};
use shadow_mmu_vmm::{Backend, PACE_CHUNK_PAGES, PassSpec, PassVm, chunk_bytes};

const MIB: u64 = 1 << 20;

fn spec() -> PassSpec {
    PassSpec::sweep(2, 64 * MIB, 3)
}

/// At 16 MiB/s a pass of 64 MiB takes 4 s: after 300 ms the guest has
/// stored at most 16 MiB/s times the time, plus a chunk and an oversleep a
/// vCPU, and no pass is done; the rate off, it completes passes.
fn paced_then_flat_out(vm: Box<dyn PassVm>, what: &str) {
    let rate = 16 * MIB;
    vm.release(1);
    vm.wait_passes(0).unwrap();
    let pace = vm.dirty_pace();
    vm.set_dirty_rate(Some(rate)).unwrap();
    let (stored, t) = (pace.stored(), Instant::now());
    vm.release(u64::MAX);
    std::thread::sleep(Duration::from_millis(300));
    let (got, took) = (pace.stored() - stored, t.elapsed());
    let slack = 2 * 2 * chunk_bytes(PACE_CHUNK_PAGES, 100);
    let most = (rate as f64 * took.as_secs_f64()) as u64 + slack;
    assert!(got > 0 && got <= most, "{what}: {got} bytes stored in {took:?}, at most {most}");
    assert_eq!(vm.passes_done(), 1, "{what}: no pass at full speed");
    vm.set_dirty_rate(None).unwrap();
    vm.wait_passes(2).unwrap();
    assert!(pace.stored() - stored >= 2 * 64 * MIB, "{what}: flat out, every store counted");
}

#[test]
fn a_paced_guest_keeps_its_rate_inside_the_pass() {
    paced_then_flat_out(EngineBackend::default().start_passes(&spec()).unwrap(), "engine");
    if usable_or_skip() {
        paced_then_flat_out(KvmBackend::default().start_passes(&spec()).unwrap(), "kvm");
    }
}

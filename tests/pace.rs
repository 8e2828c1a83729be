//! A steady dirty rate inside passes, on both backends: a paced guest never
//! stores faster than its rate (plus a chunk a vCPU), spreads its stores
//! over the pass instead of making it at full speed, and counts what it
//! stored; unpaced, it runs flat out. Only upper bounds on speed are
//! asserted: a loaded host makes a guest slower, never faster, with one
//! exception, KVM's delay loop. It is calibrated under whatever runs
//! beside it, and runs faster once that load goes, until the pacer's
//! corrections catch up (`shadow_mmu_kvm::delay`). So these tests run one
//! at a time (`serial`), and KVM's paced guest is held to the tolerance of
//! that feedback, half again its rate, as in `crates/kvm/tests/delay.rs`.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use shadow_mmu_engine::EngineBackend;
use shadow_mmu_kvm::{KvmBackend, usable_or_skip};
use shadow_mmu_vmm::{
    Backend, DirtyLogProtect, PACE_CHUNK_PAGES, PassSpec, PassVm, RingEntries, chunk_bytes,
};

const MIB: u64 = 1 << 20;

/// One test of this file at a time (module docs): a KVM guest calibrated
/// beside another test's vCPUs would speed up when that test ends.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

fn spec() -> PassSpec {
    PassSpec::sweep(2, 64 * MIB, 3)
}

/// At 16 MiB/s a pass of 64 MiB takes 4 s: after 300 ms the guest has
/// stored at most `over` times 16 MiB/s times the time (1 where the vCPU
/// threads sleep out each chunk's share, module docs otherwise), plus a
/// chunk and an oversleep a vCPU, and no pass is done; the rate off, it
/// completes passes.
fn paced_then_flat_out(vm: Box<dyn PassVm>, what: &str, over: f64) {
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
    let most = (over * rate as f64 * took.as_secs_f64()) as u64 + slack;
    assert!(got > 0 && got <= most, "{what}: {got} bytes stored in {took:?}, at most {most}");
    assert_eq!(vm.passes_done(), 1, "{what}: no pass at full speed");
    vm.set_dirty_rate(None).unwrap();
    vm.wait_passes(2).unwrap();
    assert!(pace.stored() - stored >= 2 * 64 * MIB, "{what}: flat out, every store counted");
}

#[test]
fn a_paced_guest_keeps_its_rate_inside_the_pass() {
    let _serial = serial();
    paced_then_flat_out(EngineBackend::default().start_passes(&spec()).unwrap(), "engine", 1.0);
    if usable_or_skip() {
        paced_then_flat_out(KvmBackend::default().start_passes(&spec()).unwrap(), "kvm", 1.5);
    }
}

/// Entries of the rings of the dirty-limit test: 4 MiB of pages, and room
/// for KVM's reserve with PML.
const RING: u32 = 1024;

/// QEMU's dirty-limit with the dirty ring: no one reaps but the vCPUs
/// themselves, at their ring-full exits, where they are held. At 4 MiB/s a
/// vCPU, in the time measured a vCPU dirties at most its limit's share
/// plus two rings (its first fill, before the measure opens, and the one
/// it is filling); every page reaped is in the next harvest; and once the
/// limit is lifted, the held vCPUs go at once and the passes complete.
fn held_at_ring_full(mut vm: Box<dyn PassVm>, what: &str) {
    let (limit, vcpus) = (4 * MIB, 2u64);
    vm.set_dirty_logging(true).unwrap();
    vm.set_dirty_limit(Some(limit)).unwrap();
    let t = Instant::now();
    vm.release(u64::MAX);
    std::thread::sleep(Duration::from_millis(400));
    let mut pages = Vec::new();
    vm.harvest_dirty_ring(&mut pages).unwrap();
    let took = t.elapsed();
    pages.sort_unstable();
    pages.dedup();
    let got = pages.len() as u64 * 4096;
    let most = vcpus * ((limit as f64 * took.as_secs_f64()) as u64 + 2 * u64::from(RING) * 4096);
    assert!(got > 0 && got <= most, "{what}: {got} bytes dirtied in {took:?}, at most {most}");
    assert_eq!(vm.passes_done(), 0, "{what}: no pass at full speed");
    let held: f64 = vm.vcpu_losses().iter().map(|l| l.throttle_ns as f64).sum();
    assert!(held > 0.0, "{what}: the vCPUs were held at their ring-full exits");
    // A pace far above the guest's speed keeps the chunk exits, without
    // which KVM on a host that emulates the stores overflows a ring that
    // fills (`DirtyPace::on`).
    vm.set_dirty_rate(Some(1 << 40)).unwrap();
    vm.set_dirty_limit(None).unwrap();
    vm.wait_passes(1).unwrap();
    vm.stop().unwrap();
}

#[test]
fn a_dirty_limit_holds_each_vcpu_at_its_ring_full_exit() {
    let _serial = serial();
    let spec = PassSpec::sweep(2, 128 * MIB, 3);
    let engine = EngineBackend { dirty_ring: Some(RingEntries(RING)), ..EngineBackend::default() };
    held_at_ring_full(engine.start_passes(&spec).unwrap(), "engine");
    if usable_or_skip() {
        let kvm = KvmBackend { protect: DirtyLogProtect::Auto, dirty_ring: Some(RingEntries(RING)) };
        held_at_ring_full(kvm.start_passes(&spec).unwrap(), "kvm");
    }
}

/// A dirty-limit of 64 KiB/s holds a vCPU four seconds a chunk: a pause
/// (a stop-and-copy's) must not wait that out, on either backend, with the
/// bitmaps (held at chunk exits) or the ring (at ring-full exits).
fn paused_while_held(vm: Box<dyn PassVm>, what: &str) {
    vm.set_dirty_limit(Some(64 << 10)).unwrap();
    vm.release(u64::MAX);
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    vm.vcpu_gate().pause(Duration::from_secs(3)).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(t.elapsed() < Duration::from_secs(1), "{what}: the pause took {:?}", t.elapsed());
    vm.vcpu_gate().resume();
}

#[test]
fn a_pause_ends_a_dirty_limit_s_hold() {
    let _serial = serial();
    let spec = PassSpec::sweep(2, 64 * MIB, 3);
    let ring = EngineBackend { dirty_ring: Some(RingEntries(RING)), ..EngineBackend::default() };
    for backend in [EngineBackend::default(), ring] {
        let mut vm = backend.start_passes(&spec).unwrap();
        vm.set_dirty_logging(true).unwrap();
        paused_while_held(vm, &backend.name());
    }
    if usable_or_skip() {
        paused_while_held(KvmBackend::default().start_passes(&spec).unwrap(), "kvm");
    }
}

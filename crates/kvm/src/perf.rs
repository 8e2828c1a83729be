//! `migrate-perf` on real KVM, in the manner of KVM's
//! `tools/testing/selftests/kvm/dirty_log_perf_test.c` and in the rhythm of
//! the engine's `passes.rs` (its `Sweepers`).
//!
//! Each vCPU has its own thread (created per vCPU) and its own slice of the
//! test slot, pages `[id * n / vcpus, (id + 1) * n / vcpus)`. Its guest
//! ([`crate::guest::pass_program`]) makes passes: one 8-byte access per page
//! of the slice, storing the pass number (1, 2, ...) with probability
//! `write_pct`%, in order or at LCG-chosen pages; after each pass it exits
//! to the host with a ucall and its thread waits, outside `KVM_RUN`, until
//! the host releases the next pass. A rate set paces the guest from inside
//! (a calibrated delay after each 64-page chunk, [`crate::delay`], with a
//! pacer thread that keeps it true); a dirty-limit holds a vCPU at its
//! chunk exits, or with the dirty ring at its ring-full exits.
//!
//! The procedure is the testkit's (`shadow_mmu_testkit::perf::migrate_perf`,
//! through [`crate::KvmBackend`]'s `start_passes`), the same as the
//! engine's: [`KvmPerfVm`] gives it the steps (release a pass, wait for it,
//! enable logging, get and clear the log, stop). The guests store the pass
//! number, with no iteration tag, so the oracle checks KVM's harvests
//! exactly at the end, with the vCPUs stopped.
//!
//! Invariants:
//! - a vCPU is in `KVM_RUN` only for the passes the host has released:
//!   after its pass `k` it publishes `k` and waits until `allowed > k` (or a
//!   stop); so with no pass released beyond those completed, no guest runs
//!   and the test slot holds still;
//! - no vCPU thread outlives its [`KvmPerfVm`]: [`KvmPerfVm::stop`] joins
//!   them and `Drop` calls it before any field goes (the guest memory
//!   would be safe regardless: each vCPU holds it, see [`crate::vm`]);
//! - a vCPU thread that fails records why and stops; [`KvmPerfVm::wait_passes`]
//!   then returns the failure instead of waiting forever, and
//!   [`KvmPerfVm::stop`] returns it too (the first failure, shared).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use shadow_mmu_core::spte::PAGE_SIZE;

use crate::delay::{Calibration, DelayModel, GuestPace, run_pacer};
use crate::error::{BadConfig, KvmError, UnexpectedExit};
use crate::guest::{PassProgram, Program, UCALL_CHUNK, UCALL_PASS_DONE, chunk_pages, pass_program};
use crate::vm::{GuestExit, KvmVm, MAX_TEST_BYTES, TEST_GPA, VCPU_STATE_WORDS, Vcpu, VmSetup};
use shadow_mmu_vmm::vcpu_gate::{decode_words, encode_words};
use shadow_mmu_vmm::{
    ChunkPacer, DirtyLogProtect, DirtyPace, RingFullLimit, RingState, VcpuGate, VcpuLoss, chunk_bytes,
    is_compute_vcpu,
};

/// Most vCPUs a [`KvmPerfVm`] runs.
pub const MAX_PERF_VCPUS: u32 = 256;
/// Bytes of control slot each vCPU's code may take.
pub(crate) const CODE_STRIDE: u64 = 256;
/// Bytes between two vCPUs' pass words (their own cache lines).
const PASS_WORD_STRIDE: u64 = 64;

/// A `migrate-perf` run on KVM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvmPerfConfig {
    /// vCPUs (1..=[`MAX_PERF_VCPUS`]), one thread each.
    pub vcpus: u32,
    /// Bytes of the test slot: a multiple of 4 KiB, at least one page per
    /// vCPU, at most 2 GiB.
    pub guest_bytes: u64,
    /// Share of accesses that are stores, percent (0..=100).
    pub write_pct: u8,
    /// LCG-chosen pages (with replacement) instead of a sequential sweep.
    pub random: bool,
    /// Seed of the vCPUs' LCGs.
    pub seed: u64,
    /// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`'s flags: with manual protect
    /// `KVM_GET_DIRTY_LOG` only copies the log and `KVM_CLEAR_DIRTY_LOG`
    /// re-protects.
    pub protect: DirtyLogProtect,
    /// The dirty ring, of this many bytes per vCPU, instead of the bitmap.
    pub dirty_ring_bytes: Option<u32>,
    /// Map the test slot lazily (a migration's destination), not populated
    /// up front (`vmm::PassSpec::lazy_memory`).
    pub lazy_memory: bool,
    /// The last this many vCPUs only load (`vmm::PassSpec::compute_vcpus`).
    pub compute_vcpus: u32,
}

impl Default for KvmPerfConfig {
    fn default() -> Self {
        Self {
            vcpus: 1,
            guest_bytes: 16 << 20,
            write_pct: 100,
            random: false,
            seed: 1,
            protect: DirtyLogProtect::Auto,
            dirty_ring_bytes: None,
            lazy_memory: false,
            compute_vcpus: 0,
        }
    }
}

impl KvmPerfConfig {
    fn check(&self) -> Result<(), BadConfig> {
        let (bytes, vcpus) = (self.guest_bytes, self.vcpus);
        if vcpus == 0 || vcpus > MAX_PERF_VCPUS {
            Err(BadConfig::PerfVcpus { vcpus })
        } else if !bytes.is_multiple_of(PAGE_SIZE) {
            Err(BadConfig::GuestBytesNotPages { bytes })
        } else if bytes / PAGE_SIZE < u64::from(vcpus) {
            Err(BadConfig::GuestBytesPerVcpu { bytes, vcpus })
        } else if bytes > MAX_TEST_BYTES {
            Err(BadConfig::GuestBytesTooLarge { bytes })
        } else if self.write_pct > 100 {
            Err(BadConfig::WritePct { pct: self.write_pct })
        } else {
            Ok(())
        }
    }

    /// vCPU `id`'s pass program.
    pub fn pass_program(&self, id: u32) -> PassProgram {
        let pages = self.guest_bytes / PAGE_SIZE;
        let (start, end) = slice(pages, id, self.vcpus);
        PassProgram {
            // The test slot ends below 4 GiB (checked), so these fit.
            base_gpa: (TEST_GPA + start * PAGE_SIZE) as u32,
            pages: (end - start) as u32,
            write_pct: if is_compute_vcpu(id, self.vcpus, self.compute_vcpus) { 0 } else { self.write_pct },
            random: self.random,
            pass_word_gpa: (pass_words_gpa(self.vcpus) + u64::from(id) * PASS_WORD_STRIDE) as u32,
        }
    }

    /// vCPU `id`'s LCG state before its first pass (for
    /// [`crate::guest::model_pass`]): `seed` folded to 32 bits, mixed with
    /// the id.
    pub fn initial_lcg(&self, id: u32) -> u32 {
        (self.seed as u32) ^ ((self.seed >> 32) as u32) ^ id.wrapping_add(1).wrapping_mul(0x9e37_79b9)
    }
}

/// vCPU `id` of `vcpus`' slice of `pages` pages: `[start, end)`.
pub fn slice(pages: u64, id: u32, vcpus: u32) -> (u64, u64) {
    (pages * u64::from(id) / u64::from(vcpus), pages * u64::from(id + 1) / u64::from(vcpus))
}

/// Where the pass words start in the control slot: after the code, on a
/// page of their own (so guest stores never land on a code page).
fn pass_words_gpa(vcpus: u32) -> u64 {
    (u64::from(vcpus) * CODE_STRIDE).next_multiple_of(PAGE_SIZE)
}

/// A vCPU's pass count and the duration of its last pass, on a cache line
/// of its own.
#[derive(Debug, Default)]
#[repr(align(64))]
struct PassClock {
    passes: AtomicU64,
    last_pass_ns: AtomicU64,
    /// ns the vCPU was held out of a pass by a throttle or a pause.
    throttle_ns: AtomicU64,
    /// ns it waited on a full dirty ring.
    ring_full_ns: AtomicU64,
    /// Exits to the thread so far: the pacer corrects the delay only over
    /// a window without one.
    exits: AtomicU64,
}

/// What the host and the vCPU threads share.
#[derive(Debug)]
struct PerfShared {
    clocks: Box<[PassClock]>,
    /// Passes each vCPU may complete.
    allowed: AtomicU64,
    stop: AtomicBool,
    /// The first vCPU thread to fail, and why: set once, by that thread.
    failure: OnceLock<(u32, Arc<KvmError>)>,
    /// vCPUs waiting on a full dirty ring for the host to reap.
    ring_waiters: AtomicU64,
    /// `KVM_EXIT_DIRTY_RING_FULL` exits so far.
    ring_full_exits: AtomicU64,
    /// The vCPUs' pause and state exchange.
    gate: Arc<VcpuGate>,
    /// The vCPU threads to signal for a kick.
    threads: Arc<KickList>,
    /// The dirty rate inside passes, and the bytes stored.
    pace: Arc<DirtyPace>,
    /// What the vCPU threads reaped of their own rings under a dirty-limit,
    /// for the host's next harvest (the backend VM's).
    ring: Arc<RingState>,
    /// Each vCPU's program: its pages a pass, and the share of them stored.
    programs: Box<[PassProgram]>,
    /// The guests' own pace: their delays, their models, their counts.
    guest_pace: GuestPace,
}

/// The live vCPU threads of a VM, by id, for [`KickList::kick`]: each
/// thread enters itself when it starts and takes itself out before it
/// ends, under the lock that `kick` signals under, so a signal never goes
/// to a thread that has ended.
#[derive(Debug, Default)]
struct KickList(Mutex<Vec<Option<libc::pthread_t>>>);

/// The signal that kicks a vCPU thread out of `KVM_RUN` (`EINTR`), as
/// Firecracker and Cloud Hypervisor use the first real-time signal.
fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing: the signal's only work is to interrupt KVM_RUN.
}

impl KickList {
    fn enter(&self, id: u32) {
        let mut l = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if l.len() <= id as usize {
            l.resize(id as usize + 1, None);
        }
        // SAFETY: pthread_self has no preconditions.
        l[id as usize] = Some(unsafe { libc::pthread_self() });
    }

    fn leave(&self, id: u32) {
        let mut l = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        l[id as usize] = None;
    }

    fn kick(&self) {
        let l = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for &t in l.iter().flatten() {
            // SAFETY: `t` is a live thread: it is in the list, and a thread
            // takes itself out (under this lock, which we hold) before it
            // ends. The signal has a handler (`KvmPerfVm::new` installs it
            // before starting any thread), so it cannot kill the process.
            unsafe { libc::pthread_kill(t, kick_signal()) };
        }
    }
}

/// Words of a vCPU thread's saved state: the passes it completed, then the
/// vCPU's ([`Vcpu::save_state`]).
pub const PASS_VCPU_STATE_WORDS: usize = 1 + VCPU_STATE_WORDS;

/// Holds vCPU `id` at its gate, saving its state, if a pause is requested.
fn hold(vcpu: &mut Vcpu, done: u64, shared: &PerfShared) -> Result<(), KvmError> {
    // Relaxed: as the vCPU thread's stop checks.
    if !shared.gate.pause_requested() || shared.stop.load(Ordering::Relaxed) {
        return Ok(());
    }
    let mut w = vec![done];
    w.extend(vcpu.save_state()?);
    // Relaxed: see the vCPU thread's stop checks.
    shared.gate.hold(vcpu.id(), || encode_words(&w), || shared.stop.load(Ordering::Relaxed));
    Ok(())
}

/// Under a dirty-limit, at a ring-full exit (QEMU's `kvm_cpu_exec` with
/// `dirtylimit_in_service()`): the vCPU's thread reaps its own ring, for
/// the host's next harvest, then keeps the vCPU out for what its pages
/// since its last hold exceed at the limit, or until a pause or a stop.
/// Returns how long it was kept out.
fn limit_at_ring_full(
    vcpu: &Vcpu,
    shared: &PerfShared,
    limit: &mut RingFullLimit,
) -> Result<Duration, KvmError> {
    let harvested = {
        let mut collected = shared.ring.collected.lock();
        vcpu.reap_own_dirty_ring(|offset| collected.push(offset))?
    };
    // Relaxed: a counter.
    shared.ring_full_exits.fetch_add(1, Ordering::Relaxed);
    let d = limit.hold_for(&shared.pace, harvested);
    // Relaxed: as the vCPU thread's stop checks. A limit lifted ends the
    // hold too (`set_dirty_limit` rings).
    Ok(shared.gate.hold_off(d, || shared.stop.load(Ordering::Relaxed) || shared.pace.ring_full_limit() == 0))
}

/// A VM running `migrate-perf` vCPU threads on KVM.
#[derive(Debug)]
pub struct KvmPerfVm {
    shared: Arc<PerfShared>,
    /// The vCPU threads, by vCPU id.
    threads: Vec<JoinHandle<()>>,
    /// The pacer thread (`pacer_thread`).
    pacer: Option<JoinHandle<()>>,
    vm: KvmVm,
    cfg: KvmPerfConfig,
}

/// A vCPU thread: runs a pass each time the host allows one. Its failure
/// goes to `shared.failure`, where the host finds it (the first thread's
/// only, as the host reports one).
fn vcpu_thread(mut vcpu: Vcpu, shared: Arc<PerfShared>) {
    shared.threads.enter(vcpu.id());
    let r = vcpu_loop(&mut vcpu, &shared);
    shared.threads.leave(vcpu.id());
    if let Err(e) = r {
        // Shared, not cloned: an io::Error cannot be, and every report of
        // the failure shows the same cause.
        let _ = shared.failure.set((vcpu.id(), Arc::new(e)));
    }
}

fn vcpu_loop(vcpu: &mut Vcpu, shared: &PerfShared) -> Result<(), KvmError> {
    let id = vcpu.id();
    let clock = &shared.clocks[id as usize];
    let mut done = 0u64;
    let program = &shared.programs[id as usize];
    let mut pace = PassPace::new(program.pages, program.write_pct);
    let mut limit = RingFullLimit::default();
    loop {
        loop {
            // Before the checks: a change after them rings after it.
            let ticket = shared.gate.bell().ticket();
            let restored = shared.gate.apply_restore(id, |state| {
                // Checked by `restore_vcpus` before it was given.
                let w = decode_words(state, PASS_VCPU_STATE_WORDS).expect("a checked vCPU state");
                vcpu.restore_state(&w[1..])?;
                // Release: as the store after a pass.
                clock.passes.store(w[0], Ordering::Release);
                Ok::<u64, KvmError>(w[0])
            });
            if let Some(r) = restored {
                done = r?;
            }
            // Relaxed: a stop is seen eventually; `stop` joins us, which
            // orders everything after. A stop wins over a pause.
            if shared.stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            if shared.gate.pause_requested() {
                hold(vcpu, done, shared)?;
                continue;
            }
            // Acquire: pairs with `release`'s store (nothing else is
            // published through it, but it keeps "released" meaning
            // "released before").
            if shared.allowed.load(Ordering::Acquire) > done {
                break;
            }
            shared.gate.bell().wait(ticket);
        }
        let t = Instant::now();
        pace.pass_begins();
        // The last exit ended a chunk: the next run is one whole chunk.
        let mut after_chunk = false;
        loop {
            let entered = Instant::now();
            let exit = vcpu.run_interruptible(&|| shared.gate.pause_requested())?;
            // Relaxed: read by the pacer thread, which only needs to see
            // that the count moved.
            clock.exits.fetch_add(1, Ordering::Relaxed);
            let whole_chunk = std::mem::replace(&mut after_chunk, exit == GuestExit::Ucall(UCALL_CHUNK));
            match exit {
                GuestExit::Interrupted => {
                    // Kicked out of a pass: hold mid-pass (the registers say
                    // where the pass is).
                    let held = Instant::now();
                    hold(vcpu, done, shared)?;
                    // Relaxed: a statistic (`vcpu_losses`).
                    clock.throttle_ns.fetch_add(held.elapsed().as_nanos() as u64, Ordering::Relaxed);
                    // Relaxed: as above.
                    if shared.stop.load(Ordering::Relaxed) {
                        return Ok(());
                    }
                }
                GuestExit::DirtyRingFull if shared.pace.ring_full_limit() > 0 => {
                    let held = limit_at_ring_full(vcpu, shared, &mut limit)?;
                    // Relaxed: a statistic (`vcpu_losses`).
                    clock.throttle_ns.fetch_add(held.as_nanos() as u64, Ordering::Relaxed);
                    hold(vcpu, done, shared)?;
                }
                GuestExit::DirtyRingFull => {
                    // Relaxed: see the wait for a release above.
                    if shared.stop.load(Ordering::Relaxed) {
                        return Ok(());
                    }
                    // Relaxed: counters and a hint for the host's reaper; the
                    // ring's own orderings carry the data.
                    shared.ring_full_exits.fetch_add(1, Ordering::Relaxed);
                    shared.ring_waiters.fetch_add(1, Ordering::Relaxed);
                    let waited = Instant::now();
                    // Re-entering while still full exits at once: wait a
                    // little for the host to reap, then try again.
                    std::thread::sleep(Duration::from_micros(50));
                    hold(vcpu, done, shared)?;
                    shared.ring_waiters.fetch_sub(1, Ordering::Relaxed);
                    clock.ring_full_ns.fetch_add(waited.elapsed().as_nanos() as u64, Ordering::Relaxed);
                }
                GuestExit::Ucall(UCALL_CHUNK) => {
                    // Relaxed: as the stop checks above.
                    let wait = |d| shared.gate.hold_off(d, || shared.stop.load(Ordering::Relaxed));
                    let ran = whole_chunk.then(|| entered.elapsed());
                    let held = pace.chunk_done(shared, id, ran, wait);
                    hold(vcpu, done, shared)?;
                    // Relaxed: a statistic (`vcpu_losses`).
                    clock.throttle_ns.fetch_add(held.as_nanos() as u64, Ordering::Relaxed);
                }
                GuestExit::Ucall(UCALL_PASS_DONE) => break,
                exit => return Err(UnexpectedExit::Exit { vcpu: id, program: Program::Pass, exit }.into()),
            }
        }
        let ns = t.elapsed().as_nanos() as u64;
        // Relaxed: published by the release store of `passes` below.
        clock.last_pass_ns.store(ns, Ordering::Relaxed);
        done += 1;
        // Release: pairs with the acquire loads in `passes`/`wait_passes`:
        // whoever sees pass `done` complete also sees its duration and every
        // guest store of the pass (KVM_RUN returned before this store).
        clock.passes.store(done, Ordering::Release);
    }
}

/// A vCPU thread's side of the dirty rate, at its chunk exits: which
/// chunk of the pass the guest is in (the first holds the remainder; after
/// exits begin mid-pass, or a restore, the count is a guess until the next
/// pass), the holds, and the calibration of its delay. The guest counts its
/// own stores (`guest_count`).
struct PassPace {
    pacer: ChunkPacer,
    pass_pages: u32,
    write_pct: u8,
    chunk: u32,
    /// While the vCPU's delay model is being calibrated: the samples.
    calibration: Option<Calibration>,
}

impl PassPace {
    fn new(pass_pages: u32, write_pct: u8) -> Self {
        Self { pacer: ChunkPacer::default(), pass_pages, write_pct, chunk: 0, calibration: None }
    }

    fn pass_begins(&mut self) {
        self.chunk = 0;
        self.pacer.restart();
    }

    /// A `UCALL_CHUNK` after `ran` in the guest (`None`: the run was not one
    /// whole chunk): a sample for vCPU `id`'s calibration if it is under
    /// way, then the chunk's share of time at the pace or the limit. Returns
    /// the part of the wait the limit added.
    fn chunk_done(
        &mut self,
        shared: &PerfShared,
        id: u32,
        ran: Option<Duration>,
        wait: impl FnOnce(Duration) -> Duration,
    ) -> Duration {
        let pages = chunk_pages(self.pass_pages, self.chunk);
        // A pass's first chunk holds the remainder: not a sample.
        let full = self.chunk > 0;
        self.chunk += 1;
        shared.guest_pace.calibrate(id, &mut self.calibration, ran.filter(|_| full));
        self.pacer.chunk_done(&shared.pace, chunk_bytes(u64::from(pages), self.write_pct), wait)
    }
}

impl KvmPerfVm {
    /// Creates the VM (test slot populated unless lazy, logging off), generates each
    /// vCPU's code and starts the vCPU threads, waiting for [`Self::release`].
    pub fn new(cfg: &KvmPerfConfig) -> Result<Self, KvmError> {
        cfg.check().map_err(KvmError::BadConfig)?;
        let words_gpa = pass_words_gpa(cfg.vcpus);
        let control_bytes = (words_gpa + u64::from(cfg.vcpus) * PASS_WORD_STRIDE).next_multiple_of(PAGE_SIZE);
        let vm = KvmVm::new(VmSetup {
            control_bytes,
            test_bytes: cfg.guest_bytes,
            protect: cfg.protect,
            dirty_ring_bytes: cfg.dirty_ring_bytes,
            // As the engine: the first pass measures KVM, not the host
            // kernel's first-touch faults; a destination's pages come from
            // the stream.
            populate: !cfg.lazy_memory,
        })?;
        if cfg.lazy_memory {
            vm.memory().test.advise_huge_pages();
        }
        let mut vcpus = Vec::new();
        for id in 0..cfg.vcpus {
            let code = pass_program(&cfg.pass_program(id))?;
            if code.len() as u64 > CODE_STRIDE {
                return Err(BadConfig::PassProgramTooLarge { bytes: code.len() }.into());
            }
            let eip = u64::from(id) * CODE_STRIDE;
            vm.write_control(eip, &code)?;
            // ebp = 0 passes done, esi = LCG seed.
            vcpus.push(vm.create_vcpu(id, eip as u32, [0, 0, 0, 0, 0, 0, cfg.initial_lcg(id), 0])?);
        }
        static HANDLER: std::sync::Once = std::sync::Once::new();
        let mut installed = Ok(());
        HANDLER
            .call_once(|| installed = vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick));
        installed.map_err(|e| KvmError::Ioctl {
            op: "sigaction (the vCPU kick)",
            source: std::io::Error::from_raw_os_error(e.errno()),
        })?;
        let threads = Arc::new(KickList::default());
        let kick = threads.clone();
        let gate = Arc::new(VcpuGate::new(cfg.vcpus, Box::new(move || kick.kick())));
        let programs: Box<[PassProgram]> = (0..cfg.vcpus).map(|id| cfg.pass_program(id)).collect();
        let pace = DirtyPace::new(cfg.vcpus, cfg.dirty_ring_bytes.is_some());
        pace.count_from_guest(GuestPace::guest_count(vm.shared_memory(), &programs));
        let pace = Arc::new(pace);
        let guest_pace = GuestPace::new(pace.clone(), vm.shared_memory(), &programs);
        let shared = Arc::new(PerfShared {
            clocks: (0..cfg.vcpus).map(|_| PassClock::default()).collect(),
            allowed: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            failure: OnceLock::new(),
            ring_waiters: AtomicU64::new(0),
            ring_full_exits: AtomicU64::new(0),
            gate,
            threads,
            pace,
            ring: Arc::new(RingState::default()),
            programs,
            guest_pace,
        });
        let mut this = Self { shared, threads: Vec::new(), pacer: None, vm, cfg: cfg.clone() };
        for vcpu in vcpus {
            let shared = this.shared.clone();
            let t = std::thread::Builder::new()
                .name(format!("kvm-vcpu-{}", vcpu.id()))
                .spawn(move || vcpu_thread(vcpu, shared))
                .map_err(|source| KvmError::Ioctl { op: "spawn vCPU thread", source })?;
            this.threads.push(t);
        }
        let shared = this.shared.clone();
        let pacer = std::thread::Builder::new()
            .name("kvm-pacer".into())
            .spawn(move || {
                // Relaxed: a statistic, and the stop as the vCPU threads
                // read it (`stop` rings the bell).
                let exits = |id: u32| shared.clocks[id as usize].exits.load(Ordering::Relaxed);
                let wait = |d| shared.gate.bell().wait_for(shared.gate.bell().ticket(), d);
                run_pacer(&shared.guest_pace, exits, wait, || shared.stop.load(Ordering::Relaxed));
            })
            .map_err(|source| KvmError::Ioctl { op: "spawn the pacer thread", source })?;
        this.pacer = Some(pacer);
        Ok(this)
    }

    /// The configuration.
    pub fn config(&self) -> &KvmPerfConfig {
        &self.cfg
    }

    /// What the vCPU threads reaped of their own dirty rings (under a
    /// dirty-limit), for the backend VM's harvest.
    pub fn ring_state(&self) -> &Arc<RingState> {
        &self.shared.ring
    }

    /// The dirty rate inside passes, and the bytes stored.
    pub fn dirty_pace(&self) -> &Arc<DirtyPace> {
        &self.shared.pace
    }

    /// Paces the guest at `rate` bytes a second (`None`: flat out): sets
    /// each vCPU's delay from its model, or, until its thread calibrated
    /// one, its pace flag, so that its guest exits after each chunk and the
    /// thread paces it meanwhile ([`crate::delay`]).
    pub fn set_dirty_rate(&self, rate: Option<u64>) -> Result<(), KvmError> {
        self.shared.pace.set(rate);
        self.apply_pace();
        Ok(())
    }

    /// Caps each vCPU's dirty rate at `limit` bytes a second (`None`: no
    /// cap): QEMU's dirty-limit, held at the ring-full exits with the dirty
    /// ring, else at the chunk exits.
    pub fn set_dirty_limit(&self, limit: Option<u64>) -> Result<(), KvmError> {
        self.shared.pace.set_limit(limit);
        // A vCPU held at its ring-full exit sees a lifted limit at once.
        self.shared.gate.bell().ring();
        self.apply_pace();
        Ok(())
    }

    /// Each vCPU's delay and pace flag for the rate and limit now set.
    fn apply_pace(&self) {
        for id in 0..self.cfg.vcpus {
            self.shared.guest_pace.apply(id);
        }
    }

    /// Lets every vCPU go on up to pass `n`.
    pub fn release(&self, n: u64) {
        // Release: pairs with the vCPU threads' acquire load.
        self.shared.allowed.store(n, Ordering::Release);
        self.shared.gate.bell().ring();
    }

    /// Passes each vCPU has completed.
    pub fn passes(&self) -> Vec<u64> {
        // Acquire: pairs with the vCPU thread's release store.
        self.shared.clocks.iter().map(|c| c.passes.load(Ordering::Acquire)).collect()
    }

    /// Waits until every vCPU has completed more passes than `since` (one
    /// entry per vCPU); returns the longest of their last passes, in ns
    /// (`dirty_log_perf_test`'s per-iteration time). Fails if a vCPU thread
    /// failed (or had failed) instead of waiting.
    pub fn wait_passes(&self, since: &[u64]) -> Result<u64, KvmError> {
        self.wait_passes_reaping(since, &mut || Ok(()))
    }

    /// The vCPUs' pause and state exchange.
    pub fn gate(&self) -> &Arc<VcpuGate> {
        &self.shared.gate
    }

    /// What each vCPU lost so far, as its thread sees it: held by a
    /// throttle or a pause, and waiting on a full dirty ring. KVM's own
    /// `mmu_lock` waits and TLB flushes happen inside `KVM_RUN`, where
    /// userspace cannot tell them from the guest's work: 0.
    pub fn vcpu_losses(&self) -> Vec<VcpuLoss> {
        self.shared
            .clocks
            .iter()
            .map(|c| VcpuLoss {
                // Relaxed: statistics.
                throttle_ns: c.throttle_ns.load(Ordering::Relaxed),
                ring_full_ns: c.ring_full_ns.load(Ordering::Relaxed),
                ..VcpuLoss::default()
            })
            .collect()
    }

    /// Each vCPU's delay model, once its thread calibrated one
    /// ([`crate::delay`]).
    pub fn delay_models(&self) -> Vec<Option<DelayModel>> {
        self.shared.guest_pace.models()
    }

    /// Exits of the vCPU threads from `KVM_RUN` so far, of every kind.
    pub fn exits(&self) -> u64 {
        // Relaxed: a statistic.
        self.shared.clocks.iter().map(|c| c.exits.load(Ordering::Relaxed)).sum()
    }

    /// `KVM_EXIT_DIRTY_RING_FULL` exits of the vCPU threads so far.
    pub fn ring_full_exits(&self) -> u64 {
        // Relaxed: a statistic.
        self.shared.ring_full_exits.load(Ordering::Relaxed)
    }

    /// [`Self::wait_passes`], calling `reap` whenever a vCPU waits on a full
    /// dirty ring; a failed reap ends the wait with its error.
    pub fn wait_passes_reaping(
        &self,
        since: &[u64],
        reap: &mut dyn FnMut() -> Result<(), KvmError>,
    ) -> Result<u64, KvmError> {
        if since.len() != self.shared.clocks.len() {
            return Err(
                BadConfig::WaitPassesEntries { vcpus: self.shared.clocks.len(), got: since.len() }.into()
            );
        }
        for (c, &s) in self.shared.clocks.iter().zip(since) {
            // Acquire: pairs with the vCPU thread's release store of `passes`.
            while c.passes.load(Ordering::Acquire) <= s {
                // Relaxed: see the vCPU thread.
                if self.shared.ring_waiters.load(Ordering::Relaxed) > 0 {
                    reap()?;
                }
                if let Some(e) = self.failure() {
                    return Err(e);
                }
                std::thread::sleep(Duration::from_micros(50));
            }
        }
        // Relaxed: each read after the acquire load that saw the pass its
        // store precedes.
        Ok(self.shared.clocks.iter().map(|c| c.last_pass_ns.load(Ordering::Relaxed)).max().unwrap_or(0))
    }

    /// The first vCPU thread's failure, if one failed.
    fn failure(&self) -> Option<KvmError> {
        self.shared
            .failure
            .get()
            .map(|(vcpu, source)| KvmError::VcpuThread { vcpu: *vcpu, source: source.clone() })
    }

    /// Stops the vCPU threads (each finishes the pass it is in) and joins
    /// them; returns the first failure (a thread's error before a panic).
    /// Idempotent.
    pub fn stop(&mut self) -> Result<(), KvmError> {
        // Relaxed: see `vcpu_thread`; the joins below order the rest, and
        // the ring's release wakes a waiting thread to see it.
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.gate.bell().ring();
        // Never fails: the pacer only reads and stores words.
        if let Some(p) = self.pacer.take() {
            let _ = p.join();
        }
        let mut panicked = None;
        for (vcpu, t) in self.threads.drain(..).enumerate() {
            if t.join().is_err() {
                panicked.get_or_insert(UnexpectedExit::Panicked { vcpu: vcpu as u32 });
            }
        }
        match (self.failure(), panicked) {
            (Some(e), _) => Err(e),
            (None, Some(p)) => Err(p.into()),
            (None, None) => Ok(()),
        }
    }
}

/// A perf VM is a [`KvmVm`] with vCPU threads in it: logging, the log and
/// memory are the VM's.
impl std::ops::Deref for KvmPerfVm {
    type Target = KvmVm;
    fn deref(&self) -> &KvmVm {
        &self.vm
    }
}

impl std::ops::DerefMut for KvmPerfVm {
    fn deref_mut(&mut self) -> &mut KvmVm {
        &mut self.vm
    }
}

impl Drop for KvmPerfVm {
    fn drop(&mut self) {
        // Joins the vCPU threads before `vm` (and the memory) go. A failure
        // was already reported to whoever waited for passes.
        let _ = self.stop();
    }
}

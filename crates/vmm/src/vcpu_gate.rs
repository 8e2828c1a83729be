//! Pausing a [`crate::backend::PassVm`]'s vCPUs, and saving and restoring
//! their state: what a live migration's stop-and-copy and QEMU's
//! auto-converge throttle need, the same on every backend.
//!
//! The host side ([`VcpuGate::pause`], [`VcpuGate::resume`],
//! [`VcpuGate::saved`], [`VcpuGate::restore`]) and the vCPU side
//! ([`VcpuGate::pause_requested`], [`VcpuGate::hold`],
//! [`VcpuGate::apply_restore`]) meet here. The backend provides the kick
//! that gets a vCPU out of guest mode (the engine's `KVM_REQ_EXIT`, a
//! signal on KVM); its vCPU threads call [`VcpuGate::hold`] whenever they
//! are outside guest mode with a pause requested: after a kick, between
//! passes, while a full dirty ring makes them wait.
//!
//! Invariants:
//! - a vCPU in [`VcpuGate::hold`] is outside guest mode and has saved its
//!   state (complete: no access half done) before it counts as held; it
//!   runs again only after [`VcpuGate::resume`] (or a stop);
//! - [`VcpuGate::pause`] returns `Ok` only when every vCPU is held, so the
//!   guest memory holds still until `resume`;
//! - a state given to [`VcpuGate::restore`] is applied by its vCPU's thread
//!   before [`VcpuGate::wait_restored`] returns, and
//!   before that vCPU next enters guest mode.

use shadow_mmu_core::breakage::Breakage;
use shadow_mmu_core::pause::PauseProtocol;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// How a backend gets its vCPUs out of guest mode.
pub type Kick = Box<dyn Fn() + Send + Sync>;

/// The pause and state exchange of one VM's vCPUs (module docs).
pub struct VcpuGate {
    protocol: PauseProtocol,
    kick: Kick,
    saved: Box<[Mutex<Option<Vec<u8>>>]>,
    restore: Box<[Mutex<Option<Vec<u8>>>]>,
    /// Where the vCPU threads wait outside guest mode: rung by every change
    /// of the gate, and by the backend's own (a release, a stop).
    bell: Doorbell,
}

impl std::fmt::Debug for VcpuGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuGate")
            .field("protocol", &self.protocol)
            .field("vcpus", &self.saved.len())
            .finish()
    }
}

/// Why a pause did not complete.
#[derive(Debug, thiserror::Error)]
#[error("{held} of {vcpus} vCPUs paused within {waited:?} (a vCPU thread stopped or is stuck)")]
pub struct PauseTimeout {
    /// vCPUs held when it gave up.
    pub held: u32,
    /// vCPUs of the VM.
    pub vcpus: u32,
    /// How long it waited.
    pub waited: Duration,
}

impl VcpuGate {
    /// A gate for `vcpus` vCPUs, kicked by `kick`.
    pub fn new(vcpus: u32, kick: Kick) -> Self {
        Self {
            protocol: PauseProtocol::new(),
            kick,
            saved: (0..vcpus).map(|_| Mutex::new(None)).collect(),
            restore: (0..vcpus).map(|_| Mutex::new(None)).collect(),
            bell: Doorbell::default(),
        }
    }

    /// The doorbell the vCPU threads wait on outside guest mode: the
    /// backend rings it after each change they wait for (a release, a
    /// stop); the gate rings it after its own.
    pub fn bell(&self) -> &Doorbell {
        &self.bell
    }

    /// vCPUs.
    pub fn vcpus(&self) -> u32 {
        self.saved.len() as u32
    }

    /// Asks every vCPU to pause and kicks them out of guest mode, without
    /// waiting (the throttle's half of a pause).
    pub fn request_pause(&self) {
        // The kick comes after the request, so a vCPU the kick reached sees
        // it once out of guest mode (the protocol's SeqCst store and load).
        self.protocol.request();
        self.bell.ring();
        (self.kick)();
    }

    /// Pauses every vCPU: returns once each is held (module docs), kicking
    /// again every 200 µs (a kick can reach a vCPU just before it enters
    /// guest mode, and be missed). Fails after `within` if some vCPU never
    /// comes (its thread ended); the pause request stays, so call `resume`.
    pub fn pause(&self, within: Duration) -> Result<(), PauseTimeout> {
        let t = Instant::now();
        self.request_pause();
        loop {
            if self.protocol.all_held(self.vcpus()) {
                return Ok(());
            }
            let held = self.protocol.held();
            if t.elapsed() > within {
                return Err(PauseTimeout { held, vcpus: self.vcpus(), waited: t.elapsed() });
            }
            std::thread::sleep(Duration::from_micros(200));
            (self.kick)();
        }
    }

    /// Lets the vCPUs run again.
    pub fn resume(&self) {
        // What the host did while they were held (a restore, a memory load)
        // is visible to the vCPUs when they run again (the protocol's
        // release store).
        self.protocol.release();
        self.bell.ring();
    }

    /// Is a pause requested (vCPU side, outside guest mode)?
    pub fn pause_requested(&self) -> bool {
        self.protocol.requested()
    }

    /// vCPU `id`, outside guest mode with a pause requested: saves
    /// `save()`'s state, counts itself held and waits until the pause ends
    /// or `stop()` says so. Returns at once if no pause is requested, or a
    /// stop is (a stop wins over a pause: check it first in the loop around).
    pub fn hold(&self, id: u32, save: impl FnOnce() -> Vec<u8>, stop: impl Fn() -> bool) {
        if !self.pause_requested() || stop() {
            return;
        }
        *self.saved[id as usize].lock() = Some(save());
        // The core's protocol, loom-checked (`shadow_mmu_core::pause`): a
        // pause that comes while we leave a hold keeps us held. The ticket
        // for each wait is taken before the protocol's next look at the
        // word (the first here, the next after each wait), so a resume
        // between that look and the wait is not slept through.
        let mut ticket = self.bell.ticket();
        self.protocol.hold(
            || {
                self.bell.wait(ticket);
                ticket = self.bell.ticket();
            },
            stop,
            &Breakage::SEED,
        );
    }

    /// vCPU side, outside guest mode: keeps the vCPU out for `d` (a
    /// dirty-limit's hold at its ring-full exit), ending early when a pause
    /// is requested (so that a pause never waits out a long hold: call
    /// [`Self::hold`] next) or `stop()` says so. Returns how long it kept
    /// the vCPU out.
    pub fn hold_off(&self, d: Duration, stop: impl Fn() -> bool) -> Duration {
        let t = Instant::now();
        loop {
            let ticket = self.bell.ticket();
            let left = d.saturating_sub(t.elapsed());
            if left.is_zero() || self.pause_requested() || stop() {
                return t.elapsed();
            }
            self.bell.wait_for(ticket, left);
        }
    }

    /// The states the vCPUs saved at their last hold, by id (`None` for a
    /// vCPU never held). Meaningful while [`Self::pause`]d.
    pub fn saved(&self) -> Vec<Option<Vec<u8>>> {
        self.saved.iter().map(|s| s.lock().clone()).collect()
    }

    /// Gives each vCPU a state to take before it next enters guest mode
    /// (by id; one per vCPU).
    ///
    /// # Panics
    /// If `states` is not one per vCPU (the caller checks the count against
    /// the VM first).
    pub fn restore(&self, states: Vec<Vec<u8>>) {
        assert_eq!(states.len(), self.saved.len(), "one state per vCPU");
        for (slot, s) in self.restore.iter().zip(states) {
            *slot.lock() = Some(s);
        }
        self.bell.ring();
    }

    /// Waits until every vCPU applied the state [`Self::restore`] gave it
    /// (they take it between passes, within microseconds of a release
    /// wait); `false` if some did not within `within`.
    pub fn wait_restored(&self, within: Duration) -> bool {
        let t = Instant::now();
        while self.restore.iter().any(|s| s.lock().is_some()) {
            if t.elapsed() > within {
                return false;
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        true
    }

    /// vCPU side, before entering guest mode: if the host gave vCPU `id` a
    /// state, applies it with `apply` and only then lets it go, so that
    /// [`Self::wait_restored`] returns once every state is in effect (the
    /// vCPU's pass count included).
    pub fn apply_restore<R>(&self, id: u32, apply: impl FnOnce(&[u8]) -> R) -> Option<R> {
        let mut slot = self.restore[id as usize].lock();
        let r = slot.as_deref().map(apply);
        *slot = None;
        r
    }
}

/// How a thread outside guest mode waits for the host (a release, a
/// resume, a restored state, a stop): it takes a ticket, checks what it
/// waits for, and parks (a futex, through `Condvar`) until the host rings
/// after that ticket. The host rings after every change a waiter may wait
/// for. Nothing polls: a parked vCPU thread takes no CPU from the harvest
/// beside it on a small host (a poll every 20 µs did, and made the
/// parallel harvest's time jump).
///
/// ```text
///   waiter                                host
///   t = ticket()          (SeqCst)        change (release store)
///   check: not yet                        rings += 1          (SeqCst)
///   waiters += 1          (SeqCst)        if waiters > 0 {
///   lock; if rings == t { wait }            lock; notify_all }
/// ```
/// Store buffering between `waiters` and `rings`, all SeqCst: either the
/// host sees the waiter and notifies it under the lock (the waiter holds
/// the lock from its check to its wait, so the notify comes after), or the
/// waiter sees the ring and does not wait.
#[derive(Debug, Default)]
pub struct Doorbell {
    rings: AtomicU64,
    waiters: AtomicU32,
    lock: std::sync::Mutex<()>,
    cv: std::sync::Condvar,
}

/// The longest a waiter parks without a ring: a safety net for a change
/// that forgot to ring, not a poll (a ring wakes it at once).
pub const DOORBELL_TIMEOUT: Duration = Duration::from_millis(50);

impl Doorbell {
    /// A ticket: take it before checking what you wait for.
    pub fn ticket(&self) -> u64 {
        // SeqCst: see the type's docs.
        self.rings.load(Ordering::SeqCst)
    }

    /// Parks until a ring after `ticket` (at once if one came), or
    /// [`DOORBELL_TIMEOUT`].
    pub fn wait(&self, ticket: u64) {
        self.wait_for(ticket, DOORBELL_TIMEOUT);
    }

    /// Parks until a ring after `ticket` (at once if one came), or
    /// `timeout` (at most [`DOORBELL_TIMEOUT`]).
    pub fn wait_for(&self, ticket: u64, timeout: Duration) {
        // SeqCst: see the type's docs.
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let g = self.lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // SeqCst: see the type's docs.
        if self.rings.load(Ordering::SeqCst) == ticket {
            let timeout = timeout.min(DOORBELL_TIMEOUT);
            drop(self.cv.wait_timeout(g, timeout).unwrap_or_else(std::sync::PoisonError::into_inner));
        } else {
            drop(g);
        }
        self.waiters.fetch_sub(1, Ordering::SeqCst);
    }

    /// Wakes every waiter: call after each change they may wait for.
    pub fn ring(&self) {
        // SeqCst: see the type's docs.
        self.rings.fetch_add(1, Ordering::SeqCst);
        if self.waiters.load(Ordering::SeqCst) > 0 {
            let _g = self.lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            self.cv.notify_all();
        }
    }
}

/// Little-endian `u64`s to bytes (a vCPU state's common encoding).
pub fn encode_words(words: &[u64]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// Bytes to little-endian `u64`s: `None` unless exactly `n` words.
pub fn decode_words(bytes: &[u8], n: usize) -> Option<Vec<u64>> {
    (bytes.len() == 8 * n)
        .then(|| bytes.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))).collect())
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn pause_waits_for_every_vcpu_and_resume_lets_them_go() {
        let gate = Arc::new(VcpuGate::new(2, Box::new(|| {})));
        let stop = Arc::new(AtomicBool::new(false));
        let threads: Vec<_> = (0..2u32)
            .map(|id| {
                let (gate, stop) = (gate.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut holds = 0;
                    while !stop.load(Ordering::Relaxed) {
                        if gate.pause_requested() {
                            holds += 1;
                            gate.hold(
                                id,
                                || encode_words(&[u64::from(id), holds]),
                                || stop.load(Ordering::Relaxed),
                            );
                        }
                        std::thread::yield_now();
                    }
                    holds
                })
            })
            .collect();
        gate.pause(Duration::from_secs(10)).unwrap();
        let saved = gate.saved();
        assert_eq!(decode_words(saved[1].as_ref().unwrap(), 2).unwrap()[0], 1);
        gate.resume();
        gate.pause(Duration::from_secs(10)).unwrap();
        gate.resume();
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            // A vCPU that slept through the resume stayed held for the
            // second pause (it never ran between them): one hold or two.
            assert!(t.join().unwrap() >= 1);
        }
        assert_eq!(decode_words(&[0; 9], 1), None);
    }

    /// The race of a pause that comes while a vCPU leaves its last hold:
    /// after `pause` returns, no vCPU is in its "guest" (many rounds of
    /// pause and resume back to back, the vCPUs spinning between holds).
    #[test]
    fn no_vcpu_runs_after_a_pause_returns() {
        let gate = Arc::new(VcpuGate::new(2, Box::new(|| {})));
        let stop = Arc::new(AtomicBool::new(false));
        let in_guest: Arc<[AtomicBool; 2]> = Arc::new([AtomicBool::new(false), AtomicBool::new(false)]);
        let threads: Vec<_> = (0..2u32)
            .map(|id| {
                let (gate, stop, in_guest) = (gate.clone(), stop.clone(), in_guest.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        if gate.pause_requested() {
                            gate.hold(id, Vec::new, || stop.load(Ordering::Relaxed));
                            continue;
                        }
                        in_guest[id as usize].store(true, Ordering::SeqCst);
                        for _ in 0..50 {
                            std::hint::spin_loop();
                        }
                        in_guest[id as usize].store(false, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for i in 0..3000 {
            gate.pause(Duration::from_secs(10)).unwrap();
            for _ in 0..20 {
                assert!(in_guest.iter().all(|g| !g.load(Ordering::SeqCst)), "a vCPU runs while paused");
            }
            gate.resume();
            // A varying gap: the vCPUs leave their hold at all points of it.
            let gap = Instant::now();
            while gap.elapsed() < Duration::from_micros(i % 60) {
                std::hint::spin_loop();
            }
        }
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn a_vcpu_that_never_comes_times_the_pause_out() {
        let gate = VcpuGate::new(1, Box::new(|| {}));
        let e = gate.pause(Duration::from_millis(5)).unwrap_err();
        assert_eq!((e.held, e.vcpus), (0, 1));
        assert!(e.to_string().contains("0 of 1 vCPUs paused"), "{e}");
    }

    #[test]
    fn a_hold_off_lasts_its_time_unless_a_pause_or_a_stop_comes() {
        let gate = Arc::new(VcpuGate::new(1, Box::new(|| {})));
        let held = gate.hold_off(Duration::from_millis(20), || false);
        assert!(held >= Duration::from_millis(20), "{held:?}");
        // A pause ends a long hold at once (the vCPU then holds at the gate).
        let g = gate.clone();
        let pauser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            g.request_pause();
        });
        let held = gate.hold_off(Duration::from_secs(30), || false);
        pauser.join().unwrap();
        assert!(held < Duration::from_secs(10), "{held:?}");
        gate.resume();
        // So does a stop.
        assert!(gate.hold_off(Duration::from_secs(30), || true) < Duration::from_secs(1));
    }
}

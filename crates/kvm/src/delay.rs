//! The KVM guest's own pace: after each chunk of its pass the guest runs a
//! delay loop of as many iterations as its pass word's delay says
//! ([`crate::guest::pass_program`]): the guest paces itself in guest code,
//! busy as a guest doing real work is, rather than sleeping in its vCPU
//! thread between chunks. The host calibrates the count per vCPU, once:
//! for a few chunks the guest exits after each (the pace flag), the vCPU
//! thread times them with and without a probe delay ([`Calibration`]), and
//! from then on the delay for any rate follows from the model
//! ([`DelayModel`]) with no exit at all.
//!
//! The timed chunks include an exit's round trip, and a guest's speed
//! changes with what runs beside it (the other vCPUs' delay loops, dirty
//! logging's faults, the migration's threads), so the host keeps the model
//! true: each time a vCPU's guest has begun 16 chunks without an exit
//! (looked at every 20 ms), it compares the chunk time its page count
//! shows with the model's and scales the model's costs half the way there
//! ([`DelayModel::correct`]).
//! What it cannot do is make a guest faster than it runs without delay:
//! then the delay is 0 and the rate reached, measured and printed beside
//! the one asked, is lower.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use shadow_mmu_vmm::{DirtyPace, GuestCount, chunk_bytes};

use crate::guest::{CHUNK_PAGES, DELAY_OFFSET, PACE_FLAG_OFFSET, PAGES_BEGUN_OFFSET, PassProgram};
use crate::vm::VmMemory;

/// How far [`DelayModel::correct`] moves the model's speed toward a
/// measure, as a power of their ratio: half the way, stable at any ratio
/// (the error's logarithm halves each correction), and each measure's
/// grain (a chunk in sixteen) halved too.
const FEEDBACK_GAIN: f64 = 0.5;

/// Samples of each kind the model takes the median of.
const SAMPLES: usize = 3;
/// The probe delay calibration starts with, in iterations.
const FIRST_PROBE: u32 = 64;
/// The largest probe: on any host an iteration takes far less than a
/// chunk's share at the slowest rate worth pacing.
const MAX_PROBE: u32 = 1 << 26;
/// What the probe adds to a chunk, at the least, ns. A slow rate's delay
/// is the iteration's cost extrapolated from the probe to a chunk's share
/// (31 ms at 8 MiB/s a vCPU), so the probe's error, an exit's jitter of
/// tens of microseconds, must be small beside what the probe adds: with a
/// probe of half a millisecond KVM's guests reached 1.0 to 1.25 of
/// 16 MiB/s.
const MIN_PROBE_NS: f64 = 2e6;

/// What a chunk costs a vCPU's guest: its pages' work, and each iteration
/// of its delay loop.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DelayModel {
    /// A chunk without delay, ns.
    pub work_ns: f64,
    /// One iteration of the delay loop, ns.
    pub iter_ns: f64,
}

impl DelayModel {
    /// The delay that makes a chunk storing `bytes` take its share at
    /// `rate` bytes a second: 0 where the chunk's own work takes that long
    /// already (or stores nothing).
    pub fn delay_for(&self, bytes: u64, rate: u64) -> u32 {
        if bytes == 0 || rate == 0 {
            return 0;
        }
        let share_ns = Self::share_ns(bytes, rate);
        ((share_ns - self.work_ns) / self.iter_ns).clamp(0.0, f64::from(u32::MAX)).round() as u32
    }

    /// The guest's chunks took `chunk_ns` each with `delay` iterations
    /// after each: scales the model's costs, work and iterations alike,
    /// `FEEDBACK_GAIN` of the way toward what it predicted against what
    /// it took. A host's speed changes both alike (the clock, what runs
    /// beside the vCPU): after calibration, over chunk exits between
    /// sleeps, KVM's guests here ran their iterations 10 to 25% faster
    /// than calibrated once they spun in their delay loops. A guest too
    /// slow for its rate (no delay) brings its work to its real chunk
    /// time, ready for when it speeds up.
    pub fn correct(&mut self, chunk_ns: f64, delay: u32) {
        let predicted = self.work_ns + self.iter_ns * f64::from(delay);
        if chunk_ns <= 0.0 || predicted <= 0.0 {
            return;
        }
        let k = (chunk_ns / predicted).powf(FEEDBACK_GAIN);
        self.work_ns *= k;
        self.iter_ns *= k;
    }

    /// A chunk's share of time, ns, storing `bytes` at `rate` bytes a second.
    pub fn share_ns(bytes: u64, rate: u64) -> f64 {
        bytes as f64 * 1e9 / rate.max(1) as f64
    }
}

/// A vCPU thread's calibration over chunk exits (module docs): chunks
/// alternate between no delay and a probe delay, the probe growing eightfold
/// until it adds at least half a chunk's work and `MIN_PROBE_NS`, so that
/// the iteration's cost stands out of the noise.
#[derive(Debug)]
pub struct Calibration {
    probe: u32,
    plain: Vec<f64>,
    probed: Vec<f64>,
    /// Whether the next chunk runs with the probe.
    probing: bool,
}

impl Default for Calibration {
    fn default() -> Self {
        Self { probe: FIRST_PROBE, plain: Vec::new(), probed: Vec::new(), probing: false }
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

impl Calibration {
    /// The delay the next chunk runs with.
    pub fn next_delay(&self) -> u32 {
        if self.probing { self.probe } else { 0 }
    }

    /// A full chunk ran `ns` in the guest with the delay [`Self::next_delay`]
    /// gave before it: the model, once there are enough samples.
    pub fn sample(&mut self, ns: f64) -> Option<DelayModel> {
        if self.probing { &mut self.probed } else { &mut self.plain }.push(ns);
        self.probing = !self.probing;
        if self.plain.len() < SAMPLES || self.probed.len() < SAMPLES {
            return None;
        }
        let (work, probed) = (median(&mut self.plain), median(&mut self.probed));
        if probed - work < (work / 2.0).max(MIN_PROBE_NS) && self.probe < MAX_PROBE {
            self.probe = self.probe.saturating_mul(8).min(MAX_PROBE);
            self.probed.clear();
            return None;
        }
        Some(DelayModel { work_ns: work, iter_ns: ((probed - work) / f64::from(self.probe)).max(1e-3) })
    }
}

/// The guests' pace words and each vCPU's model: what the host and the
/// vCPU threads of a VM share to pace its guests (module docs).
#[derive(Debug)]
pub(crate) struct GuestPace {
    pace: Arc<DirtyPace>,
    memory: Arc<VmMemory>,
    /// Each vCPU's pass word's address and share of stores.
    programs: Box<[(u32, u8)]>,
    /// Each vCPU's model, once its thread calibrated one.
    models: Box<[Mutex<Option<DelayModel>>]>,
}

impl GuestPace {
    /// The pace of guests running `programs` in `memory`'s control slot,
    /// whose pass words the slot holds (the VM sized it for them).
    pub(crate) fn new(pace: Arc<DirtyPace>, memory: Arc<VmMemory>, programs: &[PassProgram]) -> Self {
        Self {
            pace,
            memory,
            programs: programs.iter().map(|p| (p.pass_word_gpa, p.write_pct)).collect(),
            models: programs.iter().map(|_| Mutex::new(None)).collect(),
        }
    }

    /// vCPU `id`'s pass word at byte `offset`.
    fn word(&self, id: u32, offset: u32) -> &AtomicU64 {
        &self.memory.control.words()[((self.programs[id as usize].0 + offset) / 8) as usize]
    }

    /// Bytes a full chunk of vCPU `id` stores.
    fn chunk_bytes(&self, id: u32) -> u64 {
        chunk_bytes(u64::from(CHUNK_PAGES), self.programs[id as usize].1)
    }

    fn model(&self, id: u32) -> std::sync::MutexGuard<'_, Option<DelayModel>> {
        self.models[id as usize].lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Each vCPU's model, once calibrated.
    pub(crate) fn models(&self) -> Vec<Option<DelayModel>> {
        (0..self.models.len() as u32).map(|id| *self.model(id)).collect()
    }

    /// Sets vCPU `id`'s delay and pace flag for the rate and the limit now
    /// set: the delay its model gives for the rate, and chunk exits while
    /// a limit is set (its holds), the model is still to calibrate, or the
    /// VM has a dirty ring and a rate (`DirtyPace`'s docs: on a host that
    /// emulates the stores a guest that never exits overflows a ring that
    /// fills). Under the vCPU's model lock, which its thread takes to
    /// publish the model, so that the last to set the words read the latest
    /// rate.
    pub(crate) fn apply(&self, id: u32) {
        let model = self.model(id);
        self.set_words(id, *model);
    }

    /// `apply`'s words, for `model` (the caller holds its lock).
    fn set_words(&self, id: u32, model: Option<DelayModel>) {
        let (bytes, rate) = (self.chunk_bytes(id), self.pace.per_vcpu());
        let calibrating = rate > 0 && bytes > 0 && model.is_none();
        // Relaxed: words the guest reads at its next chunk's end; nothing
        // else is published through them.
        if !calibrating {
            let delay = model.map_or(0, |m| m.delay_for(bytes, rate));
            self.word(id, DELAY_OFFSET).store(u64::from(delay), Ordering::Relaxed);
        }
        let ring = self.pace.limit_at_ring_full();
        let exits = calibrating || self.pace.limit() > 0 || (ring && rate > 0);
        self.word(id, PACE_FLAG_OFFSET).store(u64::from(exits), Ordering::Relaxed);
    }

    /// vCPU `id`'s thread, at a chunk exit: while a rate is set and the
    /// vCPU has no model, takes `ran` (the guest's time for one whole full
    /// chunk, if it was one) as a sample of the delay last set, and sets
    /// the next; with enough, publishes the model and the delay it gives
    /// (the exits then end, unless a limit or the ring needs them).
    pub(crate) fn calibrate(&self, id: u32, calibration: &mut Option<Calibration>, ran: Option<Duration>) {
        let mut model = self.model(id);
        if self.pace.per_vcpu() == 0 || model.is_some() || self.chunk_bytes(id) == 0 {
            *calibration = None;
            return;
        }
        let c = calibration.get_or_insert_with(Calibration::default);
        if let Some(m) = ran.and_then(|d| c.sample(d.as_nanos() as f64)) {
            *model = Some(m);
            *calibration = None;
            self.set_words(id, *model);
            return;
        }
        // Relaxed: as in `set_words`.
        self.word(id, DELAY_OFFSET).store(u64::from(c.next_delay()), Ordering::Relaxed);
    }

    /// vCPU `id`'s guest began `pages` pages in `window` without an exit:
    /// corrects its model, if it has one and a rate is set, and sets the
    /// delay the model then gives.
    fn correct(&self, id: u32, pages: u32, window: Duration) {
        let mut model = self.model(id);
        let (bytes, rate) = (self.chunk_bytes(id), self.pace.per_vcpu());
        let Some(m) = model.as_mut().filter(|_| rate > 0 && bytes > 0) else { return };
        let chunk_ns = window.as_nanos() as f64 * f64::from(CHUNK_PAGES) / f64::from(pages);
        // Relaxed: our own last store (or the calibration's), under the lock.
        let delay = self.word(id, DELAY_OFFSET).load(Ordering::Relaxed) as u32;
        m.correct(chunk_ns, delay);
        self.set_words(id, *model);
    }

    /// The pages vCPU `id`'s guest began so far (wrapping).
    fn pages_begun(&self, id: u32) -> u32 {
        // Relaxed: a count; the guest's add is one aligned 4-byte write.
        self.word(id, PAGES_BEGUN_OFFSET).load(Ordering::Relaxed) as u32
    }

    /// The bytes the guests stored, from the pages each counted as it
    /// began a chunk: at most a chunk a vCPU ahead, each counter wrapping
    /// at 2^32 pages (16 TiB). It owns what it reads, not the `DirtyPace`
    /// it is given to (no cycle).
    pub(crate) fn guest_count(memory: Arc<VmMemory>, programs: &[PassProgram]) -> GuestCount {
        let words: Vec<(usize, u8)> = programs
            .iter()
            .map(|p| (((p.pass_word_gpa + PAGES_BEGUN_OFFSET) / 8) as usize, p.write_pct))
            .collect();
        GuestCount(Box::new(move || {
            let control = memory.control.words();
            // Relaxed: as in `pages_begun`.
            let pages = |w: usize| u64::from(control[w].load(Ordering::Relaxed) as u32);
            words.iter().map(|&(w, pct)| chunk_bytes(pages(w), pct)).sum()
        }))
    }
}

/// How often the pacer looks at each vCPU's guest.
const PACE_TICK: Duration = Duration::from_millis(20);
/// Pages a vCPU's guest begins between two corrections, at least: sixteen
/// chunks, so that the count's grain (a chunk) biases the chunk time it
/// shows by well under a percent.
const PACE_WINDOW_PAGES: u32 = 16 * CHUNK_PAGES;

/// Where a vCPU's current window began: its guest's page count, its
/// thread's exits, the time.
#[derive(Clone, Copy)]
struct PaceWindow {
    pages: u32,
    exits: u64,
    at: Instant,
}

/// The pacer (module docs), on a thread of its own until `stop()`: every
/// [`PACE_TICK`] (or sooner, when `wait` returns early), for each vCPU
/// whose guest began [`PACE_WINDOW_PAGES`] pages since its window opened
/// with no exit (`exits(id)`: its thread's count), corrects its model with
/// the chunk time the count shows, sets the delay the model then gives,
/// and opens a new window (an exit opens one too).
pub(crate) fn run_pacer(
    guest: &GuestPace,
    exits: impl Fn(u32) -> u64,
    wait: impl Fn(Duration),
    stop: impl Fn() -> bool,
) {
    let n = guest.models.len() as u32;
    let read = |id: u32| PaceWindow { pages: guest.pages_begun(id), exits: exits(id), at: Instant::now() };
    let mut windows: Vec<PaceWindow> = (0..n).map(read).collect();
    while !stop() {
        let tick = Instant::now();
        while tick.elapsed() < PACE_TICK && !stop() {
            wait(PACE_TICK.saturating_sub(tick.elapsed()));
        }
        for (id, w) in (0..n).zip(windows.iter_mut()) {
            let now = read(id);
            let pages = now.pages.wrapping_sub(w.pages);
            if now.exits != w.exits {
                *w = now;
            } else if pages >= PACE_WINDOW_PAGES {
                guest.correct(id, pages, now.at - w.at);
                *w = now;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A guest whose chunk costs `work` ns and `iter` ns an iteration.
    fn calibrate(work: f64, iter: f64) -> (DelayModel, usize) {
        calibrate_with_jitter(work, iter, |_| 0.0)
    }

    /// The same, each timed chunk off by `jitter(n)` ns, the `n`th.
    fn calibrate_with_jitter(work: f64, iter: f64, jitter: impl Fn(usize) -> f64) -> (DelayModel, usize) {
        let mut c = Calibration::default();
        for n in 1..200 {
            let ns = work + iter * f64::from(c.next_delay()) + jitter(n);
            if let Some(m) = c.sample(ns) {
                return (m, n);
            }
        }
        panic!("no model");
    }

    #[test]
    fn the_model_is_the_guest_s_costs() {
        // This host's emulated guest: 243 us a chunk, 1 us an iteration.
        let (m, chunks) = calibrate(243_000.0, 1_000.0);
        assert!((m.work_ns - 243_000.0).abs() < 1.0 && (m.iter_ns - 1_000.0).abs() < 1e-6, "{m:?}");
        assert!(chunks <= 18, "{chunks} chunks");
        // Hardware: 20 us a chunk, half a nanosecond an iteration.
        let (m, _) = calibrate(20_000.0, 0.5);
        assert!((m.iter_ns - 0.5).abs() < 1e-6, "{m:?}");
        // 256 KiB at 600 MiB/s: 416.7 us, of which 243 us work.
        let d = DelayModel { work_ns: 243_000.0, iter_ns: 1_000.0 }.delay_for(256 << 10, 600 << 20);
        assert_eq!(d, 174);
        // Faster than the guest can: no delay. Nothing stored: none.
        assert_eq!(DelayModel { work_ns: 243_000.0, iter_ns: 1_000.0 }.delay_for(256 << 10, 4 << 30), 0);
        assert_eq!(DelayModel { work_ns: 1.0, iter_ns: 1.0 }.delay_for(0, 1 << 20), 0);
    }

    /// An exit's jitter, up to 30 us either way (drawn), in every timed
    /// chunk: the delay of a slow rate, the iteration's cost extrapolated
    /// to a share of 31 ms, is still within 2% of the share.
    #[test]
    fn a_slow_rate_s_delay_survives_the_exits_jitter() {
        let (work, iter) = (243_000.0, 1_000.0);
        for seed in 0..32u64 {
            let jitter = |n: usize| {
                // splitmix64 of (seed, n).
                let mut x = (seed << 32 | n as u64).wrapping_add(0x9e37_79b9_7f4a_7c15);
                x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                x ^= x >> 31;
                ((x >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * 30e3
            };
            let (m, _) = calibrate_with_jitter(work, iter, jitter);
            let (bytes, rate) = (256 << 10, 8 << 20);
            let share = DelayModel::share_ns(bytes, rate);
            let t = work + iter * f64::from(m.delay_for(bytes, rate));
            assert!((t - share).abs() < share * 0.02, "{t} against {share}: {m:?}");
        }
    }

    /// Ten corrections (five seconds at 8 MiB/s a vCPU) bring a chunk to
    /// within 1% of its share, whether the model's work is off by an
    /// exit's round trip or the host runs faster or slower than at
    /// calibration.
    #[test]
    fn corrections_bring_the_chunk_time_to_its_share() {
        let bytes = 256 << 10;
        // Calibrated with an exit's 80 us in the work; the guest's chunk
        // really costs 163 us, and 1.3 us an iteration (a busier host) or
        // 0.8 (an idler one).
        for (work, iter, rate) in
            [(163_000.0, 1_300.0, 600 << 20), (163_000.0, 800.0, 16 << 20), (200_000.0, 1_250.0, 16 << 20)]
        {
            let mut m = DelayModel { work_ns: 243_000.0, iter_ns: 1_000.0 };
            let share = DelayModel::share_ns(bytes, rate);
            let chunk = |d: u32| work + iter * f64::from(d);
            for _ in 0..10 {
                let d = m.delay_for(bytes, rate);
                m.correct(chunk(d), d);
            }
            let t = chunk(m.delay_for(bytes, rate));
            assert!((t - share).abs() < share * 0.01, "{t} against {share}: {m:?}");
        }
        // A guest too slow for the rate: the delay goes to 0 and the work
        // to the chunk's real time; once the guest is fast again, the
        // delay comes back.
        let mut m = DelayModel { work_ns: 243_000.0, iter_ns: 1_000.0 };
        let rate = 600 << 20;
        let share = DelayModel::share_ns(bytes, rate);
        for _ in 0..30 {
            let d = m.delay_for(bytes, rate);
            m.correct(2.0 * share + 1_300.0 * f64::from(d), d);
        }
        assert_eq!(m.delay_for(bytes, rate), 0);
        assert!((m.work_ns - 2.0 * share).abs() < share * 0.01, "{m:?}");
        for _ in 0..30 {
            let d = m.delay_for(bytes, rate);
            m.correct(163_000.0 + 1_300.0 * f64::from(d), d);
        }
        let t = 163_000.0 + 1_300.0 * f64::from(m.delay_for(bytes, rate));
        assert!((t - share).abs() < share * 0.01, "{t} against {share}: {m:?}");
    }
}

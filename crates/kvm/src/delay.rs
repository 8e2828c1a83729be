//! The KVM guest's own pace: after each chunk of its pass the guest runs a
//! delay loop of as many iterations as its pass word's delay says
//! ([`crate::guest::pass_program`]), as QEMU's migration test guests pace
//! themselves in guest code. The host calibrates the count per vCPU, once:
//! for a few chunks the guest exits after each (the pace flag), the vCPU
//! thread times them with and without a probe delay ([`Calibration`]), and
//! from then on the delay for any rate follows from the model
//! ([`DelayModel`]) with no exit at all.
//!
//! The timed chunks include an exit's round trip, and a guest's speed
//! changes with what runs beside it (the other vCPUs' delay loops, dirty
//! logging's faults, the migration's threads), so the host keeps the model
//! true: every 20 ms in which a vCPU's guest ran without an exit, it
//! compares the chunk time its page count shows with the model's and moves
//! the model's work part a third of the way ([`DelayModel::correct`]).
//! What it cannot do is make a guest faster than it runs without delay:
//! then the delay is 0 and the rate reached, measured and printed beside
//! the one asked, is lower.

/// How far [`DelayModel::correct`] moves the work toward a measure: a
/// third, stable while the guest's iterations run up to five times slower
/// than when they were calibrated.
const FEEDBACK_GAIN: f64 = 0.3;

/// Samples of each kind the model takes the median of.
const SAMPLES: usize = 3;
/// The probe delay calibration starts with, in iterations.
const FIRST_PROBE: u32 = 64;
/// The largest probe: on any host an iteration takes far less than a
/// chunk's share at the slowest rate worth pacing.
const MAX_PROBE: u32 = 1 << 26;

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
    /// after each, while their share at the rate is `share_ns`: moves the
    /// work part toward what that leaves for it. The work is then what
    /// keeps the rate rather than a time: below 0 where the iterations run
    /// faster than calibrated, held within a share either side (past the
    /// share the delay is 0 anyway, and the model comes back from there
    /// within a few corrections when the guest speeds up).
    pub fn correct(&mut self, chunk_ns: f64, delay: u32, share_ns: f64) {
        let work = chunk_ns - self.iter_ns * f64::from(delay);
        let share = share_ns.max(0.0);
        self.work_ns = (self.work_ns + FEEDBACK_GAIN * (work - self.work_ns)).clamp(-share, share);
    }

    /// A chunk's share of time, ns, storing `bytes` at `rate` bytes a second.
    pub fn share_ns(bytes: u64, rate: u64) -> f64 {
        bytes as f64 * 1e9 / rate.max(1) as f64
    }
}

/// A vCPU thread's calibration over chunk exits (module docs): chunks
/// alternate between no delay and a probe delay, the probe growing eightfold
/// until it adds at least half a chunk's work, so that the iteration's cost
/// stands out of the noise.
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
        if probed - work < work / 2.0 && self.probe < MAX_PROBE {
            self.probe = self.probe.saturating_mul(8).min(MAX_PROBE);
            self.probed.clear();
            return None;
        }
        Some(DelayModel { work_ns: work, iter_ns: ((probed - work) / f64::from(self.probe)).max(1e-3) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A guest whose chunk costs `work` ns and `iter` ns an iteration.
    fn calibrate(work: f64, iter: f64) -> (DelayModel, usize) {
        let mut c = Calibration::default();
        for n in 1..200 {
            let ns = work + iter * f64::from(c.next_delay());
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
        assert!(chunks <= 12, "{chunks} chunks");
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

    #[test]
    fn corrections_bring_the_chunk_time_to_its_share() {
        // Calibrated with an exit's 80 us in the work; the guest's chunk
        // really costs 163 us, and 1.3 us an iteration (a busier host) or
        // 0.8 (an idler one, at a low rate: the work goes below 0).
        for (iter, rate) in [(1_300.0, 600 << 20), (800.0, 16 << 20)] {
            let mut m = DelayModel { work_ns: 243_000.0, iter_ns: 1_000.0 };
            let bytes = 256 << 10;
            let share = DelayModel::share_ns(bytes, rate);
            let chunk = |d: u32| 163_000.0 + iter * f64::from(d);
            for _ in 0..40 {
                let d = m.delay_for(bytes, rate);
                m.correct(chunk(d), d, share);
            }
            let t = chunk(m.delay_for(bytes, rate));
            assert!((t - share).abs() < share * 0.01, "{t} against {share}");
        }
        let mut m = DelayModel { work_ns: 243_000.0, iter_ns: 1_000.0 };
        let (bytes, rate) = (256 << 10, 600 << 20);
        let share = DelayModel::share_ns(bytes, rate);
        // A guest too slow for the rate: the delay goes to 0 and the work
        // stays at the share, ready to come back.
        for _ in 0..30 {
            let d = m.delay_for(bytes, rate);
            m.correct(2.0 * share + 1_300.0 * f64::from(d), d, share);
        }
        assert_eq!(m.delay_for(bytes, rate), 0);
        assert!(m.work_ns <= share);
    }
}

//! What the commands share to print and record: a progress bar that never
//! tears the report, JSON files, `dirty_log_perf_test`'s units, and the
//! figures' helpers.

use std::error::Error;
use std::path::Path;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;

/// Seconds with nanosecond digits, as `dirty_log_perf_test` prints them.
pub fn secs(ns: u64) -> String {
    format!("{}.{:09}s", ns / 1_000_000_000, ns % 1_000_000_000)
}

/// A progress bar on a terminal's stderr; nothing at all otherwise. Report
/// lines go through [`Progress::line`] so they never tear the bar.
pub struct Progress(ProgressBar);

impl Progress {
    /// A bar of `total` steps.
    pub fn new(total: u64, what: &str) -> Self {
        // `stderr()` draws only when stderr is a terminal.
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
                .expect("a valid template"),
        );
        bar.set_message(what.to_string());
        Self(bar)
    }

    /// A spinner, for work of unknown length (a migration's rounds).
    pub fn spinner(what: &str) -> Self {
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}").expect("a valid template"),
        );
        bar.enable_steady_tick(std::time::Duration::from_millis(100));
        bar.set_message(what.to_string());
        Self(bar)
    }

    /// Prints a report line on stdout.
    pub fn line(&self, s: impl AsRef<str>) {
        self.0.suspend(|| println!("{}", s.as_ref()));
    }

    /// One step done.
    pub fn step(&self, msg: impl Into<String>) {
        self.0.set_message(msg.into());
        self.0.inc(1);
    }

    /// Removes the bar.
    pub fn finish(&self) {
        self.0.finish_and_clear();
    }
}

/// Writes `v` to `path`, pretty, creating its directory.
pub fn write_json(path: &Path, v: &Value) -> Result<(), Box<dyn Error>> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(v)?;
    std::fs::write(path, text + "\n").map_err(|e| format!("writing {}: {e}", path.display()))?;
    Ok(())
}

/// Writes a bench's `{"command": ..., "runs": runs}` to `path`.
pub fn write_runs(path: &Path, runs: Vec<Value>) -> Result<(), Box<dyn Error>> {
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    write_json(path, &serde_json::json!({ "command": command, "runs": runs }))
}

/// Parses a size as `dirty_log_perf_test`'s `-b` does: a number with an
/// optional K, M, G or T suffix (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, shift) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("{s:?}: unknown size suffix {c:?} (K, M, G or T)")),
            };
            (&s[..i], shift)
        }
        _ => (s, 0),
    };
    let n: u64 = num.parse().map_err(|e| format!("{s:?}: {e}"))?;
    n.checked_mul(1 << shift).filter(|&b| b > 0).ok_or_else(|| format!("{s:?}: zero or too large"))
}

/// The median of `s`.
pub fn median(mut s: Vec<f64>) -> f64 {
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

/// A figure over repetitions: its median, and how far the runs spread.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    /// The median ([`median`]).
    pub median: f64,
    /// The least.
    pub min: f64,
    /// The most.
    pub max: f64,
}

impl Spread {
    /// The spread of `values` (at least one).
    pub fn of(values: &[f64]) -> Self {
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        Self { median: median(values.to_vec()), min, max }
    }

    /// Does the spread reach both sides of `bound` (a ratio's 1.0, or the
    /// target it is checked against)? Then it says nothing about `bound`.
    pub fn crosses(&self, bound: f64) -> bool {
        self.min < bound && self.max > bound
    }
}

/// A line to print when `vcpus` vCPU threads and `host_threads` other busy
/// threads (the harvest's, the invalidator's) are more than this host's
/// CPUs: they then share CPUs, and every time measured includes the
/// scheduler's delays (a vCPU waiting for a CPU is not waiting for
/// `mmu_lock`). `None` when they fit.
pub fn oversubscribed(vcpus: u32, host_threads: u32) -> Option<String> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    (u64::from(vcpus) + u64::from(host_threads) > cpus).then(|| {
        format!(
            "note: {vcpus} vCPU thread(s) and {host_threads} other busy thread(s) on {cpus} host CPU(s): \
             oversubscribed; the figures include time spent waiting for a CPU"
        )
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn oversubscription_is_named_only_past_the_host_cpus() {
        use super::oversubscribed;
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
        assert!(oversubscribed(cpus, 1).is_some_and(|l| l.contains("oversubscribed")));
        assert_eq!(oversubscribed(cpus - 1, 1), None);
    }

    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("12345"), Ok(12345));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("256m"), Ok(256 << 20));
        assert!(parse_size("1Q").is_err());
        assert!(parse_size("0").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}

//! `--repeat`: every timed figure over the repetitions, as its median with
//! its min and max, and the ratios between designs taken per round (the
//! rounds interleave the designs: each runs once, in turn, so drift of a
//! shared machine hits them alike). A ratio whose spread crosses 1.0, or the
//! target it is checked against, is printed as inconclusive.

use shadow_mmu_vmm::HarvestSpec;

use super::run::Record;
use crate::output::Spread;

/// The lockless design's target for its quiet harvest on two threads
/// against one.
const LOCKLESS_THREADS_TARGET: f64 = 0.6;

/// The lockless design's target for its vCPUs' `mmu_lock` wait during
/// harvests, against the locked design's.
const LOCK_WAIT_TARGET: f64 = 0.1;

/// The runs of one backend, design and harvest at one guest size, by round.
struct Group<'r> {
    guest_bytes: u64,
    spec: HarvestSpec,
    backend: &'static str,
    mmu: String,
    runs: Vec<&'r Record>,
}

fn groups(records: &[Record]) -> Vec<Group<'_>> {
    let mut out: Vec<Group<'_>> = Vec::new();
    for r in records {
        let same = |g: &&mut Group<'_>| {
            g.guest_bytes == r.guest_bytes && g.spec == r.spec && g.backend == r.backend && g.mmu == r.mmu
        };
        match out.iter_mut().find(|g| same(g)) {
            Some(g) => g.runs.push(r),
            None => out.push(Group {
                guest_bytes: r.guest_bytes,
                spec: r.spec,
                backend: r.backend,
                mmu: r.mmu.clone(),
                runs: vec![r],
            }),
        }
    }
    out
}

/// A spread of nanosecond figures, in ms.
fn ms(g: &Group<'_>, f: impl Fn(&Record) -> u64) -> String {
    let s = Spread::of(&g.runs.iter().map(|r| f(r) as f64 / 1e6).collect::<Vec<_>>());
    format!("{:.3} ms [{:.3}, {:.3}]", s.median, s.min, s.max)
}

/// The later dirtying passes' mean (iterations 2 on).
fn later_passes_ns(r: &Record) -> u64 {
    let later: Vec<u64> = r.run.iterations.iter().skip(1).map(|i| i.dirty_memory_ns).collect();
    later.iter().sum::<u64>() / later.len().max(1) as u64
}

/// Per round, `f(a) / f(b)`, over the rounds both have.
fn ratio(a: &Group<'_>, b: &Group<'_>, f: impl Fn(&Record) -> u64) -> Spread {
    let v: Vec<f64> = a.runs.iter().zip(&b.runs).map(|(x, y)| f(x) as f64 / f(y).max(1) as f64).collect();
    Spread::of(&v)
}

fn verdict(s: &Spread, bound: f64) -> String {
    if s.crosses(bound) {
        format!(": inconclusive, the spread crosses {bound:.1}")
    } else if s.max < bound {
        format!(": below {bound:.1} in every round")
    } else {
        format!(": above {bound:.1} in every round")
    }
}

/// Prints each group's figures, each design's ratios to the locked
/// design's, and each harvest on several threads against one.
pub(super) fn print_repetitions(records: &[Record], repeat: u32) {
    if repeat < 2 {
        return;
    }
    let gs = groups(records);
    println!("== over {repeat} repetitions: median [min, max]");
    for g in &gs {
        print_group(g);
    }
    let find = |g: &Group<'_>, mmu: &str, spec: HarvestSpec| {
        gs.iter().find(|o| {
            o.guest_bytes == g.guest_bytes && o.spec == spec && o.backend == g.backend && o.mmu == mmu
        })
    };
    for g in gs.iter().filter(|g| g.backend == "engine") {
        if g.mmu != "locked"
            && let Some(l) = find(g, "locked", g.spec)
        {
            print_against_locked(g, l);
        }
        if g.spec.harvest_threads > 1
            && let Some(one) = find(g, &g.mmu, HarvestSpec { harvest_threads: 1, ..g.spec })
        {
            print_threads(g, one);
        }
    }
}

fn tag(g: &Group<'_>) -> String {
    format!("{} MiB, {}", g.guest_bytes >> 20, g.spec.label())
}

/// One group's timed figures, and where the backend measures them, what
/// its vCPUs lost during harvests.
fn print_group(g: &Group<'_>) {
    let tag = tag(g);
    println!(
        "{tag}: {} {}: harvest {}, quiet harvest {}, enable {}, first dirtying pass {}, later passes {}",
        g.backend,
        g.mmu,
        ms(g, |r| r.run.harvest_avg_ns()),
        ms(g, |r| r.run.quiet.harvest_ns()),
        ms(g, |r| r.run.enable_dirty_logging_ns),
        ms(g, |r| r.run.iterations.first().map_or(0, |i| i.dirty_memory_ns)),
        ms(g, later_passes_ns),
    );
    if !g.runs.iter().all(|r| r.latency.is_some()) {
        return;
    }
    let p99 = |r: &Record, inside: bool| {
        r.latency.as_ref().map_or(0, |(i, o)| if inside { i } else { o }.quantile_ns(0.99))
    };
    let us = |f: &dyn Fn(&Record) -> u64| {
        let s = Spread::of(&g.runs.iter().map(|r| f(r) as f64 / 1e3).collect::<Vec<_>>());
        format!("{:.2} us [{:.2}, {:.2}]", s.median, s.min, s.max)
    };
    let fractions: Vec<f64> = g.runs.iter().filter_map(|r| r.progress.as_ref()?.fraction()).collect();
    let fr = if fractions.is_empty() {
        "unmeasured".to_string()
    } else {
        let f = Spread::of(&fractions);
        format!("{:.3} [{:.3}, {:.3}] of outside", f.median, f.min, f.max)
    };
    println!(
        "{tag}: {} {}: vCPU mmu_lock wait during harvests {}, write-fault p99 inside harvests {}, outside {}, \
         guest progress during harvests {fr}",
        g.backend,
        g.mmu,
        ms(g, Record::harvest_lock_wait_ns),
        us(&|r| p99(r, true)),
        us(&|r| p99(r, false)),
    );
}

/// A design against the locked design, round by round: the vCPUs' lock
/// wait during harvests (against its target), the harvest, the quiet one.
fn print_against_locked(g: &Group<'_>, l: &Group<'_>) {
    let tag = tag(g);
    let h = ratio(g, l, |r| r.run.harvest_avg_ns());
    let q = ratio(g, l, |r| r.run.quiet.harvest_ns());
    if l.runs.iter().any(|r| r.harvest_lock_wait_ns() > 0) {
        let w = ratio(g, l, Record::harvest_lock_wait_ns);
        println!(
            "{tag}: {}/locked vCPU mmu_lock wait during harvests {:.3} [{:.3}, {:.3}]{}",
            g.mmu,
            w.median,
            w.min,
            w.max,
            verdict(&w, LOCK_WAIT_TARGET)
        );
    }
    println!(
        "{tag}: {}/locked harvest {:.3} [{:.3}, {:.3}]{}; quiet {:.3} [{:.3}, {:.3}]{}",
        g.mmu,
        h.median,
        h.min,
        h.max,
        verdict(&h, 1.0),
        q.median,
        q.min,
        q.max,
        verdict(&q, 1.0)
    );
}

/// A harvest on several threads against one thread (`one`), round by
/// round: what waking the helpers ahead costs the vCPUs' pass, the floor's
/// own ratio beside the harvest's, and the quiet harvest against its target.
fn print_threads(g: &Group<'_>, one: &Group<'_>) {
    let tag = tag(g);
    // The lockless design's target is 0.6; the others are checked against
    // 1.0 (does a second thread help at all?).
    let target = if g.mmu == "lockless" { LOCKLESS_THREADS_TARGET } else { 1.0 };
    let quiet =
        |x: &Record, y: &Record| x.run.quiet.harvest_ns() as f64 / y.run.quiet.harvest_ns().max(1) as f64;
    let pass = ratio(g, one, |r| r.run.quiet.dirty_memory_ns);
    println!(
        "{tag}: {}: the vCPUs' pass before the quiet harvest, {} helper(s) woken ahead and spinning, against \
         none: {:.3} [{:.3}, {:.3}]",
        g.mmu,
        g.spec.harvest_threads - 1,
        pass.median,
        pass.min,
        pass.max
    );
    let floor: Vec<f64> = g.runs.iter().filter_map(|r| r.floor_threads_ratio).collect();
    if !floor.is_empty() {
        let f = Spread::of(&floor);
        let per_round: Vec<String> = g
            .runs
            .iter()
            .zip(&one.runs)
            .map(|(x, y)| {
                format!("{:.3} (floor {:.3})", quiet(x, y), x.floor_threads_ratio.unwrap_or(f64::NAN))
            })
            .collect();
        println!(
            "{tag}: {}: the compare-exchange floor on {} threads against 1, right after each round's run: {:.3} \
             [{:.3}, {:.3}]; per round, the quiet harvest's ratio and the floor's: {}",
            g.mmu,
            g.spec.harvest_threads,
            f.median,
            f.min,
            f.max,
            per_round.join(", ")
        );
    }
    let q = ratio(g, one, |r| r.run.quiet.harvest_ns());
    let met = g.runs.iter().zip(&one.runs).filter(|(x, y)| quiet(x, y) <= target).count();
    println!(
        "{tag}: {}: quiet harvest on {} threads against 1: {:.3} [{:.3}, {:.3}], at or under {target:.1} in {met} \
         of {} rounds{}",
        g.mmu,
        g.spec.harvest_threads,
        q.median,
        q.min,
        q.max,
        g.runs.len().min(one.runs.len()),
        verdict(&q, target)
    );
}

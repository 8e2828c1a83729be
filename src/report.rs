//! Human-readable reports of runs.

use std::fmt::Write;

use shadow_mmu_testkit::harness::{RunConfig, RunReport};

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// One line describing a configuration.
pub fn describe(cfg: &RunConfig) -> String {
    format!(
        "mmu={} fast-page-fault={} vcpus={} guest={} MiB workload={} writes={}% address-spaces={} \
         interval={} ms budget={} tlb={} large-pages={} slot-churn={} relog-every={} slots={} \
         invalidate-every={} dirty-log={} clear-chunk-pages={} ring-entries={} lock-faults={}",
        cfg.mmu,
        cfg.fast_page_fault,
        cfg.vcpus,
        cfg.guest_bytes >> 20,
        cfg.workload.pattern,
        cfg.workload.write_pct,
        cfg.workload.address_spaces,
        cfg.interval.as_millis(),
        cfg.max_mmu_pages.map_or("default".to_string(), |n| n.to_string()),
        cfg.tlb_entries,
        cfg.large_pages,
        cfg.slot_churn,
        cfg.relog_every.map_or("never".to_string(), |n| n.to_string()),
        cfg.slots,
        cfg.invalidate_every.map_or("never".to_string(), |d| format!("{} us", d.as_micros())),
        cfg.harvest.label(),
        cfg.harvest.clear_chunk_pages,
        cfg.harvest.ring_entries,
        cfg.workload.lock_faults.label(),
    )
}

/// The summary `shadow-mmu run` prints: the guest, the harvests, the MMU,
/// the verdict.
pub fn summary(cfg: &RunConfig, r: &RunReport) -> String {
    let mut s = String::new();
    let secs = r.elapsed.as_secs_f64().max(1e-9);
    let _ = writeln!(s, "  elapsed               {:.2} s, {} collections + final", secs, r.collections);
    guest_lines(&mut s, cfg, r, secs);
    harvest_lines(&mut s, cfg, r);
    mmu_lines(&mut s, cfg, r, secs);
    verdict_lines(&mut s, r);
    s
}

/// What the guest did: accesses, faults, pages dirtied.
fn guest_lines(s: &mut String, cfg: &RunConfig, r: &RunReport, secs: f64) {
    let (v, m) = (&r.vcpu, &r.vm);
    let _ = writeln!(
        s,
        "  guest accesses        {} ({} writes, {} reads), {:.1} M/s, TLB hits {}",
        v.reads + v.writes,
        v.writes,
        v.reads,
        (v.reads + v.writes) as f64 / secs / 1e6,
        v.tlb_hits
    );
    let _ = writeln!(
        s,
        "  pages faulted         {} ({} on writes), avg fault {:.0} ns",
        v.page_faults,
        v.write_faults,
        v.fault_ns as f64 / v.page_faults.max(1) as f64
    );
    let _ = writeln!(
        s,
        "  pages dirtied         {} (marked in the dirty {}), {} write faults fixed by fast_page_fault",
        m.mmu.pages_marked_dirty,
        if cfg.harvest.ring().is_some() { "rings" } else { "bitmap" },
        m.mmu.fast_page_faults
    );
}

/// The harvests: CLEAR, the rings, pages harvested, the time of each.
fn harvest_lines(s: &mut String, cfg: &RunConfig, r: &RunReport) {
    let (v, m) = (&r.vcpu, &r.vm);
    let max_gdl = r.get_dirty_log_ns.iter().copied().max().unwrap_or(0);
    if m.mmu.clear_dirty_log_calls > 0 {
        let _ = writeln!(
            s,
            "  clear_dirty_log       {} calls, {:.3} ms in all, {} pages cleared and re-protected",
            m.mmu.clear_dirty_log_calls,
            ms(m.mmu.clear_dirty_log_ns),
            m.mmu.pages_cleared
        );
    }
    if cfg.harvest.ring().is_some() {
        let _ = writeln!(
            s,
            "  dirty rings           {} entries harvested, {} reset in {} resets ({:.3} ms), {} ring-full exits",
            m.mmu.ring_entries_harvested,
            m.mmu.ring_entries_reset,
            m.mmu.ring_resets,
            ms(m.mmu.ring_reset_ns),
            v.dirty_ring_full_exits
        );
    }
    let _ = writeln!(
        s,
        "  pages harvested       {} ({} with no new content)",
        r.harvested_pages, r.dirty_unchanged
    );
    let _ = writeln!(s, "  enable dirty logging  {:.3} ms", ms(r.enable_logging_ns));
    let _ = writeln!(
        s,
        "  get_dirty_log         avg {:.3} ms, max {:.3} ms, {} sptes write-protected",
        ms(r.get_dirty_log_avg_ns()),
        ms(max_gdl),
        m.mmu.sptes_write_protected
    );
}

/// The MMU's costs: mmu_lock, TLB flushes, shadow pages, sptes, the
/// lockless design's grace periods, what ran beside the guest.
fn mmu_lines(s: &mut String, cfg: &RunConfig, r: &RunReport, secs: f64) {
    let (v, m) = (&r.vcpu, &r.vm);
    let _ = writeln!(
        s,
        "  mmu_lock              held {:.1} ms ({:.1}% of the run), waited {:.1} ms, {} acquisitions, {} contended",
        ms(m.mmu_lock_hold_ns),
        ms(m.mmu_lock_hold_ns) / 10.0 / secs,
        ms(m.mmu_lock_wait_ns),
        m.mmu_lock_acquisitions,
        m.mmu_lock_contended
    );
    let _ = writeln!(
        s,
        "  TLB flushes           {} remote ({:.1} ms waiting), {} handled by vCPUs",
        m.mmu.remote_tlb_flushes,
        ms(m.mmu.remote_tlb_flush_ns),
        v.tlb_flushes
    );
    let _ = writeln!(
        s,
        "  shadow pages          {} used of {}, {} created, {} zapped ({} by the shrinker)",
        m.mmu_pages_used, m.mmu_pages_max, m.mmu.sp_created, m.mmu.sp_zapped, m.mmu.sp_shrunk
    );
    let _ = writeln!(
        s,
        "  sptes                 {} mapped ({} large, {} large dropped), longest rmap {}",
        m.mmu.sptes_mapped, m.mmu.large_sptes_mapped, m.mmu.large_sptes_dropped, r.audit.max_rmap_len
    );
    if cfg.mmu.is_lockless() {
        let _ = writeln!(
            s,
            "  lockless              {} rmap walk restarts, {} grace periods waited, {} pool objects returned, \
             {} harvest read-side sections",
            m.mmu.lockless_walk_restarts,
            m.grace_periods_waited,
            m.pool_objects_returned,
            m.mmu.harvest_read_sections
        );
    }
    let _ = writeln!(
        s,
        "  pool backlog          {} waits for a grace period under mmu_lock, longest {:.1} us",
        m.pool_backlog_waits,
        m.pool_backlog_wait_max_ns as f64 / 1e3
    );
    if r.invalidations > 0 {
        let _ = writeln!(s, "  mmu notifier          {} invalidations during logging", r.invalidations);
    }
    if cfg.workload.lock_faults.needs_reserve() {
        let _ = writeln!(
            s,
            "  lock faults           {} fresh touches, {} split touches during logging{}",
            r.reserve.fresh,
            r.reserve.split,
            if r.reserve.fresh_exhausted || r.reserve.split_exhausted {
                " (a vCPU touched all of its reserve part: fewer than asked)"
            } else {
                ""
            }
        );
    }
    if r.relogs > 0 {
        let _ = writeln!(s, "  logging re-enabled    {} times with the vCPUs running", r.relogs);
    }
    if r.slot_churn_cycles > 0 {
        let _ = writeln!(
            s,
            "  slot churn            {} deletions and re-additions of slot {}",
            r.slot_churn_cycles, cfg.slots
        );
    }
}

/// Lost pages, stray bits, errors, and the verdict.
fn verdict_lines(s: &mut String, r: &RunReport) {
    let _ = writeln!(s, "  lost pages            {}", r.lost_pages);
    for l in &r.lost {
        let _ = writeln!(s, "    {l}");
    }
    if r.stray_bits > 0 {
        let _ = writeln!(s, "  stray bitmap bits     {}", r.stray_bits);
    }
    for e in &r.errors {
        let _ = writeln!(s, "  error: {}", error_chain(e));
    }
    let _ = writeln!(s, "{}", if r.ok() { "OK" } else { "FAILED" });
}

pub use shadow_mmu_vmm::error_chain;

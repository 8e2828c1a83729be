//! A migration's statistics, under the names QEMU's `info migrate` (and
//! its QMP `query-migrate`) gives them, in snake_case: what the terminal
//! prints, the JSON holds and the plots draw, for both ends and both
//! backends (one type each, one source of truth).
//!
//! Units as QEMU's where it has one: times in milliseconds, `mbps` in
//! megabits per second (10^6 bits), `dirty_pages_rate` in pages per second.
//! A figure that was not measured (the downtime of a migration that did not
//! complete, a check that did not run) is `None`: `null` in JSON, "not
//! measured" or "not checked" on the terminal, never 0.

use serde::Serialize;
use shadow_mmu_vmm::VcpuLoss;

/// How a migration ended, QEMU's `status` words (at the destination:
/// `completed` or `failed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationStatus {
    /// Still iterating (a progress report).
    #[default]
    Active,
    /// The destination runs the guest.
    Completed,
    /// Given up on by the rules (the timeout with `cancel`): the source
    /// runs on.
    Cancelled,
    /// An error ended it (the peer, the stream, the VM): the source runs on.
    Failed,
    /// The source sent `Commit` and heard no outcome, not even by asking
    /// again: the destination may or may not run the guest. The source
    /// stays paused in `postmigrate` until the operator decides.
    Unknown,
}

impl MigrationStatus {
    /// QEMU's word for it.
    pub fn name(self) -> &'static str {
        match self {
            MigrationStatus::Active => "active",
            MigrationStatus::Completed => "completed",
            MigrationStatus::Cancelled => "cancelled",
            MigrationStatus::Failed => "failed",
            MigrationStatus::Unknown => "unknown",
        }
    }
}

/// What became of the source's copy of the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SourceVm {
    /// It runs here (it never stopped, or it resumed).
    Running,
    /// Paused, its memory kept (QEMU's `postmigrate` run state): the
    /// handover's outcome is unknown, or the migration is still in its
    /// stop-and-copy.
    Postmigrate,
    /// Discarded: the destination runs the guest, or the operator said so.
    Discarded,
}

/// What the operator did to a source left in `postmigrate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OperatorAction {
    /// Resumed the guest here.
    Resume,
    /// Discarded it.
    Discard,
}

/// The guest's stall: the vCPU time a migration cost the guest beyond its
/// own work, summed over the vCPUs, by cause, ms (`shadow_mmu_vmm::VcpuLoss`).
/// Counted: waits for `mmu_lock` in page faults that began behind a
/// harvest, remote TLB flush handling, throttle holds, waits on a full
/// dirty ring. Not counted: the downtime (the vCPUs paused for the
/// stop-and-copy); lock waits behind other vCPUs' faults or the host's
/// invalidations (reported beside, as `other_lock_wait_ms`: they happen
/// with or without a migration); the write-protection faults themselves;
/// on KVM, the lock waits and flushes inside `KVM_RUN`, which userspace
/// cannot see (reported as 0).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct GuestStall {
    /// All causes.
    pub total_ms: f64,
    /// `mmu_lock` waits behind a harvest.
    pub harvest_lock_wait_ms: f64,
    /// TLB flush requests.
    pub tlb_flush_ms: f64,
    /// Throttle holds (auto-converge).
    pub throttle_ms: f64,
    /// Full dirty rings.
    pub ring_full_ms: f64,
    /// Not in the total: `mmu_lock` waits behind other vCPUs' faults and
    /// the host's invalidations.
    pub other_lock_wait_ms: f64,
}

impl GuestStall {
    /// The stall of `loss`.
    pub fn of(loss: &VcpuLoss) -> Self {
        let ms = |ns: u64| ns as f64 / 1e6;
        let all_waits = loss.mmu_lock_read_wait_ns + loss.mmu_lock_write_wait_ns;
        Self {
            total_ms: ms(loss.stall_ns()),
            harvest_lock_wait_ms: ms(loss.harvest_lock_wait_ns),
            tlb_flush_ms: ms(loss.tlb_flush_ns),
            throttle_ms: ms(loss.throttle_ns),
            ring_full_ms: ms(loss.ring_full_ns),
            other_lock_wait_ms: ms(all_waits.saturating_sub(loss.harvest_lock_wait_ns)),
        }
    }

    /// `12.3 ms (mmu_lock waits behind harvests 1.0 ms; ...)`.
    pub fn line(&self) -> String {
        format!(
            "{:.1} ms (mmu_lock waits behind harvests {:.1} ms; TLB flushes {:.1} ms; throttle {:.1} ms; ring full \
             {:.1} ms; not counted: mmu_lock waits behind other vCPUs and invalidations {:.1} ms)",
            self.total_ms,
            self.harvest_lock_wait_ms,
            self.tlb_flush_ms,
            self.throttle_ms,
            self.ring_full_ms,
            self.other_lock_wait_ms
        )
    }
}

/// The downtime by phase, ms, from the source's clock: consecutive
/// intervals from the vCPUs' stop to the destination's `Running`, so that
/// they sum to `downtime_ms` (a phase not reached is `None`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct DowntimePhases {
    /// Pausing the vCPUs (each saves its state as it stops).
    pub pause_ms: Option<f64>,
    /// The final harvest.
    pub final_harvest_ms: Option<f64>,
    /// Sending the pages pending and those the final harvest found.
    pub send_ms: Option<f64>,
    /// Waiting for the digest pass, which runs beside the send, and
    /// sending a digest of every page (0 with `--verify audit`, which sends
    /// them after the guest runs).
    pub digests_ms: Option<f64>,
    /// Sending the vCPUs' states and `Done`.
    pub state_ms: Option<f64>,
    /// From `Done` to `Verified`: the destination's last checks, its
    /// vCPUs' restore, and the trip back.
    pub check_ms: Option<f64>,
    /// From `Verified` to `Running`: `Commit`'s trip, the destination
    /// starting the guest, and the acknowledgement's trip back.
    pub resume_ms: Option<f64>,
}

impl DowntimePhases {
    /// The phases in order, with their names.
    pub fn named(&self) -> [(&'static str, Option<f64>); 7] {
        [
            ("pause", self.pause_ms),
            ("final harvest", self.final_harvest_ms),
            ("send", self.send_ms),
            ("digests", self.digests_ms),
            ("state", self.state_ms),
            ("check", self.check_ms),
            ("resume", self.resume_ms),
        ]
    }

    /// Their sum, ms.
    pub fn sum_ms(&self) -> f64 {
        self.named().iter().filter_map(|(_, v)| *v).sum()
    }

    /// `pause 0.1 ms, final harvest 1.2 ms, ...`.
    pub fn line(&self) -> String {
        let parts: Vec<String> =
            self.named().iter().map(|(n, v)| format!("{n} {}", measured_ms(*v))).collect();
        parts.join(", ")
    }
}

/// One pre-copy round: from one sync of the dirty log to the next (round
/// 0, from logging on; the last one is the stop-and-copy's). With QEMU's
/// loop a sync comes mid-pass, when the unsent pages fit the threshold, so
/// a round also sends what the round before left; with whole rounds, it
/// sends exactly what its harvest found.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RoundStats {
    /// Its number.
    pub round: u32,
    /// Pages the sync that began it found dirty (round 0: every page).
    pub pages_harvested: u64,
    /// Bytes it put on the wire (frames included).
    pub bytes_sent: u64,
    /// Pages sent as data.
    pub normal_pages: u64,
    /// Zero pages sent as a flag.
    pub duplicate_pages: u64,
    /// Time of the sync that began it, ns (0 for round 0).
    pub harvest_ns: u64,
    /// The vCPUs' write faults that overlapped that harvest: how many, and
    /// their 99th percentile, ns (where the backend times faults: the
    /// engine).
    pub harvest_faults: Option<u64>,
    /// See `harvest_faults`.
    pub fault_p99_during_harvest_ns: Option<u64>,
    /// Time to send it, ms.
    pub send_ms: f64,
    /// Bandwidth measured over it, bytes per second.
    pub bandwidth_bytes_per_s: f64,
    /// The vCPU throttle during it, percent.
    pub cpu_throttle_percentage: u32,
    /// The guest's stall from the end of the round before (for round 0, from
    /// logging on) to its end: its harvest and its send (`None` for the
    /// stop-and-copy's round, which is downtime, or where the backend
    /// measures none).
    pub guest_stall_ms: Option<f64>,
    /// ... by cause.
    pub guest_stall: Option<GuestStall>,
}

/// The source's statistics (`info migrate` on the source).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MigrationStats {
    /// How it ended.
    pub status: MigrationStatus,
    /// Why, when it did not complete.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The source's copy of the guest.
    pub source_vm: SourceVm,
    /// What the operator did, if the outcome was unknown.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub operator_action: Option<OperatorAction>,
    /// From the start to the destination's `Running` (or to the end), ms.
    pub total_time_ms: f64,
    /// Connecting, the header and turning dirty logging on, ms (`None`:
    /// the destination never said `Ready`).
    pub setup_time_ms: Option<f64>,
    /// From the vCPUs' stop to the destination's `Running`, ms (`None`
    /// unless it completed; when `Running` was lost and a query found the
    /// guest running, until the source heard it).
    pub downtime_ms: Option<f64>,
    /// Where the downtime went, phase by phase (`None`: the vCPUs were
    /// not paused).
    pub downtime_phases: Option<DowntimePhases>,
    /// The last estimate before the stop: the pages pending over the
    /// measured bandwidth, plus `fixed_downtime_ms`, ms (`None`: no
    /// bandwidth was measured).
    pub expected_downtime_ms: Option<f64>,
    /// The downtime's costs that do not depend on the pages pending, as
    /// the switchover rule counted them: the digest pass at the rate
    /// measured at setup, the digests' bytes over the measured bandwidth,
    /// and the handover's two exchanges (`Done` to `Verified`, `Commit` to
    /// `Running`) at `round_trip_ms` each, ms (Cloud Hypervisor's proposed
    /// `fixed_downtime`; `None`: not yet measured).
    pub fixed_downtime_ms: Option<f64>,
    /// The round trip to the destination, ms: a `Ping` and its `Pong` once
    /// the destination was ready, with nothing else on the wire.
    pub round_trip_ms: Option<f64>,
    /// The downtime limit the convergence rule used, ms.
    pub downtime_limit_ms: u64,
    /// Bytes put on the wire.
    pub transferred_bytes: u64,
    /// Bytes of dirty memory not yet sent (0 once completed).
    pub remaining_bytes: u64,
    /// Bytes of guest memory.
    pub total_bytes: u64,
    /// Throughput over the whole migration, megabits per second.
    pub mbps: f64,
    /// Pages the guest dirtied per second, over the iterative rounds'
    /// harvests.
    pub dirty_pages_rate: f64,
    /// Syncs of the dirty log (QEMU's `dirty-sync-count`): one per round
    /// after round 0, and the stop-and-copy's.
    pub dirty_sync_count: u64,
    /// Pages sent as data.
    pub normal_pages: u64,
    /// Zero pages sent as a flag (QEMU's "duplicate").
    pub duplicate_pages: u64,
    /// The vCPU throttle at the end, percent.
    pub cpu_throttle_percentage: u32,
    /// Whether the rules converged (pending fit in bandwidth x downtime
    /// limit), rather than a forced stop at the timeout.
    pub converged: bool,
    /// With `--verify audit`: the pages the destination's audit found
    /// different (`None`: no audit ran, or it did not finish).
    pub audit_mismatched_pages: Option<u64>,
    /// ... and the audit's time, from `Running` to the verdict, ms.
    pub audit_ms: Option<f64>,
    /// The guest's stall from logging on to the pause (or to now), ms
    /// (`None` where the backend measures none).
    pub guest_stall_ms: Option<f64>,
    /// ... by cause.
    pub guest_stall: Option<GuestStall>,
    /// Every round.
    pub rounds: Vec<RoundStats>,
}

impl MigrationStats {
    /// A migration of `total_bytes` of memory, just begun.
    pub fn new(total_bytes: u64, downtime_limit_ms: u64) -> Self {
        Self {
            status: MigrationStatus::Active,
            error: None,
            source_vm: SourceVm::Running,
            operator_action: None,
            total_time_ms: 0.0,
            setup_time_ms: None,
            downtime_ms: None,
            downtime_phases: None,
            expected_downtime_ms: None,
            fixed_downtime_ms: None,
            round_trip_ms: None,
            downtime_limit_ms,
            transferred_bytes: 0,
            remaining_bytes: total_bytes,
            total_bytes,
            mbps: 0.0,
            dirty_pages_rate: 0.0,
            dirty_sync_count: 0,
            normal_pages: 0,
            duplicate_pages: 0,
            cpu_throttle_percentage: 0,
            converged: false,
            audit_mismatched_pages: None,
            audit_ms: None,
            guest_stall_ms: None,
            guest_stall: None,
            rounds: Vec::new(),
        }
    }

    /// What became of the source's copy, and who decided.
    pub fn source_vm_line(&self) -> String {
        let vm = match self.source_vm {
            SourceVm::Running => "running",
            SourceVm::Postmigrate => "paused (postmigrate)",
            SourceVm::Discarded => "discarded",
        };
        let by = match self.operator_action {
            Some(OperatorAction::Resume) => " (resumed by the operator)",
            Some(OperatorAction::Discard) => " (by the operator)",
            None => "",
        };
        format!("source VM: {vm}{by}")
    }

    /// The `info migrate` lines (the error among them, once).
    pub fn lines(&self) -> Vec<String> {
        let mut l = vec![
            format!("Migration status: {}", self.status.name()),
            self.source_vm_line(),
            format!("total time: {:.0} ms", self.total_time_ms),
            format!("downtime: {}", measured_ms(self.downtime_ms)),
            format!(
                "downtime phases: {}",
                self.downtime_phases.map_or_else(|| "not measured".into(), |p| p.line())
            ),
            format!("expected downtime: {}", measured_ms(self.expected_downtime_ms)),
            format!("fixed downtime: {}", measured_ms(self.fixed_downtime_ms)),
            format!("round trip: {}", measured_ms(self.round_trip_ms)),
            format!("setup: {}", measured_ms(self.setup_time_ms)),
            format!("transferred ram: {} kbytes", self.transferred_bytes / 1024),
            format!("throughput: {:.2} mbps", self.mbps),
            format!("remaining ram: {} kbytes", self.remaining_bytes / 1024),
            format!("total ram: {} kbytes", self.total_bytes / 1024),
            format!("duplicate: {} pages", self.duplicate_pages),
            format!("normal: {} pages", self.normal_pages),
            format!("normal bytes: {} kbytes", self.normal_pages * 4),
            format!("dirty sync count: {}", self.dirty_sync_count),
            format!("dirty pages rate: {:.0} pages", self.dirty_pages_rate),
            format!("cpu throttle percentage: {}", self.cpu_throttle_percentage),
            format!(
                "audit: {}",
                match (self.audit_mismatched_pages, self.audit_ms) {
                    (Some(n), Some(ms)) => format!("{n} pages differ ({ms:.1} ms after the resume)"),
                    _ => "not run".into(),
                }
            ),
            format!("guest stall: {}", self.guest_stall.map_or_else(|| "not measured".into(), |s| s.line())),
        ];
        if let Some(e) = &self.error {
            l.push(format!("error: {e}"));
        }
        l
    }
}

/// `12.3 ms`, or `not measured`.
pub fn measured_ms(v: Option<f64>) -> String {
    v.map_or_else(|| "not measured".into(), |v| format!("{v:.1} ms"))
}

/// The destination's statistics.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct IncomingStats {
    /// `completed` when the guest runs here, `failed` when it never ran
    /// here (the partial VM is discarded).
    pub status: MigrationStatus,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The migration's id (from the header; 0 before it came).
    pub id: u64,
    /// The source's backend and configuration, from the header.
    pub backend: String,
    /// Bytes read off the wire.
    pub received_bytes: u64,
    /// Pages loaded as data.
    pub normal_pages: u64,
    /// Zero pages loaded from a flag.
    pub duplicate_pages: u64,
    /// Rounds received.
    pub rounds: u32,
    /// Pages whose content differs from the source's final digest, or
    /// that no digest covered (`None`: the final check did not run).
    pub mismatched_pages: Option<u64>,
    /// Time comparing the source's digests with those of the pages as
    /// loaded, ms (in the downtime; `None`: no digest came).
    pub verify_ms: Option<f64>,
}

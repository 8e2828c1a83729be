//! The source of a live migration: pre-copy over any [`MigrationVm`], with
//! QEMU's and Cloud Hypervisor's rules, and the source's half of the
//! handover ([`crate::handover`]). It knows the dirty-log interface the VM
//! offers ([`Capabilities`](shadow_mmu_vmm::Capabilities)),
//! never which backend runs it.
//!
//! 1. Setup: the header; the destination builds its VM and says `Ready`
//!    (its setup is ours, as QEMU's destination allocates before it
//!    listens); then dirty logging on.
//! 2. Round 0 sends every page; with `INITIALLY_SET` the log starts all
//!    ones and each window is CLEARed (write-protected) just before it is
//!    sent, so CLEAR paces the bulk copy.
//! 3. QEMU's loop ([`Precopy::Qemu`], `migration_iteration_run`): pages go
//!    window by window from a cursor that wraps; every [`ITERATION_CHECK`]
//!    the pages not yet sent are compared with the threshold, the
//!    bandwidth ([`BANDWIDTH_PERIOD`]s) times what the downtime limit
//!    leaves after the fixed costs. At or below it, the dirty log is
//!    synced at once (GET, or GET whose CLEARs wait for each window, or the
//!    rings): a new round begins, its pages join those still unsent.
//!    [`Precopy::Rounds`], kept to compare with, sends all of a harvest
//!    before the next one.
//! 4. When the exact pending work (unsent plus just synced) fits the
//!    threshold, or at the timeout with `force` (checked between frames),
//!    the stop-and-copy: pause the vCPUs, the final harvest (on the VM's
//!    harvest threads), the rest of the pages, a digest of every page, the
//!    vCPUs' state, `Done`. The fixed costs are those measured in this
//!    migration: the digest pass at the rate of a sample of this guest's
//!    memory, and the digests' bytes at the bandwidth; the pause, the
//!    destination's check and the resume are measured as they happen
//!    ([`DowntimePhases`]), not foreseen.
//! 5. The handover: `Verified`, then `Commit` (the point of no return),
//!    then `Running`. Downtime runs from the pause to `Running`, as QEMU
//!    measures it. Without an answer after `Commit`, the source asks the
//!    destination again over new connections for the settle window, then
//!    stays paused for the operator ([`Outcome::Unsettled`]).
//!
//! Invariants:
//! - every page the guest stored to after it was last sent is in a later
//!   harvest (the dirty log's promise), so once paused, sending the final
//!   harvest's pages and the pending ones leaves the destination equal to
//!   the source, which the digests prove page by page;
//! - before `Commit`, any failure (the peer, the stream, a deadline, the
//!   timeout with `cancel`) resumes the vCPUs, unthrottled, turns dirty
//!   logging off and leaves the VM as before the migration: it can migrate
//!   again; after `Commit`, only the destination's word or the operator's
//!   resumes them;
//! - every wait is bounded: by the progress timeout while the destination
//!   is silent (`crate::link`), by the migration's timeout for its setup,
//!   by the progress timeout for each handshake of the handover.

use std::hash::{BuildHasher, Hasher};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use shadow_mmu_core::breakage::Breakage;
use shadow_mmu_core::spte::PAGE_SIZE;
use shadow_mmu_vmm::{
    BackendError, DirtyLogProtect, HarvestSpec, LatencySummary, PauseTimeout, VcpuLoss, error_chain,
    timed_harvest,
};
use thiserror::Error;

use crate::handover::{Answer, SourceAction, SourceEvent, SourceState};
use crate::link::{self, Heartbeat, Inbox, Sender};
use crate::ranges::{dirty_ranges, page_digests, quiescent_bytes, running_page_digests};
use crate::refusal::Refusal;
use crate::stats::{
    DowntimePhases, GuestStall, MigrationStats, MigrationStatus, OperatorAction, RoundStats, SourceVm,
};
use crate::stream::{Frame, FrameReader, Header, MAX_STREAMS, PAGE_BYTES, StreamError};
use crate::streams::{PageStreams, SentPages, SharedMemory};
use crate::throttle::Throttle;
use crate::tls::{Dialer, TlsError};
use crate::{MigrationVm, Phase, SourceHooks};

/// Pages per `Pages` frame at most: 8 MiB of data, under the stream's
/// 16 MiB maximum with its table.
pub const FRAME_PAGES: u32 = 2048;
/// Digests per `Digest` frame (64 KiB): small, so that the destination
/// checks one while the source computes the next.
pub const DIGEST_PAGES: u64 = 8192;

/// What to do at the timeout (Cloud Hypervisor's `--migration-timeout`
/// with its `cancel`/`force` choice).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnTimeout {
    /// Give up; the source runs on.
    #[default]
    Cancel,
    /// Stop the guest and copy the rest, whatever the downtime.
    Force,
}

/// How pre-copy decides when to harvest and when to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precopy {
    /// QEMU's loop (`migration_iteration_run`): every
    /// [`ITERATION_CHECK`], the pages not yet sent are compared with the
    /// bandwidth over the last [`BANDWIDTH_PERIOD`] times the downtime
    /// limit; at or below it, the dirty log is synced at once, mid-pass,
    /// and the guest stops if the exact pending work (the unsent pages and
    /// the sync's) fits. The cursor does not go back to page 0 at a sync:
    /// the pages behind it wait for the next pass.
    #[default]
    Qemu,
    /// The loop before it, kept to compare with: a round sends everything
    /// its harvest found, then harvests again, and stops when a harvest fits
    /// the last round's bandwidth times the limit.
    Rounds,
}

named_choices!(Precopy { Qemu => "qemu", Rounds => "rounds" });

/// When the destination compares every page with the source's final
/// digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Verify {
    /// Before the guest runs there: the digest pass is in the downtime,
    /// and a mismatch stops the handover (the guest runs on here).
    #[default]
    Strict,
    /// After the guest runs there: the digests go once `Running` came,
    /// the source keeping its paused copy until the destination's
    /// [`Frame::Audit`] says every page matched; a failed audit is an
    /// error that names the pages, and the source stays paused for the
    /// operator.
    Audit,
}

named_choices!(Verify { Strict => "strict", Audit => "audit" });

/// The source's knobs (QEMU's migration parameters).
#[derive(Debug, Clone)]
pub struct OutgoingParams {
    /// QEMU's `downtime-limit` (300 ms by default).
    pub downtime_limit: Duration,
    /// QEMU's `max-bandwidth`, bytes a second (`None`: as fast as the link).
    pub max_bandwidth: Option<u64>,
    /// How long the setup and pre-copy may take, checked between frames.
    pub timeout: Option<Duration>,
    /// What happens then.
    pub on_timeout: OnTimeout,
    /// QEMU's `auto-converge`.
    pub auto_converge: bool,
    /// QEMU's `dirty-limit` with its `vcpu-dirty-limit`: each vCPU's dirty
    /// rate capped at this many bytes a second while pre-copy runs, by
    /// holding that vCPU alone (`None`: no cap).
    pub dirty_limit: Option<u64>,
    /// When to sync and when to stop.
    pub precopy: Precopy,
    /// When the destination checks the pages.
    pub verify: Verify,
    /// Threads of the digest pass (`None`: [`default_digest_threads`]).
    pub digest_threads: Option<usize>,
    /// TCP streams for the pages, this connection included (QEMU's multifd
    /// channels; 1 to [`MAX_STREAMS`]): `crate::streams`.
    pub connections: u32,
    /// How the source opens its other connections to the destination (the
    /// extra streams, the settle queries): plain TCP or TLS. With TLS, the
    /// connection given to [`migrate_outgoing`] is one this dialer made.
    pub dialer: Dialer,
    /// The harvest's CLEAR window, pages (a multiple of 64), with manual
    /// protect; also the window of the round-0 CLEAR with `INITIALLY_SET`.
    pub clear_chunk_pages: u64,
    /// How long either side waits for a word from the other; also the
    /// deadline of each write, of the pause, and of each handshake of the
    /// handover.
    pub progress_timeout: Duration,
    /// How long the source asks the destination for the handover's
    /// outcome when it did not hear it.
    pub settle_timeout: Duration,
    /// Rules broken on purpose (tests).
    pub breakage: Breakage,
}

impl Default for OutgoingParams {
    fn default() -> Self {
        Self {
            downtime_limit: Duration::from_millis(300),
            max_bandwidth: None,
            timeout: None,
            on_timeout: OnTimeout::Cancel,
            auto_converge: false,
            dirty_limit: None,
            precopy: Precopy::Qemu,
            verify: Verify::Strict,
            digest_threads: None,
            connections: 1,
            dialer: Dialer::default(),
            clear_chunk_pages: HarvestSpec::default().clear_chunk_pages,
            progress_timeout: Duration::from_secs(10),
            settle_timeout: Duration::from_secs(30),
            breakage: Breakage::SEED,
        }
    }
}

/// Why a migration did not complete.
#[derive(Debug, Error)]
pub enum MigrationError {
    /// The stream failed: the peer went away, went silent, or sent
    /// something wrong.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// The VM refused an operation.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The vCPUs did not pause.
    #[error("the stop-and-copy could not pause the vCPUs")]
    Pause(#[from] PauseTimeout),
    /// Pre-copy did not converge in time, and the rule was `cancel`.
    #[error("pre-copy did not converge within the {0:?} timeout (cancelled; the guest runs on here)")]
    Timeout(Duration),
    /// The destination was not ready within the migration's timeout.
    #[error("the destination was not ready within the {0:?} timeout (cancelled; the guest runs on here)")]
    SetupTimeout(Duration),
    /// The destination refused the VM or its memory, or aborted: its cause,
    /// as it came.
    #[error("the destination refused the migration: {0}")]
    Refused(Refusal),
    /// Asked after the commit, the destination said it had aborted.
    #[error("asked after the commit, the destination said it aborted")]
    AbortedAfterCommit,
    /// Asked after the commit, the destination knew no such migration.
    #[error("{dest} knows no migration {id:#x}")]
    UnknownMigration {
        /// The destination asked.
        dest: SocketAddr,
        /// The migration's id.
        id: u64,
    },
    /// Asking the destination what became of the migration failed.
    #[error("asking {dest}")]
    Query {
        /// The destination asked.
        dest: SocketAddr,
        /// Why the question went unanswered.
        #[source]
        source: StreamError,
    },
    /// The audit after the resume found pages that differ (the guest runs
    /// at the destination; the source stays paused).
    #[error(
        "the audit after the resume found {pages} pages that differ from the source's final memory (first: {first:?}); the source keeps its paused copy"
    )]
    AuditFailed {
        /// Pages that differ.
        pages: u64,
        /// The first of them.
        first: Vec<u64>,
    },
    /// The audit after the resume did not finish (the guest runs at the
    /// destination; the source stays paused).
    #[error("the audit after the resume did not finish; the source keeps its paused copy")]
    AuditUnfinished(#[source] StreamError),
    /// The handover's outcome is unknown (the source stays paused).
    #[error(
        "no word from the destination after the commit, nor in {0:?} of asking: it may or may not run the guest"
    )]
    Unsettled(Duration),
}

impl MigrationError {
    /// Whether it is the timeout's `cancel` (QEMU's `cancelled` status).
    pub fn is_cancel(&self) -> bool {
        matches!(self, MigrationError::Timeout(_) | MigrationError::SetupTimeout(_))
    }
}

/// A migration that did not complete: why, and its statistics so far.
#[derive(Debug, Error)]
#[error("migration {}", if error.is_cancel() { "cancelled" } else { "failed" })]
pub struct MigrationFailure {
    /// Why.
    #[source]
    pub error: MigrationError,
    /// What it had done (boxed: the error path stays small).
    pub stats: Box<MigrationStats>,
}

/// How a migration ended, at the source.
#[must_use = "a completed migration's VM must be stopped, an unsettled one settled"]
#[derive(Debug)]
pub enum Outcome {
    /// The destination runs the guest; the vCPUs here are paused: stop the
    /// VM.
    Completed(Box<MigrationStats>),
    /// The guest runs here again, as before the migration.
    RunsOn(MigrationFailure),
    /// Nobody can say whether the destination runs the guest: the vCPUs
    /// here stay paused, the memory kept, until [`Unsettled`] settles it.
    Unsettled(Unsettled),
}

/// A source left in `postmigrate` (module docs): its VM paused, until the
/// destination answers ([`Unsettled::ask`]) or the operator decides
/// ([`Unsettled::resume`], [`Unsettled::discard`]).
#[derive(Debug)]
pub struct Unsettled {
    stats: Box<MigrationStats>,
    id: u64,
    dest: SocketAddr,
    dialer: Dialer,
    progress: Duration,
    settle: Duration,
    breakage: Breakage,
}

/// The error of an unsettled migration, with the last try's.
fn unsettled_error(settle: Duration, last: Option<&MigrationError>) -> String {
    let last = last.map_or_else(|| "none".to_string(), |e| error_chain(e));
    format!("{}; the last try: {last}", error_chain(&MigrationError::Unsettled(settle)))
}

impl Unsettled {
    /// The statistics (status `unknown`).
    pub fn stats(&self) -> &MigrationStats {
        &self.stats
    }

    /// The destination's address, where [`Unsettled::ask`] asks.
    pub fn destination(&self) -> SocketAddr {
        self.dest
    }

    /// Asks the destination once more: its answer settles the migration
    /// (`vm` resumed, or to be stopped), its silence leaves it unsettled.
    pub fn ask<V: MigrationVm + ?Sized>(mut self, vm: &mut V) -> Outcome {
        let (event, why) = ask(&self.dialer, self.dest, self.id, self.progress);
        let (state, action) = SourceState::Postmigrate.on(event, &self.breakage);
        if state == SourceState::Postmigrate {
            self.stats.error = Some(unsettled_error(self.settle, why.as_ref()));
            return Outcome::Unsettled(self);
        }
        settle(state, action, vm, self.stats, why)
    }

    /// The operator resumes the guest here: only right when the
    /// destination is known not to run it (docs/migration.md).
    pub fn resume<V: MigrationVm + ?Sized>(mut self, vm: &mut V) -> Box<MigrationStats> {
        let (state, action) = SourceState::Postmigrate.on(SourceEvent::OperatorResume, &self.breakage);
        debug_assert_eq!((state, action), (SourceState::RunsOn, SourceAction::Resume));
        resume_here(vm);
        self.stats.source_vm = SourceVm::Running;
        self.stats.operator_action = Some(OperatorAction::Resume);
        self.stats
    }

    /// The operator discards the paused copy: stop the VM.
    pub fn discard(mut self) -> Box<MigrationStats> {
        let (state, _) = SourceState::Postmigrate.on(SourceEvent::OperatorDiscard, &self.breakage);
        debug_assert_eq!(state, SourceState::Discarded);
        self.stats.source_vm = SourceVm::Discarded;
        self.stats.operator_action = Some(OperatorAction::Discard);
        self.stats
    }
}

/// The outcome of a settled handover: `state` is `Completed` or `RunsOn`.
fn settle<V: MigrationVm + ?Sized>(
    state: SourceState,
    action: SourceAction,
    vm: &mut V,
    mut stats: Box<MigrationStats>,
    why: Option<MigrationError>,
) -> Outcome {
    match (state, action) {
        (SourceState::Completed, _) => {
            stats.status = MigrationStatus::Completed;
            stats.source_vm = SourceVm::Discarded;
            stats.error = None;
            Outcome::Completed(stats)
        }
        _ => {
            resume_here(vm);
            let error = why.unwrap_or(MigrationError::AbortedAfterCommit);
            stats.status = MigrationStatus::Failed;
            stats.source_vm = SourceVm::Running;
            stats.error = Some(error_chain(&error));
            Outcome::RunsOn(MigrationFailure { error, stats })
        }
    }
}

/// A connection the dialer could not make, as the stream's error.
fn dial_error(e: TlsError) -> StreamError {
    match e {
        TlsError::Io(io) => StreamError::Io(io),
        e => StreamError::Io(std::io::Error::other(error_chain(&e))),
    }
}

/// The guest runs here again, as before the migration.
fn resume_here<V: MigrationVm + ?Sized>(vm: &mut V) {
    // Unlimited first: a vCPU resumed under the limit would be held.
    let _ = vm.set_dirty_limit(None);
    vm.vcpu_gate().resume();
    // Logging may already be off (a failure before it went on).
    let _ = vm.set_dirty_logging(false);
}

/// One question to the destination at `dest`, over a connection of its
/// own: what became of migration `id`? Every step within `progress`.
pub fn query(dialer: &Dialer, dest: SocketAddr, id: u64, progress: Duration) -> Result<Answer, StreamError> {
    let conn = dialer.connect(dest, progress).map_err(dial_error)?;
    link::configure(&conn, progress)?;
    conn.set_read_timeout(Some(progress))?;
    let mut w = &conn;
    crate::stream::write_frame(&mut w, &Frame::Query { id })
        .map_err(|e| link::peer_error(e, "destination", progress))?;
    let answer = match FrameReader::default().read(&mut &conn, PAGE_BYTES) {
        Ok(Frame::Status { id: got, answer }) if got == id => answer,
        Ok(Frame::Status { .. }) => Answer::Unknown,
        Ok(other) => return Err(StreamError::Unexpected { expected: "status", got: other.name() }),
        Err(e) => return Err(link::peer_error(e, "destination", progress)),
    };
    if answer != Answer::Unknown {
        // It may stop answering: we know.
        let _ = crate::stream::write_frame(&mut w, &Frame::Settled { id });
    }
    let _ = conn.shutdown(Shutdown::Both);
    Ok(answer)
}

/// One question to the destination, as the handover's event (`Running`,
/// `Aborted`, or a `Failed` attempt), with the error it means, if any.
fn ask(
    dialer: &Dialer,
    dest: SocketAddr,
    id: u64,
    progress: Duration,
) -> (SourceEvent, Option<MigrationError>) {
    match query(dialer, dest, id, progress) {
        Ok(Answer::Running) => (SourceEvent::Running, None),
        Ok(Answer::Aborted) => (SourceEvent::Aborted, Some(MigrationError::AbortedAfterCommit)),
        Ok(Answer::Unknown) => (SourceEvent::Failed, Some(MigrationError::UnknownMigration { dest, id })),
        Err(source) => (SourceEvent::Failed, Some(MigrationError::Query { dest, source })),
    }
}

/// A fresh migration id: random, so that no frame of another migration,
/// or of an earlier attempt of this one, is taken for this one's.
fn new_id() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish()
}

/// One migration's state on the source.
struct Outgoing<'a, V: MigrationVm + ?Sized> {
    vm: &'a mut V,
    /// The destination's address, for the settle queries.
    dest: SocketAddr,
    sender: Arc<Sender>,
    inbox: Inbox,
    params: &'a OutgoingParams,
    stats: MigrationStats,
    start: Instant,
    /// The handover's state (`Sending` until `Done`).
    state: SourceState,
    /// Pages per frame: [`FRAME_PAGES`], fewer under a bandwidth cap so
    /// that a frame's wait stays a fraction of the progress timeout.
    frame_pages: u32,
    /// With the dirty ring: pages reaped from the rings between harvests
    /// (QEMU's reaper thread, here between frames), for the next harvest.
    reaped: Vec<u64>,
    last_reap: Instant,
    /// The faults that met the last harvest, for its round's statistics.
    harvest_latency: Option<LatencySummary>,
    /// When the vCPUs stopped for the stop-and-copy.
    stopped: Option<Instant>,
    /// Where the current downtime phase began.
    phase_start: Instant,
    /// When the current round began, and the bytes sent before it.
    round_start: (Instant, u64),
    /// QEMU's bandwidth estimate.
    bandwidth_window: BandwidthWindow,
    /// The digest pass's rate, ns a page (`measure_digest_rate`).
    digest_ns_per_page: f64,
    /// Threads of the digest pass (`OutgoingParams::digest_threads`).
    digest_threads: usize,
    /// The round trip to the destination (`measure_round_trip`).
    round_trip: Duration,
    /// The extra page streams, with `connections` above 1.
    streams: Option<PageStreams>,
    /// What their threads sent, data and zero pages.
    stream_pages: Arc<SentPages>,
    /// The round the extra streams were last marked for.
    streams_marked: Option<u32>,
    /// The vCPUs' losses at the marks of `account_stall` (`None`: the
    /// backend measures none).
    stall_marks: Option<StallMarks>,
}

/// The vCPUs' losses (`VcpuLoss`) when logging went on, when the current
/// round began (the end of the one before), and when last accounted.
#[derive(Debug, Clone, Copy)]
struct StallMarks {
    start: VcpuLoss,
    round_start: VcpuLoss,
    last: VcpuLoss,
}

/// How often the rings are reaped while a round is sent: a ring of 65536
/// entries fills in a quarter second at 1 GiB/s of emulated stores on KVM,
/// which pushes one entry per store.
const REAP_EVERY: Duration = Duration::from_millis(20);

/// QEMU's `MAX_WAIT`: pre-copy checks its pending work at least this often.
pub const ITERATION_CHECK: Duration = Duration::from_millis(50);
/// QEMU's `BUFFER_DELAY`: the bandwidth is measured over periods this long.
pub const BANDWIDTH_PERIOD: Duration = Duration::from_millis(100);
/// Pages of the guest the digest rate is measured on: 64 MiB, twice this
/// host's L3 and most servers', so that they come from DRAM as in the
/// pass.
const DIGEST_SAMPLE_PAGES: u64 = 2 * DIGEST_PAGES;
/// Bytes a page's digest takes on the wire.
const DIGEST_BYTES_PER_PAGE: f64 = 8.0;

/// How a window's sending ended.
#[derive(Debug, PartialEq, Eq)]
enum Window {
    /// Its pages went (or there were none).
    Sent,
    /// The timeout came with `force` before it: stop and copy.
    TimedOut,
}

/// The pages to send: dirty and not yet sent, and a cursor that walks them
/// window by window and wraps (QEMU's dirty bitmap and its page search).
struct SendQueue {
    unsent: Vec<u64>,
    /// With manual protect, the pages a GET reported whose log is not yet
    /// CLEARed (QEMU's `clear_bmap`); a subset of `unsent`.
    uncleared: Vec<u64>,
    /// The bits set in `unsent`.
    pending: u64,
    /// The window to look at next, in words of `unsent`.
    cursor: usize,
}

impl SendQueue {
    /// Every page of a guest of `pages` pages, none to CLEAR.
    fn every_page(pages: u64) -> Self {
        let words = pages.div_ceil(64) as usize;
        let mut unsent = vec![u64::MAX; words];
        if !pages.is_multiple_of(64) {
            unsent[words - 1] = (1 << (pages % 64)) - 1;
        }
        Self { uncleared: vec![0; words], unsent, pending: pages, cursor: 0 }
    }

    /// Adds a sync's pages; with `manual`, their log is to be CLEARed
    /// before they are sent.
    fn add(&mut self, fresh: &[u64], manual: bool) {
        for (u, f) in self.unsent.iter_mut().zip(fresh) {
            *u |= f;
        }
        if manual {
            for (c, f) in self.uncleared.iter_mut().zip(fresh) {
                *c |= f;
            }
        }
        self.pending = self.unsent.iter().map(|w| u64::from(w.count_ones())).sum();
    }

    /// The words of the next window of `window_words` words, from the
    /// cursor on and wrapping, that holds a page; the cursor moves past it.
    fn next_window(&mut self, window_words: usize) -> Option<std::ops::Range<usize>> {
        let (len, at) = (self.unsent.len(), self.cursor / window_words);
        let windows = len.div_ceil(window_words);
        let words = (0..windows)
            .map(|k| (at + k) % windows)
            .map(|w| w * window_words..((w + 1) * window_words).min(len))
            .find(|words| self.unsent[words.clone()].iter().any(|&x| x != 0))?;
        self.cursor = words.end % len;
        Some(words)
    }

    /// The pages of `words` are sent.
    fn take(&mut self, words: std::ops::Range<usize>) {
        for w in &mut self.unsent[words] {
            self.pending -= u64::from(w.count_ones());
            *w = 0;
        }
    }
}

/// QEMU's bandwidth estimate (`migration_update_counters`), made safer:
/// the bytes sent over each period of at least [`BANDWIDTH_PERIOD`], and
/// the slowest of the last [`BANDWIDTH_PERIODS`] periods (2 s). QEMU takes
/// the last period alone; on a shared host a period may run at half the
/// speed of the next, and the stop-and-copy may be that one.
struct BandwidthWindow {
    mark: Instant,
    mark_bytes: u64,
    periods: std::collections::VecDeque<f64>,
}

/// Periods the bandwidth estimate looks back over.
pub const BANDWIDTH_PERIODS: usize = 20;

impl BandwidthWindow {
    fn new(bytes: u64) -> Self {
        Self { mark: Instant::now(), mark_bytes: bytes, periods: Default::default() }
    }

    /// `bytes` have been sent so far: closes the period if it is long
    /// enough.
    fn update(&mut self, bytes: u64) {
        let e = self.mark.elapsed();
        if e >= BANDWIDTH_PERIOD {
            if self.periods.len() == BANDWIDTH_PERIODS {
                self.periods.pop_front();
            }
            self.periods.push_back((bytes - self.mark_bytes) as f64 / e.as_secs_f64());
            (self.mark, self.mark_bytes) = (Instant::now(), bytes);
        }
    }

    /// Bytes a second: the slowest recent period's, or before one
    /// completed, the current one's so far (`None`: nothing measured yet).
    fn bytes_per_s(&self, bytes: u64) -> Option<f64> {
        let e = self.mark.elapsed().as_secs_f64();
        let current = || (bytes > self.mark_bytes && e > 0.0).then(|| (bytes - self.mark_bytes) as f64 / e);
        self.periods.iter().copied().reduce(f64::min).or_else(current)
    }
}

/// A digest of every page of `memory`, of a paused guest, on `threads`
/// threads.
fn digest_pass(memory: SharedMemory, threads: usize) -> Vec<u64> {
    let words = memory.words();
    // SAFETY: the vCPUs are paused (the gate's acquire ordered their stores
    // before the pause returned) and nothing else writes guest memory until
    // they resume or the VM stops, both after this pass is joined; the
    // send beside it only reads.
    let bytes = unsafe { quiescent_bytes(words) };
    let pages = (words.len() / shadow_mmu_core::spte::WORDS_PER_PAGE) as u64;
    page_digests(bytes, 0, pages, threads)
}

/// Threads of the digest pass by default: this host's CPUs are ours while
/// the guest is paused (the destination only compares: it digested each
/// page as it loaded it). A destination on the same host shares them; on
/// this 2-CPU host, leaving it one (`--digest-threads 1`) made no
/// difference that stood out of the noise (idle guests of 256 MiB and
/// 1 GiB on both backends, 24 migrations each way: none over 300 ms on two
/// threads, 2 on one; docs/results/README.md).
pub fn default_digest_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Migrates `vm` over `conn` (connected to a destination), announcing it
/// with `header` (its id and deadlines are filled in here); `hooks` hear
/// the statistics after each round and each phase, and drive the guest
/// between frames. See [`Outcome`] for what the caller does next.
pub fn migrate_outgoing<V: MigrationVm + ?Sized>(
    vm: &mut V,
    conn: &TcpStream,
    header: &Header,
    params: &OutgoingParams,
    hooks: &mut dyn SourceHooks<V>,
) -> Outcome {
    let start = Instant::now();
    let stats = MigrationStats::new(vm.pages() * PAGE_SIZE, params.downtime_limit.as_millis() as u64);
    let link = (|| -> std::io::Result<_> {
        // Where the settle queries go, known before the peer can reset
        // (with TLS `conn`'s peer is the pump: the dialer knows).
        let dest = match params.dialer.destination() {
            Some(d) => d,
            None => conn.peer_addr()?,
        };
        link::configure(conn, params.progress_timeout)?;
        let received = Arc::new(AtomicU64::new(0));
        let sender = Arc::new(Sender::new(conn, "destination", params.progress_timeout, received.clone())?);
        let inbox = Inbox::start(conn, params.progress_timeout, received)?;
        Ok((dest, sender, inbox))
    })();
    let (dest, sender, inbox) = match link {
        Ok(l) => l,
        Err(e) => return fail(vm, stats, StreamError::Io(e).into(), start),
    };
    let heartbeat = Heartbeat::start(sender.clone());
    let header = Header {
        id: new_id(),
        progress_timeout_ms: params.progress_timeout.as_millis() as u32,
        settle_ms: params.settle_timeout.as_millis() as u32,
        streams: params.connections.clamp(1, MAX_STREAMS),
        audit: params.verify == Verify::Audit,
        ..header.clone()
    };
    let frame_pages = params.max_bandwidth.filter(|&b| b > 0).map_or(FRAME_PAGES, |b| {
        let pages = (b as f64 * params.progress_timeout.as_secs_f64() / 4.0 / PAGE_SIZE as f64) as u32;
        (pages / 64 * 64).clamp(64, FRAME_PAGES)
    });
    let mut m = Outgoing {
        reaped: vec![0u64; vm.pages().div_ceil(64) as usize],
        vm,
        dest,
        sender,
        inbox,
        params,
        stats,
        start,
        state: SourceState::Sending,
        frame_pages,
        last_reap: start,
        harvest_latency: None,
        stopped: None,
        phase_start: start,
        round_start: (start, 0),
        bandwidth_window: BandwidthWindow::new(0),
        digest_ns_per_page: 0.0,
        digest_threads: params.digest_threads.map_or_else(default_digest_threads, |n| n.max(1)),
        round_trip: Duration::ZERO,
        streams: None,
        stream_pages: Arc::default(),
        streams_marked: None,
        stall_marks: None,
    };
    let mut throttle = params.auto_converge.then(|| Throttle::start(m.vm.vcpu_gate()));
    let r = m.run(&header, throttle.as_mut(), hooks).map_err(|e| match e {
        MigrationError::Stream(e) => m.refusal_or(e),
        e => e,
    });
    if let Some(t) = throttle.as_mut() {
        m.stats.cpu_throttle_percentage = t.pct();
        t.stop();
    }
    let r = r.and_then(|()| {
        m.state = m.state.on(SourceEvent::DoneSent, &params.breakage).0;
        m.handover(&header, hooks)
    });
    // The audit, the guest running there: our paused copy is kept until it
    // passes.
    let audit = match &r {
        Ok(end) if end.state == SourceState::Completed && header.audit => m.audit().err(),
        _ => None,
    };
    drop(heartbeat);
    m.stats.transferred_bytes = m.sent_bytes();
    m.stats.total_time_ms = ms(start.elapsed());
    m.stats.mbps = m.stats.transferred_bytes as f64 * 8.0 / 1e6 / start.elapsed().as_secs_f64();
    match r {
        Ok(end) => m.finish(conn, end, header.id, audit),
        Err(error) => {
            // Before `Commit`, any failure resumes here (the handover).
            debug_assert!(matches!(m.state, SourceState::Sending | SourceState::AwaitVerified));
            let Outgoing { vm, stats, inbox, .. } = m;
            drop(inbox);
            let _ = conn.shutdown(Shutdown::Both);
            fail(vm, stats, error, start)
        }
    }
}

/// A migration that ended before the point of no return: the guest runs
/// on here.
fn fail<V: MigrationVm + ?Sized>(
    vm: &mut V,
    stats: MigrationStats,
    error: MigrationError,
    start: Instant,
) -> Outcome {
    let mut stats = Box::new(stats);
    resume_here(vm);
    stats.status = if error.is_cancel() { MigrationStatus::Cancelled } else { MigrationStatus::Failed };
    stats.source_vm = SourceVm::Running;
    stats.downtime_ms = None;
    stats.total_time_ms = ms(start.elapsed());
    stats.error = Some(error_chain(&error));
    Outcome::RunsOn(MigrationFailure { error, stats })
}

/// Where the handover ended after `Commit`.
struct HandoverEnd {
    state: SourceState,
    action: SourceAction,
    /// What the destination said, or the last failure.
    why: Option<MigrationError>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl<V: MigrationVm + ?Sized> Outgoing<'_, V> {
    /// The end of a handover that reached `Commit`: `end.state` is
    /// `Completed`, `RunsOn` (the destination aborted) or `Postmigrate`.
    fn finish(self, conn: &TcpStream, end: HandoverEnd, id: u64, audit: Option<MigrationError>) -> Outcome {
        let HandoverEnd { state, action, why } = end;
        let Outgoing { vm, stats, inbox, dest, params, .. } = self;
        let mut stats = Box::new(stats);
        if state != SourceState::Postmigrate {
            // The destination may stop answering queries: we know (it runs
            // the guest, or it told us it aborted).
            let _ = crate::stream::write_frame(&mut &*conn, &Frame::Settled { id });
        }
        drop(inbox);
        let _ = conn.shutdown(Shutdown::Both);
        let window = params.settle_timeout;
        let (progress, breakage, dialer) = (params.progress_timeout, params.breakage, params.dialer.clone());
        let unsettled = |stats| Unsettled { stats, id, dest, dialer, progress, settle: window, breakage };
        if let Some(failed) = audit {
            // The guest runs there, but differs: ours is the good copy, kept
            // paused for the operator.
            stats.status = MigrationStatus::Completed;
            stats.source_vm = SourceVm::Postmigrate;
            stats.error = Some(error_chain(&failed));
            return Outcome::Unsettled(unsettled(stats));
        }
        if state != SourceState::Postmigrate {
            return settle(state, action, vm, stats, why);
        }
        stats.status = MigrationStatus::Unknown;
        stats.source_vm = SourceVm::Postmigrate;
        stats.downtime_ms = None;
        stats.error = Some(unsettled_error(window, why.as_ref()));
        Outcome::Unsettled(unsettled(stats))
    }

    /// `--verify audit`, the guest running at the destination: the digests
    /// of our paused memory, `Done`, and the destination's verdict.
    fn audit(&mut self) -> Result<(), MigrationError> {
        let t = Instant::now();
        let p = self.params.progress_timeout;
        let unfinished = |e: StreamError| MigrationError::AuditUnfinished(e);
        // SAFETY: the guest is still paused here (its copy is kept until
        // the audit passes), and the pass ends before we return.
        let digests = digest_pass(unsafe { SharedMemory::of(self.vm.memory()) }, self.digest_threads);
        self.send_digests(&digests).map_err(|e| match e {
            MigrationError::Stream(e) => unfinished(e),
            e => e,
        })?;
        self.sender.send_now(&Frame::Done).map_err(unfinished)?;
        let verdict = self.inbox.wait(self.sent_bytes(), Instant::now() + p, "audit").map_err(unfinished)?;
        self.stats.audit_ms = Some(ms(t.elapsed()));
        match verdict {
            Frame::Audit { mismatched, pages } => {
                self.stats.audit_mismatched_pages = Some(mismatched);
                if mismatched > 0 {
                    return Err(MigrationError::AuditFailed { pages: mismatched, first: pages });
                }
                Ok(())
            }
            other => Err(unfinished(StreamError::Unexpected { expected: "audit", got: other.name() })),
        }
    }

    /// Setup, pre-copy and the stop-and-copy, up to `Done`.
    fn run(
        &mut self,
        header: &Header,
        mut throttle: Option<&mut Throttle>,
        hooks: &mut dyn SourceHooks<V>,
    ) -> Result<(), MigrationError> {
        self.setup(header, hooks)?;
        let caps = self.vm.capabilities();
        let manual = caps.dirty_ring.is_none() && caps.protect.is_manual();
        let logging = Instant::now();
        let mut q = SendQueue::every_page(self.vm.pages());
        if caps.dirty_ring.is_none() && caps.protect == DirtyLogProtect::ManualInitiallySet {
            // The log starts all ones: GET copies it, and each window's
            // CLEAR protects it just before it is sent.
            self.vm.get_dirty_log(&mut q.uncleared)?;
        }
        self.measure_digest_rate();
        self.bandwidth_window = BandwidthWindow::new(self.sent_bytes());
        self.begin_round(0, q.pending, 0)?;
        let mut fresh = vec![0u64; q.unsent.len()];
        let mut dirtied_pages = 0u64;
        let mut round = 0;
        let whole_rounds = self.params.precopy == Precopy::Rounds;
        loop {
            // Send until the next check (whole rounds: until all is sent).
            let check = Instant::now() + if whole_rounds { Duration::MAX / 4 } else { ITERATION_CHECK };
            while q.pending > 0 && Instant::now() < check {
                if self.send_window(&mut q, hooks)? == Window::TimedOut {
                    return self.stop_and_copy(round, q.unsent, hooks);
                }
            }
            if q.pending * PAGE_SIZE + self.in_flight() > self.threshold_bytes() {
                if q.pending == 0 {
                    // All sent, not all arrived: wait for the destination's
                    // next count, still heeding it and the timeout.
                    self.check_destination()?;
                    if self.timed_out()? {
                        return self.stop_and_copy(round, q.unsent, hooks);
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                continue;
            }
            // The sync: it ends this round and begins the next. Every stream
            // ends the round before the sync counts it.
            self.mark_streams(round + 1)?;
            self.end_round();
            hooks.round(&self.stats);
            hooks.phase(Phase::RoundSent(round));
            round += 1;
            fresh.fill(0);
            let (dirty, ns) = self.harvest(&mut fresh, false)?;
            q.add(&fresh, manual);
            if whole_rounds {
                q.cursor = 0;
            }
            // The syncs together cover the time since logging began.
            dirtied_pages += dirty;
            self.stats.dirty_pages_rate = dirtied_pages as f64 / logging.elapsed().as_secs_f64().max(1e-9);
            self.stats.remaining_bytes = q.pending * PAGE_SIZE;
            let pending = self.stats.remaining_bytes + self.in_flight();
            let threshold = self.threshold_bytes();
            let fixed = self.stats.fixed_downtime_ms.unwrap_or(0.0);
            self.stats.expected_downtime_ms = Some(pending as f64 / self.bandwidth() * 1e3 + fixed);
            if pending <= threshold {
                self.stats.converged = true;
                break;
            }
            if self.timed_out()? {
                break;
            }
            if let Some(t) = throttle.as_deref_mut() {
                self.stats.cpu_throttle_percentage = t.raise();
            }
            self.begin_round(round, dirty, ns)?;
        }
        if let Some(t) = throttle {
            t.stop();
        }
        self.stop_and_copy(round, q.unsent, hooks)
    }

    /// Bytes sent that the destination has not read yet (in socket buffers,
    /// TLS pumps): its last report of what it read, and what the bandwidth
    /// delivered since. They too must arrive in the downtime.
    fn in_flight(&self) -> u64 {
        let (read, at) = self.inbox.peer_received();
        let since = (self.bandwidth() * at.elapsed().as_secs_f64()) as u64;
        self.sent_bytes().saturating_sub(read).saturating_sub(since)
    }

    /// The most bytes that may be pending at a stop: the bandwidth times
    /// what the downtime limit leaves after the fixed costs (brought up to
    /// date in the statistics).
    fn threshold_bytes(&mut self) -> u64 {
        let fixed = self.fixed_downtime_ms();
        self.stats.fixed_downtime_ms = Some(fixed);
        let budget = self.params.downtime_limit.saturating_sub(Duration::from_secs_f64(fixed / 1e3));
        (self.bandwidth() * budget.as_secs_f64()) as u64
    }

    /// The header, the destination's `Ready` (within the migration's
    /// timeout, while it is heard from), then dirty logging on.
    fn setup(&mut self, header: &Header, hooks: &mut dyn SourceHooks<V>) -> Result<(), MigrationError> {
        hooks.phase(Phase::Connected);
        self.sender.send_now(&Frame::Header(header.clone()))?;
        // The destination builds its VM (heartbeats meanwhile), then says so
        // (or why not).
        let deadline = self.start + self.params.timeout.unwrap_or(Duration::MAX / 4);
        match self.setup_answer(deadline, "ready")? {
            Frame::Ready => {}
            other => return Err(StreamError::Unexpected { expected: "ready", got: other.name() }.into()),
        }
        hooks.phase(Phase::ReadyReceived);
        self.open_streams(header)?;
        self.measure_round_trip(deadline)?;
        // The limit first: a ring that fills under it finds its vCPU held
        // as the limit says, never running on with no one reaping it.
        self.vm.set_dirty_limit(self.params.dirty_limit)?;
        self.vm.set_dirty_logging(true)?;
        self.stall_marks = self.vcpu_loss().map(|l| StallMarks { start: l, round_start: l, last: l });
        self.stats.setup_time_ms = Some(ms(self.start.elapsed()));
        Ok(())
    }

    /// The destination's next frame during the setup, by `deadline`: a
    /// refusal (of the header, or of the extra streams, which the
    /// destination checks after `Ready`) is the error, and lateness the
    /// setup's timeout.
    fn setup_answer(&mut self, deadline: Instant, expected: &'static str) -> Result<Frame, MigrationError> {
        match self.inbox.wait(self.sent_bytes(), deadline, expected) {
            Ok(Frame::Refuse { why }) => Err(MigrationError::Refused(why)),
            Ok(f) => Ok(f),
            Err(StreamError::Late { .. }) => {
                Err(MigrationError::SetupTimeout(self.params.timeout.unwrap_or_default()))
            }
            Err(e) => Err(self.refusal_or(e)),
        }
    }

    /// Bytes sent on every stream.
    fn sent_bytes(&self) -> u64 {
        self.sender.bytes() + self.streams.as_ref().map_or(0, PageStreams::bytes)
    }

    /// The header's extra page streams: a connection each to the
    /// destination, announced by an `Attach`, with its sender thread.
    fn open_streams(&mut self, header: &Header) -> Result<(), MigrationError> {
        if header.streams <= 1 {
            return Ok(());
        }
        let p = self.params.progress_timeout;
        let mut conns = Vec::new();
        for stream in 1..header.streams {
            let c = self.params.dialer.connect(self.dest, p).map_err(dial_error)?;
            link::configure(&c, p).map_err(StreamError::Io)?;
            crate::stream::write_frame(&mut &c, &Frame::Attach { id: header.id, stream })?;
            conns.push(c);
        }
        // SAFETY: `PageStreams` joins its threads when dropped, and it is a
        // field of this migration, which ends before `migrate_outgoing`
        // returns: while the caller still lends us the VM.
        let memory = unsafe { SharedMemory::of(self.vm.memory()) };
        let streams =
            PageStreams::start(conns, memory, p, self.stream_pages.clone()).map_err(StreamError::Io)?;
        self.streams = Some(streams);
        Ok(())
    }

    /// Ends the extra streams' round with the mark of `round`, all of them
    /// (module docs of `crate::streams`), once per round.
    fn mark_streams(&mut self, round: u32) -> Result<(), MigrationError> {
        if self.streams_marked == Some(round) {
            return Ok(());
        }
        if let Some(s) = self.streams.as_mut() {
            s.end_round(round)?;
        }
        self.streams_marked = Some(round);
        Ok(())
    }

    /// The vCPUs' losses now, summed (`None`: the backend measures none).
    fn vcpu_loss(&self) -> Option<VcpuLoss> {
        let v = self.vm.vcpu_losses();
        (!v.is_empty()).then(|| v.into_iter().sum())
    }

    /// Brings the guest's stall up to now: the total since logging went on,
    /// and the current round's. A round's stall runs from the end of the
    /// round before (logging on, for round 0), its harvest included, to its
    /// own end, or, for the last pre-copy round, to the pause.
    fn account_stall(&mut self) {
        let now = self.vcpu_loss();
        let (Some(m), Some(now)) = (self.stall_marks.as_mut(), now) else { return };
        m.last = now;
        let (round, total) =
            (GuestStall::of(&now.since(&m.round_start)), GuestStall::of(&now.since(&m.start)));
        if let Some(r) = self.stats.rounds.last_mut() {
            (r.guest_stall_ms, r.guest_stall) = (Some(round.total_ms), Some(round));
        }
        (self.stats.guest_stall_ms, self.stats.guest_stall) = (Some(total.total_ms), Some(total));
    }

    /// Whether pre-copy's time is up: an error with `cancel`, `true` with
    /// `force` (stop and copy now).
    fn timed_out(&self) -> Result<bool, MigrationError> {
        match self.params.timeout.filter(|&l| self.start.elapsed() >= l) {
            None => Ok(false),
            Some(limit) => match self.params.on_timeout {
                OnTimeout::Cancel => Err(MigrationError::Timeout(limit)),
                OnTimeout::Force => Ok(true),
            },
        }
    }

    /// Between two frames: what the destination said (a refusal ends the
    /// migration with its cause), and whether it is still heard from.
    fn check_destination(&self) -> Result<(), MigrationError> {
        match self.inbox.poll(self.sent_bytes()) {
            Ok(None) => Ok(()),
            Ok(Some(Frame::Refuse { why })) => Err(MigrationError::Refused(why)),
            Ok(Some(other)) => Err(StreamError::Unexpected { expected: "nothing", got: other.name() }.into()),
            Err(e) => Err(self.refusal_or(e)),
        }
    }

    /// The cause of stream error `e`: the destination's refusal if it sent
    /// one before its stream ended (its reason beats our "connection
    /// reset"), or, for a write that found the connection gone, what the
    /// reading half heard of why.
    fn refusal_or(&self, e: StreamError) -> MigrationError {
        match (self.inbox.cause(), e) {
            (Some(Ok(why)), _) => MigrationError::Refused(why),
            (Some(Err(cause @ StreamError::Stalled { .. })), StreamError::Gone { .. }) => cause.into(),
            (_, e) => e.into(),
        }
    }

    /// The bandwidth the rule uses, bytes a second (at least 1 MB/s): over
    /// the last [`BANDWIDTH_PERIOD`] with QEMU's loop, over the last whole
    /// round with whole rounds.
    fn bandwidth(&self) -> f64 {
        let bps = match self.params.precopy {
            Precopy::Qemu => self.bandwidth_window.bytes_per_s(self.sent_bytes()),
            Precopy::Rounds => self.stats.rounds.last().map(|r| r.bandwidth_bytes_per_s),
        };
        bps.unwrap_or(1e6).max(1e6)
    }

    /// The digest pass's wall time a page on this guest, ns: a sample of
    /// its memory ([`DIGEST_SAMPLE_PAGES`] pages in runs of 64, spread over
    /// it) digested on the pass's threads, their CPU time a page over the
    /// threads. CPU time, not wall time: the vCPUs run meanwhile and share
    /// the CPUs, which they will not once paused (wall time read 2 to 5
    /// times the real pass on this 2-CPU host with two busy vCPUs). Each
    /// page is copied out through atomics first: a little slower than the
    /// paused pass, which reads memory plainly.
    fn measure_digest_rate(&mut self) {
        let pages = self.vm.pages();
        let runs = DIGEST_SAMPLE_PAGES.min(pages).div_ceil(64);
        let stride = (pages / 64 / runs).max(1) * 64;
        let sample: Vec<u64> = (0..runs).flat_map(|r| r * stride..(r * stride + 64).min(pages)).collect();
        let threads = self.digest_threads;
        let (_, cpu_ns) = running_page_digests(self.vm.memory(), &sample, threads);
        self.digest_ns_per_page = cpu_ns as f64 / sample.len().max(1) as f64 / threads as f64;
    }

    /// The fixed downtime now, ms: the digest pass at the measured rate,
    /// and the digests' bytes over the bandwidth (none with an audit after
    /// the resume), then the handover's two exchanges at the measured
    /// round trip. The vCPU states (tens of KiB, measured at 0.0 ms in
    /// every run) and the work the destination does between the messages
    /// (its last comparisons, the restore, the guest's start) are not
    /// foreseen: they are known only once done.
    fn fixed_downtime_ms(&self) -> f64 {
        let digests_ms = if self.params.verify == Verify::Audit {
            0.0
        } else {
            let pages = self.vm.pages() as f64;
            let compute_ns = self.digest_ns_per_page * pages;
            let send_ns = pages * DIGEST_BYTES_PER_PAGE / self.bandwidth() * 1e9;
            (compute_ns + send_ns) / 1e6
        };
        digests_ms + 2.0 * ms(self.round_trip)
    }

    /// One `Ping` and its `Pong`, with nothing else on the wire yet (the
    /// destination is ready, no page has gone): the round trip each of the
    /// handover's two exchanges will take at the least.
    fn measure_round_trip(&mut self, deadline: Instant) -> Result<(), MigrationError> {
        let t = Instant::now();
        self.sender.send_now(&Frame::Ping { seq: 1 })?;
        match self.setup_answer(deadline, "pong")? {
            Frame::Pong { seq: 1 } => {}
            other => return Err(StreamError::Unexpected { expected: "pong", got: other.name() }.into()),
        }
        self.round_trip = t.elapsed();
        self.stats.round_trip_ms = Some(ms(self.round_trip));
        Ok(())
    }

    /// A harvest into `bitmap` by the VM's interface: GET (without its
    /// CLEARs with manual protect, unless `clear_all`), or the rings.
    /// Returns the pages and the time, ns.
    fn harvest(&mut self, bitmap: &mut [u64], clear_all: bool) -> Result<(u64, u64), MigrationError> {
        let pages = self.vm.pages();
        let manual = self.vm.capabilities().protect.is_manual();
        let spec = HarvestSpec { clear_chunk_pages: pages.next_multiple_of(64), ..HarvestSpec::default() };
        self.vm.harvest_begin();
        let t = Instant::now();
        let r = if manual && !clear_all && self.vm.capabilities().dirty_ring.is_none() {
            self.vm.get_dirty_log(bitmap).map(|n| (n, 0, None))
        } else {
            timed_harvest(self.vm, &spec, bitmap)
        };
        let mut n = r?.0;
        self.harvest_latency = self.vm.take_harvest_latency();
        if self.vm.capabilities().dirty_ring.is_some() {
            for (b, r) in bitmap.iter_mut().zip(self.reaped.iter_mut()) {
                *b |= std::mem::take(r);
            }
            n = bitmap.iter().map(|w| u64::from(w.count_ones())).sum();
        }
        let ns = t.elapsed().as_nanos() as u64;
        self.vm.harvest_end();
        self.stats.dirty_sync_count += 1;
        Ok((n, ns))
    }

    /// With the dirty ring, every [`REAP_EVERY`]: collects and resets the
    /// rings into `reaped`, so that no vCPU waits on a full ring for a whole
    /// round (and KVM's never overflows). Not under a dirty-limit, as
    /// QEMU's reaper thread sleeps on then: each vCPU reaps its own ring
    /// when it fills, and is held there (`DirtyPace`).
    fn reap(&mut self) -> Result<(), MigrationError> {
        let limited = self.params.dirty_limit.is_some_and(|l| l > 0);
        if self.vm.capabilities().dirty_ring.is_none() || limited || self.last_reap.elapsed() < REAP_EVERY {
            return Ok(());
        }
        self.last_reap = Instant::now();
        let mut offsets = Vec::new();
        self.vm.harvest_dirty_ring(&mut offsets)?;
        for o in offsets {
            self.reaped[(o / 64) as usize] |= 1 << (o % 64);
        }
        Ok(())
    }

    /// Holds the bytes sent so far to the bandwidth limit (QEMU's rate
    /// limit: never ahead of `max` bytes a second).
    fn limit(&self) -> Result<(), MigrationError> {
        if let Some(max) = self.params.max_bandwidth.filter(|&m| m > 0) {
            let due = Duration::from_secs_f64(self.sent_bytes() as f64 / max as f64);
            if let Some(wait) = due.checked_sub(self.start.elapsed()) {
                self.sender.flush()?;
                std::thread::sleep(wait);
            }
        }
        Ok(())
    }

    /// Begins round `round`, which the sync that found `harvested` pages in
    /// `harvest_ns` opened: its statistics are in `stats.rounds` from now
    /// on, so that a failed round reports what it sent.
    fn begin_round(&mut self, round: u32, harvested: u64, harvest_ns: u64) -> Result<(), MigrationError> {
        let mut r = RoundStats { round, harvest_ns, pages_harvested: harvested, ..RoundStats::default() };
        if let Some(h) = self.harvest_latency.take().filter(|_| round > 0) {
            r.harvest_faults = Some(h.count());
            r.fault_p99_during_harvest_ns = (h.count() > 0).then(|| h.quantile_ns(0.99));
        }
        r.cpu_throttle_percentage = self.stats.cpu_throttle_percentage;
        self.mark_streams(round)?;
        self.stats.rounds.push(r);
        if let (Some(m), None) = (self.stall_marks.as_mut(), self.stopped) {
            // This round's stall starts where the last one's was last
            // brought up to: its end.
            m.round_start = m.last;
        }
        self.round_start = (Instant::now(), self.sent_bytes());
        self.sender.send(&Frame::Round { round })?;
        Ok(())
    }

    /// Sends the next window of `q` that holds pages, CLEARing its log
    /// first where a GET left it uncleared; before it, checks the
    /// destination and (in pre-copy) the timeout.
    fn send_window(
        &mut self,
        q: &mut SendQueue,
        hooks: &mut dyn SourceHooks<V>,
    ) -> Result<Window, MigrationError> {
        self.check_destination()?;
        if self.stopped.is_none() && self.timed_out()? {
            return Ok(Window::TimedOut);
        }
        let window_words = (self.frame_pages / 64) as usize;
        let Some(words) = q.next_window(window_words) else { return Ok(Window::Sent) };
        let first = (words.start * 64) as u64;
        // CLEAR just before sending (QEMU's `clear_bmap`), in the clear
        // window's size: a store after it dirties the page again.
        let clear_words = (self.params.clear_chunk_pages / 64).max(1) as usize;
        for (j, mask) in q.uncleared[words.clone()].chunks(clear_words).enumerate() {
            if mask.iter().any(|&w| w != 0) {
                self.vm.clear_dirty_log(first + (j * clear_words * 64) as u64, mask)?;
            }
        }
        q.uncleared[words.clone()].fill(0);
        // Window `w` of the pass to stream `w % streams` (0: this thread).
        let stream = self.streams.as_ref().map_or(0, |s| words.start / window_words % s.count());
        if let (Some(s), true) = (self.streams.as_mut(), stream > 0) {
            s.window(stream, first, q.unsent[words.clone()].to_vec(), self.frame_pages)?;
            q.take(words);
        } else {
            let ranges = dirty_ranges(&q.unsent[words.clone()], first, self.vm.memory(), self.frame_pages);
            q.take(words);
            self.sender.send_pages(0, &ranges, self.vm.memory())?;
            let zero: u64 = ranges.iter().filter(|x| x.zero).map(|x| u64::from(x.pages)).sum();
            let data: u64 = ranges.iter().filter(|x| !x.zero).map(|x| u64::from(x.pages)).sum();
            self.count_pages(data, zero);
        }
        self.end_round();
        self.bandwidth_window.update(self.sent_bytes());
        self.limit()?;
        if self.stopped.is_none() {
            hooks.tick(self.vm);
            self.reap()?;
        }
        Ok(Window::Sent)
    }

    /// Counts `data` and `zero` pages sent in this round.
    fn count_pages(&mut self, data: u64, zero: u64) {
        let r = self.stats.rounds.last_mut().expect("this round");
        (r.normal_pages, r.duplicate_pages) = (r.normal_pages + data, r.duplicate_pages + zero);
        self.stats.normal_pages += data;
        self.stats.duplicate_pages += zero;
    }

    /// Brings the round's byte count, time, bandwidth, the pages the other
    /// streams sent, and (in pre-copy) the guest's stall up to now.
    fn end_round(&mut self) {
        if self.stopped.is_none() {
            self.account_stall();
        }
        // Relaxed: counts; after a round's mark, its channel ordered them.
        let data = self.stream_pages.normal.swap(0, std::sync::atomic::Ordering::Relaxed);
        let zero = self.stream_pages.duplicate.swap(0, std::sync::atomic::Ordering::Relaxed);
        self.count_pages(data, zero);
        let (t, before) = self.round_start;
        let bytes = self.sent_bytes();
        let r = self.stats.rounds.last_mut().expect("this round");
        r.bytes_sent = bytes - before;
        r.send_ms = ms(t.elapsed());
        r.bandwidth_bytes_per_s = r.bytes_sent as f64 / t.elapsed().as_secs_f64().max(1e-9);
        self.stats.transferred_bytes = bytes;
    }

    /// Ends downtime phase `field` now, and begins the next.
    fn phase_ends(&mut self, field: fn(&mut DowntimePhases) -> &mut Option<f64>) -> Instant {
        let now = Instant::now();
        let p = self.stats.downtime_phases.get_or_insert_with(DowntimePhases::default);
        *field(p) = Some(ms(now - self.phase_start));
        self.phase_start = now;
        now
    }

    /// Pauses the guest and sends the rest: `pending` (dirty, not sent),
    /// the final harvest, the digests (unless audited after), the vCPUs,
    /// `Done`.
    fn stop_and_copy(
        &mut self,
        round: u32,
        pending: Vec<u64>,
        hooks: &mut dyn SourceHooks<V>,
    ) -> Result<(), MigrationError> {
        let gate = self.vm.vcpu_gate();
        // QEMU cancels the limit at the switchover: the vCPUs stop anyway,
        // and must not be held when they resume (here after a failure, or
        // nowhere).
        self.vm.set_dirty_limit(None)?;
        // The parallel harvest's threads get ready while the vCPUs stop.
        self.vm.prepare_harvest(Duration::from_millis(100));
        // The stall ends where the downtime begins.
        self.account_stall();
        let stop = Instant::now();
        (self.stopped, self.phase_start) = (Some(stop), stop);
        gate.pause(self.params.progress_timeout)?;
        self.phase_ends(|p| &mut p.pause_ms);
        self.stats.source_vm = SourceVm::Postmigrate;
        hooks.phase(Phase::Paused);
        let mut last = vec![0u64; pending.len()];
        let (found, harvest_ns) = self.harvest(&mut last, true)?;
        self.phase_ends(|p| &mut p.final_harvest_ms);
        let mut q = SendQueue { uncleared: vec![0; pending.len()], unsent: pending, pending: 0, cursor: 0 };
        q.add(&last, false);
        self.begin_round(round, found, harvest_ns)?;
        // SAFETY: the digest thread is joined before this function returns,
        // while the caller still lends us the VM.
        let memory = unsafe { SharedMemory::of(self.vm.memory()) };
        let digests = std::thread::scope(|s| -> Result<_, MigrationError> {
            // The digest pass beside the send: both read the paused memory,
            // and the send mostly waits for the destination.
            let threads = self.digest_threads;
            let pass =
                (self.params.verify == Verify::Strict).then(|| s.spawn(move || digest_pass(memory, threads)));
            while q.pending > 0 {
                self.send_window(&mut q, hooks)?;
            }
            // Every stream's pages before the digests: each ends with `Done`.
            if let Some(s) = self.streams.as_mut() {
                s.finish()?;
            }
            self.sender.flush()?;
            self.end_round();
            self.phase_ends(|p| &mut p.send_ms);
            Ok(pass.map(|t| t.join().expect("the digest pass panicked")))
        })?;
        if let Some(d) = digests {
            self.send_digests(&d)?;
        }
        self.phase_ends(|p| &mut p.digests_ms);
        for (vcpu, state) in gate.saved().into_iter().enumerate() {
            let state = state.expect("every vCPU saved its state when it paused");
            self.sender.send(&Frame::VcpuState { vcpu: vcpu as u32, state })?;
        }
        self.sender.send_now(&Frame::Done)?;
        self.phase_ends(|p| &mut p.state_ms);
        self.stats.transferred_bytes = self.sent_bytes();
        hooks.phase(Phase::DoneSent);
        Ok(())
    }

    /// `digests`, a digest of every page, frame by frame.
    fn send_digests(&mut self, digests: &[u64]) -> Result<(), MigrationError> {
        for (i, d) in digests.chunks(DIGEST_PAGES as usize).enumerate() {
            self.check_destination()?;
            let first = i as u64 * DIGEST_PAGES;
            self.sender.send(&Frame::Digest { slot: 0, first, digests: d.to_vec() })?;
        }
        Ok(())
    }

    /// The handover from `AwaitVerified` on: an error while the guest may
    /// still resume here (before `Commit`), else where it ended.
    fn handover(
        &mut self,
        header: &Header,
        hooks: &mut dyn SourceHooks<V>,
    ) -> Result<HandoverEnd, MigrationError> {
        let p = self.params.progress_timeout;
        let b = self.params.breakage;
        let event = match self.inbox.wait(self.sent_bytes(), Instant::now() + p, "verified") {
            Ok(Frame::Verified) => SourceEvent::Verified,
            Ok(Frame::Refuse { why }) => return Err(MigrationError::Refused(why)),
            Ok(other) => {
                return Err(StreamError::Unexpected { expected: "verified", got: other.name() }.into());
            }
            Err(e) => return Err(self.refusal_or(e)),
        };
        let (state, action) = self.state.on(event, &b);
        debug_assert_eq!(action, SourceAction::SendCommit);
        self.phase_ends(|p| &mut p.check_ms);
        hooks.phase(Phase::VerifiedReceived);
        // The point of no return: from the first byte of `Commit` on, the
        // destination may run the guest.
        self.state = state;
        let id = header.id;
        let sent = self.sender.send_now(&Frame::Commit { id });
        hooks.phase(Phase::CommitSent);
        let heard = sent.map_err(MigrationError::from).and_then(|_| {
            loop {
                match self.inbox.wait(self.sent_bytes(), Instant::now() + p, "running")? {
                    Frame::Running { id: got } if got == id => return Ok(SourceEvent::Running),
                    Frame::Refuse { why } => return Err(MigrationError::Refused(why)),
                    // A duplicate `Verified`: no answer yet.
                    Frame::Verified => continue,
                    other => {
                        return Err(StreamError::Unexpected { expected: "running", got: other.name() }.into());
                    }
                }
            }
        });
        let (event, why) = match heard {
            Ok(e) => (e, None),
            Err(e @ MigrationError::Refused(_)) => (SourceEvent::Aborted, Some(e)),
            Err(e) => (SourceEvent::Failed, Some(e)),
        };
        let (state, action) = self.state.on(event, &b);
        self.state = state;
        if state == SourceState::Completed {
            self.running_heard();
            hooks.phase(Phase::RunningReceived);
        }
        if action != SourceAction::Query {
            return Ok(HandoverEnd { state, action, why });
        }
        Ok(self.settling(header.id))
    }

    /// The destination runs the guest: the downtime ends, its last phase
    /// with it.
    fn running_heard(&mut self) {
        let now = self.phase_ends(|p| &mut p.resume_ms);
        self.stats.downtime_ms = self.stopped.map(|s| ms(now - s));
    }

    /// `Settling`: asks the destination over new connections until it
    /// answers or the settle window ends.
    fn settling(&mut self, id: u64) -> HandoverEnd {
        let b = self.params.breakage;
        let p = self.params.progress_timeout;
        let end = Instant::now() + self.params.settle_timeout;
        let dest = self.dest;
        loop {
            let (event, said) = ask(&self.params.dialer, dest, id, p);
            let (state, action) = self.state.on(event, &b);
            self.state = state;
            let why = said.filter(|_| state != SourceState::Completed);
            if state == SourceState::Completed {
                self.running_heard();
            }
            if action != SourceAction::Query {
                return HandoverEnd { state, action, why };
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let (state, action) = self.state.on(SourceEvent::SettleExpired, &b);
                self.state = state;
                return HandoverEnd { state, action, why };
            }
            std::thread::sleep(left.min(p / 4));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_print_and_parse_by_one_table() {
        for p in [Precopy::Qemu, Precopy::Rounds] {
            assert_eq!(p.to_string().parse::<Precopy>(), Ok(p));
        }
        for v in [Verify::Strict, Verify::Audit] {
            assert_eq!(v.to_string().parse::<Verify>(), Ok(v));
        }
        assert_eq!("round".parse::<Precopy>(), Err("\"round\": qemu or rounds".to_string()));
        assert_eq!("lax".parse::<Verify>(), Err("\"lax\": strict or audit".to_string()));
    }

    #[test]
    fn the_send_queue_walks_windows_from_its_cursor_and_wraps() {
        // 200 pages: 4 words, the last one 8 pages; windows of 2 words.
        let mut q = SendQueue::every_page(200);
        assert_eq!((q.pending, q.unsent[3]), (200, 0xff));
        assert_eq!(q.next_window(2), Some(0..2));
        q.take(0..2);
        assert_eq!(q.pending, 72);
        // A sync mid-pass: pages 5 (behind the cursor) and 130 (ahead),
        // page 130 to CLEAR first.
        let mut fresh = vec![0u64; 4];
        fresh[0] = 1 << 5;
        fresh[2] = 1 << 2;
        q.add(&fresh, true);
        assert_eq!((q.pending, q.uncleared[2], q.uncleared[0]), (73, 1 << 2, 1 << 5));
        // On from the cursor, not from page 0: the window ahead first.
        assert_eq!(q.next_window(2), Some(2..4));
        q.take(2..4);
        assert_eq!(q.next_window(2), Some(0..2), "then it wraps to the page behind");
        q.take(0..2);
        assert_eq!((q.pending, q.next_window(2)), (0, None));
    }

    #[test]
    fn the_bandwidth_is_the_slowest_recent_period() {
        let mut b = BandwidthWindow::new(0);
        assert_eq!(b.bytes_per_s(0), None, "nothing sent, nothing measured");
        std::thread::sleep(Duration::from_millis(5));
        assert!(b.bytes_per_s(1_000_000).is_some(), "the current period before one closes");
        let mut sent = 0;
        let period = |b: &mut BandwidthWindow, sent: &mut u64, mb: u64| {
            b.mark -= BANDWIDTH_PERIOD;
            *sent += mb * 1_000_000;
            b.update(*sent);
        };
        period(&mut b, &mut sent, 100);
        period(&mut b, &mut sent, 10);
        // The slow period (10 MB in 100 ms) rules while in the window.
        let bps = b.bytes_per_s(sent).unwrap();
        assert!(bps <= 1e8, "{bps}");
        for _ in 0..BANDWIDTH_PERIODS {
            period(&mut b, &mut sent, 100);
        }
        assert_eq!(b.periods.len(), BANDWIDTH_PERIODS);
        // Out of it: the rest are at most 100 MB per 100 ms (each a little
        // longer).
        let bps = b.bytes_per_s(sent).unwrap();
        assert!(bps > 0.9e9 && bps <= 1e9, "{bps}");
    }
}

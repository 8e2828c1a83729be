//! The source of a live migration: pre-copy over any [`PassVm`], with
//! QEMU's and Cloud Hypervisor's rules. It knows the dirty-log interface
//! the VM offers ([`Capabilities`]), never which backend runs it.
//!
//! 1. Setup: the header; the destination builds its VM and says `Ready`
//!    (its setup is ours, as QEMU's destination allocates before it
//!    listens); then dirty logging on.
//! 2. Round 0 sends every page; with `INITIALLY_SET` the log starts all
//!    ones and each window is CLEARed (write-protected) just before it is
//!    sent, so CLEAR paces the bulk copy.
//! 3. Each later round harvests (GET; GET with a CLEAR of each window just
//!    before it is sent, as QEMU clears lazily; or the dirty rings) and
//!    sends what was dirtied, measuring the bandwidth as it goes.
//! 4. When the pages pending fit in bandwidth x downtime limit, or at the
//!    timeout with `force`, the stop-and-copy: pause the vCPUs, the final
//!    harvest (on the VM's harvest threads), the rest of the pages, a
//!    digest of every page, the vCPUs' state, `Done`; the destination
//!    checks, resumes the guest and acks. Downtime runs from the pause to
//!    that ack, as QEMU measures it.
//!
//! Invariants:
//! - every page the guest stored to after it was last sent is in a later
//!   harvest (the dirty log's promise), so once paused, sending the final
//!   harvest's pages and the pending ones leaves the destination equal to
//!   the source, which the digests prove page by page;
//! - on any failure (the peer, the stream, the timeout with `cancel`) the
//!   vCPUs run again, unthrottled, dirty logging is off, and the VM is as
//!   before the migration: it can migrate again.

use std::io::{BufWriter, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use shadow_mmu_testkit::backend::{BackendError, DirtyLogProtect, PassVm, error_chain, timed_harvest};
use shadow_mmu_testkit::interface::HarvestSpec;
use shadow_mmu_testkit::vcpu_gate::PauseTimeout;
use thiserror::Error;

use crate::pacer::{Pacer, Throttle};
use crate::ranges::{dirty_ranges, page_digests, quiescent_bytes};
use crate::stats::{MigrationStats, MigrationStatus, RoundStats};
use crate::stream::{Frame, FrameWriter, Header, StreamError, read_frame};

/// Pages per `Pages` frame: 8 MiB of data at most, under the stream's
/// 16 MiB maximum with its table.
pub const FRAME_PAGES: u32 = 2048;
/// Digests per `Digest` frame (64 KiB): small, so that the destination
/// checks one while the source computes the next.
pub const DIGEST_PAGES: u64 = 8192;
/// How long the vCPUs may take to pause.
pub const PAUSE_WITHIN: Duration = Duration::from_secs(5);

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

/// The source's knobs (QEMU's migration parameters).
#[derive(Debug, Clone)]
pub struct OutgoingParams {
    /// QEMU's `downtime-limit` (300 ms by default).
    pub downtime_limit: Duration,
    /// QEMU's `max-bandwidth`, bytes a second (`None`: as fast as the link).
    pub max_bandwidth: Option<u64>,
    /// How long pre-copy may iterate.
    pub timeout: Option<Duration>,
    /// What happens then.
    pub on_timeout: OnTimeout,
    /// QEMU's `auto-converge`.
    pub auto_converge: bool,
    /// How the guest's dirtying is paced meanwhile (bytes a second; `None`:
    /// flat out).
    pub dirty_rate: Option<u64>,
    /// The workload's share of stores, percent (for the pacing).
    pub write_pct: u8,
    /// The harvest's CLEAR window, pages (a multiple of 64), with manual
    /// protect; also the window of the round-0 CLEAR with `INITIALLY_SET`.
    pub clear_chunk_pages: u64,
    /// How long to wait for the destination's ack.
    pub ack_timeout: Duration,
}

impl Default for OutgoingParams {
    fn default() -> Self {
        Self {
            downtime_limit: Duration::from_millis(300),
            max_bandwidth: None,
            timeout: None,
            on_timeout: OnTimeout::Cancel,
            auto_converge: false,
            dirty_rate: None,
            write_pct: 100,
            clear_chunk_pages: HarvestSpec::default().clear_chunk_pages,
            ack_timeout: Duration::from_secs(30),
        }
    }
}

/// Why a migration did not complete.
#[derive(Debug, Error)]
pub enum MigrationError {
    /// The stream failed: the peer went away, or sent something wrong.
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
    /// The destination refused the VM or its memory.
    #[error("the destination refused the migration: {0}")]
    Refused(String),
}

/// A migration that did not complete: why, and its statistics so far.
#[derive(Debug, Error)]
#[error("migration {}", if matches!(error, MigrationError::Timeout(_)) { "cancelled" } else { "failed" })]
pub struct MigrationFailure {
    /// Why.
    #[source]
    pub error: MigrationError,
    /// What it had done (boxed: the error path stays small).
    pub stats: Box<MigrationStats>,
}

/// Counts the bytes written and holds them to a bandwidth.
struct Wire<W: Write> {
    w: W,
    frames: FrameWriter,
    bytes: u64,
    start: Instant,
    max: Option<u64>,
}

impl<W: Write> Wire<W> {
    fn send(&mut self, f: &Frame) -> Result<u64, StreamError> {
        let n = self.frames.write(&mut self.w, f)?;
        self.bytes += n;
        self.limit()?;
        Ok(n)
    }

    /// Holds the bytes sent so far to the bandwidth limit.
    fn limit(&mut self) -> Result<(), StreamError> {
        if let Some(max) = self.max.filter(|&m| m > 0) {
            // QEMU's rate limit: never ahead of `max` bytes a second.
            let due = Duration::from_secs_f64(self.bytes as f64 / max as f64);
            if let Some(wait) = due.checked_sub(self.start.elapsed()) {
                self.w.flush()?;
                std::thread::sleep(wait);
            }
        }
        Ok(())
    }
}

/// One migration's state on the source.
struct Outgoing<'a, W: Write> {
    vm: &'a mut dyn PassVm,
    wire: Wire<W>,
    params: &'a OutgoingParams,
    pacer: Pacer,
    stats: MigrationStats,
    start: Instant,
    /// With the dirty ring: pages reaped from the rings between harvests
    /// (QEMU's reaper thread, here between frames), for the next harvest.
    reaped: Vec<u64>,
    last_reap: Instant,
    /// The faults that met the last harvest, for its round's statistics.
    harvest_latency: Option<shadow_mmu_testkit::perf::LatencyHistogram>,
}

/// How often the rings are reaped while a round is sent: a ring of 65536
/// entries fills in a quarter second at 1 GiB/s of emulated stores on KVM,
/// which pushes one entry per store.
const REAP_EVERY: Duration = Duration::from_millis(20);

/// Migrates `vm` over `conn` (connected to a destination), announcing it
/// with `header`; `progress` sees the statistics after each round. On
/// success the vCPUs are left paused (the guest now runs at the
/// destination): stop the VM. On failure they run on (module docs).
pub fn migrate_outgoing(
    vm: &mut dyn PassVm,
    conn: &TcpStream,
    header: &Header,
    params: &OutgoingParams,
    progress: &mut dyn FnMut(&MigrationStats),
) -> Result<MigrationStats, MigrationFailure> {
    let start = Instant::now();
    let total = vm.pages() * 4096;
    let pacer = Pacer::new(vm, params.dirty_rate, params.write_pct);
    let mut throttle = params.auto_converge.then(|| Throttle::start(vm.vcpu_gate()));
    let wire = Wire {
        w: BufWriter::with_capacity(1 << 16, conn),
        frames: FrameWriter::default(),
        bytes: 0,
        start,
        max: params.max_bandwidth,
    };
    let stats = MigrationStats::new(total, params.downtime_limit.as_millis() as u64);
    let reaped = vec![0u64; vm.pages().div_ceil(64) as usize];
    let mut m =
        Outgoing { vm, wire, params, pacer, stats, start, reaped, last_reap: start, harvest_latency: None };
    let r = m.run(conn, header, throttle.as_mut(), progress);
    if let Some(t) = throttle.as_mut() {
        m.stats.cpu_throttle_percentage = t.pct();
        t.stop();
    }
    m.stats.total_time_ms = ms(start.elapsed());
    m.stats.transferred_bytes = m.wire.bytes;
    m.stats.mbps = m.wire.bytes as f64 * 8.0 / 1e6 / start.elapsed().as_secs_f64();
    // A destination that refuses says why before it closes: read it.
    let r = r.map_err(|e| match e {
        MigrationError::Stream(StreamError::Io(_)) => refusal(conn).unwrap_or(e),
        e => e,
    });
    match r {
        Ok(()) => {
            m.stats.status = MigrationStatus::Completed;
            m.stats.remaining_bytes = 0;
            Ok(m.stats)
        }
        Err(error) => {
            // The destination learns at once (a cancel, a refusal, our own
            // stream error): it discards its partial VM.
            let _ = conn.shutdown(std::net::Shutdown::Both);
            // The guest runs on here, as before the migration.
            m.vm.vcpu_gate().resume();
            let _ = m.vm.set_dirty_logging(false);
            m.stats.status = match error {
                MigrationError::Timeout(_) => MigrationStatus::Cancelled,
                _ => MigrationStatus::Failed,
            };
            m.stats.error = Some(error_chain(&error));
            Err(MigrationFailure { error, stats: Box::new(m.stats) })
        }
    }
}

/// The destination's refusal, if it sent one before closing (after a write
/// to it failed).
fn refusal(conn: &TcpStream) -> Option<MigrationError> {
    conn.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
    let mut r = conn;
    loop {
        match read_frame(&mut r, 4096) {
            Ok(Frame::Refuse { why }) => return Some(MigrationError::Refused(why)),
            Ok(_) => continue,
            Err(_) => return None,
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl<W: Write> Outgoing<'_, W> {
    fn run(
        &mut self,
        conn: &TcpStream,
        header: &Header,
        throttle: Option<&mut Throttle>,
        progress: &mut dyn FnMut(&MigrationStats),
    ) -> Result<(), MigrationError> {
        let pages = self.vm.pages();
        let words = pages.div_ceil(64) as usize;
        // The handshakes are small frames that must not wait on Nagle.
        conn.set_nodelay(true).map_err(StreamError::Io)?;
        self.wire.send(&Frame::Header(header.clone()))?;
        self.wire.w.flush().map_err(StreamError::Io)?;
        // The destination builds its VM, then says so (or why not).
        conn.set_read_timeout(Some(self.params.ack_timeout)).map_err(StreamError::Io)?;
        match read_frame(&mut &*conn, 4096)? {
            Frame::Ready => {}
            Frame::Refuse { why } => return Err(MigrationError::Refused(why)),
            other => return Err(StreamError::Unexpected { expected: "ready", got: other.name() }.into()),
        }
        self.vm.set_dirty_logging(true)?;
        let logging = Instant::now();
        self.stats.setup_time_ms = ms(self.start.elapsed());
        let caps = self.vm.capabilities();
        let manual = caps.dirty_ring.is_none() && caps.protect.is_manual();

        // Round 0: everything.
        let mut bitmap = vec![u64::MAX; words];
        if !pages.is_multiple_of(64) {
            bitmap[words - 1] = (1 << (pages % 64)) - 1;
        }
        let initially_set = caps.dirty_ring.is_none() && caps.protect == DirtyLogProtect::ManualInitiallySet;
        if initially_set {
            // The log starts all ones: GET copies it, and each window's
            // CLEAR protects it just before it is sent.
            self.vm.get_dirty_log(&mut bitmap)?;
        }
        self.send_round(0, &bitmap, 0, initially_set)?;
        progress(&self.stats);

        let mut round = 1;
        let mut dirtied_pages = 0u64;
        let mut throttle = throttle;
        loop {
            let (dirty, harvest_ns) = self.harvest(&mut bitmap, false)?;
            // The harvests together cover the time since logging began.
            dirtied_pages += dirty;
            self.stats.dirty_pages_rate = dirtied_pages as f64 / logging.elapsed().as_secs_f64().max(1e-9);
            let bandwidth = self.bandwidth();
            let pending = dirty * 4096;
            self.stats.remaining_bytes = pending;
            self.stats.expected_downtime_ms = pending as f64 / bandwidth * 1e3;
            if pending as f64 <= bandwidth * self.params.downtime_limit.as_secs_f64() {
                self.stats.converged = true;
                break;
            }
            if let Some(limit) = self.params.timeout.filter(|&l| self.start.elapsed() >= l) {
                match self.params.on_timeout {
                    OnTimeout::Cancel => return Err(MigrationError::Timeout(limit)),
                    OnTimeout::Force => break,
                }
            }
            if let Some(t) = throttle.as_deref_mut() {
                self.stats.cpu_throttle_percentage = t.raise();
            }
            self.send_round(round, &bitmap, harvest_ns, manual)?;
            progress(&self.stats);
            round += 1;
        }
        if let Some(t) = throttle {
            t.stop();
        }
        self.stop_and_copy(conn, round, bitmap)
    }

    /// The bandwidth of the last round, bytes a second (at least 1 MB/s).
    fn bandwidth(&self) -> f64 {
        self.stats.rounds.last().map_or(1e6, |r| r.bandwidth_bytes_per_s).max(1e6)
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
    /// round (and KVM's never overflows).
    fn reap(&mut self) -> Result<(), MigrationError> {
        if self.vm.capabilities().dirty_ring.is_none() || self.last_reap.elapsed() < REAP_EVERY {
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

    /// Sends the pages of `bitmap` as round `round`, window by window,
    /// CLEARing each window first if `clear`.
    fn send_round(
        &mut self,
        round: u32,
        bitmap: &[u64],
        harvest_ns: u64,
        clear: bool,
    ) -> Result<(), MigrationError> {
        let t = Instant::now();
        let before = self.wire.bytes;
        let mut r = RoundStats { round, harvest_ns, ..RoundStats::default() };
        if let Some(h) = self.harvest_latency.take().filter(|_| round > 0) {
            r.harvest_faults = Some(h.count());
            r.fault_p99_during_harvest_ns = (h.count() > 0).then(|| h.quantile_ns(0.99));
        }
        r.pages_harvested = bitmap.iter().map(|w| u64::from(w.count_ones())).sum();
        self.wire.send(&Frame::Round { round })?;
        let window_words = (FRAME_PAGES / 64) as usize;
        let clear_words = (self.params.clear_chunk_pages / 64).max(1) as usize;
        for (i, window) in bitmap.chunks(window_words).enumerate() {
            let first = (i * window_words * 64) as u64;
            if clear {
                // CLEAR just before sending, in the clear window's size.
                for (j, mask) in window.chunks(clear_words).enumerate() {
                    if mask.iter().any(|&w| w != 0) {
                        self.vm.clear_dirty_log(first + (j * clear_words * 64) as u64, mask)?;
                    }
                }
            }
            let ranges = dirty_ranges(window, first, self.vm.memory(), FRAME_PAGES);
            if ranges.is_empty() {
                continue;
            }
            for x in &ranges {
                if x.zero {
                    r.duplicate_pages += u64::from(x.pages);
                } else {
                    r.normal_pages += u64::from(x.pages);
                }
            }
            self.wire.bytes +=
                self.wire.frames.write_pages(&mut self.wire.w, 0, &ranges, self.vm.memory())?;
            self.wire.limit()?;
            self.pacer.tick(self.vm);
            self.reap()?;
        }
        self.wire.w.flush().map_err(StreamError::Io)?;
        r.bytes_sent = self.wire.bytes - before;
        r.send_ms = ms(t.elapsed());
        r.bandwidth_bytes_per_s = r.bytes_sent as f64 / t.elapsed().as_secs_f64().max(1e-9);
        r.cpu_throttle_percentage = self.stats.cpu_throttle_percentage;
        r.guest_passes = self.vm.passes_done();
        self.stats.normal_pages += r.normal_pages;
        self.stats.duplicate_pages += r.duplicate_pages;
        self.stats.transferred_bytes = self.wire.bytes;
        self.stats.rounds.push(r);
        Ok(())
    }

    /// Pauses the guest and sends the rest: `pending` (harvested, not sent),
    /// the final harvest, the digests, the vCPUs; waits for the ack.
    fn stop_and_copy(
        &mut self,
        conn: &TcpStream,
        round: u32,
        mut pending: Vec<u64>,
    ) -> Result<(), MigrationError> {
        let gate = self.vm.vcpu_gate();
        // The parallel harvest's threads get ready while the vCPUs stop.
        self.vm.prepare_harvest(Duration::from_millis(100));
        let stop = Instant::now();
        gate.pause(PAUSE_WITHIN)?;
        self.stats.pause_ms = ms(stop.elapsed());
        let mut last = vec![0u64; pending.len()];
        let (_, harvest_ns) = self.harvest(&mut last, true)?;
        self.stats.final_harvest_ms = harvest_ns as f64 / 1e6;
        for (p, l) in pending.iter_mut().zip(&last) {
            *p |= l;
        }
        self.send_round(round, &pending, harvest_ns, false)?;
        let pages = self.vm.pages();
        // SAFETY: the vCPUs are paused (the gate's acquire ordered their
        // stores before us) and nothing else writes guest memory until we
        // resume them or the VM stops; `bytes` dies before either.
        let bytes = unsafe { quiescent_bytes(self.vm.memory()) };
        // The destination only compares (it digested each page as it
        // loaded it): this host's CPUs are ours.
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut first = 0;
        while first < pages {
            let n = DIGEST_PAGES.min(pages - first);
            let digests = page_digests(bytes, first, n, threads);
            self.wire.send(&Frame::Digest { slot: 0, first, digests })?;
            first += n;
        }
        for (vcpu, state) in gate.saved().into_iter().enumerate() {
            let state = state.expect("every vCPU saved its state when it paused");
            self.wire.send(&Frame::VcpuState { vcpu: vcpu as u32, state })?;
        }
        self.wire.send(&Frame::Done)?;
        self.wire.w.flush().map_err(StreamError::Io)?;
        match read_frame(&mut &*conn, 4096)? {
            Frame::Ack { running: true } => {}
            Frame::Ack { running: false } => {
                return Err(MigrationError::Refused("its checks failed; it does not run the guest".into()));
            }
            Frame::Refuse { why } => return Err(MigrationError::Refused(why)),
            other => return Err(StreamError::Unexpected { expected: "ack", got: other.name() }.into()),
        }
        self.stats.downtime_ms = ms(stop.elapsed());
        Ok(())
    }
}

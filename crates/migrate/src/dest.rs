//! The destination of a live migration: builds its VM from the stream's
//! header (through the caller, who knows the backends), loads the rounds,
//! checks every page against the source's digest, restores the vCPUs, and
//! takes its half of the handover ([`crate::handover`]): `Verified`, then
//! on `Commit` the guest starts (through the caller's
//! [`DestHooks::start`]) and it says `Running`. Meanwhile it answers the
//! source's settle queries on its listener. What the guest then does is the
//! caller's to watch: it gets the VM, running, and the source's final
//! digests.
//!
//! Invariants:
//! - the guest never runs here unless every page matched its digest, every
//!   vCPU took its state, and the source said `Commit`; otherwise the
//!   partial VM is dropped and the source told why (a `Refuse`) while it
//!   can still be told;
//! - once started, the guest is never discarded here: a started migration
//!   returns its VM;
//! - once it decided (`Running` or `Aborted`), it keeps answering the
//!   source's queries for as long as the source may ask (its progress
//!   timeout, then its settle window), or until the source says it knows.

use std::io::BufReader;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use shadow_mmu_vmm::{BackendError, error_chain};
use thiserror::Error;

use crate::handover::{DestAction, DestEvent, DestState};
use crate::link::{self, Counting, Heartbeat, Sender};

use crate::ranges::PageRange;
use crate::refusal::Refusal;
use crate::stats::{IncomingStats, MigrationStatus};
use crate::stream::{
    AUDIT_PAGES, Frame, FrameReader, Header, MAX_STREAMS, PAGE_BYTES, SlotLayout, StreamError, read_header,
};
use crate::streams::{PageLoader, RoundBarrier, StreamEnd, receive_stream};
use crate::{DestHooks, MigrationVm, Phase};

/// Why the caller could not build, or prepare, the VM a header describes
/// (the source is told, as [`Refusal::Build`]).
#[derive(Debug, Error)]
pub enum BuildError {
    /// The header names a backend this destination does not run.
    #[error("backend {named:?}: this destination runs {runs}")]
    UnknownBackend {
        /// The header's backend.
        named: String,
        /// What this destination runs.
        runs: &'static str,
    },
    /// The header's configuration is not a VM this destination can read.
    #[error("the header's VM description")]
    Description(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The VM is larger than this destination takes.
    #[error("a guest of {} MiB: this destination takes at most {} MiB", .bytes >> 20, .max >> 20)]
    TooLarge {
        /// The guest's memory.
        bytes: u64,
        /// The most this destination takes.
        max: u64,
    },
    /// The backend refused to create or prepare the VM.
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// A migration received: the guest runs here.
pub struct Incoming<V: ?Sized> {
    /// The figures.
    pub stats: IncomingStats,
    /// The VM, its guest running.
    pub vm: Box<V>,
    /// The source's digest of each page of its final memory, for the
    /// caller's checks of what the guest does here.
    pub final_digests: Vec<u64>,
}

/// Why an incoming migration did not end with the guest running here.
#[derive(Debug, Error)]
pub enum IncomingError {
    /// The stream broke, went silent or came corrupt: the partial VM is
    /// discarded.
    #[error("the migration stream failed; the partial VM is discarded")]
    Stream(#[from] StreamError),
    /// We refused the header, a frame or the memory it loaded, or aborted
    /// before the commit (and told the source why): the guest never ran
    /// here.
    #[error("refused the migration: {0}")]
    Refused(Refusal),
    /// The VM the header describes could not be built (the source was
    /// told why).
    #[error("refused the migration: its VM could not be built")]
    Build(#[source] BuildError),
    /// The VM refused an operation.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The handover ended without a `Commit`: the guest never ran here.
    #[error("no commit came; the guest never ran here")]
    NoCommit(#[source] StreamError),
}

impl IncomingError {
    /// What the source is told: the refusal, or the cause as text where it
    /// is a type of ours.
    pub fn refusal(&self) -> Refusal {
        match self {
            IncomingError::Stream(e) => Refusal::Stream { cause: error_chain(e) },
            IncomingError::Refused(r) => r.clone(),
            IncomingError::Build(e) => Refusal::Build { cause: error_chain(e) },
            IncomingError::Backend(e) => Refusal::Backend { cause: error_chain(e) },
            IncomingError::NoCommit(e) => Refusal::NoCommit { cause: error_chain(e) },
        }
    }
}

/// An incoming migration that failed: why, and its statistics so far.
#[derive(Debug, Error)]
#[error("incoming migration failed")]
pub struct IncomingFailure {
    /// Why.
    #[source]
    pub error: IncomingError,
    /// What it had done (boxed: the error path stays small).
    pub stats: Box<IncomingStats>,
}

/// The destination's knobs.
#[derive(Debug, Clone, Copy)]
pub struct IncomingParams {
    /// How long to wait for a word from the source before its header
    /// brings the source's own timeout.
    pub progress_timeout: Duration,
}

impl Default for IncomingParams {
    fn default() -> Self {
        Self { progress_timeout: Duration::from_secs(10) }
    }
}

/// The destination's handover, shared by the receiving thread and the one
/// that answers queries.
#[derive(Debug)]
struct Cell {
    state: Mutex<CellState>,
    changed: Condvar,
}

#[derive(Debug)]
struct CellState {
    state: DestState,
    /// The migration's id, once the header came.
    id: Option<u64>,
    /// When the outcome was decided (`Running` or `Aborted`).
    decided: Option<Instant>,
    /// A query came before the commit and aborted the migration.
    queried: bool,
    /// The source said it knows the outcome.
    settled: bool,
    /// The extra page streams that attached so far, by index.
    attached: Vec<(u32, TcpStream)>,
}

impl Cell {
    fn lock(&self) -> MutexGuard<'_, CellState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes `event`; returns the new state and the action.
    fn on(&self, event: DestEvent) -> (DestState, DestAction) {
        let mut c = self.lock();
        let (s, a) = c.state.on(event);
        c.state = s;
        if matches!(s, DestState::Running | DestState::Aborted) && c.decided.is_none() {
            c.decided = Some(Instant::now());
        }
        self.changed.notify_all();
        (s, a)
    }

    fn settle(&self) {
        self.lock().settled = true;
        self.changed.notify_all();
    }

    /// Waits until the source said it knows, or `window` after the
    /// decision.
    fn linger(&self, window: Duration) {
        let mut c = self.lock();
        let end = c.decided.unwrap_or_else(Instant::now) + window;
        while !c.settled {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            c = self.changed.wait_timeout(c, left).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
}

/// Answers the source's settle queries on the listener, one connection at
/// a time, until dropped.
struct Answering {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// The progress timeout and settle window a header may ask for, at least
/// and at most.
const MIN_TIMEOUT: Duration = Duration::from_millis(50);
const MAX_TIMEOUT: Duration = Duration::from_secs(600);

/// How often the destination reports the bytes it read while it loads.
const RECEIVED_EVERY: Duration = Duration::from_millis(20);

/// How often the answering thread looks for a connection.
const ACCEPT_POLL: Duration = Duration::from_millis(10);

impl Answering {
    fn start(listener: &TcpListener, cell: Arc<Cell>, progress: Duration) -> std::io::Result<Self> {
        let l = listener.try_clone()?;
        // Polled, so that dropping this stops it.
        l.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new().name("migrate-answering".into()).spawn(move || {
            // Relaxed: the flag carries no data.
            while !s.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((conn, _)) => {
                        let _ = answer(conn, &cell, progress);
                    }
                    Err(_) => std::thread::sleep(ACCEPT_POLL),
                }
            }
        })?;
        Ok(Self { stop, thread: Some(thread) })
    }
}

impl Drop for Answering {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One connection besides the migration's: an extra page stream of this
/// migration (an `Attach`, read to its last byte and no further, so that
/// the pages after it stay in the socket) is handed to the receiver; a
/// `Query` is answered by the handover's state (aborting a migration not
/// yet committed: the query fences its `Commit`), then a `Settled` may
/// follow; a second migration is refused.
fn answer(conn: TcpStream, cell: &Cell, progress: Duration) -> Result<(), StreamError> {
    conn.set_nonblocking(false)?;
    link::configure(&conn, progress)?;
    conn.set_read_timeout(Some(progress))?;
    let mut w = &conn;
    match FrameReader::default().read(&mut &conn, 0)? {
        Frame::Attach { id, stream } => {
            let mut c = cell.lock();
            if c.id == Some(id) && c.state == DestState::Receiving {
                c.attached.push((stream, conn));
                cell.changed.notify_all();
                return Ok(());
            }
        }
        Frame::Query { id } => {
            let ours = cell.lock().id == Some(id);
            let answer = if ours {
                let (state, action) = cell.on(DestEvent::Query);
                if action == DestAction::Abort {
                    cell.lock().queried = true;
                }
                state.answer()
            } else {
                crate::handover::Answer::Unknown
            };
            crate::stream::write_frame(&mut w, &Frame::Status { id, answer })?;
            if let Ok(Frame::Settled { id: s }) = FrameReader::default().read(&mut &conn, 0)
                && ours
                && s == id
            {
                cell.settle();
            }
        }
        Frame::Header(_) => crate::stream::write_frame(&mut w, &Frame::Refuse { why: Refusal::Busy })?,
        other => return Err(StreamError::Unexpected { expected: "query", got: other.name() }),
    }
    let _ = conn.shutdown(Shutdown::Both);
    Ok(())
}

/// Receives a migration on the first connection `listener` accepts, and
/// answers settle queries on the others; `build` makes the VM from the
/// header (an `Err` is sent back as the refusal's cause), `hooks` start its
/// guest at the commit. On success the guest runs here: its VM is returned,
/// once the source knows (or its window to ask passed), with the
/// statistics and the source's final digests.
pub fn migrate_incoming<V: MigrationVm + ?Sized>(
    listener: &TcpListener,
    build: &mut dyn FnMut(&Header) -> Result<Box<V>, BuildError>,
    params: &IncomingParams,
    hooks: &mut dyn DestHooks<V>,
) -> Result<Incoming<V>, IncomingFailure> {
    let mut stats = IncomingStats { status: MigrationStatus::Active, ..IncomingStats::default() };
    let fail = |error: IncomingError, mut stats: IncomingStats| {
        stats.status = MigrationStatus::Failed;
        stats.error = Some(error_chain(&error));
        Err(IncomingFailure { error, stats: Box::new(stats) })
    };
    let conn = match listener.accept() {
        Ok((c, _)) => c,
        Err(e) => return fail(StreamError::Io(e).into(), stats),
    };
    hooks.phase(Phase::Accepted);
    let cell = Arc::new(Cell {
        state: Mutex::new(CellState {
            state: DestState::Receiving,
            id: None,
            decided: None,
            queried: false,
            settled: false,
            attached: Vec::new(),
        }),
        changed: Condvar::new(),
    });
    let answering = match Answering::start(listener, cell.clone(), params.progress_timeout) {
        Ok(a) => a,
        Err(e) => return fail(StreamError::Io(e).into(), stats),
    };
    let received = Arc::new(AtomicU64::new(0));
    let mut d = Receiver {
        conn: &conn,
        // A small buffer: a frame's payload, larger, is read past it.
        reader: Counting::new(BufReader::with_capacity(64 << 10, &conn), received.clone()),
        cell: &cell,
        received,
        progress: params.progress_timeout,
        settle: Duration::ZERO,
        sender: None,
        vm: None,
        verified: false,
    };
    let r = d.receive(build, &mut stats, hooks);
    stats.received_bytes = d.received.load(Ordering::Relaxed);
    let (settle, verified) = (d.settle, d.verified);
    let (sender, vm) = (d.sender.take(), d.vm.take());
    match r {
        Ok(final_digests) => {
            // The guest runs here: from now on nothing discards it.
            stats.status = MigrationStatus::Completed;
            d.await_settled(settle);
            drop(answering);
            Ok(Incoming { stats, vm: vm.expect("a running guest has its VM"), final_digests })
        }
        Err(error) => {
            // Abort under the lock, so that a query now hears `Aborted`.
            let (state, _) = cell.on(DestEvent::Failed);
            debug_assert_eq!(state, DestState::Aborted);
            drop(vm);
            d.refuse(sender.as_deref(), error.refusal());
            // A source that got our `Verified` may have committed: it asks.
            if verified {
                cell.linger(settle);
            }
            drop(answering);
            fail(error, stats)
        }
    }
}

/// One incoming migration's state.
struct Receiver<'a, V: ?Sized> {
    conn: &'a TcpStream,
    /// The one reader of the connection, from the header to the last
    /// `Settled` (a second one would miss what this one buffered).
    reader: Counting<BufReader<&'a TcpStream>>,
    cell: &'a Cell,
    /// Bytes read off the connection.
    received: Arc<AtomicU64>,
    /// The progress timeout (the source's, once its header came).
    progress: Duration,
    /// How long the source may ask after our decision: its wait for
    /// `Running` (the progress timeout) and its settle window.
    settle: Duration,
    sender: Option<Arc<Sender>>,
    vm: Option<Box<V>>,
    /// `Verified` went out: the source may commit.
    verified: bool,
}

impl<V: MigrationVm + ?Sized> Receiver<'_, V> {
    /// The stream, from the header to the handover's end: once the guest
    /// runs here, the source's final digests.
    fn receive(
        &mut self,
        build: &mut dyn FnMut(&Header) -> Result<Box<V>, BuildError>,
        stats: &mut IncomingStats,
        hooks: &mut dyn DestHooks<V>,
    ) -> Result<Vec<u64>, IncomingError> {
        let timeout = |e: StreamError, p| link::peer_error(e, "source", p);
        link::configure(self.conn, self.progress).map_err(StreamError::Io)?;
        self.conn.set_read_timeout(Some(self.progress)).map_err(StreamError::Io)?;
        let header = read_header(&mut self.reader).map_err(|e| timeout(e, self.progress))?;
        hooks.phase(Phase::HeaderReceived);
        stats.id = header.id;
        stats.backend = format!("{} {}", header.backend, header.config);
        self.cell.lock().id = Some(header.id);
        // From now on, the source's deadlines (kept to a sane range: a
        // header cannot make us spin, nor wait for hours).
        if header.progress_timeout_ms > 0 {
            self.progress =
                Duration::from_millis(u64::from(header.progress_timeout_ms)).clamp(MIN_TIMEOUT, MAX_TIMEOUT);
        }
        self.settle = self.progress + Duration::from_millis(u64::from(header.settle_ms)).min(MAX_TIMEOUT);
        link::configure(self.conn, self.progress).map_err(StreamError::Io)?;
        self.conn.set_read_timeout(Some(self.progress)).map_err(StreamError::Io)?;
        let sender = Arc::new(
            Sender::new(self.conn, "source", self.progress, self.received.clone())
                .map_err(StreamError::Io)?,
        );
        self.sender = Some(sender.clone());
        // Heartbeats while the VM is built, loaded and checked: often while
        // it loads (its count of the bytes read tells the source how much
        // is still in flight, `Outgoing::in_flight`), then as usual (a
        // beat just before a partition would reach the source after it
        // began to wait, and make its silence look shorter).
        let loading = Heartbeat::every(sender.clone(), RECEIVED_EVERY);
        let vm = self.vm.insert(build(&header).map_err(IncomingError::Build)?);
        let want = [SlotLayout { id: 0, guest_phys_addr: 0, pages: vm.pages() }];
        if header.page_size != PAGE_BYTES || header.slots != want {
            let (theirs, page_size, ours) = (header.slots.clone(), header.page_size, want.to_vec());
            return Err(IncomingError::Refused(Refusal::Layout { theirs, page_size, ours }));
        }
        if !(1..=MAX_STREAMS).contains(&header.streams) {
            let cause = format!("{} page streams: this destination takes 1 to {MAX_STREAMS}", header.streams);
            return Err(IncomingError::Refused(Refusal::Stream { cause }));
        }
        hooks.built(vm).map_err(IncomingError::Build)?;
        sender.send_now(&Frame::Ready)?;
        hooks.phase(Phase::ReadySent);
        let extra = self.await_streams(&header)?;
        let (digests, states, loaded) = self.load(&header, extra, stats, hooks)?;
        drop(loading);
        let _heartbeat = Heartbeat::start(sender.clone());

        // Every page checked against the source's digest, before anything
        // runs: a page with no digest counts as mismatched (with an audit,
        // after: `audit`).
        let vm = self.vm.as_mut().expect("built");
        if !header.audit {
            let mismatched =
                stats.mismatched_pages.unwrap_or(0) + digests.iter().filter(|d| d.is_none()).count() as u64;
            stats.mismatched_pages = Some(mismatched);
            if mismatched > 0 {
                return Err(IncomingError::Refused(Refusal::Mismatch { pages: mismatched }));
            }
        }
        let vcpus = states.len() as u32;
        let Some(states) = states.into_iter().collect::<Option<Vec<_>>>() else {
            return Err(IncomingError::Refused(Refusal::MissingVcpuStates { vcpus }));
        };
        vm.restore_vcpus(states)?;
        hooks.prepare(vm).map_err(IncomingError::Build)?;

        // The handover.
        let (state, _) = self.cell.on(DestEvent::Checked);
        if state != DestState::Prepared {
            return Err(IncomingError::Refused(Refusal::QueriedBeforeCommit));
        }
        self.verified = true;
        sender.send_now(&Frame::Verified)?;
        hooks.phase(Phase::VerifiedSent);
        self.await_commit(header.id)?;
        hooks.phase(Phase::CommitReceived);
        hooks.start(self.vm.as_mut().expect("built"));
        // `Running` may not reach the source: it asks then, and the cell
        // answers, for the source's window from now (not from the decision:
        // a destination stopped in between must not shorten it).
        let _ = sender.send_now(&Frame::Running { id: header.id });
        self.cell.lock().decided = Some(Instant::now());
        hooks.phase(Phase::RunningSent);
        if header.audit {
            return Ok(self.audit(&header, &loaded, &sender, stats));
        }
        Ok(digests.into_iter().map(|d| d.expect("every page matched its digest")).collect())
    }

    /// `--verify audit`, the guest running here: the source's digests,
    /// compared with the pages as they were loaded, and the answer. Returns
    /// the source's digests (where the audit could not finish, the loaded
    /// pages' instead: the guest runs, and it says so in `stats.error`).
    fn audit(
        &mut self,
        header: &Header,
        loaded: &[Option<u64>],
        sender: &Sender,
        stats: &mut IncomingStats,
    ) -> Vec<u64> {
        let pages = loaded.len() as u64;
        let mut digests: Vec<Option<u64>> = vec![None; loaded.len()];
        let mut frames = FrameReader::default();
        let mut verify = Duration::ZERO;
        let r = loop {
            match frames.read(&mut self.reader, header.page_size) {
                Ok(Frame::Heartbeat { .. }) => {}
                Ok(Frame::Digest { slot, first, digests: d }) => {
                    if let Err(e) = check_digests(slot, first, &d, pages) {
                        break Err(e);
                    }
                    let t = Instant::now();
                    for (i, v) in d.into_iter().enumerate() {
                        digests[first as usize + i] = Some(v);
                    }
                    verify += t.elapsed();
                }
                Ok(Frame::Done) => break Ok(()),
                Ok(other) => {
                    let e = StreamError::Unexpected { expected: "digest or done", got: other.name() };
                    break Err(e.into());
                }
                Err(e) => break Err(link::peer_error(e, "source", self.progress).into()),
            }
        };
        let differ: Vec<u64> = (0..pages)
            .filter(|&p| digests[p as usize].is_none() || digests[p as usize] != loaded[p as usize])
            .collect();
        stats.verify_ms = Some(verify.as_secs_f64() * 1e3);
        match r {
            Ok(()) => {
                stats.mismatched_pages = Some(differ.len() as u64);
                let f = Frame::Audit {
                    mismatched: differ.len() as u64,
                    pages: differ.iter().take(AUDIT_PAGES).copied().collect(),
                };
                let _ = sender.send_now(&f);
                if !differ.is_empty() {
                    stats.error = Some(format!(
                        "the audit found {} pages that differ from the source's final memory (first: {:?})",
                        differ.len(),
                        &differ[..differ.len().min(AUDIT_PAGES)]
                    ));
                }
                digests.into_iter().zip(loaded).map(|(d, l)| d.or(*l).unwrap_or(0)).collect()
            }
            Err(e) => {
                stats.error = Some(format!("the audit did not finish: {}", error_chain(&e)));
                loaded.iter().map(|l| l.unwrap_or(0)).collect()
            }
        }
    }

    /// The extra page streams the header announced, attached within the
    /// progress timeout (on the listener: `answer`), by index.
    fn await_streams(&mut self, header: &Header) -> Result<Vec<TcpStream>, IncomingError> {
        let want = header.streams.saturating_sub(1) as usize;
        let end = Instant::now() + self.progress;
        let mut c = self.cell.lock();
        while c.attached.len() < want {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let cause = format!(
                    "no progress from the source for {} s: {} of {want} extra page streams attached",
                    crate::stream::secs(self.progress),
                    c.attached.len()
                );
                return Err(IncomingError::Refused(Refusal::Stream { cause }));
            }
            c = self.cell.changed.wait_timeout(c, left).unwrap_or_else(|p| p.into_inner()).0;
        }
        let mut streams = std::mem::take(&mut c.attached);
        streams.sort_by_key(|(i, _)| *i);
        if !streams.iter().map(|(i, _)| *i as usize).eq(1..=want) {
            let got: Vec<u32> = streams.iter().map(|(i, _)| *i).collect();
            let cause = format!("extra page streams {got:?} attached: 1 to {want} expected, once each");
            return Err(IncomingError::Refused(Refusal::Stream { cause }));
        }
        Ok(streams.into_iter().map(|(_, c)| c).collect())
    }

    /// The rounds, the digests and the vCPU states, up to `Done`, over this
    /// connection and the `extra` page streams (`crate::streams`): each
    /// page's digest as loaded is compared with the source's as it comes,
    /// once every stream has ended. Returns the source's digests, the
    /// states, and, for an audit after the resume, each page's digest as
    /// loaded (empty otherwise).
    #[allow(clippy::type_complexity)]
    fn load(
        &mut self,
        header: &Header,
        extra: Vec<TcpStream>,
        stats: &mut IncomingStats,
        hooks: &mut dyn DestHooks<V>,
    ) -> Result<(Vec<Option<u64>>, Vec<Option<Vec<u8>>>, Vec<Option<u64>>), IncomingError> {
        let vm = self.vm.as_ref().expect("built");
        let shape = (vm.pages(), vm.vcpu_gate().vcpus() as usize);
        let loader = PageLoader::new(vm.memory());
        let barrier = RoundBarrier::new(extra.len() as u32 + 1);
        let (progress, received) = (self.progress, self.received.clone());
        let (reader, conn) = (&mut self.reader, self.conn);
        let sender = self.sender.clone().expect("set before Ready");
        let r = std::thread::scope(|s| {
            let mut threads: Vec<_> = extra
                .iter()
                .map(|c| {
                    let (loader, barrier, received) = (&loader, &barrier, &received);
                    s.spawn(move || receive_stream(c, conn, loader, barrier, received, progress))
                })
                .collect();
            let (loader, barrier, sender) = (&loader, &barrier, &sender);
            let main = MainStream { reader, sender, progress, header, shape, loader, barrier };
            let r = main.load(&mut threads, stats, hooks);
            let Err(e) = r else { return r };
            // A stream that failed first is the cause (it stopped this
            // one's reading); the others stop reading now.
            barrier.r#break();
            for c in &extra {
                let _ = c.shutdown(Shutdown::Both);
            }
            let first = threads.into_iter().filter_map(|t| t.join().ok()?.err()).find(|e| !e.induced());
            Err(first.map_or(e, |f| stream_end(f, shape.0, progress)))
        });
        stats.normal_pages = loader.normal.load(Ordering::Relaxed);
        stats.duplicate_pages = loader.duplicate.load(Ordering::Relaxed);
        let (digests, states, mismatched, verify) = r?;
        hooks.phase(Phase::DoneReceived);
        stats.verify_ms = verify.map(|v| v.as_secs_f64() * 1e3);
        stats.mismatched_pages = Some(mismatched);
        // The pages' digests as loaded, for an audit after the resume only
        // (this is the downtime: the strict check is already done).
        let loaded = if header.audit { (0..shape.0).map(|p| loader.loaded(p)).collect() } else { Vec::new() };
        Ok((digests, states, loaded))
    }

    /// `Prepared`: the source's `Commit`, within the progress timeout.
    fn await_commit(&mut self, id: u64) -> Result<(), IncomingError> {
        let deadline = Instant::now() + self.progress;
        let mut frames = FrameReader::default();
        let error = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break IncomingError::NoCommit(StreamError::Late {
                    peer: "source",
                    expected: "commit",
                    waited: self.progress,
                });
            }
            self.conn.set_read_timeout(Some(left)).map_err(StreamError::Io)?;
            match frames.read(&mut self.reader, 0) {
                Ok(Frame::Heartbeat { .. }) => continue,
                Ok(Frame::Commit { id: got }) if got == id => {
                    let (state, action) = self.cell.on(DestEvent::Commit);
                    if state == DestState::Running {
                        debug_assert_eq!(action, DestAction::Start);
                        return Ok(());
                    }
                    // Only a query aborts a prepared migration.
                    break IncomingError::Refused(Refusal::QueriedBeforeCommit);
                }
                Ok(other) => {
                    break IncomingError::NoCommit(StreamError::Unexpected {
                        expected: "commit",
                        got: other.name(),
                    });
                }
                Err(e) => break IncomingError::NoCommit(link::peer_error(e, "source", self.progress)),
            }
        };
        // A query that came first is the cause, whatever the stream did.
        if self.cell.lock().queried {
            return Err(IncomingError::Refused(Refusal::QueriedBeforeCommit));
        }
        Err(error)
    }

    /// After the guest started: until the source says it knows (a
    /// `Settled` on this connection or on a query's) or its window passed.
    fn await_settled(&mut self, window: Duration) {
        let end = self.cell.lock().decided.unwrap_or_else(Instant::now) + window;
        let mut frames = FrameReader::default();
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() || self.cell.lock().settled {
                return;
            }
            let _ = self.conn.set_read_timeout(Some(left));
            match frames.read(&mut self.reader, 0) {
                Ok(Frame::Settled { .. }) => return self.cell.settle(),
                Ok(_) => continue,
                // The source closed without saying (it may ask) or went quiet.
                Err(_) => return self.cell.linger(window),
            }
        }
    }

    /// Tells the source why (if it can still be told), then reads what it
    /// still sends until it closes or the progress timeout passes: closing
    /// with unread bytes would reset the connection and destroy the refusal
    /// in flight. A source that heard it says `Settled` before it closes.
    fn refuse(&mut self, sender: Option<&Sender>, why: Refusal) {
        let f = Frame::Refuse { why };
        let sent = match sender {
            Some(s) => s.send_now(&f).map(|_| ()),
            None => crate::stream::write_frame(&mut &*self.conn, &f),
        };
        if sent.is_err() {
            return;
        }
        let _ = self.conn.shutdown(Shutdown::Write);
        let end = Instant::now() + self.progress;
        let mut frames = FrameReader::default();
        let mut sink = [0u8; 64 << 10];
        let mut aligned = true;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() || self.conn.set_read_timeout(Some(left)).is_err() {
                return;
            }
            if aligned {
                match frames.read(&mut self.reader, 0) {
                    Ok(Frame::Settled { .. }) => self.cell.settle(),
                    Ok(_) => {}
                    Err(StreamError::Closed | StreamError::Io(_)) => return,
                    // Mid-frame after a bad one: bytes, not frames, from here.
                    Err(_) => aligned = false,
                }
            } else if matches!(std::io::Read::read(&mut self.reader, &mut sink), Ok(0) | Err(_)) {
                return;
            }
        }
    }
}

/// The migration's own connection at the destination (stream 0): the
/// rounds' marks and pages, the digests, the states, `Done`.
struct MainStream<'s, 'a, 'm> {
    reader: &'s mut Counting<BufReader<&'a TcpStream>>,
    /// For the `Pong` that answers the source's `Ping`.
    sender: &'s Sender,
    progress: Duration,
    header: &'s Header,
    /// The VM's pages and vCPUs.
    shape: (u64, usize),
    loader: &'s PageLoader<'m>,
    barrier: &'s RoundBarrier,
}

impl MainStream<'_, '_, '_> {
    /// Its frames up to `Done`; the other streams' `threads` are joined
    /// before the first digest. Returns the digests, the states, the
    /// mismatched pages and the time comparing.
    #[allow(clippy::type_complexity)]
    fn load<V: ?Sized>(
        self,
        threads: &mut Vec<std::thread::ScopedJoinHandle<'_, Result<(), StreamEnd>>>,
        stats: &mut IncomingStats,
        hooks: &mut dyn DestHooks<V>,
    ) -> Result<(Vec<Option<u64>>, Vec<Option<Vec<u8>>>, u64, Option<Duration>), IncomingError> {
        let (pages, vcpus) = self.shape;
        let (loader, barrier, header) = (self.loader, self.barrier, self.header);
        let mut digests: Vec<Option<u64>> = vec![None; pages as usize];
        let mut frames = FrameReader::borrowing();
        let mut mismatched = 0u64;
        let mut verify: Option<Duration> = None;
        let mut states: Vec<Option<Vec<u8>>> = vec![None; vcpus];
        loop {
            let f = frames
                .read(&mut *self.reader, header.page_size)
                .map_err(|e| link::peer_error(e, "source", self.progress))?;
            if matches!(f, Frame::Digest { .. } | Frame::VcpuState { .. } | Frame::Done) {
                // Every stream's pages are in before anything is compared.
                for t in threads.drain(..) {
                    t.join()
                        .map_err(|_| StreamError::Io(std::io::Error::other("a page stream panicked")))?
                        .map_err(|e| stream_end(e, pages, self.progress))?;
                }
            }
            match f {
                Frame::Heartbeat { .. } => {}
                Frame::Ping { seq } => {
                    self.sender.send_now(&Frame::Pong { seq })?;
                }
                Frame::Round { round } => {
                    stats.rounds = round + 1;
                    hooks.phase(Phase::RoundBegun(round));
                    if !barrier.wait(round, self.progress) {
                        let failed = threads.iter().position(|t| t.is_finished());
                        return Err(match failed {
                            Some(i) => match threads.remove(i).join() {
                                Ok(Err(e)) => stream_end(e, pages, self.progress),
                                _ => stream_end(StreamEnd::Barrier(round), pages, self.progress),
                            },
                            None => stream_end(StreamEnd::Barrier(round), pages, self.progress),
                        });
                    }
                }
                Frame::Pages { slot, ranges, .. } => {
                    check_ranges(slot, &ranges, pages)?;
                    if verify.is_some() {
                        return Err(IncomingError::Refused(Refusal::PagesAfterDigests));
                    }
                    // Straight from the reader's buffer (a borrowing reader).
                    loader.load(&ranges, frames.pages_data(), frames.page_crcs());
                }
                Frame::Digest { slot, first, digests: d } => {
                    check_digests(slot, first, &d, pages)?;
                    let t = Instant::now();
                    for (i, v) in d.into_iter().enumerate() {
                        let p = first + i as u64;
                        mismatched += u64::from(loader.loaded(p) != Some(v));
                        digests[p as usize] = Some(v);
                    }
                    *verify.get_or_insert(Duration::ZERO) += t.elapsed();
                }
                Frame::VcpuState { vcpu, state } => {
                    let slot = states.get_mut(vcpu as usize).ok_or({
                        IncomingError::Refused(Refusal::VcpuOutside { vcpu, vcpus: vcpus as u32 })
                    })?;
                    *slot = Some(state);
                }
                Frame::Done => break,
                other => {
                    return Err(
                        StreamError::Unexpected { expected: "pages or done", got: other.name() }.into()
                    );
                }
            }
        }
        Ok((digests, states, mismatched, verify))
    }
}

/// What an extra page stream's end says, as the destination's error
/// (`progress`: how long a stream may lag the others at a round's mark).
fn stream_end(e: StreamEnd, slot_pages: u64, progress: Duration) -> IncomingError {
    match e {
        StreamEnd::Stream(e) => IncomingError::Stream(e),
        StreamEnd::Outside { first, pages } => {
            IncomingError::Refused(Refusal::PagesOutside { slot: 0, first, pages, slot_pages })
        }
        StreamEnd::Unexpected(got) => StreamError::Unexpected { expected: "pages or done", got }.into(),
        StreamEnd::Barrier(round) => IncomingError::Refused(Refusal::Stream {
            cause: format!(
                "no progress from the source for {} s: the page streams did not all reach round {round}",
                crate::stream::secs(progress)
            ),
        }),
    }
}

/// Refuses digests outside slot 0's `pages` pages.
fn check_digests(slot: u32, first: u64, digests: &[u64], pages: u64) -> Result<(), IncomingError> {
    let end = first.checked_add(digests.len() as u64).filter(|&e| slot == 0 && e <= pages);
    if end.is_none() {
        let (count, slot_pages) = (digests.len() as u32, pages);
        return Err(IncomingError::Refused(Refusal::DigestsOutside { slot, first, count, slot_pages }));
    }
    Ok(())
}

/// Refuses ranges outside slot 0's `pages` pages.
fn check_ranges(slot: u32, ranges: &[PageRange], pages: u64) -> Result<(), IncomingError> {
    for x in ranges {
        let end = x.first.checked_add(u64::from(x.pages));
        if slot != 0 || end.is_none_or(|e| e > pages) {
            let (first, pages, slot_pages) = (x.first, x.pages, pages);
            return Err(IncomingError::Refused(Refusal::PagesOutside { slot, first, pages, slot_pages }));
        }
    }
    Ok(())
}

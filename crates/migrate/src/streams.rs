//! Several TCP streams for the pages (QEMU's multifd, Cloud Hypervisor's
//! `--connections`): the migration's own connection (stream 0), which
//! also carries the handover, and `streams - 1` more, each opened with an
//! `Attach`. The source stripes the windows of each round over the streams
//! (window `w` of a pass to stream `w % streams`); each extra stream has a
//! thread of its own at both ends, which finds the zero pages and computes
//! the page CRCs at the source, checks them and loads the pages at the
//! destination.
//!
//! Order. A page goes at most once in a round (it leaves the send queue
//! when it goes and comes back only at a sync), but a page sent in round
//! `r` on one stream and again in round `r + 1` on another must be loaded
//! in that order. So at each sync the source ends the round on every
//! stream (a `Round` mark after its last window there, the source waiting
//! until every stream has sent it), and the destination's stream threads
//! meet at a barrier on each mark ([`RoundBarrier`]): no stream loads a
//! page of round `r + 1` before every stream has loaded all of round `r`.
//! At the end each extra stream says `Done`, and the destination compares
//! the final digests only once every stream has ended.
//!
//! ```text
//!   source                               destination
//!   stream 0: Round 3 | w0 w2 | Round 4 ...   loads w0 w2 ─┐ barrier(4)
//!   stream 1: Round 3 | w1 w3 | Round 4 ...   loads w1 w3 ─┘ then round 4
//! ```

use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use shadow_mmu_core::spte::{PAGE_SIZE, WORDS_PER_PAGE};

use crate::link::{self, Counting, Heartbeat, Sender};
use crate::ranges::{PageRange, digest_of, dirty_ranges, zero_page_digest};
use crate::stream::{Frame, FrameReader, PAGE_BYTES, StreamError};

/// What a stream's sender thread is given, in order.
enum Job {
    /// A window of a send bitmap from page `first` (already CLEARed where
    /// it had to be), at most `max_pages` pages a frame.
    Window { first: u64, bits: Vec<u64>, max_pages: u32 },
    /// End the round: the `Round` mark of the next one, sent and flushed,
    /// then say so on `done`.
    Round { round: u32, done: mpsc::Sender<Result<(), StreamError>> },
}

/// Pages a stream's sender sent, data and zero.
#[derive(Debug, Default)]
pub(crate) struct SentPages {
    pub(crate) normal: AtomicU64,
    pub(crate) duplicate: AtomicU64,
}

/// The source's extra streams: a sender thread each (module docs).
pub(crate) struct PageStreams {
    streams: Vec<SourceStream>,
}

struct SourceStream {
    conn: TcpStream,
    jobs: Option<SyncSender<Job>>,
    sender: Arc<Sender>,
    thread: Option<JoinHandle<Result<(), StreamError>>>,
    _heartbeat: Heartbeat,
}

/// Guest memory that the sender threads read while the driver holds the
/// VM (mutably: for its harvests). Made only by [`SharedMemory::of`].
#[derive(Clone, Copy)]
pub(crate) struct SharedMemory(&'static [AtomicU64]);

impl SharedMemory {
    /// `memory`, for threads that end before it is unmapped.
    ///
    /// # Safety
    /// Every copy of the result is gone (its threads joined) before the VM
    /// that `memory` belongs to is dropped: the VM keeps its guest memory
    /// mapped at the same place for its life ([`shadow_mmu_vmm::GuestMemory::memory`]).
    pub(crate) unsafe fn of(memory: &[AtomicU64]) -> Self {
        // SAFETY: the caller keeps the mapping alive for as long as the
        // result is used; it is only read through atomics, which the VM's
        // own accesses (its vCPUs, `&mut` methods that do not remap it)
        // may race without undefined behaviour.
        Self(unsafe { &*std::ptr::from_ref(memory) })
    }

    /// The words.
    pub(crate) fn words(self) -> &'static [AtomicU64] {
        self.0
    }
}

impl PageStreams {
    /// Starts a sender thread on each of `conns` (their `Attach` already
    /// sent), reading pages from `memory`, counting what they send into
    /// `sent`.
    pub(crate) fn start(
        conns: Vec<TcpStream>,
        memory: SharedMemory,
        progress: Duration,
        sent: Arc<SentPages>,
    ) -> std::io::Result<Self> {
        let mut streams = Vec::new();
        for (i, conn) in conns.into_iter().enumerate() {
            let sender = Arc::new(Sender::new(&conn, "destination", progress, Arc::new(AtomicU64::new(0)))?);
            // Two windows queued at most: the driver CLEARs a window only
            // shortly before it is read.
            let (tx, rx) = mpsc::sync_channel(2);
            let (s, sent) = (sender.clone(), sent.clone());
            let thread = std::thread::Builder::new()
                .name(format!("migrate-stream-{}", i + 1))
                .spawn(move || send_jobs(&rx, &s, memory, &sent))?;
            let heartbeat = Heartbeat::start(sender.clone());
            streams.push(SourceStream {
                conn,
                jobs: Some(tx),
                sender,
                thread: Some(thread),
                _heartbeat: heartbeat,
            });
        }
        Ok(Self { streams })
    }

    /// Streams, this connection's (0) included.
    pub(crate) fn count(&self) -> usize {
        self.streams.len() + 1
    }

    /// Bytes the extra streams wrote.
    pub(crate) fn bytes(&self) -> u64 {
        self.streams.iter().map(|s| s.sender.bytes()).sum()
    }

    /// Queues a window on extra stream `index` (1 and up).
    pub(crate) fn window(
        &mut self,
        index: usize,
        first: u64,
        bits: Vec<u64>,
        max_pages: u32,
    ) -> Result<(), StreamError> {
        self.queue(index, Job::Window { first, bits, max_pages })
    }

    fn queue(&mut self, index: usize, job: Job) -> Result<(), StreamError> {
        let s = &mut self.streams[index - 1];
        let sent = s.jobs.as_ref().map(|j| j.send(job));
        match sent {
            Some(Ok(())) => Ok(()),
            // The thread ended: its error is the cause.
            _ => Err(self.join(index)),
        }
    }

    /// Ends the round on every extra stream: each sends the `Round` mark
    /// of `round` after its queued windows, and this returns once all
    /// have.
    pub(crate) fn end_round(&mut self, round: u32) -> Result<(), StreamError> {
        let mut waits = Vec::new();
        for i in 1..self.count() {
            let (done, wait) = mpsc::channel();
            self.queue(i, Job::Round { round, done })?;
            waits.push((i, wait));
        }
        for (i, wait) in waits {
            match wait.recv() {
                Ok(r) => r?,
                Err(_) => return Err(self.join(i)),
            }
        }
        Ok(())
    }

    /// Ends every extra stream: its queued windows, then `Done`.
    pub(crate) fn finish(&mut self) -> Result<(), StreamError> {
        for i in 1..self.count() {
            self.streams[i - 1].jobs = None;
            match self.streams[i - 1].thread.take().map(JoinHandle::join) {
                Some(Ok(r)) => r?,
                Some(Err(_)) => {
                    return Err(StreamError::Io(std::io::Error::other("a page stream thread panicked")));
                }
                None => {}
            }
        }
        Ok(())
    }

    /// The error that ended stream `index`'s thread.
    fn join(&mut self, index: usize) -> StreamError {
        let s = &mut self.streams[index - 1];
        s.jobs = None;
        match s.thread.take().map(JoinHandle::join) {
            Some(Ok(Err(e))) => e,
            _ => StreamError::Io(std::io::Error::other(format!("page stream {index} ended"))),
        }
    }
}

impl Drop for PageStreams {
    fn drop(&mut self) {
        for s in &mut self.streams {
            // Closing the queue ends the thread after what it holds; a
            // thread stuck writing gives up at the progress timeout.
            s.jobs = None;
            if s.thread.as_ref().is_some_and(|t| !t.is_finished()) {
                // Not finished: a failure elsewhere ends the migration; a
                // thread stuck writing to a silent peer must not hold it.
                let _ = s.conn.shutdown(std::net::Shutdown::Both);
            }
            if let Some(t) = s.thread.take() {
                let _ = t.join();
            }
        }
    }
}

/// A stream's sender thread: its jobs in order, then `Done`.
fn send_jobs(
    jobs: &Receiver<Job>,
    sender: &Sender,
    memory: SharedMemory,
    sent: &SentPages,
) -> Result<(), StreamError> {
    while let Ok(job) = jobs.recv() {
        match job {
            Job::Window { first, bits, max_pages } => {
                let ranges = dirty_ranges(&bits, first, memory.0, max_pages);
                if ranges.is_empty() {
                    continue;
                }
                sender.send_pages(0, &ranges, memory.0)?;
                for r in &ranges {
                    // Relaxed: counts, read by the driver after the round's
                    // end (whose channel orders them).
                    let c = if r.zero { &sent.duplicate } else { &sent.normal };
                    c.fetch_add(u64::from(r.pages), Ordering::Relaxed);
                }
            }
            Job::Round { round, done } => {
                let r = sender.send_now(&Frame::Round { round });
                let failed = r.is_err();
                let _ = done.send(r.map(|_| ()));
                if failed {
                    return Err(StreamError::Io(std::io::Error::other("the round's mark could not be sent")));
                }
            }
        }
    }
    sender.send_now(&Frame::Done)?;
    Ok(())
}

/// The destination's load of pages from every stream into guest memory,
/// each page's digest as loaded kept for the final check.
pub(crate) struct PageLoader<'m> {
    memory: &'m [AtomicU64],
    /// Per page, the digest of what was loaded ([`NOT_LOADED`]: nothing).
    loaded: Vec<AtomicU64>,
    pub(crate) normal: AtomicU64,
    pub(crate) duplicate: AtomicU64,
}

/// No page loaded: a digest no page has (page `2^32 - 1`'s top half with a
/// CRC of all ones; guests stop short of 16 TiB).
const NOT_LOADED: u64 = u64::MAX;

impl<'m> PageLoader<'m> {
    pub(crate) fn new(memory: &'m [AtomicU64]) -> Self {
        let pages = memory.len() / WORDS_PER_PAGE;
        Self {
            memory,
            loaded: (0..pages).map(|_| AtomicU64::new(NOT_LOADED)).collect(),
            normal: AtomicU64::new(0),
            duplicate: AtomicU64::new(0),
        }
    }

    /// The digest of page `p` as loaded (`None`: never loaded).
    pub(crate) fn loaded(&self, p: u64) -> Option<u64> {
        // Relaxed: read after every stream ended (joined), which orders
        // their stores before.
        Some(self.loaded[p as usize].load(Ordering::Relaxed)).filter(|&d| d != NOT_LOADED)
    }

    /// Stores `ranges` into guest memory: a zero range as zeros, a data
    /// range from `data` (its pages in order, `crcs` their checked CRCs).
    /// Stores straight into the host's mapping, as QEMU's destination
    /// copies into its RAM: nothing logs here before the guest runs.
    ///
    /// A zero page never loaded before is left alone: a destination's
    /// guest memory is fresh anonymous memory, zero until loaded (QEMU
    /// skips a zero page that already reads zero, `ram_handle_zero`). Its
    /// first touch would cost a fault and a 2 MiB clear, and a round of
    /// them, tiny on the wire, would still be clearing when the
    /// stop-and-copy's pages come.
    pub(crate) fn load(&self, ranges: &[PageRange], data: &[u8], crcs: &[u32]) {
        let mut next = 0;
        for x in ranges {
            let words =
                &self.memory[x.first as usize * WORDS_PER_PAGE..][..x.pages as usize * WORDS_PER_PAGE];
            if x.zero {
                for (p, page) in (x.first..).zip(words.chunks_exact(WORDS_PER_PAGE)) {
                    // Relaxed: a page goes once a round, and the rounds are
                    // ordered by the streams' barrier.
                    if self.loaded[p as usize].swap(zero_page_digest(p), Ordering::Relaxed) == NOT_LOADED {
                        continue;
                    }
                    for w in page {
                        // Relaxed: the guest runs only after every stream
                        // thread is joined and the vCPUs are released (a
                        // release, paired with their acquire).
                        w.store(0, Ordering::Relaxed);
                    }
                }
                self.duplicate.fetch_add(u64::from(x.pages), Ordering::Relaxed);
            } else {
                let bytes = &data[next * PAGE_BYTES as usize..][..x.pages as usize * PAGE_SIZE as usize];
                for (w, b) in words.iter().zip(bytes.chunks_exact(8)) {
                    // Relaxed: as above.
                    w.store(u64::from_le_bytes(b.try_into().expect("8 bytes")), Ordering::Relaxed);
                }
                // The page CRCs the reader checked are the digests of what
                // was loaded.
                for (p, &c) in (x.first..).zip(&crcs[next..][..x.pages as usize]) {
                    self.loaded[p as usize].store(digest_of(p, c), Ordering::Relaxed);
                }
                next += x.pages as usize;
                self.normal.fetch_add(u64::from(x.pages), Ordering::Relaxed);
            }
        }
    }
}

/// Where the destination's streams meet at each round's mark (module
/// docs); a stream that fails breaks it, so that none waits for it.
pub(crate) struct RoundBarrier {
    streams: u32,
    state: Mutex<BarrierState>,
    met: Condvar,
}

#[derive(Default)]
struct BarrierState {
    /// The last round every stream reached.
    round: Option<u32>,
    /// Streams at the mark of the round after it.
    arrived: u32,
    broken: bool,
}

impl RoundBarrier {
    pub(crate) fn new(streams: u32) -> Self {
        Self { streams, state: Mutex::new(BarrierState::default()), met: Condvar::new() }
    }

    /// This stream reached round `round`'s mark: waits until every stream
    /// has (within `progress`). `false`: a stream failed, or one is late.
    pub(crate) fn wait(&self, round: u32, progress: Duration) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.arrived += 1;
        if s.arrived == self.streams {
            (s.round, s.arrived) = (Some(round), 0);
            self.met.notify_all();
            return !s.broken;
        }
        let end = Instant::now() + progress;
        while s.round != Some(round) && !s.broken {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                s.broken = true;
                self.met.notify_all();
                return false;
            }
            s = self.met.wait_timeout(s, left).unwrap_or_else(|p| p.into_inner()).0;
        }
        !s.broken
    }

    /// A stream failed: nobody waits for it.
    pub(crate) fn r#break(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).broken = true;
        self.met.notify_all();
    }
}

/// Why an extra stream ended before its `Done`.
#[derive(Debug)]
pub(crate) enum StreamEnd {
    Stream(StreamError),
    /// Pages outside the guest's memory.
    Outside {
        first: u64,
        pages: u32,
    },
    /// A frame an extra stream does not carry.
    Unexpected(&'static str),
    /// The streams did not meet at a round's mark.
    Barrier(u32),
}

impl StreamEnd {
    /// An end another stream's failure caused: the barrier broken, or the
    /// connection shut down under it.
    pub(crate) fn induced(&self) -> bool {
        matches!(self, StreamEnd::Barrier(_) | StreamEnd::Stream(StreamError::Closed | StreamError::Io(_)))
    }
}

/// An extra stream's receiver thread at the destination: `Round` marks,
/// `Pages`, heartbeats, until `Done`. Its failure wakes the others: the
/// barrier breaks and the migration's own connection, `main`, stops
/// reading, so that this failure is the migration's cause.
pub(crate) fn receive_stream(
    conn: &TcpStream,
    main: &TcpStream,
    loader: &PageLoader<'_>,
    barrier: &RoundBarrier,
    received: &Arc<AtomicU64>,
    progress: Duration,
) -> Result<(), StreamEnd> {
    let r = receive_frames(conn, loader, barrier, received, progress);
    if r.is_err() {
        barrier.r#break();
        let _ = main.shutdown(std::net::Shutdown::Read);
    }
    r
}

fn receive_frames(
    conn: &TcpStream,
    loader: &PageLoader<'_>,
    barrier: &RoundBarrier,
    received: &Arc<AtomicU64>,
    progress: Duration,
) -> Result<(), StreamEnd> {
    let io = |e: std::io::Error| StreamEnd::Stream(StreamError::Io(e));
    link::configure(conn, progress).map_err(io)?;
    conn.set_read_timeout(Some(progress)).map_err(io)?;
    let mut reader = Counting::new(std::io::BufReader::with_capacity(64 << 10, conn), received.clone());
    let mut frames = FrameReader::borrowing();
    let pages = (loader.memory.len() / WORDS_PER_PAGE) as u64;
    loop {
        let f = frames
            .read(&mut reader, PAGE_BYTES)
            .map_err(|e| StreamEnd::Stream(link::peer_error(e, "source", progress)))?;
        match f {
            Frame::Heartbeat { .. } => {}
            Frame::Round { round } => {
                if !barrier.wait(round, progress) {
                    return Err(StreamEnd::Barrier(round));
                }
            }
            Frame::Pages { slot, ranges, .. } => {
                if let Some(x) = ranges
                    .iter()
                    .find(|x| slot != 0 || x.first.checked_add(u64::from(x.pages)).is_none_or(|e| e > pages))
                {
                    return Err(StreamEnd::Outside { first: x.first, pages: x.pages });
                }
                loader.load(&ranges, frames.pages_data(), frames.page_crcs());
            }
            Frame::Done => return Ok(()),
            other => return Err(StreamEnd::Unexpected(other.name())),
        }
    }
}

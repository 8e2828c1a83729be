//! One migration connection as both ends hold it: a socket that gives up on
//! a dead peer, a sending half shared with a heartbeat, and (at the source)
//! a reading half on a thread of its own.
//!
//! A silent peer must end a migration within the progress timeout `P`,
//! whatever the migration is doing:
//! - every write has a deadline (`SO_SNDTIMEO` = `P`), and the kernel gives
//!   up on data the peer does not acknowledge after `P`
//!   (`TCP_USER_TIMEOUT`), as on an idle connection whose keepalive probes
//!   go unanswered (`SO_KEEPALIVE`, first probe after `P / 2`): Cloud
//!   Hypervisor's settings for dead peers;
//! - each side sends a [`Frame::Heartbeat`] whenever it has sent nothing for
//!   `P / 4`, carrying the bytes it has read so far, so that a peer that
//!   hears nothing for `P` knows the other is stopped or cut off, and a
//!   source whose bytes are not being read (a peer alive but not reading,
//!   or a one-way partition) sees its destination's count stand still;
//! - a blocking read has a deadline: the destination's reads time out
//!   after `P` (`SO_RCVTIMEO`), the source's reader thread is waited on
//!   with one.

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::ranges::PageRange;
use crate::refusal::Refusal;
use crate::stream::{Frame, FrameReader, FrameWriter, StreamError, Unread};

/// Sets `conn` up for a migration whose progress timeout is `progress`:
/// no Nagle (the handshakes are small frames), keepalive,
/// `TCP_USER_TIMEOUT` and a write deadline (module docs).
pub fn configure(conn: &TcpStream, progress: Duration) -> io::Result<()> {
    conn.set_nodelay(true)?;
    let s = socket2::SockRef::from(conn);
    // Keepalive counts in whole seconds.
    let idle = (progress / 2).max(Duration::from_secs(1));
    let interval = (progress / 8).max(Duration::from_secs(1));
    s.set_tcp_keepalive(
        &socket2::TcpKeepalive::new().with_time(idle).with_interval(interval).with_retries(4),
    )?;
    s.set_tcp_user_timeout(Some(progress))?;
    conn.set_write_timeout(Some(progress))
}

/// Names `peer` in an I/O error that is about it: a deadline (a read or
/// write timed out, or the kernel gave up on the peer) is
/// [`StreamError::Stalled`], a connection the peer closed or reset is
/// [`StreamError::Gone`].
pub fn peer_error(e: StreamError, peer: &'static str, waited: Duration) -> StreamError {
    use io::ErrorKind as K;
    match e {
        StreamError::Io(io) if matches!(io.kind(), K::WouldBlock | K::TimedOut) => {
            StreamError::Stalled { peer, waited, unread: None }
        }
        StreamError::Io(io)
            if matches!(io.kind(), K::BrokenPipe | K::ConnectionReset | K::ConnectionAborted) =>
        {
            StreamError::Gone { peer, io }
        }
        e => e,
    }
}

/// What the sending half holds.
struct Outgoing {
    w: BufWriter<TcpStream>,
    frames: FrameWriter,
    /// Bytes written (frames, heartbeats included).
    bytes: u64,
    /// When the last bytes went to the socket.
    last: Instant,
    /// The first write that failed, as the socket said it: the socket
    /// reports a cause once (a heartbeat may be the one to hear it) and a
    /// broken pipe after.
    failed: Option<(io::ErrorKind, String)>,
}

/// The sending half, shared by the driver and its [`Heartbeat`].
pub struct Sender {
    out: Mutex<Outgoing>,
    /// Bytes this side has read off the connection (its heartbeat says so).
    received: Arc<AtomicU64>,
    peer: &'static str,
    progress: Duration,
}

impl Sender {
    /// The sending half of `conn`, whose peer is `peer` ("source",
    /// "destination"); `received` counts what this side reads.
    pub fn new(
        conn: &TcpStream,
        peer: &'static str,
        progress: Duration,
        received: Arc<AtomicU64>,
    ) -> io::Result<Self> {
        let out = Outgoing {
            w: BufWriter::with_capacity(1 << 16, conn.try_clone()?),
            frames: FrameWriter::default(),
            bytes: 0,
            last: Instant::now(),
            failed: None,
        };
        Ok(Self { out: Mutex::new(out), received, peer, progress })
    }

    fn lock(&self) -> MutexGuard<'_, Outgoing> {
        // A heartbeat that panicked left nothing half-written that matters
        // more than the migration's own error: go on.
        self.out.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn done(&self, o: &mut Outgoing, r: Result<u64, StreamError>) -> Result<u64, StreamError> {
        let e = match r {
            Ok(n) => {
                o.bytes += n;
                o.last = Instant::now();
                return Ok(n);
            }
            Err(StreamError::Io(io)) => {
                let (kind, why) = o.failed.get_or_insert_with(|| (io.kind(), io.to_string()));
                // The first failure is the cause.
                StreamError::Io(io::Error::new(*kind, why.clone()))
            }
            Err(e) => e,
        };
        Err(peer_error(e, self.peer, self.progress))
    }

    /// Writes `f` (buffered: [`Sender::flush`] or a large frame sends it).
    pub fn send(&self, f: &Frame) -> Result<u64, StreamError> {
        let mut o = self.lock();
        let o = &mut *o;
        let r = o.frames.write(&mut o.w, f);
        self.done(o, r)
    }

    /// Writes `f` and flushes.
    pub fn send_now(&self, f: &Frame) -> Result<u64, StreamError> {
        let n = self.send(f)?;
        self.flush()?;
        Ok(n)
    }

    /// Writes a `Pages` frame of `ranges` straight from `memory`
    /// ([`FrameWriter::write_pages`]).
    pub fn send_pages(
        &self,
        slot: u32,
        ranges: &[PageRange],
        memory: &[std::sync::atomic::AtomicU64],
    ) -> Result<u64, StreamError> {
        let mut o = self.lock();
        let o = &mut *o;
        let r = o.frames.write_pages(&mut o.w, slot, ranges, memory);
        self.done(o, r)
    }

    /// Sends what is buffered.
    pub fn flush(&self) -> Result<(), StreamError> {
        let mut o = self.lock();
        let r = o.w.flush().map(|_| 0).map_err(StreamError::Io);
        self.done(&mut o, r).map(|_| ())
    }

    /// Bytes written so far.
    pub fn bytes(&self) -> u64 {
        self.lock().bytes
    }

    /// A heartbeat, if nothing was sent for `every`.
    fn beat(&self, every: Duration) -> Result<(), StreamError> {
        let mut o = self.lock();
        if o.last.elapsed() < every {
            return Ok(());
        }
        // Relaxed: a count for the peer's progress check, no data published
        // through it.
        let f = Frame::Heartbeat { received: self.received.load(Ordering::Relaxed) };
        let o = &mut *o;
        let r = o.frames.write(&mut o.w, &f).and_then(|n| o.w.flush().map(|_| n).map_err(StreamError::Io));
        self.done(o, r).map(|_| ())
    }
}

/// A thread that sends a heartbeat on its [`Sender`] whenever nothing else
/// was sent for `P / 4`; it stops when dropped, or at the first failed
/// write (the driver's own writes then report the failure).
pub struct Heartbeat {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Heartbeat {
    /// Starts beating on `sender` whenever it sent nothing for a quarter of
    /// the progress timeout.
    pub fn start(sender: Arc<Sender>) -> Self {
        let every = sender.progress / 4;
        Self::every(sender, every)
    }

    /// Starts beating on `sender` whenever it sent nothing for `every` (at
    /// most a quarter of the progress timeout).
    pub fn every(sender: Arc<Sender>, every: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let every = every.min(sender.progress / 4);
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("migrate-heartbeat".into())
            .spawn(move || {
                // Relaxed: the flag carries no data; `Drop` unparks us.
                while !s.load(Ordering::Relaxed) {
                    if sender.beat(every).is_err() {
                        return;
                    }
                    std::thread::park_timeout(every / 2);
                }
            })
            .expect("spawning the heartbeat thread");
        Self { stop, thread: Some(thread) }
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

/// Counts the bytes read into a shared counter (for this side's
/// heartbeat, and the destination's statistics).
pub struct Counting<R> {
    r: R,
    n: Arc<AtomicU64>,
}

impl<R> Counting<R> {
    /// Counts what `r` reads into `n`.
    pub fn new(r: R, n: Arc<AtomicU64>) -> Self {
        Self { r, n }
    }
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        let n = self.r.read(b)?;
        // Relaxed: a count (see `Sender::beat`).
        self.n.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// What the source's reader thread has heard.
#[derive(Debug)]
struct Heard {
    /// When the last frame came, and when the peer's count last moved.
    times: Mutex<(Instant, Instant)>,
    /// The destination's count of bytes read, from its last heartbeat.
    peer_received: AtomicU64,
}

/// The source's reading half: a thread that reads the destination's
/// frames, keeps its heartbeats, and passes the rest on.
pub struct Inbox {
    rx: Receiver<Result<Frame, StreamError>>,
    heard: Arc<Heard>,
    conn: TcpStream,
    thread: Option<JoinHandle<()>>,
    progress: Duration,
}

impl Inbox {
    /// Starts reading `conn`, counting what it reads into `received`.
    pub fn start(conn: &TcpStream, progress: Duration, received: Arc<AtomicU64>) -> io::Result<Self> {
        let now = Instant::now();
        let heard = Arc::new(Heard { times: Mutex::new((now, now)), peer_received: AtomicU64::new(0) });
        let (tx, rx) = mpsc::channel();
        let mut r = Counting::new(BufReader::new(conn.try_clone()?), received);
        let h = heard.clone();
        let thread = std::thread::Builder::new().name("migrate-inbox".into()).spawn(move || {
            let mut frames = FrameReader::default();
            loop {
                let f = frames
                    .read(&mut r, crate::stream::PAGE_BYTES)
                    .map_err(|e| peer_error(e, "destination", progress));
                let now = Instant::now();
                let mut times = h.times.lock().unwrap_or_else(|p| p.into_inner());
                times.0 = now;
                match f {
                    Ok(Frame::Heartbeat { received }) => {
                        // Relaxed: read under the same lock by `check`.
                        if h.peer_received.swap(received, Ordering::Relaxed) != received {
                            times.1 = now;
                        }
                    }
                    Ok(f) => {
                        drop(times);
                        if tx.send(Ok(f)).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                }
            }
        })?;
        Ok(Self { rx, heard, conn: conn.try_clone()?, thread: Some(thread), progress })
    }

    /// Whether the destination is still to be heard from: an error if it
    /// sent nothing for the progress timeout, or if `sent` bytes are out
    /// and its count of what it read has stood still that long.
    pub fn check(&self, sent: u64) -> Result<(), StreamError> {
        let times = *self.heard.times.lock().unwrap_or_else(|p| p.into_inner());
        let stalled = |unread| StreamError::Stalled { peer: "destination", waited: self.progress, unread };
        if times.0.elapsed() > self.progress {
            return Err(stalled(None));
        }
        // Relaxed: see the reader thread.
        let got = self.heard.peer_received.load(Ordering::Relaxed);
        if got < sent && times.1.elapsed() > self.progress {
            return Err(stalled(Some(Unread { read: got, sent })));
        }
        Ok(())
    }

    /// The destination's count of the bytes it read, from its last
    /// heartbeat, and when that count last moved.
    pub fn peer_received(&self) -> (u64, Instant) {
        let times = *self.heard.times.lock().unwrap_or_else(|p| p.into_inner());
        // Relaxed: written under the same lock by the reader thread.
        (self.heard.peer_received.load(Ordering::Relaxed), times.1)
    }

    /// A frame the destination sent, if one came.
    pub fn poll(&self, sent: u64) -> Result<Option<Frame>, StreamError> {
        match self.rx.try_recv() {
            Ok(r) => r.map(Some),
            Err(TryRecvError::Empty) => self.check(sent).map(|_| None),
            Err(TryRecvError::Disconnected) => Err(StreamError::Closed),
        }
    }

    /// After one of our writes failed, what the reading half knows of the
    /// cause, within a quarter of the progress timeout: the destination's
    /// refusal (`Ok`), or how its stream ended (`Err`: the socket reports
    /// a cause, such as the kernel giving up on the peer, to one reader
    /// only, and the writer then sees a broken pipe).
    pub fn cause(&self) -> Option<Result<Refusal, StreamError>> {
        loop {
            match self.rx.recv_timeout(self.progress / 4) {
                Ok(Ok(Frame::Refuse { why })) => return Some(Ok(why)),
                Ok(Ok(_)) => continue,
                Ok(Err(e)) => return Some(Err(e)),
                Err(_) => return None,
            }
        }
    }

    /// The destination's next frame, waited for until `deadline` (then
    /// [`StreamError::Late`], naming `expected`) while it is heard from.
    pub fn wait(&self, sent: u64, deadline: Instant, expected: &'static str) -> Result<Frame, StreamError> {
        let start = Instant::now();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                // A peer silent for most of the wait is silent, not late (its
                // last word may have come just after the wait began).
                let silent = self.heard.times.lock().unwrap_or_else(|p| p.into_inner()).0.elapsed();
                if silent > self.progress / 2 {
                    return Err(StreamError::Stalled {
                        peer: "destination",
                        waited: self.progress,
                        unread: None,
                    });
                }
                return Err(StreamError::Late { peer: "destination", expected, waited: start.elapsed() });
            }
            match self.rx.recv_timeout(left.min(self.progress / 4)) {
                Ok(r) => return r,
                Err(RecvTimeoutError::Timeout) => self.check(sent)?,
                Err(RecvTimeoutError::Disconnected) => return Err(StreamError::Closed),
            }
        }
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        // Wakes the reader thread out of its read.
        let _ = self.conn.shutdown(Shutdown::Read);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

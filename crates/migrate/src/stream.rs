//! The migration stream: a header, then rounds of page ranges and their
//! contents, then the vCPUs' state, then a completion handshake, every
//! piece a checksummed frame.
//!
//! # Wire format
//!
//! Every frame is `len: u32 LE`, `crc: u32 LE`, then `len` bytes of
//! payload; `crc` is the CRC-32C (Castagnoli) of the payload, and the
//! payload is a kind byte and the kind's body (all integers little-endian,
//! strings and lists length-prefixed). A `Pages` body is the slot, the
//! ranges, the count of data pages and one CRC-32C per data page, then the
//! pages' bytes: its frame CRC covers all but those bytes, which their page
//! CRCs cover, so each byte is checksummed once on each side (and the
//! destination's check of a page is also its digest of what it loaded).
//! The first frame is a [`Header`],
//! with [`MAGIC`] and [`VERSION`]; the destination answers it with `Ready`
//! (or `Refuse`), then the rounds follow, then `Done`, and the handover
//! ([`crate::handover`]): `Verified`, `Commit`, `Running`, `Settled`.
//! Either side sends a `Heartbeat` when it has sent nothing for a while, so
//! that the other can tell a silent peer from a busy one. A settle query is
//! a connection of its own: `Query`, answered by `Status`.
//!
//! # Invariants
//!
//! - Nothing is allocated for a frame before its length is checked against
//!   [`MAX_FRAME_BYTES`], and nothing inside a frame before the count it is
//!   sized by is checked against the bytes left: a hostile peer costs at
//!   most one frame's maximum.
//! - A frame decodes whole or not at all: a short read, a bad checksum (of
//!   the frame or of a page), an
//!   unknown kind, a count that overruns, bytes left over, or contents that
//!   disagree (a page range whose data is missing) is a [`StreamError`],
//!   and the reader has consumed at most that frame.
//! - Zero pages travel as a flag on their range, not as data (QEMU's
//!   "duplicate" pages): a range is all-zero pages or all data.

use std::io::{self, Read, Write};

use shadow_mmu_core::spte::PAGE_SIZE;
use thiserror::Error;

use crate::handover::Answer;
use crate::ranges::PageRange;
use crate::refusal::Refusal;

/// The stream's first eight bytes of the header body.
pub const MAGIC: [u8; 8] = *b"SHMMUMIG";
/// The stream format's version; a peer of another version is refused.
pub const VERSION: u32 = 6;
/// The largest frame payload either side accepts: 16 MiB, twice a
/// full frame (`FRAME_PAGES` data pages with their table).
pub const MAX_FRAME_BYTES: u32 = 16 << 20;
/// The page size the stream carries (the header's `page_size`): the
/// core's [`PAGE_SIZE`] as the wire's u32.
pub const PAGE_BYTES: u32 = PAGE_SIZE as u32;
/// Longest string in a header (backend name, configuration).
pub const MAX_STRING_BYTES: u32 = 64 << 10;

/// One memslot of the VM, as the header describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotLayout {
    /// Slot id.
    pub id: u32,
    /// Guest physical address of its first page.
    pub guest_phys_addr: u64,
    /// Pages.
    pub pages: u64,
}

/// The stream's first frame: who is migrating what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Stream format version ([`VERSION`] when we write it).
    pub version: u32,
    /// Bytes per page.
    pub page_size: u32,
    /// The source's backend (`engine`, `kvm`).
    pub backend: String,
    /// The VM's configuration, as text the destination builds its VM from.
    pub config: String,
    /// The memslots.
    pub slots: Vec<SlotLayout>,
    /// This migration's id, chosen by the source (the handover's frames
    /// and the settle queries carry it).
    pub id: u64,
    /// The source's progress timeout, ms: how long either side waits for a
    /// word from the other (both use the source's).
    pub progress_timeout_ms: u32,
    /// The source's settle window, ms: how long it asks the destination
    /// for the handover's outcome, which the destination keeps answering
    /// that long after deciding.
    pub settle_ms: u32,
    /// TCP streams the pages go over (QEMU's multifd channels): this
    /// connection and `streams - 1` more, each opened with an
    /// [`Frame::Attach`] (1 to [`MAX_STREAMS`]).
    pub streams: u32,
    /// `--verify audit`: the digests come after the guest runs at the
    /// destination, which answers them with an [`Frame::Audit`]; without
    /// it they come before `Done`, and a mismatch stops the handover.
    pub audit: bool,
}

/// Pages an [`Frame::Audit`] names at most.
pub const AUDIT_PAGES: usize = 16;

/// Streams a migration may use at most.
pub const MAX_STREAMS: u32 = 64;

impl Header {
    /// The header of a migration of `slots` (4 KiB pages) from `backend`
    /// configured as `config`; the source's driver fills in the id and
    /// its deadlines.
    pub fn new(backend: String, config: String, slots: Vec<SlotLayout>) -> Self {
        Self {
            version: VERSION,
            page_size: PAGE_BYTES,
            backend,
            config,
            slots,
            id: 0,
            progress_timeout_ms: 0,
            settle_ms: 0,
            streams: 1,
            audit: false,
        }
    }
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// The first frame.
    Header(Header),
    /// A round of the pre-copy begins.
    Round {
        /// Its number (0: the bulk copy).
        round: u32,
    },
    /// Pages of `slot`: the ranges, then the data of the non-zero ones, in
    /// order (`page_size` bytes a page).
    Pages {
        /// The slot.
        slot: u32,
        /// The ranges (Cloud Hypervisor's `MemoryRangeTable`).
        ranges: Vec<PageRange>,
        /// Their contents.
        data: Vec<u8>,
    },
    /// A digest of each page of `slot` from `first` on, of the source's
    /// final memory, for the destination's page-by-page check.
    Digest {
        /// The slot.
        slot: u32,
        /// First page.
        first: u64,
        /// One digest per page.
        digests: Vec<u64>,
    },
    /// A vCPU's final state (and its workload's), opaque to the stream.
    VcpuState {
        /// The vCPU.
        vcpu: u32,
        /// Its state, as its backend writes it.
        state: Vec<u8>,
    },
    /// The source has sent everything.
    Done,
    /// The destination's answer to [`Frame::Done`]: every page matched its
    /// digest and every vCPU took its state; the guest starts on `Commit`.
    Verified,
    /// The destination's answer to the [`Frame::Header`]: its VM is built
    /// (memory allocated and populated), send the pages.
    Ready,
    /// The destination refuses the migration (the header, a frame, its
    /// checks) or aborted it (it will never run this guest), and closes:
    /// why, for the source's error.
    Refuse {
        /// Why.
        why: Refusal,
    },
    /// The source's point of no return: start the guest.
    Commit {
        /// The migration's id.
        id: u64,
    },
    /// The destination runs the guest (the handover's acknowledgement).
    Running {
        /// The migration's id.
        id: u64,
    },
    /// The source asks, on a connection of its own, what became of a
    /// migration whose outcome it did not hear.
    Query {
        /// The migration's id.
        id: u64,
    },
    /// The destination's answer to a [`Frame::Query`].
    Status {
        /// The migration's id.
        id: u64,
        /// What it says.
        answer: Answer,
    },
    /// The source knows the outcome: the destination may stop answering.
    Settled {
        /// The migration's id.
        id: u64,
    },
    /// "Still here": bytes received so far from the other side.
    Heartbeat {
        /// Bytes read off the stream so far.
        received: u64,
    },
    /// The destination's audit of the final digests that came after the
    /// guest started there (`--verify audit`): how many pages differ, and
    /// the first of them.
    Audit {
        /// Pages that differ (or were never loaded).
        mismatched: u64,
        /// The first of them, at most [`AUDIT_PAGES`].
        pages: Vec<u64>,
    },
    /// The source's probe of the round trip, once the destination is
    /// `Ready` and nothing else is on the wire: the destination answers
    /// with a [`Frame::Pong`] at once.
    Ping {
        /// Echoed.
        seq: u64,
    },
    /// The destination's answer to a [`Frame::Ping`].
    Pong {
        /// The ping's.
        seq: u64,
    },
    /// The first frame of one of a migration's extra page streams
    /// ([`Header::streams`]): which migration, which stream. The stream
    /// then carries `Round` marks, `Pages` and, at its end, `Done`.
    Attach {
        /// The migration's id.
        id: u64,
        /// The stream's index, 1 to `streams - 1`.
        stream: u32,
    },
}

/// Why a stream was refused. The reader stopped at the frame named; what
/// came before it was whole.
#[derive(Debug, Error)]
pub enum StreamError {
    /// Reading or writing failed (the peer went away, say).
    #[error("migration stream I/O")]
    Io(#[from] io::Error),
    /// The peer closed the stream between two frames, before the protocol's
    /// end.
    #[error("the peer closed the migration stream before its end")]
    Closed,
    /// The stream ended inside a frame.
    #[error("the migration stream ended inside a frame")]
    Truncated,
    /// A frame longer than [`MAX_FRAME_BYTES`] (or empty).
    #[error("a frame of {len} bytes: frames are 1 to {MAX_FRAME_BYTES} bytes")]
    FrameSize {
        /// The length it claimed.
        len: u64,
    },
    /// A page's data does not match its checksum in the frame.
    #[error("page {page}'s checksum mismatch: the frame says {expected:#010x}, its bytes give {got:#010x}")]
    PageChecksum {
        /// The page.
        page: u64,
        /// Sent.
        expected: u32,
        /// Computed.
        got: u32,
    },
    /// The payload's checksum does not match.
    #[error("frame checksum mismatch: the frame says {expected:#010x}, its bytes give {got:#010x}")]
    Checksum {
        /// Sent.
        expected: u32,
        /// Computed.
        got: u32,
    },
    /// Not a migration stream.
    #[error("not a shadow-mmu migration stream (bad magic)")]
    BadMagic,
    /// A stream of another format version.
    #[error("migration stream version {got}, this build reads version {VERSION}")]
    Version {
        /// The peer's.
        got: u32,
    },
    /// A frame of a kind we do not know.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// A frame whose body does not parse or disagrees with itself.
    #[error("malformed {kind} frame: {why}")]
    Malformed {
        /// The frame's kind.
        kind: &'static str,
        /// What is wrong.
        why: Malformation,
    },
    /// The peer sent nothing for the progress timeout (it is stopped, cut
    /// off or gone); the connection is given up.
    #[error("no progress from the {peer} for {} s{}", secs(*waited), unread.map_or(String::new(), |u| u.to_string()))]
    Stalled {
        /// Who went silent: "source" or "destination".
        peer: &'static str,
        /// How long we waited.
        waited: std::time::Duration,
        /// Bytes sent that the peer has not read, if that is how it stalled.
        unread: Option<Unread>,
    },
    /// The peer closed or reset the connection (it exited, was killed, or
    /// gave up on us).
    #[error("the {peer} went away ({io})")]
    Gone {
        /// Who: "source" or "destination".
        peer: &'static str,
        /// What the socket said.
        io: io::Error,
    },
    /// The peer is heard from but did not send what the protocol waits for
    /// in time.
    #[error("the {peer} sent no {expected} frame within {} s", secs(*waited))]
    Late {
        /// Who: "source" or "destination".
        peer: &'static str,
        /// What was waited for.
        expected: &'static str,
        /// How long.
        waited: std::time::Duration,
    },
    /// A frame other than the one the protocol expects here.
    #[error("expected a {expected} frame, got {got}")]
    Unexpected {
        /// What the protocol wanted.
        expected: &'static str,
        /// What came.
        got: &'static str,
    },
}

/// A peer that stopped reading what we sent ([`StreamError::Stalled`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unread {
    /// Bytes the peer said it read.
    pub read: u64,
    /// Bytes we sent.
    pub sent: u64,
}

impl std::fmt::Display for Unread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, ", which has read {} of the {} bytes sent", self.read, self.sent)
    }
}

/// What is wrong with a [`StreamError::Malformed`] frame's body.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Malformation {
    /// A field runs past the frame's end.
    #[error("{needed} bytes needed, {left} left")]
    Short {
        /// Bytes the field needs.
        needed: usize,
        /// Bytes left in the frame.
        left: usize,
    },
    /// A count of items that cannot fit in what is left.
    #[error("{count} items of {each} bytes in {left} bytes")]
    Overrun {
        /// The count it claimed.
        count: usize,
        /// Bytes per item.
        each: usize,
        /// Bytes left in the frame.
        left: usize,
    },
    /// Bytes after the last field.
    #[error("{0} bytes left over")]
    LeftOver(usize),
    /// A flag byte other than 0 or 1.
    #[error("flag byte {0}")]
    Flag(u8),
    /// A string longer than [`MAX_STRING_BYTES`].
    #[error("a string of {0} bytes")]
    LongString(usize),
    /// A string that is not UTF-8.
    #[error("a string that is not UTF-8")]
    NotUtf8,
    /// Pages before a header gave their size.
    #[error("pages of 0 bytes (pages before the header?)")]
    NoPageSize,
    /// A range of no pages.
    #[error("a range of 0 pages")]
    EmptyRange,
    /// A data page count other than the ranges'.
    #[error("a page count that disagrees with the ranges")]
    PageCount,
    /// Data of another length than its pages'.
    #[error("{bytes} bytes of data for {pages} pages of {page_size} bytes")]
    DataLength {
        /// Bytes of data in the frame.
        bytes: usize,
        /// Data pages its ranges name.
        pages: u64,
        /// Bytes a page.
        page_size: u32,
    },
    /// An answer byte no [`Answer`] has.
    #[error("answer byte {0}")]
    Answer(u8),
    /// A refusal code no [`Refusal`] has.
    #[error("refusal code {0}")]
    RefusalCode(u8),
}

/// Seconds for a message: `10`, `1.5`, `0.25` (to the millisecond).
pub fn secs(d: std::time::Duration) -> String {
    let s = format!("{:.3}", d.as_secs_f64());
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// A frame's kind, its payload's first byte (the one table of kinds:
/// [`Frame::name`], the encoder and the decoder read it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Kind {
    Header = 1,
    Round = 2,
    Pages = 3,
    Digest = 4,
    VcpuState = 5,
    Done = 6,
    Verified = 7,
    Refuse = 8,
    Ready = 9,
    Commit = 10,
    Running = 11,
    Query = 12,
    Status = 13,
    Settled = 14,
    Heartbeat = 15,
    Attach = 16,
    Audit = 17,
    Ping = 18,
    Pong = 19,
}

impl Kind {
    const ALL: [Kind; 19] = [
        Kind::Header,
        Kind::Round,
        Kind::Pages,
        Kind::Digest,
        Kind::VcpuState,
        Kind::Done,
        Kind::Verified,
        Kind::Refuse,
        Kind::Ready,
        Kind::Commit,
        Kind::Running,
        Kind::Query,
        Kind::Status,
        Kind::Settled,
        Kind::Heartbeat,
        Kind::Attach,
        Kind::Audit,
        Kind::Ping,
        Kind::Pong,
    ];

    /// The kind byte `b` names, if any.
    fn from_u8(b: u8) -> Option<Kind> {
        Kind::ALL.into_iter().find(|&k| k as u8 == b)
    }

    /// Its name, for messages.
    fn name(self) -> &'static str {
        match self {
            Kind::Header => "header",
            Kind::Round => "round",
            Kind::Pages => "pages",
            Kind::Digest => "digest",
            Kind::VcpuState => "vcpu-state",
            Kind::Done => "done",
            Kind::Verified => "verified",
            Kind::Refuse => "refuse",
            Kind::Ready => "ready",
            Kind::Commit => "commit",
            Kind::Running => "running",
            Kind::Query => "query",
            Kind::Status => "status",
            Kind::Settled => "settled",
            Kind::Heartbeat => "heartbeat",
            Kind::Attach => "attach",
            Kind::Audit => "audit",
            Kind::Ping => "ping",
            Kind::Pong => "pong",
        }
    }
}

/// Bytes of a slot record in a header: id `u32`, guest physical address
/// `u64`, pages `u64`.
const SLOT_RECORD_BYTES: usize = 4 + 8 + 8;
/// Bytes of a range record in a `Pages` frame: first page `u64`, pages
/// `u32`, the zero flag `u8`.
const RANGE_RECORD_BYTES: usize = 8 + 4 + 1;
/// Where a `Pages` payload's range count is: after the kind byte and the
/// slot.
const PAGES_RANGE_COUNT_AT: usize = 1 + 4;

impl Frame {
    /// The kind's name, for messages.
    pub fn name(&self) -> &'static str {
        self.kind().name()
    }

    fn kind(&self) -> Kind {
        match self {
            Frame::Header(_) => Kind::Header,
            Frame::Round { .. } => Kind::Round,
            Frame::Pages { .. } => Kind::Pages,
            Frame::Digest { .. } => Kind::Digest,
            Frame::VcpuState { .. } => Kind::VcpuState,
            Frame::Done => Kind::Done,
            Frame::Verified => Kind::Verified,
            Frame::Refuse { .. } => Kind::Refuse,
            Frame::Ready => Kind::Ready,
            Frame::Commit { .. } => Kind::Commit,
            Frame::Running { .. } => Kind::Running,
            Frame::Query { .. } => Kind::Query,
            Frame::Status { .. } => Kind::Status,
            Frame::Settled { .. } => Kind::Settled,
            Frame::Heartbeat { .. } => Kind::Heartbeat,
            Frame::Attach { .. } => Kind::Attach,
            Frame::Audit { .. } => Kind::Audit,
            Frame::Ping { .. } => Kind::Ping,
            Frame::Pong { .. } => Kind::Pong,
        }
    }

    /// The payload (kind byte and body).
    #[cfg(test)]
    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        self.encode_into(&mut b);
        b
    }

    /// The payload, into `b` (cleared first; its capacity is reused).
    fn encode_into(&self, b: &mut Vec<u8>) {
        b.clear();
        b.push(self.kind() as u8);
        match self {
            Frame::Header(h) => {
                b.extend_from_slice(&MAGIC);
                put_u32(b, h.version);
                put_u32(b, h.page_size);
                put_bytes(b, h.backend.as_bytes());
                put_bytes(b, h.config.as_bytes());
                put_slots(b, &h.slots);
                put_u64(b, h.id);
                put_u32(b, h.progress_timeout_ms);
                put_u32(b, h.settle_ms);
                put_u32(b, h.streams);
                b.push(u8::from(h.audit));
            }
            Frame::Round { round } => put_u32(b, *round),
            Frame::Pages { slot, ranges, data } => {
                put_pages_table(b, *slot, ranges);
                let data_pages = data_pages(ranges);
                let page = if data_pages == 0 { 0 } else { data.len() / data_pages as usize };
                b.extend_from_slice(data);
                fill_page_crcs(b, data_pages, page);
            }
            Frame::Digest { slot, first, digests } => {
                put_u32(b, *slot);
                put_u64(b, *first);
                put_u32(b, digests.len() as u32);
                for d in digests {
                    put_u64(b, *d);
                }
            }
            Frame::VcpuState { vcpu, state } => {
                put_u32(b, *vcpu);
                put_bytes(b, state);
            }
            Frame::Done | Frame::Verified | Frame::Ready => {}
            Frame::Refuse { why } => put_refusal(b, why),
            Frame::Commit { id } | Frame::Running { id } | Frame::Query { id } | Frame::Settled { id } => {
                put_u64(b, *id)
            }
            Frame::Status { id, answer } => {
                put_u64(b, *id);
                b.push(answer.to_byte());
            }
            Frame::Heartbeat { received } => put_u64(b, *received),
            Frame::Ping { seq } | Frame::Pong { seq } => put_u64(b, *seq),
            Frame::Attach { id, stream } => {
                put_u64(b, *id);
                put_u32(b, *stream);
            }
            Frame::Audit { mismatched, pages } => {
                put_u64(b, *mismatched);
                put_u32(b, pages.len() as u32);
                for p in pages {
                    put_u64(b, *p);
                }
            }
        }
    }

    /// Decodes a payload; a `Pages` frame's data is copied into the frame
    /// with `copy_data`, else left out (a borrowing reader's).
    fn decode(
        payload: &[u8],
        page_size: u32,
        copy_data: bool,
        page_crcs: &mut Vec<u32>,
    ) -> Result<Frame, StreamError> {
        let (&byte, body) = payload.split_first().ok_or(StreamError::FrameSize { len: 0 })?;
        let kind = Kind::from_u8(byte).ok_or(StreamError::UnknownKind(byte))?;
        let mut c = Cursor { b: body, kind: kind.name() };
        let f = match kind {
            Kind::Header => Frame::Header(c.header()?),
            Kind::Round => Frame::Round { round: c.u32()? },
            Kind::Pages => c.pages(page_size, copy_data, page_crcs)?,
            Kind::Digest => {
                let slot = c.u32()?;
                let first = c.u64()?;
                let n = c.count(8)?;
                let mut digests = Vec::with_capacity(n);
                for _ in 0..n {
                    digests.push(c.u64()?);
                }
                Frame::Digest { slot, first, digests }
            }
            Kind::VcpuState => Frame::VcpuState { vcpu: c.u32()?, state: c.bytes()?.to_vec() },
            Kind::Done => Frame::Done,
            Kind::Verified => Frame::Verified,
            Kind::Refuse => Frame::Refuse { why: c.refusal()? },
            Kind::Ready => Frame::Ready,
            Kind::Commit => Frame::Commit { id: c.u64()? },
            Kind::Running => Frame::Running { id: c.u64()? },
            Kind::Query => Frame::Query { id: c.u64()? },
            Kind::Status => {
                let id = c.u64()?;
                let b = c.take(1)?[0];
                let answer = Answer::from_byte(b).ok_or_else(|| c.bad(Malformation::Answer(b)))?;
                Frame::Status { id, answer }
            }
            Kind::Settled => Frame::Settled { id: c.u64()? },
            Kind::Heartbeat => Frame::Heartbeat { received: c.u64()? },
            Kind::Ping => Frame::Ping { seq: c.u64()? },
            Kind::Pong => Frame::Pong { seq: c.u64()? },
            Kind::Attach => Frame::Attach { id: c.u64()?, stream: c.u32()? },
            Kind::Audit => {
                let mismatched = c.u64()?;
                let n = c.count(8)?;
                let mut pages = Vec::with_capacity(n);
                for _ in 0..n {
                    pages.push(c.u64()?);
                }
                Frame::Audit { mismatched, pages }
            }
        };
        if !c.b.is_empty() {
            return Err(c.bad(Malformation::LeftOver(c.b.len())));
        }
        Ok(f)
    }
}

fn put_u32(b: &mut Vec<u8>, v: u32) {
    b.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut Vec<u8>, v: u64) {
    b.extend_from_slice(&v.to_le_bytes());
}

fn put_bytes(b: &mut Vec<u8>, v: &[u8]) {
    put_u32(b, v.len() as u32);
    b.extend_from_slice(v);
}

/// A string of at most [`MAX_STRING_BYTES`] (a longer one is cut at a
/// character boundary: the reader refuses longer ones).
fn put_str(b: &mut Vec<u8>, s: &str) {
    let mut end = s.len().min(MAX_STRING_BYTES as usize);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    put_bytes(b, &s.as_bytes()[..end]);
}

fn put_slots(b: &mut Vec<u8>, slots: &[SlotLayout]) {
    put_u32(b, slots.len() as u32);
    for s in slots {
        put_u32(b, s.id);
        put_u64(b, s.guest_phys_addr);
        put_u64(b, s.pages);
    }
}

/// A [`Refusal`]: its code, then its fields in order.
fn put_refusal(b: &mut Vec<u8>, r: &Refusal) {
    b.push(r.code());
    match r {
        Refusal::Busy | Refusal::PagesAfterDigests | Refusal::QueriedBeforeCommit => {}
        Refusal::Layout { theirs, page_size, ours } => {
            put_slots(b, theirs);
            put_u32(b, *page_size);
            put_slots(b, ours);
        }
        Refusal::Build { cause }
        | Refusal::Backend { cause }
        | Refusal::Stream { cause }
        | Refusal::NoCommit { cause } => put_str(b, cause),
        Refusal::PagesOutside { slot, first, pages, slot_pages } => {
            put_u32(b, *slot);
            put_u64(b, *first);
            put_u32(b, *pages);
            put_u64(b, *slot_pages);
        }
        Refusal::DigestsOutside { slot, first, count, slot_pages } => {
            put_u32(b, *slot);
            put_u64(b, *first);
            put_u32(b, *count);
            put_u64(b, *slot_pages);
        }
        Refusal::VcpuOutside { vcpu, vcpus } => {
            put_u32(b, *vcpu);
            put_u32(b, *vcpus);
        }
        Refusal::MissingVcpuStates { vcpus } => put_u32(b, *vcpus),
        Refusal::Mismatch { pages } => put_u64(b, *pages),
    }
}

/// A bounds-checked reader of one frame's body.
struct Cursor<'a> {
    b: &'a [u8],
    kind: &'static str,
}

impl<'a> Cursor<'a> {
    fn bad(&self, why: Malformation) -> StreamError {
        StreamError::Malformed { kind: self.kind, why }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], StreamError> {
        if n > self.b.len() {
            return Err(self.bad(Malformation::Short { needed: n, left: self.b.len() }));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }

    fn u32(&mut self) -> Result<u32, StreamError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }

    fn u64(&mut self) -> Result<u64, StreamError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }

    fn flag(&mut self) -> Result<bool, StreamError> {
        match self.take(1)?[0] {
            0 => Ok(false),
            1 => Ok(true),
            x => Err(self.bad(Malformation::Flag(x))),
        }
    }

    /// A count of items of `each` bytes, checked against what is left
    /// before anything is allocated for them.
    fn count(&mut self, each: usize) -> Result<usize, StreamError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(each) > self.b.len() {
            return Err(self.bad(Malformation::Overrun { count: n, each, left: self.b.len() }));
        }
        Ok(n)
    }

    fn bytes(&mut self) -> Result<&'a [u8], StreamError> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    fn string(&mut self) -> Result<String, StreamError> {
        let b = self.bytes()?;
        if b.len() > MAX_STRING_BYTES as usize {
            return Err(self.bad(Malformation::LongString(b.len())));
        }
        String::from_utf8(b.to_vec()).map_err(|_| self.bad(Malformation::NotUtf8))
    }

    /// A [`Header`]'s body: the magic, the version (only ours), the rest.
    fn header(&mut self) -> Result<Header, StreamError> {
        if self.take(8)? != MAGIC {
            return Err(StreamError::BadMagic);
        }
        let version = self.u32()?;
        if version != VERSION {
            return Err(StreamError::Version { got: version });
        }
        let page_size = self.u32()?;
        let backend = self.string()?;
        let config = self.string()?;
        let slots = self.slots()?;
        let (id, progress_timeout_ms, settle_ms) = (self.u64()?, self.u32()?, self.u32()?);
        let streams = self.u32()?;
        let audit = self.flag()?;
        Ok(Header {
            version,
            page_size,
            backend,
            config,
            slots,
            id,
            progress_timeout_ms,
            settle_ms,
            streams,
            audit,
        })
    }

    /// A `Pages` body of `page_size`-byte pages: the ranges, the page CRCs
    /// (each checked against its page's bytes, and kept in `page_crcs`),
    /// the data (copied into the frame with `copy_data`).
    fn pages(
        &mut self,
        page_size: u32,
        copy_data: bool,
        page_crcs: &mut Vec<u32>,
    ) -> Result<Frame, StreamError> {
        if page_size == 0 {
            return Err(self.bad(Malformation::NoPageSize));
        }
        let slot = self.u32()?;
        let n = self.count(RANGE_RECORD_BYTES)?;
        let mut ranges = Vec::with_capacity(n);
        let mut data_pages = 0u64;
        for _ in 0..n {
            let r = PageRange { first: self.u64()?, pages: self.u32()?, zero: self.flag()? };
            if r.pages == 0 {
                return Err(self.bad(Malformation::EmptyRange));
            }
            if !r.zero {
                data_pages += u64::from(r.pages);
            }
            ranges.push(r);
        }
        if self.u32()? as u64 != data_pages {
            return Err(self.bad(Malformation::PageCount));
        }
        let crcs = self.take(data_pages as usize * 4)?;
        let bytes = std::mem::take(&mut self.b);
        if bytes.len() as u64 != data_pages * u64::from(page_size) {
            let why = Malformation::DataLength { bytes: bytes.len(), pages: data_pages, page_size };
            return Err(self.bad(why));
        }
        // The data's own checksums (the frame's covers the rest).
        page_crcs.clear();
        let pages = ranges.iter().filter(|r| !r.zero).flat_map(|r| r.first..r.first + u64::from(r.pages));
        for ((want, got), p) in crcs.chunks_exact(4).zip(bytes.chunks_exact(page_size as usize)).zip(pages) {
            let want = u32::from_le_bytes(want.try_into().expect("4 bytes"));
            let got = crc32c::crc32c(got);
            if want != got {
                return Err(StreamError::PageChecksum { page: p, expected: want, got });
            }
            page_crcs.push(got);
        }
        let data = if copy_data { bytes.to_vec() } else { Vec::new() };
        Ok(Frame::Pages { slot, ranges, data })
    }

    fn slots(&mut self) -> Result<Vec<SlotLayout>, StreamError> {
        let n = self.count(SLOT_RECORD_BYTES)?;
        let mut slots = Vec::with_capacity(n);
        for _ in 0..n {
            slots.push(SlotLayout { id: self.u32()?, guest_phys_addr: self.u64()?, pages: self.u64()? });
        }
        Ok(slots)
    }

    /// A [`Refusal`]: its code, then its fields ([`put_refusal`]).
    fn refusal(&mut self) -> Result<Refusal, StreamError> {
        let code = self.take(1)?[0];
        Ok(match code {
            1 => Refusal::Busy,
            2 => Refusal::Layout { theirs: self.slots()?, page_size: self.u32()?, ours: self.slots()? },
            3 => Refusal::Build { cause: self.string()? },
            4 => Refusal::Backend { cause: self.string()? },
            5 => Refusal::Stream { cause: self.string()? },
            6 => Refusal::PagesAfterDigests,
            7 => Refusal::PagesOutside {
                slot: self.u32()?,
                first: self.u64()?,
                pages: self.u32()?,
                slot_pages: self.u64()?,
            },
            8 => Refusal::DigestsOutside {
                slot: self.u32()?,
                first: self.u64()?,
                count: self.u32()?,
                slot_pages: self.u64()?,
            },
            9 => Refusal::VcpuOutside { vcpu: self.u32()?, vcpus: self.u32()? },
            10 => Refusal::MissingVcpuStates { vcpus: self.u32()? },
            11 => Refusal::Mismatch { pages: self.u64()? },
            12 => Refusal::QueriedBeforeCommit,
            13 => Refusal::NoCommit { cause: self.string()? },
            x => return Err(self.bad(Malformation::RefusalCode(x))),
        })
    }
}

/// Writes frames, reusing one payload buffer (a migration writes
/// thousands of 8 MiB frames: a fresh allocation each would cost the host
/// kernel a page fault per page).
#[derive(Debug, Default)]
pub struct FrameWriter {
    payload: Vec<u8>,
}

impl FrameWriter {
    /// Writes `f` in one `write_all` (a frame split in small writes would
    /// wait on Nagle's algorithm and the peer's delayed ACK); returns the
    /// bytes written.
    pub fn write(&mut self, w: &mut impl Write, f: &Frame) -> Result<u64, StreamError> {
        f.encode_into(&mut self.payload);
        self.write_payload(w)
    }
}

impl FrameWriter {
    /// Writes a [`Frame::Pages`] of `ranges` of slot `slot`, its data read
    /// straight from `memory` into the frame (no copy between): the same
    /// bytes as `write` of the frame with [`crate::ranges::range_data`].
    pub(crate) fn write_pages(
        &mut self,
        w: &mut impl Write,
        slot: u32,
        ranges: &[PageRange],
        memory: &[std::sync::atomic::AtomicU64],
    ) -> Result<u64, StreamError> {
        let b = &mut self.payload;
        b.clear();
        b.push(Kind::Pages as u8);
        put_pages_table(b, slot, ranges);
        crate::ranges::append_range_data(ranges, memory, b);
        fill_page_crcs(b, data_pages(ranges), PAGE_SIZE as usize);
        self.write_payload(w)
    }

    /// Writes the payload built in `self.payload` as one frame.
    fn write_payload(&mut self, w: &mut impl Write) -> Result<u64, StreamError> {
        let len = self.payload.len() as u64;
        if len == 0 || len > u64::from(MAX_FRAME_BYTES) {
            return Err(StreamError::FrameSize { len });
        }
        let crc = crc32c::crc32c(&self.payload[..checksummed_len(&self.payload)]);
        if len < 64 << 10 {
            let mut frame = Vec::with_capacity(8 + len as usize);
            frame.extend_from_slice(&(len as u32).to_le_bytes());
            frame.extend_from_slice(&crc.to_le_bytes());
            frame.extend_from_slice(&self.payload);
            w.write_all(&frame)?;
        } else {
            // Large frames: the head's own write is small beside the payload.
            let mut head = [0u8; 8];
            head[..4].copy_from_slice(&(len as u32).to_le_bytes());
            head[4..].copy_from_slice(&crc.to_le_bytes());
            w.write_all(&head)?;
            w.write_all(&self.payload)?;
        }
        Ok(8 + len)
    }
}

/// Pages of data in `ranges`.
fn data_pages(ranges: &[PageRange]) -> u64 {
    ranges.iter().filter(|r| !r.zero).map(|r| u64::from(r.pages)).sum()
}

/// A `Pages` payload's slot and table, then its page count and room for
/// one CRC per data page (filled by [`fill_page_crcs`]).
fn put_pages_table(b: &mut Vec<u8>, slot: u32, ranges: &[PageRange]) {
    put_u32(b, slot);
    put_u32(b, ranges.len() as u32);
    for r in ranges {
        put_u64(b, r.first);
        put_u32(b, r.pages);
        b.push(u8::from(r.zero));
    }
    let n = data_pages(ranges);
    put_u32(b, n as u32);
    b.resize(b.len() + 4 * n as usize, 0);
}

/// Fills the page CRCs of a `Pages` payload whose `n` data pages of `page`
/// bytes end it.
fn fill_page_crcs(b: &mut [u8], n: u64, page: usize) {
    let data_start = b.len() - n as usize * page;
    let (head, data) = b.split_at_mut(data_start);
    let crcs = &mut head[data_start - 4 * n as usize..];
    for (c, p) in crcs.chunks_exact_mut(4).zip(data.chunks_exact(page.max(1))) {
        c.copy_from_slice(&crc32c::crc32c(p).to_le_bytes());
    }
}

/// The bytes of `payload` its frame checksum covers: all of it, except a
/// `Pages` frame's data, which its page CRCs cover (each page is checked
/// once, and that check is also the destination's digest of the page as
/// it loads it). A payload too short to say is covered whole (its decode
/// will refuse it).
fn checksummed_len(payload: &[u8]) -> usize {
    let table = PAGES_RANGE_COUNT_AT + 4;
    if payload.first() != Some(&(Kind::Pages as u8)) || payload.len() < table {
        return payload.len();
    }
    let n = u32::from_le_bytes(payload[PAGES_RANGE_COUNT_AT..table].try_into().expect("4 bytes")) as usize;
    let at = n
        .checked_mul(RANGE_RECORD_BYTES)
        .and_then(|t| t.checked_add(table))
        .filter(|&a| a + 4 <= payload.len());
    let Some(at) = at else { return payload.len() };
    let pages = u32::from_le_bytes(payload[at..at + 4].try_into().expect("4 bytes")) as usize;
    pages
        .checked_mul(4)
        .and_then(|c| c.checked_add(at + 4))
        .filter(|&e| e <= payload.len())
        .unwrap_or(payload.len())
}

/// Reads frames, reusing its payload buffer (and, borrowing, leaving
/// `Pages` data in it).
#[derive(Debug, Default)]
pub struct FrameReader {
    payload: Vec<u8>,
    page_crcs: Vec<u32>,
    /// `Pages` data is left in the payload ([`FrameReader::borrowing`]).
    borrow: bool,
    /// The page size of the last frame read.
    page_size: usize,
}

impl FrameReader {
    /// Reads one frame, of a stream whose pages are `page_size` bytes (the
    /// header's; any value before the header is read).
    pub fn read(&mut self, r: &mut impl Read, page_size: u32) -> Result<Frame, StreamError> {
        let mut head = [0u8; 8];
        // The stream may end between frames (the peer closed): say so.
        loop {
            match r.read(&mut head[..1]) {
                Ok(0) => return Err(StreamError::Closed),
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(StreamError::Io(e)),
            }
        }
        read_exact(r, &mut head[1..])?;
        let len = u32::from_le_bytes(head[..4].try_into().expect("4 bytes"));
        let expected = u32::from_le_bytes(head[4..].try_into().expect("4 bytes"));
        if len == 0 || len > MAX_FRAME_BYTES {
            return Err(StreamError::FrameSize { len: u64::from(len) });
        }
        // Bounded by the check above; `take` stops at the frame's end.
        self.payload.clear();
        r.take(u64::from(len)).read_to_end(&mut self.payload)?;
        if self.payload.len() != len as usize {
            return Err(StreamError::Truncated);
        }
        let got = crc32c::crc32c(&self.payload[..checksummed_len(&self.payload)]);
        if got != expected {
            return Err(StreamError::Checksum { expected, got });
        }
        self.page_size = page_size as usize;
        Frame::decode(&self.payload, page_size, !self.borrow, &mut self.page_crcs)
    }

    /// A reader whose `Pages` frames come with empty `data`: their bytes
    /// stay in its buffer, for [`Self::pages_data`] (one copy less for a
    /// destination that stores them straight into guest memory).
    pub(crate) fn borrowing() -> Self {
        Self { borrow: true, ..Self::default() }
    }

    /// The data of the last frame read, if it was `Pages` (its bytes in the
    /// payload, after the page CRCs); empty otherwise.
    pub(crate) fn pages_data(&self) -> &[u8] {
        let n = self.page_crcs.len() * self.page_size;
        match self.payload.first() {
            Some(&k) if k == Kind::Pages as u8 && self.payload.len() >= n => {
                &self.payload[self.payload.len() - n..]
            }
            _ => &[],
        }
    }

    /// The CRC-32C of each data page of the last `Pages` frame read, in
    /// order (checked against the frame's).
    pub(crate) fn page_crcs(&self) -> &[u32] {
        &self.page_crcs
    }
}

/// Writes one frame.
pub fn write_frame(w: &mut impl Write, f: &Frame) -> Result<(), StreamError> {
    FrameWriter::default().write(w, f).map(|_| ())
}

/// Reads one frame, of a stream whose pages are `page_size` bytes (the
/// header's; any value before the header is read).
pub fn read_frame(r: &mut impl Read, page_size: u32) -> Result<Frame, StreamError> {
    FrameReader::default().read(r, page_size)
}

/// Reads the stream's first frame, which must be its header.
pub fn read_header(r: &mut impl Read) -> Result<Header, StreamError> {
    match read_frame(r, 0)? {
        Frame::Header(h) => Ok(h),
        other => Err(StreamError::Unexpected { expected: "header", got: other.name() }),
    }
}

fn read_exact(r: &mut impl Read, buf: &mut [u8]) -> Result<(), StreamError> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => StreamError::Truncated,
        _ => StreamError::Io(e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: u32 = PAGE_BYTES;

    fn header() -> Header {
        Header {
            version: VERSION,
            page_size: PAGE,
            backend: "engine".into(),
            config: "mmu=lockless".into(),
            slots: vec![SlotLayout { id: 0, guest_phys_addr: 0, pages: 256 }],
            id: 0x1d,
            progress_timeout_ms: 10_000,
            settle_ms: 30_000,
            streams: 3,
            audit: true,
        }
    }

    fn frames() -> Vec<Frame> {
        vec![
            Frame::Header(header()),
            Frame::Round { round: 0 },
            Frame::Pages {
                slot: 0,
                ranges: vec![
                    PageRange { first: 0, pages: 2, zero: false },
                    PageRange { first: 2, pages: 100, zero: true },
                    PageRange { first: 200, pages: 1, zero: false },
                ],
                data: (0..3 * PAGE as usize).map(|i| i as u8).collect(),
            },
            Frame::Digest { slot: 0, first: 0, digests: vec![1, 2, 3] },
            Frame::VcpuState { vcpu: 0, state: vec![9; 40] },
            Frame::Done,
            Frame::Verified,
            Frame::Refuse { why: Refusal::Busy },
            Frame::Ready,
            Frame::Commit { id: 1 },
            Frame::Running { id: 2 },
            Frame::Query { id: 3 },
            Frame::Status { id: 4, answer: Answer::Aborted },
            Frame::Settled { id: 5 },
            Frame::Attach { id: 6, stream: 2 },
            Frame::Audit { mismatched: 3, pages: vec![1, 5, 9] },
            Frame::Heartbeat { received: 6 },
            Frame::Ping { seq: 7 },
            Frame::Pong { seq: 7 },
        ]
    }

    fn stream() -> Vec<u8> {
        let mut b = Vec::new();
        for f in frames() {
            write_frame(&mut b, &f).unwrap();
        }
        b
    }

    fn read_all(mut b: &[u8]) -> Result<Vec<Frame>, StreamError> {
        let h = read_header(&mut b)?;
        let mut v = vec![Frame::Header(h.clone())];
        while !b.is_empty() {
            v.push(read_frame(&mut b, h.page_size)?);
        }
        Ok(v)
    }

    #[test]
    fn every_frame_round_trips() {
        assert_eq!(read_all(&stream()).unwrap(), frames());
    }

    #[test]
    fn every_refusal_round_trips_and_an_unknown_code_is_malformed() {
        let slots = vec![SlotLayout { id: 0, guest_phys_addr: 0, pages: 256 }];
        let cause = || "the VM: mmap failed".to_string();
        let all = [
            Refusal::Busy,
            Refusal::Layout { theirs: slots.clone(), page_size: 8192, ours: vec![] },
            Refusal::Build { cause: cause() },
            Refusal::Backend { cause: cause() },
            Refusal::Stream { cause: cause() },
            Refusal::PagesAfterDigests,
            Refusal::PagesOutside { slot: 1, first: 2, pages: 3, slot_pages: 4 },
            Refusal::DigestsOutside { slot: 5, first: 6, count: 7, slot_pages: 8 },
            Refusal::VcpuOutside { vcpu: 9, vcpus: 2 },
            Refusal::MissingVcpuStates { vcpus: 3 },
            Refusal::Mismatch { pages: 11 },
            Refusal::QueriedBeforeCommit,
            Refusal::NoCommit { cause: cause() },
        ];
        let framed = |p: Vec<u8>| {
            let mut b = Vec::new();
            b.extend_from_slice(&(p.len() as u32).to_le_bytes());
            b.extend_from_slice(&crc32c::crc32c(&p).to_le_bytes());
            b.extend_from_slice(&p);
            b
        };
        let encoded = |f: &Frame| framed(f.encode());
        let mut codes: Vec<u8> = all.iter().map(Refusal::code).collect();
        codes.dedup();
        assert_eq!(codes, (1..=13).collect::<Vec<u8>>(), "one code each, in order");
        for r in all {
            let f = Frame::Refuse { why: r };
            assert_eq!(read_frame(&mut &encoded(&f)[..], 0).unwrap(), f);
        }
        // A cause too long for the wire is cut, not refused by the reader.
        let long = Frame::Refuse { why: Refusal::Build { cause: "é".repeat(MAX_STRING_BYTES as usize) } };
        match read_frame(&mut &encoded(&long)[..], 0) {
            Ok(Frame::Refuse { why: Refusal::Build { cause } }) => {
                assert!(cause.len() <= MAX_STRING_BYTES as usize && cause.chars().all(|c| c == 'é'))
            }
            other => panic!("{other:?}"),
        }
        let unknown = framed(vec![Kind::Refuse as u8, 14]);
        assert!(matches!(
            read_frame(&mut &unknown[..], 0),
            Err(StreamError::Malformed { kind: "refuse", why: Malformation::RefusalCode(14) })
        ));
    }

    #[test]
    fn pages_written_from_memory_are_the_frame_of_their_data() {
        use std::sync::atomic::AtomicU64;
        let memory: Vec<AtomicU64> = (0..512 * 8).map(|i| AtomicU64::new(i as u64 % 700)).collect();
        let ranges =
            vec![PageRange { first: 1, pages: 2, zero: false }, PageRange { first: 5, pages: 1, zero: true }];
        let data = crate::ranges::range_data(&ranges, &memory);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        write_frame(&mut a, &Frame::Pages { slot: 0, ranges: ranges.clone(), data }).unwrap();
        FrameWriter::default().write_pages(&mut b, 0, &ranges, &memory).unwrap();
        assert_eq!(a, b);
        // A borrowing reader leaves the data where it was read.
        let mut r = FrameReader::borrowing();
        let f = r.read(&mut &b[..], PAGE).unwrap();
        assert!(matches!(f, Frame::Pages { ref data, .. } if data.is_empty()));
        assert_eq!(r.pages_data(), &crate::ranges::range_data(&ranges, &memory)[..]);
        assert_eq!(r.page_crcs().len(), 2);
    }

    #[test]
    fn each_refusal_is_typed() {
        let good = stream();
        // Truncated inside a frame.
        assert!(matches!(read_all(&good[..good.len() - 3]), Err(StreamError::Truncated)));
        // Closed between frames.
        assert!(matches!(read_frame(&mut &[][..], PAGE), Err(StreamError::Closed)));
        // A flipped payload byte: the checksum.
        let mut b = good.clone();
        b[20] ^= 0x40;
        assert!(matches!(read_all(&b), Err(StreamError::Checksum { .. })));
        // A hostile length: refused before anything is allocated for it.
        let mut b = good.clone();
        b[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(read_all(&b), Err(StreamError::FrameSize { len }) if len == u64::from(u32::MAX)));
        // Another magic, another version, an unknown kind, not a header first.
        let with = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut p = Frame::Header(header()).encode();
            f(&mut p);
            let mut b = Vec::new();
            b.extend_from_slice(&(p.len() as u32).to_le_bytes());
            b.extend_from_slice(&crc32c::crc32c(&p).to_le_bytes());
            b.extend_from_slice(&p);
            read_all(&b)
        };
        assert!(matches!(with(&|p| p[1] = b'X'), Err(StreamError::BadMagic)));
        assert!(matches!(with(&|p| p[9] = 9), Err(StreamError::Version { got: 9 })));
        assert!(matches!(with(&|p| p[0] = 99), Err(StreamError::UnknownKind(99))));
        assert!(matches!(with(&|p| p.push(0)), Err(StreamError::Malformed { kind: "header", .. })));
        let mut b = Vec::new();
        write_frame(&mut b, &Frame::Done).unwrap();
        assert!(matches!(read_all(&b), Err(StreamError::Unexpected { expected: "header", got: "done" })));
        // A page's byte flipped: its own checksum, named.
        let mut b = Vec::new();
        let ranges = vec![PageRange { first: 7, pages: 2, zero: false }];
        write_frame(&mut b, &Frame::Pages { slot: 0, ranges, data: vec![1; 2 * PAGE as usize] }).unwrap();
        let n = b.len();
        b[n - 10] ^= 4;
        assert!(matches!(read_frame(&mut &b[..], PAGE), Err(StreamError::PageChecksum { page: 8, .. })));
        // Pages read before any header said their size: refused, no panic.
        assert!(matches!(read_frame(&mut &b[..], 0), Err(StreamError::Malformed { kind: "pages", .. })));
        // Pages whose data does not match their ranges.
        let bad = Frame::Pages {
            slot: 0,
            ranges: vec![PageRange { first: 0, pages: 2, zero: false }],
            data: vec![0; 100],
        };
        let mut b = Vec::new();
        write_frame(&mut b, &bad).unwrap();
        assert!(matches!(read_frame(&mut &b[..], PAGE), Err(StreamError::Malformed { kind: "pages", .. })));
        // A count larger than the bytes left: refused before allocating.
        let mut p = vec![4u8];
        p.extend_from_slice(&0u32.to_le_bytes());
        p.extend_from_slice(&0u64.to_le_bytes());
        p.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            Frame::decode(&p, PAGE, true, &mut Vec::new()),
            Err(StreamError::Malformed { kind: "digest", .. })
        ));
        for e in [StreamError::Truncated, StreamError::BadMagic, StreamError::UnknownKind(3)] {
            assert!(!e.to_string().is_empty());
        }
    }

    /// 20,000 random mutations of a valid stream (byte flips, truncations,
    /// insertions, overwritten lengths): the reader answers each with
    /// frames or a typed error, never a panic, and never allocates more than
    /// one frame's maximum (every allocation is sized by a checked length).
    #[test]
    fn random_mutations_never_panic() {
        let good = stream();
        let mut rng = fastrand::Rng::with_seed(0x6d16);
        let mut refused = 0;
        for _ in 0..20_000 {
            let mut b = good.clone();
            for _ in 0..rng.usize(1..4) {
                match rng.u8(..4) {
                    0 => {
                        let i = rng.usize(..b.len());
                        b[i] ^= 1 << rng.u8(..8);
                    }
                    1 => b.truncate(rng.usize(..b.len())),
                    2 => {
                        let i = rng.usize(..=b.len());
                        b.insert(i, rng.u8(..));
                    }
                    _ => {
                        if b.len() >= 4 {
                            let i = rng.usize(..b.len() - 3);
                            b[i..i + 4].copy_from_slice(&rng.u32(..).to_le_bytes());
                        }
                    }
                }
                if b.is_empty() {
                    break;
                }
            }
            refused += usize::from(read_all(&b).is_err());
        }
        assert!(refused > 19_000, "almost every mutation must be refused: {refused}");
    }
}

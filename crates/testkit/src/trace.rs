//! Page-level access traces of real programs, for replay by vCPUs.
//!
//! A [`PageTrace`] is the sequence of pages a program touched, each access
//! reduced to `(page id, write)`. It is recorded from valgrind's lackey tool
//! (`valgrind --tool=lackey --trace-mem=yes`, parsed by
//! [`PageTrace::from_lackey`]) and stored in a compact binary file
//! ([`PageTrace::write_to`], [`PageTrace::read_from`]). A replay maps page id
//! `p` to a guest page of its choice and performs the accesses in order, so
//! the fault pattern it drives (first touches, write faults after each
//! harvest) is a real program's, not one of our synthetic workloads.
//!
//! # From accesses to entries
//!
//! - Page ids are dense: the distinct host virtual pages (4 KiB) of the
//!   recorded program are renamed `0..pages` in first-touch order.
//! - An access that spans several pages touches each of them, in address
//!   order. A lackey `M` (modify) access is a load of the whole operand
//!   followed by a store of it.
//! - Accesses are filtered through a window of the `window` pages most
//!   recently brought into it, first in, first out, as a fully associative
//!   TLB of that many entries with FIFO replacement would filter them: an
//!   access to a page outside the window is an entry (and brings the page in,
//!   evicting the oldest); an access to a page inside the window is dropped,
//!   except the first write to a page whose window entry has only been read,
//!   which is a write entry (the write fault a read-only mapping takes). With
//!   a window of 1 this collapses exactly the runs of consecutive accesses to
//!   one page: a run yields a read entry if it starts with a read, then a
//!   write entry if it contains any write.
//!
//! FIFO and not LRU: a dropped access then changes nothing in the window, so
//! the window's state follows from the entries alone, and a reader can check
//! invariant 3.
//!
//! Why a window: a program touches a few pages over and over (its code, its
//! stack), and only the accesses past the TLB reach the MMU. Without one, a
//! compile of a 93-line C file is 149 M entries (282 MiB); with the default
//! [`DEFAULT_WINDOW`] of 64 pages, what the engine's vCPUs would mostly take
//! as TLB hits is gone and the trace ships in a few MB. A replay's entries
//! are therefore the program's page references as an MMU behind a 64-entry
//! FIFO TLB sees them.
//!
//! # File format (all integers little-endian)
//!
//! ```text
//! offset  size  field
//!      0     8  magic: the bytes "SMMUTRC2"
//!      8     4  pages: u32, the number of distinct pages
//!     12     4  window: u32, the FIFO window (1..=MAX_WINDOW)
//!     16     8  entries: u64, the number of entries
//!     24     -  entries, one LEB128 varint each (1 to 5 bytes for valid ids):
//!               (zigzag(page - prev) << 1) | write
//! ```
//!
//! `prev` is the previous entry's page id, 0 before the first entry;
//! `zigzag(d) = (d << 1) ^ (d >> 63)` on `i64`. LEB128: 7 bits per byte,
//! least significant group first, high bit set on every byte but the last.
//! The file ends right after the last entry.
//!
//! # Invariants
//!
//! Every [`PageTrace`] value satisfies them, and [`PageTrace::read_from`]
//! rejects a file that breaks any of them (with a [`TraceError`]):
//! 1. `pages <= MAX_PAGES` (2^31), so that an entry packs into a `u32`.
//! 2. Dense, first-touch order: each entry's page id is at most one more than
//!    the highest id before it (the first entry's is 0), and every id in
//!    `0..pages` occurs.
//! 3. Filtered: replaying the window over the entries, an entry names a page
//!    inside the window only as the first write to a page the window holds
//!    as read.
//!
//! Traces are shipped under `traces/` at the repository root; see its
//! README for how they were recorded.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fmt;
use std::io::{self, BufRead, BufWriter, Read, Write};
use std::path::Path;

use thiserror::Error;

use shadow_mmu_core::spte::PAGE_SHIFT;

/// The first 8 bytes of a trace file.
pub const MAGIC: [u8; 8] = *b"SMMUTRC2";

/// Size of the fixed header: magic, page count, window, entry count.
pub const HEADER_LEN: usize = 8 + 4 + 4 + 8;

/// The window of [`PageTrace::from_lackey`]'s recordings: a 64-entry TLB.
pub const DEFAULT_WINDOW: u32 = 64;

/// Largest window a trace may declare.
pub const MAX_WINDOW: u32 = 1 << 12;

/// Most distinct pages a trace may have: a page id must fit in 31 bits, since
/// an entry is stored in memory as `page << 1 | write`.
pub const MAX_PAGES: u32 = 1 << 31;

/// Largest single access [`PageTrace::from_lackey`] accepts, in bytes
/// (x86's largest, `xsave` with AVX-512 state, is under 3 KiB).
pub const MAX_ACCESS_BYTES: u64 = 1 << 20;

/// Longest LEB128 varint of a `u64`.
const MAX_VARINT_LEN: usize = 10;

/// Errors reading, parsing or building a trace.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum TraceError {
    /// The underlying reader or writer failed.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// A line of lackey output that is not an access, a valgrind message
    /// (`==`) or blank.
    #[error("lackey output, line {line}: {reason}: {text:?}")]
    MalformedLine {
        /// 1-based line number.
        line: u64,
        /// What is wrong with it.
        reason: &'static str,
        /// The line (at most 80 bytes of it, lossily decoded).
        text: String,
    },
    /// The program touched more distinct pages than a trace can hold.
    #[error("more than {MAX_PAGES} distinct pages")]
    TooManyPages,
    /// The file does not start with [`MAGIC`].
    #[error("not a page trace: bad magic {found:02x?}")]
    BadMagic {
        /// The first bytes of the file (up to 8).
        found: Vec<u8>,
    },
    /// The file ends inside the header.
    #[error("truncated trace header: {len} of {HEADER_LEN} bytes")]
    TruncatedHeader {
        /// Bytes present.
        len: usize,
    },
    /// The file ends before the last entry the header announces.
    #[error("truncated trace: ends in entry {entry} of {entries}")]
    Truncated {
        /// Index of the incomplete entry.
        entry: u64,
        /// Entries the header announces.
        entries: u64,
    },
    /// An entry's varint does not fit in 64 bits.
    #[error("entry {entry}: varint overflows 64 bits")]
    VarintOverflow {
        /// Index of the entry.
        entry: u64,
    },
    /// The header's page count exceeds [`MAX_PAGES`].
    #[error("page count {pages} exceeds {MAX_PAGES}")]
    PageCountTooLarge {
        /// The header's page count.
        pages: u32,
    },
    /// The header announces more entries than the file has bytes for (each
    /// entry takes at least one byte).
    #[error("header announces {entries} entries but only {bytes} bytes follow it")]
    EntryCountTooLarge {
        /// The header's entry count.
        entries: u64,
        /// Bytes after the header.
        bytes: usize,
    },
    /// An entry's page id is negative or not below the page count.
    #[error("entry {entry}: page id {page} is not in 0..{pages}")]
    PageOutOfRange {
        /// Index of the entry.
        entry: u64,
        /// The decoded page id.
        page: i64,
        /// The header's page count.
        pages: u32,
    },
    /// An entry names a page before all lower ids have occurred (invariant 2).
    #[error("entry {entry}: page id {page} occurs before page id {expected}")]
    NotFirstTouchOrder {
        /// Index of the entry.
        entry: u64,
        /// The entry's page id.
        page: u32,
        /// The lowest id that has not occurred yet.
        expected: u32,
    },
    /// Some page ids below the page count never occur (invariant 2).
    #[error("header announces {pages} pages but only {touched} occur")]
    UntouchedPages {
        /// The header's page count.
        pages: u32,
        /// Distinct page ids that occur.
        touched: u32,
    },
    /// The window must have a size from 1 to [`MAX_WINDOW`].
    #[error("window of {window} pages: must be from 1 to {MAX_WINDOW}")]
    BadWindow {
        /// Asked for, or found in the header.
        window: u32,
    },
    /// An entry the window should have dropped (invariant 3).
    #[error("entry {entry}: a page inside the window, and not its first write")]
    NotCollapsed {
        /// Index of the second entry.
        entry: u64,
    },
    /// Bytes after the last entry.
    #[error("{extra} trailing bytes after the last entry")]
    TrailingBytes {
        /// How many.
        extra: usize,
    },
}

/// A recorded sequence of page accesses; see the module docs.
#[derive(Clone, PartialEq, Eq)]
pub struct PageTrace {
    pages: u32,
    window: u32,
    /// `page << 1 | write` per entry.
    entries: Vec<u32>,
    writes: usize,
}

impl fmt::Debug for PageTrace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PageTrace")
            .field("pages", &self.pages)
            .field("window", &self.window)
            .field("entries", &self.entries.len())
            .field("writes", &self.writes)
            .finish()
    }
}

/// The empty trace, with a window of 1.
impl Default for PageTrace {
    fn default() -> Self {
        PageTraceBuilder::new().finish()
    }
}

/// `pages P, entries N, writes W, window K`.
impl fmt::Display for PageTrace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pages {}, entries {}, writes {}, window {}",
            self.pages,
            self.entries.len(),
            self.writes,
            self.window
        )
    }
}

#[inline]
const fn zigzag(d: i64) -> u64 {
    ((d << 1) ^ (d >> 63)) as u64
}

#[inline]
const fn unzigzag(z: u64) -> i64 {
    ((z >> 1) as i64) ^ -((z & 1) as i64)
}

impl PageTrace {
    /// Number of distinct pages: ids are `0..pages()`.
    pub fn pages(&self) -> u32 {
        self.pages
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Has the trace no entries?
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Number of write entries.
    pub fn writes(&self) -> usize {
        self.writes
    }

    /// Entry `i`: `(page id, write)`.
    #[inline]
    pub fn get(&self, i: usize) -> Option<(u32, bool)> {
        self.entries.get(i).map(|&e| (e >> 1, e & 1 != 0))
    }

    /// The entries in order, as `(page id, write)`.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (u32, bool)> + DoubleEndedIterator + Clone + '_ {
        self.entries.iter().map(|&e| (e >> 1, e & 1 != 0))
    }

    /// Parses valgrind lackey `--trace-mem=yes` output, streaming (the text
    /// is never held in memory, only the trace being built).
    ///
    /// Accepted lines: `I  addr,size` (instruction fetch: a read),
    /// ` L addr,size` (load), ` S addr,size` (store), ` M addr,size` (modify:
    /// a load then a store), with `addr` in hex and `size` in decimal
    /// (`1..=MAX_ACCESS_BYTES`); lines that start with `==` (valgrind's own
    /// messages) and blank lines are skipped. Anything else is a
    /// [`TraceError::MalformedLine`].
    pub fn from_lackey(mut r: impl BufRead, window: u32) -> Result<PageTrace, TraceError> {
        let mut b = PageTraceBuilder::with_window(window)?;
        let mut line = Vec::with_capacity(64);
        let mut lineno = 0u64;
        loop {
            line.clear();
            if r.read_until(b'\n', &mut line)? == 0 {
                break;
            }
            lineno += 1;
            let text = line.trim_ascii_end();
            if text.is_empty() || text.starts_with(b"==") {
                continue;
            }
            let bad = |reason| TraceError::MalformedLine {
                line: lineno,
                reason,
                text: String::from_utf8_lossy(&text[..text.len().min(80)]).into_owned(),
            };
            let (load, store) = match text.get(..2) {
                Some(b"I ") | Some(b" L") => (true, false),
                Some(b" S") => (false, true),
                Some(b" M") => (true, true),
                _ => return Err(bad("not an access (I, L, S or M) nor a valgrind message")),
            };
            let rest = text[2..].trim_ascii_start();
            let comma =
                rest.iter().position(|&c| c == b',').ok_or_else(|| bad("no ',' after the address"))?;
            let addr = parse_hex(&rest[..comma]).ok_or_else(|| bad("bad hex address"))?;
            let size = parse_dec(&rest[comma + 1..]).ok_or_else(|| bad("bad decimal size"))?;
            if size == 0 || size > MAX_ACCESS_BYTES {
                return Err(bad("access size out of range"));
            }
            let last =
                addr.checked_add(size - 1).ok_or_else(|| bad("access wraps around the address space"))?;
            let (first_page, last_page) = (addr >> PAGE_SHIFT, last >> PAGE_SHIFT);
            if load {
                for page in first_page..=last_page {
                    b.access(page, false)?;
                }
            }
            if store {
                for page in first_page..=last_page {
                    b.access(page, true)?;
                }
            }
        }
        Ok(b.finish())
    }

    /// Writes the trace in the binary format of the module docs. Buffers
    /// internally; flushes before returning.
    pub fn write_to(&self, w: impl Write) -> io::Result<()> {
        let mut w = BufWriter::with_capacity(1 << 16, w);
        w.write_all(&MAGIC)?;
        w.write_all(&self.pages.to_le_bytes())?;
        w.write_all(&self.window.to_le_bytes())?;
        w.write_all(&(self.entries.len() as u64).to_le_bytes())?;
        let mut prev = 0i64;
        let mut buf = [0u8; MAX_VARINT_LEN];
        for &e in &self.entries {
            let page = i64::from(e >> 1);
            let mut v = (zigzag(page - prev) << 1) | u64::from(e & 1);
            prev = page;
            let mut n = 0;
            loop {
                let byte = (v & 0x7f) as u8;
                v >>= 7;
                if v == 0 {
                    buf[n] = byte;
                    n += 1;
                    break;
                }
                buf[n] = byte | 0x80;
                n += 1;
            }
            w.write_all(&buf[..n])?;
        }
        w.flush()
    }

    /// Reads a trace written by [`PageTrace::write_to`], checking the format
    /// and every invariant of the module docs. Reads `r` to its end (the
    /// file must end right after the last entry).
    pub fn read_from(mut r: impl Read) -> Result<PageTrace, TraceError> {
        let mut bytes = Vec::new();
        r.read_to_end(&mut bytes)?;
        Self::decode(&bytes)
    }

    /// [`PageTrace::read_from`] a file.
    pub fn load(path: impl AsRef<Path>) -> Result<PageTrace, TraceError> {
        Self::read_from(std::fs::File::open(path)?)
    }

    /// [`PageTrace::write_to`] a new file (truncating an existing one).
    pub fn save(&self, path: impl AsRef<Path>) -> io::Result<()> {
        self.write_to(std::fs::File::create(path)?)
    }

    fn decode(bytes: &[u8]) -> Result<PageTrace, TraceError> {
        if bytes.len() < MAGIC.len() || bytes[..MAGIC.len()] != MAGIC {
            let prefix = &bytes[..bytes.len().min(MAGIC.len())];
            // A short file that is a prefix of the magic is a truncated one.
            if prefix.len() < MAGIC.len() && MAGIC.starts_with(prefix) {
                return Err(TraceError::TruncatedHeader { len: bytes.len() });
            }
            return Err(TraceError::BadMagic { found: prefix.to_vec() });
        }
        if bytes.len() < HEADER_LEN {
            return Err(TraceError::TruncatedHeader { len: bytes.len() });
        }
        let pages = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        let window = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes"));
        let entries = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
        if pages > MAX_PAGES {
            return Err(TraceError::PageCountTooLarge { pages });
        }
        let mut lru = Window::new(window)?;
        let body = &bytes[HEADER_LEN..];
        if entries > body.len() as u64 {
            return Err(TraceError::EntryCountTooLarge { entries, bytes: body.len() });
        }
        // Fits: at most one entry per byte of a slice.
        let mut out = Vec::with_capacity(entries as usize);
        let mut writes = 0;
        let mut pos = 0;
        let mut prev = 0i64;
        // The lowest id not seen yet (invariant 2).
        let mut next_new = 0u32;
        for entry in 0..entries {
            let mut v = 0u64;
            let mut shift = 0;
            loop {
                let Some(&byte) = body.get(pos) else {
                    return Err(TraceError::Truncated { entry, entries });
                };
                pos += 1;
                let bits = u64::from(byte & 0x7f);
                if shift > 63 || (shift == 63 && bits > 1) {
                    return Err(TraceError::VarintOverflow { entry });
                }
                v |= bits << shift;
                if byte & 0x80 == 0 {
                    break;
                }
                shift += 7;
            }
            let write = v & 1 != 0;
            let page = prev.checked_add(unzigzag(v >> 1)).filter(|p| (0..i64::from(pages)).contains(p));
            let Some(page) = page else {
                return Err(TraceError::PageOutOfRange {
                    entry,
                    page: prev.wrapping_add(unzigzag(v >> 1)),
                    pages,
                });
            };
            prev = page;
            // In 0..pages <= 2^31: fits in 31 bits.
            let page = page as u32;
            if page > next_new {
                return Err(TraceError::NotFirstTouchOrder { entry, page, expected: next_new });
            }
            if page == next_new {
                next_new += 1;
            }
            let e = (page << 1) | u32::from(write);
            if lru.access(page, write) != Some(write) {
                return Err(TraceError::NotCollapsed { entry });
            }
            writes += usize::from(write);
            out.push(e);
        }
        if pos != body.len() {
            return Err(TraceError::TrailingBytes { extra: body.len() - pos });
        }
        if next_new != pages {
            return Err(TraceError::UntouchedPages { pages, touched: next_new });
        }
        Ok(PageTrace { pages, window, entries: out, writes })
    }

    /// The FIFO window the trace was filtered through.
    pub fn window(&self) -> u32 {
        self.window
    }
}

/// The FIFO window of the module docs: a ring of page ids, each with
/// whether its entry has been written.
#[derive(Debug)]
struct Window {
    size: usize,
    slots: Vec<(u32, bool)>,
    /// The slot the next page brought in takes (the oldest, once full).
    next: usize,
    /// The slot of the last access: most accesses repeat it.
    last: usize,
}

impl Window {
    fn new(size: u32) -> Result<Self, TraceError> {
        if !(1..=MAX_WINDOW).contains(&size) {
            return Err(TraceError::BadWindow { window: size });
        }
        Ok(Self { size: size as usize, slots: Vec::with_capacity(size as usize), next: 0, last: 0 })
    }

    /// An access to `page`: returns the entry it makes, `Some(write)`, or
    /// `None` if the window drops it.
    #[inline]
    fn access(&mut self, page: u32, write: bool) -> Option<bool> {
        let hit = match self.slots.get(self.last) {
            Some(&(p, _)) if p == page => Some(self.last),
            _ => self.slots.iter().position(|&(p, _)| p == page),
        };
        match hit {
            Some(i) => {
                self.last = i;
                let wrote = self.slots[i].1;
                self.slots[i].1 = wrote || write;
                (write && !wrote).then_some(true)
            }
            None => {
                if self.slots.len() < self.size {
                    self.slots.push((page, write));
                } else {
                    self.slots[self.next] = (page, write);
                }
                self.last = self.next;
                self.next = (self.next + 1) % self.size;
                Some(write)
            }
        }
    }
}

/// Parses a non-empty hex number that fits in a `u64`.
fn parse_hex(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 16 {
        return None;
    }
    s.iter().try_fold(0u64, |acc, &c| Some((acc << 4) | u64::from((c as char).to_digit(16)?)))
}

/// Parses a non-empty decimal number that fits in a `u64`.
fn parse_dec(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    s.iter().try_fold(0u64, |acc, &c| acc.checked_mul(10)?.checked_add(u64::from((c as char).to_digit(10)?)))
}

/// Builds a [`PageTrace`] from raw accesses to host pages, renaming pages
/// densely and collapsing runs (module docs). [`PageTrace::from_lackey`] is
/// a parser in front of one; other recorders can use it directly.
#[derive(Debug)]
pub struct PageTraceBuilder {
    ids: HashMap<u64, u32>,
    entries: Vec<u32>,
    writes: usize,
    window: Window,
    /// The last access's host page and id: most accesses repeat it.
    last: Option<(u64, u32)>,
}

impl Default for PageTraceBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl PageTraceBuilder {
    /// An empty builder with a window of 1 page: it collapses runs of
    /// consecutive accesses to one page.
    pub fn new() -> Self {
        Self::with_window(1).expect("a valid window")
    }

    /// An empty builder with a FIFO window of `window` pages.
    ///
    /// # Errors
    /// [`TraceError::BadWindow`] unless `1 <= window <= MAX_WINDOW`.
    pub fn with_window(window: u32) -> Result<Self, TraceError> {
        Ok(Self {
            ids: HashMap::new(),
            entries: Vec::new(),
            writes: 0,
            window: Window::new(window)?,
            last: None,
        })
    }

    /// Records one access to host page `page` (an address >> 12).
    ///
    /// # Errors
    /// [`TraceError::TooManyPages`] if `page` would be page number
    /// [`MAX_PAGES`] + 1.
    pub fn access(&mut self, page: u64, write: bool) -> Result<(), TraceError> {
        let id = match self.last {
            Some((p, id)) if p == page => id,
            _ => {
                let next = self.ids.len() as u32;
                let id = match self.ids.entry(page) {
                    Entry::Occupied(e) => *e.get(),
                    Entry::Vacant(e) => {
                        if next >= MAX_PAGES {
                            return Err(TraceError::TooManyPages);
                        }
                        *e.insert(next)
                    }
                };
                self.last = Some((page, id));
                id
            }
        };
        if let Some(w) = self.window.access(id, write) {
            self.push(id, w);
        }
        Ok(())
    }

    #[inline]
    fn push(&mut self, id: u32, write: bool) {
        self.entries.push((id << 1) | u32::from(write));
        self.writes += usize::from(write);
    }

    /// Distinct pages so far.
    pub fn pages(&self) -> u32 {
        self.ids.len() as u32
    }

    /// Entries so far.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// No entries yet?
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The trace.
    pub fn finish(self) -> PageTrace {
        PageTrace {
            pages: self.ids.len() as u32,
            window: self.window.size as u32,
            entries: self.entries,
            writes: self.writes,
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn build(accesses: &[(u64, bool)]) -> PageTrace {
        let mut b = PageTraceBuilder::new();
        for &(p, w) in accesses {
            b.access(p, w).unwrap();
        }
        b.finish()
    }

    fn entries(t: &PageTrace) -> Vec<(u32, bool)> {
        t.iter().collect()
    }

    fn encode(t: &PageTrace) -> Vec<u8> {
        let mut v = Vec::new();
        t.write_to(&mut v).unwrap();
        v
    }

    /// A header followed by raw varints.
    fn file(pages: u32, entries: u64, varints: &[u64]) -> Vec<u8> {
        let mut v = MAGIC.to_vec();
        v.extend(pages.to_le_bytes());
        v.extend(1u32.to_le_bytes());
        v.extend(entries.to_le_bytes());
        for &x in varints {
            let mut x = x;
            loop {
                let b = (x & 0x7f) as u8;
                x >>= 7;
                if x == 0 {
                    v.push(b);
                    break;
                }
                v.push(b | 0x80);
            }
        }
        v
    }

    /// The varint of entry (page, write) after `prev`.
    fn ent(prev: i64, page: i64, write: bool) -> u64 {
        (zigzag(page - prev) << 1) | u64::from(write)
    }

    fn random_trace(rng: &mut fastrand::Rng, n: usize, host_pages: u64) -> PageTrace {
        let mut b = PageTraceBuilder::new();
        for _ in 0..n {
            // Some locality, some far jumps.
            let p = if rng.u8(..4) == 0 { rng.u64(..1 << 36) } else { rng.u64(..host_pages) };
            b.access(p, rng.bool()).unwrap();
        }
        b.finish()
    }

    #[test]
    fn dense_ids_in_first_touch_order() {
        let t = build(&[(0x7fff0, false), (0x400, false), (0x7fff0, true), (0x999, true), (0x400, false)]);
        assert_eq!(t.pages(), 3);
        assert_eq!(entries(&t), vec![(0, false), (1, false), (0, true), (2, true), (1, false)]);
        assert_eq!(t.writes(), 2);
        assert_eq!(t.len(), 5);
        assert_eq!(t.get(3), Some((2, true)));
        assert_eq!(t.get(5), None);
    }

    #[test]
    fn collapse_rules() {
        // Reads only: one read.
        assert_eq!(entries(&build(&[(5, false), (5, false), (5, false)])), vec![(0, false)]);
        // Read then write (and more): read, write.
        assert_eq!(
            entries(&build(&[(5, false), (5, true), (5, false), (5, true)])),
            vec![(0, false), (0, true)]
        );
        // Starts with a write: the write only.
        assert_eq!(entries(&build(&[(5, true), (5, false), (5, true)])), vec![(0, true)]);
        // A new run per change of page, even back to an earlier page.
        assert_eq!(
            entries(&build(&[(5, false), (6, true), (6, false), (5, false), (5, true)])),
            vec![(0, false), (1, true), (0, false), (0, true)]
        );
        let empty = build(&[]);
        assert!(empty.is_empty());
        assert_eq!((empty.pages(), empty.writes()), (0, 0));
    }

    #[test]
    fn round_trip() {
        let mut rng = fastrand::Rng::with_seed(7);
        for n in [0, 1, 2, 100, 10_000] {
            let t = random_trace(&mut rng, n, 64);
            let bytes = encode(&t);
            assert_eq!(&bytes[..8], b"SMMUTRC2");
            let back = PageTrace::read_from(&bytes[..]).unwrap();
            assert_eq!(back, t);
            assert_eq!(back.writes(), t.writes());
        }
    }

    #[test]
    fn exact_encoding() {
        // Pages 0 R, 1 W, 0 R: deltas 0, +1, -1.
        let t = build(&[(9, false), (3, true), (9, false)]);
        let bytes = encode(&t);
        let mut want = MAGIC.to_vec();
        want.extend(2u32.to_le_bytes());
        want.extend(1u32.to_le_bytes());
        want.extend(3u64.to_le_bytes());
        // zigzag(0)<<1|0 = 0; zigzag(1)<<1|1 = 5; zigzag(-1)<<1|0 = 2.
        want.extend([0, 5, 2]);
        assert_eq!(bytes, want);
        // A multi-byte varint: page 64 after page 0 is zigzag 128 -> 256.
        let mut accesses: Vec<(u64, bool)> = (0..65).map(|p| (p, false)).collect();
        accesses.push((0, false));
        accesses.push((64, true));
        let t = build(&accesses);
        let bytes = encode(&t);
        // Page 64 -> 0: delta -64, zigzag 127, << 1 = 254 = [0xfe, 0x01];
        // then 0 -> 64, a write: delta 64, zigzag 128, << 1 | 1 = 257 = [0x81, 0x02].
        assert_eq!(&bytes[bytes.len() - 4..], &[0xfe, 0x01, 0x81, 0x02]);
        assert_eq!(PageTrace::read_from(&bytes[..]).unwrap(), t);
    }

    #[test]
    fn lackey_parsing() {
        let text = "\
==123== Lackey, an example Valgrind tool
==123== Command: /bin/true

I  04012340,3
 L 1ffefff8c0,8
 S 1ffefff8c0,8
I  04012343,5
 M 04025000,4
 L 04026ffc,8
I  04012348,2
==123== Exit code:       0
";
        let t = PageTrace::from_lackey(text.as_bytes(), 1).unwrap();
        // Host pages: 0x4012 (code) = 0, 0x1ffefff8 (stack) = 1,
        // 0x4025 = 2, 0x4026 = 3, 0x4027 = 4.
        assert_eq!(
            entries(&t),
            vec![
                (0, false), // I
                (1, false), // L
                (1, true),  // S, same run as the L
                (0, false), // I
                (2, false), // M: load
                (2, true),  // M: store
                (3, false), // L spanning 0x4026ffc..0x4027003
                (4, false),
                (0, false), // I
            ]
        );
        assert_eq!(t.pages(), 5);
        assert_eq!(t.writes(), 2);
        // A modify spanning two pages: loads of both, then stores of both.
        let t = PageTrace::from_lackey(" M 00000ffe,4\n".as_bytes(), 1).unwrap();
        assert_eq!(entries(&t), vec![(0, false), (1, false), (0, true), (1, true)]);
        // CRLF and a missing final newline are fine.
        let t = PageTrace::from_lackey("I  1000,1\r\n S 2000,1".as_bytes(), 1).unwrap();
        assert_eq!(entries(&t), vec![(0, false), (1, true)]);
    }

    #[test]
    fn lackey_errors_carry_the_line_number() {
        for (text, line) in [
            ("I  1000,1\nX  1000,1\n", 2),
            ("I  1000\n", 1),
            ("\n\n L zz,4\n", 3),
            (" S 1000,\n", 1),
            (" S 1000,0\n", 1),
            (" S 1000,4x\n", 1),
            (" S ffffffffffffffff,2\n", 1),
            (" S 11112222333344445,2\n", 1),
            (" L 1000,99999999\n", 1),
            ("=\n", 1),
        ] {
            match PageTrace::from_lackey(text.as_bytes(), DEFAULT_WINDOW) {
                Err(TraceError::MalformedLine { line: l, .. }) => assert_eq!(l, line, "{text:?}"),
                other => panic!("{text:?}: {other:?}"),
            }
        }
    }

    fn decode_err(bytes: &[u8]) -> TraceError {
        PageTrace::read_from(bytes).expect_err("corrupt file accepted")
    }

    #[test]
    fn corrupt_files_are_rejected_with_the_right_error() {
        let valid = file(2, 3, &[ent(0, 0, false), ent(0, 1, true), ent(1, 0, false)]);
        PageTrace::read_from(&valid[..]).unwrap();

        let mut bad = valid.clone();
        bad[0] = b'X';
        assert!(matches!(decode_err(&bad), TraceError::BadMagic { .. }));
        assert!(matches!(decode_err(b"hello"), TraceError::BadMagic { .. }));
        assert!(matches!(decode_err(b"SMMU"), TraceError::TruncatedHeader { len: 4 }));
        assert!(matches!(decode_err(&valid[..15]), TraceError::TruncatedHeader { len: 15 }));
        assert!(matches!(decode_err(&valid[..23]), TraceError::TruncatedHeader { len: 23 }));
        for window in [0, MAX_WINDOW + 1] {
            let mut v = valid.clone();
            v[12..16].copy_from_slice(&window.to_le_bytes());
            assert!(matches!(decode_err(&v), TraceError::BadWindow { window: w } if w == window));
        }

        // Truncated inside a multi-byte varint.
        let varints: Vec<u64> = std::iter::once(ent(0, 0, false))
            .chain((1..65).map(|p| ent(p - 1, p, false)))
            .chain([ent(64, 0, true)])
            .collect();
        let long = file(65, 66, &varints);
        PageTrace::read_from(&long[..]).unwrap();
        assert!(matches!(
            decode_err(&long[..long.len() - 1]),
            TraceError::Truncated { entry: 65, entries: 66 }
        ));

        // Varint overflow: eleven continuation bytes, and ten with high bits.
        let mut v = file(1, 1, &[]);
        v.extend([0xff; 11]);
        assert!(matches!(decode_err(&v), TraceError::VarintOverflow { entry: 0 }));
        let mut v = file(1, 1, &[]);
        v.extend([0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02]);
        assert!(matches!(decode_err(&v), TraceError::VarintOverflow { entry: 0 }));

        // Page ids out of range, above and below.
        assert!(matches!(
            decode_err(&file(1, 2, &[ent(0, 0, false), ent(0, 1, false)])),
            TraceError::PageOutOfRange { entry: 1, page: 1, pages: 1 }
        ));
        assert!(matches!(
            decode_err(&file(1, 1, &[ent(0, -1, false)])),
            TraceError::PageOutOfRange { entry: 0, page: -1, .. }
        ));
        let mut v = file(1, 1, &[]);
        v.extend([0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]);
        assert!(matches!(decode_err(&v), TraceError::PageOutOfRange { entry: 0, .. }));

        let mut v = valid.clone();
        v.push(0);
        assert!(matches!(decode_err(&v), TraceError::TrailingBytes { extra: 1 }));

        // Entry count absurd for the file size (and for memory).
        let mut v = valid.clone();
        v[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(decode_err(&v), TraceError::EntryCountTooLarge { entries: u64::MAX, bytes: 3 }));
        let mut v = valid.clone();
        v[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode_err(&v), TraceError::PageCountTooLarge { pages: u32::MAX }));

        // Invariants.
        assert!(matches!(
            decode_err(&file(2, 2, &[ent(0, 1, false), ent(1, 0, false)])),
            TraceError::NotFirstTouchOrder { entry: 0, page: 1, expected: 0 }
        ));
        assert!(matches!(
            decode_err(&file(3, 2, &[ent(0, 0, false), ent(0, 1, false)])),
            TraceError::UntouchedPages { pages: 3, touched: 2 }
        ));
        for (a, b) in [(false, false), (true, false), (true, true)] {
            assert!(matches!(
                decode_err(&file(1, 2, &[ent(0, 0, a), ent(0, 0, b)])),
                TraceError::NotCollapsed { entry: 1 }
            ));
        }
        PageTrace::read_from(&file(1, 2, &[ent(0, 0, false), ent(0, 0, true)])[..]).unwrap();
        // The empty trace.
        assert!(PageTrace::read_from(&file(0, 0, &[])[..]).unwrap().is_empty());
    }

    /// Random byte flips, truncations and insertions of valid files: decoding
    /// never panics, and whatever it accepts re-encodes to an equal trace.
    #[test]
    fn mutated_files_never_panic() {
        let mut rng = fastrand::Rng::with_seed(0xf022);
        let valids: Vec<Vec<u8>> = [0, 1, 5, 300, 3000]
            .iter()
            .map(|&n| encode(&random_trace(&mut rng, n, if n > 1000 { 200 } else { 20 })))
            .collect();
        let mut accepted = 0;
        for round in 0..20_000 {
            let mut v = valids[round % valids.len()].clone();
            for _ in 0..rng.usize(1..4) {
                match rng.u8(..4) {
                    0 | 1 if !v.is_empty() => {
                        let i = rng.usize(..v.len());
                        v[i] ^= 1 << rng.u8(..8);
                    }
                    2 => v.truncate(rng.usize(..=v.len())),
                    _ => {
                        let i = rng.usize(..=v.len());
                        v.insert(i, rng.u8(..));
                    }
                }
            }
            if let Ok(t) = PageTrace::read_from(&v[..]) {
                accepted += 1;
                assert_eq!(PageTrace::read_from(&encode(&t)[..]).unwrap(), t);
            }
        }
        // Some mutations stay valid (a flipped write bit, say); most do not.
        assert!(accepted > 0 && accepted < 10_000, "{accepted}");
    }

    fn build_window(window: u32, accesses: &[(u64, bool)]) -> PageTrace {
        let mut b = PageTraceBuilder::with_window(window).unwrap();
        for &(p, w) in accesses {
            b.access(p, w).unwrap();
        }
        b.finish()
    }

    #[test]
    fn the_window_drops_what_a_tlb_of_its_size_would_hit() {
        // Pages a, b, c = 10, 20, 30. Window 2: a b a (hit) c (evicts a, the
        // oldest: FIFO) b (hit) a (evicts b).
        let acc = [(10, false), (20, false), (10, false), (30, false), (20, false), (10, false)];
        assert_eq!(entries(&build_window(2, &acc)), vec![(0, false), (1, false), (2, false), (0, false)]);
        // Window 1 keeps every change of page.
        assert_eq!(build_window(1, &acc).len(), 6);
        // The first write to a page the window holds as read is an entry; later
        // writes are not, nor is a write to a page that came in by a write.
        let acc = [(10, false), (20, true), (10, true), (10, true), (20, true), (20, false)];
        assert_eq!(entries(&build_window(4, &acc)), vec![(0, false), (1, true), (0, true)]);
        // Eviction forgets the write: a page back in the window by a read
        // faults again on its next write.
        let acc = [(10, true), (20, false), (30, false), (10, false), (10, true)];
        assert_eq!(
            entries(&build_window(2, &acc)),
            vec![(0, true), (1, false), (2, false), (0, false), (0, true)]
        );
        // A window of 1 is the run collapse, whatever the stream.
        let mut rng = fastrand::Rng::with_seed(3);
        let acc: Vec<(u64, bool)> = (0..5000).map(|_| (rng.u64(..8), rng.bool())).collect();
        assert_eq!(build_window(1, &acc), build(&acc));
        assert!(build_window(8, &acc).len() < build(&acc).len() / 10, "8 pages all fit: few entries");
        for bad in [0, MAX_WINDOW + 1] {
            assert!(matches!(PageTraceBuilder::with_window(bad), Err(TraceError::BadWindow { .. })));
        }
    }

    #[test]
    fn windowed_traces_round_trip_and_the_reader_checks_the_window() {
        let mut rng = fastrand::Rng::with_seed(11);
        for window in [1, 2, 64] {
            let mut b = PageTraceBuilder::with_window(window).unwrap();
            for _ in 0..20_000 {
                b.access(rng.u64(..200), rng.u8(..4) == 0).unwrap();
            }
            let t = b.finish();
            assert_eq!(t.window(), window);
            assert_eq!(PageTrace::read_from(&encode(&t)[..]).unwrap(), t);
        }
        // Page 0 read twice is fine with window 1 if another page came
        // between; with window 2 the third entry is one the window drops.
        let v = [ent(0, 0, false), ent(0, 1, false), ent(1, 0, false)];
        PageTrace::read_from(&file(2, 3, &v)[..]).unwrap();
        let mut f = file(2, 3, &v);
        f[12..16].copy_from_slice(&2u32.to_le_bytes());
        assert!(matches!(decode_err(&f), TraceError::NotCollapsed { entry: 2 }));
    }

    #[test]
    fn file_round_trip_and_display() {
        let t = build(&[(1, false), (2, true)]);
        let dir = std::env::temp_dir().join(format!("smmu-trace-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.smtrace");
        t.save(&path).unwrap();
        assert_eq!(PageTrace::load(&path).unwrap(), t);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(t.to_string(), "pages 2, entries 2, writes 1, window 1");
    }
}

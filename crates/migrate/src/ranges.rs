//! From a harvest's dirty bitmap to what a round sends: runs of pages
//! ([`PageRange`]s, Cloud Hypervisor's `MemoryRangeTable`), each all zero
//! (sent as a flag) or all data, and the page digests of the final check.
//!
//! Invariants: the ranges of a bitmap cover exactly its set bits, in order,
//! with no two adjacent ranges of the same kind; a run never exceeds
//! `max_pages`, so that a frame stays under the stream's maximum.

use std::sync::atomic::{AtomicU64, Ordering};

use shadow_mmu_core::spte::{PAGE_SIZE, WORDS_PER_PAGE};

/// A run of pages of one slot in a `Pages` frame ([`crate::stream::Frame::Pages`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRange {
    /// First page (relative to the slot).
    pub first: u64,
    /// Pages in the run (at least one).
    pub pages: u32,
    /// All zero: no data follows for them.
    pub zero: bool,
}

/// Is page `p` of `memory` all zero?
fn is_zero(memory: &[AtomicU64], p: u64) -> bool {
    let w = &memory[p as usize * WORDS_PER_PAGE..][..WORDS_PER_PAGE];
    // Relaxed: guest data, read after the harvest that reported the page
    // (whose acquire orders the stores it reports).
    w.iter().all(|x| x.load(Ordering::Relaxed) == 0)
}

/// The ranges of the pages set in `bitmap`, a window of a dirty bitmap
/// that starts at page `first_page` (a multiple of 64; bit `i` of word `w`:
/// page `first_page + 64 * w + i`), split where a page turns from zero to
/// data or back, and every `max_pages` pages.
pub fn dirty_ranges(bitmap: &[u64], first_page: u64, memory: &[AtomicU64], max_pages: u32) -> Vec<PageRange> {
    assert!(max_pages > 0 && first_page.is_multiple_of(64));
    let mut out: Vec<PageRange> = Vec::new();
    for (w, &word) in bitmap.iter().enumerate() {
        let mut m = word;
        while m != 0 {
            let p = first_page + w as u64 * 64 + u64::from(m.trailing_zeros());
            m &= m - 1;
            let zero = is_zero(memory, p);
            match out.last_mut() {
                Some(r) if r.first + u64::from(r.pages) == p && r.zero == zero && r.pages < max_pages => {
                    r.pages += 1;
                }
                _ => out.push(PageRange { first: p, pages: 1, zero }),
            }
        }
    }
    out
}

/// The bytes of the data pages of `ranges`, in order (little-endian words).
#[cfg(test)]
pub(crate) fn range_data(ranges: &[PageRange], memory: &[AtomicU64]) -> Vec<u8> {
    let mut data = Vec::new();
    append_range_data(ranges, memory, &mut data);
    data
}

/// Appends [`range_data`] to `out` (a frame's payload being built).
pub(crate) fn append_range_data(ranges: &[PageRange], memory: &[AtomicU64], out: &mut Vec<u8>) {
    let pages: u64 = ranges.iter().filter(|r| !r.zero).map(|r| u64::from(r.pages)).sum();
    let start = out.len();
    out.resize(start + pages as usize * WORDS_PER_PAGE * 8, 0);
    let mut dst = out[start..].chunks_exact_mut(8);
    for r in ranges.iter().filter(|r| !r.zero) {
        let words = &memory[r.first as usize * WORDS_PER_PAGE..][..r.pages as usize * WORDS_PER_PAGE];
        // `words` first: a zip takes its left side's next item before it
        // finds its right side empty, and `dst` must lose none (with `dst`
        // on the left, every range after the first came one word short and
        // the rest of the frame shifted by 8 bytes).
        for (w, b) in words.iter().zip(dst.by_ref()) {
            // Relaxed: as in `is_zero`.
            b.copy_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
        }
    }
}

/// The bytes of `memory`, to read while nothing writes it (the digests of
/// the final check, which read a GiB: through atomics one word at a time
/// they cost a third more).
///
/// # Safety
/// While the returned slice lives, no thread stores to `memory`, and every
/// store before is visible to this thread (a happens-before edge, such as
/// the vCPU gate's pause, or being the only writer).
pub unsafe fn quiescent_bytes(memory: &[AtomicU64]) -> &[u8] {
    // SAFETY: `AtomicU64` has the size, alignment and bit validity of `u64`
    // (its documentation), so the words' storage is `8 * len` initialized
    // bytes, borrowed for as long as `memory` is; by the caller's contract
    // no store races these reads, so reading them plainly is no data race.
    unsafe { std::slice::from_raw_parts(memory.as_ptr().cast::<u8>(), memory.len() * 8) }
}

/// A digest of page `p` of guest memory `bytes` ([`quiescent_bytes`]):
/// CRC-32C of its bytes, widened with the page number so that two equal
/// pages at different places differ.
pub fn page_digest(bytes: &[u8], p: u64) -> u64 {
    const PAGE: usize = PAGE_SIZE as usize;
    digest_of(p, crc32c::crc32c(&bytes[p as usize * PAGE..][..PAGE]))
}

/// The digest of page `p` whose bytes have CRC-32C `crc` (what
/// [`page_digest`] computes, for a CRC computed elsewhere: a frame's page
/// CRC, a copy of a running page).
pub fn digest_of(p: u64, crc: u32) -> u64 {
    (p << 32) | u64::from(crc)
}

/// [`page_digest`] of page `p` if it is all zero.
pub fn zero_page_digest(p: u64) -> u64 {
    static ZERO: [u8; PAGE_SIZE as usize] = [0; PAGE_SIZE as usize];
    digest_of(p, crc32c::crc32c(&ZERO))
}

/// The digests of pages `[first, first + n)` of `bytes`, on `threads`
/// threads (this one included).
pub fn page_digests(bytes: &[u8], first: u64, n: u64, threads: usize) -> Vec<u64> {
    let threads = threads.clamp(1, n.max(1) as usize) as u64;
    if threads == 1 {
        return (first..first + n).map(|p| page_digest(bytes, p)).collect();
    }
    let share = |k: u64| first + n * k / threads..first + n * (k + 1) / threads;
    std::thread::scope(|s| {
        let helpers: Vec<_> = (1..threads)
            .map(|k| s.spawn(move || share(k).map(|p| page_digest(bytes, p)).collect::<Vec<_>>()))
            .collect();
        let mut out: Vec<u64> = share(0).map(|p| page_digest(bytes, p)).collect();
        for h in helpers {
            out.extend(h.join().expect("a digest thread panicked"));
        }
        out
    })
}

/// The digest of page `p` of a running guest's `memory`: the page copied
/// out through atomics, then digested as [`page_digest`] would the same
/// bytes (a page stored to meanwhile gives one of its states or a mix).
fn running_page_digest(memory: &[AtomicU64], p: u64) -> u64 {
    let mut copy = [0u8; PAGE_SIZE as usize];
    let words = &memory[p as usize * WORDS_PER_PAGE..][..WORDS_PER_PAGE];
    for (w, b) in words.iter().zip(copy.chunks_exact_mut(8)) {
        // Relaxed: a racy read is what the caller asked for.
        b.copy_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
    }
    digest_of(p, crc32c::crc32c(&copy))
}

/// The digests of `pages` of a running guest's `memory` on `threads`
/// threads (`running_page_digest`), and the CPU time they took, ns, summed
/// over the threads: what the digest pass costs, whatever else ran on the
/// host's CPUs meanwhile (the wall time would count the vCPUs' turns).
pub fn running_page_digests(memory: &[AtomicU64], pages: &[u64], threads: usize) -> (Vec<u64>, u64) {
    let share = pages.len().div_ceil(threads.clamp(1, pages.len().max(1))).max(1);
    let digest = |c: &[u64]| {
        let t = thread_cpu_ns();
        let d: Vec<u64> = c.iter().map(|&p| running_page_digest(memory, p)).collect();
        (d, thread_cpu_ns().saturating_sub(t))
    };
    std::thread::scope(|s| {
        let helpers: Vec<_> = pages.chunks(share).skip(1).map(|c| s.spawn(move || digest(c))).collect();
        let (mut out, mut cpu) = digest(&pages[..share.min(pages.len())]);
        for h in helpers {
            let (d, ns) = h.join().expect("a digest thread panicked");
            out.extend(d);
            cpu += ns;
        }
        (out, cpu)
    })
}

/// This thread's CPU time, ns (0 if the clock cannot be read).
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec for the call's duration;
    // CLOCK_THREAD_CPUTIME_ID needs nothing else.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if r != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem(pages: usize) -> Vec<AtomicU64> {
        (0..pages * WORDS_PER_PAGE).map(|_| AtomicU64::new(0)).collect()
    }

    #[test]
    fn ranges_cover_the_set_bits_split_by_kind_and_size() {
        let m = mem(200);
        for p in [3usize, 4, 5, 70, 130] {
            m[p * WORDS_PER_PAGE + 7].store(p as u64, Ordering::Relaxed);
        }
        // Pages 2..=6 and 69..=71 and 130 dirty; 2, 6, 69, 71 are zero.
        let mut bm = vec![0u64; 4];
        for p in [2u64, 3, 4, 5, 6, 69, 70, 71, 130] {
            bm[(p / 64) as usize] |= 1 << (p % 64);
        }
        let r = dirty_ranges(&bm, 0, &m, 2);
        let want = [
            (2, 1, true),
            (3, 2, false),
            (5, 1, false),
            (6, 1, true),
            (69, 1, true),
            (70, 1, false),
            (71, 1, true),
            (130, 1, false),
        ];
        let got: Vec<_> = r.iter().map(|r| (r.first, r.pages, r.zero)).collect();
        assert_eq!(got, want);
        let data = range_data(&r, &m);
        assert_eq!(data.len(), 5 * PAGE_SIZE as usize, "data pages only");
        assert_eq!(data[7 * 8], 3, "page 3's word 7 first");
        // Every data page in its place: pages 3, 4, 5, 70, 130 in order, each
        // its own 4 KiB with word 7 holding its number (a frame of several
        // ranges, no byte lost between them).
        for (i, p) in [3usize, 4, 5, 70, 130].into_iter().enumerate() {
            let page = &data[i * PAGE_SIZE as usize..][..PAGE_SIZE as usize];
            assert_eq!(page[7 * 8], p as u8, "data page {i}");
            assert!(page.iter().enumerate().all(|(j, &b)| j == 7 * 8 || b == 0), "data page {i}");
        }
        // SAFETY: nothing writes `m` while `b` lives.
        let b = unsafe { quiescent_bytes(&m) };
        assert_ne!(page_digest(b, 3), page_digest(b, 4));
        assert_ne!(page_digest(b, 2), page_digest(b, 6), "equal pages, different places");
        assert_eq!(page_digests(b, 1, 150, 2), page_digests(b, 1, 150, 1));
        assert_eq!(zero_page_digest(2), page_digest(b, 2));
        // Digests of copies of the pages: the same, on any threads.
        let some = [1u64, 3, 4, 70, 130, 199];
        let want: Vec<u64> = some.iter().map(|&p| page_digest(b, p)).collect();
        assert_eq!(running_page_digests(&m, &some, 1).0, want);
        assert_eq!(running_page_digests(&m, &some, 4).0, want);
        // A window of the bitmap from page 128 on: the same pages above it.
        let got: Vec<_> =
            dirty_ranges(&bm[2..], 128, &m, 8).iter().map(|r| (r.first, r.pages, r.zero)).collect();
        assert_eq!(got, [(130, 1, false)]);
    }
}

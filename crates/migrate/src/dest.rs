//! The destination of a live migration: builds its VM from the stream's
//! header (through the caller, who knows the backends), loads the rounds,
//! checks every page against the source's digest, restores the vCPUs,
//! resumes the guest and acks; then lets it run and checks what it does.
//!
//! Invariants:
//! - the guest never runs here unless every page matched its digest and
//!   every vCPU took its state; otherwise the destination answers
//!   `Ack { running: false }` (or a `Refuse` saying why) and the caller
//!   drops the partial VM;
//! - a stream that ends early (the source died) or goes wrong leaves the
//!   partial VM unrun, and the error says so;
//! - after resuming, every page whose content moved on from the source's
//!   final digest must be in this VM's dirty log (`lost_pages` otherwise),
//!   and carry at least the iteration the guest had reached when it
//!   stopped at the source (`regressed_pages` otherwise): the guest goes on
//!   where it stopped.

use std::io::{BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use shadow_mmu_testkit::backend::{BackendError, PassVm, error_chain, harvest};
use thiserror::Error;

use crate::pacer::Pacer;
use crate::ranges::{WORDS_PER_PAGE, digest_of, page_digest, quiescent_bytes, zero_page_digest};
use crate::source::PAUSE_WITHIN;
use crate::stats::IncomingStats;
use crate::stream::{
    Frame, FrameReader, Header, PageRange, SlotLayout, StreamError, read_header, write_frame,
};

/// What the caller builds from a header: the VM, and how its guest is paced
/// once it runs here.
pub struct IncomingVm {
    /// The VM, its vCPUs not yet released.
    pub vm: Box<dyn PassVm>,
    /// The workload's dirty rate, bytes a second (`None`: flat out).
    pub dirty_rate: Option<u64>,
    /// Its share of stores, percent.
    pub write_pct: u8,
}

/// Why an incoming migration did not end with a running, checked guest.
#[derive(Debug, Error)]
pub enum IncomingError {
    /// The stream broke or was refused: the partial VM is discarded.
    #[error("the migration stream failed; the partial VM is discarded")]
    Stream(#[from] StreamError),
    /// We refused the header or a frame (and told the source why).
    #[error("refused the migration: {0}")]
    Refused(String),
    /// The VM refused an operation.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// Pages differ from the source's final digests: the guest does not
    /// run here.
    #[error("{0} pages differ from the source's final memory; the guest does not run here")]
    Mismatch(u64),
    /// The guest's writes after resuming were not all in the dirty log, or
    /// did not continue the source's.
    #[error("after resuming: {lost} pages written but not logged, {regressed} pages behind the source's")]
    Resumed {
        /// Written, not in the log.
        lost: u64,
        /// Written with an older iteration than the source's highest.
        regressed: u64,
    },
    /// The guest wrote nothing in the time it ran here.
    #[error("the guest did not go on: nothing written in {0:?}")]
    NoProgress(Duration),
    /// The vCPUs did not pause for the check.
    #[error("the check after resuming could not pause the vCPUs")]
    Pause(#[from] shadow_mmu_testkit::vcpu_gate::PauseTimeout),
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
#[derive(Debug, Clone, Copy, Default)]
pub struct IncomingParams {
    /// How long the guest runs here before the check of its writes (0: no
    /// check; the guest only resumes).
    pub run_after: Duration,
}

/// Receives a migration on `conn`; `build` makes the VM from the header
/// (an `Err` is sent back as the refusal). On success the guest has run
/// `params.run_after` here and passed the checks; its VM is returned,
/// paused, with the statistics.
pub fn migrate_incoming(
    conn: &TcpStream,
    build: &mut dyn FnMut(&Header) -> Result<IncomingVm, String>,
    params: &IncomingParams,
) -> Result<(IncomingStats, Box<dyn PassVm>), IncomingFailure> {
    let mut stats = IncomingStats { status: "active".into(), ..IncomingStats::default() };
    let mut vm = None;
    let r = receive(conn, build, params, &mut stats, &mut vm);
    match r {
        Ok(()) => {
            stats.status = "completed".into();
            Ok((stats, vm.expect("a completed migration has its VM")))
        }
        Err(error) => {
            if let IncomingError::Refused(why) = &error {
                let mut w = conn;
                let _ = write_frame(&mut w, &Frame::Refuse { why: why.clone() });
                let _ = w.flush();
            }
            stats.status = "failed".into();
            stats.error = Some(error_chain(&error));
            Err(IncomingFailure { error, stats: Box::new(stats) })
        }
    }
}

/// The whole receive, filling `stats` and `out`.
fn receive(
    conn: &TcpStream,
    build: &mut dyn FnMut(&Header) -> Result<IncomingVm, String>,
    params: &IncomingParams,
    stats: &mut IncomingStats,
    out: &mut Option<Box<dyn PassVm>>,
) -> Result<(), IncomingError> {
    // The handshakes are small frames that must not wait on Nagle.
    conn.set_nodelay(true).map_err(StreamError::Io)?;
    // A small buffer: a frame's payload, larger, is read past it.
    let mut r = Counting { r: BufReader::with_capacity(64 << 10, conn), n: 0 };
    let header = read_header(&mut r)?;
    stats.backend = format!("{} {}", header.backend, header.config);
    let IncomingVm { vm, dirty_rate, write_pct } = build(&header).map_err(IncomingError::Refused)?;
    let vm = out.insert(vm);
    let want = [SlotLayout { id: 0, guest_phys_addr: 0, pages: vm.pages() }];
    if header.page_size != 4096 || header.slots != want {
        return Err(IncomingError::Refused(format!(
            "memslot layout {:?} of {}-byte pages: this VM has {want:?} of 4096-byte pages",
            header.slots, header.page_size
        )));
    }
    let pages = vm.pages();
    let vcpus = vm.vcpu_gate().vcpus() as usize;
    let mut w = conn;
    write_frame(&mut w, &Frame::Ready)?;
    let mut digests: Vec<Option<u64>> = vec![None; pages as usize];
    // The digest of each page as loaded (its CRC, checked as the frame was
    // read), so that the final check only compares.
    let mut loaded: Vec<Option<u64>> = vec![None; pages as usize];
    let mut frames = FrameReader::borrowing();
    let mut mismatched = 0u64;
    let mut digests_begun = false;
    let mut verify = Duration::ZERO;
    let mut words = Vec::new();
    let mut states: Vec<Option<Vec<u8>>> = vec![None; vcpus];
    let zeros = vec![0u64; WORDS_PER_PAGE * crate::source::FRAME_PAGES as usize];
    loop {
        let f = frames.read(&mut r, header.page_size)?;
        stats.received_bytes = r.n;
        match f {
            Frame::Round { round } => stats.rounds = round + 1,
            Frame::Pages { slot, ranges, .. } => {
                check_ranges(slot, &ranges, pages)?;
                if digests_begun {
                    return Err(IncomingError::Refused("pages after the final digests".into()));
                }
                // Straight from the reader's buffer (a borrowing reader).
                words.clear();
                words.extend(
                    frames
                        .pages_data()
                        .chunks_exact(8)
                        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))),
                );
                let mut next = 0;
                for x in &ranges {
                    let n = x.pages as usize * WORDS_PER_PAGE;
                    let offset = x.first * 4096;
                    if x.zero {
                        for chunk in (0..n).step_by(zeros.len()) {
                            let len = zeros.len().min(n - chunk);
                            vm.write_guest(offset + chunk as u64 * 8, &zeros[..len])?;
                        }
                        for p in x.first..x.first + u64::from(x.pages) {
                            loaded[p as usize] = Some(zero_page_digest(p));
                        }
                        stats.duplicate_pages += u64::from(x.pages);
                    } else {
                        vm.write_guest(offset, &words[next..next + n])?;
                        // The page CRCs the reader checked are the digests
                        // of what was loaded.
                        let crcs = &frames.page_crcs()[next / WORDS_PER_PAGE..][..x.pages as usize];
                        for (p, &c) in (x.first..).zip(crcs) {
                            loaded[p as usize] = Some(digest_of(p, c));
                        }
                        next += n;
                        stats.normal_pages += u64::from(x.pages);
                    }
                }
            }
            Frame::Digest { slot, first, digests: d } => {
                let end = first.checked_add(d.len() as u64).filter(|&e| slot == 0 && e <= pages);
                if end.is_none() {
                    return Err(IncomingError::Refused(format!(
                        "digests of slot {slot} pages {first}.. ({}) outside its {pages} pages",
                        d.len()
                    )));
                }
                digests_begun = true;
                let t = Instant::now();
                for (i, v) in d.into_iter().enumerate() {
                    let p = first + i as u64;
                    mismatched += u64::from(loaded[p as usize] != Some(v));
                    digests[p as usize] = Some(v);
                }
                verify += t.elapsed();
            }
            Frame::VcpuState { vcpu, state } => {
                let slot = states.get_mut(vcpu as usize).ok_or_else(|| {
                    IncomingError::Refused(format!("a state for vCPU {vcpu}: this VM has {vcpus}"))
                })?;
                *slot = Some(state);
            }
            Frame::Done => break,
            other => {
                return Err(StreamError::Unexpected { expected: "pages or done", got: other.name() }.into());
            }
        }
    }

    // Every page checked against the source's digest, before anything runs:
    // a page with no digest counts as mismatched.
    mismatched += digests.iter().filter(|d| d.is_none()).count() as u64;
    stats.verify_ms = verify.as_secs_f64() * 1e3;
    stats.mismatched_pages = mismatched;
    if mismatched > 0 {
        write_frame(&mut w, &Frame::Ack { running: false })?;
        return Err(IncomingError::Mismatch(mismatched));
    }
    let Some(states) = states.into_iter().collect::<Option<Vec<_>>>() else {
        return Err(IncomingError::Refused(format!(
            "the stream ended without the state of all {vcpus} vCPUs"
        )));
    };
    if let Err(e) = vm.restore_vcpus(states) {
        return Err(IncomingError::Refused(error_chain(&e)));
    }
    vm.set_dirty_logging(true)?;
    stats.passes_at_resume = vm.passes_done();
    let floor = vm.iteration_floor();
    let mut pacer = Pacer::new(vm.as_ref(), dirty_rate, write_pct);
    // At least one pass here, even for a guest that migrated idle.
    pacer.at_least(vm.as_ref(), 1);
    write_frame(&mut w, &Frame::Ack { running: true })?;
    w.flush().map_err(StreamError::Io)?;

    if params.run_after.is_zero() {
        return Ok(());
    }
    // The log of the run: harvests every 20 ms, OR-ed (a ring must be
    // reaped as it fills; a bitmap may be harvested any time).
    let words = pages.div_ceil(64) as usize;
    let (mut bitmap, mut one) = (vec![0u64; words], vec![0u64; words]);
    // Pages caught behind the source at a collection, while the guest runs:
    // a later pass would write over a wrong value before the final check.
    let mut behind = vec![false; pages as usize];
    let mut collect = |vm: &mut Box<dyn PassVm>| -> Result<(), BackendError> {
        harvest(vm.as_mut(), &mut one)?;
        for (w, (b, &o)) in bitmap.iter_mut().zip(&one).enumerate() {
            *b |= o;
            let mut m = o;
            while m != 0 {
                let p = w as u64 * 64 + u64::from(m.trailing_zeros());
                m &= m - 1;
                behind[p as usize] |= running_page_behind(vm.as_ref(), p, floor, digests[p as usize]);
            }
        }
        Ok(())
    };
    let (t, mut last) = (Instant::now(), Instant::now());
    // At least `run_after`, and until the guest completed a pass here (a
    // loaded host can keep a vCPU thread off its CPU for a while), at most
    // ten times as long and two seconds more.
    let patience = params.run_after * 10 + Duration::from_secs(2);
    while t.elapsed() < params.run_after
        || (vm.passes_done() == stats.passes_at_resume && t.elapsed() < patience)
    {
        pacer.tick(vm.as_ref());
        if last.elapsed() >= Duration::from_millis(20) {
            collect(vm)?;
            last = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    stats.run_after_ms = t.elapsed().as_millis() as u64;
    vm.vcpu_gate().pause(PAUSE_WITHIN)?;
    stats.passes_after_run = vm.passes_done();
    collect(vm)?;
    let memory = vm.memory();
    // SAFETY: the vCPUs are paused (the gate's acquire ordered their stores
    // before us), and nothing else writes guest memory; `bytes` dies with
    // this function, before the caller stops or resumes them.
    let bytes = unsafe { quiescent_bytes(memory) };
    for p in 0..pages {
        if digests[p as usize] == Some(page_digest(bytes, p)) {
            continue;
        }
        stats.pages_written_after_resume += 1;
        if bitmap[(p / 64) as usize] & (1 << (p % 64)) == 0 {
            stats.lost_pages += 1;
        }
        let words = &memory[p as usize * WORDS_PER_PAGE..][..WORDS_PER_PAGE];
        // Relaxed: the vCPUs are paused (the gate's acquire ordered their
        // stores before us).
        let newest =
            words.iter().map(|x| vm.stored_iteration(x.load(std::sync::atomic::Ordering::Relaxed))).max();
        if newest.unwrap_or(0) < floor || behind[p as usize] {
            stats.regressed_pages += 1;
        }
    }
    if stats.lost_pages > 0 || stats.regressed_pages > 0 {
        return Err(IncomingError::Resumed { lost: stats.lost_pages, regressed: stats.regressed_pages });
    }
    if stats.pages_written_after_resume == 0 {
        return Err(IncomingError::NoProgress(params.run_after));
    }
    Ok(())
}

/// Is page `p` of a running guest, reported dirty, behind the source: moved
/// on from the source's final content (`digest`) yet holding no store of
/// iteration `floor` or later? Read with relaxed loads while the guest
/// runs: a store's word only grows, so a page that holds a good value is
/// never read as behind.
fn running_page_behind(vm: &dyn PassVm, p: u64, floor: u64, digest: Option<u64>) -> bool {
    let words = &vm.memory()[p as usize * WORDS_PER_PAGE..][..WORDS_PER_PAGE];
    let mut page = [0u8; WORDS_PER_PAGE * 8];
    let mut newest = 0;
    for (b, w) in page.chunks_exact_mut(8).zip(words) {
        // Relaxed: see above; the harvest that reported the page ordered the
        // store it reports before us.
        let v = w.load(std::sync::atomic::Ordering::Relaxed);
        newest = newest.max(vm.stored_iteration(v));
        b.copy_from_slice(&v.to_le_bytes());
    }
    newest < floor && digest != Some(digest_of(p, crc32c::crc32c(&page)))
}

/// Refuses ranges outside slot 0's `pages` pages.
fn check_ranges(slot: u32, ranges: &[PageRange], pages: u64) -> Result<(), IncomingError> {
    for x in ranges {
        let end = x.first.checked_add(u64::from(x.pages));
        if slot != 0 || end.is_none_or(|e| e > pages) {
            return Err(IncomingError::Refused(format!(
                "pages {}..+{} of slot {slot}: outside the VM's slot 0 of {pages} pages",
                x.first, x.pages
            )));
        }
    }
    Ok(())
}

/// Counts the bytes read.
struct Counting<R> {
    r: R,
    n: u64,
}

impl<R: std::io::Read> std::io::Read for Counting<R> {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        let n = self.r.read(b)?;
        self.n += n as u64;
        Ok(n)
    }
}

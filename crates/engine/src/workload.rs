//! Guest workloads: the access patterns of KVM's `dirty_log_perf_test` and
//! `dirty_log_test`, as [`GuestCode`].
//!
//! Each vCPU works on its own slice of guest memory (vCPU `v` of `n` gets
//! pages `[v*N/n, (v+1)*N/n)`), as `dirty_log_perf_test` gives each vCPU its
//! own region. A pass makes as many accesses as the slice has pages:
//! - [`AccessPattern::Seq`]: one access per page, in order (the perf test);
//! - [`AccessPattern::Random`]: uniformly random pages of the slice;
//! - [`AccessPattern::Hot`]: a share of the accesses goes to a hot set at the
//!   start of the slice, the rest uniformly.
//!
//! Each access is a store with probability `write_pct`%, else a load. vCPU
//! `v` always stores to word `v % 512` of a page, and every value it stores
//! is distinct and increasing ([`encode_value`]: the iteration read from the
//! host, the vCPU id, a per-vCPU sequence number), so each word has one
//! writer whose values only grow, and a checker can tell from a value which
//! iteration wrote it.
//!
//! # The cut (how the oracle gets a clean "before")
//!
//! The host bumps [`GuestControl::iteration`] and then waits until every
//! running vCPU has published, in its `seen` word, an access made with the
//! new iteration ([`GuestControl::cut`]). Since a vCPU publishes `seen` only
//! after its access has completed, every store tagged with an older
//! iteration is complete (and visible) when the cut returns. A vCPU that is
//! parked (between runs) publishes `PARKED`; on resume it first clears its
//! `seen` and then reads the iteration, both SeqCst, so that a resumed vCPU
//! cannot slip a store with an old tag past a cut.

use std::sync::Arc;
use std::time::Instant;

use crossbeam_utils::CachePadded;
use shadow_mmu_vmm::{DirtyPace, LockFaults, PACE_CHUNK_PAGES, chunk_bytes};

use crate::guest::{GuestCode, GuestOp};
use shadow_mmu_core::spte::{PAGE_SHIFT, WORDS_PER_PAGE};
use shadow_mmu_core::sync::Backoff;
use shadow_mmu_core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Hypercall code: the workload stopped because the host asked.
pub const HC_STOP: u64 = 1;
/// Hypercall code: a pass is done (only with `exit_each_pass`).
pub const HC_PASS_DONE: u64 = 2;
/// Hypercall code: a chunk of [`PACE_CHUNK_PAGES`] pass accesses is done
/// and a dirty rate is set ([`GuestControl::pace`]): the vCPU thread keeps
/// the pace ([`shadow_mmu_vmm::ChunkPacer`]).
pub const HC_CHUNK: u64 = 3;

/// `seen` value of a parked vCPU.
pub(crate) const PARKED: u64 = u64::MAX;

/// Bits of a value holding the sequence number.
const SEQ_BITS: u32 = 32;
/// Bits of a value holding the vCPU id.
const VCPU_BITS: u32 = 8;

/// Most vCPUs a workload supports (the id must fit its values).
pub const MAX_WORKLOAD_VCPUS: u32 = 1 << VCPU_BITS;

/// The value vCPU `vcpu` stores as its `seq`-th store in iteration `tag`.
#[inline]
pub const fn encode_value(tag: u64, vcpu: u32, seq: u32) -> u64 {
    (tag << (SEQ_BITS + VCPU_BITS)) | ((vcpu as u64) << SEQ_BITS) | seq as u64
}

/// The iteration a stored value was written in (0: never written).
#[inline]
pub const fn value_tag(v: u64) -> u64 {
    v >> (SEQ_BITS + VCPU_BITS)
}

/// The vCPU that wrote a value.
#[inline]
pub const fn value_vcpu(v: u64) -> u32 {
    ((v >> SEQ_BITS) & ((1 << VCPU_BITS) - 1)) as u32
}

/// Which pages a vCPU touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessPattern {
    /// Every page of the slice in order.
    Seq,
    /// Uniformly random pages of the slice.
    Random,
    /// `hot_access_pct`% of accesses to the first `hot_pages_pct`% of the
    /// slice, the rest uniform.
    Hot {
        /// Share of the slice that is hot, in percent (1..=100).
        hot_pages_pct: u8,
        /// Share of accesses to the hot set, in percent (0..=100).
        hot_access_pct: u8,
    },
}

impl std::fmt::Display for AccessPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AccessPattern::Seq => write!(f, "seq"),
            AccessPattern::Random => write!(f, "random"),
            AccessPattern::Hot { hot_pages_pct, hot_access_pct } => {
                write!(f, "hot({hot_access_pct}% of accesses to {hot_pages_pct}% of pages)")
            }
        }
    }
}

/// A workload, the same for every vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkloadSpec {
    /// Access pattern.
    pub pattern: AccessPattern,
    /// Share of accesses that are stores, in percent (0..=100).
    pub write_pct: u8,
    /// Address spaces the vCPUs rotate through (1: stay in address space 0).
    pub address_spaces: u16,
    /// Accesses between address space switches, when there are several.
    pub switch_every: u32,
    /// Return to the host (`HC_PASS_DONE`) after each pass.
    pub exit_each_pass: bool,
    /// Seed of the vCPUs' random choices.
    pub seed: u64,
    /// Faults that need `mmu_lock`, paced while the host says logging is on
    /// ([`GuestControl::set_lock_faults`]): the guest makes the fresh and
    /// split touches (`ReserveTouches`); the invalidations are the host's
    /// (`crate::notifier_thread`).
    pub lock_faults: LockFaults,
    /// The last this many vCPUs only load (`PassSpec::compute_vcpus`).
    pub compute_vcpus: u32,
}

impl Default for WorkloadSpec {
    fn default() -> Self {
        Self {
            pattern: AccessPattern::Seq,
            write_pct: 100,
            address_spaces: 1,
            switch_every: 1 << 12,
            exit_each_pass: false,
            seed: 1,
            lock_faults: LockFaults::default(),
            compute_vcpus: 0,
        }
    }
}

/// What the host and the guest programs share: the iteration number the
/// guests tag their stores with, a stop flag, and each vCPU's `seen` word.
#[derive(Debug)]
pub struct GuestControl {
    iteration: AtomicU64,
    stop: AtomicBool,
    /// The guests make their [`LockFaults`] touches (logging is on).
    lock_faults_on: AtomicBool,
    seen: Box<[CachePadded<AtomicU64>]>,
    /// Each vCPU's accesses, published every `PROGRESS_EVERY`.
    progress: Box<[CachePadded<AtomicU64>]>,
    /// The dirty rate inside passes, and the bytes stored.
    pace: Arc<DirtyPace>,
}

/// Accesses between two publications of a guest's progress.
const PROGRESS_EVERY: u64 = 64;

impl GuestControl {
    /// For `vcpus` vCPUs, at iteration 1, all parked; a dirty-limit held
    /// at chunk exits.
    pub fn new(vcpus: u32) -> Arc<Self> {
        Self::with_pace(vcpus, DirtyPace::new(vcpus, false))
    }

    /// As [`Self::new`], with `pace`.
    pub fn with_pace(vcpus: u32, pace: DirtyPace) -> Arc<Self> {
        Arc::new(Self {
            iteration: AtomicU64::new(1),
            stop: AtomicBool::new(false),
            lock_faults_on: AtomicBool::new(false),
            seen: (0..vcpus).map(|_| CachePadded::new(AtomicU64::new(PARKED))).collect(),
            progress: (0..vcpus).map(|_| CachePadded::new(AtomicU64::new(0))).collect(),
            pace: Arc::new(pace),
        })
    }

    /// The guests' dirty rate inside passes.
    pub fn pace(&self) -> &Arc<DirtyPace> {
        &self.pace
    }

    /// The current iteration.
    pub fn iteration(&self) -> u64 {
        // Relaxed: only the host writes it; the host reads its own value.
        self.iteration.load(Ordering::Relaxed)
    }

    /// Raises the iteration to at least `n`, for guests that continue a
    /// migrated workload (`WorkloadGuest::restore`), before any vCPU runs.
    pub(crate) fn raise_iteration(&self, n: u64) {
        // SeqCst: as `cut`'s store (the host's cuts come later, ordered by
        // the release that lets the vCPUs run).
        self.iteration.fetch_max(n, Ordering::SeqCst);
    }

    /// Asks the guests to stop at their next access.
    pub fn request_stop(&self) {
        // Relaxed: the stop is observed eventually; the host joins the vCPU
        // threads, which orders everything after.
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Has a stop been requested?
    pub fn stop_requested(&self) -> bool {
        // Relaxed: see `request_stop`.
        self.stop.load(Ordering::Relaxed)
    }

    /// The guests' accesses so far, all vCPUs (each as of its last
    /// publication, at most `PROGRESS_EVERY` behind): their progress.
    pub fn accesses(&self) -> u64 {
        // Relaxed: a statistic; no data is read through it.
        self.progress.iter().map(|p| p.load(Ordering::Relaxed)).sum()
    }

    /// Starts or stops the guests' [`LockFaults`] touches: the host turns
    /// them on with dirty logging and off with it.
    pub fn set_lock_faults(&self, on: bool) {
        // Relaxed: a pacing switch; no data is published with it (the
        // touches are ordinary stores, logged whenever they land).
        self.lock_faults_on.store(on, Ordering::Relaxed);
    }

    /// Marks vCPU `vcpu` parked, for a vCPU thread that stopped running its
    /// guest program without the program parking itself (an error exit).
    pub fn park(&self, vcpu: u32) {
        // Release: as a guest's own parking (`WorkloadGuest::park`).
        self.seen[vcpu as usize].store(PARKED, Ordering::Release);
    }

    /// Starts a new iteration and waits until no store tagged with an older
    /// one is in flight (module docs). Returns the last old iteration: every
    /// store tagged with it or earlier is complete and visible.
    pub fn cut(&self) -> u64 {
        let old = self.iteration.load(Ordering::Relaxed);
        let new = old + 1;
        // SeqCst: pairs with a resuming vCPU's SeqCst clear of `seen` and load
        // of `iteration` (store buffering): either we see its cleared `seen`
        // and wait, or it reads the new iteration.
        self.iteration.store(new, Ordering::SeqCst);
        for seen in self.seen.iter() {
            let backoff = Backoff::new();
            // SeqCst (at least acquire): pairs with the release publication of
            // `seen` after a completed access, making that access's store
            // visible to us.
            while seen.load(Ordering::SeqCst) < new {
                backoff.snooze();
            }
        }
        old
    }
}

/// Accesses between two reads of the clock by the pacing of
/// [`ReserveTouches`] (a clock read costs about what an access does).
const PACE_CHECK_EVERY: u32 = 16;

/// Touches a paced vCPU may owe after a wait: a guest held up (by a lock,
/// a throttle, a full ring) does not make up for lost time in a burst.
const PACE_BURST: f64 = 8.0;

/// Pages a 2 MiB page maps.
const PAGES_PER_HUGE_PAGE: u64 = 512;

/// One kind of reserve touch: first stores to the pages `[base, base+len)`
/// of the vCPU's reserve part, in order, paced at `per_sec`.
#[derive(Debug, Clone, Copy, Default)]
struct Touches {
    base: u64,
    len: u64,
    /// The next page, from 0; `len`: all touched (the part is exhausted).
    pos: u64,
    per_sec: u32,
    /// Touches owed (at most `PACE_BURST`).
    credit: f64,
}

impl Touches {
    fn refill(&mut self, secs: f64) {
        if self.per_sec > 0 && self.pos < self.len {
            self.credit = (self.credit + secs * f64::from(self.per_sec)).min(PACE_BURST);
        }
    }

    /// The next page to touch, if one is owed and left.
    fn take(&mut self) -> Option<u64> {
        if self.credit < 1.0 || self.pos >= self.len {
            return None;
        }
        self.credit -= 1.0;
        self.pos += 1;
        Some(self.base + self.pos - 1)
    }
}

/// The fresh and split touches of [`LockFaults`] in a vCPU's part of the
/// reserve (the pages right after the swept ones, split among the vCPUs as
/// their slices are): the fresh part first, never mapped; then the split
/// part, mapped with 2 MiB pages by one store per 2 MiB before the vCPU's
/// first pass (`prefault`), and touched page by page once logging is on.
#[derive(Debug, Clone, Default)]
struct ReserveTouches {
    fresh: Touches,
    split: Touches,
    /// The next split-part page the prefault stores to; `split.len`: done.
    prefault: u64,
    /// When the credits were last refilled (`None`: pacing is off).
    last: Option<Instant>,
    checks: u32,
}

impl ReserveTouches {
    fn new(lock: &LockFaults, slice_len: u64) -> Self {
        let fresh_len = match (lock.fresh_per_sec > 0, lock.split_per_sec > 0) {
            (true, true) => slice_len / 2,
            (true, false) => slice_len,
            (false, _) => 0,
        };
        let split_len = if lock.split_per_sec > 0 { slice_len - fresh_len } else { 0 };
        Self {
            fresh: Touches { base: 0, len: fresh_len, per_sec: lock.fresh_per_sec, ..Touches::default() },
            split: Touches {
                base: fresh_len,
                len: split_len,
                per_sec: lock.split_per_sec,
                ..Touches::default()
            },
            prefault: 0,
            last: None,
            checks: 0,
        }
    }

    /// The reserve page the next access goes to, if any: the prefault
    /// first, then, while `on`, a paced touch.
    fn next(&mut self, on: bool) -> Option<u64> {
        if self.prefault < self.split.len {
            let page = self.split.base + self.prefault;
            self.prefault += PAGES_PER_HUGE_PAGE;
            return Some(page);
        }
        if !on {
            self.last = None;
            return None;
        }
        self.checks = self.checks.wrapping_add(1);
        if self.checks.is_multiple_of(PACE_CHECK_EVERY) || self.last.is_none() {
            let now = Instant::now();
            if let Some(last) = self.last {
                let secs = now.duration_since(last).as_secs_f64();
                self.fresh.refill(secs);
                self.split.refill(secs);
            }
            self.last = Some(now);
        }
        self.fresh.take().or_else(|| self.split.take())
    }
}

/// The guest program of one vCPU.
#[derive(Debug)]
pub struct WorkloadGuest {
    spec: WorkloadSpec,
    vcpu: u32,
    base_gfn: u64,
    slice_start: u64,
    slice_len: u64,
    hot_len: u64,
    word_offset: u64,
    ctl: Arc<GuestControl>,
    rng: fastrand::Rng,
    pos: u64,
    seq: u32,
    /// The tag of the access whose completion we publish next, if any.
    pending_seen: Option<u64>,
    parked: bool,
    /// The pass just completed was reported (`HC_PASS_DONE`): the next
    /// access starts the next pass.
    pass_reported: bool,
    accesses: u64,
    /// Pass accesses and stores of the current chunk.
    chunk_accesses: u64,
    chunk_stores: u64,
    asid: u16,
    /// The reserve touches of `spec.lock_faults`.
    reserve: ReserveTouches,
    /// The first page of the vCPU's reserve part: its slice's first, past
    /// the swept pages.
    reserve_gfn: u64,
}

/// Words of a [`WorkloadGuest`]'s saved state.
pub(crate) const WORKLOAD_STATE_WORDS: usize = 10;

/// Touches of the reserve a guest made ([`WorkloadGuest::reserve_touches`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReserveCounts {
    /// First stores to never-mapped pages.
    pub fresh: u64,
    /// First stores to pages mapped with 2 MiB pages before logging.
    pub split: u64,
    /// Fresh touches asked for but not made: the vCPU's fresh part was all
    /// touched (a real guest would have run out of memory to allocate).
    pub fresh_exhausted: bool,
    /// ... and its split part.
    pub split_exhausted: bool,
}

impl std::ops::AddAssign for ReserveCounts {
    fn add_assign(&mut self, o: Self) {
        self.fresh += o.fresh;
        self.split += o.split;
        self.fresh_exhausted |= o.fresh_exhausted;
        self.split_exhausted |= o.split_exhausted;
    }
}

impl WorkloadGuest {
    /// vCPU `vcpu` of `vcpus`, on the guest pages `[base_gfn, base_gfn+npages)`,
    /// and, where `spec.lock_faults` needs it, the reserve of as many pages
    /// right after them (`LockFaults`).
    ///
    /// # Panics
    /// If `vcpu >= MAX_WORKLOAD_VCPUS`, `vcpus` exceeds the pages, or the
    /// percentages are out of range.
    pub fn new(
        spec: WorkloadSpec,
        vcpu: u32,
        vcpus: u32,
        base_gfn: u64,
        npages: u64,
        ctl: Arc<GuestControl>,
    ) -> Self {
        assert!(vcpu < vcpus && vcpus <= MAX_WORKLOAD_VCPUS, "vCPU {vcpu} of {vcpus}");
        assert!(u64::from(vcpus) <= npages, "{vcpus} vCPUs need at least as many pages");
        assert!(spec.write_pct <= 100, "write_pct {}", spec.write_pct);
        let spec = if shadow_mmu_vmm::is_compute_vcpu(vcpu, vcpus, spec.compute_vcpus) {
            WorkloadSpec { write_pct: 0, ..spec }
        } else {
            spec
        };
        let slice_start = npages * u64::from(vcpu) / u64::from(vcpus);
        let slice_end = npages * u64::from(vcpu + 1) / u64::from(vcpus);
        let slice_len = slice_end - slice_start;
        let hot_len = match spec.pattern {
            AccessPattern::Hot { hot_pages_pct, hot_access_pct } => {
                assert!((1..=100).contains(&hot_pages_pct) && hot_access_pct <= 100);
                (slice_len * u64::from(hot_pages_pct) / 100).max(1)
            }
            _ => slice_len,
        };
        let asid = (vcpu % u32::from(spec.address_spaces.max(1))) as u16;
        Self {
            rng: fastrand::Rng::with_seed(spec.seed ^ (u64::from(vcpu) << 32 | 0x9e37_79b9)),
            spec,
            vcpu,
            base_gfn,
            slice_start,
            slice_len,
            hot_len,
            word_offset: u64::from(vcpu) % WORDS_PER_PAGE as u64 * 8,
            ctl,
            pos: 0,
            seq: 0,
            pending_seen: None,
            parked: true,
            pass_reported: false,
            chunk_accesses: 0,
            chunk_stores: 0,
            accesses: 0,
            asid,
            reserve: ReserveTouches::new(&spec.lock_faults, slice_len),
            reserve_gfn: base_gfn + npages + slice_start,
        }
    }

    /// Everything that decides what this guest does next, between two
    /// accesses (none half done): for a migration's vCPU state. With it
    /// goes the iteration its stores are tagged with.
    pub fn save(&self) -> [u64; WORKLOAD_STATE_WORDS] {
        [
            self.pos,
            u64::from(self.seq),
            self.rng.get_seed(),
            self.accesses,
            u64::from(self.asid),
            u64::from(self.pass_reported),
            self.ctl.iteration(),
            self.reserve.fresh.pos,
            self.reserve.split.pos,
            self.reserve.prefault,
        ]
    }

    /// Continues from `state` (of [`Self::save`], on a guest of the same
    /// spec and slice): the next access is the one the saved guest would
    /// have made, with tags of at least the saved iteration. `None` (and
    /// nothing changed) if `state` does not fit this guest.
    pub fn restore(&mut self, state: &[u64; WORKLOAD_STATE_WORDS]) -> Option<()> {
        let [pos, seq, rng, accesses, asid, reported, iteration, fresh, split, prefault] = *state;
        let r = &self.reserve;
        if pos >= self.slice_len
            || asid >= u64::from(self.spec.address_spaces.max(1))
            || reported > 1
            || fresh > r.fresh.len
            || split > r.split.len
            || prefault > r.split.len + PAGES_PER_HUGE_PAGE
        {
            return None;
        }
        self.pos = pos;
        self.seq = u32::try_from(seq).ok()?;
        self.rng = fastrand::Rng::with_seed(rng);
        self.accesses = accesses;
        self.asid = asid as u16;
        self.pass_reported = reported == 1;
        self.reserve.fresh.pos = fresh;
        self.reserve.split.pos = split;
        self.reserve.prefault = prefault;
        self.ctl.raise_iteration(iteration);
        Some(())
    }

    /// Accesses made so far.
    pub fn accesses(&self) -> u64 {
        self.accesses
    }

    /// The reserve touches made so far.
    pub fn reserve_touches(&self) -> ReserveCounts {
        let r = &self.reserve;
        // Asked for and all touched: the pacing would have made more.
        let exhausted = |t: &Touches| t.per_sec > 0 && t.pos >= t.len;
        ReserveCounts {
            fresh: r.fresh.pos,
            split: r.split.pos,
            fresh_exhausted: exhausted(&r.fresh),
            split_exhausted: exhausted(&r.split),
        }
    }

    /// The guest physical address of word `vcpu % 512` in the slice's
    /// `index`-th page.
    fn gpa(&self, index: u64) -> u64 {
        ((self.base_gfn + self.slice_start + index) << PAGE_SHIFT) | self.word_offset
    }

    /// The same word in the `index`-th page of the vCPU's reserve part: the
    /// swept pages' count past its slice.
    fn reserve_gpa(&self, index: u64) -> u64 {
        ((self.reserve_gfn + index) << PAGE_SHIFT) | self.word_offset
    }

    /// The bytes the pass accesses since the last chunk stored (a page
    /// each), and a new chunk begins: at an `HC_CHUNK` or `HC_PASS_DONE`
    /// exit, for the vCPU thread's pace.
    pub fn take_chunk_bytes(&mut self) -> u64 {
        let bytes = chunk_bytes(self.chunk_stores, 100);
        (self.chunk_accesses, self.chunk_stores) = (0, 0);
        bytes
    }

    /// The vCPU left `run` with an exit of its own (a `DirtyRingFull`), not
    /// one of ours: the last access is complete, so park, that cuts do not
    /// wait for a vCPU that is not running. The next operation resumes as
    /// after any park (module docs).
    pub fn park_outside(&mut self) {
        self.pending_seen = None;
        self.parked = true;
        // Release: as in `park`.
        self.ctl.seen[self.vcpu as usize].store(PARKED, Ordering::Release);
    }

    fn park(&mut self, code: u64) -> GuestOp {
        self.parked = true;
        // Release: as the publication in `next_op`.
        self.ctl.seen[self.vcpu as usize].store(PARKED, Ordering::Release);
        GuestOp::Hypercall(code)
    }
}

impl GuestCode for WorkloadGuest {
    fn next_op(&mut self, _last_read: u64) -> GuestOp {
        let seen = &self.ctl.seen[self.vcpu as usize];
        if let Some(tag) = self.pending_seen.take() {
            // Release: our last access has completed; pairs with the SeqCst
            // load in `GuestControl::cut`.
            seen.store(tag, Ordering::Release);
        }
        // Relaxed: see `GuestControl::request_stop`.
        if self.ctl.stop.load(Ordering::Relaxed) {
            return self.park(HC_STOP);
        }
        if self.chunk_accesses == PACE_CHUNK_PAGES {
            if self.ctl.pace.on() {
                // The vCPU thread takes the chunk's bytes and its time.
                return self.park(HC_CHUNK);
            }
            self.ctl.pace.count(chunk_bytes(self.chunk_stores, 100));
            (self.chunk_accesses, self.chunk_stores) = (0, 0);
        }
        if self.spec.exit_each_pass && self.accesses > 0 && self.pos == 0 && !self.pass_reported {
            // Not `!parked`: a vCPU kicked out right after a pass's last
            // access parks too, and its pass must still be reported.
            self.pass_reported = true;
            return self.park(HC_PASS_DONE);
        }
        if std::mem::take(&mut self.parked) {
            // SeqCst: see the module docs (a resumed vCPU vs a cut).
            seen.store(0, Ordering::SeqCst);
        }
        if self.spec.address_spaces > 1
            && self.accesses > 0
            && self.accesses.is_multiple_of(u64::from(self.spec.switch_every))
        {
            self.asid = (self.asid + 1) % self.spec.address_spaces;
            self.accesses += 1;
            return GuestOp::SetAddressSpace(self.asid);
        }
        // SeqCst: see the module docs; after a resume this load must not be
        // satisfied before our clear of `seen` is visible.
        let tag = self.ctl.iteration.load(Ordering::SeqCst);
        if self.spec.lock_faults.needs_reserve() {
            // Relaxed: see `GuestControl::set_lock_faults`.
            let on = self.ctl.lock_faults_on.load(Ordering::Relaxed);
            if let Some(page) = self.reserve.next(on) {
                // Not a pass access: the sweep's position and count stay.
                self.pending_seen = Some(tag);
                self.seq = self.seq.wrapping_add(1);
                return GuestOp::Write(self.reserve_gpa(page), encode_value(tag, self.vcpu, self.seq));
            }
        }
        let index = match self.spec.pattern {
            AccessPattern::Seq => self.pos,
            AccessPattern::Random => self.rng.u64(..self.slice_len),
            AccessPattern::Hot { hot_access_pct, .. } => {
                if self.rng.u8(..100) < hot_access_pct {
                    self.rng.u64(..self.hot_len)
                } else {
                    self.rng.u64(..self.slice_len)
                }
            }
        };
        self.pos = (self.pos + 1) % self.slice_len;
        self.accesses += 1;
        self.chunk_accesses += 1;
        if self.accesses.is_multiple_of(PROGRESS_EVERY) {
            // Relaxed: see `GuestControl::accesses`.
            self.ctl.progress[self.vcpu as usize].store(self.accesses, Ordering::Relaxed);
        }
        self.pass_reported = false;
        self.pending_seen = Some(tag);
        let gpa = self.gpa(index);
        if self.spec.write_pct == 100 || self.rng.u8(..100) < self.spec.write_pct {
            self.seq = self.seq.wrapping_add(1);
            self.chunk_stores += 1;
            GuestOp::Write(gpa, encode_value(tag, self.vcpu, self.seq))
        } else {
            GuestOp::Read(gpa)
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn values_encode_tag_and_vcpu_and_grow() {
        let a = encode_value(3, 7, 10);
        assert_eq!(value_tag(a), 3);
        assert_eq!(value_vcpu(a), 7);
        assert!(encode_value(3, 7, 11) > a);
        assert!(encode_value(4, 7, 0) > a);
        assert_eq!(value_tag(0), 0);
    }

    #[test]
    fn seq_sweeps_its_slice_with_one_write_per_page() {
        let ctl = GuestControl::new(2);
        let spec = WorkloadSpec { exit_each_pass: true, ..WorkloadSpec::default() };
        let mut g = WorkloadGuest::new(spec, 1, 2, 100, 10, ctl);
        let mut gpas = Vec::new();
        loop {
            match g.next_op(0) {
                GuestOp::Write(gpa, v) => {
                    assert_eq!(value_vcpu(v), 1);
                    assert_eq!(value_tag(v), 1);
                    gpas.push(gpa);
                }
                GuestOp::Hypercall(HC_PASS_DONE) => break,
                other => panic!("{other:?}"),
            }
        }
        let want: Vec<u64> = (105..110).map(|gfn| (gfn << 12) | 8).collect();
        assert_eq!(gpas, want, "vCPU 1 of 2 owns pages 5..10, word 1");
    }

    #[test]
    fn write_pct_and_hot_set_shape_the_stream() {
        let ctl = GuestControl::new(1);
        let spec = WorkloadSpec {
            pattern: AccessPattern::Hot { hot_pages_pct: 10, hot_access_pct: 90 },
            write_pct: 30,
            ..WorkloadSpec::default()
        };
        let mut g = WorkloadGuest::new(spec, 0, 1, 0, 1000, ctl);
        let (mut writes, mut hot, n) = (0, 0, 20_000);
        for _ in 0..n {
            let gpa = match g.next_op(0) {
                GuestOp::Write(gpa, _) => {
                    writes += 1;
                    gpa
                }
                GuestOp::Read(gpa) => gpa,
                other => panic!("{other:?}"),
            };
            hot += u32::from(gpa >> 12 < 100);
        }
        // Binomial(20000, p): 10 standard deviations either side.
        assert!((5350..=6650).contains(&writes), "writes {writes}");
        assert!((17_700..=18_500).contains(&hot), "hot {hot}");
    }

    #[test]
    fn reserve_touches_prefault_then_pace_fresh_pages_in_order_while_on() {
        let ctl = GuestControl::new(1);
        let lock = LockFaults { fresh_per_sec: u32::MAX, split_per_sec: u32::MAX, invalidations_per_sec: 0 };
        let spec = WorkloadSpec { lock_faults: lock, ..WorkloadSpec::default() };
        let mut g = WorkloadGuest::new(spec, 0, 1, 0, 4096, ctl.clone());
        let mut page = || match g.next_op(0) {
            GuestOp::Write(gpa, _) => gpa >> PAGE_SHIFT,
            other => panic!("{other:?}"),
        };
        // The split part (the reserve's second half) is mapped first, one
        // store per 2 MiB, before the sweep and with logging off.
        let prefault: Vec<u64> = (0..4).map(|_| page()).collect();
        assert_eq!(prefault, [6144, 6656, 7168, 7680]);
        assert!((0..100).all(|_| page() < 4096), "logging off: the sweep only");
        ctl.set_lock_faults(true);
        let seen: Vec<u64> = (0..200).map(|_| page()).filter(|&p| p >= 4096).collect();
        assert!(seen.len() >= 8, "paced touches: {seen:?}");
        let fresh: Vec<u64> = seen.iter().copied().filter(|&p| p < 6144).collect();
        assert_eq!(fresh, (4096..4096 + fresh.len() as u64).collect::<Vec<_>>(), "in order, each once");
        let saved = g.save();
        let counts = g.reserve_touches();
        assert_eq!(counts.fresh + counts.split, seen.len() as u64);
        let mut h = WorkloadGuest::new(spec, 0, 1, 0, 4096, GuestControl::new(1));
        assert!(h.restore(&saved).is_some());
        assert_eq!(h.reserve_touches(), counts, "the positions travel with the state");
    }

    #[test]
    fn address_spaces_rotate() {
        let ctl = GuestControl::new(1);
        let spec = WorkloadSpec { address_spaces: 3, switch_every: 2, ..WorkloadSpec::default() };
        let mut g = WorkloadGuest::new(spec, 0, 1, 0, 8, ctl);
        let switches: Vec<u16> = (0..12)
            .filter_map(|_| match g.next_op(0) {
                GuestOp::SetAddressSpace(a) => Some(a),
                _ => None,
            })
            .collect();
        assert_eq!(&switches[..3], &[1, 2, 0]);
    }

    #[test]
    fn cut_waits_for_running_vcpus_only() {
        let ctl = GuestControl::new(2);
        // Both parked: the cut returns at once.
        assert_eq!(ctl.cut(), 1);
        let mut g = WorkloadGuest::new(WorkloadSpec::default(), 0, 2, 0, 4, ctl.clone());
        assert!(matches!(g.next_op(0), GuestOp::Write(_, v) if value_tag(v) == 2));
        // vCPU 0 is running with an access of tag 2 in flight: a cut must wait
        // until it publishes an access tagged 3.
        let cutter = {
            let ctl = ctl.clone();
            std::thread::spawn(move || ctl.cut())
        };
        while ctl.iteration() < 3 {
            std::hint::spin_loop();
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(!cutter.is_finished());
        // Completes tag 2 (publishes 2), then makes an access with tag 3.
        assert!(matches!(g.next_op(0), GuestOp::Write(_, v) if value_tag(v) == 3));
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(!cutter.is_finished(), "the tag-3 access has not completed yet");
        // Completing it publishes 3.
        ctl.request_stop();
        assert_eq!(g.next_op(0), GuestOp::Hypercall(HC_STOP));
        assert_eq!(cutter.join().unwrap(), 2);
    }
}

//! A VMM can migrate its own VM with this crate: the VM here is written in
//! this test, plain memory and a dirty log kept by its one vCPU thread, with
//! no engine and no test workload behind it. It implements the `vmm` traits
//! the migration needs and migrates between two threads over loopback; the
//! destination checks every page against the source's final digests, and
//! its vCPU goes on from the state the source's saved.

use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use shadow_mmu_migrate::dest::{IncomingParams, migrate_incoming};
use shadow_mmu_migrate::refusal::Refusal;
use shadow_mmu_migrate::source::{Outcome, OutgoingParams, migrate_outgoing};
use shadow_mmu_migrate::stream::{Frame, Header, PAGE_BYTES, SlotLayout, read_frame, write_frame};
use shadow_mmu_migrate::{DestHooks, SourceHooks};
use shadow_mmu_vmm::vcpu_gate::{decode_words, encode_words};
use shadow_mmu_vmm::{
    BackendError, Capabilities, DirtyLog, GuestMemory, HarvestProbe, PassExtras, VcpuControl, VcpuGate,
    check_guest_access, check_vcpu_states,
};

const PAGES: u64 = 256;
const WORDS: usize = 512;

/// What the VM and its vCPU thread share.
struct Shared {
    memory: Vec<AtomicU64>,
    dirty: Vec<AtomicU64>,
    logging: AtomicBool,
    started: AtomicBool,
    stop: AtomicBool,
    gate: Arc<VcpuGate>,
    /// The value of the vCPU's last store.
    last: AtomicU64,
}

impl Shared {
    fn mark(&self, page: u64) {
        // Acquire: pairs with `set_dirty_logging`'s release (a clean log
        // before the first bit).
        if self.logging.load(Ordering::Acquire) {
            // Release: after the page's data; pairs with the harvest's swap.
            self.dirty[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::Release);
        }
    }
}

/// A VM of `PAGES` pages whose vCPU stores 1, 2, 3... into word 0 of pages
/// 0, 1, 2... in turn, round and round.
struct ToyVm {
    shared: Arc<Shared>,
    vcpu: Option<JoinHandle<()>>,
}

impl ToyVm {
    /// A VM whose vCPU waits for `start` (the destination's) or runs at once.
    fn new(run: bool) -> Self {
        let shared = Arc::new(Shared {
            memory: (0..PAGES as usize * WORDS).map(|_| AtomicU64::new(0)).collect(),
            dirty: (0..PAGES.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            logging: AtomicBool::new(false),
            started: AtomicBool::new(run),
            stop: AtomicBool::new(false),
            // The vCPU looks at the pause request between stores: no kick.
            gate: Arc::new(VcpuGate::new(1, Box::new(|| {}))),
            last: AtomicU64::new(0),
        });
        let s = shared.clone();
        let vcpu = std::thread::spawn(move || {
            let mut next = 1u64;
            // Acquire (stop, started): pair with the host's release stores;
            // they carry no data but the request.
            while !s.stop.load(Ordering::Acquire) {
                s.gate.apply_restore(0, |state| next = decode_words(state, 1).expect("a checked state")[0]);
                if s.gate.pause_requested() {
                    s.gate.hold(0, || encode_words(&[next]), || s.stop.load(Ordering::Acquire));
                    continue;
                }
                if !s.started.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_micros(100));
                    continue;
                }
                let page = (next - 1) % PAGES;
                // Relaxed: guest data, published by `mark`'s release.
                s.memory[page as usize * WORDS].store(next, Ordering::Relaxed);
                s.mark(page);
                // Relaxed: a progress count for the test, no data behind it.
                s.last.store(next, Ordering::Relaxed);
                next += 1;
                if next.is_multiple_of(64) {
                    std::thread::sleep(Duration::from_micros(50));
                }
            }
        });
        Self { shared, vcpu: Some(vcpu) }
    }

    fn refuse(&self, op: &'static str, why: &'static str) -> BackendError {
        BackendError::new("toy", op, why)
    }
}

impl GuestMemory for ToyVm {
    fn pages(&self) -> u64 {
        PAGES
    }

    fn memory(&self) -> &[AtomicU64] {
        &self.shared.memory
    }

    fn read_guest(&self, offset: u64, out: &mut [u64]) -> Result<(), BackendError> {
        check_guest_access(PAGES, offset, out.len())
            .map_err(|e| BackendError::new("toy", "read_guest", e))?;
        for (o, w) in out.iter_mut().zip(&self.shared.memory[offset as usize / 8..]) {
            // Relaxed: guest data, as KVM's host reads are.
            *o = w.load(Ordering::Relaxed);
        }
        Ok(())
    }

    fn write_guest(&mut self, offset: u64, words: &[u64]) -> Result<(), BackendError> {
        check_guest_access(PAGES, offset, words.len())
            .map_err(|e| BackendError::new("toy", "write_guest", e))?;
        for (i, &w) in words.iter().enumerate() {
            let at = offset as usize / 8 + i;
            // Relaxed: guest data, published by `mark`'s release.
            self.shared.memory[at].store(w, Ordering::Relaxed);
            self.shared.mark((at / WORDS) as u64);
        }
        Ok(())
    }
}

impl DirtyLog for ToyVm {
    fn name(&self) -> String {
        "toy".into()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }

    fn set_dirty_logging(&mut self, on: bool) -> Result<(), BackendError> {
        // Relaxed: published by the release store of the flag below.
        self.shared.dirty.iter().for_each(|w| w.store(0, Ordering::Relaxed));
        // Release: pairs with `mark`'s acquire.
        self.shared.logging.store(on, Ordering::Release);
        Ok(())
    }

    fn get_dirty_log(&mut self, bitmap: &mut [u64]) -> Result<u64, BackendError> {
        if !self.shared.logging.load(Ordering::Acquire) {
            return Err(self.refuse("get_dirty_log", "logging is off"));
        }
        let mut n = 0;
        for (b, w) in bitmap.iter_mut().zip(&self.shared.dirty) {
            // Acquire: pairs with the vCPU's release after the data.
            *b = w.swap(0, Ordering::Acquire);
            n += u64::from(b.count_ones());
        }
        Ok(n)
    }

    fn clear_dirty_log(&mut self, _first_page: u64, _bitmap: &[u64]) -> Result<(), BackendError> {
        Err(self.refuse("clear_dirty_log", "no manual protect"))
    }

    fn harvest_dirty_ring(&mut self, _out: &mut Vec<u64>) -> Result<u64, BackendError> {
        Err(self.refuse("harvest_dirty_ring", "no dirty ring"))
    }
}

impl VcpuControl for ToyVm {
    fn vcpu_gate(&self) -> Arc<VcpuGate> {
        self.shared.gate.clone()
    }

    fn restore_vcpus(&self, states: Vec<Vec<u8>>) -> Result<(), BackendError> {
        check_vcpu_states(&states, 1, "toy", |s| decode_words(s, 1).map(|_| ()).ok_or("not a toy state"))?;
        self.shared.gate.restore(states);
        match self.shared.gate.wait_restored(Duration::from_secs(5)) {
            true => Ok(()),
            false => Err(self.refuse("restore_vcpus", "the vCPU did not take its state")),
        }
    }

    fn stop(&mut self) -> Result<PassExtras, BackendError> {
        // Release: pairs with the vCPU's acquire.
        self.shared.stop.store(true, Ordering::Release);
        self.shared.gate.resume();
        if let Some(t) = self.vcpu.take() {
            t.join().map_err(|_| self.refuse("stop", "the vCPU thread panicked"))?;
        }
        Ok(PassExtras::default())
    }
}

impl HarvestProbe for ToyVm {}

impl Drop for ToyVm {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// The destination's start: let the vCPU run.
struct Start;

impl DestHooks<ToyVm> for Start {
    fn start(&mut self, vm: &mut ToyVm) {
        // Release: pairs with the vCPU's acquire.
        vm.shared.started.store(true, Ordering::Release);
    }
}

/// The source's: nothing to drive, the vCPU runs by itself.
struct Nothing;

impl SourceHooks<ToyVm> for Nothing {}

/// The stream's header for a `ToyVm`: one slot of `PAGES` pages.
fn toy_header() -> Header {
    let slots = vec![SlotLayout { id: 0, guest_phys_addr: 0, pages: PAGES }];
    Header::new("toy".into(), String::new(), slots)
}

#[test]
fn a_vm_of_the_vmm_s_own_migrates_page_by_page() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let dest = std::thread::spawn(move || {
        let mut build = |h: &Header| {
            assert_eq!(h.slots, [SlotLayout { id: 0, guest_phys_addr: 0, pages: PAGES }]);
            Ok(Box::new(ToyVm::new(false)))
        };
        migrate_incoming(&listener, &mut build, &IncomingParams::default(), &mut Start)
    });
    let mut vm = ToyVm::new(true);
    // Let it dirty memory first. Relaxed (here and below): a progress count.
    while vm.shared.last.load(Ordering::Relaxed) < 2 * PAGES {
        std::thread::yield_now();
    }
    let conn = TcpStream::connect(addr).unwrap();
    let header = toy_header();
    let stats = match migrate_outgoing(&mut vm, &conn, &header, &OutgoingParams::default(), &mut Nothing) {
        Outcome::Completed(s) => s,
        other => panic!("{other:?}"),
    };
    // The source stopped where the destination goes on.
    let stopped_at = vm.shared.last.load(Ordering::Relaxed);
    vm.stop().unwrap();
    let incoming = dest.join().unwrap().unwrap_or_else(|e| panic!("{}", shadow_mmu_vmm::error_chain(&e)));
    assert_eq!(incoming.stats.mismatched_pages, Some(0), "every page matched the source's digest");
    assert!(stats.rounds.len() >= 2 && stats.downtime_ms.is_some(), "{stats:?}");
    let toy = incoming.vm;
    let t = Instant::now();
    while toy.shared.last.load(Ordering::Relaxed) <= stopped_at {
        assert!(t.elapsed() < Duration::from_secs(10), "the guest goes on at the destination");
        std::thread::yield_now();
    }
    // It went on from the state it stopped in: its first store here is the
    // one after the source's last.
    let first_here = (stopped_at % PAGES) as usize * WORDS;
    assert!(toy.shared.memory[first_here].load(Ordering::Relaxed) > stopped_at);
}

/// A VM that cannot hold its vCPUs one by one refuses a dirty-limit with a
/// clear error before any page goes, and runs on.
#[test]
fn a_dirty_limit_the_vm_cannot_keep_is_refused_and_the_source_runs_on() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let dest = std::thread::spawn(move || {
        let mut build = |_: &Header| Ok(Box::new(ToyVm::new(false)));
        migrate_incoming(&listener, &mut build, &IncomingParams::default(), &mut Start).map(|_| ())
    });
    let mut vm = ToyVm::new(true);
    let conn = TcpStream::connect(addr).unwrap();
    let header = toy_header();
    let params = OutgoingParams { dirty_limit: Some(1 << 20), ..OutgoingParams::default() };
    let e = match migrate_outgoing(&mut vm, &conn, &header, &params, &mut Nothing) {
        Outcome::RunsOn(f) => f,
        other => panic!("{other:?}"),
    };
    let why = shadow_mmu_vmm::error_chain(&e);
    assert!(why.contains("dirty-limit") && why.contains("held one by one"), "{why}");
    assert_eq!(e.stats.normal_pages, 0, "refused before any page");
    drop(conn);
    assert!(dest.join().unwrap().is_err(), "the destination discards its partial VM");
    // Still running: it stores on.
    let before = vm.shared.last.load(Ordering::Relaxed);
    let t = Instant::now();
    while vm.shared.last.load(Ordering::Relaxed) == before {
        assert!(t.elapsed() < Duration::from_secs(10), "the source runs on");
        std::thread::yield_now();
    }
    vm.stop().unwrap();
}

/// A destination that says `Ready`, then refuses while the source measures
/// the round trip (as it refuses extra streams it found wrong): the source
/// reports the refusal, not an unexpected frame, and runs on.
#[test]
fn a_refusal_after_ready_is_the_source_s_error() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let dest = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        assert!(matches!(read_frame(&mut c, PAGE_BYTES).unwrap(), Frame::Header(_)));
        write_frame(&mut c, &Frame::Ready).unwrap();
        loop {
            match read_frame(&mut c, PAGE_BYTES).unwrap() {
                Frame::Heartbeat { .. } => continue,
                Frame::Ping { .. } => break,
                other => panic!("{other:?}"),
            }
        }
        write_frame(&mut c, &Frame::Refuse { why: Refusal::Busy }).unwrap();
        // Held open until the source has read the refusal and closed.
        while read_frame(&mut c, PAGE_BYTES).is_ok() {}
    });
    let mut vm = ToyVm::new(true);
    let conn = TcpStream::connect(addr).unwrap();
    let header = toy_header();
    let e = match migrate_outgoing(&mut vm, &conn, &header, &OutgoingParams::default(), &mut Nothing) {
        Outcome::RunsOn(f) => f,
        other => panic!("{other:?}"),
    };
    let why = shadow_mmu_vmm::error_chain(&e);
    assert!(why.contains("this destination is busy with another migration"), "{why}");
    drop(conn);
    dest.join().unwrap();
    vm.stop().unwrap();
}

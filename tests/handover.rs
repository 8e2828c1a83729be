//! The handover between two real `migrate` processes, under every fault
//! of docs/migration.md's table: the acknowledgement lost, corrupted,
//! delayed or cut off; a partition in the setup, in round 0, in a later
//! round, in the stop-and-copy and after the commit; either process killed,
//! or stopped for longer than the deadline, at each phase boundary. A
//! proxy thread between the two (frame by frame) injects the link's
//! faults; the processes stop themselves at a phase (`--stop-at`) for the
//! test to kill or continue them.
//!
//! Each case asserts the handover's two properties from what each side
//! reports (its JSON, its exit code, or that it was killed, and where):
//! - at most one side ever runs the guest: never a source whose VM runs
//!   (`source_vm: running`) beside a destination that started it;
//! - the protocol never loses it: a source that discarded its copy on its
//!   own did so because the destination runs the guest;
//!
//! and the status each side must report. A source left in `postmigrate`
//! is settled as an operator would, through its control socket.

#[cfg(feature = "break-rules")]
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The progress timeout and settle window of every case, s.
const P: u64 = 2;
const SETTLE: u64 = 3;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_shadow-mmu"))
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("shadow-mmu-handover-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

// ---------------------------------------------------------------------------
// The proxy: forwards frames both ways, and breaks one as a rule says.

/// A direction through the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    ToDest,
    ToSource,
}

/// What a rule does to the frame it matches.
#[derive(Debug, Clone, Copy)]
enum Act {
    Drop,
    Corrupt,
    Delay(Duration),
    /// From this frame on, nothing flows either way on any connection (the
    /// sockets stay open) until healed.
    Partition,
    /// Both sides of the connection are closed.
    Close,
}

/// The `nth` frame of `kind` going `dir` on the migration's connection.
#[derive(Debug, Clone, Copy)]
struct Rule {
    dir: Dir,
    kind: u8,
    nth: usize,
    act: Act,
}

// The stream's frame kinds (crates/migrate/src/stream.rs).
const ROUND: u8 = 2;
const PAGES: u8 = 3;
const DIGEST: u8 = 4;
const READY: u8 = 9;
const RUNNING: u8 = 11;

#[derive(Default)]
struct ProxyState {
    partitioned: bool,
    closed: bool,
    seen: usize,
    /// When the rule fired.
    fired: Option<Instant>,
}

struct Proxy {
    addr: SocketAddr,
    state: Arc<(Mutex<ProxyState>, Condvar)>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    fn start(upstream: SocketAddr, rule: Rule) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        l.set_nonblocking(true).unwrap();
        let state = Arc::new((Mutex::new(ProxyState::default()), Condvar::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut index = 0;
            while !sp.load(Ordering::Relaxed) {
                let Ok((client, _)) = l.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                client.set_nonblocking(false).unwrap();
                let st = st.clone();
                let first = index == 0;
                index += 1;
                std::thread::spawn(move || {
                    // A partition holds new connections too.
                    wait_healed(&st);
                    let Ok(up) = TcpStream::connect(upstream) else { return };
                    let rule = first.then_some(rule);
                    let (c2, u2) = (client.try_clone().unwrap(), up.try_clone().unwrap());
                    let s2 = st.clone();
                    std::thread::spawn(move || forward(c2, u2, Dir::ToDest, rule, &s2));
                    forward(up, client, Dir::ToSource, rule, &st);
                });
            }
        });
        Self { addr, state, stop }
    }

    fn heal(&self) {
        let (m, cv) = &*self.state;
        m.lock().unwrap().partitioned = false;
        cv.notify_all();
    }

    fn fired(&self) -> Option<Instant> {
        self.state.0.lock().unwrap().fired
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let (m, cv) = &*self.state;
        let mut s = m.lock().unwrap();
        s.partitioned = false;
        s.closed = true;
        cv.notify_all();
    }
}

fn wait_healed(st: &(Mutex<ProxyState>, Condvar)) -> bool {
    let (m, cv) = st;
    let mut s = m.lock().unwrap();
    while s.partitioned && !s.closed {
        s = cv.wait(s).unwrap();
    }
    !s.closed
}

/// Copies frames from `from` to `to`, applying `rule` (on the migration's
/// connection) as they pass.
fn forward(
    mut from: TcpStream,
    mut to: TcpStream,
    dir: Dir,
    rule: Option<Rule>,
    st: &(Mutex<ProxyState>, Condvar),
) {
    let shut = |a: &TcpStream, b: &TcpStream| {
        let _ = a.shutdown(std::net::Shutdown::Both);
        let _ = b.shutdown(std::net::Shutdown::Both);
    };
    loop {
        let mut head = [0u8; 8];
        if from.read_exact(&mut head).is_err() {
            wait_healed(st);
            let _ = to.shutdown(std::net::Shutdown::Write);
            return;
        }
        let len = u32::from_le_bytes(head[..4].try_into().unwrap()) as usize;
        let mut payload = vec![0u8; len];
        if from.read_exact(&mut payload).is_err() {
            // A partition holds a close too: nothing crosses it.
            wait_healed(st);
            return shut(&from, &to);
        }
        let mut delay = None;
        if let Some(r) = rule.filter(|r| r.dir == dir && payload.first() == Some(&r.kind)) {
            let mut s = st.0.lock().unwrap();
            s.seen += 1;
            if s.seen == r.nth {
                s.fired = Some(Instant::now());
                match r.act {
                    Act::Drop => continue,
                    Act::Corrupt => payload[1] ^= 0x10,
                    Act::Delay(d) => delay = Some(d),
                    Act::Partition => s.partitioned = true,
                    Act::Close => {
                        drop(s);
                        return shut(&from, &to);
                    }
                }
            }
        }
        if let Some(d) = delay {
            std::thread::sleep(d);
        }
        if !wait_healed(st) {
            return shut(&from, &to);
        }
        if to.write_all(&head).and_then(|_| to.write_all(&payload)).is_err() {
            return shut(&from, &to);
        }
    }
}

// ---------------------------------------------------------------------------
// The processes.

/// What the test does to a process stopped at its `--stop-at` phase.
#[derive(Debug, Clone, Copy)]
enum Fate {
    Kill,
    /// SIGCONT after this long.
    StopFor(Duration),
}

/// What the operator does to a source left in `postmigrate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Operator {
    /// Ask the destination again (it will answer).
    Query,
    /// The destination is known dead, and never started the guest.
    Resume,
    /// The destination started the guest, then died.
    Discard,
}

/// One fault between two processes, and what each side must report.
#[derive(Debug, Clone)]
struct Case {
    name: String,
    backend: &'static str,
    guest_mib: u32,
    source_args: Vec<&'static str>,
    rule: Option<Rule>,
    /// Heal a partition this long after it began.
    heal: Option<Duration>,
    source_at: Option<(String, Fate)>,
    dest_at: Option<(String, Fate)>,
    operator: Option<Operator>,
    /// Allowed source statuses ("killed" for a killed one).
    source: &'static [&'static str],
    /// Allowed destination statuses ("killed" for a killed one).
    dest: &'static [&'static str],
    /// What the source's and the destination's output must say.
    source_says: Option<&'static str>,
    dest_says: Option<&'static str>,
    /// Both must end within this long of the fault (partitions).
    bounded: Option<Duration>,
    /// The guest's dirty rate, MiB/s (`None`: flat out).
    dirty_rate: Option<&'static str>,
}

impl Case {
    fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            backend: "engine",
            guest_mib: 8,
            source_args: Vec::new(),
            rule: None,
            heal: None,
            source_at: None,
            dest_at: None,
            operator: None,
            source: &["completed"],
            dest: &["completed"],
            source_says: None,
            dest_says: None,
            bounded: None,
            dirty_rate: Some("16"),
        }
    }
}

/// A spawned process, its output in files.
struct Proc {
    child: Child,
    out: PathBuf,
    json: PathBuf,
    killed: bool,
    code: Option<i32>,
}

impl Proc {
    fn spawn(cmd: &mut Command, tag: &str) -> Self {
        let out = scratch(&format!("{tag}.out"));
        let json = scratch(&format!("{tag}.json"));
        let _ = std::fs::remove_file(&json);
        let f = std::fs::File::create(&out).unwrap();
        let child = cmd.arg("--json").arg(&json).stdout(f.try_clone().unwrap()).stderr(f).spawn().unwrap();
        Self { child, out, json, killed: false, code: None }
    }

    fn text(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Whether it is stopped (SIGSTOP).
    fn stopped(&self) -> bool {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('T'))
    }

    fn exited(&mut self) -> bool {
        if self.code.is_none()
            && let Some(s) = self.child.try_wait().unwrap()
        {
            self.code = Some(s.code().unwrap_or(-1));
        }
        self.code.is_some()
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) has no memory-safety preconditions; the pid is our
        // child's, not yet reaped.
        unsafe { libc::kill(self.pid(), sig) };
    }

    fn status(&self) -> String {
        if self.killed {
            return "killed".into();
        }
        let v: serde_json::Value = std::fs::read_to_string(&self.json)
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or(serde_json::Value::Null);
        let v = if v["source"].is_object() { &v["source"] } else { &v };
        v["status"].as_str().unwrap_or("no report").to_string()
    }

    fn json(&self) -> serde_json::Value {
        std::fs::read_to_string(&self.json)
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default()
    }
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits for `p` to stop at its phase, then kills or continues it.
fn apply(p: &mut Proc, fate: Fate, name: &str) {
    wait_for(&format!("{name}: the process stops at its phase"), Duration::from_secs(30), || {
        p.stopped() || p.exited()
    });
    assert!(!p.exited(), "{name}: it ended before its phase:\n{}", p.text());
    match fate {
        Fate::Kill => {
            p.signal(libc::SIGKILL);
            p.killed = true;
        }
        Fate::StopFor(d) => {
            std::thread::sleep(d);
            p.signal(libc::SIGCONT);
        }
    }
}

fn control(socket: &Path, action: &str) -> String {
    let out = bin().args(["migrate", "control", "--socket"]).arg(socket).arg(action).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// Runs `c` and checks it.
fn run(c: &Case) {
    let tag = c.name.replace(' ', "-");
    let mut dest_cmd = bin();
    dest_cmd.args(["migrate", "incoming", "--listen", "127.0.0.1:0", "--run-after-ms", "200"]);
    dest_cmd.args(["--progress-timeout-s", &P.to_string()]);
    if let Some((phase, _)) = &c.dest_at {
        dest_cmd.args(["--stop-at", phase]);
    }
    let mut dest = Proc::spawn(&mut dest_cmd, &format!("{tag}-dest"));
    let mut addr = String::new();
    wait_for(&format!("{}: the destination listens", c.name), Duration::from_secs(20), || {
        addr = dest.text().lines().find_map(|l| l.strip_prefix("listening on ")).unwrap_or("").to_string();
        !addr.is_empty()
    });
    let proxy = c.rule.map(|r| Proxy::start(addr.parse().unwrap(), r));
    let to = proxy.as_ref().map_or(addr.clone(), |p| p.addr.to_string());
    let socket = scratch(&format!("{tag}.sock"));
    let mut src_cmd = bin();
    src_cmd.args(["migrate", "outgoing", "--to", &to, "--backend", c.backend]);
    src_cmd.args(["--guest-mib", &c.guest_mib.to_string(), "--warmup-ms", "50"]);
    if let Some(rate) = c.dirty_rate {
        src_cmd.args(["--dirty-rate-mibps", rate]);
    }
    src_cmd.args(["--progress-timeout-s", &P.to_string(), "--settle-timeout-s", &SETTLE.to_string()]);
    src_cmd.arg("--control-socket").arg(&socket).args(&c.source_args);
    if let Some((phase, _)) = &c.source_at {
        src_cmd.args(["--stop-at", phase]);
    }
    let start = Instant::now();
    let mut src = Proc::spawn(&mut src_cmd, &format!("{tag}-source"));
    if let Some((_, fate)) = c.source_at {
        apply(&mut src, fate, &c.name);
    }
    if let Some((_, fate)) = c.dest_at {
        apply(&mut dest, fate, &c.name);
    }
    // Until both end: the operator settles a source in postmigrate, a
    // partition heals once the source has given up.
    let mut operated = false;
    let limit = Duration::from_secs(60);
    loop {
        let (s, d) = (src.killed || src.exited(), dest.killed || dest.exited());
        if s && d {
            break;
        }
        if start.elapsed() > limit {
            let _ = src.child.kill();
            let _ = dest.child.kill();
            panic!(
                "{}: still running after {limit:?}:\nsource:\n{}\ndestination:\n{}",
                c.name,
                src.text(),
                dest.text()
            );
        }
        let text = src.text();
        if let (Some(p), Some(after)) = (&proxy, c.heal)
            && p.fired().is_some_and(|f| f.elapsed() >= after)
        {
            p.heal();
        }
        if !s && !operated && text.contains("paused in postmigrate") {
            let op = c.operator.unwrap_or_else(|| panic!("{}: an unexpected postmigrate:\n{text}", c.name));
            let action = match op {
                Operator::Query => "query",
                Operator::Resume => "resume",
                Operator::Discard => "discard",
            };
            let reply = control(&socket, action);
            if op == Operator::Query && reply.contains("still unknown") {
                // The destination may still be starting up from a stop.
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
            operated = true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let ended = start.elapsed();
    let (s_status, d_status) = (src.status(), dest.status());
    let report = format!(
        "{}: source {s_status} (exit {:?}), destination {d_status} (exit {:?})\nsource:\n{}\ndestination:\n{}",
        c.name,
        src.code,
        dest.code,
        src.text(),
        dest.text()
    );
    // The two properties.
    let sj = src.json();
    let source_vm = sj["source"]["source_vm"].as_str().unwrap_or("").to_string();
    let source_runs = !src.killed && source_vm == "running";
    let dest_ran = d_status == "completed"
        || (dest.killed && c.dest_at.as_ref().is_some_and(|(p, _)| p == "running-sent"));
    assert!(!(source_runs && dest_ran), "both sides run the guest: {report}");
    if source_vm == "discarded" && sj["source"]["operator_action"].is_null() {
        assert!(dest_ran, "the source discarded the guest, and the destination never ran it: {report}");
    }
    // What each side reports.
    assert!(c.source.contains(&s_status.as_str()), "source status: {report}");
    assert!(c.dest.contains(&d_status.as_str()), "destination status: {report}");
    let code = |status: &str| match status {
        "completed" => 0,
        "unknown" => 3,
        _ => 1,
    };
    if !src.killed {
        assert_eq!(src.code, Some(code(&s_status)), "source exit code: {report}");
        // A failure reads as one: what was not measured is null, not 0.
        if s_status != "completed" {
            assert!(sj["source"]["downtime_ms"].is_null(), "{report}");
        }
    }
    if !dest.killed {
        assert_eq!(dest.code, Some(code(&d_status)), "destination exit code: {report}");
        let dj = dest.json();
        let unchecked = dest.text().contains("mismatched pages: not checked");
        assert_eq!(dj["mismatched_pages"].is_null(), unchecked, "{report}");
        if d_status == "failed" {
            assert_eq!(dj["check_after_resume"], "not-run", "{report}");
        }
    }
    if src.text().contains("paused in postmigrate") {
        // It asked the destination before it gave up.
        assert!(src.text().contains("the last try: asking 127.0.0.1:"), "{report}");
    }
    if let Some(w) = c.source_says {
        assert!(src.text().contains(w), "the source should say {w:?}: {report}");
    }
    if let Some(w) = c.dest_says {
        assert!(dest.text().contains(w), "the destination should say {w:?}: {report}");
    }
    if let Some(b) = c.bounded {
        let fault = proxy.as_ref().and_then(Proxy::fired).expect("the fault happened").duration_since(start);
        let took = ended.saturating_sub(fault);
        assert!(took <= b, "{}: ended {took:?} after the fault (bound {b:?}): {report}", c.name);
    }
    // Each error once.
    for p in [&src, &dest] {
        let t = p.text();
        let errors: Vec<&str> = t.lines().filter(|l| l.starts_with("error: ")).collect();
        let mut unique = errors.clone();
        unique.dedup();
        assert_eq!(errors.len(), unique.len(), "an error printed twice: {report}");
    }
}

/// Runs `cases` a few at a time.
fn run_all(cases: Vec<Case>) {
    let cases = Arc::new(Mutex::new(cases));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..3)
        .map(|_| {
            let (cases, failures) = (cases.clone(), failures.clone());
            std::thread::spawn(move || {
                loop {
                    let Some(c) = cases.lock().unwrap().pop() else { return };
                    if let Err(e) = std::panic::catch_unwind(|| run(&c)) {
                        let why = e.downcast_ref::<String>().cloned().unwrap_or_else(|| format!("{e:?}"));
                        failures.lock().unwrap().push(why);
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let f = failures.lock().unwrap();
    assert!(f.is_empty(), "{} cases failed:\n\n{}", f.len(), f.join("\n\n"));
}

// ---------------------------------------------------------------------------
// The cases.

/// A clean migration between two processes, in each design (and the
/// `tdp` design with PML and without eager split).
fn design_cases() -> Vec<Case> {
    let designs: [&[&'static str]; 5] = [
        &["--mmu", "locked"],
        &["--mmu", "lockless"],
        &["--mmu", "rmap-lock"],
        &["--mmu", "tdp"],
        &["--mmu", "tdp", "--pml", "--no-eager-split"],
    ];
    designs
        .iter()
        .map(|a| Case { source_args: a.to_vec(), ..Case::new(format!("design {}", a[1..].join(" "))) })
        .collect()
}

fn ack_cases(backend: &'static str) -> Vec<Case> {
    let rule = |act| Some(Rule { dir: Dir::ToSource, kind: RUNNING, nth: 1, act });
    let late = Duration::from_secs(P + 1);
    [
        ("lost", Act::Drop),
        ("corrupted", Act::Corrupt),
        ("delayed past the deadline", Act::Delay(late)),
        ("cut off", Act::Close),
    ]
    .into_iter()
    .map(|(what, act)| Case {
        backend,
        rule: rule(act),
        // The source asks over a new connection and hears `Running`.
        source: &["completed"],
        dest: &["completed"],
        ..Case::new(format!("{backend} ack {what}"))
    })
    // A frame of round 0 corrupted on the way: the destination refuses it
    // and the source prints the destination's cause, not a reset.
    .chain([Case {
        backend,
        rule: Some(Rule { dir: Dir::ToDest, kind: PAGES, nth: 1, act: Act::Corrupt }),
        source: &["failed"],
        dest: &["failed"],
        source_says: Some(
            "the destination refused the migration: its stream failed: frame checksum mismatch",
        ),
        dest_says: Some("frame checksum mismatch"),
        ..Case::new(format!("{backend} a corrupt frame"))
    }])
    .collect()
}

fn partition_cases(backend: &'static str) -> Vec<Case> {
    let part = |dir, kind, nth| Some(Rule { dir, kind, nth, act: Act::Partition });
    // Within the progress timeout of the fault, plus a drain and a margin.
    let bound = Some(Duration::from_secs(3 * P + 3));
    // Each side says the other went silent; the source runs on, the
    // destination never ran the guest.
    let failed = |name: &str, rule, extra: Vec<&'static str>, mib| Case {
        backend,
        rule,
        guest_mib: mib,
        source_args: extra,
        source: &["failed"],
        dest: &["failed"],
        source_says: Some("no progress from the destination for 2 s"),
        dest_says: Some("no progress from the source for 2 s"),
        bounded: bound,
        ..Case::new(format!("{backend} partition {name}"))
    };
    vec![
        failed("in the setup", part(Dir::ToSource, READY, 1), vec![], 8),
        failed("in round 0", part(Dir::ToDest, PAGES, 2), vec![], 32),
        // Flat out with no downtime allowed: it never converges (a steady
        // guest may dirty nothing between two syncs, and converge at once).
        Case {
            dirty_rate: None,
            ..failed("in a later round", part(Dir::ToDest, ROUND, 2), vec!["--downtime-limit-ms", "0"], 8)
        },
        failed("in the stop-and-copy", part(Dir::ToDest, DIGEST, 1), vec![], 8),
        // After the commit: the destination runs the guest. Healed while
        // the source asks, the source hears so.
        Case {
            backend,
            rule: part(Dir::ToSource, RUNNING, 1),
            heal: Some(Duration::from_secs(P + 1)),
            source: &["completed"],
            dest: &["completed"],
            ..Case::new(format!("{backend} partition after the commit, healed"))
        },
        // For good: the source cannot know; the operator, who knows the
        // destination runs the guest, discards the source's copy.
        Case {
            backend,
            rule: part(Dir::ToSource, RUNNING, 1),
            operator: Some(Operator::Discard),
            source: &["unknown"],
            dest: &["completed"],
            source_says: Some("paused in postmigrate"),
            ..Case::new(format!("{backend} partition after the commit, for good"))
        },
    ]
}

/// The source's phase boundaries.
const SOURCE_PHASES: [&str; 7] = [
    "ready-received",
    "round-0-sent",
    "paused",
    "done-sent",
    "verified-received",
    "commit-sent",
    "running-received",
];
/// The destination's.
const DEST_PHASES: [&str; 7] = [
    "header-received",
    "ready-sent",
    "round-0-begun",
    "done-received",
    "verified-sent",
    "commit-received",
    "running-sent",
];

fn source_cases(kill: bool) -> Vec<Case> {
    let fate = if kill { Fate::Kill } else { Fate::StopFor(Duration::from_secs(P + 1)) };
    SOURCE_PHASES
        .iter()
        .map(|&phase| {
            let committed = matches!(phase, "commit-sent" | "running-received");
            let (source, dest): (&'static [&'static str], &'static [&'static str]) = match (kill, committed) {
                (true, true) => (&["killed"], &["completed"]),
                (true, false) => (&["killed"], &["failed"]),
                (false, true) => (&["completed"], &["completed"]),
                // It wakes to the destination's refusal (or its silence).
                (false, false) => (&["failed"], &["failed"]),
            };
            Case {
                source_at: Some((phase.to_string(), fate)),
                source,
                dest,
                ..Case::new(format!("source {} at {phase}", if kill { "killed" } else { "stopped" }))
            }
        })
        .collect()
}

fn dest_cases(kill: bool) -> Vec<Case> {
    // Stopped past the settle window, so that the source is in postmigrate
    // when the destination goes on.
    let fate = if kill { Fate::Kill } else { Fate::StopFor(Duration::from_secs(P + SETTLE + 2)) };
    DEST_PHASES
        .iter()
        .map(|&phase| {
            let mut c = Case {
                dest_at: Some((phase.to_string(), fate)),
                ..Case::new(format!("destination {} at {phase}", if kill { "killed" } else { "stopped" }))
            };
            match (kill, phase) {
                // Before `Verified`: the source resumes.
                (true, "header-received" | "ready-sent" | "round-0-begun" | "done-received") => {
                    (c.source, c.dest) = (&["failed"], &["killed"]);
                }
                // `Verified` may have reached it: it committed, then heard
                // nothing (or it resumed, if the kill beat `Verified`). The
                // operator knows the destination died before starting the
                // guest.
                (true, "verified-sent" | "commit-received") => {
                    (c.source, c.dest, c.operator) =
                        (&["unknown", "failed"], &["killed"], Some(Operator::Resume));
                }
                // It started the guest, then died: the source completed,
                // or (the reset beat `Running`) the operator discards.
                (true, _) => {
                    (c.source, c.dest, c.operator) =
                        (&["completed", "unknown"], &["killed"], Some(Operator::Discard));
                }
                (false, "header-received" | "ready-sent" | "round-0-begun" | "done-received") => {
                    (c.source, c.dest) = (&["failed"], &["failed"]);
                }
                // The source committed and asked in vain: postmigrate. When
                // the destination goes on, a stale query may abort it before
                // it reads the commit, or the commit starts the guest:
                // either way the operator's query settles it, consistently.
                (false, "verified-sent" | "commit-received") => {
                    (c.source, c.dest, c.operator) =
                        (&["completed", "failed"], &["completed", "failed"], Some(Operator::Query));
                    c.source_says = Some("paused in postmigrate");
                }
                // Just after `Running`: the source completed; the
                // destination runs the guest when it goes on.
                (false, _) => (c.source, c.dest) = (&["completed"], &["completed"]),
            }
            c
        })
        .collect()
}

#[test]
fn a_migration_between_two_processes_completes_in_every_design() {
    run_all(design_cases());
}

#[test]
fn the_acknowledgement_lost_corrupted_delayed_or_cut_off() {
    run_all(ack_cases("engine"));
}

#[test]
fn a_partition_in_each_phase() {
    run_all(partition_cases("engine"));
}

#[test]
fn the_source_killed_or_stopped_at_each_phase_boundary() {
    let mut cases = source_cases(true);
    cases.extend(source_cases(false));
    run_all(cases);
}

#[test]
fn the_destination_killed_or_stopped_at_each_phase_boundary() {
    let mut cases = dest_cases(true);
    cases.extend(dest_cases(false));
    run_all(cases);
}

/// Every fault above, and the clean migrations, over four page streams
/// (`--connections 4`): the proxy's rule acts on the migration's own
/// connection, its partitions on all of them. Where one side must say the
/// other went silent, it may instead hear the other close one of the
/// streams (the other gave up first, and its close crossed the healed
/// partition on a stream this side was not reading): either is the cause.
#[test]
fn every_fault_over_four_page_streams() {
    let mut cases = design_cases();
    cases.extend(ack_cases("engine"));
    cases.extend(partition_cases("engine"));
    cases.extend(source_cases(true));
    cases.extend(dest_cases(true));
    for c in &mut cases {
        c.source_args.extend(["--connections", "4"]);
        c.name += ", 4 streams";
        if c.dest_says.is_some_and(|s| s.starts_with("no progress from the source")) {
            c.dest_says = None;
        }
    }
    run_all(cases);
}

#[test]
fn on_kvm_the_acknowledgement_and_partitions() {
    if !shadow_mmu_kvm::usable_or_skip() {
        return;
    }
    let mut cases = ack_cases("kvm");
    cases.extend(partition_cases("kvm"));
    run_all(cases);
}

/// The `break-rules` switch `source_resumes_without_answer`, in the real
/// driver: with the acknowledgement lost, a source that resumes without
/// asking runs the guest beside the destination that started it. (The
/// model in `crates/migrate/src/handover/model.rs` finds it too.)
#[test]
#[cfg(feature = "break-rules")]
fn a_source_that_resumes_without_an_answer_runs_the_guest_twice() {
    use shadow_mmu_core::breakage::Breakage;
    use shadow_mmu_engine::EngineBackend;
    use shadow_mmu_migrate::source::{Outcome, OutgoingParams};
    use shadow_mmu_migrate::stream::{Header, SlotLayout};
    use shadow_mmu_vmm::{Backend, PassSpec};

    for broken in [false, true] {
        let tag = format!("break-rules-{broken}");
        let mut dest_cmd = bin();
        dest_cmd.args(["migrate", "incoming", "--listen", "127.0.0.1:0", "--run-after-ms", "100"]);
        let mut dest = Proc::spawn(&mut dest_cmd, &tag);
        let mut addr = String::new();
        wait_for("the destination listens", Duration::from_secs(20), || {
            addr =
                dest.text().lines().find_map(|l| l.strip_prefix("listening on ")).unwrap_or("").to_string();
            !addr.is_empty()
        });
        let proxy = Proxy::start(
            addr.parse().unwrap(),
            Rule { dir: Dir::ToSource, kind: RUNNING, nth: 1, act: Act::Drop },
        );
        let spec = PassSpec::sweep(1, 8 << 20, 3);
        let mut vm = EngineBackend::default().start_passes(&spec).unwrap();
        vm.release(1);
        vm.wait_passes(0).unwrap();
        let desc = serde_json::json!({
            "backend": "engine", "mmu": "lockless", "fast_page_fault": true, "dirty_log": "get",
            "initially_set": false, "ring_entries": 1 << 12, "harvest_threads": 1,
            "clear_chunk_pages": 262144, "vcpus": 1, "guest_bytes": 8 << 20,
            "random": false, "write_pct": 100, "seed": 3, "dirty_rate": 16 << 20,
        });
        let slots = vec![SlotLayout { id: 0, guest_phys_addr: 0, pages: vm.pages() }];
        let header = Header::new("engine".into(), desc.to_string(), slots);
        let breakage = Breakage { source_resumes_without_answer: broken, ..Breakage::SEED };
        let params = OutgoingParams {
            progress_timeout: Duration::from_secs(1),
            settle_timeout: Duration::from_secs(2),
            breakage,
            ..OutgoingParams::default()
        };
        let conn = TcpStream::connect(proxy.addr).unwrap();
        let outcome = common::migrate(&mut vm, &conn, &header, &params, None);
        let source_runs = matches!(outcome, Outcome::RunsOn(_));
        vm.stop().unwrap();
        wait_for("the destination ends", Duration::from_secs(20), || dest.exited());
        let dest_ran = dest.status() == "completed";
        assert!(dest_ran, "{}", dest.text());
        assert_eq!(source_runs && dest_ran, broken, "broken {broken}: {outcome:?}");
    }
}

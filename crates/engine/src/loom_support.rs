//! What every loom model here needs (built only under `cfg(all(test, loom))`).
//!
//! - [`check`] runs a model with a default preemption bound of 3 (what CI
//!   runs; `LOOM_MAX_PREEMPTIONS` overrides it) and fails unless the model
//!   saw at least two distinct outcomes: loom 0.7 explores nothing when a
//!   spawned thread starts with an atomic load (tokio-rs/loom#392), and a
//!   model that is not explored must not pass.
//! - [`two`] runs two closures on spawned threads, each starting with an RMW
//!   on a shared counter, the other half of the #392 workaround; the main
//!   thread only joins.

use std::collections::BTreeSet;
use std::fmt::Debug;

use loom::sync::Arc;
use loom::sync::atomic::{AtomicUsize, Ordering};

/// Runs model `f` over every interleaving loom explores; each execution
/// returns its outcome.
pub(crate) fn check<T: Debug + Send + 'static>(f: impl Fn() -> T + Sync + Send + 'static) {
    let outcomes = std::sync::Arc::new(std::sync::Mutex::new(BTreeSet::new()));
    let all = outcomes.clone();
    let mut b = loom::model::Builder::new();
    if b.preemption_bound.is_none() {
        b.preemption_bound = Some(3);
    }
    b.check(move || {
        let o = f();
        all.lock().unwrap().insert(format!("{o:?}"));
    });
    let n = outcomes.lock().unwrap().len();
    assert!(n >= 2, "the model saw a single outcome: loom explored nothing");
}

/// Runs `a` and `b` on two spawned threads and joins them.
pub(crate) fn two<A, B>(
    a: impl FnOnce() -> A + Send + 'static,
    b: impl FnOnce() -> B + Send + 'static,
) -> (A, B)
where
    A: Send + 'static,
    B: Send + 'static,
{
    let go = Arc::new(AtomicUsize::new(0));
    let go2 = go.clone();
    let ta = loom::thread::spawn(move || {
        go.fetch_add(1, Ordering::Relaxed);
        a()
    });
    let tb = loom::thread::spawn(move || {
        go2.fetch_add(1, Ordering::Relaxed);
        b()
    });
    (ta.join().unwrap(), tb.join().unwrap())
}

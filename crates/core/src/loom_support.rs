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

/// A loom limitation our models work around (tokio-rs/loom#282). One thread
/// stores 0 then 2; another compare-exchanges 1 to 3 from the initial value
/// of one. In the C++ model the final value is always 2: a successful RMW
/// reads the value just before its own write in modification order, so it
/// cannot follow the store of 2 and still see the initial value. Loom 0.7 lets
/// the compare-exchange succeed last. This test expects loom's wrong answer:
/// if loom is fixed, it fails, and the swaps in
/// `mmu::lockless`'s `loom_shadow_page_reused_under_a_walker` can go back to
/// plain stores.
#[cfg(test)]
mod loom_probe {
    use loom::sync::Arc;
    use loom::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

    #[test]
    #[should_panic(expected = "final value")]
    fn loom_rmw_modification_order_limitation() {
        loom::model(|| {
            let x = Arc::new(AtomicU64::new(1));
            let go = Arc::new(AtomicUsize::new(0));
            let (x1, g1) = (x.clone(), go.clone());
            let a = loom::thread::spawn(move || {
                g1.fetch_add(1, Ordering::Relaxed);
                let _ = x1.load(Ordering::Relaxed);
                x1.store(0, Ordering::Release);
                x1.store(2, Ordering::Release);
            });
            let (x2, g2) = (x.clone(), go.clone());
            let b = loom::thread::spawn(move || {
                g2.fetch_add(1, Ordering::Relaxed);
                let _ = x2.compare_exchange(1, 3, Ordering::AcqRel, Ordering::Relaxed);
            });
            a.join().unwrap();
            b.join().unwrap();
            assert_eq!(x.load(Ordering::SeqCst), 2, "final value");
        });
    }
}

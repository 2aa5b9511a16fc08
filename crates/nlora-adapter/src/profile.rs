//! Where a step's wall time goes, op by op (`nlora bench --profile`).
//!
//! On the CPU every op runs to completion on the calling thread (the rayon
//! work inside it included), so timing each op's forward and backward on
//! that thread attributes the step's wall time exactly; what no scope
//! covers is candle's own ops and graph bookkeeping. Scopes nest: a scope
//! records its self time (children excluded), so the table sums to at most
//! the step. Off by default; a disabled scope costs one relaxed atomic load.
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static ENABLED: AtomicBool = AtomicBool::new(false);
static TABLE: Mutex<BTreeMap<&'static str, (Duration, u64)>> = Mutex::new(BTreeMap::new());

thread_local! {
    /// Time spent in child scopes of each open scope, innermost last.
    static CHILDREN: RefCell<Vec<Duration>> = const { RefCell::new(Vec::new()) };
}

/// Starts or stops recording (the table is kept; see [`take`]).
pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Times the rest of the enclosing block under `name`, when recording.
#[must_use = "the scope ends when the guard is dropped"]
pub fn scope(name: &'static str) -> Option<Scope> {
    if !ENABLED.load(Ordering::Relaxed) {
        return None;
    }
    CHILDREN.with(|c| c.borrow_mut().push(Duration::ZERO));
    Some(Scope {
        name,
        start: Instant::now(),
    })
}

/// An open scope; records its self time when dropped.
pub struct Scope {
    name: &'static str,
    start: Instant,
}

impl Drop for Scope {
    fn drop(&mut self) {
        let total = self.start.elapsed();
        let children = CHILDREN.with(|c| {
            let mut c = c.borrow_mut();
            let own = c.pop().unwrap_or_default();
            if let Some(parent) = c.last_mut() {
                *parent += total;
            }
            own
        });
        if let Ok(mut t) = TABLE.lock() {
            let e = t.entry(self.name).or_default();
            e.0 += total.saturating_sub(children);
            e.1 += 1;
        }
    }
}

/// One row of the table: op name, self time, number of calls.
#[derive(Debug, Clone, PartialEq)]
pub struct OpTime {
    pub name: &'static str,
    pub seconds: f64,
    pub calls: u64,
}

/// The recorded table, largest self time first; clears it.
pub fn take() -> Vec<OpTime> {
    let table = match TABLE.lock() {
        Ok(mut t) => std::mem::take(&mut *t),
        Err(_) => BTreeMap::new(),
    };
    let mut rows: Vec<OpTime> = table
        .into_iter()
        .map(|(name, (d, calls))| OpTime {
            name,
            seconds: d.as_secs_f64(),
            calls,
        })
        .collect();
    rows.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spin(d: Duration) {
        let t = Instant::now();
        while t.elapsed() < d {}
    }

    // One test touches the global table, so no parallel test can interleave.
    #[test]
    fn nested_scopes_record_self_time_and_disabled_records_nothing() {
        {
            let _s = scope("disabled");
        }
        assert!(take().is_empty(), "a disabled scope must record nothing");

        enable(true);
        let wall = Instant::now();
        {
            let _outer = scope("outer");
            spin(Duration::from_millis(20));
            {
                let _inner = scope("inner");
                spin(Duration::from_millis(40));
            }
            let _inner2 = scope("inner");
            spin(Duration::from_millis(10));
        }
        let wall = wall.elapsed().as_secs_f64();
        enable(false);
        let rows = take();
        let get = |n: &str| rows.iter().find(|r| r.name == n).cloned().unwrap();
        let (outer, inner) = (get("outer"), get("inner"));
        assert_eq!((outer.calls, inner.calls), (1, 2));
        assert_eq!(rows[0].name, "inner", "largest self time first");
        // inner's 50 ms must not be counted again in outer's self time
        assert!(inner.seconds >= 0.050, "{inner:?}");
        assert!(outer.seconds >= 0.020, "{outer:?}");
        assert!(
            outer.seconds + inner.seconds <= wall,
            "{rows:?} in {wall} s"
        );
        assert!(take().is_empty(), "take clears the table");
    }
}

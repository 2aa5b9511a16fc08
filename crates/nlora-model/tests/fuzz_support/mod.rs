//! Shared by the fuzz tests of nlora-model, nlora-data and nlora-train (the other crates
//! include this file with `#[path]`): a counting allocator that measures the memory one
//! input costs, the case count (`PROPTEST_CASES` overrides it), and the run summary that
//! docs/RELIABILITY.md quotes.
#![allow(dead_code)]
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::{Duration, Instant};

/// The system allocator, counting the bytes the current thread holds while
/// [`peak_bytes`] runs. Install it with `#[global_allocator]` in the test file.
pub struct Tracking;

thread_local! {
    // (counting on, bytes live now, peak): const-initialised, so reading it never allocates.
    static LIVE: Cell<(bool, isize, isize)> = const { Cell::new((false, 0, 0)) };
}

fn note(delta: isize) {
    let _ = LIVE.try_with(|c| {
        let (on, live, peak) = c.get();
        if on {
            let live = live + delta;
            c.set((on, live, peak.max(live)));
        }
    });
}

// SAFETY: every call is forwarded unchanged to `System`; only counters change.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            note(layout.size() as isize);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            note(layout.size() as isize);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        note(-(layout.size() as isize));
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            note(new_size as isize - layout.size() as isize);
        }
        p
    }
}

/// Runs `f`; returns its value and the most bytes it held allocated at once on this
/// thread (work other threads do, e.g. in a rayon pool, is not counted).
pub fn peak_bytes<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LIVE.with(|c| c.set((true, 0, 0)));
    let out = f();
    let (_, _, peak) = LIVE.with(|c| c.replace((false, 0, 0)));
    (out, peak.max(0) as usize)
}

/// The number of generated inputs: `PROPTEST_CASES` when set, else `default` (sized so
/// one target runs about a minute in the dev profile on 2 cores).
pub fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What a fuzz run did, printed at its end (`--nocapture` shows it).
pub struct Stats {
    target: &'static str,
    start: Instant,
    pub execs: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub peak_bytes: usize,
    pub slowest: Duration,
}

impl Stats {
    pub fn new(target: &'static str) -> Self {
        Self {
            target,
            start: Instant::now(),
            execs: 0,
            accepted: 0,
            rejected: 0,
            peak_bytes: 0,
            slowest: Duration::ZERO,
        }
    }

    /// Records one execution: whether the input was accepted, its peak memory and time.
    pub fn record(&mut self, accepted: bool, peak: usize, took: Duration) {
        self.execs += 1;
        if accepted {
            self.accepted += 1;
        } else {
            self.rejected += 1;
        }
        self.peak_bytes = self.peak_bytes.max(peak);
        self.slowest = self.slowest.max(took);
    }

    pub fn print(&self) {
        println!(
            "fuzz {}: {} executions without a panic ({} accepted, {} rejected with an error) \
             in {:.1} s; largest peak memory of one input {} KiB; slowest input {} ms",
            self.target,
            self.execs,
            self.accepted,
            self.rejected,
            self.start.elapsed().as_secs_f64(),
            self.peak_bytes / 1024,
            self.slowest.as_millis()
        );
    }
}

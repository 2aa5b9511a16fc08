//! Fault injection for the crash tests, off unless an environment variable
//! asks for it. A test cannot time a SIGKILL to land mid-step or between two
//! files of a checkpoint; these hooks stop the run at exactly such a point
//! (printing a marker the test waits for) or make a loss non-finite there.
//!
//! - `NLORA_FAULT_PAUSE_AT=POINT[,POINT...]`: print
//!   `nlora: fault pause at POINT` to stderr and sleep, at
//!   - `step:T:N`: task T's optimizer step N, after the backward pass and
//!     before the update (1-based);
//!   - `ckpt-write:T:N`: inside the checkpoint after task T's step N, once
//!     its first file is written and before the rest and state.json;
//!   - `eval:T:J`: evaluating after task T, before task J's accuracy;
//!   - `stage:T`: task T finished and recorded (also
//!     `NLORA_FAULT_PAUSE_AFTER_STAGE=T`).
//! - `NLORA_FAULT_NAN_AT=PART:T:B`: PART `loss` makes the task loss of task
//!   T's micro-batch B (1-based, counted over the task's epochs) NaN; PART
//!   `grad` makes the first adapter gradient of that batch NaN.
use std::time::Duration;

pub const PAUSE_ENV: &str = "NLORA_FAULT_PAUSE_AT";
pub const NAN_ENV: &str = "NLORA_FAULT_NAN_AT";

/// Sleeps (long enough for any test to kill the process) if `point` is
/// named in NLORA_FAULT_PAUSE_AT.
pub fn pause_at(point: &str) {
    let Ok(spec) = std::env::var(PAUSE_ENV) else {
        return;
    };
    if spec.split(',').any(|p| p.trim() == point) {
        eprintln!("nlora: fault pause at {point}");
        std::thread::sleep(Duration::from_secs(600));
    }
}

/// Which part of a batch's computation an injected NaN goes into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NanPart {
    Loss,
    Grad,
}

/// The injected NaN for task `stage` (0-based), micro-batch `batch` (0-based).
pub fn nan_at(stage: usize, batch: usize) -> Option<NanPart> {
    let spec = std::env::var(NAN_ENV).ok()?;
    let mut it = spec.trim().split(':');
    let part = match it.next()? {
        "loss" => NanPart::Loss,
        "grad" => NanPart::Grad,
        _ => return None,
    };
    let t: usize = it.next()?.parse().ok()?;
    let b: usize = it.next()?.parse().ok()?;
    (t == stage + 1 && b == batch + 1).then_some(part)
}

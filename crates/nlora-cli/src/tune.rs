//! Process settings for tensor work on a few CPU cores, applied at start-up
//! (before any thread exists); an explicit environment setting wins.
//!
//! Threads: candle runs elementwise ops on a spinning barrier pool beside
//! the rayon pool its matmuls use. On 2 cores the pool's spinning worker
//! competes with the matmul threads, and whenever anything else runs it
//! spins on a descheduled peer: measured on a loaded 2-core machine, the
//! N-LoRA penalty took 395 ms with the pool and 50 ms without it, and the
//! whole `nlora bench` used 20 % less CPU. `CANDLE_NUM_THREADS=1` runs
//! those (memory-bound, now few) ops on the calling thread; the matmuls and
//! nlora's fused kernels still use every core through rayon.
//!
//! Memory: by default glibc serves large blocks (a 1024 x 1536 f32 activation is
//! 6 MB) with fresh mmaps and unmaps them on free, so every training step
//! page-faults and zeroes its whole working set again: measured on the
//! `nlora bench` training step, half the system time (~8 % of the CPU time).
//! Keeping blocks up to 32 MB (glibc's largest threshold) in the heap and
//! never trimming it lets the next step reuse them. Never, not "above 1 GB":
//! a step frees its whole working set at once (~1 GB at 8 x 128), which
//! crossed a 1 GB trim threshold, so every step gave the memory back and
//! page-faulted it in again (measured: 1.77 M page faults in `nlora bench`,
//! 0.42 M untrimmed; LoRA step 169-226 -> 287 tokens/s). The peak RSS is
//! unchanged: it is set by the step's largest working set either way.

pub fn process() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    malloc();
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn malloc() {
    use std::os::raw::c_int;
    extern "C" {
        fn mallopt(param: c_int, value: c_int) -> c_int;
    }
    const M_TRIM_THRESHOLD: c_int = -1;
    const M_TOP_PAD: c_int = -2;
    const M_MMAP_THRESHOLD: c_int = -3;
    // An explicit MALLOC_*_ environment setting wins.
    let set = |param, value, env: &str| {
        if std::env::var_os(env).is_none() {
            // SAFETY: mallopt only changes allocator parameters; called before
            // any other thread exists.
            unsafe { mallopt(param, value) };
        }
    };
    set(M_MMAP_THRESHOLD, 32 << 20, "MALLOC_MMAP_THRESHOLD_");
    // -1: never trim (mallopt(3))
    set(M_TRIM_THRESHOLD, -1, "MALLOC_TRIM_THRESHOLD_");
    set(M_TOP_PAD, 64 << 20, "MALLOC_TOP_PAD_");
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn malloc() {}

//! Speed of the LLaMA model on SmolLM2-135M (a report, not a test: ignored,
//! no timing assertions). Run in release, alone on the machine:
//!   cargo test --release -p nlora-model --test llama_speed -- --ignored --nocapture --test-threads 1
//! Batch 8 x 128 tokens, LoRA r 8 on q_proj/v_proj, loss on the last 16 tokens of each row.
//! On a busy machine, `RAYON_NUM_THREADS=1 CANDLE_NUM_THREADS=1` avoids candle's
//! spin barriers burning CPU while waiting for a descheduled thread.
use std::path::PathBuf;
use std::time::Instant;

use candle_core::Device;
use nlora_adapter::{ForwardMode, LoraConfig};
use nlora_model::llama::Llama;
use nlora_model::{load_model, LanguageModel, LmBatch};

const B: usize = 8;
const S: usize = 128;
const LABELLED: usize = 16;

fn model() -> Llama {
    let path = std::env::var("NLORA_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default())
                .join(".cache/nlora/models/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    assert!(
        path.is_file(),
        "{} is missing: run scripts/fetch-model.sh",
        path.display()
    );
    let mut m = load_model(&path, &Device::Cpu).unwrap();
    m.adapter_sites_mut()
        .init_new_adapters(&LoraConfig::default(), 0)
        .unwrap();
    println!("loaded: peak RSS {:.0} MB so far", peak_rss_mb());
    m
}

fn batch() -> LmBatch {
    let rows: Vec<Vec<u32>> = (0..B)
        .map(|r| {
            (0..S)
                .map(|t| ((r * 7919 + t * 104729) % 49000 + 10) as u32)
                .collect()
        })
        .collect();
    let mask: Vec<Vec<bool>> = (0..B)
        .map(|_| (0..S).map(|t| t >= S - LABELLED).collect())
        .collect();
    LmBatch::causal_right_padded(&rows, &mask, 0, &Device::Cpu).unwrap()
}

fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// CPU seconds (user + system) this process has used; on a shared machine a
/// steadier measure than wall time.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    // after the command name: state is field 0, utime 11, stime 12; 100 ticks per second
    (ticks(11) + ticks(12)) / 100.0
}

/// Mean wall seconds per call, printing CPU seconds per call too.
fn time<T>(reps: usize, mut f: impl FnMut() -> T) -> f64 {
    f(); // warm-up
    let (t0, c0) = (Instant::now(), cpu_seconds());
    for _ in 0..reps {
        std::hint::black_box(f());
    }
    let cpu = (cpu_seconds() - c0) / reps as f64;
    print!("[{cpu:.2} CPU-s/call] ");
    t0.elapsed().as_secs_f64() / reps as f64
}

#[test]
#[ignore = "speed report on the real model; run explicitly in release"]
fn speed_forward() {
    let m = model();
    let b = batch();
    let tokens = (B * S) as f64;
    let t = time(3, || {
        m.label_logits(&b, ForwardMode::Inference)
            .unwrap()
            .logits
            .sum_all()
            .unwrap()
    });
    println!(
        "forward (inference kernels, lm_head on labelled positions): {:.3} s/batch, {:.0} tokens/s",
        t,
        tokens / t
    );
    let t = time(3, || {
        m.loss(&b, ForwardMode::Train { dropout_seed: None })
            .unwrap()
    });
    println!(
        "forward (training path, graph recorded): {:.3} s/batch, {:.0} tokens/s",
        t,
        tokens / t
    );
    let t = time(2, || {
        m.forward_logits(&b, ForwardMode::Inference)
            .unwrap()
            .sum_all()
            .unwrap()
    });
    println!(
        "forward_logits (lm_head on all 1024 positions): {:.3} s/batch, {:.0} tokens/s",
        t,
        tokens / t
    );
    println!("peak RSS {:.0} MB", peak_rss_mb());
}

#[test]
#[ignore = "speed report on the real model; run explicitly in release"]
fn speed_train_step() {
    let m = model();
    let b = batch();
    let vars = m.adapter_sites().trainable_vars();
    let mut step = 0u64;
    let t = time(3, || {
        step += 1;
        let loss = m
            .loss(
                &b,
                ForwardMode::Train {
                    dropout_seed: Some(step),
                },
            )
            .unwrap();
        let grads = loss.backward().unwrap();
        // the optimiser would read these
        vars.iter()
            .map(|v| grads.get(v).is_some() as usize)
            .sum::<usize>()
    });
    println!(
        "train step (forward + backward, dropout 0.1): {:.3} s/step, {:.0} tokens/s",
        t,
        (B * S) as f64 / t
    );
    println!("peak RSS {:.0} MB", peak_rss_mb());
}

//! `nlora bench --profile --json` on a one-layer random model of SmolLM2's
//! shapes: every key bench/compare.sh reads is there, and the op table
//! accounts for the step's wall time without counting anything twice.
use std::process::Command;

#[test]
fn bench_json_with_profile_accounts_for_the_step() {
    let out = Command::new(env!("CARGO_BIN_EXE_nlora"))
        .args([
            "bench",
            "--random-shape",
            "smollm2-135m",
            "--layers",
            "1",
            "--batch",
            "2",
            "--seq",
            "16",
            "--steps",
            "2",
            "--gen-prompt",
            "8",
            "--gen-tokens",
            "2",
            "--threads",
            "2",
            "--profile",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in [
        "train_tokens_per_s",
        "train_nlora_tokens_per_s",
        "forward_tokens_per_s",
        "generate_new_tokens_per_s",
        "peak_rss_mib",
        "matmul_gflops",
    ] {
        let x = v[key].as_f64().unwrap_or(f64::NAN);
        assert!(x.is_finite() && x > 0.0, "{key} = {x}");
    }
    for (table, must) in [
        (
            "train_step",
            &[
                "frozen linear (fwd)",
                "lm_head + cross-entropy (fwd)",
                "AdamW",
            ][..],
        ),
        (
            "train_nlora_step",
            &[
                "frozen linear (fwd)",
                "frozen linear (bwd)",
                "lora linear (fwd)",
                "lora linear (bwd)",
                "lm_head + cross-entropy (fwd)",
                "attention (bwd)",
                "N-LoRA l1 (fwd)",
                "AdamW",
                "forward: rest (candle ops)",
                "backward: rest (graph, candle ops)",
            ][..],
        ),
        (
            "forward",
            &["frozen linear (fwd)", "masked softmax (fwd)"][..],
        ),
    ] {
        let rows = v["profile"][table].as_array().unwrap();
        let names: Vec<&str> = rows.iter().map(|r| r["op"].as_str().unwrap()).collect();
        for m in must {
            assert!(names.contains(m), "{table}: no row {m:?} in {names:?}");
        }
        // self times: together they cover the timed closure (all but the
        // loop's own overhead), and never more than the step
        let pct: f64 = rows
            .iter()
            .map(|r| r["pct_of_step"].as_f64().unwrap())
            .sum();
        assert!(
            (80.0..=100.5).contains(&pct),
            "{table}: rows sum to {pct} % of the step"
        );
    }
}

#!/usr/bin/env bash
# Side-by-side speed of nlora and PyTorch + transformers + PEFT on the same
# GGUF model, same threads, batch, length and dtype (f32). The two run in
# turn, alternating, for ROUNDS rounds (so drifting machine load hits both);
# prints each metric's ratio nlora / PyTorch with min / median / max, and
# writes every raw result to $OUT_DIR (default bench/results/<timestamp>).
#
#   bench/compare.sh [ROUNDS]          (env: THREADS=2 BATCH=8 SEQ=128 STEPS=3 WARMUP=3
#                                        GEN_PROMPT=128 MODEL=... PYTHON=... NLORA=...)
#
# The Python side is installed into bench/.venv (pip, from PyPI) when no
# PYTHON is given and that venv is missing. Run on a quiet machine: the
# script warns when the load average says otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS="${1:-${ROUNDS:-3}}"
THREADS="${THREADS:-2}"
BATCH="${BATCH:-8}"
SEQ="${SEQ:-128}"
STEPS="${STEPS:-3}"
# untimed repetitions before each measurement: the first steps of a
# process pay one-off costs (heap growth, lazy initialisation) on both sides
WARMUP="${WARMUP:-3}"
GEN_PROMPT="${GEN_PROMPT:-128}"
MODEL="${MODEL:-${NLORA_MODEL:-$HOME/.cache/nlora/models/SmolLM2-135M-Instruct.Q4_1.gguf}}"
OUT_DIR="${OUT_DIR:-bench/results/$(date -u +%Y%m%dT%H%M%SZ)}"

source bench/lib.sh

mkdir -p "$OUT_DIR"
common=(--model "$MODEL" --threads "$THREADS" --batch "$BATCH" --seq "$SEQ" --steps "$STEPS" --warmup "$WARMUP" --gen-prompt "$GEN_PROMPT" --json)

echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores; threads $THREADS, batch $BATCH x $SEQ, f32" >&2
for ((r = 1; r <= ROUNDS; r++)); do
    # Alternate who goes first, so neither always runs on a warmer (or hotter) machine.
    order=(nlora torch)
    ((r % 2 == 0)) && order=(torch nlora)
    for who in "${order[@]}"; do
        busy
        echo "round $r/$ROUNDS: $who" >&2
        if [[ $who == nlora ]]; then
            "$NLORA" bench "${common[@]}" >"$OUT_DIR/nlora-$r.json"
        else
            OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS="$THREADS" PYTHONUNBUFFERED=1 \
                "$PYTHON" bench/pytorch_reference.py "${common[@]}" \
                >"$OUT_DIR/pytorch-$r.json" 2>"$OUT_DIR/pytorch-$r.log"
        fi
    done
done

"${PYTHON}" - "$OUT_DIR" "$ROUNDS" <<'EOF'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
load = lambda who, r: json.load(open(f"{out}/{who}-{r}.json"))
runs = [(load("nlora", r), load("pytorch", r)) for r in range(1, rounds + 1)]
# Higher is better for speeds; for memory the ratio is nlora / PyTorch too (lower is better).
keys = ["train_tokens_per_s", "train_nlora_tokens_per_s", "forward_tokens_per_s",
        "generate_new_tokens_per_s", "train_peak_rss_mib", "peak_rss_mib", "matmul_gflops"]
summary = {}
print(f"{'metric':28} {'nlora (med)':>12} {'pytorch (med)':>14} {'ratio min':>10} {'median':>8} {'max':>8}")
for k in keys:
    ratios = [n[k] / p[k] for n, p in runs]
    med_n = statistics.median(n[k] for n, _ in runs)
    med_p = statistics.median(p[k] for _, p in runs)
    summary[k] = {"nlora_median": med_n, "pytorch_median": med_p, "ratio_min": min(ratios),
                  "ratio_median": statistics.median(ratios), "ratio_max": max(ratios)}
    print(f"{k:28} {med_n:12.1f} {med_p:14.1f} {min(ratios):10.2f} {statistics.median(ratios):8.2f} {max(ratios):8.2f}")
for who, i in (("nlora", 0), ("pytorch", 1)):
    over = statistics.median(run[i]["nlora_penalty_overhead_pct"] for run in runs)
    print(f"N-LoRA penalty overhead, {who}: {over:.1f}% of a LoRA step (median)")
    summary[f"{who}_penalty_overhead_pct_median"] = over
gf = statistics.median(n["train_gflops"] for n, _ in runs)
print(f"nlora training step: {gf:.0f} GFLOP/s (median)")
json.dump(summary, open(f"{out}/summary.json", "w"), indent=1)
print(f"raw results: {out}")
EOF

#!/usr/bin/env bash
# A whole continual-learning run (issue 8's acceptance: 3 tasks, 200 train /
# 100 test examples per task, 1 epoch, batch 8, lr 5e-4, N-LoRA, training +
# all T x T evaluations) in nlora and in PyTorch + transformers + PEFT on the
# same GGUF model, the same data in the same order and the same threads.
#
#   bench/whole_run.sh [ROUNDS]        (env: THREADS=2 CONFIG=bench/whole_run.toml
#                                       MODEL=... PYTHON=... NLORA=... OUT_DIR=...
#                                       NLORA_DATA=...)
#
# 1. `nlora data export` writes the run's batches (in training order) and
#    evaluation prompts exactly as nlora's engine builds them;
# 2. each round runs `nlora run --config CONFIG` and bench/pytorch_run.py on
#    that export, one after the other (who goes first alternates);
# 3. prints the wall time of each, the ratio PyTorch / nlora (target >= 1.5),
#    the first batch's loss on both sides (the base model's loss: they must
#    agree to ~1e-4 relative) and both accuracy matrices.
# Raw results go to $OUT_DIR (default bench/results/wholerun-<time>), with a
# summary.json. Run it on a quiet machine: it warns when the load says otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS="${1:-${ROUNDS:-1}}"
THREADS="${THREADS:-2}"
CONFIG="${CONFIG:-bench/whole_run.toml}"
MODEL="${MODEL:-${NLORA_MODEL:-$HOME/.cache/nlora/models/SmolLM2-135M-Instruct.Q4_1.gguf}}"
OUT_DIR="${OUT_DIR:-bench/results/wholerun-$(date -u +%Y%m%dT%H%M%SZ)}"
export NLORA_DATA="${NLORA_DATA:-$(cd .. && pwd)/shared/cl_benchmark}"

if [[ ! -f "$CONFIG" ]]; then
    echo "error: run config $CONFIG is missing (set CONFIG)" >&2
    exit 1
fi
if [[ -e "$OUT_DIR/export" ]]; then
    echo "error: $OUT_DIR already holds results: choose another OUT_DIR" >&2
    exit 1
fi

source bench/lib.sh

mkdir -p "$OUT_DIR"
now() { date +%s.%N; }

echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores; threads $THREADS; config $CONFIG" >&2
"$NLORA" data export --config "$CONFIG" --model "$MODEL" --out "$OUT_DIR/export" >&2

for ((r = 1; r <= ROUNDS; r++)); do
    order=(nlora torch)
    ((r % 2 == 0)) && order=(torch nlora)
    for who in "${order[@]}"; do
        busy
        echo "round $r/$ROUNDS: $who (load $(loadavg))" >&2
        start=$(now)
        load_before=$(loadavg)
        if [[ $who == nlora ]]; then
            # nlora sets CANDLE_NUM_THREADS=1 itself; its matmuls and fused kernels use rayon's pool.
            RAYON_NUM_THREADS="$THREADS" "$NLORA" run --config "$CONFIG" --model "$MODEL" \
                --out "$OUT_DIR/nlora-$r" --quiet >"$OUT_DIR/nlora-$r.stdout"
        else
            OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS="$THREADS" PYTHONUNBUFFERED=1 \
                "$PYTHON" bench/pytorch_run.py --export "$OUT_DIR/export" --model "$MODEL" \
                --threads "$THREADS" --out "$OUT_DIR/pytorch-$r.json" 2>"$OUT_DIR/pytorch-$r.log"
        fi
        end=$(now)
        echo "{\"wall_seconds\": $(awk -v a="$start" -v b="$end" 'BEGIN { print b - a }'), \"load_before\": $load_before, \"load_after\": $(loadavg)}" \
            >"$OUT_DIR/wall-$who-$r.json"
    done
done

"$PYTHON" - "$OUT_DIR" "$ROUNDS" <<'EOF'
import json, re, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
jl = lambda p: json.load(open(p))

def first_losses(log):
    # trainer: "task K (NAME) first batch: loss parts task X, l1 Y"
    return [float(m.group(1)) for m in re.finditer(r"first batch: loss parts task ([-+0-9.eE]+|NaN|inf)", open(log).read())]

rows = []
for r in range(1, rounds + 1):
    n_dir = f"{out}/nlora-{r}"
    nt, nres = jl(f"{n_dir}/timings.json"), jl(f"{n_dir}/results.json")
    p = jl(f"{out}/pytorch-{r}.json")
    wn, wp = jl(f"{out}/wall-nlora-{r}.json"), jl(f"{out}/wall-torch-{r}.json")
    rows.append({
        "round": r,
        "nlora": {"wall_seconds": wn["wall_seconds"], "run_seconds": sum(nt["train_seconds"]) + sum(nt["eval_seconds"]),
                  "train_seconds": nt["train_seconds"], "eval_seconds": nt["eval_seconds"],
                  "first_batch_loss": first_losses(f"{n_dir}/train.log"),
                  "accuracy_matrix": nres["accuracy_matrix"], "peak_rss_mib": (nt.get("peak_rss_bytes") or 0) / 2**20,
                  "load": [wn["load_before"], wn["load_after"]]},
        "pytorch": {"wall_seconds": wp["wall_seconds"], "run_seconds": p["run_seconds"],
                    "train_seconds": p["train_seconds"], "eval_seconds": p["eval_seconds"],
                    "load_seconds": p["load_seconds"], "first_batch_loss": p["first_batch_loss"],
                    "accuracy_matrix": p["accuracy_matrix"], "peak_rss_mib": p["peak_rss_mib"],
                    "load": [wp["load_before"], wp["load_after"]]},
    })

fmt = lambda xs: " ".join(f"{x:7.1f}" for x in xs)
print(f"{'round':>5} {'who':8} {'wall s':>8} {'train+eval s':>13} {'train s per task':>26} {'eval s per task':>26} {'load':>11}")
for row in rows:
    for who in ("nlora", "pytorch"):
        x = row[who]
        print(f"{row['round']:5} {who:8} {x['wall_seconds']:8.1f} {x['run_seconds']:13.1f} {fmt(x['train_seconds']):>26} "
              f"{fmt(x['eval_seconds']):>26} {x['load'][0]:5.2f}-{x['load'][1]:<5.2f}")

def ratio(key, part=None):
    vals = []
    for row in rows:
        n, p = row["nlora"], row["pytorch"]
        if part is None:
            vals.append(p[key] / n[key])
        else:
            vals.append(sum(p[part]) / sum(n[part]))
    return min(vals), statistics.median(vals), max(vals)

summary = {"rounds": rows, "ratios_pytorch_over_nlora": {}}
print("\nratio PyTorch / nlora (target >= 1.5)      min  median     max")
for label, key, part in (("whole process wall time", "wall_seconds", None),
                         ("training + evaluation (excl. loading)", "run_seconds", None),
                         ("training", None, "train_seconds"), ("evaluation", None, "eval_seconds")):
    lo, med, hi = ratio(key, part)
    summary["ratios_pytorch_over_nlora"][label] = {"min": lo, "median": med, "max": hi}
    print(f"{label:40} {lo:6.2f} {med:7.2f} {hi:7.2f}")

# The first batch of stage 1 meets the untouched base model (B = 0): both
# frameworks must give the same loss. Later stages start from different
# trained adapters (different RNG), so their first losses only come close.
n0, p0 = rows[0]["nlora"]["first_batch_loss"], rows[0]["pytorch"]["first_batch_loss"]
rel = abs(n0[0] - p0[0]) / abs(p0[0])
summary["first_batch_loss"] = {"nlora": n0, "pytorch": p0, "stage1_relative_difference": rel}
print("\nfirst-batch loss per stage   nlora: " + ", ".join(f"{v:.6f}" for v in n0))
print("                           PyTorch: " + ", ".join(f"{v:.6f}" for v in p0))
print(f"stage 1 (base model) relative difference {rel:.2e} " + ("(ok, <= 1e-4)" if rel <= 1e-4 else "(TOO LARGE: the two sides do not compute the same loss)"))

tasks = jl(f"{out}/export/settings.json")["tasks"]
for who in ("nlora", "pytorch"):
    print(f"\naccuracy matrix, {who} (round 1; row = after task i, column = task j)")
    print(" " * 16 + "".join(f"{t[:9]:>10}" for t in tasks))
    for i, row in enumerate(rows[0][who]["accuracy_matrix"]):
        print(f"{'after ' + tasks[i][:9]:16}" + "".join(f"{v:10.3f}" for v in row))
json.dump(summary, open(f"{out}/summary.json", "w"), indent=1)
print(f"\nraw results: {out}")
if rel > 1e-4:
    sys.exit(1)
EOF

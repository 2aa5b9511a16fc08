#!/usr/bin/env bash
# The one script a GPU session runs on the lent device machine (CUDA 13 and
# its driver, PyTorch + transformers + PEFT, no Rust, no network). It takes
# binaries built here with scripts/cuda-toolchain.sh:
#
#   eval "$(scripts/cuda-toolchain.sh)"
#   cargo build --release -p nlora-cli --features cuda
#   cargo test --release --no-run --features nlora-cli/cuda \
#       -p nlora-adapter -p nlora-model -p nlora-train --message-format=json \
#     | scripts/gpu-check.sh --bundle-tests gpu-bundle      # copies the test binaries
#   cp $CARGO_TARGET_DIR/release/nlora gpu-bundle/ && strip gpu-bundle/nlora gpu-bundle/tests/*
#   cp ~/.cache/nlora/models/SmolLM2-135M-Instruct.Q4_1.gguf gpu-bundle/   (the e2e test's tokenizer)
#
# gpu-bundle/ (untracked, not ignored: it travels with the working tree)
# then holds `nlora`, tests/<name>, build-root (the tests read their fixtures
# from the source path they were built in: it is linked to this checkout)
# and the GGUF; on the device machine:
#
#   scripts/gpu-check.sh [BUNDLE]            (default BUNDLE=gpu-bundle; results under $OUT)
#   scripts/gpu-check.sh --dry-run [BUNDLE]  (on the CPU, tiny shapes: checks the script itself)
#
# Size: the device tool carries at most 64 MiB of working tree. Measured
# here (2026-11-29): the stripped CUDA `nlora` is 68 MB, 9 MB with `xz -6`;
# the SmolLM2 GGUF is 98 MB and does not fit. So: `xz -T2` every binary of
# the bundle (this script unpacks *.xz first), and give the e2e test the
# tokenizer some other way (e.g. a tokenizer-only GGUF written by the
# generator in scripts/, or a tokenizer.json read by NLORA_MODEL's folder
# form) before the GPU session; the bench needs no GGUF (random shapes).
#
# Steps, all within ~8 minutes: (1) nvidia-smi; (2) the CUDA twins of the
# parity tests (adapter layer, LLaMA vs transformers fixtures) and the e2e
# tiny run; (3) nlora bench and PyTorch at SmolLM2-135M's, LLaMA-7B's and
# T5-large's shapes (random weights, bf16 base, f32 adapters), tokens/s side
# by side in $OUT/bench.md. Any missing piece stops the script with a
# message naming it.
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "gpu-check: ERROR: $*" >&2; exit 1; }
say() { echo "gpu-check: $*" >&2; }

if [ "${1:-}" = "--bundle-tests" ]; then
    # stdin: cargo's JSON messages; copies each test executable to BUNDLE/tests/
    dest=${2:?--bundle-tests needs a folder}/tests
    mkdir -p "$dest"
    pwd >"$dest/../build-root"
    python3 -c '
import json, shutil, sys, os
dest = sys.argv[1]
n = 0
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"].get("test"):
        name = m["target"]["name"]
        if m["target"]["kind"] == ["lib"]:
            name = m["package_id"].split("#")[0].rsplit("/", 1)[-1] + "-lib"
        shutil.copy(m["executable"], os.path.join(dest, name))
        n += 1
print(f"gpu-check: {n} test binaries in {dest}", file=sys.stderr)
' "$dest"
    exit 0
fi

dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
bundle=${1:-gpu-bundle}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
python=${PYTHON:-python3}

# Binaries travel xz-compressed (see Size above).
for z in "$bundle"/*.xz "$bundle"/tests/*.xz; do
    [ -e "$z" ] || continue
    xz -d -f "$z" && chmod +x "${z%.xz}"
done
[ -x "$bundle/nlora" ] || die "$bundle/nlora is missing: build it (see the top of this script) and put it in $bundle/"
if [ $dry = 0 ]; then
    command -v nvidia-smi >/dev/null || die "nvidia-smi not found: this machine has no NVIDIA driver"
    nvidia-smi | tee "$OUT/nvidia-smi.txt" >&2 || die "nvidia-smi failed"
    # cudarc loads libcuda, cuBLAS, cuRAND and NVRTC at run time: find CUDA 13's
    libs=$($python - <<'EOF'
import glob, os, site
dirs = []
for root in site.getsitepackages() + ["/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib"]:
    for pat in ["nvidia/cu13/lib", "nvidia/*/lib", ""]:
        for d in glob.glob(os.path.join(root, pat)):
            if glob.glob(os.path.join(d, "libcublas.so.13*")) or glob.glob(os.path.join(d, "libnvrtc.so.13*")) or glob.glob(os.path.join(d, "libcurand.so.10*")):
                dirs.append(d)
print(":".join(dict.fromkeys(dirs)))
EOF
)
    export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    for lib in libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13 libcuda.so.1; do
        ldd "$bundle/nlora" | grep -q "$lib => /" || die "$lib not found at run time (LD_LIBRARY_PATH=$LD_LIBRARY_PATH): ldd $bundle/nlora"
    done
    device=cuda
else
    say "dry run: CPU, tiny shapes"
    device=cpu
fi
$python -c "import torch, transformers, peft" 2>/dev/null || die "$python lacks torch, transformers or peft"

# (2) the CUDA twins of the tests (each says `skipped` when it finds no GPU: refuse that here)
if [ $dry = 0 ]; then
    [ -d "$bundle/tests" ] || die "$bundle/tests is missing: bundle the test binaries (see the top of this script)"
    [ -f "$bundle/build-root" ] || die "$bundle/build-root is missing (written by --bundle-tests)"
    build_root=$(cat "$bundle/build-root")
    if [ "$(cd "$build_root" 2>/dev/null && pwd -P)" != "$(pwd -P)" ]; then
        [ -e "$build_root" ] && die "$build_root exists and is not this checkout: the tests' fixture paths point there"
        mkdir -p "$(dirname "$build_root")" && ln -s "$PWD" "$build_root" || die "cannot link $build_root to $PWD"
    fi
    gguf=$(ls "$bundle"/*.gguf 2>/dev/null | head -1)
    [ -n "$gguf" ] || die "no .gguf in $bundle: the e2e test reads SmolLM2's tokenizer from it"
    export NLORA_MODEL=$PWD/$gguf
    if [ -z "${NLORA_DATA:-}" ]; then
        for d in "$PWD/shared/cl_benchmark" "$PWD/../shared/cl_benchmark"; do
            [ -d "$d" ] && NLORA_DATA=$d && break
        done
    fi
    export NLORA_DATA=${NLORA_DATA:-$PWD/shared/cl_benchmark}
    [ -d "$NLORA_DATA" ] || die "benchmark data not found at $NLORA_DATA: set NLORA_DATA"
    for t in device_parity:cuda_layer_matches_the_cpu_layer llama_parity:cuda_matches_transformers e2e:cuda; do
        bin=${t%%:*} filter=${t#*:}
        [ -x "$bundle/tests/$bin" ] || die "test binary $bundle/tests/$bin is missing"
        say "test $bin $filter"
        timeout 180 "$bundle/tests/$bin" "$filter" --nocapture --test-threads 1 \
            >"$OUT/test-$bin.log" 2>&1 || { tail -30 "$OUT/test-$bin.log" >&2; die "test $bin failed"; }
        grep -q "skipped" "$OUT/test-$bin.log" && die "test $bin skipped its CUDA check: no GPU seen (see $OUT/test-$bin.log)"
        grep -E "relative|rel diff|cosine" "$OUT/test-$bin.log" >&2 || true
    done
fi

# (3) training-step speed, nlora vs PyTorch, same shapes
if [ $dry = 0 ]; then
    shapes=("smollm2-135m 30 8 512" "llama-7b 32 4 512" "t5-large 24 8 512")
    dtype=bf16 steps=5
else
    shapes=("smollm2-135m 2 2 32" "llama-7b 1 1 16" "t5-large 1 2 32")
    dtype=f32 steps=1
fi
echo "| shape | layers | batch x seq | dtype | nlora tokens/s | PyTorch tokens/s | nlora / PyTorch |" >"$OUT/bench.md"
echo "|---|---|---|---|---|---|---|" >>"$OUT/bench.md"
for spec in "${shapes[@]}"; do
    read -r shape layers batch seq <<<"$spec"
    say "bench $shape ($layers layers, $batch x $seq, $dtype)"
    if [ "$shape" = t5-large ]; then
        nl="n/a (not implemented in nlora bench)"
        echo '{}' >"$OUT/nlora-$shape.json"
    else
        timeout 240 "$bundle/nlora" bench --random-shape "$shape" --layers "$layers" --device "$device" \
            --dtype "$dtype" --batch "$batch" --seq "$seq" --steps "$steps" --warmup 1 \
            --gen-prompt 16 --gen-tokens 2 --json >"$OUT/nlora-$shape.json" \
            || die "nlora bench $shape failed"
        nl=$($python -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["train_tokens_per_s"]))' "$OUT/nlora-$shape.json")
    fi
    timeout 240 $python bench/pytorch_shapes.py --shape "$shape" --layers "$layers" --device "$device" \
        --dtype "$dtype" --batch "$batch" --seq "$seq" --steps "$steps" --warmup 1 \
        >"$OUT/pytorch-$shape.json" || die "bench/pytorch_shapes.py $shape failed"
    pt=$($python -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["train_tokens_per_s"]))' "$OUT/pytorch-$shape.json")
    ratio=$($python -c 'import sys; a, b = sys.argv[1:]; print(f"{float(a)/float(b):.2f}" if a.replace(".","").isdigit() else "")' "$nl" "$pt")
    echo "| $shape | $layers | $batch x $seq | $dtype | $nl | $pt | $ratio |" >>"$OUT/bench.md"
done
{ echo; echo "$(date -u +%Y-%m-%d) $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || echo cpu)"; } >>"$OUT/bench.md"
cat "$OUT/bench.md"
say "done: results in $OUT"

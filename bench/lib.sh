# Shared set-up of bench/compare.sh and bench/whole_run.sh (sourced from the
# repo root): checks MODEL, resolves PYTHON (bench/.venv, created on first
# use) and NLORA (a release build), and defines loadavg / busy.

if [[ ! -f "$MODEL" ]]; then
    echo "error: model $MODEL is missing: run scripts/fetch-model.sh (or set MODEL)" >&2
    exit 1
fi

# Python side: an explicit PYTHON, else bench/.venv (created on first use).
if [[ -z "${PYTHON:-}" ]]; then
    PYTHON=bench/.venv/bin/python
    if ! "$PYTHON" -c 'import torch, transformers, peft, gguf' 2>/dev/null; then
        echo "installing the PyTorch side into bench/.venv (pip, several minutes)..." >&2
        python3 -m venv bench/.venv
        bench/.venv/bin/pip install -q --upgrade pip
        bench/.venv/bin/pip install -q -r bench/requirements.txt
    fi
fi

# nlora side: an explicit NLORA binary, else a release build.
if [[ -z "${NLORA:-}" ]]; then
    cargo build --release -q -p nlora-cli
    NLORA="${CARGO_TARGET_DIR:-target}/release/nlora"
fi

loadavg() { cut -d' ' -f1 /proc/loadavg; }
# Warns when the 1-minute load says the timings will be unreliable.
busy() {
    local load
    load=$(loadavg)
    awk -v l="$load" 'BEGIN { exit !(l > 1.5) }' && echo "warning: load average $load: timings are unreliable" >&2
    true
}

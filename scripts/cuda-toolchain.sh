#!/usr/bin/env bash
# A CUDA 13.0 build toolchain for `cargo build --release --features cuda` on a
# machine without the CUDA toolkit or a GPU, from NVIDIA's PyPI wheels:
#   nvidia-cuda-nvcc     nvcc, ptxas (candle-kernels compiles its .cu files to PTX)
#   nvidia-nvvm          cicc, nvcc's device front end
#   nvidia-cuda-runtime  the CUDA headers (cuda.h, cuda_runtime.h, cuda_bf16.h, ...)
#   nvidia-cuda-crt      crt/host_config.h and the other headers nvcc includes
#   nvidia-cuda-cccl     <cuda/std/...> (candle's reduce.cu)
# All unpack into one CUDA_ROOT (site-packages/nvidia/cu13), laid out as a toolkit.
# cudarc (candle's CUDA binding) links libcuda, libcublas, libcublasLt,
# libcurand and libnvrtc dynamically. The driver's libcuda has no wheel, and
# the math libraries' wheels weigh ~1 GB, so the link uses stubs: shared
# objects with the real sonames whose (empty) functions are the ones cudarc
# declares. The binary then loads the real libraries at run time on the GPU
# machine (scripts/gpu-check.sh sets LD_LIBRARY_PATH). CUDA 13.0, not newer:
# PTX from a newer nvcc is refused by an older CUDA 13 driver.
#
# Usage:  eval "$(scripts/cuda-toolchain.sh)"   then   cargo build --release --features cuda
# Env: CUDA_VENV (default .venv-cuda), CUDA_COMPUTE_CAP (default 90: H100/H200).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
venv=${CUDA_VENV:-$root/.venv-cuda}
cap=${CUDA_COMPUTE_CAP:-90}
wheels=(nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-runtime==13.0.96
        nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85)

log() { echo "cuda-toolchain: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

command -v python3 >/dev/null || die "python3 is needed to make the venv"
command -v cc >/dev/null || die "a C compiler (cc) is needed for the link stubs"
if [ ! -x "$venv/bin/pip" ]; then
    log "creating $venv"
    python3 -m venv "$venv" || die "python3 -m venv failed"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps \
    "${wheels[@]}" >&2 \
    || die "pip could not install the CUDA wheels (is PyPI reachable?)"

cuda_root=$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
[ -x "$cuda_root/bin/nvcc" ] || die "no nvcc in $cuda_root/bin"
[ -f "$cuda_root/include/cuda.h" ] || die "no cuda.h in $cuda_root/include"
[ -f "$cuda_root/include/crt/host_config.h" ] || die "no crt/host_config.h in $cuda_root/include"
[ -x "$cuda_root/nvvm/bin/cicc" ] || die "no nvvm/bin/cicc in $cuda_root"
"$cuda_root/bin/nvcc" --version >/dev/null || die "$cuda_root/bin/nvcc does not run"

# Link stubs from the functions cudarc declares (the version in Cargo.lock).
cudarc_version=$(awk '/^name = "cudarc"$/ {getline; gsub(/"/, "", $3); print $3}' Cargo.lock)
[ -n "$cudarc_version" ] || die "cudarc is not in Cargo.lock: is the cuda feature declared?"
cudarc_dir=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-"$cudarc_version" 2>/dev/null | head -1)
if [ -z "$cudarc_dir" ]; then
    cargo fetch --quiet >&2 || die "cargo fetch failed"
    cudarc_dir=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-"$cudarc_version" | head -1)
fi
stubs=$cuda_root/lib/stubs
mkdir -p "$stubs"
make_stub() { # module soname library
    local module=$1 soname=$2 lib=$3 src
    src=$(mktemp --suffix=.c)
    grep -A3 'extern "C" {' "$cudarc_dir/src/$module/sys/mod.rs" \
        | grep -oE '^\s+fn [A-Za-z0-9_]+' | awk '{print $2}' | sort -u \
        | sed 's/.*/void &(void) {}/' >"$src"
    [ -s "$src" ] || die "no functions found for $module in $cudarc_dir"
    cc -shared -fPIC -o "$stubs/$lib" -Wl,-soname,"$soname" "$src" || die "stub $lib failed"
    rm -f "$src"
}
make_stub driver libcuda.so.1 libcuda.so
make_stub cublas libcublas.so.13 libcublas.so
make_stub cublaslt libcublasLt.so.13 libcublasLt.so
make_stub curand libcurand.so.10 libcurand.so
make_stub nvrtc libnvrtc.so.13 libnvrtc.so
# candle-kernels links the CUDA runtime as -lcudart: the runtime wheel ships
# only libcudart.so.13 (no development symlink), so give the linker one.
[ -e "$cuda_root/lib/libcudart.so.13" ] || die "libcudart.so.13 missing from $cuda_root/lib (nvidia-cuda-runtime wheel)"
ln -sf libcudart.so.13 "$cuda_root/lib/libcudart.so"
log "nvcc $("$cuda_root/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), headers and link stubs in $cuda_root"

cat <<EOF
export PATH="$cuda_root/bin:\$PATH"
export CUDA_ROOT="$cuda_root"
export CUDA_PATH="$cuda_root"
export CUDA_TOOLKIT_ROOT_DIR="$cuda_root"
export CUDA_COMPUTE_CAP=$cap
EOF

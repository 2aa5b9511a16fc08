//! Where the tensors live, in which precision, and which kernels run there.
//!
//! nlora's fused training ops (the adapted linear layer, dropout, and the
//! model's norms, RoPE, attention, SwiGLU and cross-entropy) exist for the
//! CPU only. Everywhere else (CUDA) each op runs as a differentiable
//! composition of candle ops, chosen by [`use_fused`]: one check, made by
//! every op at its call site. [`with_composed_ops`] forces the composed path
//! on the CPU, so CPU tests check it against the fused one: the CUDA path is
//! the composed path.
use std::cell::Cell;
use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};

/// A device named on the command line or in a config: `cpu`, `cuda` (= `cuda:0`) or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || format!("device `{s}`: expected cpu, cuda or cuda:N (N the GPU's index)");
        match s.trim().to_ascii_lowercase().as_str() {
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            other => match other.strip_prefix("cuda:") {
                Some(n) => n.parse().map(Self::Cuda).map_err(|_| bad()),
                None => Err(bad()),
            },
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// What to do when this nlora cannot use CUDA.
pub const BUILD_WITH_CUDA: &str = "this nlora was built without CUDA: build with \
`cargo build --release --features cuda` (the toolchain: scripts/cuda-toolchain.sh)";

impl DeviceSpec {
    /// Opens the device. Without the `cuda` feature candle's CUDA device is
    /// a stub whose error says nothing about nlora; this one says how to build.
    pub fn open(&self) -> std::result::Result<Device, String> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(n) => {
                if !candle_core::utils::cuda_is_available() {
                    return Err(format!("device {self}: {BUILD_WITH_CUDA}"));
                }
                Device::new_cuda(*n).map_err(|e| {
                    format!(
                        "device {self}: cannot open it ({e}); is there a GPU with index {n} \
                         and a CUDA 13 driver (nvidia-smi)?"
                    )
                })
            }
        }
    }
}

/// Precision of the frozen base weights: `f32` or `bf16` (GPU). Adapters
/// always train in f32; each adapted layer casts its input to f32 for the
/// adapter path and casts the update back (see `AdapterSite::forward`).
pub fn parse_base_dtype(s: &str) -> std::result::Result<DType, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "f32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        other => Err(format!(
            "dtype `{other}`: expected f32 or bf16 (bf16 base weights, f32 adapters)"
        )),
    }
}

/// The dtype adapters train in on a base of `base` dtype: f32, or f64 for
/// numerical checks on an f64 base.
pub fn adapter_dtype(base: DType) -> DType {
    if base == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

thread_local! {
    static FORCE_COMPOSED: Cell<bool> = const { Cell::new(false) };
}

/// `NLORA_COMPOSED_OPS=1` runs a whole process on the composed ops (the CUDA path) on the CPU.
fn composed_by_env() -> bool {
    static ENV: OnceLock<bool> = OnceLock::new();
    *ENV.get_or_init(|| {
        std::env::var("NLORA_COMPOSED_OPS").is_ok_and(|v| !v.is_empty() && v != "0")
    })
}

/// Runs `f` with every op on this thread taking its composed path (what
/// runs on CUDA), also on the CPU: for parity tests of the two paths.
pub fn with_composed_ops<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            FORCE_COMPOSED.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(FORCE_COMPOSED.with(|c| c.replace(true)));
    f()
}

/// Whether an op on `t` runs its fused CPU kernel (f32/f64 on the CPU) or
/// its composition of candle ops (any other device or dtype, or when forced).
pub fn use_fused(t: &Tensor) -> bool {
    t.device().is_cpu()
        && matches!(t.dtype(), DType::F32 | DType::F64)
        && !FORCE_COMPOSED.with(Cell::get)
        && !composed_by_env()
}

/// The first GPU, for tests that have a CUDA twin: `None` (the test is
/// skipped, saying so) when nlora was built without the `cuda` feature or
/// no GPU is present.
pub fn cuda_device() -> Option<Device> {
    if !candle_core::utils::cuda_is_available() {
        return None;
    }
    Device::new_cuda(0).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_specs_parse_and_print() {
        assert_eq!("cpu".parse(), Ok(DeviceSpec::Cpu));
        assert_eq!("CUDA".parse(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceSpec::Cuda(3)));
        assert_eq!(DeviceSpec::Cuda(3).to_string(), "cuda:3");
        for bad in ["cuda:x", "tpu", "cuda:", ""] {
            let e = bad.parse::<DeviceSpec>().unwrap_err();
            assert!(e.contains("expected cpu, cuda or cuda:N"), "{e}");
        }
        assert_eq!(parse_base_dtype("bf16"), Ok(DType::BF16));
        assert!(parse_base_dtype("f16").unwrap_err().contains("f32 or bf16"));
    }

    #[test]
    fn cuda_without_the_feature_says_how_to_build() {
        if candle_core::utils::cuda_is_available() {
            eprintln!("skipped: this build has CUDA");
            return;
        }
        let e = DeviceSpec::Cuda(0).open().unwrap_err();
        assert!(
            e.contains("--features cuda") && e.contains("cuda-toolchain.sh"),
            "{e}"
        );
        assert!(cuda_device().is_none());
    }

    #[test]
    fn the_composed_switch_is_scoped_to_the_closure() {
        let t = Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap();
        let bf = Tensor::zeros(2, DType::BF16, &Device::Cpu).unwrap();
        if composed_by_env() {
            assert!(!use_fused(&t));
            return;
        }
        assert!(use_fused(&t));
        assert!(!use_fused(&bf), "bf16 has no fused kernel");
        assert!(with_composed_ops(|| !use_fused(&t)));
        assert!(use_fused(&t), "the switch must be restored");
    }
}

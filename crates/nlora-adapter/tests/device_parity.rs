//! The adapted layer's composed path (what runs on CUDA) against the fused
//! CPU op: values and gradients for x, A and B, with bias, history and
//! dropout. Then the same layer on a GPU when there is one, and on a bf16
//! base with f32 adapters.
use candle_core::{DType, Device, Tensor, Var};
use nlora_adapter::device::cuda_device;
use nlora_adapter::{with_composed_ops, AdapterSite, ForwardMode, FrozenAdapter, LoraAdapter};

fn randn(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Largest |a - b| relative to the largest |b| (f32 results).
fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a = a
        .to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let b = b
        .to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let d = (&a - &b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let m = b
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    d / m.max(1e-30)
}

const IN: usize = 48;
const OUT: usize = 40;

/// A site on `device` with base weights in `base_dtype`: bias, two earlier
/// tasks, a current adapter (f32) with dropout 0.2.
fn site(device: &Device, base_dtype: DType) -> AdapterSite {
    let on = |t: Tensor| t.to_device(device).unwrap();
    let mut site = AdapterSite::new(
        on(randn(&[OUT, IN], 1).to_dtype(base_dtype).unwrap()),
        Some(on(randn(&[OUT], 2).to_dtype(base_dtype).unwrap())),
    )
    .unwrap();
    for (k, r) in [(0u64, 3usize), (1, 5)] {
        site.push_history(FrozenAdapter {
            a: on(randn(&[r, IN], 10 + k)),
            b: on(randn(&[OUT, r], 20 + k)),
            scale: 0.5 + k as f64,
        })
        .unwrap();
    }
    site.set_current(
        LoraAdapter::from_tensors(on(randn(&[8, IN], 3)), on(randn(&[OUT, 8], 4)), 16.0, 0.2)
            .unwrap(),
    )
    .unwrap();
    site
}

/// Output, and the gradients of `sum(y * probe)` for x, A, B.
fn run(site: &AdapterSite, device: &Device, base_dtype: DType) -> Vec<Tensor> {
    let x = Var::from_tensor(
        &randn(&[3, 7, IN], 5)
            .to_dtype(base_dtype)
            .unwrap()
            .to_device(device)
            .unwrap(),
    )
    .unwrap();
    let mode = ForwardMode::Train {
        dropout_seed: Some(42),
    };
    let y = site.forward(x.as_tensor(), mode).unwrap();
    assert_eq!(
        y.dtype(),
        base_dtype,
        "the layer's output keeps the base dtype"
    );
    let probe = randn(&[3, 7, OUT], 6)
        .to_dtype(base_dtype)
        .unwrap()
        .to_device(device)
        .unwrap();
    let grads = (&y * &probe)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let cur = site.current().unwrap();
    let mut out = vec![y];
    for v in [x.as_tensor(), cur.a().as_tensor(), cur.b().as_tensor()] {
        out.push(grads.get(v).expect("a gradient for x, A and B").clone());
    }
    out
}

const NAMES: [&str; 4] = ["y", "dx", "dA", "dB"];

#[test]
fn composed_layer_matches_the_fused_op_in_value_and_gradients() {
    let s = site(&Device::Cpu, DType::F32);
    let fused = run(&s, &Device::Cpu, DType::F32);
    let composed = with_composed_ops(|| run(&s, &Device::Cpu, DType::F32));
    for ((f, c), name) in fused.iter().zip(&composed).zip(NAMES) {
        let d = rel_diff(c, f);
        eprintln!("composed vs fused, {name}: relative max diff {d:.2e}");
        assert!(d < 1e-5, "{name}: composed differs from fused by {d:e}");
    }
}

#[test]
fn bf16_base_with_f32_adapters_trains_the_adapters_in_f32() {
    let s32 = site(&Device::Cpu, DType::F32);
    let reference = run(&s32, &Device::Cpu, DType::F32);
    let s16 = site(&Device::Cpu, DType::BF16);
    let got = run(&s16, &Device::Cpu, DType::BF16);
    assert_eq!(got[2].dtype(), DType::F32, "dA is f32");
    assert_eq!(got[3].dtype(), DType::F32, "dB is f32");
    for ((g, r), name) in got.iter().zip(&reference).zip(NAMES) {
        let d = rel_diff(g, r);
        eprintln!("bf16 base vs f32, {name}: relative max diff {d:.2e}");
        // bf16 keeps 8 bits of mantissa: ~0.4 % per rounding, a few roundings deep
        assert!(d < 3e-2, "{name}: bf16 base differs from f32 by {d:e}");
    }
}

#[test]
fn cuda_layer_matches_the_cpu_layer() {
    let Some(gpu) = cuda_device() else {
        eprintln!("skipped: no CUDA device (build with --features cuda on a machine with a GPU)");
        return;
    };
    let cpu = run(&site(&Device::Cpu, DType::F32), &Device::Cpu, DType::F32);
    let cuda = run(&site(&gpu, DType::F32), &gpu, DType::F32);
    for ((g, c), name) in cuda.iter().zip(&cpu).zip(NAMES) {
        let d = rel_diff(g, c);
        eprintln!("cuda vs cpu, {name}: relative max diff {d:.2e}");
        // cuBLAS may use TF32-free f32 GEMMs with another summation order
        assert!(d < 1e-4, "{name}: CUDA differs from CPU by {d:e}");
    }
    let bf16 = run(&site(&gpu, DType::BF16), &gpu, DType::BF16);
    for ((g, c), name) in bf16.iter().zip(&cpu).zip(NAMES) {
        let d = rel_diff(g, c);
        eprintln!("cuda bf16 vs cpu f32, {name}: relative max diff {d:.2e}");
        assert!(d < 3e-2, "{name}: CUDA bf16 differs from CPU f32 by {d:e}");
    }
}

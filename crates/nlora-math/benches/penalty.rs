//! The training penalties with their backward on a SmolLM2-sized adapter set:
//! 60 sites (q_proj and v_proj of 30 layers) of 576 x 576, r = 8, three
//! earlier tasks stacked for O-LoRA. N-LoRA's l1 on the full dW is the one
//! that must stay cheap beside a training step (issue: <= 2% of a step).
//!
//! `cargo bench -p nlora-math --bench penalty -- --quick`

use std::hint::black_box;

use candle_core::{Device, Tensor, Var};
use criterion::{criterion_group, criterion_main, Criterion};
use nlora_math::penalty::{
    factor_l1, nlora_l1, olora_orthogonality, FactorSparsity, NLoraForm, OrthogonalityForm, Site,
};

const SITES: usize = 60;
const DIM: usize = 576;
const RANK: usize = 8;
const PREVIOUS: usize = 3 * RANK;

struct Adapters {
    a: Vec<Var>,
    b: Vec<Var>,
    previous_a: Vec<Tensor>,
    previous_b: Vec<Tensor>,
}

fn adapters() -> Adapters {
    let dev = &Device::Cpu;
    let bound = 1.0 / (DIM as f32).sqrt();
    let var = |shape: (usize, usize), s: f32| {
        Var::from_tensor(&Tensor::randn(0f32, s, shape, dev).unwrap()).unwrap()
    };
    Adapters {
        a: (0..SITES).map(|_| var((RANK, DIM), bound)).collect(),
        b: (0..SITES).map(|_| var((DIM, RANK), 0.01)).collect(),
        previous_a: (0..SITES)
            .map(|_| Tensor::randn(0f32, bound, (PREVIOUS, DIM), dev).unwrap())
            .collect(),
        previous_b: (0..SITES)
            .map(|_| Tensor::randn(0f32, 0.01, (DIM, PREVIOUS), dev).unwrap())
            .collect(),
    }
}

fn bench(c: &mut Criterion) {
    let ad = adapters();
    let sites: Vec<Site<'_>> = (0..SITES)
        .map(|i| {
            Site::new(ad.a[i].as_tensor(), ad.b[i].as_tensor())
                .with_previous(&ad.previous_a[i], &ad.previous_b[i])
        })
        .collect();
    let mut group = c.benchmark_group("penalty_60x576x576_r8_with_backward");
    group.sample_size(10);
    group.bench_function("nlora_l1_update", |b| {
        b.iter(|| {
            nlora_l1(black_box(&sites), 0.4, NLoraForm::Update { scale: 1.0 })
                .unwrap()
                .backward()
                .unwrap()
        })
    });
    group.bench_function("olora_orthogonality_abs_sum", |b| {
        b.iter(|| {
            olora_orthogonality(black_box(&sites), 0.5, OrthogonalityForm::AbsSum)
                .unwrap()
                .backward()
                .unwrap()
        })
    });
    group.bench_function("factor_l1_both", |b| {
        b.iter(|| {
            factor_l1(black_box(&sites), 0.4, FactorSparsity::Both)
                .unwrap()
                .backward()
                .unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

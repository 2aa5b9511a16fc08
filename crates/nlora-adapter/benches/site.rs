//! One adapted linear layer of SmolLM2-135M's size (q_proj: 576 -> 576,
//! r = 8) on a batch of 8 x 128 tokens: the inference forward, and the
//! training forward + backward (gradients for lora_A / lora_B and the input,
//! none for the frozen W0), with and without three earlier tasks' frozen
//! adapters stacked beside W0.
//!
//! `cargo bench -p nlora-adapter --bench site -- --quick`

use std::hint::black_box;

use candle_core::{DType, Device, Tensor, Var};
use criterion::{criterion_group, criterion_main, Criterion};
use nlora_adapter::{AdapterSite, ForwardMode, LoraAdapter, LoraConfig};
use rand::rngs::StdRng;
use rand::SeedableRng;

const TOKENS: usize = 8 * 128;
const DIM: usize = 576;

fn site(history: usize) -> AdapterSite {
    let dev = Device::Cpu;
    let w = Tensor::randn(0f32, 0.02, (DIM, DIM), &dev).expect("weight");
    let mut s = AdapterSite::new(w, None).expect("site");
    let cfg = LoraConfig::default();
    let mut rng = StdRng::seed_from_u64(0);
    for _ in 0..history {
        let a = LoraAdapter::init(&cfg, DIM, DIM, DType::F32, &dev, &mut rng).expect("init");
        s.push_history(a.to_frozen()).expect("history");
    }
    let mut cur = LoraAdapter::init(&cfg, DIM, DIM, DType::F32, &dev, &mut rng).expect("init");
    // a trained B (non-zero) so the update is not trivially zero
    cur = LoraAdapter::from_tensors(
        cur.a().as_tensor().clone(),
        Tensor::randn(0f32, 0.01, (DIM, cfg.r), &dev).expect("b"),
        cfg.alpha,
        cfg.dropout,
    )
    .expect("adapter");
    s.set_current(cur).expect("current");
    s
}

fn bench(c: &mut Criterion) {
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (TOKENS, DIM), &Device::Cpu).unwrap())
        .expect("input");
    let mut group = c.benchmark_group("adapter_site_576x576_r8_1024tokens");
    group.sample_size(20);
    for history in [0usize, 3] {
        let s = site(history);
        group.bench_function(format!("forward_inference_history{history}"), |b| {
            b.iter(|| {
                s.forward(black_box(x.as_tensor()), ForwardMode::Inference)
                    .unwrap()
            })
        });
        group.bench_function(format!("forward_backward_train_history{history}"), |b| {
            b.iter(|| {
                let y = s
                    .forward(
                        black_box(x.as_tensor()),
                        ForwardMode::Train {
                            dropout_seed: Some(1),
                        },
                    )
                    .unwrap();
                y.sum_all().unwrap().backward().unwrap()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

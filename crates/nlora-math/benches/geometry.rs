//! All geometry metrics on a SmolLM2-sized adapter set: 60 sites (q_proj and
//! v_proj of 30 layers) of 576 x 576, r = 8, 4 tasks.
//!
//! `cargo bench -p nlora-math --bench geometry -- --quick`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use nalgebra::DMatrix;
use nlora_math::metrics::{
    awom, generalized_sparsity_rate, geometry, orthogonal_overlap, CollisionThreshold,
    LowRankUpdate, SiteHistory,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SITES: usize = 60;
const TASKS: usize = 4;
const DIM: usize = 576;
const RANK: usize = 8;

fn sites() -> Vec<SiteHistory> {
    let mut rng = StdRng::seed_from_u64(0);
    // lora_A kaiming-uniform-like, lora_B small but trained away from zero.
    let bound = 1.0 / (DIM as f64).sqrt();
    (0..SITES)
        .map(|s| SiteHistory {
            name: format!(
                "model.layers.{}.self_attn.{}_proj",
                s / 2,
                ["q", "v"][s % 2]
            ),
            tasks: (0..TASKS)
                .map(|_| {
                    let a = DMatrix::from_fn(RANK, DIM, |_, _| rng.random_range(-bound..bound));
                    let b = DMatrix::from_fn(DIM, RANK, |_, _| rng.random_range(-0.01..0.01));
                    LowRankUpdate::new(a, b, 4.0).expect("valid update")
                })
                .collect(),
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let sites = sites();
    let threshold = CollisionThreshold::RelativeToMax(0.1);
    let mut group = c.benchmark_group("geometry_60x576x576_r8_t4");
    group.sample_size(10);
    group.bench_function("all_metrics", |b| {
        b.iter(|| geometry(black_box(&sites), threshold).expect("geometry"))
    });
    group.bench_function("all_metrics_site_max_threshold", |b| {
        b.iter(|| {
            geometry(
                black_box(&sites),
                CollisionThreshold::RelativeToSiteMax(0.1),
            )
            .expect("geometry")
        })
    });
    group.bench_function("orthogonal_overlap", |b| {
        b.iter(|| {
            sites
                .iter()
                .map(|s| orthogonal_overlap(&s.tasks[..TASKS - 1], &s.tasks[TASKS - 1]).unwrap())
                .sum::<f64>()
        })
    });
    group.bench_function("awom", |b| {
        b.iter(|| {
            sites
                .iter()
                .map(|s| awom(&s.tasks[..TASKS - 1], &s.tasks[TASKS - 1]).unwrap())
                .sum::<f64>()
        })
    });
    group.bench_function("nuclear_norm", |b| {
        b.iter(|| {
            sites
                .iter()
                .flat_map(|s| &s.tasks)
                .map(|u| u.nuclear_norm().unwrap())
                .sum::<f64>()
        })
    });
    group.bench_function("dense_update_and_gsr", |b| {
        b.iter(|| {
            sites
                .iter()
                .flat_map(|s| &s.tasks)
                .filter_map(|u| generalized_sparsity_rate(u.dense().as_slice()))
                .sum::<f64>()
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

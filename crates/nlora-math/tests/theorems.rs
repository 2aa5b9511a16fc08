//! The paper's theorems as property tests: Theorem 1 (section 3.2, appendix
//! A.1), Theorem 2 (appendix A.2) and the GSR properties D1-D4, P1, P2
//! (appendix A.7), the latter stated in the eq. 16 convention
//! (GSR = l1 / (sqrt(mn) l2), lower = sparser).

mod common;

use common::rng;
use nalgebra::DMatrix;
use nlora_math::metrics::{
    awom, collision_rate, generalized_sparsity_rate, orthogonal_overlap, site_geometry,
    CollisionThreshold, LowRankUpdate, SiteHistory,
};
use proptest::prelude::*;
use proptest::test_runner::RngSeed;
use rand::Rng;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        // Fixed so that the 4-sigma bound of Theorem 2 cannot flake.
        rng_seed: RngSeed::Fixed(0x4e2d_4c6f_5241),
        ..ProptestConfig::default()
    }
}

const EXACT: CollisionThreshold = CollisionThreshold::Absolute(0.0);

/// Two m x n matrices with disjoint random supports: each position belongs to
/// dW1, to dW2, or to neither.
fn non_colliding_pair(seed: u64, m: usize, n: usize) -> (DMatrix<f64>, DMatrix<f64>) {
    let mut rng = rng(seed);
    let mut w1 = DMatrix::zeros(m, n);
    let mut w2 = DMatrix::zeros(m, n);
    for i in 0..m {
        for j in 0..n {
            let value = rng.random_range(-1.0..1.0);
            match rng.random_range(0..3) {
                0 => w1[(i, j)] = value,
                1 => w2[(i, j)] = value,
                _ => {}
            }
        }
    }
    (w1, w2)
}

proptest! {
    #![proptest_config(config(64))]

    /// Theorem 1, the part that holds: non-colliding updates have CR = 0 and
    /// are orthogonal in the Frobenius inner product, i.e. the diagonal of
    /// dW1^T dW2 (paper layout; dW1 dW2^T in PEFT layout) is zero, since each
    /// diagonal entry sums products of entries at the same position.
    #[test]
    fn theorem1_non_collision_gives_zero_cr_and_frobenius_orthogonality(
        seed in any::<u64>(), m in 1usize..12, n in 1usize..12,
    ) {
        let (w1, w2) = non_colliding_pair(seed, m, n);
        prop_assert_eq!(collision_rate(&w1, &w2, EXACT).unwrap(), 0.0);
        prop_assert_eq!(w1.dot(&w2), 0.0);
        let paper_product = w1.transpose() * &w2; // dW1^T dW2 with the paper's dW = PEFT dW^T ...
        let peft_product = &w1 * w2.transpose(); // ... is this in PEFT layout
        prop_assert!(paper_product.diagonal().iter().all(|&x| x == 0.0));
        prop_assert!(peft_product.diagonal().iter().all(|&x| x == 0.0));
    }

    /// Theorem 1's full orthogonality dW1^T dW2 = 0 does hold under the
    /// stronger condition that the updates use disjoint input features (in
    /// PEFT layout: disjoint columns of lora_A); then also AWOM = 0, OO = 0
    /// and CR = 0.
    #[test]
    fn theorem1_disjoint_input_features_give_full_orthogonality(
        seed in any::<u64>(), input in 2usize..16, out in 1usize..12, r1 in 1usize..5, r2 in 1usize..5,
    ) {
        let mut rng = rng(seed);
        let split = rng.random_range(1..input);
        let mut a1 = common::random_matrix(&mut rng, r1, input);
        let mut a2 = common::random_matrix(&mut rng, r2, input);
        a1.columns_mut(split, input - split).fill(0.0);
        a2.columns_mut(0, split).fill(0.0);
        let u1 = LowRankUpdate::new(a1, common::random_matrix(&mut rng, out, r1), 1.0).unwrap();
        let u2 = LowRankUpdate::new(a2, common::random_matrix(&mut rng, out, r2), 4.0).unwrap();
        let (d1, d2) = (u1.dense(), u2.dense());
        prop_assert_eq!((&d1 * d2.transpose()).norm(), 0.0);
        prop_assert_eq!(awom(std::slice::from_ref(&u1), &u2).unwrap(), 0.0);
        prop_assert_eq!(orthogonal_overlap(std::slice::from_ref(&u1), &u2).unwrap(), 0.0);
        prop_assert_eq!(collision_rate(&d1, &d2, EXACT).unwrap(), 0.0);
        let site = SiteHistory { name: "q".into(), tasks: vec![u1, u2] };
        let g = site_geometry(&site, EXACT).unwrap();
        prop_assert_eq!(g.average_collision_rate, Some(0.0));
        prop_assert_eq!(g.awom, 0.0);
    }
}

/// Theorem 1 as the paper states it is false: non-collision does not imply
/// dW1^T dW2 = 0. The proof in appendix A.1 treats (dW1^T dW2)_kl as a sum of
/// products at the same position, which holds only for k = l.
#[test]
fn theorem1_full_orthogonality_does_not_follow_from_non_collision() {
    // PEFT layout (out x in). Position (0,0) for dW1, (1,0) for dW2: no collision.
    let w1 = DMatrix::from_row_slice(2, 2, &[1.0, 0.0, 0.0, 0.0]);
    let w2 = DMatrix::from_row_slice(2, 2, &[0.0, 0.0, 1.0, 0.0]);
    assert_eq!(collision_rate(&w1, &w2, EXACT).unwrap(), 0.0);
    // dW1 dW2^T (the paper's dW1^T dW2) has the entry (0, 1) = 1.
    assert_eq!(
        &w1 * w2.transpose(),
        DMatrix::from_row_slice(2, 2, &[0.0, 1.0, 0.0, 0.0])
    );
    // The same pair as rank-1 LoRA updates: AWOM (eq. 8) is 1, not 0.
    let u1 = LowRankUpdate::new(
        DMatrix::from_row_slice(1, 2, &[1.0, 0.0]),
        DMatrix::from_row_slice(2, 1, &[1.0, 0.0]),
        1.0,
    )
    .unwrap();
    let u2 = LowRankUpdate::new(
        DMatrix::from_row_slice(1, 2, &[1.0, 0.0]),
        DMatrix::from_row_slice(2, 1, &[0.0, 1.0]),
        1.0,
    )
    .unwrap();
    assert_eq!(u1.dense(), w1);
    assert_eq!(u2.dense(), w2);
    assert!((awom(&[u1], &u2).unwrap() - 1.0).abs() < 1e-12);
}

proptest! {
    #![proptest_config(config(48))]

    /// Theorem 2: with independent Bernoulli supports of densities s_i, s_j
    /// (the paper's "sparsity rates" are the fractions of non-zero entries),
    /// CR_ij is Binomial(mn, s_i s_j) / mn: within 4 sigma of s_i s_j.
    #[test]
    fn theorem2_collision_rate_is_product_of_densities(
        seed in any::<u64>(), s_i in 0.02..0.98f64, s_j in 0.02..0.98f64,
        m in 16usize..64, n in 16usize..64,
    ) {
        let mut rng = rng(seed);
        let mut sample = |s: f64| DMatrix::from_fn(m, n, |_, _| {
            if rng.random_bool(s) { rng.random_range(0.1..1.0) * if rng.random_bool(0.5) { 1.0 } else { -1.0 } } else { 0.0 }
        });
        let (wi, wj) = (sample(s_i), sample(s_j));
        let p = s_i * s_j;
        let sigma = (p * (1.0 - p) / (m * n) as f64).sqrt();
        let cr = collision_rate(&wi, &wj, EXACT).unwrap();
        prop_assert!((cr - p).abs() <= 4.0 * sigma, "CR = {cr}, s_i s_j = {p}, sigma = {sigma}");
    }
}

fn gsr(x: &[f64]) -> f64 {
    generalized_sparsity_rate(x).expect("non-zero vector")
}

/// Entries in [0, 1] with random signs applied afterwards (GSR sees |x|).
fn magnitudes_and_signs(max_len: usize) -> impl Strategy<Value = (Vec<f64>, Vec<bool>)> {
    (2..max_len).prop_flat_map(|len| {
        (
            proptest::collection::vec(0.0..1.0f64, len),
            proptest::collection::vec(any::<bool>(), len),
        )
    })
}

fn signed(magnitudes: &[f64], negative: &[bool]) -> Vec<f64> {
    magnitudes
        .iter()
        .zip(negative)
        .map(|(&x, &neg)| if neg { -x } else { x })
        .collect()
}

proptest! {
    #![proptest_config(config(128))]

    /// Range: 1/sqrt(N) <= GSR <= 1, the bounds attained by a single non-zero
    /// entry and by equal magnitudes.
    #[test]
    fn gsr_range((x, neg) in magnitudes_and_signs(64), c in 0.1..10.0f64) {
        let x = signed(&x, &neg);
        prop_assume!(x.iter().any(|&v| v != 0.0));
        let n = x.len() as f64;
        let g = gsr(&x);
        prop_assert!(g >= 1.0 / n.sqrt() - 1e-12 && g <= 1.0, "GSR = {g}");
        let mut one_hot = vec![0.0; x.len()];
        one_hot[0] = c;
        prop_assert!((gsr(&one_hot) - 1.0 / n.sqrt()).abs() < 1e-12);
        let constant: Vec<f64> = neg.iter().map(|&s| if s { -c } else { c }).collect();
        prop_assert!((gsr(&constant) - 1.0).abs() < 1e-12);
    }

    /// D1 Robin Hood: moving alpha in (0, (x_i - x_j)/2) from a larger to a
    /// smaller magnitude makes the vector less sparse: GSR rises.
    #[test]
    fn gsr_d1_robin_hood_raises_gsr((x, neg) in magnitudes_and_signs(64), frac in 0.01..0.99f64, pick in any::<prop::sample::Index>()) {
        let rich = (0..x.len()).max_by(|&a, &b| x[a].total_cmp(&x[b])).unwrap();
        let poor = pick.index(x.len());
        prop_assume!(x[rich] - x[poor] > 1e-3);
        let alpha = frac * (x[rich] - x[poor]) / 2.0;
        let mut y = x.clone();
        y[rich] -= alpha;
        y[poor] += alpha;
        let (before, after) = (gsr(&signed(&x, &neg)), gsr(&signed(&y, &neg)));
        prop_assert!(after > before, "GSR {before} -> {after}");
    }

    /// D2 dilation invariance: GSR(c x) = GSR(x) for c != 0.
    #[test]
    fn gsr_d2_scaling_leaves_it_unchanged((x, neg) in magnitudes_and_signs(64), c in prop_oneof![-1e3..-1e-3f64, 1e-3..1e3f64]) {
        let x = signed(&x, &neg);
        prop_assume!(x.iter().any(|&v| v != 0.0));
        let scaled: Vec<f64> = x.iter().map(|v| c * v).collect();
        prop_assert!((gsr(&scaled) - gsr(&x)).abs() < 1e-12);
    }

    /// D3 rising tide: adding alpha > 0 to every magnitude raises GSR unless
    /// all magnitudes are already equal (d GSR / d alpha has the sign of
    /// N l2^2 - l1^2 >= 0, Cauchy-Schwarz).
    #[test]
    fn gsr_d3_rising_tide_raises_gsr((x, neg) in magnitudes_and_signs(64), alpha in 1e-2..10.0f64) {
        let spread = x.iter().copied().fold(f64::NEG_INFINITY, f64::max) - x.iter().copied().fold(f64::INFINITY, f64::min);
        prop_assume!(spread > 0.1);
        let raised: Vec<f64> = x.iter().map(|v| v + alpha).collect();
        let (before, after) = (gsr(&signed(&x, &neg)), gsr(&signed(&raised, &neg)));
        prop_assert!(after > before, "GSR {before} -> {after}");
    }

    /// D4 cloning invariance: GSR([x, x, ..., x]) = GSR(x).
    #[test]
    fn gsr_d4_cloning_leaves_it_unchanged((x, neg) in magnitudes_and_signs(64), k in 2usize..5) {
        let x = signed(&x, &neg);
        prop_assume!(x.iter().any(|&v| v != 0.0));
        let cloned: Vec<f64> = x.iter().copied().cycle().take(k * x.len()).collect();
        prop_assert!((gsr(&cloned) - gsr(&x)).abs() < 1e-12);
    }

    /// P1 (appendix A.7, "dominance by maximum value"): as one entry grows
    /// without bound the vector becomes maximally sparse, GSR -> 1/sqrt(N)
    /// (the eq. 17 convention's "max"), monotonically once the entry is the
    /// largest, within 1/sqrt(N) <= GSR <= (1 + l1_rest / x_max) / sqrt(N).
    #[test]
    fn gsr_p1_one_dominant_entry_drives_it_to_the_sparsest_value((x, neg) in magnitudes_and_signs(64), at in any::<prop::sample::Index>()) {
        let at = at.index(x.len());
        let n = x.len() as f64;
        let rest_l1: f64 = x.iter().enumerate().filter(|&(k, _)| k != at).map(|(_, v)| v).sum();
        // With every other entry zero the vector is already maximally sparse.
        prop_assume!(rest_l1 > 1e-6);
        let mut previous = f64::INFINITY;
        for e in 0..8 {
            let big = 10f64.powi(e);
            let mut y = x.clone();
            y[at] = 1.0 + big; // above every other magnitude (all < 1)
            let g = gsr(&signed(&y, &neg));
            prop_assert!(g < previous, "GSR must fall as the entry grows: {previous} -> {g}");
            prop_assert!(g >= 1.0 / n.sqrt() - 1e-15);
            prop_assert!(g <= (1.0 + rest_l1 / y[at]) / n.sqrt() + 1e-15);
            previous = g;
        }
        prop_assert!(previous - 1.0 / n.sqrt() < 1e-6);
    }

    /// P2: appending k zeros lowers GSR (sparser), exactly by sqrt(N / (N + k)).
    #[test]
    fn gsr_p2_adding_zeros_lowers_it((x, neg) in magnitudes_and_signs(64), k in 1usize..20) {
        let x = signed(&x, &neg);
        prop_assume!(x.iter().any(|&v| v != 0.0));
        let mut padded = x.clone();
        padded.extend(std::iter::repeat_n(0.0, k));
        let (before, after) = (gsr(&x), gsr(&padded));
        prop_assert!(after < before);
        let n = x.len() as f64;
        prop_assert!((after - before * (n / (n + k as f64)).sqrt()).abs() < 1e-12);
    }
}

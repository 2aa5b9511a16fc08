//! Adapter geometry: hand-computed cases, the low-rank paths against dense
//! nalgebra SVDs, the per-site summary against the standalone functions, the
//! collision thresholds, and typed errors.

mod common;

use candle_core::DType;
use common::{random_matrix, rng, to_tensor};
use nalgebra::DMatrix;
use nlora_math::metrics::{
    average_collision_rate, awom, collision_rate, generalized_sparsity_rate, geometry,
    orthogonal_overlap, site_geometry, CollisionThreshold, LowRankUpdate, SiteHistory,
};
use nlora_math::MathError;

fn update(seed: u64, r: usize, input: usize, out: usize, scale: f64) -> LowRankUpdate {
    let mut rng = rng(seed);
    let a = random_matrix(&mut rng, r, input);
    let b = random_matrix(&mut rng, out, r);
    LowRankUpdate::new(a, b, scale).unwrap()
}

fn dense_singular_values(m: &DMatrix<f64>) -> Vec<f64> {
    let mut s: Vec<f64> = m.clone().singular_values().iter().copied().collect();
    s.sort_by(|x, y| y.total_cmp(x));
    s
}

#[test]
fn orthogonal_overlap_hand_cases() {
    // Rows of an orthogonal matrix split among three tasks: every A_i A_T^T = 0.
    let q = random_matrix(&mut rng(1), 12, 12).qr().q();
    let rows = |from: usize, n: usize| q.transpose().rows(from, n).into_owned();
    let b = random_matrix(&mut rng(2), 5, 4);
    let task = |from| LowRankUpdate::new(rows(from, 4), b.clone(), 1.0).unwrap();
    let oo = orthogonal_overlap(&[task(0), task(4)], &task(8)).unwrap();
    assert!(oo < 1e-28, "OO = {oo}");

    // A_1 = [1 1 0], A_T = [[2 0 0], [0 3 0]]: A_1 A_T^T = [2 3], ||.||_F^2 = 4 + 9 = 13.
    let one = |a: DMatrix<f64>| {
        let r = a.nrows();
        LowRankUpdate::new(a, DMatrix::from_element(2, r, 1.0), 1.0).unwrap()
    };
    let a1 = one(DMatrix::from_row_slice(1, 3, &[1.0, 1.0, 0.0]));
    let at = one(DMatrix::from_row_slice(
        2,
        3,
        &[2.0, 0.0, 0.0, 0.0, 3.0, 0.0],
    ));
    assert_eq!(
        orthogonal_overlap(std::slice::from_ref(&a1), &at).unwrap(),
        13.0
    );
    // Two previous tasks add up: 13 + 13.
    assert_eq!(orthogonal_overlap(&[a1.clone(), a1], &at).unwrap(), 26.0);
}

#[test]
fn awom_and_collisions_vanish_for_disjoint_supports() {
    // Task 1 uses input features 0..3, task 2 features 3..6 (PEFT columns).
    let mut a1 = random_matrix(&mut rng(3), 2, 6);
    let mut a2 = random_matrix(&mut rng(4), 3, 6);
    a1.columns_mut(3, 3).fill(0.0);
    a2.columns_mut(0, 3).fill(0.0);
    let u1 = LowRankUpdate::new(a1, random_matrix(&mut rng(5), 4, 2), 1.0).unwrap();
    let u2 = LowRankUpdate::new(a2, random_matrix(&mut rng(6), 4, 3), 2.0).unwrap();
    assert_eq!(awom(std::slice::from_ref(&u1), &u2).unwrap(), 0.0);
    assert_eq!(
        collision_rate(&u1.dense(), &u2.dense(), CollisionThreshold::Absolute(0.0)).unwrap(),
        0.0
    );
    // Hand case with collisions: dW_1 = [[1, 0], [0, 0]], dW_2 = [[1, 0], [0, 0]] * 3.
    let e = |b: &[f64]| {
        LowRankUpdate::new(
            DMatrix::from_row_slice(1, 2, &[1.0, 0.0]),
            DMatrix::from_row_slice(2, 1, b),
            1.0,
        )
        .unwrap()
    };
    // dW_T dW_1^T = [[3, 0], [0, 0]]: spectral norm 3; they collide at 1 of 4 positions.
    assert!((awom(&[e(&[1.0, 0.0])], &e(&[3.0, 0.0])).unwrap() - 3.0).abs() < 1e-12);
    assert_eq!(
        collision_rate(
            &e(&[1.0, 0.0]).dense(),
            &e(&[3.0, 0.0]).dense(),
            CollisionThreshold::Absolute(0.0)
        )
        .unwrap(),
        0.25
    );
}

#[test]
fn low_rank_singular_values_match_dense_svd() {
    // (r, in, out, scale), including r larger than out / in.
    for (seed, &(r, input, out, scale)) in [
        (8, 48, 64, 1.0),
        (8, 64, 40, 4.0),
        (8, 6, 5, 2.0),
        (3, 30, 30, -0.5),
    ]
    .iter()
    .enumerate()
    {
        let u = update(seed as u64, r, input, out, scale);
        let dense = dense_singular_values(&u.dense());
        let low: Vec<f64> = u.singular_values().unwrap().iter().copied().collect();
        let k = r.min(input).min(out);
        assert_eq!(low.len(), k);
        for (i, (l, d)) in low.iter().zip(&dense).enumerate() {
            assert!(
                (l - d).abs() < 1e-9 * dense[0],
                "sigma_{i}: low-rank {l}, dense {d}"
            );
        }
        assert!(
            dense[k..].iter().all(|&d| d < 1e-9 * dense[0]),
            "dW has rank <= r"
        );
        let nuclear: f64 = dense.iter().sum();
        assert!(
            (u.nuclear_norm().unwrap() - nuclear).abs() < 1e-4,
            "nuclear norm"
        );
        assert!(
            (u.spectral_norm().unwrap() - dense[0]).abs() < 1e-4,
            "spectral norm"
        );
        assert!((u.frobenius_norm() - u.dense().norm()).abs() < 1e-9 * u.dense().norm());
    }
}

#[test]
fn awom_matches_dense_spectral_norm() {
    let current = update(10, 8, 40, 56, 4.0);
    let previous = [
        update(11, 8, 40, 56, 4.0),
        update(12, 5, 40, 56, 1.0),
        update(13, 16, 40, 56, 0.5),
    ];
    let want: f64 = previous
        .iter()
        .map(|p| dense_singular_values(&(current.dense() * p.dense().transpose()))[0])
        .sum();
    let got = awom(&previous, &current).unwrap();
    assert!((got - want).abs() < 1e-9 * want, "AWOM {got}, dense {want}");

    let want_oo: f64 = previous
        .iter()
        .map(|p| (p.a() * current.a().transpose()).norm_squared())
        .sum();
    assert!((orthogonal_overlap(&previous, &current).unwrap() - want_oo).abs() < 1e-9 * want_oo);
}

#[test]
fn thresholds_hand_case() {
    let x = DMatrix::from_row_slice(2, 2, &[1.0, 0.3, 0.05, 0.0]);
    let y = DMatrix::from_row_slice(2, 2, &[10.0, 2.0, 5.0, 0.5]);
    let cr = |t| collision_rate(&x, &y, t).unwrap();
    // Non-zero: x at (0,0), (0,1), (1,0); y everywhere -> 3 of 4.
    assert_eq!(cr(CollisionThreshold::Absolute(0.0)), 0.75);
    // |.| > 0.1: x at (0,0), (0,1); y everywhere -> 2 of 4.
    assert_eq!(cr(CollisionThreshold::Absolute(0.1)), 0.5);
    // Own max: x > 0.2 at (0,0), (0,1); y > 2 at (0,0), (1,0) -> only (0,0).
    assert_eq!(cr(CollisionThreshold::RelativeToMax(0.2)), 0.25);
    // Site max 10 -> tau = 2 for both: x has no entry above 2.
    assert_eq!(cr(CollisionThreshold::RelativeToSiteMax(0.2)), 0.0);

    // ACR (eq. 10) of three updates is the mean of the three pairs.
    let z = DMatrix::from_row_slice(2, 2, &[0.0, 0.0, 0.0, 1.0]);
    let exact = CollisionThreshold::Absolute(0.0);
    let pairs = [
        cr(exact),
        collision_rate(&x, &z, exact).unwrap(),
        collision_rate(&y, &z, exact).unwrap(),
    ];
    assert_eq!(pairs, [0.75, 0.0, 0.25]);
    let acr = average_collision_rate(&[x, y, z], exact).unwrap();
    assert!((acr - 1.0 / 3.0).abs() < 1e-15);
}

#[test]
fn site_geometry_agrees_with_the_standalone_metrics() {
    let tasks: Vec<LowRankUpdate> = (0..4).map(|k| update(20 + k, 8, 36, 28, 4.0)).collect();
    let site = SiteHistory {
        name: "model.layers.0.self_attn.q_proj".into(),
        tasks: tasks.clone(),
    };
    for threshold in [
        CollisionThreshold::Absolute(0.5),
        CollisionThreshold::RelativeToMax(0.3),
        CollisionThreshold::RelativeToSiteMax(0.3),
    ] {
        let g = site_geometry(&site, threshold).unwrap();
        let (previous, last) = tasks.split_at(3);
        assert!(
            (g.orthogonal_overlap - orthogonal_overlap(previous, &last[0]).unwrap()).abs() < 1e-12
        );
        assert!((g.awom - awom(previous, &last[0]).unwrap()).abs() < 1e-9);
        let dense: Vec<DMatrix<f64>> = tasks.iter().map(LowRankUpdate::dense).collect();
        for (k, t) in tasks.iter().enumerate() {
            assert!(
                (g.gsr[k].unwrap() - generalized_sparsity_rate(dense[k].as_slice()).unwrap()).abs()
                    < 1e-12
            );
            assert!((g.nuclear_norm[k] - t.nuclear_norm().unwrap()).abs() < 1e-12);
        }
        assert_eq!(g.collisions.len(), 6);
        for pair in &g.collisions {
            // Per pair the "site" of RelativeToSiteMax is the whole site, so compare
            // against the four-update ACR only; per-pair values for the others.
            if !matches!(threshold, CollisionThreshold::RelativeToSiteMax(_)) {
                let want = collision_rate(&dense[pair.i], &dense[pair.j], threshold).unwrap();
                assert_eq!(
                    pair.rate, want,
                    "CR_{}{} under {threshold:?}",
                    pair.i, pair.j
                );
            }
        }
        let acr = average_collision_rate(&dense, threshold).unwrap();
        assert!((g.average_collision_rate.unwrap() - acr).abs() < 1e-15);
        assert!(
            acr > 0.0 && acr < 1.0,
            "the thresholds give a non-trivial ACR: {acr}"
        );
    }
}

#[test]
fn geometry_means_over_sites() {
    let site = |name: &str, seed: u64| SiteHistory {
        name: name.into(),
        tasks: (0..3).map(|k| update(seed + k, 4, 20, 24, 1.0)).collect(),
    };
    let mut zero_last = site("v", 40);
    // An update held at zero (as strong N-LoRA penalties do): GSR undefined.
    let zero = LowRankUpdate::new(
        DMatrix::from_element(4, 20, 0.5),
        DMatrix::zeros(24, 4),
        1.0,
    )
    .unwrap();
    zero_last.tasks[2] = zero;
    let sites = [site("q", 30), zero_last];
    let t = CollisionThreshold::RelativeToMax(0.1);
    let summary = geometry(&sites, t).unwrap();
    let per: Vec<_> = sites.iter().map(|s| site_geometry(s, t).unwrap()).collect();
    assert_eq!(summary.sites, per);
    assert_eq!(summary.threshold, t);
    assert!((summary.mean_awom - (per[0].awom + per[1].awom) / 2.0).abs() < 1e-12);
    assert!(
        (summary.mean_orthogonal_overlap
            - (per[0].orthogonal_overlap + per[1].orthogonal_overlap) / 2.0)
            .abs()
            < 1e-12
    );
    assert_eq!(per[1].gsr[2], None);
    assert_eq!(per[1].nuclear_norm[2], 0.0);
    assert_eq!(per[1].density[2], 0.0);
    assert_eq!(
        summary.mean_gsr[2], per[0].gsr[2],
        "the zero update is left out of the mean"
    );
    let mean_acr =
        (per[0].average_collision_rate.unwrap() + per[1].average_collision_rate.unwrap()) / 2.0;
    assert!((summary.mean_average_collision_rate.unwrap() - mean_acr).abs() < 1e-15);

    // One task: OO = AWOM = 0 and no ACR.
    let single = SiteHistory {
        name: "k".into(),
        tasks: vec![update(50, 4, 20, 24, 1.0)],
    };
    let g = geometry(&[single], t).unwrap();
    assert_eq!((g.mean_orthogonal_overlap, g.mean_awom), (0.0, 0.0));
    assert_eq!(g.mean_average_collision_rate, None);
    assert!(g.sites[0].collisions.is_empty());
}

#[test]
fn from_tensors_reads_peft_layout() {
    let u = update(60, 3, 7, 5, 4.0);
    for dtype in [DType::F64, DType::F32] {
        let t =
            LowRankUpdate::from_tensors(&to_tensor(u.a(), dtype), &to_tensor(u.b(), dtype), 4.0)
                .unwrap();
        assert_eq!((t.rank(), t.in_features(), t.out_features()), (3, 7, 5));
        let tol = if dtype == DType::F64 { 0.0 } else { 1e-6 };
        assert!((t.dense() - u.dense()).abs().max() <= tol * 10.0);
    }
}

#[test]
fn bad_inputs_are_typed_errors() {
    let mut rng = rng(70);
    let a = random_matrix(&mut rng, 3, 6);
    let b_wrong_rank = random_matrix(&mut rng, 4, 2);
    assert!(matches!(
        LowRankUpdate::new(a.clone(), b_wrong_rank, 1.0),
        Err(MathError::Shape { .. })
    ));

    let mut nan = a.clone();
    nan[(1, 4)] = f64::NAN;
    let err = LowRankUpdate::new(nan, random_matrix(&mut rng, 4, 3), 1.0).unwrap_err();
    assert!(
        matches!(&err, MathError::NonFinite { what, row: 1, col: 4, .. } if what == "lora_A"),
        "{err}"
    );

    let u = update(71, 3, 6, 4, 1.0);
    let other_shape = update(72, 3, 6, 5, 1.0);
    assert!(matches!(
        awom(std::slice::from_ref(&other_shape), &u),
        Err(MathError::Shape { .. })
    ));
    let err = site_geometry(
        &SiteHistory {
            name: "layers.2.v_proj".into(),
            tasks: vec![other_shape, u.clone()],
        },
        CollisionThreshold::Absolute(0.0),
    )
    .unwrap_err();
    assert!(err.to_string().contains("layers.2.v_proj"), "{err}");

    for bad in [
        CollisionThreshold::Absolute(-1.0),
        CollisionThreshold::RelativeToMax(1.0),
        CollisionThreshold::RelativeToSiteMax(f64::NAN),
    ] {
        assert!(matches!(
            collision_rate(&u.dense(), &u.dense(), bad),
            Err(MathError::InvalidParameter { .. })
        ));
    }
    assert!(matches!(
        collision_rate(
            &u.dense(),
            &DMatrix::zeros(2, 2),
            CollisionThreshold::Absolute(0.0)
        ),
        Err(MathError::Shape { .. })
    ));
    assert!(matches!(
        average_collision_rate(&[u.dense()], CollisionThreshold::Absolute(0.0)),
        Err(MathError::TooFewTasks { .. })
    ));
    assert!(matches!(
        geometry(&[], CollisionThreshold::Absolute(0.0)),
        Err(MathError::NoSites { .. })
    ));
    let ragged = [
        SiteHistory {
            name: "a".into(),
            tasks: vec![u.clone(), u.clone()],
        },
        SiteHistory {
            name: "b".into(),
            tasks: vec![u],
        },
    ];
    assert!(matches!(
        geometry(&ragged, CollisionThreshold::Absolute(0.0)),
        Err(MathError::Shape { .. })
    ));
}

//! The training penalties: values against an independent nalgebra
//! computation, autograd gradients against central finite differences (f64
//! and f32), zero subgradients at exact zeros, and typed errors.

mod common;

use candle_core::{DType, Tensor, Var};
use common::{from_tensor, random_matrix, rng, sign, to_tensor};
use nalgebra::DMatrix;
use nlora_math::penalty::{
    factor_l1, nlora_l1, olora_l2, olora_orthogonality, FactorSparsity, NLoraForm,
    OrthogonalityForm, Site,
};
use nlora_math::MathError;

/// One site's matrices on the host; `previous` is (stacked A, stacked B).
#[derive(Clone, Debug)]
struct SiteData {
    name: String,
    a: DMatrix<f64>,
    b: DMatrix<f64>,
    previous: Option<(DMatrix<f64>, DMatrix<f64>)>,
}

/// (r, in, out, r_prev); r_prev = 0 means no earlier tasks.
type Shape = (usize, usize, usize, usize);

const SHAPES: [Shape; 3] = [(3, 6, 5, 4), (2, 4, 3, 0), (3, 5, 5, 2)];
const SQUARE_SHAPES: [Shape; 2] = [(3, 6, 6, 2), (2, 4, 4, 0)];

fn random_sites(seed: u64, shapes: &[Shape]) -> Vec<SiteData> {
    let mut rng = rng(seed);
    shapes
        .iter()
        .enumerate()
        .map(|(k, &(r, input, out, r_prev))| SiteData {
            name: format!("model.layers.{k}.self_attn.q_proj"),
            a: random_matrix(&mut rng, r, input),
            b: random_matrix(&mut rng, out, r),
            previous: (r_prev > 0).then(|| {
                (
                    random_matrix(&mut rng, r_prev, input),
                    random_matrix(&mut rng, out, r_prev),
                )
            }),
        })
        .collect()
}

type PenaltyFn = dyn Fn(&[Site<'_>]) -> nlora_math::Result<Tensor>;

/// The penalty over `data` with the current A/B given as tensors (plain or Var).
fn penalty_with(
    data: &[SiteData],
    current: &[(Tensor, Tensor)],
    dtype: DType,
    f: &PenaltyFn,
) -> Tensor {
    let previous: Vec<Option<(Tensor, Tensor)>> = data
        .iter()
        .map(|s| {
            s.previous
                .as_ref()
                .map(|(pa, pb)| (to_tensor(pa, dtype), to_tensor(pb, dtype)))
        })
        .collect();
    let sites: Vec<Site<'_>> = data
        .iter()
        .zip(current)
        .zip(&previous)
        .map(|((s, (a, b)), p)| {
            let site = Site::new(a, b).named(&s.name);
            match p {
                Some((pa, pb)) => site.with_previous(pa, pb),
                None => site,
            }
        })
        .collect();
    f(&sites).expect("penalty")
}

fn value(data: &[SiteData], dtype: DType, f: &PenaltyFn) -> f64 {
    let current: Vec<(Tensor, Tensor)> = data
        .iter()
        .map(|s| (to_tensor(&s.a, dtype), to_tensor(&s.b, dtype)))
        .collect();
    let t = penalty_with(data, &current, dtype, f);
    assert_eq!(t.dims(), &[] as &[usize], "a penalty is a scalar");
    assert_eq!(t.dtype(), dtype);
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

/// (grad A, grad B) per site by candle's backward; a missing gradient is zero.
fn autograd(data: &[SiteData], dtype: DType, f: &PenaltyFn) -> Vec<(DMatrix<f64>, DMatrix<f64>)> {
    let vars: Vec<(Var, Var)> = data
        .iter()
        .map(|s| {
            (
                Var::from_tensor(&to_tensor(&s.a, dtype)).unwrap(),
                Var::from_tensor(&to_tensor(&s.b, dtype)).unwrap(),
            )
        })
        .collect();
    let current: Vec<(Tensor, Tensor)> = vars
        .iter()
        .map(|(a, b)| (a.as_tensor().clone(), b.as_tensor().clone()))
        .collect();
    let grads = penalty_with(data, &current, dtype, f).backward().unwrap();
    let grad_of = |v: &Var, like: &DMatrix<f64>| match grads.get(v.as_tensor()) {
        Some(g) => from_tensor(g),
        None => DMatrix::zeros(like.nrows(), like.ncols()),
    };
    vars.iter()
        .zip(data)
        .map(|((a, b), s)| (grad_of(a, &s.a), grad_of(b, &s.b)))
        .collect()
}

/// Central differences of the penalty evaluated in `dtype`.
fn finite_difference(
    data: &[SiteData],
    dtype: DType,
    f: &PenaltyFn,
    eps: f64,
) -> Vec<(DMatrix<f64>, DMatrix<f64>)> {
    let mut out = Vec::new();
    for k in 0..data.len() {
        let mut grads = (DMatrix::zeros(0, 0), DMatrix::zeros(0, 0));
        for which in 0..2 {
            let m = if which == 0 { &data[k].a } else { &data[k].b };
            let g = DMatrix::from_fn(m.nrows(), m.ncols(), |i, j| {
                let at = |delta: f64| {
                    let mut d = data.to_vec();
                    let target = if which == 0 { &mut d[k].a } else { &mut d[k].b };
                    target[(i, j)] += delta;
                    value(&d, dtype, f)
                };
                (at(eps) - at(-eps)) / (2.0 * eps)
            });
            if which == 0 {
                grads.0 = g;
            } else {
                grads.1 = g;
            }
        }
        out.push(grads);
    }
    out
}

fn relative_error(
    got: &[(DMatrix<f64>, DMatrix<f64>)],
    want: &[(DMatrix<f64>, DMatrix<f64>)],
) -> f64 {
    let mut diff = 0.0;
    let mut norm = 0.0;
    for ((ga, gb), (wa, wb)) in got.iter().zip(want) {
        diff += (ga - wa).norm_squared() + (gb - wb).norm_squared();
        norm += wa.norm_squared() + wb.norm_squared();
    }
    assert!(
        norm > 1e-6,
        "the reference gradient is zero: the check would be vacuous"
    );
    (diff / norm).sqrt()
}

fn all_finite(g: &[(DMatrix<f64>, DMatrix<f64>)]) -> bool {
    g.iter()
        .all(|(a, b)| a.iter().chain(b.iter()).all(|x| x.is_finite()))
}

/// A penalty under test: the function, its value recomputed independently in
/// nalgebra, and the quantities at whose zeros it has a kink.
struct Case {
    name: &'static str,
    penalty: Box<PenaltyFn>,
    reference: fn(&[SiteData]) -> f64,
    kinks: fn(&SiteData) -> Vec<f64>,
    shapes: &'static [Shape],
}

fn l1(m: &DMatrix<f64>) -> f64 {
    m.iter().map(|x| x.abs()).sum()
}

fn overlap(s: &SiteData) -> Option<DMatrix<f64>> {
    s.previous.as_ref().map(|(pa, _)| pa * s.a.transpose())
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "N-LoRA paper form, scale 1",
            penalty: Box::new(|s| nlora_l1(s, 0.4, NLoraForm::default())),
            reference: |d| 0.4 * d.iter().map(|s| l1(&(&s.b * &s.a))).sum::<f64>(),
            kinks: |s| (&s.b * &s.a).iter().copied().collect(),
            shapes: &SHAPES,
        },
        Case {
            name: "N-LoRA paper form, scale alpha/r = 4",
            penalty: Box::new(|s| nlora_l1(s, 0.3, NLoraForm::Update { scale: 4.0 })),
            reference: |d| 0.3 * d.iter().map(|s| l1(&(&s.b * &s.a * 4.0))).sum::<f64>(),
            kinks: |s| (&s.b * &s.a).iter().copied().collect(),
            shapes: &SHAPES,
        },
        Case {
            name: "N-LoRA reference-code form",
            penalty: Box::new(|s| nlora_l1(s, 0.4, NLoraForm::ReferenceCode)),
            reference: |d| 0.4 * d.iter().map(|s| l1(&(&s.a * &s.b))).sum::<f64>(),
            kinks: |s| (&s.a * &s.b).iter().copied().collect(),
            shapes: &SQUARE_SHAPES,
        },
        Case {
            name: "O-LoRA orthogonality, paper (Frobenius squared)",
            penalty: Box::new(|s| olora_orthogonality(s, 0.5, OrthogonalityForm::FrobeniusSquared)),
            reference: |d| {
                0.5 * d
                    .iter()
                    .filter_map(overlap)
                    .map(|m| m.norm_squared())
                    .sum::<f64>()
            },
            kinks: |_| vec![],
            shapes: &SHAPES,
        },
        Case {
            name: "O-LoRA orthogonality, reference code (abs sum)",
            penalty: Box::new(|s| olora_orthogonality(s, 0.5, OrthogonalityForm::AbsSum)),
            reference: |d| 0.5 * d.iter().filter_map(overlap).map(|m| l1(&m)).sum::<f64>(),
            kinks: |s| {
                overlap(s)
                    .map(|m| m.iter().copied().collect())
                    .unwrap_or_default()
            },
            shapes: &SHAPES,
        },
        Case {
            name: "O-LoRA l2",
            penalty: Box::new(|s| olora_l2(s, 0.1)),
            reference: |d| 0.1 * d.iter().map(|s| s.a.norm() + s.b.norm()).sum::<f64>(),
            kinks: |s| vec![s.a.norm(), s.b.norm()],
            shapes: &SHAPES,
        },
        Case {
            name: "SA (l1 on A)",
            penalty: Box::new(|s| factor_l1(s, 0.2, FactorSparsity::OnlyA)),
            reference: |d| 0.2 * d.iter().map(|s| l1(&s.a)).sum::<f64>(),
            kinks: |s| s.a.iter().copied().collect(),
            shapes: &SHAPES,
        },
        Case {
            name: "SB (l1 on B)",
            penalty: Box::new(|s| factor_l1(s, 0.2, FactorSparsity::OnlyB)),
            reference: |d| 0.2 * d.iter().map(|s| l1(&s.b)).sum::<f64>(),
            kinks: |s| s.b.iter().copied().collect(),
            shapes: &SHAPES,
        },
        Case {
            name: "SAB (l1 on A and on B)",
            penalty: Box::new(|s| factor_l1(s, 0.2, FactorSparsity::Both)),
            reference: |d| 0.2 * d.iter().map(|s| l1(&s.a) + l1(&s.b)).sum::<f64>(),
            kinks: |s| s.a.iter().chain(s.b.iter()).copied().collect(),
            shapes: &SHAPES,
        },
    ]
}

/// Random sites whose kink quantities all stay at least `margin` from zero,
/// so that finite differences do not straddle a kink.
fn sites_away_from_kinks(case: &Case, margin: f64) -> Vec<SiteData> {
    for seed in 0..10_000 {
        let data = random_sites(seed, case.shapes);
        let closest = data
            .iter()
            .flat_map(|s| (case.kinks)(s))
            .fold(f64::INFINITY, |m, x| m.min(x.abs()));
        if closest > margin {
            return data;
        }
    }
    panic!("{}: no random sites away from the kinks", case.name);
}

#[test]
fn penalty_values_match_an_independent_computation() {
    for case in cases() {
        let data = random_sites(7, case.shapes);
        let want = (case.reference)(&data);
        let got64 = value(&data, DType::F64, &*case.penalty);
        assert!(
            (got64 - want).abs() <= 1e-12 * want.abs().max(1.0),
            "{}: f64 value {got64}, want {want}",
            case.name
        );
        let got32 = value(&data, DType::F32, &*case.penalty);
        assert!(
            (got32 - want).abs() <= 1e-5 * want.abs().max(1.0),
            "{}: f32 value {got32}, want {want}",
            case.name
        );
    }
}

#[test]
fn autograd_matches_finite_differences_f64() {
    for case in cases() {
        let data = sites_away_from_kinks(&case, 0.02);
        let auto = autograd(&data, DType::F64, &*case.penalty);
        let fd = finite_difference(&data, DType::F64, &*case.penalty, 1e-6);
        let err = relative_error(&auto, &fd);
        assert!(err < 1e-3, "{}: relative error {err:e} (f64)", case.name);
    }
}

#[test]
fn autograd_matches_finite_differences_f32() {
    for case in cases() {
        let data = sites_away_from_kinks(&case, 0.05);
        let auto = autograd(&data, DType::F32, &*case.penalty);
        let fd = finite_difference(&data, DType::F32, &*case.penalty, 5e-3);
        let err = relative_error(&auto, &fd);
        assert!(err < 1e-2, "{}: relative error {err:e} (f32)", case.name);
    }
}

/// Sites as at the start of a task: B = 0, so dW = 0 and every |.| sits at its kink.
fn freshly_initialised(data: &[SiteData]) -> Vec<SiteData> {
    data.iter()
        .map(|s| SiteData {
            b: DMatrix::zeros(s.b.nrows(), s.b.ncols()),
            ..s.clone()
        })
        .collect()
}

#[test]
fn zero_update_gives_zero_gradient_not_nan() {
    for dtype in [DType::F64, DType::F32] {
        let data = freshly_initialised(&random_sites(3, &SQUARE_SHAPES));
        for (name, f) in [
            (
                "N-LoRA paper form",
                Box::new(|s: &[Site<'_>]| nlora_l1(s, 0.4, NLoraForm::default())) as Box<PenaltyFn>,
            ),
            (
                "N-LoRA reference code",
                Box::new(|s: &[Site<'_>]| nlora_l1(s, 0.4, NLoraForm::ReferenceCode)),
            ),
            (
                "SB",
                Box::new(|s: &[Site<'_>]| factor_l1(s, 0.4, FactorSparsity::OnlyB)),
            ),
        ] {
            let g = autograd(&data, dtype, &*f);
            assert!(
                all_finite(&g),
                "{name} {dtype:?}: non-finite gradient at B = 0"
            );
            for (k, (ga, gb)) in g.iter().enumerate() {
                assert_eq!(
                    ga.norm(),
                    0.0,
                    "{name} {dtype:?}: site {k} grad A at dW = 0"
                );
                assert_eq!(
                    gb.norm(),
                    0.0,
                    "{name} {dtype:?}: site {k} grad B at dW = 0"
                );
            }
        }
    }
}

#[test]
fn l2_norm_of_zero_b_has_zero_gradient_not_nan() {
    let data = freshly_initialised(&random_sites(5, &SHAPES));
    let g = autograd(&data, DType::F64, &|s| olora_l2(s, 1.0));
    assert!(all_finite(&g));
    for (s, (ga, gb)) in data.iter().zip(&g) {
        assert_eq!(gb.norm(), 0.0, "grad of ||B||_2 at B = 0");
        // d||A||/dA = A / ||A|| away from zero.
        assert!((ga - &s.a / s.a.norm()).norm() < 1e-12);
    }
}

#[test]
fn partially_zero_update_gets_the_sign_zero_subgradient() {
    // A zero row in B and a zero column in A make rows / columns of dW exactly
    // zero; the subgradient there must use sign(0) = 0 (PyTorch's convention).
    let mut data = random_sites(11, &SHAPES);
    for s in &mut data {
        s.b.row_mut(0).fill(0.0);
        s.a.column_mut(1).fill(0.0);
    }
    let g = autograd(&data, DType::F64, &|s| {
        nlora_l1(s, 1.0, NLoraForm::default())
    });
    for (s, (ga, gb)) in data.iter().zip(&g) {
        let signs = (&s.b * &s.a).map(sign);
        let want_a = s.b.transpose() * &signs;
        let want_b = &signs * s.a.transpose();
        assert!(
            (ga - want_a).norm() < 1e-12,
            "grad A differs from B^T sign(BA)"
        );
        assert!(
            (gb - want_b).norm() < 1e-12,
            "grad B differs from sign(BA) A^T"
        );
    }
    // l1 on factors with exact zeros: the zero entries get gradient 0.
    let g = autograd(&data, DType::F64, &|s| {
        factor_l1(s, 1.0, FactorSparsity::Both)
    });
    for (s, (ga, gb)) in data.iter().zip(&g) {
        assert_eq!(ga, &s.a.map(sign));
        assert_eq!(gb, &s.b.map(sign));
    }
}

#[test]
fn orthogonal_adapters_give_zero_abs_sum_gradient_not_nan() {
    // Previous and current A on disjoint input columns: A_prev A^T is exactly 0.
    let mut data = random_sites(13, &SHAPES);
    for s in &mut data {
        let input = s.a.ncols();
        if let Some((pa, _)) = &mut s.previous {
            for c in 0..input {
                if c % 2 == 0 {
                    pa.column_mut(c).fill(0.0);
                } else {
                    s.a.column_mut(c).fill(0.0);
                }
            }
        }
    }
    let g = autograd(&data, DType::F64, &|s| {
        olora_orthogonality(s, 0.5, OrthogonalityForm::AbsSum)
    });
    assert!(all_finite(&g));
    assert!(g
        .iter()
        .all(|(ga, gb)| ga.norm() == 0.0 && gb.norm() == 0.0));
    assert_eq!(
        value(&data, DType::F64, &|s| olora_orthogonality(
            s,
            0.5,
            OrthogonalityForm::AbsSum
        )),
        0.0
    );
}

#[test]
fn sites_without_previous_tasks_contribute_zero() {
    let data: Vec<SiteData> = random_sites(17, &SHAPES)
        .into_iter()
        .map(|s| SiteData {
            previous: None,
            ..s
        })
        .collect();
    for form in [
        OrthogonalityForm::FrobeniusSquared,
        OrthogonalityForm::AbsSum,
    ] {
        assert_eq!(
            value(&data, DType::F32, &move |s| olora_orthogonality(
                s, 0.5, form
            )),
            0.0
        );
    }
}

#[test]
fn reference_code_form_on_gqa_v_proj_names_the_site() {
    // SmolLM2's v_proj maps 576 -> 192; a scaled-down analogue.
    let a = to_tensor(&DMatrix::from_element(8, 12, 0.1), DType::F32);
    let b = to_tensor(&DMatrix::from_element(4, 8, 0.1), DType::F32);
    let q = to_tensor(&DMatrix::from_element(8, 12, 0.1), DType::F32);
    let bq = to_tensor(&DMatrix::from_element(12, 8, 0.1), DType::F32);
    let sites = [
        Site::new(&q, &bq).named("model.layers.0.self_attn.q_proj"),
        Site::new(&a, &b).named("model.layers.0.self_attn.v_proj"),
    ];
    let err = nlora_l1(&sites, 0.4, NLoraForm::ReferenceCode).unwrap_err();
    match &err {
        MathError::ReferenceCodeNotSquare {
            site,
            r,
            in_features,
            out_features,
        } => {
            assert!(site.contains("model.layers.0.self_attn.v_proj"), "{site}");
            assert_eq!((*r, *in_features, *out_features), (8, 12, 4));
        }
        other => panic!("wrong error: {other}"),
    }
    let message = err.to_string();
    assert!(
        message.contains("NLoraForm::Update"),
        "the message says what to do: {message}"
    );
    // The paper form works on the same sites.
    assert!(nlora_l1(&sites, 0.4, NLoraForm::default()).is_ok());
}

#[test]
fn bad_inputs_are_typed_errors() {
    let a = to_tensor(&DMatrix::from_element(3, 5, 0.1), DType::F32);
    let b_wrong_rank = to_tensor(&DMatrix::from_element(4, 2, 0.1), DType::F32);
    let b = to_tensor(&DMatrix::from_element(4, 3, 0.1), DType::F32);
    let b64 = to_tensor(&DMatrix::from_element(4, 3, 0.1), DType::F64);
    let prev_wrong_in = to_tensor(&DMatrix::from_element(3, 6, 0.1), DType::F32);

    let err = nlora_l1(
        &[Site::new(&a, &b_wrong_rank).named("layer.q")],
        1.0,
        NLoraForm::default(),
    )
    .unwrap_err();
    assert!(
        matches!(&err, MathError::Shape { site, .. } if site.contains("layer.q")),
        "{err}"
    );

    let err = olora_l2(&[Site::new(&a, &b64)], 1.0).unwrap_err();
    assert!(err.to_string().contains("dtype"), "{err}");

    let err = olora_orthogonality(
        &[Site::new(&a, &b).with_previous(&prev_wrong_in, &b)],
        1.0,
        OrthogonalityForm::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("previous lora_A"), "{err}");

    assert!(matches!(
        nlora_l1(&[], 1.0, NLoraForm::default()),
        Err(MathError::NoSites { .. })
    ));
    assert!(matches!(
        factor_l1(&[Site::new(&a, &b)], -1.0, FactorSparsity::Both),
        Err(MathError::InvalidParameter { name: "lambda", .. })
    ));
    assert!(matches!(
        nlora_l1(
            &[Site::new(&a, &b)],
            1.0,
            NLoraForm::Update { scale: f64::NAN }
        ),
        Err(MathError::InvalidParameter { name: "scale", .. })
    ));
}

#[test]
fn paper_form_gradient_is_exact_on_larger_f32_sites() {
    // The hand-written gradient against B^T sign(BA) and sign(BA) A^T computed
    // in f64, on sites too large for finite differences.
    let mut rng = rng(19);
    let shapes: Vec<(DMatrix<f64>, DMatrix<f64>)> = (0..4)
        .map(|_| {
            (
                random_matrix(&mut rng, 8, 96),
                random_matrix(&mut rng, 64, 8),
            )
        })
        .collect();
    let vars: Vec<(Var, Var)> = shapes
        .iter()
        .map(|(a, b)| {
            (
                Var::from_tensor(&to_tensor(a, DType::F32)).unwrap(),
                Var::from_tensor(&to_tensor(b, DType::F32)).unwrap(),
            )
        })
        .collect();
    let sites: Vec<Site<'_>> = vars
        .iter()
        .map(|(a, b)| Site::new(a.as_tensor(), b.as_tensor()))
        .collect();
    let loss = nlora_l1(&sites, 1.0, NLoraForm::default()).unwrap();
    let grads = loss.backward().unwrap();
    for ((a, b), (va, vb)) in shapes.iter().zip(&vars) {
        let signs = (b * a).map(sign);
        let ga = from_tensor(grads.get(va.as_tensor()).unwrap());
        let gb = from_tensor(grads.get(vb.as_tensor()).unwrap());
        assert!((ga - b.transpose() * &signs).norm() / (b.transpose() * &signs).norm() < 1e-5);
        assert!((gb - &signs * a.transpose()).norm() / (&signs * a.transpose()).norm() < 1e-5);
    }
}

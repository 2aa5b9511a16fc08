//! Accuracy-matrix metrics: a hand-worked 4 x 4 case, validation, and a
//! property linking forgetting and backward transfer.

use nlora_math::metrics::AccuracyMatrix;
use nlora_math::MathError;
use proptest::prelude::*;
use proptest::test_runner::RngSeed;

/// a[i][j]: accuracy on task j after training task i.
fn hand_matrix() -> Vec<Vec<f64>> {
    vec![
        vec![0.90, 0.10, 0.05, 0.20],
        vec![0.80, 0.85, 0.15, 0.25],
        vec![0.70, 0.87, 0.88, 0.30],
        vec![0.60, 0.80, 0.70, 0.92],
    ]
}

const ZERO_SHOT: [f64; 4] = [0.05, 0.08, 0.10, 0.12];

fn close(got: f64, want: f64) -> bool {
    (got - want).abs() < 1e-12
}

#[test]
fn hand_worked_four_tasks() {
    let m = AccuracyMatrix::from_rows(&hand_matrix())
        .unwrap()
        .with_zero_shot(&ZERO_SHOT)
        .unwrap();
    // AA (eq. 5): last row (0.60 + 0.80 + 0.70 + 0.92) / 4 = 3.02 / 4 = 0.755.
    assert!(close(m.average_accuracy().unwrap(), 0.755));
    // F.Ra (eq. 6), t = 0..2, max over k in [t, 2] of a[k][t] minus a[3][t]:
    //   t = 0: max(0.90, 0.80, 0.70) = 0.90, - 0.60 = 0.30
    //   t = 1: max(0.85, 0.87)       = 0.87, - 0.80 = 0.07  (the max is not the diagonal)
    //   t = 2: max(0.88)             = 0.88, - 0.70 = 0.18
    //   F = (0.30 + 0.07 + 0.18) / 3 = 0.55 / 3
    assert!(close(m.forgetting().unwrap(), 0.55 / 3.0));
    // BWT: (0.60 - 0.90) + (0.80 - 0.85) + (0.70 - 0.88) = -0.30 - 0.05 - 0.18 = -0.53, / 3.
    assert!(close(m.backward_transfer().unwrap(), -0.53 / 3.0));
    // FWT: (a[0][1] - z1) + (a[1][2] - z2) + (a[2][3] - z3)
    //    = (0.10 - 0.08) + (0.15 - 0.10) + (0.30 - 0.12) = 0.02 + 0.05 + 0.18 = 0.25, / 3.
    assert!(close(m.forward_transfer().unwrap(), 0.25 / 3.0));

    let s = m.summary().unwrap();
    assert!(close(s.average_accuracy, 0.755));
    assert!(close(s.forgetting.unwrap(), 0.55 / 3.0));
    assert!(close(s.backward_transfer.unwrap(), -0.53 / 3.0));
    assert!(close(s.forward_transfer.unwrap(), 0.25 / 3.0));
}

#[test]
fn lower_triangle_as_the_reference_evaluates() {
    let lower: Vec<Vec<f64>> = hand_matrix()
        .into_iter()
        .enumerate()
        .map(|(i, row)| row[..=i].to_vec())
        .collect();
    let m = AccuracyMatrix::from_lower_triangle(&lower)
        .unwrap()
        .with_zero_shot(&ZERO_SHOT)
        .unwrap();
    assert!(close(m.average_accuracy().unwrap(), 0.755));
    assert!(close(m.forgetting().unwrap(), 0.55 / 3.0));
    assert!(close(m.backward_transfer().unwrap(), -0.53 / 3.0));
    // FWT needs the superdiagonal, which the reference never evaluates.
    assert!(matches!(
        m.forward_transfer(),
        Err(MathError::MissingAccuracy {
            after_task: 0,
            on_task: 1,
            ..
        })
    ));
    assert_eq!(m.summary().unwrap().forward_transfer, None);
    assert_eq!(m.get(0, 1), None);
    assert_eq!(m.get(3, 2), Some(0.70));
}

#[test]
fn one_task() {
    let m = AccuracyMatrix::from_rows(&[vec![0.7]]).unwrap();
    assert!(close(m.average_accuracy().unwrap(), 0.7));
    assert!(matches!(
        m.forgetting(),
        Err(MathError::TooFewTasks {
            needed: 2,
            got: 1,
            ..
        })
    ));
    let s = m.summary().unwrap();
    assert_eq!(
        (s.forgetting, s.backward_transfer, s.forward_transfer),
        (None, None, None)
    );
}

#[test]
fn invalid_matrices_are_typed_errors() {
    let not_square = vec![vec![0.5, 0.5], vec![0.5]];
    assert!(matches!(
        AccuracyMatrix::from_rows(&not_square),
        Err(MathError::AccuracyShape { .. })
    ));
    assert!(matches!(
        AccuracyMatrix::from_rows(&[]),
        Err(MathError::AccuracyShape { .. })
    ));

    let percent = vec![vec![85.0, 10.0], vec![80.0, 90.0]];
    let err = AccuracyMatrix::from_rows(&percent).unwrap_err();
    assert!(err.to_string().contains("a[0][0] = 85"), "{err}");
    assert!(err.to_string().contains("not percent"), "{err}");

    let nan = vec![vec![0.5, f64::NAN], vec![0.5, 0.5]];
    assert!(matches!(
        AccuracyMatrix::from_rows(&nan),
        Err(MathError::AccuracyOutOfRange { .. })
    ));

    let bad_triangle = vec![vec![0.5, 0.4], vec![0.5, 0.5]];
    assert!(matches!(
        AccuracyMatrix::from_lower_triangle(&bad_triangle),
        Err(MathError::AccuracyShape { .. })
    ));

    let m = AccuracyMatrix::from_rows(&hand_matrix()).unwrap();
    assert!(matches!(
        m.forward_transfer(),
        Err(MathError::MissingZeroShot { .. })
    ));
    assert!(matches!(
        m.clone().with_zero_shot(&[0.1, 0.1]),
        Err(MathError::AccuracyShape { .. })
    ));
    assert!(matches!(
        m.with_zero_shot(&[0.1, 0.1, 1.5, 0.1]),
        Err(MathError::AccuracyOutOfRange { .. })
    ));
}

fn accuracy_matrix() -> impl Strategy<Value = Vec<Vec<f64>>> {
    (2usize..8)
        .prop_flat_map(|t| proptest::collection::vec(proptest::collection::vec(0.0..=1.0f64, t), t))
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 128,
        rng_seed: RngSeed::Fixed(0x4e4c_6f52),
        ..ProptestConfig::default()
    })]

    /// max_k a[k][t] >= a[t][t], so F.Ra >= -BWT, with equality when every
    /// task's best accuracy is the one right after training it.
    #[test]
    fn forgetting_bounds_backward_transfer(rows in accuracy_matrix()) {
        let m = AccuracyMatrix::from_rows(&rows).unwrap();
        let f = m.forgetting().unwrap();
        let bwt = m.backward_transfer().unwrap();
        prop_assert!(f + bwt >= -1e-12, "F = {f}, BWT = {bwt}");
        prop_assert!((-1.0..=1.0).contains(&f));
        let aa = m.average_accuracy().unwrap();
        prop_assert!((0.0..=1.0).contains(&aa));
    }

    /// Forgetting and BWT only look at the lower triangle.
    #[test]
    fn upper_triangle_does_not_matter(rows in accuracy_matrix(), fill in 0.0..=1.0f64) {
        let full = AccuracyMatrix::from_rows(&rows).unwrap();
        let mut other = rows.clone();
        for (i, row) in other.iter_mut().enumerate() {
            for x in row.iter_mut().skip(i + 1) {
                *x = fill;
            }
        }
        let other = AccuracyMatrix::from_rows(&other).unwrap();
        prop_assert_eq!(full.forgetting().unwrap(), other.forgetting().unwrap());
        prop_assert_eq!(full.backward_transfer().unwrap(), other.backward_transfer().unwrap());
        prop_assert_eq!(full.average_accuracy().unwrap(), other.average_accuracy().unwrap());
    }
}

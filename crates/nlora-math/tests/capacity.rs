//! The density controller on a toy l1 problem, the sampled monitor against
//! the exact dense figures, and the capacity forecast against a simulation
//! with random supports.
use nalgebra::DMatrix;
use nlora_math::capacity::{
    forecast, hoeffding_half_width, hoeffding_half_width_mean, DensityController, SampledMonitor,
    SampledPositions,
};
use nlora_math::metrics::collision::SupportMask;
use nlora_math::metrics::geometry::PairCollision;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn gaussian(rng: &mut ChaCha8Rng) -> f64 {
    // Box-Muller; the tests only need a smooth, unbounded distribution.
    let u1: f64 = rng.random_range(1e-12..1.0);
    let u2: f64 = rng.random_range(0.0..1.0);
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// min_x 1/2 ||x - y||^2 + lambda ||x||_1 by proximal gradient steps, lambda
/// from the controller every `k` steps: the density of x must reach the
/// target within 10 %.
fn controlled_density(target: f64, seed: u64) -> (f64, f64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let y: Vec<f64> = (0..20_000).map(|_| gaussian(&mut rng) * 0.01).collect();
    let mut x = vec![0.0; y.len()];
    let mut ctl = DensityController::new(target, 1e-5, 0.5).unwrap();
    let eta = 0.5;
    let density = |x: &[f64]| x.iter().filter(|v| v.abs() > 0.0).count() as f64 / x.len() as f64;
    for _ in 0..300 {
        for _ in 0..10 {
            let lam = ctl.lambda();
            for (xi, yi) in x.iter_mut().zip(&y) {
                let z = *xi - eta * (*xi - yi);
                *xi = z.signum() * (z.abs() - eta * lam).max(0.0);
            }
        }
        ctl.update(density(&x));
    }
    (density(&x), ctl.lambda())
}

#[test]
fn controller_reaches_the_target_density_within_ten_percent() {
    for (k, &target) in [0.02, 0.1, 0.3, 0.6].iter().enumerate() {
        let (d, lam) = controlled_density(target, k as u64);
        let rel = (d - target).abs() / target;
        assert!(
            rel < 0.10,
            "target {target}: density {d} (lambda {lam}) is {:.1} % off",
            rel * 100.0
        );
        // the closed form: density = P(|y| > lambda), so lambda is the
        // (1 - target) quantile of |y| — it must be in the data's scale.
        assert!(lam > 1e-5 && lam < 0.05, "lambda {lam}");
    }
}

#[test]
fn controller_rejects_bad_settings_and_ignores_non_finite_readings() {
    assert!(DensityController::new(0.0, 1e-3, 0.5).is_err());
    assert!(DensityController::new(1.0, 1e-3, 0.5).is_err());
    assert!(DensityController::new(0.1, 0.0, 0.5).is_err());
    assert!(DensityController::new(0.1, 1e-3, f64::NAN).is_err());
    let mut c = DensityController::new(0.1, 1e-3, 0.5).unwrap();
    assert_eq!(c.update(f64::NAN), 1e-3);
    // too dense -> lambda up; too sparse -> lambda down
    assert!(c.update(0.5) > 1e-3);
    let before = c.lambda();
    assert!(c.update(0.01) < before);
    assert_eq!(c.trajectory().len(), 3);
}

#[test]
fn hoeffding_half_width_matches_the_formula() {
    let eps = hoeffding_half_width(1000, 0.05);
    assert!((eps - (40f64.ln() / 2000.0).sqrt()).abs() < 1e-12);
    assert!(hoeffding_half_width(4000, 0.05) < eps / 1.9);
    assert_eq!(hoeffding_half_width(0, 0.05), 1.0);
}

#[test]
fn mean_over_sites_half_width_matches_one_site_and_covers_a_simulation() {
    // One site: the one-site bound; a site sampled whole adds nothing.
    let one = hoeffding_half_width(1000, 0.05);
    assert!((hoeffding_half_width_mean(&[1000], &[5000], 0.05) - one).abs() < 1e-12);
    assert_eq!(hoeffding_half_width_mean(&[50], &[50], 0.05), 0.0);
    // S equal sites: the bound of S * m samples.
    let s60 = hoeffding_half_width_mean(&[1000; 60], &[5000; 60], 0.05);
    assert!((s60 - hoeffding_half_width(60_000, 0.05)).abs() < 1e-12);

    // Simulation: 20 sites with different densities, 200 positions sampled
    // from 4000 each; the mean estimate must fall within the bound in at
    // least 95 % of 400 trials.
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let (sites, n, m) = (20usize, 4000usize, 200usize);
    let supports: Vec<Vec<bool>> = (0..sites)
        .map(|k| {
            let p = 0.05 + 0.9 * k as f64 / sites as f64;
            (0..n).map(|_| rng.random_range(0.0..1.0) < p).collect()
        })
        .collect();
    let exact: f64 = supports
        .iter()
        .map(|s| s.iter().filter(|&&x| x).count() as f64 / n as f64)
        .sum::<f64>()
        / sites as f64;
    let eps = hoeffding_half_width_mean(&vec![m; sites], &vec![n; sites], 0.05);
    let mut inside = 0;
    for trial in 0..400u64 {
        let estimate: f64 = supports
            .iter()
            .enumerate()
            .map(|(k, s)| {
                let pos = SampledPositions::new(1, n, m, trial * 100 + k as u64).unwrap();
                // a 1 x n update whose value at j is 1 where the support is on
                let a = DMatrix::from_fn(1, n, |_, j| if s[j] { 1.0 } else { 0.0 });
                let b = DMatrix::from_element(1, 1, 1.0);
                let v = pos.values(&a, &b, 1.0).unwrap();
                v.iter().filter(|x| x.abs() > 0.5).count() as f64 / m as f64
            })
            .sum::<f64>()
            / sites as f64;
        if (estimate - exact).abs() <= eps {
            inside += 1;
        }
    }
    assert!(inside >= 380, "{inside} of 400 within {eps}");
    // and the bound is not vacuous: well under one site's
    assert!(eps < hoeffding_half_width(m, 0.05) / 4.0);
}

fn random_factors(
    rng: &mut ChaCha8Rng,
    out: usize,
    inp: usize,
    r: usize,
) -> (DMatrix<f64>, DMatrix<f64>) {
    let a = DMatrix::from_fn(r, inp, |_, _| gaussian(rng));
    // sparse-ish B so the update has structure, not a uniform density
    let b = DMatrix::from_fn(out, r, |_, _| {
        if rng.random_range(0.0..1.0) < 0.3 {
            gaussian(rng)
        } else {
            0.0
        }
    });
    (a, b)
}

#[test]
fn sampled_monitor_is_within_its_bound_of_the_exact_figures() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let (out, inp, r) = (96, 80, 4);
    let prev: Vec<_> = (0..3)
        .map(|_| {
            let (a, b) = random_factors(&mut rng, out, inp, r);
            (a, b, 2.0)
        })
        .collect();
    let (a, b) = random_factors(&mut rng, out, inp, r);
    let tau = 0.5;
    // exact, dense
    let dense = |a: &DMatrix<f64>, b: &DMatrix<f64>, s: f64| (b * a) * s;
    let cur_mask = SupportMask::new(dense(&a, &b, 2.0).as_slice(), tau);
    let exact_density = cur_mask.density();
    let exact_cr = prev
        .iter()
        .map(|(pa, pb, s)| {
            SupportMask::new(dense(pa, pb, *s).as_slice(), tau)
                .collision_rate(&cur_mask)
                .unwrap()
        })
        .sum::<f64>()
        / 3.0;

    // every position: exactly the dense figures
    let all = SampledPositions::new(out, inp, out * inp, 1).unwrap();
    let full = SampledMonitor::new(all, &prev)
        .unwrap()
        .read(&a, &b, 2.0, tau)
        .unwrap();
    assert!((full.density - exact_density).abs() < 1e-12);
    assert!((full.collision_rate.unwrap() - exact_cr).abs() < 1e-12);

    // a sample: within the 95 % Hoeffding half-width (seeded, so stable)
    let some = SampledPositions::new(out, inp, 2000, 7).unwrap();
    assert_eq!(some.len(), 2000);
    let reading = SampledMonitor::new(some, &prev)
        .unwrap()
        .read(&a, &b, 2.0, tau)
        .unwrap();
    assert!(reading.half_width_95 < 0.031);
    assert!(
        (reading.density - exact_density).abs() <= reading.half_width_95,
        "{} vs {exact_density}",
        reading.density
    );
    assert!((reading.collision_rate.unwrap() - exact_cr).abs() <= reading.half_width_95);
    // not a vacuous check: the update is neither empty nor full
    assert!(
        exact_density > 0.1 && exact_density < 0.9,
        "{exact_density}"
    );
}

#[test]
fn monitor_rejects_factors_of_another_shape() {
    let pos = SampledPositions::new(10, 12, 50, 0).unwrap();
    let mon = SampledMonitor::new(pos, &[]).unwrap();
    let a = DMatrix::zeros(2, 11);
    let b = DMatrix::zeros(10, 2);
    assert!(mon.read(&a, &b, 1.0, 0.0).is_err());
}

fn random_mask(rng: &mut ChaCha8Rng, n: usize, density: f64) -> SupportMask {
    let values: Vec<f64> = (0..n)
        .map(|_| f64::from(u8::from(rng.random_range(0.0..1.0) < density)))
        .collect();
    SupportMask::new(&values, 0.5)
}

fn pairs(masks: &[SupportMask]) -> Vec<PairCollision> {
    let mut out = Vec::new();
    for i in 0..masks.len() {
        for j in i + 1..masks.len() {
            out.push(PairCollision {
                i,
                j,
                rate: masks[i].collision_rate(&masks[j]).unwrap(),
            });
        }
    }
    out
}

#[test]
fn forecast_matches_a_simulation_with_independent_random_supports() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let n = 200_000;
    let densities = [0.05, 0.12, 0.2, 0.08];
    let masks: Vec<SupportMask> = densities
        .iter()
        .map(|&d| random_mask(&mut rng, n, d))
        .collect();
    let measured: Vec<f64> = masks.iter().map(SupportMask::density).collect();
    let f = forecast(
        &measured,
        &pairs(&masks),
        SupportMask::union_density(&masks),
        &[0, 6],
    )
    .unwrap();
    // Theorem 2 holds for independent supports
    let ratio = f.independence_ratio.unwrap();
    assert!((ratio - 1.0).abs() < 0.05, "independence ratio {ratio}");
    // N = 0 is just the measured ACR
    let acr_now = pairs(&masks).iter().map(|p| p.rate).sum::<f64>() / 6.0;
    assert!((f.points[0].expected_acr - acr_now).abs() < 1e-12);

    // simulate 6 more tasks at the mean density
    let mut grown = masks.clone();
    for _ in 0..6 {
        grown.push(random_mask(&mut rng, n, f.mean_density));
    }
    let simulated_acr = pairs(&grown).iter().map(|p| p.rate).sum::<f64>() / (10.0 * 9.0 / 2.0);
    let p = f.points[1];
    assert!(
        (p.expected_acr - simulated_acr).abs() / simulated_acr < 0.03,
        "forecast {} vs simulated {simulated_acr}",
        p.expected_acr
    );
    let simulated_used = SupportMask::union_density(&grown);
    assert!(
        (p.expected_used_fraction - simulated_used).abs() < 0.01,
        "forecast {} vs simulated {simulated_used}",
        p.expected_used_fraction
    );
}

#[test]
fn forecast_flags_crowded_supports() {
    // every task uses the same positions: CR_ij = s, not s^2
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let shared = random_mask(&mut rng, 50_000, 0.1);
    let masks = vec![shared.clone(), shared.clone(), shared];
    let d: Vec<f64> = masks.iter().map(SupportMask::density).collect();
    let f = forecast(&d, &pairs(&masks), SupportMask::union_density(&masks), &[3]).unwrap();
    let ratio = f.independence_ratio.unwrap();
    assert!(ratio > 9.0 && ratio < 11.0, "{ratio}");
    assert!(f.points[0].expected_acr_observed_ratio > f.points[0].expected_acr);
    assert!((f.used_fraction - d[0]).abs() < 1e-12);
}

#[test]
fn forecast_rejects_inconsistent_input() {
    assert!(forecast(&[], &[], 0.0, &[1]).is_err());
    assert!(forecast(&[0.1, 0.2], &[], 0.2, &[1]).is_err());
    assert!(forecast(&[1.5], &[], 0.2, &[1]).is_err());
    let one = forecast(&[0.1], &[], 0.1, &[1]).unwrap();
    assert_eq!(one.independence_ratio, None);
    // one old and one new task: ACR = s * s
    assert!((one.points[0].expected_acr - 0.01).abs() < 1e-12);
}

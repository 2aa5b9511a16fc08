//! Beyond the paper: how much room is left, watched during training and
//! forecast after it.
//!
//! - [`DensityController`]: lambda as a multiplier adjusted during training so
//!   that the task's update reaches a target density (`--lambda auto`).
//! - [`SampledMonitor`]: density and collision rate of the current update on a
//!   fixed random sample of positions, from the low-rank factors (O(m r) per
//!   site instead of O(out in r)), with a Hoeffding error bound.
//! - [`forecast`]: per site, the used fraction of positions and the expected
//!   ACR after N more tasks under Theorem 2's independence (CR_ij = s_i s_j),
//!   with the measured departure from independence.
use nalgebra::DMatrix;
use rand::seq::index::sample;
use rand::SeedableRng;

use crate::error::{MathError, Result};
use crate::metrics::geometry::PairCollision;

fn invalid(name: &'static str, value: f64, reason: &'static str) -> MathError {
    MathError::InvalidParameter {
        name,
        value,
        reason,
    }
}

/// Adjusts lambda so that the update's density approaches a target.
///
/// Dual ascent on the constraint `density <= target`, taken in log space:
/// `ln lambda += step * clamp((density - target) / target, -1, 1)`. The log
/// form is scale-free — the useful lambda spans orders of magnitude (1e-5 ..
/// 1 on SmolLM2, per the dW form) — and keeps lambda positive; the relative
/// error makes one rate fit any target. The loop gain (how fast density
/// moves with ln lambda) depends on the distribution of the update's entries
/// and is unknown, so a fixed step can oscillate: the step halves whenever
/// the error changes sign and grows back by 10 % (up to `rate`) while it
/// keeps its sign, as in Rprop.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DensityController {
    target: f64,
    lambda: f64,
    rate: f64,
    step: f64,
    last_error: f64,
    min: f64,
    max: f64,
    trajectory: Vec<(f64, f64)>,
}

impl DensityController {
    /// A controller for `target` density in (0, 1), starting at
    /// `initial_lambda > 0`, moving `rate > 0` in ln lambda per unit of
    /// relative density error, lambda kept within `[min, max]`.
    pub fn new(target: f64, initial_lambda: f64, rate: f64) -> Result<Self> {
        if !(target > 0.0 && target < 1.0) {
            return Err(invalid(
                "target density",
                target,
                "must be a fraction of positions in (0, 1)",
            ));
        }
        if !(initial_lambda > 0.0 && initial_lambda.is_finite()) {
            return Err(invalid(
                "initial lambda",
                initial_lambda,
                "must be finite and > 0 (the controller works in ln lambda)",
            ));
        }
        if !(rate > 0.0 && rate.is_finite()) {
            return Err(invalid("controller rate", rate, "must be finite and > 0"));
        }
        Ok(Self {
            target,
            lambda: initial_lambda,
            rate,
            step: rate,
            last_error: 0.0,
            min: 1e-12,
            max: 1e6,
            trajectory: Vec::new(),
        })
    }

    /// The lambda to use now.
    pub fn lambda(&self) -> f64 {
        self.lambda
    }

    /// The target density.
    pub fn target(&self) -> f64 {
        self.target
    }

    /// One dual-ascent step from a measured density; returns the new lambda.
    /// A non-finite measurement leaves lambda unchanged.
    pub fn update(&mut self, density: f64) -> f64 {
        if density.is_finite() {
            let error = ((density - self.target) / self.target).clamp(-1.0, 1.0);
            if error * self.last_error < 0.0 {
                self.step *= 0.5;
            } else {
                self.step = (self.step * 1.1).min(self.rate);
            }
            self.last_error = error;
            self.lambda = (self.lambda * (self.step * error).exp()).clamp(self.min, self.max);
        }
        self.trajectory.push((density, self.lambda));
        self.lambda
    }

    /// Every (measured density, lambda after the step) so far.
    pub fn trajectory(&self) -> &[(f64, f64)] {
        &self.trajectory
    }
}

/// Half-width `eps` of a two-sided Hoeffding bound: the fraction estimated
/// from `m` independent samples is within `eps` of the true fraction with
/// probability at least `1 - delta`. (Positions are drawn without
/// replacement, for which Hoeffding's bound also holds.)
pub fn hoeffding_half_width(m: usize, delta: f64) -> f64 {
    if m == 0 {
        return 1.0;
    }
    ((2.0 / delta).ln() / (2.0 * m as f64)).sqrt()
}

/// Half-width of the same bound for the mean over sites of per-site
/// fractions, site `s` estimated from `sample_sizes[s]` positions out of
/// `site_sizes[s]` (a site sampled whole adds no error). The mean is a sum of
/// independent terms in `[0, 1 / (S m_s)]`, so Hoeffding gives
/// `sqrt(ln(2/delta) / 2 * sum_s m_s (1 / (S m_s))^2)`: far tighter than one
/// site's bound when many sites are averaged.
pub fn hoeffding_half_width_mean(sample_sizes: &[usize], site_sizes: &[usize], delta: f64) -> f64 {
    let sites = sample_sizes.len().max(1) as f64;
    let spread: f64 = sample_sizes
        .iter()
        .zip(site_sizes)
        .filter(|(&m, &n)| m < n)
        .map(|(&m, _)| {
            if m == 0 {
                f64::INFINITY
            } else {
                1.0 / m as f64
            }
        })
        .sum();
    ((2.0 / delta).ln() / 2.0 * spread / (sites * sites))
        .sqrt()
        .min(1.0)
}

/// A fixed random sample of positions of one site's (out, in) update.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SampledPositions {
    out_features: usize,
    in_features: usize,
    /// (row, column) pairs, distinct.
    positions: Vec<(usize, usize)>,
}

impl SampledPositions {
    /// `m` distinct positions (all of them if `m >= out * in`), seeded.
    pub fn new(out_features: usize, in_features: usize, m: usize, seed: u64) -> Result<Self> {
        let n = out_features * in_features;
        if n == 0 {
            return Err(MathError::Shape {
                site: "sampled positions".into(),
                detail: format!(
                    "an update of shape ({out_features}, {in_features}) has no positions"
                ),
            });
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut flat: Vec<usize> = sample(&mut rng, n, m.min(n)).into_vec();
        flat.sort_unstable();
        Ok(Self {
            out_features,
            in_features,
            positions: flat
                .into_iter()
                .map(|k| (k / in_features, k % in_features))
                .collect(),
        })
    }

    /// The number of sampled positions.
    pub fn len(&self) -> usize {
        self.positions.len()
    }

    /// Whether no position is sampled.
    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }

    /// `dW[i, j] = scale * B[i, :] . A[:, j]` at each sampled position, from
    /// the factors `a (r, in)` and `b (out, r)`: O(m r).
    pub fn values(&self, a: &DMatrix<f64>, b: &DMatrix<f64>, scale: f64) -> Result<Vec<f64>> {
        if a.ncols() != self.in_features || b.nrows() != self.out_features || a.nrows() != b.ncols()
        {
            return Err(MathError::Shape {
                site: "sampled positions".into(),
                detail: format!(
                    "factors A {:?} and B {:?} do not make an update of shape ({}, {})",
                    a.shape(),
                    b.shape(),
                    self.out_features,
                    self.in_features
                ),
            });
        }
        Ok(self
            .positions
            .iter()
            .map(|&(i, j)| {
                scale
                    * b.row(i)
                        .iter()
                        .zip(a.column(j).iter())
                        .map(|(x, y)| x * y)
                        .sum::<f64>()
            })
            .collect())
    }
}

/// Density and collision rate of the current update, watched on a fixed
/// sample of positions of one site.
#[derive(Clone, Debug, PartialEq)]
pub struct SampledMonitor {
    positions: SampledPositions,
    /// The earlier tasks' updates at the sampled positions.
    previous: Vec<Vec<f64>>,
}

/// What the monitor saw at one check.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MonitorReading {
    /// Fraction of sampled positions with |dW| > tau.
    pub density: f64,
    /// Mean over earlier tasks of the fraction of sampled positions non-zero
    /// in both (eq. 11 on the sample); `None` before any earlier task.
    pub collision_rate: Option<f64>,
    /// Hoeffding half-width at 95 %: each of the two fractions is within
    /// this of its value over all positions with probability >= 0.95.
    pub half_width_95: f64,
}

impl SampledMonitor {
    /// A monitor over `positions`, with the earlier tasks' factors
    /// `(a, b, scale)` evaluated once.
    pub fn new(
        positions: SampledPositions,
        previous: &[(DMatrix<f64>, DMatrix<f64>, f64)],
    ) -> Result<Self> {
        let previous = previous
            .iter()
            .map(|(a, b, s)| positions.values(a, b, *s))
            .collect::<Result<_>>()?;
        Ok(Self {
            positions,
            previous,
        })
    }

    /// Density and collision rate of the update `scale * B A` at threshold `tau`.
    pub fn read(
        &self,
        a: &DMatrix<f64>,
        b: &DMatrix<f64>,
        scale: f64,
        tau: f64,
    ) -> Result<MonitorReading> {
        let current = self.positions.values(a, b, scale)?;
        let m = current.len().max(1) as f64;
        let on: Vec<bool> = current.iter().map(|v| v.abs() > tau).collect();
        let density = on.iter().filter(|&&x| x).count() as f64 / m;
        let collision_rate = (!self.previous.is_empty()).then(|| {
            self.previous
                .iter()
                .map(|prev| {
                    prev.iter()
                        .zip(&on)
                        .filter(|(p, &c)| c && p.abs() > tau)
                        .count() as f64
                        / m
                })
                .sum::<f64>()
                / self.previous.len() as f64
        });
        Ok(MonitorReading {
            density,
            collision_rate,
            half_width_95: hoeffding_half_width(current.len(), 0.05),
        })
    }
}

/// The capacity of one site after T tasks, and where N more would take it.
#[derive(Clone, Debug, PartialEq)]
pub struct CapacityForecast {
    /// Fraction of positions non-zero in at least one task's update.
    pub used_fraction: f64,
    /// Mean per-task density s (the rate new tasks are assumed to use).
    pub mean_density: f64,
    /// Mean over pairs i < j of the measured CR_ij; `None` with one task.
    pub measured_mean_cr: Option<f64>,
    /// Mean over pairs of s_i s_j, Theorem 2's CR for independent supports.
    pub independent_mean_cr: Option<f64>,
    /// measured / independent: 1 when supports are independent, > 1 when
    /// tasks crowd the same positions.
    pub independence_ratio: Option<f64>,
    /// One point per horizon asked for.
    pub points: Vec<ForecastPoint>,
}

/// The expected state after `more_tasks` further tasks at the mean density.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ForecastPoint {
    /// N.
    pub more_tasks: usize,
    /// Expected ACR over all T + N tasks, independent supports (Theorem 2)
    /// for every pair that involves a new task, measured CR for the rest.
    pub expected_acr: f64,
    /// The same with the new pairs' CR scaled by the measured independence ratio.
    pub expected_acr_observed_ratio: f64,
    /// Expected used fraction: `1 - (1 - used) (1 - s)^N`.
    pub expected_used_fraction: f64,
}

/// Forecast from one site's per-task densities, its measured pair collisions
/// (eq. 11, every i < j), and the used fraction (union of supports).
pub fn forecast(
    densities: &[f64],
    collisions: &[PairCollision],
    used_fraction: f64,
    horizons: &[usize],
) -> Result<CapacityForecast> {
    let t = densities.len();
    if t == 0 {
        return Err(MathError::TooFewTasks {
            metric: "capacity forecast",
            needed: 1,
            got: 0,
        });
    }
    for &s in densities.iter().chain([&used_fraction]) {
        if !(0.0..=1.0).contains(&s) {
            return Err(invalid("density", s, "densities are fractions in [0, 1]"));
        }
    }
    let pairs = t * (t - 1) / 2;
    if collisions.len() != pairs {
        return Err(MathError::Shape {
            site: "capacity forecast".into(),
            detail: format!(
                "{t} tasks have {pairs} pairs but {} collision rates were given",
                collisions.len()
            ),
        });
    }
    let s_mean = densities.iter().sum::<f64>() / t as f64;
    let measured_sum: f64 = collisions.iter().map(|c| c.rate).sum();
    let independent_sum: f64 = collisions
        .iter()
        .map(|c| densities[c.i] * densities[c.j])
        .sum();
    let (measured_mean_cr, independent_mean_cr) = if pairs > 0 {
        (
            Some(measured_sum / pairs as f64),
            Some(independent_sum / pairs as f64),
        )
    } else {
        (None, None)
    };
    let independence_ratio = match (measured_mean_cr, independent_mean_cr) {
        (Some(m), Some(i)) if i > 0.0 => Some(m / i),
        _ => None,
    };
    let sum_s: f64 = densities.iter().sum();
    let points = horizons
        .iter()
        .map(|&n| {
            let total = t + n;
            let all_pairs = (total * (total - 1) / 2).max(1) as f64;
            // pairs (old, new) and (new, new) under independence
            let new_pairs =
                n as f64 * sum_s * s_mean + (n * n.saturating_sub(1) / 2) as f64 * s_mean * s_mean;
            let ratio = independence_ratio.unwrap_or(1.0);
            ForecastPoint {
                more_tasks: n,
                expected_acr: (measured_sum + new_pairs) / all_pairs,
                expected_acr_observed_ratio: (measured_sum + ratio * new_pairs) / all_pairs,
                expected_used_fraction: 1.0 - (1.0 - used_fraction) * (1.0 - s_mean).powi(n as i32),
            }
        })
        .collect();
    Ok(CapacityForecast {
        used_fraction,
        mean_density: s_mean,
        measured_mean_cr,
        independent_mean_cr,
        independence_ratio,
        points,
    })
}

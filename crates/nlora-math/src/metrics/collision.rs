//! Parameter collisions: the collision rate CR_ij (paper eq. 11) and the
//! average collision rate ACR (eq. 10).
//!
//! Eq. 11 counts positions where both updates are "non-zero". A product B @ A
//! in floating point is essentially never exactly zero, and the paper does not
//! say which threshold it used, so the threshold is explicit here
//! ([`CollisionThreshold`]) and must be reported next to every collision
//! figure. A position counts as non-zero when `|dW[a, b]| > tau` (strictly).

use nalgebra::DMatrix;

use crate::error::{MathError, Result};
use crate::metrics::sparsity::EntryStats;

/// When an entry of an update counts as "non-zero" for eq. 11.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum CollisionThreshold {
    /// `|dW| > tau`. `Absolute(0.0)` is the paper's literal "non-zero".
    Absolute(f64),
    /// `|dW_i| > fraction * max |dW_i|`, each update against its own largest entry.
    RelativeToMax(f64),
    /// `|dW_i| > fraction * max_k max |dW_k|`, against the largest entry of all
    /// the site's updates (all tasks), so a uniformly small update counts as empty.
    RelativeToSiteMax(f64),
}

impl CollisionThreshold {
    /// Rejects negative, NaN or infinite thresholds and fractions >= 1.
    pub fn validate(&self) -> Result<()> {
        let (name, value, ok) = match *self {
            CollisionThreshold::Absolute(tau) => ("absolute collision threshold", tau, tau >= 0.0),
            CollisionThreshold::RelativeToMax(f) | CollisionThreshold::RelativeToSiteMax(f) => {
                ("relative collision threshold", f, (0.0..1.0).contains(&f))
            }
        };
        if ok && value.is_finite() {
            Ok(())
        } else {
            Err(MathError::InvalidParameter {
                name,
                value,
                reason: "an absolute threshold must be finite and >= 0, a relative one in [0, 1)",
            })
        }
    }

    /// The absolute tau for an update whose largest |entry| is `own_max`, at a
    /// site whose largest |entry| over all updates is `site_max`.
    pub fn tau(&self, own_max: f64, site_max: f64) -> f64 {
        match *self {
            CollisionThreshold::Absolute(tau) => tau,
            CollisionThreshold::RelativeToMax(f) => f * own_max,
            CollisionThreshold::RelativeToSiteMax(f) => f * site_max,
        }
    }

    /// Whether [`tau`](Self::tau) needs the site-wide maximum.
    pub fn needs_site_max(&self) -> bool {
        matches!(self, CollisionThreshold::RelativeToSiteMax(_))
    }
}

/// The positions where an update is non-zero (`|x| > tau`), as a bit set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SupportMask {
    bits: Vec<u64>,
    len: usize,
}

impl SupportMask {
    /// The support `{ k : |values[k]| > tau }`.
    pub fn new(values: &[f64], tau: f64) -> Self {
        let mut bits = vec![0u64; values.len().div_ceil(64)];
        for (word, chunk) in bits.iter_mut().zip(values.chunks(64)) {
            for (bit, x) in chunk.iter().enumerate() {
                *word |= u64::from(x.abs() > tau) << bit;
            }
        }
        SupportMask {
            bits,
            len: values.len(),
        }
    }

    /// The number of positions (mn).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mask covers no positions at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The number of non-zero positions.
    pub fn count(&self) -> usize {
        self.bits.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// The fraction of non-zero positions (the paper's s_i in Theorem 2).
    pub fn density(&self) -> f64 {
        self.count() as f64 / self.len as f64
    }

    /// The fraction of positions non-zero in at least one of `masks` (all of
    /// one size; 0 for none).
    pub fn union_density(masks: &[SupportMask]) -> f64 {
        let Some(first) = masks.first() else {
            return 0.0;
        };
        let used: usize = (0..first.bits.len())
            .map(|w| {
                masks
                    .iter()
                    .fold(0u64, |acc, m| acc | m.bits.get(w).copied().unwrap_or(0))
                    .count_ones() as usize
            })
            .sum();
        used as f64 / first.len.max(1) as f64
    }

    /// CR, paper eq. 11: the fraction of positions non-zero in both masks.
    pub fn collision_rate(&self, other: &SupportMask) -> Result<f64> {
        if self.len != other.len || self.len == 0 {
            return Err(MathError::Shape {
                site: "collision rate".into(),
                detail: format!(
                    "the two updates have {} and {} entries; they must have the same, non-zero size",
                    self.len, other.len
                ),
            });
        }
        let both: usize = self
            .bits
            .iter()
            .zip(&other.bits)
            .map(|(a, b)| (a & b).count_ones() as usize)
            .sum();
        Ok(both as f64 / self.len as f64)
    }
}

/// CR_ij, paper eq. 11, of two dense updates of the same shape: the fraction
/// of positions where both exceed the threshold. For `RelativeToSiteMax` the
/// "site" is these two updates.
pub fn collision_rate(
    dw_i: &DMatrix<f64>,
    dw_j: &DMatrix<f64>,
    threshold: CollisionThreshold,
) -> Result<f64> {
    mean_collision_of_dense(&[dw_i, dw_j], threshold)
}

/// ACR, paper eq. 10: `2 / (T(T-1)) SUM_{i<j} CR_ij` over all pairs of the T
/// dense updates (one per task) of one site. Needs T >= 2.
pub fn average_collision_rate(
    updates: &[DMatrix<f64>],
    threshold: CollisionThreshold,
) -> Result<f64> {
    let refs: Vec<&DMatrix<f64>> = updates.iter().collect();
    mean_collision_of_dense(&refs, threshold)
}

fn mean_collision_of_dense(
    updates: &[&DMatrix<f64>],
    threshold: CollisionThreshold,
) -> Result<f64> {
    threshold.validate()?;
    if updates.len() < 2 {
        return Err(MathError::TooFewTasks {
            metric: "average collision rate",
            needed: 2,
            got: updates.len(),
        });
    }
    let shape = updates[0].shape();
    for (k, u) in updates.iter().enumerate() {
        if u.shape() != shape {
            return Err(MathError::Shape {
                site: "average collision rate".into(),
                detail: format!(
                    "update {k} is {}x{} but update 0 is {}x{}",
                    u.nrows(),
                    u.ncols(),
                    shape.0,
                    shape.1
                ),
            });
        }
        check_finite(&format!("update {k}"), u)?;
    }
    let maxes: Vec<f64> = updates
        .iter()
        .map(|u| EntryStats::of(u.as_slice()).max_abs)
        .collect();
    let site_max = maxes.iter().copied().fold(0.0, f64::max);
    let masks: Vec<SupportMask> = updates
        .iter()
        .zip(&maxes)
        .map(|(u, &own)| SupportMask::new(u.as_slice(), threshold.tau(own, site_max)))
        .collect();
    mean_pairwise_collision(&masks)
}

/// The mean of CR_ij over all pairs i < j of the masks (eq. 10).
pub(crate) fn mean_pairwise_collision(masks: &[SupportMask]) -> Result<f64> {
    let mut sum = 0.0;
    let mut pairs = 0usize;
    for i in 0..masks.len() {
        for j in i + 1..masks.len() {
            sum += masks[i].collision_rate(&masks[j])?;
            pairs += 1;
        }
    }
    Ok(sum / pairs as f64)
}

pub(crate) fn check_finite(what: &str, m: &DMatrix<f64>) -> Result<()> {
    if let Some(k) = m.iter().position(|x| !x.is_finite()) {
        // Column-major storage.
        return Err(MathError::NonFinite {
            what: what.to_string(),
            row: k % m.nrows(),
            col: k / m.nrows(),
            value: m.as_slice()[k],
        });
    }
    Ok(())
}

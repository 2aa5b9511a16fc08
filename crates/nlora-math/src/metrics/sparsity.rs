//! The generalized sparsity rate (GSR), paper eq. 9 / 16 with p = 2, q = 1
//! (Hurley and Rickard 2009):
//!
//! `GSR(x) = (mn)^(1/2 - 1) * l1(x) / l2(x) = l1(x) / (sqrt(mn) * l2(x))`,
//!
//! a value in [1/sqrt(mn), 1]: 1 when all |entries| are equal, 1/sqrt(mn) when
//! a single entry is non-zero; lower = sparser. This matches the values the
//! paper reports (0.682 for SeqLoRA). The paper's eq. 17 writes
//! `sqrt(mn) * l1 / l2` instead, which contradicts eq. 16 and the reported
//! numbers; nlora uses eq. 16, and the appendix A.7 properties hold in that
//! convention with the directions reversed ("sparser" = lower).

/// One pass over a dense matrix: what GSR and the collision thresholds need.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct EntryStats {
    /// Number of entries (mn).
    pub len: usize,
    /// l1 norm, `SUM |x|`.
    pub l1: f64,
    /// Squared l2 (Frobenius) norm, `SUM x^2`.
    pub sum_sq: f64,
    /// `max |x|`.
    pub max_abs: f64,
}

impl EntryStats {
    /// Statistics of the entries of a matrix, in any order.
    pub fn of(values: &[f64]) -> Self {
        // Eight independent accumulators let the compiler vectorise; a single
        // running sum is latency-bound and 4-6x slower on a 576 x 576 update.
        const LANES: usize = 8;
        let mut l1 = [0.0; LANES];
        let mut sum_sq = [0.0; LANES];
        let mut max_abs = [0.0_f64; LANES];
        let chunks = values.chunks_exact(LANES);
        let tail = chunks.remainder();
        for chunk in chunks {
            for lane in 0..LANES {
                let x = chunk[lane];
                let m = x.abs();
                l1[lane] += m;
                sum_sq[lane] += x * x;
                max_abs[lane] = if m > max_abs[lane] { m } else { max_abs[lane] };
            }
        }
        let mut stats = EntryStats {
            len: values.len(),
            l1: l1.iter().sum(),
            sum_sq: sum_sq.iter().sum(),
            max_abs: max_abs.iter().copied().fold(0.0, f64::max),
        };
        for &x in tail {
            stats.l1 += x.abs();
            stats.sum_sq += x * x;
            stats.max_abs = stats.max_abs.max(x.abs());
        }
        stats
    }

    /// GSR, paper eq. 16 (p = 2, q = 1); `None` for an empty or all-zero matrix,
    /// where l1 / l2 is 0 / 0.
    pub fn generalized_sparsity_rate(&self) -> Option<f64> {
        if self.len == 0 || self.sum_sq <= 0.0 {
            return None;
        }
        // Rounding can put equal-magnitude entries a hair above 1.
        let gsr = self.l1 / ((self.len as f64).sqrt() * self.sum_sq.sqrt());
        Some(gsr.min(1.0))
    }
}

/// GSR of a matrix given by its entries (any order), paper eq. 16 with p = 2,
/// q = 1: `l1 / (sqrt(mn) * l2)`, in [1/sqrt(mn), 1], lower = sparser.
/// `None` for an empty or all-zero matrix, or one with a NaN or infinite entry.
pub fn generalized_sparsity_rate(values: &[f64]) -> Option<f64> {
    let stats = EntryStats::of(values);
    if stats.l1.is_finite() && stats.sum_sq.is_finite() {
        return stats.generalized_sparsity_rate();
    }
    if values.iter().any(|x| !x.is_finite()) {
        return None;
    }
    // Finite entries whose squares overflow: l1 / l2 is scale-invariant, so
    // rescale by the largest magnitude.
    let scaled: Vec<f64> = values.iter().map(|x| x / stats.max_abs).collect();
    EntryStats::of(&scaled).generalized_sparsity_rate()
}

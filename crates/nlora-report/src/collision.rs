//! The collision map of paper Fig. 2: where two tasks' updates dW_i and dW_j
//! of one adapter site are non-zero, alone or both (a collision, eq. 11).
//!
//! "Non-zero" is the same threshold as `nlora metrics` uses (the paper states
//! none), and the CR and OO in the title come from nlora-math on the full
//! matrices. Only the picture is downsampled: a block of f x f entries is
//! drawn as one cell, non-zero for a task when its largest |dW| in the block
//! is (max-pooling), so a downsampled map shows at least as much colour as
//! the full one; the figure says so.
use nlora_math::metrics::{
    orthogonal_overlap, site_geometry, CollisionThreshold, EntryStats, SiteHistory,
};

use crate::error::Result;

/// One cell of the map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cell {
    /// Below the threshold in both updates (grey).
    Neither,
    /// Non-zero in task i's update only (green).
    OnlyI,
    /// Non-zero in task j's update only (blue).
    OnlyJ,
    /// Non-zero in both: a collision (red).
    Both,
}

/// The data of one collision map.
#[derive(Debug, Clone)]
pub struct CollisionMap {
    pub site: String,
    /// 0-based task indices, i < j or any order.
    pub task_i: usize,
    pub task_j: usize,
    /// dW's shape (out x in).
    pub rows: usize,
    pub cols: usize,
    /// Each cell covers `factor x factor` entries (1: no downsampling).
    pub factor: usize,
    pub map_rows: usize,
    pub map_cols: usize,
    /// Row-major, `map_rows x map_cols`.
    pub cells: Vec<Cell>,
    /// CR_ij (eq. 11) on the full matrices at the threshold.
    pub collision_rate: f64,
    /// OO between the two tasks' lora_A (eq. 7 with one earlier task).
    pub orthogonal_overlap: f64,
    /// Fraction of entries above the threshold, per task (full matrices).
    pub density_i: f64,
    pub density_j: f64,
    pub threshold: CollisionThreshold,
}

/// Builds the map of `site` for tasks `i` and `j` (0-based), with cells of at
/// most `max_cells` per side.
pub fn collision_map(
    site: &SiteHistory,
    i: usize,
    j: usize,
    threshold: CollisionThreshold,
    max_cells: usize,
) -> Result<CollisionMap> {
    let geometry = site_geometry(site, threshold)?;
    let (lo, hi) = (i.min(j), i.max(j));
    let collision_rate = geometry
        .collisions
        .iter()
        .find(|p| p.i == lo && p.j == hi)
        .map(|p| p.rate)
        .unwrap_or(f64::NAN);
    let (ui, uj) = (&site.tasks[i], &site.tasks[j]);
    let orthogonal_overlap = orthogonal_overlap(std::slice::from_ref(ui), uj)?;
    // The threshold of each update, exactly as site_geometry sets it.
    let maxes: Vec<f64> = site
        .tasks
        .iter()
        .map(|t| EntryStats::of(t.dense().as_slice()).max_abs)
        .collect();
    let site_max = maxes.iter().copied().fold(0.0, f64::max);
    let (tau_i, tau_j) = (
        threshold.tau(maxes[i], site_max),
        threshold.tau(maxes[j], site_max),
    );
    let (dw_i, dw_j) = (ui.dense(), uj.dense());
    let (rows, cols) = dw_i.shape();
    let factor = rows.max(cols).div_ceil(max_cells.max(1)).max(1);
    let (map_rows, map_cols) = (rows.div_ceil(factor), cols.div_ceil(factor));
    let mut cells = Vec::with_capacity(map_rows * map_cols);
    for br in 0..map_rows {
        for bc in 0..map_cols {
            let (mut mi, mut mj) = (0.0f64, 0.0f64);
            for r in br * factor..((br + 1) * factor).min(rows) {
                for c in bc * factor..((bc + 1) * factor).min(cols) {
                    mi = mi.max(dw_i[(r, c)].abs());
                    mj = mj.max(dw_j[(r, c)].abs());
                }
            }
            cells.push(match (mi > tau_i, mj > tau_j) {
                (false, false) => Cell::Neither,
                (true, false) => Cell::OnlyI,
                (false, true) => Cell::OnlyJ,
                (true, true) => Cell::Both,
            });
        }
    }
    Ok(CollisionMap {
        site: site.name.clone(),
        task_i: i,
        task_j: j,
        rows,
        cols,
        factor,
        map_rows,
        map_cols,
        cells,
        collision_rate,
        orthogonal_overlap,
        density_i: geometry.density[i],
        density_j: geometry.density[j],
        threshold,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use nalgebra::DMatrix;
    use nlora_math::metrics::LowRankUpdate;

    /// dW = B A with r = 1 is the outer product b a^T: its support is known.
    fn rank_one(b: &[f64], a: &[f64]) -> LowRankUpdate {
        LowRankUpdate::new(
            DMatrix::from_row_slice(1, a.len(), a),
            DMatrix::from_row_slice(b.len(), 1, b),
            1.0,
        )
        .unwrap()
    }

    #[test]
    fn cells_classify_each_entry_and_match_eq_11() {
        // dW_1 non-zero in rows 0-1 x cols 0-1, dW_2 in rows 1-2 x cols 1-3.
        let u1 = rank_one(&[1.0, 1.0, 0.0, 0.0], &[1.0, 1.0, 0.0, 0.0]);
        let u2 = rank_one(&[0.0, 1.0, 1.0, 0.0], &[0.0, 1.0, 1.0, 1.0]);
        let site = SiteHistory {
            name: "s".into(),
            tasks: vec![u1, u2],
        };
        let m = collision_map(&site, 0, 1, CollisionThreshold::Absolute(0.0), 8).unwrap();
        assert_eq!((m.factor, m.map_rows, m.map_cols), (1, 4, 4));
        use Cell::*;
        #[rustfmt::skip]
        let expected = [
            OnlyI, OnlyI, Neither, Neither,
            OnlyI, Both,  OnlyJ,   OnlyJ,
            Neither, OnlyJ, OnlyJ, OnlyJ,
            Neither, Neither, Neither, Neither,
        ];
        assert_eq!(m.cells, expected);
        // One collision out of 16 entries; the map's red cells agree.
        assert_eq!(m.collision_rate, 1.0 / 16.0);
        let both = m.cells.iter().filter(|c| **c == Both).count();
        assert_eq!(both as f64 / 16.0, m.collision_rate);
        // OO = ||a_1 a_2^T||^2 = (1*0 + 1*1)^2.
        assert_eq!(m.orthogonal_overlap, 1.0);
        assert_eq!((m.density_i, m.density_j), (4.0 / 16.0, 6.0 / 16.0));
    }

    #[test]
    fn downsampling_max_pools_magnitudes() {
        // 4 x 4 into 2 x 2 cells: one large entry in a block marks the block.
        let u1 = rank_one(&[1.0, 0.0, 0.0, 0.0], &[1.0, 0.0, 0.0, 0.0]); // (0,0)
        let u2 = rank_one(&[0.0, 1.0, 0.0, 0.0], &[0.0, 1.0, 0.0, -1.0]); // (1,1), (1,3)
        let site = SiteHistory {
            name: "s".into(),
            tasks: vec![u1, u2],
        };
        let m = collision_map(&site, 0, 1, CollisionThreshold::Absolute(0.5), 2).unwrap();
        assert_eq!((m.factor, m.map_rows, m.map_cols), (2, 2, 2));
        use Cell::*;
        // Block (0,0) holds task 1's (0,0) and task 2's (1,1): red although
        // no single entry collides (CR stays 0); block (0,1) holds (1,3).
        assert_eq!(m.cells, [Both, OnlyJ, Neither, Neither]);
        assert_eq!(m.collision_rate, 0.0);
    }
}

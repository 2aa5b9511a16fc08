//! Adapter geometry: orthogonal overlap OO (paper eq. 7), AWOM (eq. 8), the
//! nuclear norm (section 3.3), GSR (eq. 16) and collisions (eq. 10-11), per
//! site and averaged over sites.
//!
//! Conventions (PEFT): lora_A is (r, in), lora_B is (out, r), the update is
//! dW = scale * B @ A, (out, in). The paper writes h = xW, so its A is lora_A^T
//! and its dW is dW^T: eq. 7's `A_i^T A_T` is `lora_A_i @ lora_A_T^T` and
//! eq. 8's `dW_T^T dW_i` is `dW_T @ dW_i^T`.
//!
//! dW has rank <= r, so its singular values come from an r x r problem: with
//! B = Q_b R_b and A^T = Q_a R_a (thin QR), dW = scale Q_b (R_b R_a^T) Q_a^T and
//! the orthonormal Q's do not change singular values. Likewise
//! dW_T dW_i^T = s_T s_i Q_T (R_T (A_T A_i^T) R_i^T) Q_i^T. Only GSR and the
//! collision rate need dW's entries; they are materialised one update at a time.

use candle_core::{DType, Tensor};
use nalgebra::{DMatrix, DVector};

use crate::error::{MathError, Result};
use crate::metrics::collision::{
    check_finite, mean_pairwise_collision, CollisionThreshold, SupportMask,
};
use crate::metrics::sparsity::EntryStats;

/// A LoRA update dW = scale * B @ A kept in factored form, in f64.
#[derive(Clone, Debug, PartialEq)]
pub struct LowRankUpdate {
    a: DMatrix<f64>,
    b: DMatrix<f64>,
    scale: f64,
}

impl LowRankUpdate {
    /// From lora_A (r x in) and lora_B (out x r); `scale` is 1 for the paper's
    /// dW = B A, or alpha / r for the update the model applies.
    pub fn new(a: DMatrix<f64>, b: DMatrix<f64>, scale: f64) -> Result<Self> {
        let shape_err = |detail: String| MathError::Shape {
            site: "low-rank update".into(),
            detail,
        };
        if a.nrows() == 0 || a.ncols() == 0 || b.nrows() == 0 {
            return Err(shape_err(format!(
                "lora_A is {}x{} and lora_B is {}x{}; r, in and out must be >= 1",
                a.nrows(),
                a.ncols(),
                b.nrows(),
                b.ncols()
            )));
        }
        if b.ncols() != a.nrows() {
            return Err(shape_err(format!(
                "lora_A is {}x{} but lora_B is {}x{}: their ranks differ \
                 (PEFT layout is lora_A (r, in), lora_B (out, r))",
                a.nrows(),
                a.ncols(),
                b.nrows(),
                b.ncols()
            )));
        }
        if !scale.is_finite() {
            return Err(MathError::InvalidParameter {
                name: "scale",
                value: scale,
                reason: "the update's scale must be finite (1 as in the paper, or alpha / r)",
            });
        }
        check_finite("lora_A", &a)?;
        check_finite("lora_B", &b)?;
        Ok(LowRankUpdate { a, b, scale })
    }

    /// From candle tensors lora_A (r, in) and lora_B (out, r) of any float
    /// dtype, on any device; copied to the host in f64.
    pub fn from_tensors(a: &Tensor, b: &Tensor, scale: f64) -> Result<Self> {
        Self::new(to_matrix("lora_A", a)?, to_matrix("lora_B", b)?, scale)
    }

    /// lora_A, (r, in).
    pub fn a(&self) -> &DMatrix<f64> {
        &self.a
    }

    /// lora_B, (out, r).
    pub fn b(&self) -> &DMatrix<f64> {
        &self.b
    }

    /// The scale in dW = scale * B @ A.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// The LoRA rank r.
    pub fn rank(&self) -> usize {
        self.a.nrows()
    }

    /// in_features.
    pub fn in_features(&self) -> usize {
        self.a.ncols()
    }

    /// out_features.
    pub fn out_features(&self) -> usize {
        self.b.nrows()
    }

    /// The dense update dW = scale * B @ A, (out, in).
    pub fn dense(&self) -> DMatrix<f64> {
        let mut dw = &self.b * &self.a;
        if self.scale != 1.0 {
            dw *= self.scale;
        }
        dw
    }

    /// Writes dW = scale * B @ A into `out` (out x in), reusing its allocation.
    pub fn dense_into(&self, out: &mut DMatrix<f64>) {
        if out.shape() != (self.out_features(), self.in_features()) {
            *out = DMatrix::zeros(self.out_features(), self.in_features());
        }
        out.gemm(self.scale, &self.b, &self.a, 0.0);
    }

    /// The singular values of dW in descending order (min(r, out, in) of them),
    /// from the r x r core R_b R_a^T.
    pub fn singular_values(&self) -> Result<DVector<f64>> {
        self.factored().singular_values(self.scale)
    }

    /// The nuclear norm ||dW||_* (sum of singular values), paper section 3.3.
    pub fn nuclear_norm(&self) -> Result<f64> {
        Ok(self.singular_values()?.sum())
    }

    /// The spectral norm ||dW||_2 (largest singular value).
    pub fn spectral_norm(&self) -> Result<f64> {
        Ok(self.singular_values()?.max())
    }

    /// The Frobenius norm ||dW||_F, from r x r Gram matrices:
    /// `||BA||_F^2 = tr((B^T B)(A A^T))`.
    pub fn frobenius_norm(&self) -> f64 {
        let gram_b = self.b.tr_mul(&self.b);
        let gram_a = &self.a * self.a.transpose();
        let trace = gram_b.component_mul(&gram_a).sum(); // both symmetric
        self.scale.abs() * trace.max(0.0).sqrt()
    }

    fn factored(&self) -> Factored {
        Factored {
            r_b: self.b.clone().qr().r(),
            r_a: self.a.transpose().qr().r(),
        }
    }

    fn check_same_shape(&self, other: &LowRankUpdate, what: &str) -> Result<()> {
        if self.in_features() != other.in_features() || self.out_features() != other.out_features()
        {
            return Err(MathError::Shape {
                site: what.to_string(),
                detail: format!(
                    "updates of different shapes: {}x{} and {}x{} (out x in)",
                    self.out_features(),
                    self.in_features(),
                    other.out_features(),
                    other.in_features()
                ),
            });
        }
        Ok(())
    }
}

/// The R factors of the thin QRs of B and A^T.
struct Factored {
    r_b: DMatrix<f64>,
    r_a: DMatrix<f64>,
}

impl Factored {
    fn singular_values(&self, scale: f64) -> Result<DVector<f64>> {
        let core = &self.r_b * self.r_a.transpose() * scale.abs();
        singular_values_of(core, "dW = B A")
    }
}

/// Orthogonal overlap, paper eq. 7: `O_T = SUM_{i<T} ||A_i^T A_T||_F^2`, which with
/// stored lora_A (r x in) is `SUM_i ||lora_A_i @ lora_A_T^T||_F^2`. Uses A only.
pub fn orthogonal_overlap(previous: &[LowRankUpdate], current: &LowRankUpdate) -> Result<f64> {
    let mut sum = 0.0;
    for p in previous {
        p.check_same_shape(current, "orthogonal overlap")?;
        sum += (&p.a * current.a.transpose()).norm_squared();
    }
    Ok(sum)
}

/// Adapter weight orthogonality magnitude, paper eq. 8:
/// `AWOM_T = SUM_{i<T} ||dW_T^T dW_i||_2` (paper layout), i.e. the spectral norm of
/// `dW_T @ dW_i^T` with PEFT's (out x in) dW, computed on r x r matrices.
pub fn awom(previous: &[LowRankUpdate], current: &LowRankUpdate) -> Result<f64> {
    let current_f = current.factored();
    let mut sum = 0.0;
    for p in previous {
        p.check_same_shape(current, "AWOM")?;
        sum += awom_term(current, &current_f, p, &p.factored())?;
    }
    Ok(sum)
}

/// `||dW_T dW_i^T||_2 = |s_T s_i| * sigma_max(R_bT (A_T A_i^T) R_bi^T)`.
fn awom_term(
    current: &LowRankUpdate,
    current_f: &Factored,
    previous: &LowRankUpdate,
    previous_f: &Factored,
) -> Result<f64> {
    let cross = &current.a * previous.a.transpose(); // r_T x r_i
    let core = &current_f.r_b * cross * previous_f.r_b.transpose();
    let sv = singular_values_of(core, "dW_T dW_i^T")?;
    Ok((current.scale * previous.scale).abs() * sv.max())
}

/// One adapter site's updates, one per task in training order.
#[derive(Clone, Debug)]
pub struct SiteHistory {
    /// Module path, e.g. `model.layers.3.self_attn.v_proj`.
    pub name: String,
    /// The update of task 0, 1, ..., T-1 at this site.
    pub tasks: Vec<LowRankUpdate>,
}

/// CR_ij (eq. 11) of one pair of tasks at one site.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PairCollision {
    /// The earlier task (0-based).
    pub i: usize,
    /// The later task.
    pub j: usize,
    /// The fraction of positions non-zero in both updates.
    pub rate: f64,
}

/// The geometry of one site after its last task T.
#[derive(Clone, Debug, PartialEq)]
pub struct SiteGeometry {
    /// Module path.
    pub name: String,
    /// Eq. 7 for the last task against all earlier ones (0 with one task).
    pub orthogonal_overlap: f64,
    /// Eq. 8 for the last task against all earlier ones (0 with one task).
    pub awom: f64,
    /// Eq. 16 per task; `None` for an all-zero update.
    pub gsr: Vec<Option<f64>>,
    /// ||dW||_* per task.
    pub nuclear_norm: Vec<f64>,
    /// Fraction of non-zero positions per task, under the threshold.
    pub density: Vec<f64>,
    /// Fraction of positions non-zero in at least one task's update.
    pub used_fraction: f64,
    /// Eq. 11 for every pair i < j.
    pub collisions: Vec<PairCollision>,
    /// Eq. 10; `None` with one task.
    pub average_collision_rate: Option<f64>,
}

/// Geometry of every site and the means over sites.
#[derive(Clone, Debug, PartialEq)]
pub struct GeometrySummary {
    /// The threshold used for collisions and densities (report it with them).
    pub threshold: CollisionThreshold,
    /// Per site, in input order.
    pub sites: Vec<SiteGeometry>,
    /// Mean over sites of eq. 7.
    pub mean_orthogonal_overlap: f64,
    /// Mean over sites of eq. 8.
    pub mean_awom: f64,
    /// Per task, the mean over sites of eq. 16 (sites with an all-zero update
    /// left out; `None` if every site's update is zero).
    pub mean_gsr: Vec<Option<f64>>,
    /// Per task, the mean over sites of the nuclear norm.
    pub mean_nuclear_norm: Vec<f64>,
    /// Mean over sites of eq. 10; `None` with one task.
    pub mean_average_collision_rate: Option<f64>,
}

/// All geometry metrics of one site: OO and AWOM of the last task, and per
/// task GSR, nuclear norm and density, and CR for every pair with ACR.
/// Each dense dW is built, measured and dropped before the next (twice with
/// `RelativeToSiteMax`, whose threshold needs every task's maximum first).
pub fn site_geometry(site: &SiteHistory, threshold: CollisionThreshold) -> Result<SiteGeometry> {
    threshold.validate()?;
    let label = || format!("site `{}`", site.name);
    let tasks = &site.tasks;
    let Some(last) = tasks.last() else {
        return Err(MathError::Shape {
            site: label(),
            detail: "no task updates; a site needs at least one".into(),
        });
    };
    for (k, t) in tasks.iter().enumerate() {
        if t.check_same_shape(last, "").is_err() {
            return Err(MathError::Shape {
                site: label(),
                detail: format!(
                    "task {k}'s update is {}x{} but the last task's is {}x{} (out x in)",
                    t.out_features(),
                    t.in_features(),
                    last.out_features(),
                    last.in_features()
                ),
            });
        }
    }
    let relabel = |e: MathError| match e {
        MathError::SvdDidNotConverge { what } => MathError::SvdDidNotConverge {
            what: format!("{}: {what}", label()),
        },
        other => other,
    };

    let factored: Vec<Factored> = tasks.iter().map(LowRankUpdate::factored).collect();
    let nuclear_norm = tasks
        .iter()
        .zip(&factored)
        .map(|(t, f)| Ok(f.singular_values(t.scale)?.sum()))
        .collect::<Result<Vec<f64>>>()
        .map_err(relabel)?;

    let n_prev = tasks.len() - 1;
    let last_f = &factored[n_prev];
    let mut orthogonal_overlap = 0.0;
    let mut awom = 0.0;
    for (p, pf) in tasks[..n_prev].iter().zip(&factored) {
        orthogonal_overlap += (&p.a * last.a.transpose()).norm_squared();
        awom += awom_term(last, last_f, p, pf).map_err(relabel)?;
    }

    let mut stats = Vec::with_capacity(tasks.len());
    let mut masks = Vec::with_capacity(tasks.len());
    let mut dw = DMatrix::zeros(0, 0); // one dense update at a time, reused
    for t in tasks {
        t.dense_into(&mut dw);
        let s = EntryStats::of(dw.as_slice());
        if !threshold.needs_site_max() {
            masks.push(SupportMask::new(
                dw.as_slice(),
                threshold.tau(s.max_abs, 0.0),
            ));
        }
        stats.push(s);
    }
    if threshold.needs_site_max() {
        let site_max = stats.iter().map(|s| s.max_abs).fold(0.0, f64::max);
        for (t, s) in tasks.iter().zip(&stats) {
            let tau = threshold.tau(s.max_abs, site_max);
            t.dense_into(&mut dw);
            masks.push(SupportMask::new(dw.as_slice(), tau));
        }
    }

    let mut collisions = Vec::new();
    for i in 0..masks.len() {
        for j in i + 1..masks.len() {
            collisions.push(PairCollision {
                i,
                j,
                rate: masks[i].collision_rate(&masks[j])?,
            });
        }
    }
    let average_collision_rate = if masks.len() >= 2 {
        Some(mean_pairwise_collision(&masks)?)
    } else {
        None
    };

    Ok(SiteGeometry {
        name: site.name.clone(),
        orthogonal_overlap,
        awom,
        gsr: stats
            .iter()
            .map(EntryStats::generalized_sparsity_rate)
            .collect(),
        nuclear_norm,
        density: masks.iter().map(SupportMask::density).collect(),
        used_fraction: SupportMask::union_density(&masks),
        collisions,
        average_collision_rate,
    })
}

/// [`site_geometry`] for every site, and the means over sites. All sites must
/// have the same number of tasks.
pub fn geometry(sites: &[SiteHistory], threshold: CollisionThreshold) -> Result<GeometrySummary> {
    let Some(first) = sites.first() else {
        return Err(MathError::NoSites { what: "geometry" });
    };
    let n_tasks = first.tasks.len();
    for s in sites {
        if s.tasks.len() != n_tasks {
            return Err(MathError::Shape {
                site: format!("site `{}`", s.name),
                detail: format!(
                    "{} task updates but site `{}` has {n_tasks}; every site needs one per task",
                    s.tasks.len(),
                    first.name
                ),
            });
        }
    }
    let per_site = sites
        .iter()
        .map(|s| site_geometry(s, threshold))
        .collect::<Result<Vec<_>>>()?;
    let n = per_site.len() as f64;
    let mean = |f: &dyn Fn(&SiteGeometry) -> f64| per_site.iter().map(f).sum::<f64>() / n;
    let mean_gsr = (0..n_tasks)
        .map(|k| {
            let defined: Vec<f64> = per_site.iter().filter_map(|g| g.gsr[k]).collect();
            (!defined.is_empty()).then(|| defined.iter().sum::<f64>() / defined.len() as f64)
        })
        .collect();
    let mean_nuclear_norm = (0..n_tasks).map(|k| mean(&|g| g.nuclear_norm[k])).collect();
    let mean_average_collision_rate =
        (n_tasks >= 2).then(|| mean(&|g| g.average_collision_rate.unwrap_or(0.0)));
    Ok(GeometrySummary {
        threshold,
        mean_orthogonal_overlap: mean(&|g| g.orthogonal_overlap),
        mean_awom: mean(&|g| g.awom),
        mean_gsr,
        mean_nuclear_norm,
        mean_average_collision_rate,
        sites: per_site,
    })
}

/// Singular values, descending; bounded iterations so a pathological input
/// errors instead of hanging.
fn singular_values_of(m: DMatrix<f64>, what: &str) -> Result<DVector<f64>> {
    let svd = m
        .try_svd(false, false, f64::EPSILON, 10_000)
        .ok_or_else(|| MathError::SvdDidNotConverge {
            what: what.to_string(),
        })?;
    let mut values = svd.singular_values;
    values
        .as_mut_slice()
        .sort_unstable_by(|x, y| y.total_cmp(x));
    Ok(values)
}

fn to_matrix(what: &str, t: &Tensor) -> Result<DMatrix<f64>> {
    let (rows, cols) = t.dims2().map_err(|_| MathError::Shape {
        site: "low-rank update".into(),
        detail: format!("{what} must be a 2-D tensor, got shape {:?}", t.dims()),
    })?;
    let data: Vec<f64> = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    Ok(DMatrix::from_row_slice(rows, cols, &data))
}

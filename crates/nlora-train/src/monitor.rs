//! The live collision monitor and the automatic lambda (beyond the paper).
//!
//! Every few optimizer steps the monitor reads the current task's update
//! dW = s B A at every adapted site: its density (fraction of positions with
//! |dW| > tau) and its collision rate with each earlier task's update (eq. 11),
//! averaged over sites. Both fractions are estimated on a fixed random sample
//! of positions per site, computed from the low-rank factors in O(m r); the
//! threshold tau = `tau_rel` x (the largest |dW| at the site over the tasks so
//! far) uses the exact maximum, one dense product per site per reading (what
//! the dW-form penalty pays every step). With the same threshold the sample
//! mean over S sites of m positions each is within
//! `hoeffding_half_width_mean` (about sqrt(ln 40 / (2 S m)) at 95 %) of the
//! all-positions figure; the reading carries that half-width.
//!
//! With `method.auto_lambda` each reading also feeds the density controller,
//! whose lambda the method's l1 term uses from the next step on.
use candle_core::{DType, Tensor};
use nalgebra::DMatrix;
use nlora_adapter::AdapterSites;
use nlora_math::capacity::{
    hoeffding_half_width_mean, DensityController, SampledMonitor, SampledPositions,
};
use serde::{Deserialize, Serialize};

use crate::config::RunConfig;
use crate::error::Result;
use crate::trainer::derive_seed;

/// One reading of the monitor.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MonitorRecord {
    /// Optimizer steps of the task taken before the reading.
    pub step: usize,
    /// Mean over sites of the current update's density.
    pub density: f64,
    /// Mean over sites of the mean CR with the earlier tasks' updates;
    /// `None` for the first task or when earlier updates were merged.
    pub collision_rate: Option<f64>,
    /// Both fractions are within this of their all-positions value with
    /// probability >= 0.95 (Hoeffding, mean over sites).
    pub half_width_95: f64,
    /// The lambda used from the next step on (auto lambda only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lambda: Option<f64>,
}

/// What a stage's monitor carries through a mid-task checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MonitorSnapshot {
    pub records: Vec<MonitorRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controller: Option<DensityController>,
}

struct SiteWatch {
    path: String,
    sampled: SampledMonitor,
    /// Largest |dW| of the earlier tasks' updates at this site.
    previous_max: f64,
}

/// The monitor of one stage (and the controller, carried between stages).
pub struct StageMonitor {
    watches: Vec<SiteWatch>,
    /// The readings' error bound: fixed by the sample sizes.
    half_width_95: f64,
    tau_rel: f64,
    every: usize,
    auto_every: usize,
    pub controller: Option<DensityController>,
    pub records: Vec<MonitorRecord>,
}

fn to_matrix(t: &Tensor) -> Result<DMatrix<f64>> {
    let (rows, cols) = t.dims2()?;
    let v = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    Ok(DMatrix::from_row_slice(rows, cols, &v))
}

fn max_abs(t: &Tensor) -> Result<f64> {
    Ok(t.abs()?
        .max_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?)
}

impl StageMonitor {
    /// The monitor for the stage now installed in `sites` (its current
    /// adapters and the earlier tasks' history), or None when the config
    /// asks for no readings. The sampled positions depend on the run's seed
    /// and the site only: the same positions for every task.
    pub fn new(
        cfg: &RunConfig,
        sites: &AdapterSites,
        controller: Option<DensityController>,
    ) -> Result<Option<Self>> {
        let auto_every = cfg.method.auto_lambda.as_ref().map_or(0, |a| a.every);
        if cfg.monitor.every == 0 && auto_every == 0 {
            return Ok(None);
        }
        let mut watches = Vec::new();
        let (mut samples, mut sizes) = (Vec::new(), Vec::new());
        for (k, (path, site)) in sites.adapted().enumerate() {
            if site.current().is_none() {
                continue;
            }
            let (out, inp) = (site.out_features(), site.in_features());
            let positions = SampledPositions::new(
                out,
                inp,
                cfg.monitor.positions,
                derive_seed(cfg.seed, 0, 3, k as u64),
            )?;
            let mut previous = Vec::new();
            let mut previous_max = 0f64;
            for h in site.history() {
                previous_max = previous_max.max(max_abs(&h.delta_weight()?)?);
                previous.push((to_matrix(&h.a)?, to_matrix(&h.b)?, h.scale));
            }
            samples.push(positions.len());
            sizes.push(out * inp);
            watches.push(SiteWatch {
                path: path.to_string(),
                sampled: SampledMonitor::new(positions, &previous)?,
                previous_max,
            });
        }
        if watches.is_empty() {
            return Ok(None);
        }
        Ok(Some(Self {
            watches,
            half_width_95: hoeffding_half_width_mean(&samples, &sizes, 0.05),
            tau_rel: cfg.monitor.tau_rel,
            every: cfg.monitor.every,
            auto_every,
            controller,
            records: Vec::new(),
        }))
    }

    /// Whether to read after optimizer step `step` (1-based) of `total`.
    pub fn due(&self, step: usize, total: usize) -> bool {
        let every = |k: usize| k > 0 && step % k == 0;
        step == total || every(self.every) || (self.controller.is_some() && every(self.auto_every))
    }

    /// Reads the current updates; with a controller, updates lambda and
    /// returns it as the record's `lambda`.
    pub fn read(&mut self, sites: &AdapterSites, step: usize) -> Result<MonitorRecord> {
        let mut density = 0f64;
        let mut cr_sum = 0f64;
        let mut cr_sites = 0usize;
        for w in &self.watches {
            let Some(cur) = sites.get(&w.path).and_then(|s| s.current()) else {
                continue;
            };
            let a = cur.a().as_tensor();
            let b = cur.b().as_tensor();
            let scale = cur.scale();
            let current_max = max_abs(&cur.delta_weight()?)?;
            let tau = self.tau_rel * current_max.max(w.previous_max);
            if tau <= 0.0 {
                // An all-zero update (B = 0 at the start): nothing is on.
                continue;
            }
            let r = w.sampled.read(&to_matrix(a)?, &to_matrix(b)?, scale, tau)?;
            density += r.density;
            if let Some(cr) = r.collision_rate {
                cr_sum += cr;
                cr_sites += 1;
            }
        }
        let n = self.watches.len() as f64;
        let density = density / n;
        let lambda = self.controller.as_mut().map(|c| c.update(density));
        let record = MonitorRecord {
            step,
            density,
            collision_rate: (cr_sites > 0).then(|| cr_sum / cr_sites as f64),
            half_width_95: self.half_width_95,
            lambda,
        };
        self.records.push(record);
        Ok(record)
    }

    pub fn snapshot(&self) -> MonitorSnapshot {
        MonitorSnapshot {
            records: self.records.clone(),
            controller: self.controller.clone(),
        }
    }

    /// Continues from a mid-task checkpoint's snapshot.
    pub fn restore(&mut self, snapshot: &MonitorSnapshot) {
        self.records = snapshot.records.clone();
        if snapshot.controller.is_some() {
            self.controller = snapshot.controller.clone();
        }
    }
}

/// The progress-bar text of a reading: density +- bound, CR, lambda.
pub fn describe(r: &MonitorRecord) -> String {
    let mut s = format!("ρ {:.3}±{:.3}", r.density, r.half_width_95);
    if let Some(cr) = r.collision_rate {
        s.push_str(&format!(" CR {cr:.3}"));
    }
    if let Some(l) = r.lambda {
        s.push_str(&format!(" λ {l:.2e}"));
    }
    s
}

//! `nlora metrics`: the adapters' geometry of a finished run (paper §4.1:
//! OO, AWOM, GSR, collision rates, and §3.3's nuclear norms), computed from
//! the per-task PEFT adapters in the run directory.
//!
//! Each task's update is the adapter saved at the end of that task, with its
//! scale: dW_k = (alpha / r) B_k A_k, the change it makes to the weight. For
//! SeqLoRA (one adapter through all tasks) the "update of task k" is the
//! adapter as it stood after task k.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::Device;
use nlora_adapter::PeftAdapter;
use nlora_math::metrics::{
    geometry, CollisionThreshold, GeometrySummary, LowRankUpdate, SiteHistory,
};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::rundir::{read_json, write_json, Results, RunDir};

/// The relative thresholds at which ACR is also reported, to show how much
/// the collision figures depend on the (unstated in the paper) threshold.
pub const SENSITIVITY_FRACTIONS: [f64; 4] = [1e-3, 1e-2, 5e-2, 1e-1];

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SiteMetrics {
    pub site: String,
    pub orthogonal_overlap: f64,
    pub awom: f64,
    pub gsr: Vec<Option<f64>>,
    pub nuclear_norm: Vec<f64>,
    pub density: Vec<f64>,
    pub average_collision_rate: Option<f64>,
    /// Room left at the site (absent in metrics.json files of older runs).
    #[serde(default)]
    pub capacity: Option<Capacity>,
}

/// The capacity forecast of one site, or its mean over sites.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Capacity {
    /// Fraction of positions non-zero in at least one task's update.
    pub used_fraction: f64,
    /// Mean per-task density.
    pub mean_density: f64,
    /// Mean over pairs of the measured CR_ij.
    pub measured_mean_cr: Option<f64>,
    /// Mean over pairs of s_i s_j (Theorem 2, independent supports).
    pub independent_mean_cr: Option<f64>,
    /// measured / independent (1: independent; > 1: tasks crowd together).
    pub independence_ratio: Option<f64>,
    /// Where N more tasks at the mean density would take the site.
    pub forecast: Vec<CapacityPoint>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CapacityPoint {
    pub more_tasks: usize,
    /// Expected ACR over all tasks, new pairs independent (Theorem 2).
    pub expected_acr: f64,
    /// The same, new pairs scaled by the measured independence ratio.
    pub expected_acr_observed_ratio: f64,
    pub expected_used_fraction: f64,
}

/// The horizons of the forecast: one more task, the paper's 15-task
/// benchmark length, and the "hundreds of tasks" of its limitations.
pub const FORECAST_HORIZONS: [usize; 4] = [1, 5, 15, 100];

fn site_capacity(s: &nlora_math::metrics::geometry::SiteGeometry) -> Result<Capacity> {
    let f = nlora_math::capacity::forecast(
        &s.density,
        &s.collisions,
        s.used_fraction,
        &FORECAST_HORIZONS,
    )?;
    Ok(Capacity {
        used_fraction: f.used_fraction,
        mean_density: f.mean_density,
        measured_mean_cr: f.measured_mean_cr,
        independent_mean_cr: f.independent_mean_cr,
        independence_ratio: f.independence_ratio,
        forecast: f
            .points
            .iter()
            .map(|p| CapacityPoint {
                more_tasks: p.more_tasks,
                expected_acr: p.expected_acr,
                expected_acr_observed_ratio: p.expected_acr_observed_ratio,
                expected_used_fraction: p.expected_used_fraction,
            })
            .collect(),
    })
}

/// The mean over sites of each figure (`None` entries left out).
fn mean_capacity(sites: &[Capacity]) -> Option<Capacity> {
    let first = sites.first()?;
    let n = sites.len() as f64;
    let mean = |f: &dyn Fn(&Capacity) -> f64| sites.iter().map(f).sum::<f64>() / n;
    let mean_opt = |f: &dyn Fn(&Capacity) -> Option<f64>| {
        let v: Vec<f64> = sites.iter().filter_map(f).collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    };
    Some(Capacity {
        used_fraction: mean(&|c| c.used_fraction),
        mean_density: mean(&|c| c.mean_density),
        measured_mean_cr: mean_opt(&|c| c.measured_mean_cr),
        independent_mean_cr: mean_opt(&|c| c.independent_mean_cr),
        independence_ratio: mean_opt(&|c| c.independence_ratio),
        forecast: (0..first.forecast.len())
            .map(|k| CapacityPoint {
                more_tasks: first.forecast[k].more_tasks,
                expected_acr: mean(&|c| c.forecast[k].expected_acr),
                expected_acr_observed_ratio: mean(&|c| c.forecast[k].expected_acr_observed_ratio),
                expected_used_fraction: mean(&|c| c.forecast[k].expected_used_fraction),
            })
            .collect(),
    })
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunMetrics {
    pub method: String,
    pub tasks: Vec<String>,
    /// How a dW entry counts as non-zero for CR/ACR/density.
    pub threshold: String,
    pub orthogonal_overlap: f64,
    pub awom: f64,
    /// Mean over sites, per task.
    pub gsr: Vec<Option<f64>>,
    pub nuclear_norm: Vec<f64>,
    pub acr: Option<f64>,
    /// ACR at other thresholds (relative to each site's largest |dW|).
    pub acr_sensitivity: Vec<(String, Option<f64>)>,
    /// Mean over sites of the capacity forecast (absent in older runs).
    #[serde(default)]
    pub capacity: Option<Capacity>,
    pub sites: Vec<SiteMetrics>,
}

pub fn describe(t: &CollisionThreshold) -> String {
    match t {
        CollisionThreshold::Absolute(v) => format!("|dW| > {v:e}"),
        CollisionThreshold::RelativeToMax(f) => format!("|dW| > {f} * max|dW_k| (per task)"),
        CollisionThreshold::RelativeToSiteMax(f) => {
            format!("|dW| > {f} * max over tasks of max|dW| at the site")
        }
    }
}

/// The task adapter folders of a run, in task order.
pub fn task_adapter_dirs(root: &Path, n: usize) -> Result<Vec<PathBuf>> {
    let mut found = BTreeMap::new();
    let entries = std::fs::read_dir(root).map_err(|e| TrainError::RunDir {
        path: root.to_path_buf(),
        message: format!("cannot list: {e}"),
    })?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(rest) = name.strip_prefix("task-") {
            if let Some((k, _)) = rest.split_once('-') {
                if let Ok(k) = k.parse::<usize>() {
                    found.insert(k, e.path());
                }
            }
        }
    }
    let dirs: Vec<PathBuf> = found.into_values().collect();
    if dirs.len() < n || dirs.is_empty() {
        return Err(TrainError::RunDir {
            path: root.to_path_buf(),
            message: format!(
                "holds {} task adapter folders (task-K-NAME) but results.json lists {n} stages; is the run finished?",
                dirs.len()
            ),
        });
    }
    Ok(dirs)
}

/// Every site's per-task updates (with their alpha / r scale) from the run's
/// task adapter folders, in task order; `n` is the number of stages the run
/// should have (0: whatever is there).
pub fn load_site_histories(root: &Path, n: usize) -> Result<Vec<SiteHistory>> {
    let adapters = task_adapter_dirs(root, n)?
        .iter()
        .map(|d| Ok(PeftAdapter::load(d, &Device::Cpu)?))
        .collect::<Result<Vec<_>>>()?;
    site_histories(&adapters)
}

fn site_histories(adapters: &[PeftAdapter]) -> Result<Vec<SiteHistory>> {
    let first = &adapters[0];
    let mut out = Vec::new();
    for module in first.weights.keys() {
        let mut tasks = Vec::new();
        for (k, ad) in adapters.iter().enumerate() {
            let (a, b) = ad.weights.get(module).ok_or_else(|| {
                TrainError::Other(format!(
                    "task {}'s adapter has no site `{module}` but task 1's has: the run mixes adapter layouts",
                    k + 1
                ))
            })?;
            tasks.push(LowRankUpdate::from_tensors(a, b, ad.config.scale())?);
        }
        out.push(SiteHistory {
            name: module.clone(),
            tasks,
        });
    }
    Ok(out)
}

/// Computes the geometry of the run at `root` and writes metrics.json.
pub fn run_metrics(root: &Path, threshold: CollisionThreshold) -> Result<RunMetrics> {
    let rd = RunDir::new(root);
    if let Ok(cfg) = crate::RunConfig::from_toml_file(&rd.config()) {
        if cfg.method.name.is_baseline() && cfg.method.trainable == crate::config::Trainable::Full {
            return Err(TrainError::RunDir {
                path: root.to_path_buf(),
                message: format!(
                    "method `{}` fine-tuned the full weights: there are no per-task low-rank updates dW = B A to measure (OO, AWOM, GSR and collisions are defined on LoRA updates); its accuracy is in results.json",
                    cfg.method.name.as_str()
                ),
            });
        }
    }
    let results: Results = read_json(&rd.results_json())?;
    let histories = load_site_histories(root, results.accuracy_matrix.len())?;
    let summary: GeometrySummary = geometry(&histories, threshold)?;
    let mut sensitivity = Vec::new();
    for f in SENSITIVITY_FRACTIONS {
        let t = CollisionThreshold::RelativeToSiteMax(f);
        let acr = if histories.first().is_some_and(|h| h.tasks.len() > 1) {
            geometry(&histories, t)?.mean_average_collision_rate
        } else {
            None
        };
        sensitivity.push((describe(&t), acr));
    }
    let capacities = summary
        .sites
        .iter()
        .map(site_capacity)
        .collect::<Result<Vec<_>>>()?;
    let metrics = RunMetrics {
        method: results.method.clone(),
        tasks: results.tasks.clone(),
        threshold: describe(&threshold),
        orthogonal_overlap: summary.mean_orthogonal_overlap,
        awom: summary.mean_awom,
        gsr: summary.mean_gsr.clone(),
        nuclear_norm: summary.mean_nuclear_norm.clone(),
        acr: summary.mean_average_collision_rate,
        acr_sensitivity: sensitivity,
        capacity: mean_capacity(&capacities),
        sites: summary
            .sites
            .iter()
            .zip(capacities)
            .map(|(s, capacity)| SiteMetrics {
                site: s.name.clone(),
                orthogonal_overlap: s.orthogonal_overlap,
                awom: s.awom,
                gsr: s.gsr.clone(),
                nuclear_norm: s.nuclear_norm.clone(),
                density: s.density.clone(),
                average_collision_rate: s.average_collision_rate,
                capacity: Some(capacity),
            })
            .collect(),
    };
    write_json(&rd.metrics_json(), &metrics)?;
    Ok(metrics)
}

fn opt(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.4}")).unwrap_or_else(|| "-".into())
}

/// A plain-text table of the metrics, as `nlora metrics` prints it.
pub fn format_table(m: &RunMetrics) -> String {
    let mut s = format!(
        "method {}  tasks {}\nthreshold for CR/ACR/density: {}\n\n",
        m.method,
        m.tasks.join(" -> "),
        m.threshold
    );
    s.push_str(&format!(
        "mean over sites: OO {:.4}  AWOM {:.4}  ACR {}\n",
        m.orthogonal_overlap,
        m.awom,
        opt(m.acr)
    ));
    s.push_str("per task (mean over sites):\n  task                GSR      nuclear\n");
    for (k, t) in m.tasks.iter().enumerate() {
        s.push_str(&format!(
            "  {:<18} {:>8} {:>10.4}\n",
            t,
            opt(m.gsr.get(k).copied().flatten()),
            m.nuclear_norm.get(k).copied().unwrap_or(f64::NAN)
        ));
    }
    s.push_str("ACR sensitivity to the threshold:\n");
    for (t, v) in &m.acr_sensitivity {
        s.push_str(&format!("  {:<55} {}\n", t, opt(*v)));
    }
    if let Some(c) = &m.capacity {
        s.push_str(&format!(
            "capacity (mean over sites): used {:.4} of positions, density per task {:.4}, \
             measured/independent CR {}\n",
            c.used_fraction,
            c.mean_density,
            opt(c.independence_ratio)
        ));
        for p in &c.forecast {
            s.push_str(&format!(
                "  after {:>3} more tasks: ACR {:.4} (independent) / {:.4} (observed ratio), used {:.4}\n",
                p.more_tasks, p.expected_acr, p.expected_acr_observed_ratio, p.expected_used_fraction
            ));
        }
    }
    s.push_str("\nper site:\n  site                                         OO        AWOM      ACR     GSR(last)\n");
    for site in &m.sites {
        s.push_str(&format!(
            "  {:<42} {:>9.4} {:>9.4} {:>8} {:>8}\n",
            site.site,
            site.orthogonal_overlap,
            site.awom,
            opt(site.average_collision_rate),
            opt(site.gsr.last().copied().flatten())
        ));
    }
    s
}

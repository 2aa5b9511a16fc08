//! One run directory as the report sees it: what `nlora run` and `nlora
//! metrics` wrote, with a note for every file that is missing or unreadable
//! (a report of partial runs is still a report).
use std::path::{Path, PathBuf};

use nlora_train::analysis::RunMetrics;
use nlora_train::engine::{MonitorLog, MONITOR_FILE};
use nlora_train::rundir::{read_json, Results, RunDir};
use nlora_train::RunConfig;

use crate::error::{ReportError, Result};

/// The files of one run directory that the report reads.
#[derive(Debug, Clone)]
pub struct Run {
    /// A label unique among the report's runs (the folder name, made unique).
    pub name: String,
    pub dir: PathBuf,
    pub results: Option<Results>,
    pub metrics: Option<RunMetrics>,
    pub config: Option<RunConfig>,
    /// monitor.json: the live monitor's readings and auto lambda's
    /// trajectory. Absent in runs older than the monitor or trained with the
    /// monitor off (not a missing input: the monitor section says so).
    pub monitor: Option<MonitorLog>,
    /// The number of task-K-NAME adapter folders.
    pub task_adapters: usize,
    /// What is missing or unreadable, said so the reader knows what to run.
    pub notes: Vec<String>,
}

impl Run {
    /// Reads the run at `dir`. A folder that holds nothing a run writes is an
    /// error naming it; missing or broken files become notes.
    pub fn load(dir: &Path) -> Result<Run> {
        let not_run = |reason: &str| ReportError::NotARunDir {
            path: dir.to_path_buf(),
            reason: reason.to_string(),
        };
        if !dir.is_dir() {
            return Err(not_run(if dir.exists() {
                "it is a file, not a folder"
            } else {
                "it does not exist"
            }));
        }
        let rd = RunDir::new(dir);
        let task_adapters = count_task_adapters(dir);
        let has = |p: PathBuf| p.exists();
        if !has(rd.config())
            && !has(rd.results_json())
            && !has(rd.metrics_json())
            && task_adapters == 0
        {
            return Err(not_run(
                "no config.toml, results.json, metrics.json or task-K-NAME adapter folders",
            ));
        }
        let mut notes = Vec::new();
        let results = read_optional::<Results>(
            &rd.results_json(),
            "results.json",
            "the run has not finished its first task; finish it with `nlora run --resume`",
            &mut notes,
        );
        let metrics = read_optional::<RunMetrics>(
            &rd.metrics_json(),
            "metrics.json",
            &format!(
                "no OO, AWOM, GSR, ACR or nuclear norms; run `nlora metrics {}`",
                dir.display()
            ),
            &mut notes,
        );
        let config = if rd.config().exists() {
            match RunConfig::from_toml_file(&rd.config()) {
                Ok(c) => Some(c),
                Err(e) => {
                    notes.push(format!("config.toml unreadable ({e}): order unknown"));
                    None
                }
            }
        } else {
            notes.push("config.toml missing: order unknown".into());
            None
        };
        if task_adapters == 0 {
            notes.push("no task-K-NAME adapter folders: no collision map".into());
        }
        let monitor_path = dir.join(MONITOR_FILE);
        let monitor = if monitor_path.exists() {
            read_optional::<MonitorLog>(
                &monitor_path,
                MONITOR_FILE,
                "no monitor figure",
                &mut notes,
            )
        } else {
            None
        };
        Ok(Run {
            name: folder_name(dir),
            dir: dir.to_path_buf(),
            results,
            metrics,
            config,
            monitor,
            task_adapters,
            notes,
        })
    }

    /// The method as results.json, metrics.json or config.toml names it.
    pub fn method(&self) -> String {
        if let Some(r) = &self.results {
            return r.method.clone();
        }
        if let Some(m) = &self.metrics {
            return m.method.clone();
        }
        if let Some(c) = &self.config {
            return c.method.name.as_str().to_string();
        }
        "?".into()
    }

    /// The task order: the preset's name, or "custom (N tasks)".
    pub fn order(&self) -> String {
        match &self.config {
            Some(c) => match (&c.data.order, &c.data.tasks) {
                (Some(o), _) => o.clone(),
                (None, Some(t)) => format!("custom ({} tasks)", t.len()),
                (None, None) => "?".into(),
            },
            None => "?".into(),
        }
    }

    /// The task names, from results.json or metrics.json.
    pub fn tasks(&self) -> Vec<String> {
        if let Some(r) = &self.results {
            return r.tasks.clone();
        }
        if let Some(m) = &self.metrics {
            return m.tasks.clone();
        }
        Vec::new()
    }

    /// GSR of the run: the mean over tasks of the mean over sites.
    pub fn mean_gsr(&self) -> Option<f64> {
        let m = self.metrics.as_ref()?;
        let defined: Vec<f64> = m.gsr.iter().flatten().copied().collect();
        (!defined.is_empty()).then(|| defined.iter().sum::<f64>() / defined.len() as f64)
    }
}

fn read_optional<T: for<'de> serde::Deserialize<'de>>(
    path: &Path,
    what: &str,
    consequence: &str,
    notes: &mut Vec<String>,
) -> Option<T> {
    if !path.exists() {
        notes.push(format!("{what} missing: {consequence}"));
        return None;
    }
    match read_json::<T>(path) {
        Ok(v) => Some(v),
        Err(e) => {
            notes.push(format!("{what} unreadable ({e}): {consequence}"));
            None
        }
    }
}

fn count_task_adapters(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            name.strip_prefix("task-")
                .and_then(|r| r.split_once('-'))
                .is_some_and(|(k, _)| k.parse::<usize>().is_ok())
                && e.path().join("adapter_model.safetensors").exists()
        })
        .count()
}

fn folder_name(dir: &Path) -> String {
    let canonical = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    canonical
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "run".into())
}

/// Makes the runs' names unique (`name`, `name-2`, ...) so their figure
/// files do not overwrite each other.
pub fn make_names_unique(runs: &mut [Run]) {
    let mut seen: Vec<String> = Vec::new();
    for run in runs.iter_mut() {
        let base = run.name.clone();
        let mut name = base.clone();
        let mut k = 2;
        while seen.contains(&name) {
            name = format!("{base}-{k}");
            k += 1;
        }
        seen.push(name.clone());
        run.name = name;
    }
}

/// A name safe in a file name: letters, digits, `.`, `_` and `-`.
pub fn file_stem(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Orders adapter site names as a reader counts layers: `layers.2` before
/// `layers.10` (runs of digits compare as numbers).
pub fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn chunks(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let bytes = s.as_bytes();
        for i in 1..=bytes.len() {
            if i == bytes.len() || bytes[i].is_ascii_digit() != bytes[start].is_ascii_digit() {
                out.push((bytes[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        out
    }
    let (ca, cb) = (chunks(a), chunks(b));
    for ((da, sa), (db, sb)) in ca.iter().zip(&cb) {
        let ord = if *da && *db {
            let na = sa.trim_start_matches('0');
            let nb = sb.trim_start_matches('0');
            na.len().cmp(&nb.len()).then_with(|| na.cmp(nb))
        } else {
            sa.cmp(sb)
        };
        if ord != std::cmp::Ordering::Equal {
            return ord;
        }
    }
    ca.len().cmp(&cb.len())
}

/// `model.layers.12.self_attn.q_proj` -> `12.q`: short axis labels.
pub fn short_site(name: &str) -> String {
    let parts: Vec<&str> = name.split('.').collect();
    let layer = parts.iter().find(|p| p.parse::<usize>().is_ok());
    let module = parts.last().copied().unwrap_or(name);
    let module = module.strip_suffix("_proj").unwrap_or(module);
    match layer {
        Some(l) => format!("{l}.{module}"),
        None => module.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natural_order_counts_layers_as_numbers() {
        let mut v = vec![
            "model.layers.10.self_attn.q_proj",
            "model.layers.2.self_attn.v_proj",
            "model.layers.2.self_attn.q_proj",
            "model.layers.1.self_attn.q_proj",
        ];
        v.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(
            v,
            [
                "model.layers.1.self_attn.q_proj",
                "model.layers.2.self_attn.q_proj",
                "model.layers.2.self_attn.v_proj",
                "model.layers.10.self_attn.q_proj",
            ]
        );
        assert_eq!(short_site("model.layers.12.self_attn.q_proj"), "12.q");
        assert_eq!(file_stem("a b/c"), "a_b_c");
    }
}

//! Mid-task checkpoints: everything a stage needs to continue from an
//! optimizer step with bit-identical results. The random streams need no
//! saving: the shuffle of each epoch and the dropout of each batch are
//! derived from (seed, stage, epoch or batch) by [`crate::trainer::derive_seed`],
//! so the position in the stage is enough to repeat them.
//!
//! A checkpoint is a directory of three files, each written atomically; the
//! run's state.json names it only once all three are in place, so a crash
//! while one is written leaves the previous checkpoint in force.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, Var};
use nlora_adapter::AdapterSites;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::fault;
use crate::rundir::{atomic_write, read_json, write_json};

/// The trainable adapter tensors (lora_A and lora_B of every current adapter).
pub const PARAMS_FILE: &str = "adapter_params.safetensors";
/// The optimizer's moments.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// The position in the stage and the counters.
pub const PROGRESS_FILE: &str = "progress.json";

/// Where a stage stands after an optimizer step.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StageProgress {
    /// 0-based stage.
    pub stage: usize,
    /// Micro-batches of the stage consumed (trained or skipped):
    /// epoch * batches_per_epoch + batch within the epoch.
    pub batches_done: usize,
    /// Micro-batches trained (the gradient-accumulation counter).
    pub micro: usize,
    /// Optimizer steps taken (also the schedule's and AdamW's step count).
    pub steps: usize,
    /// Training tokens seen in the stage.
    pub tokens: u64,
    pub skipped_batches: usize,
    pub last_loss: f64,
    /// Training wall time of the stage before this checkpoint.
    pub train_seconds: f64,
    /// The live monitor's readings so far and the auto-lambda controller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monitor: Option<crate::monitor::MonitorSnapshot>,
}

/// A checkpoint in memory.
#[derive(Debug, Clone)]
pub struct StageCheckpoint {
    pub progress: StageProgress,
    /// Trainable tensors by [`named_trainable`]'s names.
    pub params: Vec<(String, Tensor)>,
    /// The optimizer's moments (see [`crate::optim::AdamW::state_tensors`]).
    pub optimizer: Vec<(String, Tensor)>,
}

pub(crate) fn safetensors_bytes(path: &Path, tensors: &[(String, Tensor)]) -> Result<Vec<u8>> {
    let contiguous = tensors
        .iter()
        .map(|(k, t)| Ok((k.as_str(), t.contiguous()?)))
        .collect::<Result<Vec<_>>>()?;
    safetensors::tensor::serialize(contiguous.iter().map(|(k, t)| (*k, t)), None).map_err(|e| {
        TrainError::File {
            path: path.to_path_buf(),
            message: format!("cannot serialise: {e}"),
        }
    })
}

pub(crate) fn load_safetensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let bytes = std::fs::read(path).map_err(|e| TrainError::File {
        path: path.to_path_buf(),
        message: format!("cannot read the checkpoint: {e}"),
    })?;
    candle_core::safetensors::load_buffer(&bytes, device).map_err(|e| TrainError::File {
        path: path.to_path_buf(),
        message: format!("not a valid checkpoint file: {e}"),
    })
}

impl StageCheckpoint {
    /// Writes the three files into `dir` (created), each atomically.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let params = dir.join(PARAMS_FILE);
        atomic_write(&params, &safetensors_bytes(&params, &self.params)?)?;
        fault::pause_at(&format!(
            "ckpt-write:{}:{}",
            self.progress.stage + 1,
            self.progress.steps
        ));
        let optimizer = dir.join(OPTIMIZER_FILE);
        atomic_write(&optimizer, &safetensors_bytes(&optimizer, &self.optimizer)?)?;
        write_json(&dir.join(PROGRESS_FILE), &self.progress)
    }

    pub fn read(dir: &Path, device: &Device) -> Result<Self> {
        let progress: StageProgress = read_json(&dir.join(PROGRESS_FILE))?;
        let sorted = |file: &str| -> Result<Vec<(String, Tensor)>> {
            let mut v: Vec<_> = load_safetensors(&dir.join(file), device)?
                .into_iter()
                .collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            Ok(v)
        };
        let params = sorted(PARAMS_FILE)?;
        let optimizer = sorted(OPTIMIZER_FILE)?;
        Ok(Self {
            progress,
            params,
            optimizer,
        })
    }
}

/// The trainable variables with stable names, site by site: `SITE.weight`
/// for a base weight opened for full fine-tuning (its Hugging Face name),
/// `SITE.lora_A` / `SITE.lora_B` for a current adapter.
pub fn named_trainable(sites: &AdapterSites) -> Vec<(String, Var)> {
    let mut out = Vec::new();
    for (path, site) in sites.iter() {
        if let Some(w) = site.base_var() {
            out.push((format!("{path}.weight"), w.clone()));
        }
        if let Some(c) = site.current() {
            out.push((format!("{path}.lora_A"), c.a().clone()));
            out.push((format!("{path}.lora_B"), c.b().clone()));
        }
    }
    out
}

/// Sets the current adapters' values from a checkpoint: the same names, the
/// same shapes, nothing missing or extra.
pub fn restore_params(sites: &AdapterSites, params: &[(String, Tensor)], dir: &Path) -> Result<()> {
    restore_params_from(sites, params, &dir.join(PARAMS_FILE))
}

/// [`restore_params`] from the file `file` (named in errors).
pub fn restore_params_from(
    sites: &AdapterSites,
    params: &[(String, Tensor)],
    file: &Path,
) -> Result<()> {
    let vars = named_trainable(sites);
    let bad = |message: String| TrainError::File {
        path: file.to_path_buf(),
        message,
    };
    if vars.len() != params.len() {
        return Err(bad(format!(
            "holds {} tensors, the run trains {}: the checkpoint is of another config",
            params.len(),
            vars.len()
        )));
    }
    let by_name: HashMap<&str, &Tensor> = params.iter().map(|(k, t)| (k.as_str(), t)).collect();
    for (name, var) in &vars {
        let t = by_name
            .get(name.as_str())
            .ok_or_else(|| bad(format!("has no tensor `{name}`")))?;
        if t.shape() != var.shape() || t.dtype() != var.dtype() {
            return Err(bad(format!(
                "`{name}` is {:?} {:?}, the adapter is {:?} {:?}",
                t.shape(),
                t.dtype(),
                var.shape(),
                var.dtype()
            )));
        }
        var.set(&t.to_device(var.device())?)?;
    }
    Ok(())
}

/// Whether `name` is a temporary file of the atomic writer
/// (`.NAME.tmp-PID`), i.e. a write a crash interrupted.
pub fn is_temp_name(name: &str) -> bool {
    name.starts_with('.')
        && name
            .rsplit_once(".tmp-")
            .is_some_and(|(_, pid)| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
}

/// Removes the temporary files interrupted writes left in a run directory:
/// in its root, its task adapter folders and its checkpoints (the caller
/// holds the run's lock, so no live writer owns them). Nothing else is
/// visited: a run directory may sit among the user's other files. Returns
/// what it removed.
pub fn remove_stale_temps(root: &Path) -> Result<Vec<PathBuf>> {
    let mut dirs = vec![root.to_path_buf()];
    let subdirs = |dir: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect()
    };
    for d in subdirs(root) {
        let name = d.file_name().unwrap_or_default().to_string_lossy();
        if name.starts_with("task-") {
            dirs.push(d);
        } else if name == "checkpoint" {
            dirs.extend(subdirs(&d));
        }
    }
    let mut removed = Vec::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let is_file = entry.file_type().is_ok_and(|t| t.is_file());
            if is_file && is_temp_name(&entry.file_name().to_string_lossy()) {
                std::fs::remove_file(&path).map_err(|e| TrainError::File {
                    path: path.clone(),
                    message: format!("cannot remove this interrupted write: {e}"),
                })?;
                removed.push(path);
            }
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    #[test]
    fn temp_names_are_only_the_atomic_writers() {
        assert!(is_temp_name(".state.json.tmp-1234"));
        assert!(is_temp_name(".adapter_model.safetensors.tmp-7"));
        assert!(!is_temp_name("state.json"));
        assert!(!is_temp_name(".lock"));
        assert!(!is_temp_name(".x.tmp-"));
        assert!(!is_temp_name(".x.tmp-12a"));
        assert!(!is_temp_name("x.tmp-12"));
    }

    #[test]
    fn stale_temps_are_removed_from_the_run_dir_only() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("checkpoint/task-1-step-2");
        let task = dir.path().join("task-2-CB");
        let other = dir.path().join("notes");
        for d in [&sub, &task, &other] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(dir.path().join(".state.json.tmp-99"), "{").unwrap();
        std::fs::write(sub.join(".optimizer.safetensors.tmp-5"), "x").unwrap();
        std::fs::write(task.join(".adapter_config.json.tmp-5"), "x").unwrap();
        std::fs::write(sub.join("progress.json"), "{}").unwrap();
        std::fs::write(dir.path().join(".lock"), "1").unwrap();
        // Not a folder of the run: left alone.
        std::fs::write(other.join(".draft.tmp-3"), "x").unwrap();
        let mut removed = remove_stale_temps(dir.path()).unwrap();
        removed.sort();
        assert_eq!(removed.len(), 3, "{removed:?}");
        assert!(other.join(".draft.tmp-3").exists());
        assert!(sub.join("progress.json").exists());
        assert!(dir.path().join(".lock").exists());
        assert!(!dir.path().join(".state.json.tmp-99").exists());
    }

    #[test]
    fn a_checkpoint_reads_back_bit_for_bit() {
        let dir = tempfile::tempdir().unwrap();
        let t = |seed: f64| {
            Tensor::arange(0f32, 6f32, &Device::Cpu)
                .unwrap()
                .affine(seed, 1.0 / 3.0)
                .unwrap()
                .reshape((2, 3))
                .unwrap()
        };
        let ck = StageCheckpoint {
            progress: StageProgress {
                stage: 1,
                batches_done: 5,
                micro: 5,
                steps: 4,
                tokens: 321,
                skipped_batches: 1,
                last_loss: 2.5,
                train_seconds: 1.25,
                // the monitor and the controller must round-trip too
                monitor: Some(crate::monitor::MonitorSnapshot {
                    records: vec![crate::monitor::MonitorRecord {
                        step: 3,
                        density: 0.8125,
                        collision_rate: Some(0.5),
                        half_width_95: 0.01,
                        lambda: Some(1.5e-4),
                    }],
                    controller: Some({
                        let mut c =
                            nlora_math::capacity::DensityController::new(0.3, 1e-4, 0.5).unwrap();
                        c.update(0.9);
                        c.update(0.1);
                        c
                    }),
                }),
            },
            params: vec![("a.lora_A".into(), t(0.1)), ("a.lora_B".into(), t(0.7))],
            optimizer: vec![
                ("m.a.lora_A".into(), t(1e-7)),
                ("v.a.lora_A".into(), t(3.3)),
            ],
        };
        ck.write(dir.path()).unwrap();
        let back = StageCheckpoint::read(dir.path(), &Device::Cpu).unwrap();
        assert_eq!(back.progress, ck.progress);
        for (a, b) in ck
            .params
            .iter()
            .chain(&ck.optimizer)
            .zip(back.params.iter().chain(&back.optimizer))
        {
            assert_eq!(a.0, b.0);
            assert_eq!(b.1.dtype(), DType::F32);
            assert_eq!(
                a.1.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                b.1.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            );
        }
        assert!(remove_stale_temps(dir.path()).unwrap().is_empty());
    }
}

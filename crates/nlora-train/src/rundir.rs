//! The run directory: the unit of reproducibility. It holds the resolved
//! config, every task's adapters (PEFT format), the accuracy matrices, the
//! results, the log and the resume point. Every file is written atomically.
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// Writes `bytes` to `path` through a temporary file in the same directory,
/// renamed over the target: a crash leaves the old file or the new one, never
/// half of either. (One implementation, shared with the PEFT writer.)
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(|e| TrainError::File {
            path: dir.to_path_buf(),
            message: format!("cannot create the directory: {e}"),
        })?;
    }
    Ok(nlora_adapter::peft::write_atomic(path, bytes)?)
}

pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value).map_err(|e| TrainError::File {
        path: path.to_path_buf(),
        message: format!("cannot serialise: {e}"),
    })?;
    text.push('\n');
    atomic_write(path, text.as_bytes())
}

pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = fs::read_to_string(path).map_err(|e| TrainError::File {
        path: path.to_path_buf(),
        message: format!("cannot read: {e}"),
    })?;
    serde_json::from_str(&text).map_err(|e| TrainError::File {
        path: path.to_path_buf(),
        message: format!("not valid JSON for this file: {e}"),
    })
}

/// Paths inside a run directory, in one place.
#[derive(Debug, Clone)]
pub struct RunDir {
    pub root: PathBuf,
}

impl RunDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
    pub fn config(&self) -> PathBuf {
        self.root.join("config.toml")
    }
    pub fn results_json(&self) -> PathBuf {
        self.root.join("results.json")
    }
    pub fn results_csv(&self) -> PathBuf {
        self.root.join("results.csv")
    }
    pub fn metrics_json(&self) -> PathBuf {
        self.root.join("metrics.json")
    }
    pub fn log(&self) -> PathBuf {
        self.root.join("train.log")
    }
    pub fn lock(&self) -> PathBuf {
        self.root.join(".lock")
    }
    /// Adapters of task `k` (0-based), as PEFT writes them.
    pub fn task_adapter(&self, k: usize, name: &str) -> PathBuf {
        self.root.join(format!("task-{}-{}", k + 1, name))
    }
    pub fn checkpoint(&self) -> PathBuf {
        self.root.join("checkpoint")
    }

    /// Takes the run directory for this process. A live owner makes this fail;
    /// a lock left by a dead process is taken over.
    ///
    /// The lock file holds the owner's pid and start time (so a recycled pid
    /// is not taken for the owner) and is created whole and exclusively: its
    /// content is written to a temporary file that is then hard-linked to
    /// `.lock`, which fails if another process got there first.
    pub fn acquire_lock(&self) -> Result<RunLock> {
        fs::create_dir_all(&self.root).map_err(|e| TrainError::RunDir {
            path: self.root.clone(),
            message: format!("cannot create: {e}"),
        })?;
        let path = self.lock();
        let me = std::process::id();
        let tmp = self.root.join(format!(".lock.tmp-{me}"));
        let content = format!("{me} {}\n", process_start_time(me).unwrap_or(0));
        atomic_write(&tmp, content.as_bytes())?;
        let result = (|| {
            for _ in 0..3 {
                match fs::hard_link(&tmp, &path) {
                    Ok(()) => return Ok(RunLock { path: path.clone() }),
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => {
                        return Err(TrainError::RunDir {
                            path: self.root.clone(),
                            message: format!("cannot create the lock {}: {e}", path.display()),
                        })
                    }
                }
                let text = fs::read_to_string(&path).unwrap_or_default();
                let mut parts = text.split_whitespace();
                let pid = parts.next().and_then(|p| p.parse::<u32>().ok());
                let start = parts.next().and_then(|p| p.parse::<u64>().ok());
                if let Some(pid) = pid {
                    if pid != me && owner_alive(pid, start) {
                        return Err(TrainError::RunDir {
                            path: self.root.clone(),
                            message: format!(
                                "in use by a running nlora process (pid {pid}); wait for it to end, or choose another --out"
                            ),
                        });
                    }
                }
                tracing::warn!(
                    "run dir {}: taking over the lock of a process that is gone ({})",
                    self.root.display(),
                    text.trim()
                );
                match fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(TrainError::RunDir {
                            path: self.root.clone(),
                            message: format!(
                                "cannot remove the stale lock {}: {e}",
                                path.display()
                            ),
                        })
                    }
                }
            }
            Err(TrainError::RunDir {
                path: self.root.clone(),
                message:
                    "another process keeps taking the lock; is a second nlora run starting here?"
                        .into(),
            })
        })();
        let _ = fs::remove_file(&tmp);
        result
    }
}

/// Whether the process that wrote a lock is alive: its pid exists and, when
/// the lock recorded one, it has the same start time (not a recycled pid).
fn owner_alive(pid: u32, start: Option<u64>) -> bool {
    if !Path::new(&format!("/proc/{pid}")).exists() {
        return false;
    }
    match (start, process_start_time(pid)) {
        (Some(recorded), Some(now)) if recorded != 0 => recorded == now,
        _ => true,
    }
}

/// A process's start time in clock ticks since boot (/proc/PID/stat field 22).
fn process_start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; fields resume after its ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Removes the lock when the run ends (also on error).
#[derive(Debug)]
pub struct RunLock {
    path: PathBuf,
}

impl Drop for RunLock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// The numbers of a run, as written to results.json.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Results {
    pub method: String,
    pub seed: u64,
    pub tasks: Vec<String>,
    /// Exact match; row i = after task i, column j = on task j, in [0, 1].
    pub accuracy_matrix: Vec<Vec<f64>>,
    /// Rank-classification over the task's labels (same layout); empty if off.
    pub accuracy_matrix_rank: Vec<Vec<f64>>,
    /// Zero-shot accuracy per task before any training (for FWT), if measured.
    pub zero_shot: Option<Vec<f64>>,
    pub average_accuracy: f64,
    pub forgetting: f64,
    pub bwt: f64,
    pub fwt: Option<f64>,
    pub average_accuracy_rank: Option<f64>,
    pub forgetting_rank: Option<f64>,
    pub bwt_rank: Option<f64>,
    /// Training tokens seen per stage (wall times are in timings.json, so
    /// that results.json is identical for identical runs).
    pub tokens_seen: Vec<u64>,
    /// Batches skipped per stage for a non-finite loss or gradient
    /// (`train.on_nonfinite = "skip"`); absent when none was.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped_batches: Vec<usize>,
}

impl Results {
    /// results.csv: one row per task with its final accuracy and the summary.
    pub fn to_csv(&self) -> String {
        let mut s = String::from("task,index,final_accuracy,final_accuracy_rank,tokens_seen\n");
        let last = self.accuracy_matrix.len().saturating_sub(1);
        for (j, t) in self.tasks.iter().enumerate() {
            let acc = self
                .accuracy_matrix
                .get(last)
                .and_then(|r| r.get(j))
                .copied()
                .unwrap_or(f64::NAN);
            let rank = self
                .accuracy_matrix_rank
                .get(last)
                .and_then(|r| r.get(j))
                .map(|v| format!("{v:.6}"))
                .unwrap_or_default();
            s.push_str(&format!(
                "{t},{},{acc:.6},{rank},{}\n",
                j + 1,
                self.tokens_seen.get(j).copied().unwrap_or(0),
            ));
        }
        s.push_str(&format!(
            "# average_accuracy={:.6},forgetting={:.6},bwt={:.6}\n",
            self.average_accuracy, self.forgetting, self.bwt
        ));
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_whole_file_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.json");
        atomic_write(&p, b"first").unwrap();
        atomic_write(&p, b"second").unwrap();
        assert_eq!(fs::read_to_string(&p).unwrap(), "second");
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "temporary files left behind");
    }

    #[test]
    fn lock_refuses_live_owner_and_takes_over_stale() {
        let dir = tempfile::tempdir().unwrap();
        let rd = RunDir::new(dir.path());
        // pid 1 is always alive.
        fs::write(rd.lock(), "1").unwrap();
        let err = rd.acquire_lock().expect_err("live owner must refuse");
        assert!(err.to_string().contains("pid 1"), "{err}");
        // A pid far above pid_max is dead: the lock is stale.
        fs::write(rd.lock(), "999999999").unwrap();
        let lock = rd.acquire_lock().unwrap();
        assert!(rd.lock().exists());
        drop(lock);
        assert!(!rd.lock().exists());
    }

    #[test]
    fn lock_records_start_time_so_a_recycled_pid_is_stale() {
        let dir = tempfile::tempdir().unwrap();
        let rd = RunDir::new(dir.path());
        let start = process_start_time(1).expect("/proc/1/stat");
        // pid 1 with its own start time: the owner is alive.
        fs::write(rd.lock(), format!("1 {start}\n")).unwrap();
        assert!(rd.acquire_lock().is_err());
        // pid 1 with another start time: the owner died, the pid was reused.
        fs::write(rd.lock(), format!("1 {}\n", start + 1)).unwrap();
        let lock = rd.acquire_lock().unwrap();
        let text = fs::read_to_string(rd.lock()).unwrap();
        let me = std::process::id();
        assert_eq!(
            text,
            format!("{me} {}\n", process_start_time(me).unwrap()),
            "the lock names its new owner"
        );
        drop(lock);
        // No temporary files are left.
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(names.is_empty(), "{names:?}");
    }
}

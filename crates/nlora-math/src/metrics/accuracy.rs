//! Metrics of the accuracy matrix: average accuracy (paper eq. 5), forgetting
//! (eq. 6), backward transfer and forward transfer (GEM, Lopez-Paz and
//! Ranzato 2017).
//!
//! Indices are 0-based: `a[i][j]` is the accuracy on task j after training
//! task i, for T tasks (the paper's a_{i,j} with 1-based i, j). Accuracies are
//! fractions in [0, 1]. Entries may be missing: the reference code evaluates
//! only the tasks seen so far (the lower triangle), which is all that AA,
//! forgetting and BWT need; FWT also needs the superdiagonal a[t-1][t].

use crate::error::{MathError, Result};

/// A T x T accuracy matrix, optionally with the zero-shot accuracies of the
/// untrained model on each task.
#[derive(Clone, Debug, PartialEq)]
pub struct AccuracyMatrix {
    tasks: usize,
    /// Row-major, `entries[i * tasks + j]` = a[i][j].
    entries: Vec<Option<f64>>,
    zero_shot: Option<Vec<f64>>,
}

/// All accuracy metrics at once; `None` where a metric is undefined
/// (T = 1, or no zero-shot row for FWT).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AccuracySummary {
    /// Paper eq. 5.
    pub average_accuracy: f64,
    /// Paper eq. 6 (F.Ra).
    pub forgetting: Option<f64>,
    /// GEM's BWT.
    pub backward_transfer: Option<f64>,
    /// GEM's FWT.
    pub forward_transfer: Option<f64>,
}

impl AccuracyMatrix {
    /// A full T x T matrix: `rows[i][j]` = accuracy on task j after training task i.
    pub fn from_rows(rows: &[Vec<f64>]) -> Result<Self> {
        let rows: Vec<Vec<Option<f64>>> = rows
            .iter()
            .map(|row| row.iter().copied().map(Some).collect())
            .collect();
        Self::from_entries(&rows)
    }

    /// The lower triangle, as the reference code evaluates: row i holds the
    /// accuracies on tasks 0..=i after training task i.
    pub fn from_lower_triangle(rows: &[Vec<f64>]) -> Result<Self> {
        let tasks = rows.len();
        let mut full = vec![vec![None; tasks]; tasks];
        for (i, row) in rows.iter().enumerate() {
            if row.len() != i + 1 {
                return Err(MathError::AccuracyShape {
                    detail: format!(
                        "lower-triangle row {i} has {} entries; row i must hold tasks 0..=i, \
                         i.e. {} entries",
                        row.len(),
                        i + 1
                    ),
                });
            }
            for (j, &value) in row.iter().enumerate() {
                full[i][j] = Some(value);
            }
        }
        Self::from_entries(&full)
    }

    /// A T x T matrix whose missing (not evaluated) entries are `None`.
    pub fn from_entries(rows: &[Vec<Option<f64>>]) -> Result<Self> {
        let tasks = rows.len();
        if tasks == 0 {
            return Err(MathError::AccuracyShape {
                detail: "no rows; there must be one row per task".into(),
            });
        }
        let mut entries = Vec::with_capacity(tasks * tasks);
        for (i, row) in rows.iter().enumerate() {
            if row.len() != tasks {
                return Err(MathError::AccuracyShape {
                    detail: format!(
                        "row {i} has {} entries but there are {tasks} rows; the matrix must be \
                         square (T x T)",
                        row.len()
                    ),
                });
            }
            for (j, &value) in row.iter().enumerate() {
                if let Some(value) = value {
                    check_accuracy(&format!("a[{i}][{j}]"), value)?;
                }
                entries.push(value);
            }
        }
        Ok(AccuracyMatrix {
            tasks,
            entries,
            zero_shot: None,
        })
    }

    /// Adds the zero-shot accuracies (untrained model, one per task) that FWT needs.
    pub fn with_zero_shot(mut self, zero_shot: &[f64]) -> Result<Self> {
        if zero_shot.len() != self.tasks {
            return Err(MathError::AccuracyShape {
                detail: format!(
                    "the zero-shot row has {} entries but there are {} tasks",
                    zero_shot.len(),
                    self.tasks
                ),
            });
        }
        for (j, &value) in zero_shot.iter().enumerate() {
            check_accuracy(&format!("zero_shot[{j}]"), value)?;
        }
        self.zero_shot = Some(zero_shot.to_vec());
        Ok(self)
    }

    /// The number of tasks T.
    pub fn num_tasks(&self) -> usize {
        self.tasks
    }

    /// a[after_task][on_task], `None` if not evaluated or out of range.
    pub fn get(&self, after_task: usize, on_task: usize) -> Option<f64> {
        if after_task < self.tasks && on_task < self.tasks {
            self.entries[after_task * self.tasks + on_task]
        } else {
            None
        }
    }

    /// The zero-shot accuracies, if given.
    pub fn zero_shot(&self) -> Option<&[f64]> {
        self.zero_shot.as_deref()
    }

    fn need(&self, metric: &'static str, after_task: usize, on_task: usize) -> Result<f64> {
        self.get(after_task, on_task)
            .ok_or(MathError::MissingAccuracy {
                metric,
                after_task,
                on_task,
            })
    }

    /// Average accuracy, paper eq. 5: `(1/T) SUM_j a[T-1][j]`, the mean of the
    /// last row.
    pub fn average_accuracy(&self) -> Result<f64> {
        let last = self.tasks - 1;
        let mut sum = 0.0;
        for j in 0..self.tasks {
            sum += self.need("average accuracy", last, j)?;
        }
        Ok(sum / self.tasks as f64)
    }

    /// Forgetting (F.Ra), paper eq. 6: `(1/(T-1)) SUM_{t<T-1} (max_{k in [t, T-2]} a[k][t]
    /// - a[T-1][t])`, 0-based. Needs T >= 2.
    pub fn forgetting(&self) -> Result<f64> {
        const METRIC: &str = "forgetting";
        self.need_tasks(METRIC, 2)?;
        let last = self.tasks - 1;
        let mut sum = 0.0;
        for t in 0..last {
            let mut best = f64::NEG_INFINITY;
            for k in t..last {
                best = best.max(self.need(METRIC, k, t)?);
            }
            sum += best - self.need(METRIC, last, t)?;
        }
        Ok(sum / last as f64)
    }

    /// Backward transfer (GEM): `(1/(T-1)) SUM_{t<T-1} (a[T-1][t] - a[t][t])`;
    /// negative when tasks are forgotten. Needs T >= 2.
    pub fn backward_transfer(&self) -> Result<f64> {
        const METRIC: &str = "backward transfer";
        self.need_tasks(METRIC, 2)?;
        let last = self.tasks - 1;
        let mut sum = 0.0;
        for t in 0..last {
            sum += self.need(METRIC, last, t)? - self.need(METRIC, t, t)?;
        }
        Ok(sum / last as f64)
    }

    /// Forward transfer (GEM): `(1/(T-1)) SUM_{t=1..T-1} (a[t-1][t] - zero_shot[t])`,
    /// the accuracy on each task just before training it, above the untrained
    /// model's. Needs T >= 2, the zero-shot row and the superdiagonal.
    pub fn forward_transfer(&self) -> Result<f64> {
        const METRIC: &str = "forward transfer";
        self.need_tasks(METRIC, 2)?;
        let zero_shot = self
            .zero_shot
            .as_ref()
            .ok_or(MathError::MissingZeroShot { metric: METRIC })?;
        let mut sum = 0.0;
        for (t, &untrained) in zero_shot.iter().enumerate().skip(1) {
            sum += self.need(METRIC, t - 1, t)? - untrained;
        }
        Ok(sum / (self.tasks - 1) as f64)
    }

    /// AA, forgetting, BWT and FWT; a metric is `None` when T = 1 or its
    /// inputs are not there. Errors only if AA itself cannot be computed.
    pub fn summary(&self) -> Result<AccuracySummary> {
        Ok(AccuracySummary {
            average_accuracy: self.average_accuracy()?,
            forgetting: self.forgetting().ok(),
            backward_transfer: self.backward_transfer().ok(),
            forward_transfer: self.forward_transfer().ok(),
        })
    }

    fn need_tasks(&self, metric: &'static str, needed: usize) -> Result<()> {
        if self.tasks < needed {
            Err(MathError::TooFewTasks {
                metric,
                needed,
                got: self.tasks,
            })
        } else {
            Ok(())
        }
    }
}

fn check_accuracy(what: &str, value: f64) -> Result<()> {
    if value.is_finite() && (0.0..=1.0).contains(&value) {
        Ok(())
    } else {
        Err(MathError::AccuracyOutOfRange {
            what: what.to_string(),
            value,
        })
    }
}

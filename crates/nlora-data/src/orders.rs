//! Task orders: the paper's six (Table 7) and user-given lists.
//!
//! Table 7 writes shortened names (`ag`, `mnli`, `multirc`, `sst-2`); the
//! presets use the benchmark's folder names (`agnews`, `MNLI`, `MultiRC`,
//! `SST-2`). Orders 1-3 (standard CL benchmark, 4 tasks) are the orders of
//! both the T5-large and the LLaMA-7B experiments; orders 4-6 (15 tasks,
//! "large number of tasks") are T5-large only.
use std::collections::HashSet;

use crate::benchmark::{Benchmark, TaskInfo};
use crate::error::{DataError, Result};

/// A named order of the paper.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrderPreset {
    /// `order1` .. `order6`.
    pub name: &'static str,
    /// Which benchmark of the paper it belongs to.
    pub benchmark: &'static str,
    /// The models the paper ran it with (Table 7).
    pub models: &'static str,
    /// Task folder names, first task first.
    pub tasks: &'static [&'static str],
}

const STANDARD: &str = "standard CL benchmark (4 tasks)";
const LARGE: &str = "large number of tasks (15 tasks)";

/// The six orders of paper Table 7.
pub const PRESETS: [OrderPreset; 6] = [
    OrderPreset {
        name: "order1",
        benchmark: STANDARD,
        models: "T5, LLaMA",
        tasks: &["dbpedia", "amazon", "yahoo", "agnews"],
    },
    OrderPreset {
        name: "order2",
        benchmark: STANDARD,
        models: "T5, LLaMA",
        tasks: &["dbpedia", "amazon", "agnews", "yahoo"],
    },
    OrderPreset {
        name: "order3",
        benchmark: STANDARD,
        models: "T5, LLaMA",
        tasks: &["yahoo", "amazon", "agnews", "dbpedia"],
    },
    OrderPreset {
        name: "order4",
        benchmark: LARGE,
        models: "T5",
        tasks: &[
            "MNLI", "CB", "WiC", "COPA", "QQP", "BoolQA", "RTE", "IMDB", "yelp", "amazon", "SST-2",
            "dbpedia", "agnews", "MultiRC", "yahoo",
        ],
    },
    OrderPreset {
        name: "order5",
        benchmark: LARGE,
        models: "T5",
        tasks: &[
            "MultiRC", "BoolQA", "WiC", "MNLI", "CB", "COPA", "QQP", "RTE", "IMDB", "SST-2",
            "dbpedia", "agnews", "yelp", "amazon", "yahoo",
        ],
    },
    OrderPreset {
        name: "order6",
        benchmark: LARGE,
        models: "T5",
        tasks: &[
            "yelp", "amazon", "MNLI", "CB", "COPA", "QQP", "RTE", "IMDB", "SST-2", "dbpedia",
            "agnews", "yahoo", "MultiRC", "BoolQA", "WiC",
        ],
    },
];

/// The preset called `name`: `order1` .. `order6`, ignoring case and a
/// separator (`Order-4`, `order_4`, `ORDER 4` all name order 4).
pub fn preset(name: &str) -> Option<&'static OrderPreset> {
    let key: String = name
        .trim()
        .chars()
        .filter(|c| !matches!(c, '-' | '_' | ' '))
        .collect::<String>()
        .to_lowercase();
    PRESETS.iter().find(|p| p.name == key)
}

/// A resolved order: tasks of a benchmark, first task first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    /// The preset's name, or the specification as given.
    pub name: String,
    /// The tasks, in training order.
    pub tasks: Vec<TaskInfo>,
}

impl Order {
    /// The task names, in order.
    pub fn task_names(&self) -> Vec<&str> {
        self.tasks.iter().map(|t| t.name.as_str()).collect()
    }
}

impl Benchmark {
    /// Resolve `spec`: a preset name ([`preset`]) or a comma-separated list of
    /// task names (each matched by [`Benchmark::find`]). An unknown task, an
    /// empty list or a task listed twice is an error.
    pub fn resolve_order(&self, spec: &str) -> Result<Order> {
        let (name, names): (String, Vec<&str>) = match preset(spec) {
            Some(p) => (p.name.to_string(), p.tasks.to_vec()),
            None => (
                spec.trim().to_string(),
                spec.split(',').map(str::trim).collect(),
            ),
        };
        if names.iter().all(|n| n.is_empty()) {
            return Err(DataError::InvalidOrder {
                spec: spec.to_string(),
                problem: "no task given; use a preset (order1 .. order6) or a comma-separated list of tasks".into(),
            });
        }
        let context = format!(
            " in order {spec:?} (presets: {}; or a comma-separated list of tasks)",
            PRESETS.map(|p| p.name).join(", ")
        );
        let mut tasks = Vec::with_capacity(names.len());
        let mut seen = HashSet::new();
        for n in names {
            if n.is_empty() {
                return Err(DataError::InvalidOrder {
                    spec: spec.to_string(),
                    problem: "empty task name between commas".into(),
                });
            }
            let info = self.find_in(n, &context)?;
            if !seen.insert(info.name.clone()) {
                return Err(DataError::InvalidOrder {
                    spec: spec.to_string(),
                    problem: format!("task {} appears more than once", info.name),
                });
            }
            tasks.push(info.clone());
        }
        Ok(Order { name, tasks })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preset_names_are_matched_loosely_but_not_too_loosely() {
        assert_eq!(preset("order4").unwrap().name, "order4");
        assert_eq!(preset("Order-4").unwrap().name, "order4");
        assert_eq!(preset(" ORDER_2 ").unwrap().name, "order2");
        assert!(preset("order7").is_none());
        assert!(preset("order").is_none());
        assert!(preset("dbpedia").is_none());
    }

    #[test]
    fn long_orders_are_permutations_of_the_same_fifteen_tasks() {
        let mut sets: Vec<Vec<&str>> = PRESETS[3..]
            .iter()
            .map(|p| {
                let mut t = p.tasks.to_vec();
                t.sort();
                t
            })
            .collect();
        sets.dedup();
        assert_eq!(sets.len(), 1);
        assert_eq!(sets[0].len(), 15);
    }
}

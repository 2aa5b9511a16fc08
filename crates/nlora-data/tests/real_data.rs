//! The distributed benchmark loads, and the library's counts equal counts
//! taken independently with serde_json::Value.
mod common;

use std::collections::BTreeMap;
use std::path::Path;

use nlora_data::{
    summarize, LoadOptions, NoGoldLabel, PromptStyle, PromptTemplate, Split, Task, TaskType,
};

const ALL_TASKS: [&str; 15] = [
    "dbpedia", "amazon", "yahoo", "agnews", "MNLI", "CB", "WiC", "COPA", "QQP", "BoolQA", "RTE",
    "IMDB", "yelp", "SST-2", "MultiRC",
];

/// Label -> count of a split file, read as untyped JSON.
fn independent_counts(path: &Path) -> BTreeMap<String, usize> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let mut counts = BTreeMap::new();
    for record in v.as_array().unwrap() {
        *counts
            .entry(record["label"].as_str().unwrap().to_string())
            .or_insert(0) += 1;
    }
    counts
}

#[test]
fn all_fifteen_tasks_are_found_with_their_types() {
    let bench = common::benchmark();
    let mut names = bench.task_names();
    names.sort();
    let mut expected: Vec<String> = ALL_TASKS.iter().map(|s| s.to_string()).collect();
    expected.sort();
    assert_eq!(names, expected);
    let type_of = |n: &str| bench.find(n).unwrap().task_type;
    assert_eq!(type_of("MNLI"), TaskType::Nli);
    assert_eq!(type_of("SST-2"), TaskType::Sc);
    assert_eq!(type_of("yahoo"), TaskType::Tc);
    assert_eq!(type_of("COPA"), TaskType::Copa);
    assert_eq!(type_of("BoolQA"), TaskType::BoolQa);
}

#[test]
fn loaded_counts_equal_independent_counts_for_every_task_and_split() {
    let bench = common::benchmark();
    for info in bench.tasks() {
        let task = Task::load(info, &LoadOptions::default())
            .unwrap_or_else(|e| panic!("{} does not load: {e}", info.name));
        let template =
            PromptTemplate::for_task(&task, bench.instructions(), PromptStyle::default()).unwrap();
        let summary = summarize(&task, &template, None).unwrap();
        assert_eq!(summary.splits.len(), 3, "{}", info.name);
        for s in &summary.splits {
            let mut independent = independent_counts(&info.dir.join(s.split.file_name()));
            // The default policy leaves GLUE's no-gold records out.
            let no_gold = independent.remove("-").unwrap_or(0);
            assert_eq!(s.no_gold, no_gold, "{} {}", info.name, s.split);
            let ours: BTreeMap<String, usize> = s
                .label_counts
                .iter()
                .filter(|(_, n)| *n > 0)
                .cloned()
                .collect();
            assert_eq!(ours, independent, "{} {}", info.name, s.split);
            assert_eq!(s.examples, independent.values().sum::<usize>());
            assert!(s.max_prompt_chars as f64 >= s.mean_prompt_chars);
        }
        assert!(
            task.dev_is_test,
            "{}: dev.json should equal test.json",
            info.name
        );
    }
}

#[test]
fn known_sizes_of_the_distributed_files() {
    // Spot values from PROVENANCE.md and the files themselves.
    let bench = common::benchmark();
    let sizes = |name: &str| {
        let t = bench.load_task(name, &LoadOptions::default()).unwrap();
        (t.train.len(), t.test.len())
    };
    assert_eq!(sizes("yahoo"), (1600, 800));
    assert_eq!(sizes("dbpedia"), (2699, 7600));
    assert_eq!(sizes("CB"), (250, 56));
    assert_eq!(sizes("COPA"), (400, 100));
    assert_eq!(sizes("MNLI"), (3000, 7600 - 131));
}

#[test]
fn mnli_no_gold_records_are_kept_on_request() {
    let bench = common::benchmark();
    let keep = LoadOptions {
        no_gold_label: NoGoldLabel::Keep,
    };
    let t = bench.load_task("mnli", &keep).unwrap();
    assert_eq!(t.name, "MNLI");
    assert_eq!(t.test.len(), 7600);
    assert_eq!(t.test.iter().filter(|e| e.label == "-").count(), 131);
    assert_eq!(t.no_gold, [0, 131, 131]);
    assert_eq!(t.split(Split::Dev).unwrap().len(), 7600);
}

#[test]
fn example_index_is_the_record_position_in_the_file() {
    let bench = common::benchmark();
    let t = bench.load_task("MNLI", &LoadOptions::default()).unwrap();
    let raw: serde_json::Value =
        serde_json::from_slice(&std::fs::read(t.dir.join("test.json")).unwrap()).unwrap();
    let raw = raw.as_array().unwrap();
    for e in t.test.iter().step_by(97) {
        assert_eq!(raw[e.index]["sentence"].as_str().unwrap(), e.sentence);
        assert_eq!(raw[e.index]["label"].as_str().unwrap(), e.label);
    }
}

//! Fuzzing the benchmark reader (issue 9): a small valid benchmark folder (two tasks)
//! has one of its files replaced by arbitrary bytes or text, or mutated as JSON (a node
//! replaced by another type, removed, duplicated or renamed; deep nesting; empty and
//! whitespace strings; "-" labels), then cut or given a stray byte; or a file is deleted
//! or turned into a folder. Opening the benchmark, loading every task both ways of
//! the no-gold policy, prompting, summarising, sampling and resolving orders must
//! succeed or give an error naming the file or task: never a panic.
//!
//! `cargo test -p nlora-data --test fuzz_reader -- --nocapture` prints the execution
//! count; `PROPTEST_CASES=N` changes it.
use std::cell::RefCell;
use std::path::Path;
use std::time::Instant;

use nlora_data::{
    sample_task, summarize, Benchmark, LoadOptions, NoGoldLabel, PromptStyle, PromptTemplate,
    SamplingConfig, Task,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{json, Value};

#[path = "../../nlora-model/tests/fuzz_support/mod.rs"]
mod fuzz_support;
use fuzz_support::{cases, peak_bytes, Stats, Tracking};

#[global_allocator]
static ALLOC: Tracking = Tracking;

/// About a minute in the dev profile on 2 busy cores.
const DEFAULT_CASES: u32 = 15_000;

/// The files of the valid benchmark, relative to its root.
const FILES: [&str; 9] = [
    "instruction_config.json",
    "NLI/CB/labels.json",
    "NLI/CB/train.json",
    "NLI/CB/dev.json",
    "NLI/CB/test.json",
    "COPA/COPA/labels.json",
    "COPA/COPA/train.json",
    "COPA/COPA/dev.json",
    "COPA/COPA/test.json",
];

fn valid(file: &str) -> Value {
    let nli = |s: &str, l: &str| json!({"sentence": format!("premise: {s}\nhypothesis: it is."), "label": l});
    let copa = |s: &str, l: &str| json!({"sentence": format!("{s} Option1: rain. Option2: sun."), "label": l});
    match file {
        "instruction_config.json" => json!({
            "NLI": [
                {"instruction_type": "few-shot", "instruction": "Examples first.\n"},
                {"instruction_type": "zero-shot", "instruction": "What is the relation?\n"}
            ],
            "TC": [{"instruction_type": "zero-shot", "instruction": "Which topic?\n"}]
        }),
        "NLI/CB/labels.json" => json!(["contradiction", "entailment", "neutral"]),
        "NLI/CB/train.json" => json!([
            nli("a", "entailment"),
            nli("b", "neutral"),
            nli("c", "contradiction"),
            nli("d", "entailment"),
            nli("e", "-"),
            nli("f", "neutral"),
        ]),
        "NLI/CB/dev.json" | "NLI/CB/test.json" => {
            json!([nli("g", "neutral"), nli("h", "entailment"), nli("i", "-"),])
        }
        "COPA/COPA/labels.json" => json!(["A", "B"]),
        "COPA/COPA/train.json" => json!([
            copa("Wet ground?", "A"),
            copa("Sunburn?", "B"),
            copa("Umbrella?", "A"),
        ]),
        _ => json!([copa("Clouds?", "A"), copa("Shade?", "B")]),
    }
}

fn write_valid(root: &Path) {
    for f in FILES {
        let path = root.join(f);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, serde_json::to_vec_pretty(&valid(f)).unwrap()).unwrap();
    }
}

/// Every reader on the benchmark at `root`: how many tasks loaded, and every error.
fn exercise(root: &Path) -> (usize, Vec<String>) {
    let mut errors = Vec::new();
    let bench = match Benchmark::open(root) {
        Ok(b) => b,
        Err(e) => return (0, vec![e.to_string()]),
    };
    let mut loaded = 0;
    for info in bench.tasks() {
        for policy in [NoGoldLabel::Drop, NoGoldLabel::Keep] {
            let task = match Task::load(
                info,
                &LoadOptions {
                    no_gold_label: policy,
                },
            ) {
                Ok(t) => t,
                Err(e) => {
                    errors.push(e.to_string());
                    continue;
                }
            };
            loaded += 1;
            for style in [PromptStyle::REFERENCE, PromptStyle::BARE] {
                match PromptTemplate::for_task(&task, bench.instructions(), style) {
                    Ok(template) => {
                        for e in task.train.iter().chain(&task.test) {
                            template.apply(e);
                        }
                        if let Err(e) = summarize(&task, &template, None) {
                            errors.push(e.to_string());
                        }
                    }
                    Err(e) => errors.push(e.to_string()),
                }
            }
            for config in [
                SamplingConfig::default(),
                SamplingConfig {
                    seed: 3,
                    max_train: Some(2),
                    validation: 1,
                    max_test: Some(1),
                },
            ] {
                if let Err(e) = sample_task(&task, &config) {
                    errors.push(e.to_string());
                }
            }
        }
    }
    for order in ["CB, COPA", "copa"] {
        if let Err(e) = bench.resolve_order(order) {
            errors.push(e.to_string());
        }
    }
    (loaded, errors)
}

/// A position in a collection of any size: `floor(n * p / 2^64)`.
#[derive(Debug, Clone, Copy)]
struct Pick(u64);

impl Pick {
    fn of(self, n: usize) -> usize {
        ((n as u128 * self.0 as u128) >> 64) as usize
    }
}

fn pick() -> impl Strategy<Value = Pick> {
    any::<u64>().prop_map(Pick)
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|x| json!(x)),
        any::<f64>().prop_map(|x| json!(x)),
        Just(json!(u64::MAX)),
        prop::sample::select(vec![
            "",
            " ",
            "\n\t",
            "-",
            "neutral",
            "entailment",
            "A",
            "B",
            "zero-shot",
            "few-shot",
            "\u{0}",
            "\u{feff}neutral",
            "ünïcödé ✓",
        ])
        .prop_map(|s| json!(s)),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec(
                (
                    prop_oneof![
                        prop::sample::select(vec![
                            "label",
                            "sentence",
                            "instruction",
                            "instruction_type",
                            "NLI",
                            "COPA",
                        ])
                        .prop_map(str::to_string),
                        "[a-z]{0,6}"
                    ],
                    inner
                ),
                0..4
            )
            .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

#[derive(Debug, Clone)]
enum JsonOp {
    Replace(Pick, Value),
    Remove(Pick),
    Duplicate(Pick),
    /// An object key renamed (e.g. "label" to "labels").
    Rename(Pick, String),
    /// Arrays nested this deep put in place of a node.
    Nest(Pick, usize),
}

fn json_op() -> impl Strategy<Value = JsonOp> {
    prop_oneof![
        5 => (pick(), json_value()).prop_map(|(p, v)| JsonOp::Replace(p, v)),
        2 => pick().prop_map(JsonOp::Remove),
        1 => pick().prop_map(JsonOp::Duplicate),
        1 => (pick(), prop_oneof![Just("labels".to_string()), Just("Sentence".to_string()), "[a-z]{0,6}"])
            .prop_map(|(p, k)| JsonOp::Rename(p, k)),
        1 => (pick(), 1usize..400).prop_map(|(p, d)| JsonOp::Nest(p, d)),
    ]
}

/// Paths (lists of child positions) of every node of `v`, in pre-order.
fn node_paths(v: &Value, here: &mut Vec<usize>, out: &mut Vec<Vec<usize>>) {
    out.push(here.clone());
    let children: Vec<&Value> = match v {
        Value::Array(a) => a.iter().collect(),
        Value::Object(o) => o.values().collect(),
        _ => Vec::new(),
    };
    for (i, c) in children.into_iter().enumerate() {
        here.push(i);
        node_paths(c, here, out);
        here.pop();
    }
}

fn node_mut<'a>(v: &'a mut Value, path: &[usize]) -> &'a mut Value {
    match path.split_first() {
        None => v,
        Some((&i, rest)) => match v {
            Value::Array(a) => node_mut(&mut a[i], rest),
            Value::Object(o) => node_mut(o.values_mut().nth(i).unwrap(), rest),
            _ => unreachable!("paths come from node_paths"),
        },
    }
}

fn apply_json(doc: &mut Value, op: &JsonOp) {
    let mut paths = Vec::new();
    node_paths(doc, &mut Vec::new(), &mut paths);
    let target = |p: &Pick| paths[p.of(paths.len())].clone();
    match op {
        JsonOp::Replace(p, v) => *node_mut(doc, &target(p)) = v.clone(),
        JsonOp::Nest(p, depth) => {
            let mut v = json!(1);
            for _ in 0..*depth {
                v = json!([v]);
            }
            *node_mut(doc, &target(p)) = v;
        }
        JsonOp::Remove(p) | JsonOp::Duplicate(p) | JsonOp::Rename(p, _) => {
            let path = target(p);
            let Some((&last, parent)) = path.split_last() else {
                return; // the root has no parent
            };
            match (node_mut(doc, parent), op) {
                (Value::Array(a), JsonOp::Remove(_)) => {
                    a.remove(last);
                }
                (Value::Array(a), JsonOp::Duplicate(_)) => {
                    let v = a[last].clone();
                    a.insert(last, v);
                }
                (Value::Object(o), JsonOp::Remove(_)) => {
                    let k = o.keys().nth(last).unwrap().clone();
                    o.remove(&k);
                }
                (Value::Object(o), JsonOp::Rename(_, new)) => {
                    let k = o.keys().nth(last).unwrap().clone();
                    let v = o.remove(&k).unwrap();
                    o.insert(new.clone(), v);
                }
                _ => {}
            }
        }
    }
}

/// What the text of the mutated file undergoes after serialisation.
#[derive(Debug, Clone)]
enum Raw {
    Keep,
    Truncate(Pick),
    /// One byte set (may break UTF-8 or the JSON).
    Byte(Pick, u8),
    /// A UTF-8 byte-order mark in front.
    Bom,
}

#[derive(Debug, Clone)]
enum Content {
    Bytes(Vec<u8>),
    Text(String),
    Json(Vec<JsonOp>, Raw),
    Missing,
    /// A folder where the file should be.
    Folder,
}

fn content() -> impl Strategy<Value = Content> {
    let raw = prop_oneof![
        4 => Just(Raw::Keep),
        1 => pick().prop_map(Raw::Truncate),
        1 => (pick(), any::<u8>()).prop_map(|(p, b)| Raw::Byte(p, b)),
        1 => Just(Raw::Bom),
    ];
    prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..128).prop_map(Content::Bytes),
        1 => any::<String>().prop_map(Content::Text),
        8 => (prop::collection::vec(json_op(), 1..4), raw).prop_map(|(o, r)| Content::Json(o, r)),
        1 => Just(Content::Missing),
        1 => Just(Content::Folder),
    ]
}

fn render(file: &str, content: &Content) -> Option<Vec<u8>> {
    Some(match content {
        Content::Bytes(b) => b.clone(),
        Content::Text(t) => t.clone().into_bytes(),
        Content::Json(ops, raw) => {
            let mut doc = valid(file);
            for op in ops {
                apply_json(&mut doc, op);
            }
            let mut b = serde_json::to_vec(&doc).unwrap();
            match raw {
                Raw::Keep => {}
                Raw::Truncate(p) => b.truncate(p.of(b.len())),
                Raw::Byte(p, x) => {
                    if !b.is_empty() {
                        let at = p.of(b.len());
                        b[at] = *x;
                    }
                }
                Raw::Bom => b.splice(0..0, [0xEF, 0xBB, 0xBF]).for_each(drop),
            }
            b
        }
        Content::Missing | Content::Folder => return None,
    })
}

/// One or two files of the benchmark changed.
type Input = Vec<(Pick, Content)>;

fn input() -> impl Strategy<Value = Input> {
    prop::collection::vec((pick(), content()), 1..3)
}

/// Puts `file` under `root` in the state `content` describes (`None`: valid).
fn set_file(root: &Path, file: &str, content: Option<&Content>) {
    let path = root.join(file);
    if path.is_dir() {
        std::fs::remove_dir_all(&path).unwrap();
    } else if path.exists() {
        std::fs::remove_file(&path).unwrap();
    }
    match content {
        None => std::fs::write(&path, serde_json::to_vec_pretty(&valid(file)).unwrap()).unwrap(),
        Some(Content::Folder) => std::fs::create_dir(&path).unwrap(),
        Some(c) => {
            if let Some(bytes) = render(file, c) {
                std::fs::write(&path, bytes).unwrap();
            }
        }
    }
}

/// Changes the valid benchmark at `root` as `input` describes; returns the files changed,
/// for [`restore`].
fn prepare(root: &Path, input: &Input) -> Vec<&'static str> {
    input
        .iter()
        .map(|(p, content)| {
            let file = FILES[p.of(FILES.len())];
            set_file(root, file, Some(content));
            file
        })
        .collect()
}

fn restore(root: &Path, changed: &[&str]) {
    for file in changed {
        set_file(root, file, None);
    }
}

/// Generous: the benchmark's size times a constant, plus a fixed allowance.
fn memory_limit(root: &Path) -> usize {
    let bytes: u64 = FILES
        .iter()
        .filter_map(|f| std::fs::metadata(root.join(f)).ok())
        .map(|m| m.len())
        .sum();
    (4 << 20) + 256 * bytes as usize
}

#[test]
fn the_base_benchmark_loads_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("bench");
    write_valid(&root);
    let (loaded, errors) = exercise(&root);
    assert_eq!((loaded, errors), (4, vec![]));
    let bench = Benchmark::open(&root).unwrap();
    let cb = bench.load_task("CB", &LoadOptions::default()).unwrap();
    // The "-" records are dropped and counted; dev is a byte copy of test.
    assert_eq!((cb.train.len(), cb.test.len()), (5, 2));
    assert_eq!(cb.no_gold, [1, 1, 1]);
    assert!(cb.dev_is_test);
}

#[test]
fn fuzz_benchmark_reader() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("bench");
    write_valid(&root);
    exercise(&root); // warm-up, not charged to the first input
    let stats = RefCell::new(Stats::new("benchmark reader"));
    let mut runner = TestRunner::new(Config {
        cases: cases(DEFAULT_CASES),
        failure_persistence: None,
        ..Config::default()
    });
    let root_text = root.display().to_string();
    let dirty = RefCell::new(Vec::new());
    let result = runner.run(&input(), |input| {
        // Files a failed (panicked) case left changed are put back first.
        restore(&root, &dirty.take());
        *dirty.borrow_mut() = prepare(&root, &input);
        let t0 = Instant::now();
        let ((loaded, errors), peak) = peak_bytes(|| exercise(&root));
        stats.borrow_mut().record(loaded > 0, peak, t0.elapsed());
        let limit = memory_limit(&root);
        restore(&root, &dirty.take());
        for e in &errors {
            // A file's error names it under the root; sampling and order errors the task.
            prop_assert!(
                e.contains(&root_text) || e.contains("CB") || e.contains("COPA"),
                "error names neither the file nor the task: {e}"
            );
        }
        prop_assert!(peak <= limit, "{peak} bytes");
        Ok(())
    });
    stats.borrow().print();
    if let Err(e) = result {
        panic!("{e}");
    }
}

//! Fuzzing the run-config parser (issue 9): `RunConfig::from_toml_str` and `validate`
//! on arbitrary text and on mutations of a valid config that sets every key (lines
//! dropped, doubled, moved or cut; keys misspelt or moved to another section; values
//! replaced by other types, extreme numbers, NaN, empty and deeply nested arrays).
//! Never a panic; a parse error gives its line, a validation error names the key; a
//! config that validates survives the TOML round trip the run directory relies on
//! (config.toml is re-read on --resume) and answers every per-task lookup.
//!
//! `cargo test -p nlora-train --test fuzz_config -- --nocapture` prints the execution
//! count; `PROPTEST_CASES=N` changes it.
use std::cell::RefCell;
use std::time::Instant;

use nlora_train::RunConfig;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

#[path = "../../nlora-model/tests/fuzz_support/mod.rs"]
mod fuzz_support;
use fuzz_support::{cases, peak_bytes, Stats, Tracking};

#[global_allocator]
static ALLOC: Tracking = Tracking;

/// About a minute in the dev profile on 2 busy cores.
const DEFAULT_CASES: u32 = 600_000;

/// Sets every key of every section.
const VALID: &str = r#"seed = 11
[model]
r = 4
alpha = 8.0
dropout = 0.1
target_modules = ["q_proj", "v_proj"]
[data]
tasks = ["dbpedia", "amazon", "CB"]
max_train_per_task = 6
max_test_per_task = 3
validation_per_task = 2
max_source_len = 96
max_target_len = 50
prefix = true
truncation = "sentence"
eval_on_validation = false
[method]
name = "nlora"
lambda = [0.001, 0.002, 0.003]
l1_form = "dw"
l1_scaled = false
ortho_lambda = 0.5
ortho_form = "code"
l2_lambda = 0.0
history = "stacked"
[train]
lr = 0.005
epochs = [1, 1, 2]
batch_size = 3
grad_accum = 1
schedule = "cosine"
warmup_steps = 0
weight_decay = 0.0
clip_grad_norm = 1.0
checkpoint_every = 0
on_nonfinite = "stop"
[eval]
batch_size = 4
max_new_tokens = 5
rank_classification = false
"#;

/// Parses, validates and (when valid) round-trips `text`. `Ok(true)`: a valid config.
fn check(text: &str) -> Result<bool, String> {
    let cfg = match RunConfig::from_toml_str(text) {
        Ok(c) => c,
        Err(e) => {
            let msg = e.to_string();
            // toml reports where it stopped; serde's "missing field" names the key.
            if !(msg.contains("line ") || msg.contains('`')) {
                return Err(format!("a parse error without a position or key: {msg}"));
            }
            return Ok(false);
        }
    };
    let n_tasks = cfg.data.tasks.as_ref().map_or(4, Vec::len);
    if let Err(e) = cfg.validate(n_tasks) {
        let msg = e.to_string();
        if !msg.contains('`') {
            return Err(format!("a validation error naming no key: {msg}"));
        }
        return Ok(false);
    }
    for task in 0..n_tasks {
        let _ = (
            cfg.train.lr.get(task),
            cfg.train.epochs.get(task),
            cfg.method.lambda_for(task),
        );
    }
    let again = RunConfig::from_toml_str(&cfg.to_toml())
        .map_err(|e| format!("the saved config does not parse back: {e}"))?;
    if again != cfg {
        return Err(format!(
            "the saved config reads back different:\n{cfg:?}\n{again:?}"
        ));
    }
    Ok(true)
}

fn toml_value() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        prop::sample::select(vec![
            "0",
            "1",
            "-1",
            "2",
            "16",
            "9223372036854775807",
            "-9223372036854775808",
            "9223372036854775808",
            "99999999999999999999",
            "0x7f",
            "0o17",
            "0b101",
            "1_000",
            "+5",
            "0.0",
            "-0.0",
            "-1.5",
            "0.5",
            "1.0",
            "1e308",
            "1e309",
            "5e-324",
            "nan",
            "+inf",
            "-inf",
            "true",
            "false",
            "1979-05-27T07:32:00Z",
            "07:32:00",
            "\"\"",
            "\"nlora\"",
            "\"magic\"",
            "\"q_proj\"",
            "\"qq_proj\"",
            "\"order1\"",
            "\"order9\"",
            "\"dw\"",
            "\"reference-code\"",
            "\"cosine\"",
            "\"skip\"",
            "\"merged\"",
            "\"tail\"",
            "\"olora+nlora\"",
            "\"\\u0000\"",
            "'''multi\nline'''",
            "\"unterminated",
            "{}",
            "{ a = 1 }",
            "[]",
        ])
        .prop_map(str::to_string),
        any::<i64>().prop_map(|x| x.to_string()),
        any::<f64>().prop_map(|x| format!("{x:?}")),
        "[a-z_]{0,8}".prop_map(|s| format!("\"{s}\"")),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop::collection::vec(inner, 0..6).prop_map(|items| format!("[{}]", items.join(", ")))
    })
}

/// Keys and section names the config knows, so misspellings and moves stay close.
const NAMES: &[&str] = &[
    "seed",
    "model",
    "data",
    "method",
    "train",
    "eval",
    "r",
    "alpha",
    "dropout",
    "target_modules",
    "path",
    "dir",
    "order",
    "tasks",
    "max_source_len",
    "name",
    "lambda",
    "l1_form",
    "lr",
    "epochs",
    "batch_size",
    "grad_accum",
    "schedule",
    "weight_decay",
    "clip_grad_norm",
    "max_new_tokens",
    "bogus",
];

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

#[derive(Debug, Clone)]
enum Op {
    Remove(Pick),
    Duplicate(Pick),
    Move(Pick, Pick),
    /// The value of a `key = value` line replaced.
    SetValue(Pick, String),
    /// The key of a line (or a section name) replaced.
    Rename(Pick, String),
    Insert(Pick, String),
    /// Arrays nested this deep as a value.
    Nest(Pick, usize),
    /// One character replaced.
    Char(Pick, char),
    Truncate(Pick),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => pick().prop_map(Op::Remove),
        1 => pick().prop_map(Op::Duplicate),
        1 => (pick(), pick()).prop_map(|(a, b)| Op::Move(a, b)),
        5 => (pick(), toml_value()).prop_map(|(p, v)| Op::SetValue(p, v)),
        2 => (pick(), prop_oneof![prop::sample::select(NAMES).prop_map(str::to_string), "[a-z_.]{0,10}"])
            .prop_map(|(p, k)| Op::Rename(p, k)),
        1 => (pick(), prop_oneof![
            "\\[[a-z.]{0,8}\\]".boxed(),
            "\\[\\[[a-z]{0,8}\\]\\]".boxed(),
            (prop::sample::select(NAMES), toml_value()).prop_map(|(k, v)| format!("{k} = {v}")).boxed(),
            ".{0,20}".boxed(),
        ]).prop_map(|(p, l)| Op::Insert(p, l)),
        1 => (pick(), 1usize..300).prop_map(|(p, d)| Op::Nest(p, d)),
        1 => (pick(), any::<char>()).prop_map(|(p, c)| Op::Char(p, c)),
        1 => pick().prop_map(Op::Truncate),
    ]
}

fn apply(lines: &mut Vec<String>, op: &Op) {
    let n = lines.len();
    let set_value = |line: &mut String, v: &str| {
        if let Some((k, _)) = line.split_once('=') {
            *line = format!("{}= {v}", k);
        }
    };
    match op {
        Op::Remove(p) if n > 0 => {
            lines.remove(p.of(n));
        }
        Op::Duplicate(p) if n > 0 => {
            let l = lines[p.of(n)].clone();
            lines.insert(p.of(n), l);
        }
        Op::Move(a, b) if n > 0 => {
            let l = lines.remove(a.of(n));
            lines.insert(b.of(n), l);
        }
        Op::SetValue(p, v) if n > 0 => set_value(&mut lines[p.of(n)], v),
        Op::Rename(p, k) if n > 0 => {
            let line = &mut lines[p.of(n)];
            *line = match line.split_once('=') {
                Some((_, v)) => format!("{k} ={v}"),
                None if line.starts_with('[') => format!("[{k}]"),
                None => k.clone(),
            };
        }
        Op::Insert(p, l) => lines.insert(p.of(n + 1), l.clone()),
        Op::Nest(p, depth) if n > 0 => {
            let v = format!("{}1{}", "[".repeat(*depth), "]".repeat(*depth));
            set_value(&mut lines[p.of(n)], &v);
        }
        Op::Char(p, c) if n > 0 => {
            let line = &mut lines[p.of(n)];
            let mut chars: Vec<char> = line.chars().collect();
            if !chars.is_empty() {
                let at = p.of(chars.len());
                chars[at] = *c;
                *line = chars.into_iter().collect();
            }
        }
        Op::Truncate(p) if n > 0 => {
            let at = p.of(n);
            lines.truncate(at + 1);
            let line = &mut lines[at];
            let keep = line.chars().count() / 2;
            *line = line.chars().take(keep).collect();
        }
        _ => {}
    }
}

#[derive(Debug, Clone)]
enum Input {
    Text(String),
    Bytes(Vec<u8>),
    Mutated(Vec<Op>),
}

fn input() -> impl Strategy<Value = Input> {
    prop_oneof![
        1 => any::<String>().prop_map(Input::Text),
        1 => prop::collection::vec(any::<u8>(), 0..256).prop_map(Input::Bytes),
        6 => prop::collection::vec(op(), 1..5).prop_map(Input::Mutated),
    ]
}

fn render(input: &Input) -> String {
    match input {
        Input::Text(t) => t.clone(),
        Input::Bytes(b) => String::from_utf8_lossy(b).into_owned(),
        Input::Mutated(ops) => {
            let mut lines: Vec<String> = VALID.lines().map(str::to_string).collect();
            for op in ops {
                apply(&mut lines, op);
            }
            lines.join("\n")
        }
    }
}

/// Generous: the text's size times a constant, plus what a valid parse needs.
fn memory_limit(text_len: usize) -> usize {
    (4 << 20) + 256 * text_len
}

#[test]
fn the_base_config_is_valid_and_sets_every_key() {
    assert_eq!(check(VALID), Ok(true));
    let cfg = RunConfig::from_toml_str(VALID).unwrap();
    // Every key differs from its default, so a key the parser dropped would show.
    let defaults = RunConfig::from_toml_str("[method]\nname = \"nlora\"").unwrap();
    assert_ne!(cfg.model, defaults.model);
    assert_ne!(cfg.train.lr, defaults.train.lr);
    assert_ne!(cfg.eval, defaults.eval);
    assert_eq!(cfg.method.lambda_for(2), 0.003);
}

#[test]
fn fuzz_config_parser() {
    check(VALID).unwrap(); // warm-up, not charged to the first input
    let stats = RefCell::new(Stats::new("config parser"));
    let mut runner = TestRunner::new(Config {
        cases: cases(DEFAULT_CASES),
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&input(), |input| {
        let text = render(&input);
        let t0 = Instant::now();
        let (outcome, peak) = peak_bytes(|| check(&text));
        stats
            .borrow_mut()
            .record(outcome == Ok(true), peak, t0.elapsed());
        prop_assert!(
            outcome.is_ok(),
            "{}\n--- input:\n{text}",
            outcome.unwrap_err()
        );
        prop_assert!(peak <= memory_limit(text.len()), "{peak} bytes");
        Ok(())
    });
    stats.borrow().print();
    if let Err(e) = result {
        panic!("{e}");
    }
}

//! The bad-input suite (issue 9): the real `nlora` binary on broken configs, data,
//! models, adapters and run directories. Every case must exit with status 1, print a
//! message naming the problem (the file, key or value at fault), and never panic.
//! The broken inputs are built here from a tiny random LLaMA (a Hugging Face folder
//! and a GGUF file) and scratch copies of two benchmark tasks; each family first runs
//! its intact input successfully, so a case fails for its defect and nothing else.
//! More cases live in run_cli.rs (8 configs) and data_cli.rs (9 data defects);
//! docs/RELIABILITY.md lists all of them.
use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use nlora_train::testing::{data_dir, write_tiny_llama};

fn nlora(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nlora"))
        .args(args)
        .env("NLORA_DATA", data_dir())
        // candle appends backtraces to its errors when this is set; the messages are
        // checked as a user sees them.
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("nlora runs")
}

fn s(p: impl AsRef<Path>) -> String {
    p.as_ref().display().to_string()
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

/// One bad input: the command line and the texts its error must contain.
struct Case {
    name: &'static str,
    args: Vec<String>,
    expect: Vec<String>,
}

/// Runs `case`; what is wrong with the outcome, if anything.
fn check(case: &Case) -> Option<String> {
    let out = nlora(&case.args);
    let err = String::from_utf8_lossy(&out.stderr);
    let mut problems = Vec::new();
    if out.status.code() != Some(1) {
        problems.push(format!("exit status {:?}, expected 1", out.status.code()));
    }
    for needle in &case.expect {
        if !err.contains(needle.as_str()) {
            problems.push(format!("stderr lacks {needle:?}"));
        }
    }
    if err.contains("panicked") {
        problems.push("it panicked".into());
    }
    (!problems.is_empty()).then(|| {
        format!(
            "{}: {}\n  nlora {}\n  stderr: {}",
            case.name,
            problems.join("; "),
            case.args.join(" "),
            err.trim()
        )
    })
}

fn assert_succeeds(args: &[String]) {
    let out = nlora(args);
    assert!(
        out.status.success(),
        "the intact input must work: nlora {}\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---- inputs ----------------------------------------------------------------------------

const HIDDEN: usize = 32;
const VOCAB: usize = 16;

/// A 1-layer LLaMA (hidden 32, 2 heads, 1 key/value head, 16 tokens of byte-level BPE)
/// as a GGUF file: small enough to build per test, complete enough to generate.
fn write_tiny_gguf(path: &Path, arch: &str, alignment: u32) {
    let dev = Device::Cpu;
    let weight = |rows: usize, cols: usize, seed: usize| {
        let v: Vec<f32> = (0..rows * cols)
            .map(|i| (((i * 7 + seed) % 13) as f32 - 6.0) * 0.02)
            .collect();
        Tensor::from_vec(v, (rows, cols), &dev).unwrap()
    };
    let ones = Tensor::ones(HIDDEN, DType::F32, &dev).unwrap();
    let q = |t: &Tensor, d: GgmlDType| QTensor::quantize(t, d).unwrap();
    let tensors = vec![
        (
            "token_embd.weight",
            q(&weight(VOCAB, HIDDEN, 0), GgmlDType::Q8_0),
        ),
        ("output_norm.weight", q(&ones, GgmlDType::F32)),
        ("blk.0.attn_norm.weight", q(&ones, GgmlDType::F32)),
        ("blk.0.ffn_norm.weight", q(&ones, GgmlDType::F32)),
        ("blk.0.attn_q.weight", q(&weight(32, 32, 1), GgmlDType::F32)),
        ("blk.0.attn_k.weight", q(&weight(16, 32, 2), GgmlDType::F32)),
        ("blk.0.attn_v.weight", q(&weight(16, 32, 3), GgmlDType::F32)),
        (
            "blk.0.attn_output.weight",
            q(&weight(32, 32, 4), GgmlDType::F32),
        ),
        (
            "blk.0.ffn_gate.weight",
            q(&weight(32, 32, 5), GgmlDType::F32),
        ),
        ("blk.0.ffn_up.weight", q(&weight(32, 32, 6), GgmlDType::F32)),
        (
            "blk.0.ffn_down.weight",
            q(&weight(32, 32, 7), GgmlDType::F32),
        ),
    ];
    let strs = |v: &[&str]| Value::Array(v.iter().map(|s| Value::String(s.to_string())).collect());
    let tokens = [
        "<|endoftext|>",
        "a",
        "b",
        "c",
        "d",
        "e",
        "Ġ",
        "ab",
        "abc",
        "Ġa",
        "de",
        "cd",
        "ba",
        "ca",
        "da",
        "ea",
    ];
    let token_types = Value::Array(
        (0..VOCAB)
            .map(|i| Value::I32(if i == 0 { 3 } else { 1 }))
            .collect(),
    );
    let metadata = vec![
        ("general.architecture", Value::String(arch.into())),
        ("general.alignment", Value::U32(alignment)),
        ("llama.embedding_length", Value::U32(HIDDEN as u32)),
        ("llama.block_count", Value::U32(1)),
        ("llama.feed_forward_length", Value::U32(32)),
        ("llama.attention.head_count", Value::U32(2)),
        ("llama.attention.head_count_kv", Value::U32(1)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.tokens", strs(&tokens)),
        ("tokenizer.ggml.token_type", token_types),
        (
            "tokenizer.ggml.merges",
            strs(&["a b", "ab c", "Ġ a", "d e", "c d"]),
        ),
        ("tokenizer.ggml.eos_token_id", Value::U32(0)),
    ];
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (*k, v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &md, &ts).unwrap();
}

/// Where the tensor-type id of the tensor `name` sits in a GGUF v2 file with 1-D or
/// 2-D tensors: after its name, its dimension count and its u64 dimensions.
fn dtype_offset(bytes: &[u8], name: &str, n_dims: usize) -> usize {
    let at = bytes
        .windows(name.len())
        .position(|w| w == name.as_bytes())
        .unwrap();
    at + name.len() + 4 + 8 * n_dims
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// A copy of the tiny HF model whose safetensors went through `edit`.
fn hf_variant(base: &Path, to: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
    copy_dir(base, to);
    let file = to.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, &file).unwrap();
}

/// A PEFT adapter for q_proj/v_proj of layers 0 and 1 with these factor shapes.
fn write_adapter(
    dir: &Path,
    r_config: usize,
    r: usize,
    hidden: usize,
    kv: usize,
    layers: &[usize],
) {
    std::fs::create_dir_all(dir).unwrap();
    let mut t = HashMap::new();
    for &l in layers {
        for (site, out) in [("q_proj", hidden), ("v_proj", kv)] {
            let key = format!("base_model.model.model.layers.{l}.self_attn.{site}");
            let a = Tensor::full(0.01f32, (r, hidden), &Device::Cpu).unwrap();
            let b = Tensor::full(0.01f32, (out, r), &Device::Cpu).unwrap();
            t.insert(format!("{key}.lora_A.weight"), a);
            t.insert(format!("{key}.lora_B.weight"), b);
        }
    }
    candle_core::safetensors::save(&t, dir.join("adapter_model.safetensors")).unwrap();
    let config = serde_json::json!({
        "peft_type": "LORA", "r": r_config, "lora_alpha": 8, "lora_dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM", "bias": "none"
    });
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
}

/// A scratch benchmark with copies of CB and COPA.
fn scratch_bench(root: &Path) {
    let src = data_dir();
    std::fs::create_dir_all(root).unwrap();
    std::fs::copy(
        src.join("instruction_config.json"),
        root.join("instruction_config.json"),
    )
    .unwrap();
    for task in ["NLI/CB", "COPA/COPA"] {
        copy_dir(&src.join(task), &root.join(task));
    }
}

const RUN_CONFIG: &str = r#"seed = 3
[model]
r = 4
alpha = 8.0
[data]
tasks = ["CB", "COPA"]
max_train_per_task = 4
max_test_per_task = 2
max_source_len = 64
[method]
name = "nlora"
lambda = 0.001
[train]
batch_size = 2
[eval]
batch_size = 2
rank_classification = false
"#;

fn generate(model: &Path, extra: &[&str]) -> Vec<String> {
    let mut a = strings(&["generate", "--model", &s(model), "--prompt", "abc a"]);
    a.extend(strings(&["--max-new-tokens", "2"]));
    a.extend(strings(extra));
    a
}

fn run(config: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut a = strings(&["run", "--config", &s(config), "--out", &s(out), "--quiet"]);
    a.extend(strings(extra));
    a
}

fn data_check(root: &Path) -> Vec<String> {
    strings(&["data", "check", "--data-dir", &s(root)])
}

#[test]
fn every_bad_input_exits_1_and_names_the_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = |name: &str| {
        let d = tmp.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        d
    };
    let mut cases: Vec<Case> = Vec::new();
    let mut add = |name: &'static str, args: Vec<String>, expect: &[&str]| {
        cases.push(Case {
            name,
            args,
            expect: strings(expect),
        })
    };

    // The intact config parses and validates, so the flag cases below fail for the flag.
    let intact = nlora_train::RunConfig::from_toml_str(RUN_CONFIG).unwrap();
    intact.validate(2).unwrap();

    // -- config ------------------------------------------------------------------------
    let cfg_dir = dir("configs");
    let config = |name: &str, text: &str| {
        let p = cfg_dir.join(format!("{name}.toml"));
        std::fs::write(&p, text).unwrap();
        (p.clone(), cfg_dir.join(format!("out-{name}")))
    };
    let nlora_with = |section: &str| format!("[method]\nname = \"nlora\"\n{section}");
    let (c, o) = config("wrong-type", &nlora_with("[train]\nlr = \"fast\"\n"));
    add(
        "config: wrong type",
        run(&c, &o, &[]),
        &[
            "wrong-type.toml",
            "lr = \"fast\"",
            "a number, or a list of numbers",
        ],
    );
    let (c, o) = config("syntax", "[method]\nname = \"nlora\n");
    add(
        "config: TOML syntax",
        run(&c, &o, &[]),
        &["syntax.toml", "line 2"],
    );
    let (c, o) = config("no-method", "[model]\nr = 4\n");
    add(
        "config: no [method]",
        run(&c, &o, &[]),
        &["no-method.toml", "missing field `method`"],
    );
    let (c, o) = config("negative-r", &nlora_with("[model]\nr = -3\n"));
    add(
        "config: negative integer",
        run(&c, &o, &[]),
        &["negative-r.toml", "r = -3"],
    );
    add(
        "config: file missing",
        run(&cfg_dir.join("absent.toml"), &cfg_dir.join("o"), &[]),
        &["cannot read config", "absent.toml"],
    );
    let (c, o) = config(
        "lambda-count",
        "[method]\nname = \"nlora\"\nlambda = [0.1, 0.2]\n[data]\ntasks = [\"CB\", \"COPA\", \"RTE\"]\n",
    );
    add(
        "config: lambda per task, wrong count",
        run(&c, &o, &[]),
        &["`method.lambda` lists 2 values", "3 tasks"],
    );
    let (c, o) = config("dropout", &nlora_with("[model]\ndropout = 1.5\n"));
    add(
        "config: dropout out of range",
        run(&c, &o, &[]),
        &["`model.dropout`", "1.5"],
    );
    let (c, o) = config("batch", &nlora_with("[train]\nbatch_size = 0\n"));
    add(
        "config: batch size 0",
        run(&c, &o, &[]),
        &["`train.batch_size`"],
    );
    let (c, o) = config("epochs", &nlora_with("[train]\nepochs = 0\n"));
    add(
        "config: 0 epochs",
        run(&c, &o, &[]),
        &["`train.epochs` must be at least 1"],
    );
    let (c, o) = config("wd", &nlora_with("[train]\nweight_decay = nan\n"));
    add(
        "config: NaN weight decay",
        run(&c, &o, &[]),
        &["`train.weight_decay`", "NaN"],
    );
    let (c, o) = config(
        "merged-olora",
        "[method]\nname = \"olora\"\nhistory = \"merged\"\n",
    );
    add(
        "config: merged history with O-LoRA",
        run(&c, &o, &[]),
        &["olora", "method.history"],
    );
    let (c, o) = config("order", &nlora_with("[data]\norder = \"order9\"\n"));
    add(
        "config: unknown order",
        run(&c, &o, &[]),
        &["\"order9\"", "presets: order1"],
    );
    let (c, o) = config(
        "auto-every",
        &format!("{RUN_CONFIG}[method.auto_lambda]\ntarget_density = 0.5\nevery = 0\n"),
    );
    add(
        "config: auto lambda every 0 steps",
        run(&c, &o, &[]),
        &["method.auto_lambda.every", "at least 1"],
    );
    let (c, o) = config(
        "monitor-tau",
        &format!("{RUN_CONFIG}[monitor]\ntau_rel = 0.0\n"),
    );
    add(
        "config: monitor threshold 0",
        run(&c, &o, &[]),
        &["monitor.tau_rel", "(0, 1]"],
    );
    let (c, o) = config("ok", RUN_CONFIG);
    add(
        "flag: unknown --method",
        run(&c, &o, &["--method", "magic"]),
        &["unknown method `magic`", "known methods"],
    );
    add(
        "flag: unknown --l1-form",
        run(&c, &o, &["--l1-form", "bogus"]),
        &["--l1-form `bogus`"],
    );
    add(
        "flag: --lambda neither a number nor auto",
        run(&c, &o, &["--lambda", "lots"]),
        &["--lambda must be a number or `auto`", "`lots`"],
    );
    add(
        "flag: --lambda auto without --target-density",
        run(&c, &o, &["--lambda", "auto"]),
        &["--lambda auto needs --target-density"],
    );
    add(
        "flag: --target-density outside (0, 1)",
        run(&c, &o, &["--lambda", "auto", "--target-density", "1.5"]),
        &["method.auto_lambda.target_density", "1.5"],
    );
    add(
        "flag: --lambda auto for a method without l1",
        run(
            &c,
            &o,
            &[
                "--method",
                "olora",
                "--lambda",
                "auto",
                "--target-density",
                "0.5",
            ],
        ),
        &["method.auto_lambda", "olora"],
    );
    add(
        "flag: unknown --preset",
        strings(&["run", "--preset", "nosuch", "--out", &s(cfg_dir.join("o"))]),
        &["unknown preset `nosuch`", "smoke"],
    );

    // -- data ----------------------------------------------------------------------------
    let data = |name: &str| {
        let root = dir("data").join(name);
        scratch_bench(&root);
        root
    };
    let root = data("labels-object");
    std::fs::write(root.join("NLI/CB/labels.json"), "{\"a\": 1}").unwrap();
    add(
        "data: labels.json not a list",
        data_check(&root),
        &[
            &s(root.join("NLI/CB/labels.json")),
            "a JSON list of label strings",
        ],
    );
    let root = data("label-number");
    std::fs::write(
        root.join("NLI/CB/test.json"),
        r#"[{"label": 3, "sentence": "x"}]"#,
    )
    .unwrap();
    add(
        "data: label not a string",
        data_check(&root),
        &[
            &s(root.join("NLI/CB/test.json")),
            "record 0: \"label\" must be a string, found 3",
        ],
    );
    let root = data("no-label");
    std::fs::write(root.join("NLI/CB/train.json"), r#"[{"sentence": "x"}]"#).unwrap();
    add(
        "data: record without \"label\"",
        data_check(&root),
        &[
            &s(root.join("NLI/CB/train.json")),
            "record 0 has no \"label\"",
        ],
    );
    let root = data("empty-sentence");
    std::fs::write(
        root.join("COPA/COPA/train.json"),
        r#"[{"label": "A", "sentence": "  "}]"#,
    )
    .unwrap();
    add(
        "data: blank sentence",
        data_check(&root),
        &[
            &s(root.join("COPA/COPA/train.json")),
            "record 0 has an empty \"sentence\"",
        ],
    );
    let root = data("no-train");
    std::fs::remove_file(root.join("COPA/COPA/train.json")).unwrap();
    add(
        "data: train.json missing",
        data_check(&root),
        &[&s(root.join("COPA/COPA/train.json")), "is missing"],
    );
    let root = data("no-instructions");
    std::fs::remove_file(root.join("instruction_config.json")).unwrap();
    add(
        "data: instruction_config.json missing",
        data_check(&root),
        &[&s(root.join("instruction_config.json")), "is missing"],
    );
    let root = data("no-tasks");
    std::fs::remove_dir_all(root.join("NLI")).unwrap();
    std::fs::remove_dir_all(root.join("COPA")).unwrap();
    add(
        "data: no task folders",
        data_check(&root),
        &[&s(&root), "no task folders found"],
    );
    add(
        "data: run with a missing --data-dir",
        run(
            &c,
            &cfg_dir.join("o-nodata"),
            &["--data-dir", &s(tmp.path().join("nowhere"))],
        ),
        &["nowhere", "does not exist"],
    );

    // -- model -------------------------------------------------------------------------------
    let models = dir("models");
    let gguf = models.join("tiny.gguf");
    write_tiny_gguf(&gguf, "llama", 32);
    let bytes = std::fs::read(&gguf).unwrap();
    let variant = |name: &str, b: &[u8]| {
        let p = models.join(name);
        std::fs::write(&p, b).unwrap();
        p
    };
    let p = variant("truncated.gguf", &bytes[..bytes.len() - 300]);
    add(
        "model: GGUF truncated in its tensor data",
        generate(&p, &[]),
        &["truncated.gguf", "truncated"],
    );
    let p = variant("header-cut.gguf", &bytes[..60]);
    add(
        "model: GGUF cut inside its header",
        generate(&p, &[]),
        &["header-cut.gguf", "cannot read the GGUF header"],
    );
    let mut b = bytes.clone();
    b[..4].copy_from_slice(b"GGML");
    let p = variant("magic.gguf", &b);
    add(
        "model: wrong magic",
        generate(&p, &[]),
        &["magic.gguf", "not a GGUF file"],
    );
    let mut b = bytes.clone();
    let at = dtype_offset(&b, "blk.0.attn_q.weight", 2);
    b[at..at + 4].copy_from_slice(&20u32.to_le_bytes()); // IQ4_NL: candle cannot read it
    let p = variant("iq4nl.gguf", &b);
    add(
        "model: unsupported quantisation type",
        generate(&p, &[]),
        &["iq4nl.gguf", "re-quantise the model", "Q8_0"],
    );
    let p = models.join("gpt2.gguf");
    write_tiny_gguf(&p, "gpt2", 32);
    add(
        "model: unsupported architecture",
        generate(&p, &[]),
        &["gpt2.gguf", "`gpt2` is not supported"],
    );
    let p = models.join("align0.gguf");
    write_tiny_gguf(&p, "llama", 0);
    add(
        "model: alignment 0",
        generate(&p, &[]),
        &["align0.gguf", "general.alignment"],
    );
    let p = variant("weights.bin", &bytes);
    add(
        "model: neither .gguf nor a folder",
        generate(&p, &[]),
        &["weights.bin", "expected a `.gguf` file"],
    );
    add(
        "model: run with a missing model",
        run(
            &c,
            &cfg_dir.join("o-nomodel"),
            &["--model", &s(models.join("absent.gguf"))],
        ),
        &["absent.gguf", "model not found"],
    );
    let p = variant("run-truncated.gguf", &bytes[..bytes.len() - 300]);
    add(
        "model: run with a truncated GGUF",
        run(&c, &cfg_dir.join("o-truncated"), &["--model", &s(&p)]),
        &["run-truncated.gguf", "truncated"],
    );

    let hf = models.join("tiny-hf");
    write_tiny_llama(&hf, 5).unwrap();
    let p = models.join("hf-missing-tensor");
    hf_variant(&hf, &p, |t| {
        t.remove("model.layers.1.mlp.down_proj.weight");
    });
    add(
        "model: safetensors missing a tensor",
        generate(&p, &[]),
        &["model.layers.1.mlp.down_proj.weight", "hf-missing-tensor"],
    );
    let p = models.join("hf-shape");
    hf_variant(&hf, &p, |t| {
        let q = Tensor::zeros((16, 32), DType::F32, &Device::Cpu).unwrap();
        t.insert("model.layers.0.self_attn.q_proj.weight".into(), q);
    });
    add(
        "model: tensor of the wrong shape",
        generate(&p, &[]),
        &[
            "model.layers.0.self_attn.q_proj.weight",
            "[16, 32]",
            "hf-shape",
        ],
    );
    let p = models.join("hf-no-tokenizer");
    copy_dir(&hf, &p);
    std::fs::remove_file(p.join("tokenizer.json")).unwrap();
    add(
        "model: tokenizer.json missing",
        generate(&p, &[]),
        &["hf-no-tokenizer", "tokenizer.json"],
    );
    let p = models.join("hf-config-field");
    copy_dir(&hf, &p);
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(p.join("config.json")).unwrap()).unwrap();
    cfg.as_object_mut().unwrap().remove("hidden_size");
    std::fs::write(p.join("config.json"), cfg.to_string()).unwrap();
    add(
        "model: config.json without hidden_size",
        generate(&p, &[]),
        &["config.json", "`hidden_size`"],
    );
    let p = models.join("hf-model-type");
    copy_dir(&hf, &p);
    cfg["hidden_size"] = 32.into();
    cfg["model_type"] = "gpt2".into();
    std::fs::write(p.join("config.json"), cfg.to_string()).unwrap();
    add(
        "model: unsupported model_type",
        generate(&p, &[]),
        &["`model_type` is `gpt2`", "supported: llama"],
    );
    let p = models.join("hf-garbage");
    copy_dir(&hf, &p);
    std::fs::write(
        p.join("model.safetensors"),
        b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}",
    )
    .unwrap();
    add(
        "model: safetensors not readable",
        generate(&p, &[]),
        &["model.safetensors", "not a readable safetensors file"],
    );

    let root = data("run-broken");
    std::fs::write(root.join("COPA/COPA/test.json"), "[{\"label\": \"A\", ").unwrap();
    add(
        "data: run on a task file that is not JSON",
        run(
            &c,
            &cfg_dir.join("o-broken-data"),
            &["--model", &s(&hf), "--data-dir", &s(&root)],
        ),
        &[&s(root.join("COPA/COPA/test.json")), "not valid JSON"],
    );

    // -- adapters (tiny HF model: hidden 32, key/value width 16, 2 layers) -------------------
    let adapters = dir("adapters");
    let ok = adapters.join("ok");
    write_adapter(&ok, 4, 4, HIDDEN, 16, &[0, 1]);
    let p = adapters.join("other-model");
    write_adapter(&p, 4, 4, 64, 16, &[0, 1]);
    add(
        "adapter: made for another model (hidden 64)",
        generate(&hf, &["--adapter", &s(&p)]),
        &["model.layers.0.self_attn.q_proj", "do not fit a layer"],
    );
    let p = adapters.join("other-depth");
    write_adapter(&p, 4, 4, HIDDEN, 16, &[0, 7]);
    add(
        "adapter: names a layer the model lacks",
        generate(&hf, &["--adapter", &s(&p)]),
        &[
            "model.layers.7.self_attn.q_proj",
            "not a linear layer of this model",
        ],
    );
    let p = adapters.join("wrong-rank");
    write_adapter(&p, 8, 4, HIDDEN, 16, &[0, 1]);
    add(
        "adapter: rank differs from adapter_config.json",
        generate(&hf, &["--adapter", &s(&p)]),
        &["wrong-rank", "do not have rank r = 8"],
    );
    let p = adapters.join("prefix");
    write_adapter(&p, 4, 4, HIDDEN, 16, &[0]);
    std::fs::write(
        p.join("adapter_config.json"),
        r#"{"peft_type": "PREFIX_TUNING", "r": 4, "lora_alpha": 8}"#,
    )
    .unwrap();
    add(
        "adapter: not a LoRA adapter",
        generate(&hf, &["--adapter", &s(&p)]),
        &["adapter_config.json", "`PREFIX_TUNING` is not supported"],
    );
    add(
        "adapter: folder missing",
        generate(&hf, &["--adapter", &s(adapters.join("absent"))]),
        &["absent", "adapter_config.json"],
    );

    // -- run directories -----------------------------------------------------------------------
    let runs = dir("runs");
    let (c, _) = config("run", RUN_CONFIG);
    let made = |name: &str, config: &str| {
        let d = runs.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("config.toml"), config).unwrap();
        d
    };
    let saved = RUN_CONFIG.replace("[model]\n", &format!("[model]\npath = \"{}\"\n", s(&hf)));
    let d = made("other-config", &saved);
    add(
        "run dir: resume with another config",
        run(
            &c,
            &d,
            &["--resume", "--model", &s(&hf), "--method", "seqlora"],
        ),
        &[
            "another config",
            "`method.name` is \"nlora\" there, \"seqlora\" here",
        ],
    );
    let d = made("other-model", &saved);
    add(
        "run dir: resume with another model",
        run(&c, &d, &["--resume", "--model", &s(&gguf)]),
        &["another config", "`model.path`", "tiny.gguf"],
    );
    let d = made("other-seed", &saved);
    add(
        "run dir: resume overriding the seed",
        strings(&["run", "--out", &s(&d), "--resume", "--seed", "4", "--quiet"]),
        &["another config", "`seed` is 3 there, 4 here"],
    );
    add(
        "run dir: resume where nothing ran",
        strings(&[
            "run",
            "--out",
            &s(runs.join("empty")),
            "--resume",
            "--quiet",
        ]),
        &["cannot resume", "config.toml"],
    );
    let d = made("corrupt-config", "seed = \n");
    add(
        "run dir: resume with a corrupt config.toml",
        strings(&["run", "--out", &s(&d), "--resume", "--quiet"]),
        &["cannot resume", "config.toml", "line 1"],
    );
    let d = made("corrupt-state", &saved);
    std::fs::write(d.join("state.json"), "{\"completed_stages\": ").unwrap();
    add(
        "run dir: resume with a corrupt state.json",
        strings(&["run", "--out", &s(&d), "--resume", "--quiet"]),
        &["state.json"],
    );
    let d = made("taken", &saved);
    add(
        "run dir: new run into a dir holding a run",
        run(&c, &d, &["--model", &s(&hf)]),
        &["already holds a run", "--resume"],
    );

    // -- other commands ----------------------------------------------------------------------
    add(
        "generate: --max-new-tokens 0",
        strings(&[
            "generate",
            "--model",
            &s(&hf),
            "--prompt",
            "a",
            "--max-new-tokens",
            "0",
        ]),
        &["--max-new-tokens must be at least 1"],
    );
    add(
        "metrics: not a run directory",
        strings(&["metrics", &s(runs.join("absent"))]),
        &["absent"],
    );

    // The intact inputs work, so each case above fails for its own defect.
    assert_succeeds(&generate(&gguf, &[]));
    assert_succeeds(&generate(&hf, &["--adapter", &s(&ok)]));
    assert_succeeds(&data_check(&data("intact")));

    let failures: Vec<String> = cases.iter().filter_map(check).collect();
    println!(
        "{} bad inputs rejected cleanly (exit 1, problem named, no panic)",
        cases.len() - failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

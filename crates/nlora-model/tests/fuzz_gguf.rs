//! Fuzzing everything that reads a GGUF header (issue 9): open, info, the LLaMA config,
//! the tensors, the model and the tokenizer. Inputs are arbitrary bytes, and mutations of
//! a valid tiny LLaMA file: wrong value types, missing or extreme metadata, odd tensor
//! shapes, unknown tensor types, offsets past the end, huge counts and lengths written
//! into the header's length fields, truncations and byte flips. Each input must give a
//! model or an error naming the file, never a panic, and cost memory bounded by the
//! file's size (a declared length is checked against the file before anything is
//! allocated for it).
//!
//! `cargo test -p nlora-model --test fuzz_gguf -- --nocapture` prints the execution
//! count; `PROPTEST_CASES=N` changes it.
use std::cell::RefCell;
use std::path::Path;
use std::time::Instant;

use candle_core::Device;
use nlora_model::gguf::GgufFile;
use nlora_model::tokenizer::TextTokenizer;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

mod fuzz_support;
use fuzz_support::{cases, peak_bytes, Stats, Tracking};

#[global_allocator]
static ALLOC: Tracking = Tracking;

/// About a minute in the dev profile on 2 busy cores.
const DEFAULT_CASES: u32 = 10_000;

/// A GGUF metadata value, written with the type id it claims (arrays may hold
/// items of another type than they declare: a mutation).
#[derive(Debug, Clone)]
enum V {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(u8),
    Str(Vec<u8>),
    Arr(u32, Vec<V>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl V {
    fn ty(&self) -> u32 {
        match self {
            V::U8(_) => 0,
            V::I8(_) => 1,
            V::U16(_) => 2,
            V::I16(_) => 3,
            V::U32(_) => 4,
            V::I32(_) => 5,
            V::F32(_) => 6,
            V::Bool(_) => 7,
            V::Str(_) => 8,
            V::Arr(..) => 9,
            V::U64(_) => 10,
            V::I64(_) => 11,
            V::F64(_) => 12,
        }
    }

    fn s(x: &str) -> V {
        V::Str(x.as_bytes().to_vec())
    }
}

#[derive(Debug, Clone)]
struct TensorSpec {
    name: Vec<u8>,
    /// GGUF order: innermost dimension first.
    dims: Vec<u64>,
    dtype: u32,
    data: Vec<u8>,
    /// `None`: laid out after the previous tensor.
    offset: Option<u64>,
}

#[derive(Debug, Clone)]
struct Spec {
    version: u32,
    kv: Vec<(Vec<u8>, V)>,
    tensors: Vec<TensorSpec>,
}

/// A serialised file and the (position, width) of each of its count, length and type fields.
struct Built {
    bytes: Vec<u8>,
    fields: Vec<(usize, usize)>,
}

struct Writer {
    b: Vec<u8>,
    fields: Vec<(usize, usize)>,
    /// u64 lengths (v2, v3) rather than u32 (v1).
    wide: bool,
}

impl Writer {
    fn field(&mut self, v: u64, width: usize) {
        self.fields.push((self.b.len(), width));
        self.b.extend(&v.to_le_bytes()[..width]);
    }
    fn len(&mut self, n: u64) {
        self.field(n, if self.wide { 8 } else { 4 });
    }
    fn string(&mut self, s: &[u8]) {
        self.len(s.len() as u64);
        self.b.extend(s);
    }
    fn value(&mut self, v: &V) {
        match v {
            V::U8(x) | V::Bool(x) => self.b.push(*x),
            V::I8(x) => self.b.push(*x as u8),
            V::U16(x) => self.b.extend(x.to_le_bytes()),
            V::I16(x) => self.b.extend(x.to_le_bytes()),
            V::U32(x) => self.b.extend(x.to_le_bytes()),
            V::I32(x) => self.b.extend(x.to_le_bytes()),
            V::F32(x) => self.b.extend(x.to_le_bytes()),
            V::U64(x) => self.b.extend(x.to_le_bytes()),
            V::I64(x) => self.b.extend(x.to_le_bytes()),
            V::F64(x) => self.b.extend(x.to_le_bytes()),
            V::Str(s) => self.string(s),
            V::Arr(item, items) => {
                self.field(*item as u64, 4);
                self.len(items.len() as u64);
                for i in items {
                    self.value(i);
                }
            }
        }
    }
}

fn build(spec: &Spec) -> Built {
    let mut w = Writer {
        b: b"GGUF".to_vec(),
        fields: Vec::new(),
        wide: spec.version != 1,
    };
    w.field(spec.version as u64, 4);
    w.len(spec.tensors.len() as u64);
    w.len(spec.kv.len() as u64);
    for (k, v) in &spec.kv {
        w.string(k);
        w.field(v.ty() as u64, 4);
        w.value(v);
    }
    let mut next = 0u64;
    let mut laid_out = Vec::new();
    for t in &spec.tensors {
        w.string(&t.name);
        w.field(t.dims.len() as u64, 4);
        for &d in &t.dims {
            w.len(d);
        }
        w.field(t.dtype as u64, 4);
        w.field(t.offset.unwrap_or(next), 8);
        laid_out.push(next);
        next += (t.data.len() as u64).div_ceil(32) * 32;
    }
    let start = w.b.len().div_ceil(32) * 32;
    w.b.resize(start + next as usize, 0);
    for (t, off) in spec.tensors.iter().zip(laid_out) {
        let at = start + off as usize;
        w.b[at..at + t.data.len()].copy_from_slice(&t.data);
    }
    Built {
        bytes: w.b,
        fields: w.fields,
    }
}

const HIDDEN: u64 = 32;
const VOCAB: u64 = 16;
const INTER: u64 = 32;
const KV_DIM: u64 = 16; // 1 key/value head of 16

fn f32_data(n: u64, seed: u64) -> Vec<u8> {
    (0..n)
        .flat_map(|i| ((((i * 7 + seed) % 13) as f32 - 6.0) * 0.02).to_le_bytes())
        .collect()
}

/// Q8_0 blocks: an f16 scale (1/64) and 32 signed bytes each.
fn q8_0_data(n: u64) -> Vec<u8> {
    (0..n / 32)
        .flat_map(|b| {
            let mut block = vec![0x00, 0x24];
            block.extend((0..32u64).map(|i| (((i * 3 + b) % 17) as i8 - 8) as u8));
            block
        })
        .collect()
}

fn f16_data(n: u64) -> Vec<u8> {
    let vals: [u16; 4] = [0x3400, 0xB400, 0x0000, 0x2C00]; // 0.25, -0.25, 0, 1/16
    (0..n)
        .flat_map(|i| vals[(i % 4) as usize].to_le_bytes())
        .collect()
}

/// The valid file every mutation starts from: a 1-layer LLaMA (hidden 32, 2 heads, 1
/// key/value head) with a 16-token byte-level BPE vocabulary; F32, F16 and Q8_0 tensors.
fn tiny_llama() -> Spec {
    let t = |name: &str, dims: Vec<u64>, dtype: u32, data: Vec<u8>| TensorSpec {
        name: name.as_bytes().to_vec(),
        dims,
        dtype,
        data,
        offset: None,
    };
    let ones: Vec<u8> = (0..HIDDEN).flat_map(|_| 1.0f32.to_le_bytes()).collect();
    let tensors = vec![
        t(
            "token_embd.weight",
            vec![HIDDEN, VOCAB],
            8,
            q8_0_data(HIDDEN * VOCAB),
        ),
        t("output_norm.weight", vec![HIDDEN], 0, ones.clone()),
        t("blk.0.attn_norm.weight", vec![HIDDEN], 0, ones.clone()),
        t("blk.0.ffn_norm.weight", vec![HIDDEN], 0, ones),
        t(
            "blk.0.attn_q.weight",
            vec![HIDDEN, HIDDEN],
            0,
            f32_data(HIDDEN * HIDDEN, 1),
        ),
        t(
            "blk.0.attn_k.weight",
            vec![HIDDEN, KV_DIM],
            0,
            f32_data(HIDDEN * KV_DIM, 2),
        ),
        t(
            "blk.0.attn_v.weight",
            vec![HIDDEN, KV_DIM],
            0,
            f32_data(HIDDEN * KV_DIM, 3),
        ),
        t(
            "blk.0.attn_output.weight",
            vec![HIDDEN, HIDDEN],
            0,
            f32_data(HIDDEN * HIDDEN, 4),
        ),
        t(
            "blk.0.ffn_gate.weight",
            vec![HIDDEN, INTER],
            1,
            f16_data(HIDDEN * INTER),
        ),
        t(
            "blk.0.ffn_up.weight",
            vec![HIDDEN, INTER],
            0,
            f32_data(HIDDEN * INTER, 5),
        ),
        t(
            "blk.0.ffn_down.weight",
            vec![INTER, HIDDEN],
            0,
            f32_data(HIDDEN * INTER, 6),
        ),
    ];
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
    let merges = [
        "a b", "ab c", "Ġ a", "d e", "c d", "b a", "c a", "d a", "e a",
    ];
    let kv = vec![
        ("general.architecture", V::s("llama")),
        ("general.name", V::s("fuzz tiny")),
        ("general.alignment", V::U32(32)),
        ("llama.context_length", V::U32(64)),
        ("llama.embedding_length", V::U32(HIDDEN as u32)),
        ("llama.block_count", V::U32(1)),
        ("llama.feed_forward_length", V::U32(INTER as u32)),
        ("llama.attention.head_count", V::U32(2)),
        ("llama.attention.head_count_kv", V::U32(1)),
        ("llama.attention.layer_norm_rms_epsilon", V::F32(1e-5)),
        ("llama.rope.freq_base", V::F32(10000.0)),
        ("llama.rope.dimension_count", V::U32(16)),
        ("tokenizer.ggml.model", V::s("gpt2")),
        ("tokenizer.ggml.pre", V::s("default")),
        (
            "tokenizer.ggml.tokens",
            V::Arr(8, tokens.iter().map(|t| V::s(t)).collect()),
        ),
        (
            "tokenizer.ggml.token_type",
            V::Arr(
                5,
                (0..tokens.len())
                    .map(|i| V::I32(if i == 0 { 3 } else { 1 }))
                    .collect(),
            ),
        ),
        (
            "tokenizer.ggml.merges",
            V::Arr(8, merges.iter().map(|m| V::s(m)).collect()),
        ),
        ("tokenizer.ggml.bos_token_id", V::U32(0)),
        ("tokenizer.ggml.eos_token_id", V::U32(0)),
        ("tokenizer.ggml.add_bos_token", V::Bool(0)),
    ];
    Spec {
        version: 3,
        kv: kv
            .into_iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v))
            .collect(),
        tensors,
    }
}

/// Runs every GGUF reader on `path`: whether the whole model loaded, and every error.
fn exercise(path: &Path) -> (bool, Vec<String>) {
    let mut errors = Vec::new();
    let file = match GgufFile::open(path) {
        Ok(f) => f,
        Err(e) => return (false, vec![e.to_string()]),
    };
    match file.info() {
        Ok(info) => drop(info.to_string()),
        Err(e) => errors.push(e.to_string()),
    }
    match TextTokenizer::from_gguf(&file) {
        Ok(tok) => {
            if let Ok(ids) = tok.encode("ab cd e<|endoftext|>") {
                let _ = tok.decode(&ids, false);
            }
        }
        Err(e) => errors.push(e.to_string()),
    }
    drop(file);
    let loaded = match nlora_model::load::load_model(path, &Device::Cpu) {
        Ok(_) => true,
        Err(e) => {
            errors.push(e.to_string());
            false
        }
    };
    (loaded, errors)
}

fn interesting_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        prop::sample::select(vec![
            0u64,
            1,
            2,
            3,
            15,
            16,
            31,
            32,
            33,
            64,
            255,
            256,
            65_535,
            1 << 20,
            (1 << 30) - 1,
            1 << 30,
            (1 << 30) + 1,
            u32::MAX as u64,
            u32::MAX as u64 + 1,
            1 << 40,
            i64::MAX as u64,
            u64::MAX - 1,
            u64::MAX,
        ]),
        0u64..100_000,
        any::<u64>(),
    ]
}

/// An integer of any GGUF integer type holding an interesting value (0, 1, boundaries).
fn number() -> impl Strategy<Value = V> {
    (0u8..8, interesting_u64()).prop_map(|(ty, x)| match ty {
        0 => V::U8(x as u8),
        1 => V::I8(x as i8),
        2 => V::U16(x as u16),
        3 => V::I16(x as i16),
        4 => V::U32(x as u32),
        5 => V::I32(x as i32),
        6 => V::U64(x),
        _ => V::I64(x as i64),
    })
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..max)
}

/// Names the readers look for, so mutations hit meaningful keys and tensors.
const KEYS: &[&str] = &[
    "general.architecture",
    "general.alignment",
    "llama.embedding_length",
    "llama.attention.head_count",
    "llama.attention.head_count_kv",
    "llama.block_count",
    "llama.feed_forward_length",
    "llama.context_length",
    "llama.vocab_size",
    "llama.attention.layer_norm_rms_epsilon",
    "llama.rope.freq_base",
    "llama.rope.dimension_count",
    "llama.rope.scaling.type",
    "llama.attention.key_length",
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.padding_token_id",
    "tokenizer.ggml.add_bos_token",
];

fn name() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::sample::select(KEYS).prop_map(|k| k.as_bytes().to_vec()),
        prop::sample::select(vec![
            "token_embd.weight",
            "output.weight",
            "output_norm.weight",
            "blk.0.attn_q.weight",
            "blk.0.attn_q.bias",
            "blk.1.attn_k.weight",
            "blk.99999999999999999999.attn_v.weight",
            "rope_freqs.weight",
            "",
        ])
        .prop_map(|k| k.as_bytes().to_vec()),
        bytes(24),
    ]
}

fn value() -> impl Strategy<Value = V> {
    let leaf = prop_oneof![
        any::<u8>().prop_map(V::U8),
        any::<i8>().prop_map(V::I8),
        any::<u16>().prop_map(V::U16),
        any::<i16>().prop_map(V::I16),
        interesting_u64().prop_map(|x| V::U32(x as u32)),
        any::<i32>().prop_map(V::I32),
        any::<f32>().prop_map(V::F32),
        prop::sample::select(vec![0.0f32, -1.0, f32::NAN, f32::INFINITY, 1e-30, 1e30])
            .prop_map(V::F32),
        any::<u8>().prop_map(V::Bool),
        name().prop_map(V::Str),
        prop::sample::select(vec![
            "llama", "gpt2", "t5", "smollm", "default", "linear", "none", "a b", "ab",
        ])
        .prop_map(V::s),
        interesting_u64().prop_map(V::U64),
        any::<i64>().prop_map(V::I64),
        any::<f64>().prop_map(V::F64),
    ];
    leaf.prop_recursive(3, 48, 8, |inner| {
        (
            prop::option::of(0u32..15),
            prop::collection::vec(inner, 0..8),
        )
            .prop_map(|(declared, items)| {
                // Mostly honest arrays; sometimes the declared item type lies.
                let ty = declared.unwrap_or_else(|| items.first().map_or(4, V::ty));
                V::Arr(ty, items)
            })
    })
}

/// A position in a collection of any size (proptest's `Index`, constructible for
/// regression cases): `Pick(p).of(n)` is `floor(n * p / 2^64)`.
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

/// A change to the valid file's structure, applied before it is serialised.
#[derive(Debug, Clone)]
enum Op {
    RemoveKv(Pick),
    SetKv(Pick, V),
    AddKv(Vec<u8>, V),
    /// A key the readers use set to a number (replacing its value, or added).
    SetNumber(&'static str, V),
    Dims(Pick, Vec<u64>),
    Dtype(Pick, u32),
    Offset(Pick, u64),
    Rename(Pick, Vec<u8>),
    DropTensor(Pick),
    DuplicateTensor(Pick),
    CutData(Pick, Pick),
    Version(u32),
    /// A key holding arrays nested this deep.
    Nest(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => pick().prop_map(Op::RemoveKv),
        3 => (pick(), value()).prop_map(|(i, v)| Op::SetKv(i, v)),
        1 => (name(), value()).prop_map(|(k, v)| Op::AddKv(k, v)),
        3 => (prop::sample::select(KEYS), number()).prop_map(|(k, v)| Op::SetNumber(k, v)),
        2 => (pick(), prop::collection::vec(interesting_u64(), 0..6))
            .prop_map(|(i, d)| Op::Dims(i, d)),
        2 => (pick(), prop_oneof![0u32..40, any::<u32>()]).prop_map(|(i, d)| Op::Dtype(i, d)),
        1 => (pick(), interesting_u64()).prop_map(|(i, o)| Op::Offset(i, o)),
        1 => (pick(), name()).prop_map(|(i, n)| Op::Rename(i, n)),
        1 => pick().prop_map(Op::DropTensor),
        1 => pick().prop_map(Op::DuplicateTensor),
        1 => (pick(), pick()).prop_map(|(i, j)| Op::CutData(i, j)),
        1 => prop_oneof![0u32..5, any::<u32>()].prop_map(Op::Version),
        1 => (1usize..80).prop_map(Op::Nest),
    ]
}

fn apply(spec: &mut Spec, op: &Op) {
    let (nk, nt) = (spec.kv.len(), spec.tensors.len());
    match op {
        Op::RemoveKv(i) if nk > 0 => {
            spec.kv.remove(i.of(nk));
        }
        Op::SetKv(i, v) if nk > 0 => spec.kv[i.of(nk)].1 = v.clone(),
        Op::AddKv(k, v) => spec.kv.push((k.clone(), v.clone())),
        Op::SetNumber(k, v) => match spec.kv.iter_mut().find(|(name, _)| name == k.as_bytes()) {
            Some(kv) => kv.1 = v.clone(),
            None => spec.kv.push((k.as_bytes().to_vec(), v.clone())),
        },
        Op::Dims(i, d) if nt > 0 => spec.tensors[i.of(nt)].dims = d.clone(),
        Op::Dtype(i, d) if nt > 0 => spec.tensors[i.of(nt)].dtype = *d,
        Op::Offset(i, o) if nt > 0 => spec.tensors[i.of(nt)].offset = Some(*o),
        Op::Rename(i, n) if nt > 0 => spec.tensors[i.of(nt)].name = n.clone(),
        Op::DropTensor(i) if nt > 0 => {
            spec.tensors.remove(i.of(nt));
        }
        Op::DuplicateTensor(i) if nt > 0 => {
            let t = spec.tensors[i.of(nt)].clone();
            spec.tensors.push(t);
        }
        Op::CutData(i, j) if nt > 0 => {
            let t = &mut spec.tensors[i.of(nt)];
            let keep = j.of(t.data.len().max(1));
            t.data.truncate(keep);
        }
        Op::Version(v) => spec.version = *v,
        Op::Nest(depth) => {
            let mut v = V::U32(7);
            for _ in 0..*depth {
                v = V::Arr(9, vec![v]);
            }
            spec.kv.push((b"nested".to_vec(), v));
        }
        _ => {}
    }
}

/// A change to the serialised bytes.
#[derive(Debug, Clone)]
enum Raw {
    Keep,
    Truncate(Pick),
    Flip(Vec<(Pick, u8)>),
    /// Count, length and type fields of the header set to chosen values.
    Fields(Vec<(Pick, u64)>),
}

fn raw() -> impl Strategy<Value = Raw> {
    prop_oneof![
        2 => Just(Raw::Keep),
        1 => pick().prop_map(Raw::Truncate),
        1 => prop::collection::vec((pick(), any::<u8>()), 1..8).prop_map(Raw::Flip),
        2 => prop::collection::vec((pick(), interesting_u64()), 1..4).prop_map(Raw::Fields),
    ]
}

fn mutate(built: Built, raw: &Raw) -> Vec<u8> {
    let mut b = built.bytes;
    match raw {
        Raw::Keep => {}
        Raw::Truncate(i) => b.truncate(i.of(b.len())),
        Raw::Flip(flips) => {
            for (i, v) in flips {
                let at = i.of(b.len());
                b[at] = *v;
            }
        }
        Raw::Fields(sets) => {
            for (i, v) in sets {
                let (at, width) = built.fields[i.of(built.fields.len())];
                b[at..at + width].copy_from_slice(&v.to_le_bytes()[..width]);
            }
        }
    }
    b
}

#[derive(Debug, Clone)]
enum Input {
    /// Arbitrary bytes, behind a valid magic and version half of the time.
    Bytes(Option<u32>, Vec<u8>),
    Mutated(Vec<Op>, Raw),
}

fn input() -> impl Strategy<Value = Input> {
    prop_oneof![
        1 => (prop::option::of(1u32..4), bytes(512)).prop_map(|(v, b)| Input::Bytes(v, b)),
        4 => (prop::collection::vec(op(), 0..4), raw()).prop_map(|(o, r)| Input::Mutated(o, r)),
    ]
}

fn render(input: &Input) -> Vec<u8> {
    match input {
        Input::Bytes(None, b) => b.clone(),
        Input::Bytes(Some(version), b) => {
            let mut out = b"GGUF".to_vec();
            out.extend(version.to_le_bytes());
            out.extend(b);
            out
        }
        Input::Mutated(ops, raw) => {
            let mut spec = tiny_llama();
            for op in ops {
                apply(&mut spec, op);
            }
            mutate(build(&spec), raw)
        }
    }
}

/// The most memory one input may cost: what the valid file needs, plus a fixed
/// allowance per byte of file (an array item decodes to a ~32-byte value).
fn memory_limit(file_len: usize) -> usize {
    (16 << 20) + 256 * file_len
}

#[test]
fn the_base_file_is_a_valid_model() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("base.gguf");
    let bytes = build(&tiny_llama()).bytes;
    std::fs::write(&path, &bytes).unwrap();
    let ((loaded, errors), peak) = peak_bytes(|| exercise(&path));
    assert!(loaded && errors.is_empty(), "{errors:?}");
    let model = nlora_model::load::load_model(&path, &Device::Cpu).unwrap();
    let c = model.config();
    assert_eq!(
        (
            c.hidden_size,
            c.num_kv_heads(),
            c.vocab_size,
            c.intermediate_size
        ),
        (32, 1, 16, 32)
    );
    let tok = TextTokenizer::from_path(&path).unwrap();
    // "ab" + "c" merge to "abc" (id 8); " a" to "Ġa" (9); the control token stays whole.
    assert_eq!(tok.encode("abc a<|endoftext|>").unwrap(), [8, 9, 0]);
    println!(
        "base file: {} bytes, peak memory {} KiB",
        bytes.len(),
        peak / 1024
    );
    assert!(peak <= memory_limit(bytes.len()));
}

#[test]
fn fuzz_gguf_readers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("case.gguf");
    // Warm up what is built once per process (tokenizer regexes; with RUST_BACKTRACE
    // set, the symbol tables candle's error backtraces load) so it is not charged to
    // the first input.
    for input in [
        Input::Mutated(Vec::new(), Raw::Keep),
        Input::Bytes(Some(99), Vec::new()),
    ] {
        std::fs::write(&path, render(&input)).unwrap();
        exercise(&path);
    }
    let stats = RefCell::new(Stats::new("GGUF header reader"));
    let mut runner = TestRunner::new(Config {
        cases: cases(DEFAULT_CASES),
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&input(), |input| {
        let bytes = render(&input);
        std::fs::write(&path, &bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let t0 = Instant::now();
        let ((loaded, errors), peak) = peak_bytes(|| exercise(&path));
        stats.borrow_mut().record(loaded, peak, t0.elapsed());
        for e in &errors {
            prop_assert!(e.contains("case.gguf"), "error does not name the file: {e}");
        }
        prop_assert!(
            peak <= memory_limit(bytes.len()),
            "{peak} bytes held for a {}-byte file",
            bytes.len()
        );
        Ok(())
    });
    stats.borrow().print();
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// The inputs that panicked before the fixes in gguf.rs, each now a named error.
#[test]
fn inputs_that_once_panicked_are_named_errors() {
    fn set(spec: &mut Spec, key: &str, v: V) {
        match spec.kv.iter_mut().find(|(k, _)| k == key.as_bytes()) {
            Some(kv) => kv.1 = v,
            None => spec.kv.push((key.as_bytes().to_vec(), v)),
        }
    }
    fn tensor<'a>(spec: &'a mut Spec, name: &str) -> &'a mut TensorSpec {
        spec.tensors
            .iter_mut()
            .find(|t| t.name == name.as_bytes())
            .unwrap()
    }
    type Edit = fn(&mut Spec);
    let cases: [(&str, Edit, &str); 4] = [
        // candle divides by the alignment unchecked.
        (
            "alignment 0",
            |s| set(s, "general.alignment", V::U8(0)),
            "general.alignment",
        ),
        // The element count overflowed in candle's Shape::elem_count.
        (
            "dims whose product overflows",
            |s| tensor(s, "blk.0.attn_q.weight").dims = vec![1 << 32, 1 << 32, 2],
            "overflows",
        ),
        // `dims()[0]` of a 0-dimensional embedding gave the vocabulary size.
        (
            "0-d token_embd and no vocabulary",
            |s| {
                s.kv.retain(|(k, _)| k != b"tokenizer.ggml.tokens");
                let t = tensor(s, "token_embd.weight");
                (t.dims, t.dtype) = (vec![], 0);
            },
            "tokenizer.ggml.tokens",
        ),
        // An id beyond u32 was cut to its low 32 bits.
        (
            "eos id beyond u32",
            |s| set(s, "tokenizer.ggml.eos_token_id", V::U64((1 << 32) + 2)),
            "out of range",
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("case.gguf");
    for (what, edit, needle) in cases {
        let mut spec = tiny_llama();
        edit(&mut spec);
        std::fs::write(&path, build(&spec).bytes).unwrap();
        let (loaded, errors) = exercise(&path);
        assert!(!loaded, "{what}: loaded");
        // The tokenizer reads the same header: it must refuse it too.
        let tok = TextTokenizer::from_path(&path).err().map(|e| e.to_string());
        assert!(
            tok.as_deref().is_some_and(|e| e.contains(needle)),
            "{what}: tokenizer {tok:?}"
        );
        assert!(
            errors
                .iter()
                .any(|e| e.contains(needle) && e.contains("case.gguf")),
            "{what}: no error naming the file and {needle:?}: {errors:?}"
        );
    }
}

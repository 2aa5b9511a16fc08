//! GGUF (llama.cpp) checkpoints: LLaMA-family hyperparameters from the metadata and every
//! tensor dequantised to f32 under its Hugging Face name, so the training code sees one
//! layout whatever the checkpoint format.
//!
//! llama.cpp's converter permutes the rows of q/k projections of "llama" models so that
//! its interleaved RoPE (pairs `(2i, 2i+1)`) matches the HF rotate-half RoPE (pairs
//! `(i, i + d/2)`); [`unpermute_rope_rows`] undoes it, as transformers' GGUF loader does.
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};

use crate::error::{ModelError, Result};
use crate::llama::LlamaConfig;

/// Values of `general.architecture` this loader understands.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["llama"];

/// The tensor encodings candle can dequantise (GGUF type names).
const READABLE_DTYPES: &str =
    "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K";

/// A GGUF file with its header parsed; tensors are read on demand.
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    reader: BufReader<File>,
    file_bytes: u64,
}

/// What a GGUF file holds, for logs and `nlora` listings.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufInfo {
    pub path: PathBuf,
    pub architecture: String,
    /// `general.name`, when present.
    pub name: Option<String>,
    pub file_bytes: u64,
    pub tensor_count: usize,
    pub parameter_count: usize,
    /// Tensor count per GGUF encoding, e.g. `{"Q4_1": 210, "F32": 61, "Q8_0": 1}`.
    pub dtype_counts: BTreeMap<String, usize>,
}

impl std::fmt::Display for GgufInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dtypes: Vec<String> = self
            .dtype_counts
            .iter()
            .map(|(k, v)| format!("{k}x{v}"))
            .collect();
        write!(
            f,
            "{} ({}, {}): {} tensors, {:.1}M parameters, {:.1} MB [{}]",
            self.path.display(),
            self.architecture,
            self.name.as_deref().unwrap_or("unnamed"),
            self.tensor_count,
            self.parameter_count as f64 / 1e6,
            self.file_bytes as f64 / 1e6,
            dtypes.join(", ")
        )
    }
}

impl GgufFile {
    /// Opens `path` and parses its header (metadata and tensor index, no tensor data).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let io_err = |source| ModelError::Io {
            path: path.clone(),
            source,
        };
        let mut file = File::open(&path).map_err(io_err)?;
        let file_bytes = file.metadata().map_err(io_err)?.len();
        let mut magic = [0u8; 4];
        // Checked here so a wrong file gets a plain answer rather than candle's hex dump.
        if file_bytes < 4 || file.read_exact(&mut magic).is_err() || &magic != b"GGUF" {
            return Err(ModelError::BadFile {
                path,
                message: format!(
                    "not a GGUF file (starts with {:?}, expected the magic \"GGUF\"); \
                     pass a .gguf checkpoint or a Hugging Face model folder",
                    String::from_utf8_lossy(&magic[..(file_bytes.min(4) as usize)])
                ),
            });
        }
        file.seek(SeekFrom::Start(0)).map_err(io_err)?;
        let mut reader = BufReader::new(file);
        // candle divides by the declared alignment unchecked: 0 would panic inside it.
        if let Some(a) = declared_alignment(&mut reader, file_bytes).filter(|a| *a <= 0) {
            return Err(ModelError::BadField {
                path,
                field: "general.alignment".into(),
                message: format!("must be a positive number of bytes, found {a}"),
            });
        }
        reader.seek(SeekFrom::Start(0)).map_err(io_err)?;
        let content = Content::read(&mut reader).map_err(|e| {
            let mut message = format!("cannot read the GGUF header: {e}");
            if message.contains("unknown dtype") {
                message.push_str(&format!(
                    " (a ggml tensor type id this build cannot read; readable encodings: {READABLE_DTYPES}); \
                     re-quantise the model to one of these"
                ));
            }
            ModelError::BadFile {
                path: path.clone(),
                message,
            }
        })?;
        let file = Self {
            path,
            content,
            reader,
            file_bytes,
        };
        file.check_tensor_extents()?;
        Ok(file)
    }

    /// Every tensor's data must lie inside the file. Checked once here, with checked
    /// arithmetic, so that no later size computation overflows and no read allocates
    /// for bytes a truncated or corrupt file does not hold.
    fn check_tensor_extents(&self) -> Result<()> {
        let mut names: Vec<&String> = self.content.tensor_infos.keys().collect();
        names.sort();
        for name in names {
            let info = &self.content.tensor_infos[name];
            let dims = info.shape.dims();
            let dtype = gguf_dtype_name(info.ggml_dtype);
            let block = info.ggml_dtype.block_size();
            let elems = dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
            let problem = match elems {
                None => "its element count overflows".to_string(),
                Some(n) if n % block != 0 => {
                    format!("{n} elements are not a whole number of {dtype} blocks of {block}")
                }
                Some(n) => {
                    let end = ((n / block) as u64)
                        .checked_mul(info.ggml_dtype.type_size() as u64)
                        .and_then(|b| b.checked_add(info.offset))
                        .and_then(|b| b.checked_add(self.content.tensor_data_offset));
                    match end {
                        Some(end) if end <= self.file_bytes => continue,
                        Some(end) => format!(
                            "its data ends at byte {end}, beyond the end of the file ({} bytes): \
                             the file is truncated or its header is corrupt",
                            self.file_bytes
                        ),
                        None => "its data offset or size overflows".to_string(),
                    }
                }
            };
            return Err(ModelError::BadFile {
                path: self.path.clone(),
                message: format!("tensor `{name}` (shape {dims:?}, {dtype}): {problem}"),
            });
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    /// Tensor names as stored in the file (llama.cpp names).
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.content.tensor_infos.keys().map(String::as_str)
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Result<&str> {
        self.get_str("general.architecture")
    }

    pub fn info(&self) -> Result<GgufInfo> {
        let mut dtype_counts = BTreeMap::new();
        let mut parameter_count = 0;
        for info in self.content.tensor_infos.values() {
            *dtype_counts
                .entry(gguf_dtype_name(info.ggml_dtype))
                .or_insert(0) += 1;
            parameter_count += info.shape.elem_count();
        }
        Ok(GgufInfo {
            path: self.path.clone(),
            architecture: self.architecture()?.to_string(),
            name: self.get_str("general.name").ok().map(str::to_string),
            file_bytes: self.file_bytes,
            tensor_count: self.content.tensor_infos.len(),
            parameter_count,
            dtype_counts,
        })
    }

    /// Fails with the architecture found and the supported ones unless this is a LLaMA file.
    pub fn check_architecture(&self) -> Result<&str> {
        let arch = self.architecture()?;
        if SUPPORTED_ARCHITECTURES.contains(&arch) {
            Ok(arch)
        } else {
            Err(ModelError::BadFile {
                path: self.path.clone(),
                message: format!(
                    "architecture `{arch}` is not supported (supported: {})",
                    SUPPORTED_ARCHITECTURES.join(", ")
                ),
            })
        }
    }

    /// LLaMA hyperparameters from the `llama.*` and `tokenizer.ggml.*` metadata.
    pub fn llama_config(&self) -> Result<LlamaConfig> {
        let arch = self.check_architecture()?;
        let key = |k: &str| format!("{arch}.{k}");
        let hidden_size = self.get_usize(&key("embedding_length"))?;
        let num_attention_heads = self.get_usize(&key("attention.head_count"))?;
        let num_key_value_heads = match self.get_opt(&key("attention.head_count_kv")) {
            Some(_) => self.get_usize(&key("attention.head_count_kv"))?,
            None => num_attention_heads,
        };
        if num_attention_heads == 0
            || hidden_size % num_attention_heads != 0
            || num_key_value_heads == 0
            || num_attention_heads % num_key_value_heads != 0
        {
            return Err(self.bad_field(
                &key("attention.head_count"),
                format!(
                    "{num_attention_heads} heads ({num_key_value_heads} key/value heads) \
                     do not divide the hidden size {hidden_size}"
                ),
            ));
        }
        let head_dim = hidden_size / num_attention_heads;
        // The decoder derives the head size from hidden/heads; a file that says otherwise
        // (partial RoPE, wider heads) would load silently wrong.
        for k in [
            "rope.dimension_count",
            "attention.key_length",
            "attention.value_length",
        ] {
            if self.get_opt(&key(k)).is_some() {
                let v = self.get_usize(&key(k))?;
                if v != head_dim {
                    return Err(self.bad_field(
                        &key(k),
                        format!("{v} differs from hidden/heads = {head_dim}; unsupported"),
                    ));
                }
            }
        }
        if let Some(Value::String(kind)) = self.get_opt(&key("rope.scaling.type")) {
            if kind != "none" {
                return Err(self.bad_field(
                    &key("rope.scaling.type"),
                    format!("RoPE scaling `{kind}` is not supported"),
                ));
            }
        }
        let rms_norm_eps = self.get_f64(&key("attention.layer_norm_rms_epsilon"))?;
        let intermediate_size = self.get_usize(&key("feed_forward_length"))?;
        let num_hidden_layers = self.get_usize(&key("block_count"))?;
        let rope_theta = match self.get_opt(&key("rope.freq_base")) {
            Some(_) => self.get_f64(&key("rope.freq_base"))?,
            None => 10_000.0,
        };
        let max_position_embeddings = match self.get_opt(&key("context_length")) {
            Some(_) => self.get_usize(&key("context_length"))?,
            None => 2048,
        };
        let vocab_size = match self.get_opt("tokenizer.ggml.tokens") {
            Some(Value::Array(tokens)) => tokens.len(),
            _ if self.get_opt(&key("vocab_size")).is_some() => {
                self.get_usize(&key("vocab_size"))?
            }
            _ => match self
                .content
                .tensor_infos
                .get("token_embd.weight")
                .and_then(|info| info.shape.dims().first())
            {
                Some(&rows) => rows,
                None => {
                    return Err(self.bad_field(
                        "tokenizer.ggml.tokens",
                        format!(
                        "missing, and neither {} nor token_embd.weight gives the vocabulary size",
                        key("vocab_size")
                    ),
                    ))
                }
            },
        };
        Ok(LlamaConfig {
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads: Some(num_key_value_heads),
            // f32 in the file: 1e-5 reads back as 9.99999974e-6; round to the decimal
            // the converter was given so configs compare equal to the HF ones.
            rms_norm_eps: round_f32_decimal(rms_norm_eps),
            rope_theta: round_f32_decimal(rope_theta),
            max_position_embeddings,
            tie_word_embeddings: !self.content.tensor_infos.contains_key("output.weight"),
            attention_bias: self.content.tensor_infos.contains_key("blk.0.attn_q.bias"),
            bos_token_id: self.get_token_id("tokenizer.ggml.bos_token_id")?,
            eos_token_id: self.get_token_id("tokenizer.ggml.eos_token_id")?,
            hidden_act: "silu".to_string(),
        })
    }

    /// Reads one tensor (llama.cpp name) dequantised to f32, as stored (no renaming or
    /// un-permuting).
    pub fn raw_tensor(&mut self, gguf_name: &str, device: &Device) -> Result<Tensor> {
        let info = self
            .content
            .tensor_infos
            .get(gguf_name)
            .ok_or_else(|| ModelError::BadFile {
                path: self.path.clone(),
                message: format!("no tensor `{gguf_name}`"),
            })?;
        let wrap = |e: candle_core::Error| ModelError::BadFile {
            path: self.path.clone(),
            message: format!("tensor `{gguf_name}`: {e}"),
        };
        let q = info
            .read(&mut self.reader, self.content.tensor_data_offset, device)
            .map_err(wrap)?;
        q.dequantize(device).map_err(wrap)
    }

    /// Every tensor of a LLaMA file, f32, under its Hugging Face name, q/k rows un-permuted.
    /// Checks the shapes against `config` so a mismatched file fails here, naming it.
    pub fn llama_tensors(
        &mut self,
        config: &LlamaConfig,
        device: &Device,
    ) -> Result<HashMap<String, Tensor>> {
        self.check_architecture()?;
        let mut names: Vec<String> = self.content.tensor_infos.keys().cloned().collect();
        names.sort();
        let mut out = HashMap::with_capacity(names.len());
        for gguf_name in names {
            let Some(hf_name) = hf_tensor_name(&gguf_name) else {
                // e.g. rope_freqs.weight, which only llama.cpp's own RoPE variants use.
                return Err(ModelError::BadFile {
                    path: self.path.clone(),
                    message: format!(
                        "tensor `{gguf_name}` has no Hugging Face LLaMA counterpart; unsupported"
                    ),
                });
            };
            let expected = expected_shape(&hf_name, config);
            let dims = self.tensor_dims(&gguf_name)?;
            if let Some(expected) = &expected {
                if &dims != expected {
                    return Err(ModelError::BadFile {
                        path: self.path.clone(),
                        message: format!(
                            "tensor `{gguf_name}` has shape {dims:?}, the metadata implies {expected:?}"
                        ),
                    });
                }
            }
            let mut t = self.raw_tensor(&gguf_name, device)?;
            if gguf_name.contains(".attn_q.") {
                t = unpermute_rope_rows(&t, config.num_attention_heads)?;
            } else if gguf_name.contains(".attn_k.") {
                t = unpermute_rope_rows(&t, config.num_kv_heads())?;
            }
            out.insert(hf_name, t);
        }
        for layer in 0..config.num_hidden_layers {
            for site in LAYER_TENSORS {
                let name = format!("model.layers.{layer}.{site}.weight");
                if !out.contains_key(&name) {
                    return Err(self.missing_tensor(&name));
                }
            }
        }
        for name in ["model.embed_tokens.weight", "model.norm.weight"] {
            if !out.contains_key(name) {
                return Err(self.missing_tensor(name));
            }
        }
        Ok(out)
    }

    fn missing_tensor(&self, hf_name: &str) -> ModelError {
        ModelError::BadFile {
            path: self.path.clone(),
            message: format!("tensor for `{hf_name}` is missing"),
        }
    }

    fn tensor_dims(&self, gguf_name: &str) -> Result<Vec<usize>> {
        self.content
            .tensor_infos
            .get(gguf_name)
            .map(|i| i.shape.dims().to_vec())
            .ok_or_else(|| ModelError::BadFile {
                path: self.path.clone(),
                message: format!("no tensor `{gguf_name}`"),
            })
    }

    fn bad_field(&self, field: &str, message: String) -> ModelError {
        ModelError::BadField {
            path: self.path.clone(),
            field: field.to_string(),
            message,
        }
    }

    fn get_opt(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn get(&self, key: &str) -> Result<&Value> {
        self.get_opt(key)
            .ok_or_else(|| self.bad_field(key, "missing from the GGUF metadata".to_string()))
    }

    pub(crate) fn get_str(&self, key: &str) -> Result<&str> {
        match self.get(key)? {
            Value::String(s) => Ok(s),
            v => Err(self.bad_field(key, format!("expected a string, found {v:?}"))),
        }
    }

    pub(crate) fn get_usize(&self, key: &str) -> Result<usize> {
        let v = self.get(key)?;
        let n: Option<i128> = match v {
            Value::U8(x) => Some(*x as i128),
            Value::I8(x) => Some(*x as i128),
            Value::U16(x) => Some(*x as i128),
            Value::I16(x) => Some(*x as i128),
            Value::U32(x) => Some(*x as i128),
            Value::I32(x) => Some(*x as i128),
            Value::U64(x) => Some(*x as i128),
            Value::I64(x) => Some(*x as i128),
            _ => None,
        };
        match n {
            Some(n) if n >= 0 && n <= usize::MAX as i128 => Ok(n as usize),
            _ => Err(self.bad_field(key, format!("expected a non-negative integer, found {v:?}"))),
        }
    }

    /// An optional token id; one beyond u32 is an error, not cut to 32 bits.
    pub(crate) fn get_token_id(&self, key: &str) -> Result<Option<u32>> {
        if self.get_opt(key).is_none() {
            return Ok(None);
        }
        let id = self.get_usize(key)?;
        u32::try_from(id)
            .map(Some)
            .map_err(|_| self.bad_field(key, format!("token id {id} is out of range")))
    }

    pub(crate) fn get_f64(&self, key: &str) -> Result<f64> {
        match self.get(key)? {
            Value::F32(x) => Ok(*x as f64),
            Value::F64(x) => Ok(*x),
            v => Err(self.bad_field(key, format!("expected a float, found {v:?}"))),
        }
    }

    pub(crate) fn get_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get_opt(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.bad_field(key, format!("expected a bool, found {v:?}"))),
        }
    }

    pub(crate) fn get_string_array(&self, key: &str) -> Result<Vec<&str>> {
        match self.get(key)? {
            Value::Array(items) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.as_str()),
                    v => Err(self.bad_field(key, format!("expected strings, found {v:?}"))),
                })
                .collect(),
            v => Err(self.bad_field(key, format!("expected an array, found {v:?}"))),
        }
    }

    pub(crate) fn get_int_array(&self, key: &str) -> Result<Vec<i64>> {
        match self.get(key)? {
            Value::Array(items) => items
                .iter()
                .map(|v| match v {
                    Value::I32(x) => Ok(*x as i64),
                    Value::U32(x) => Ok(*x as i64),
                    Value::I8(x) => Ok(*x as i64),
                    Value::U8(x) => Ok(*x as i64),
                    Value::I64(x) => Ok(*x),
                    v => Err(self.bad_field(key, format!("expected integers, found {v:?}"))),
                })
                .collect(),
            v => Err(self.bad_field(key, format!("expected an array, found {v:?}"))),
        }
    }
}

/// `general.alignment` as the header declares it (integer types only, as candle reads
/// it), found by walking the metadata before candle parses it. Anything the walk cannot
/// follow (truncation, a length beyond the file, an unknown type) ends it with `None`;
/// candle's reader then reports the problem.
fn declared_alignment<R: Read + Seek>(reader: &mut BufReader<R>, file_bytes: u64) -> Option<i128> {
    let mut scan = HeaderScan {
        reader,
        pos: 0,
        end: file_bytes,
        wide: true,
    };
    let _magic = scan.take::<4>()?;
    let version = scan.u32()?;
    scan.wide = version != 1; // v1 has u32 lengths and counts
    let _tensors = scan.len()?;
    let kv_count = scan.len()?;
    for _ in 0..kv_count {
        let key_len = scan.len()?;
        let is_alignment = if key_len == b"general.alignment".len() as u64 {
            scan.take::<17>()? == *b"general.alignment"
        } else {
            scan.skip(key_len)?;
            false
        };
        let ty = scan.u32()?;
        if is_alignment {
            return Some(match ty {
                0 => scan.take::<1>()?[0] as i128,
                1 => scan.take::<1>()?[0] as i8 as i128,
                2 => u16::from_le_bytes(scan.take()?) as i128,
                3 => i16::from_le_bytes(scan.take()?) as i128,
                4 => scan.u32()? as i128,
                5 => i32::from_le_bytes(scan.take()?) as i128,
                _ => return None, // candle ignores other types and uses its default
            });
        }
        scan.skip_value(ty, 0)?;
    }
    None
}

/// A cursor over a GGUF header that can only move forward inside the file.
struct HeaderScan<'a, R> {
    reader: &'a mut BufReader<R>,
    pos: u64,
    end: u64,
    /// u64 lengths (GGUF v2, v3) rather than u32 (v1).
    wide: bool,
}

impl<R: Read + Seek> HeaderScan<'_, R> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let mut b = [0u8; N];
        self.reader.read_exact(&mut b).ok()?;
        self.pos += N as u64;
        Some(b)
    }

    fn u32(&mut self) -> Option<u32> {
        self.take().map(u32::from_le_bytes)
    }

    fn len(&mut self) -> Option<u64> {
        if self.wide {
            self.take().map(u64::from_le_bytes)
        } else {
            self.u32().map(u64::from)
        }
    }

    fn skip(&mut self, n: u64) -> Option<()> {
        if n > self.end.saturating_sub(self.pos) {
            return None;
        }
        self.reader.seek_relative(i64::try_from(n).ok()?).ok()?;
        self.pos += n;
        Some(())
    }

    /// Skips one value of GGUF type `ty`; nesting is capped as candle caps it.
    fn skip_value(&mut self, ty: u32, depth: usize) -> Option<()> {
        match ty {
            8 => {
                let n = self.len()?;
                self.skip(n)
            }
            9 if depth < 64 => {
                let item = self.u32()?;
                let n = self.len()?;
                match fixed_size(item) {
                    Some(size) => self.skip(n.checked_mul(size)?),
                    None => {
                        // Strings and arrays take at least 4 bytes each, so this loop
                        // ends within the file's length.
                        for _ in 0..n {
                            self.skip_value(item, depth + 1)?;
                        }
                        Some(())
                    }
                }
            }
            ty => self.skip(fixed_size(ty)?),
        }
    }
}

/// Bytes of a fixed-size GGUF value type.
fn fixed_size(ty: u32) -> Option<u64> {
    match ty {
        0 | 1 | 7 => Some(1), // u8, i8, bool
        2 | 3 => Some(2),     // u16, i16
        4..=6 => Some(4),     // u32, i32, f32
        10..=12 => Some(8),   // u64, i64, f64
        _ => None,
    }
}

/// Per-layer weights every LLaMA block must have (HF names without `model.layers.N.`).
const LAYER_TENSORS: [&str; 9] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
    "input_layernorm",
    "post_attention_layernorm",
];

/// Reads a LLaMA GGUF: its config and all tensors as f32 under Hugging Face names.
pub fn load_llama_gguf(
    path: impl AsRef<Path>,
    device: &Device,
) -> Result<(LlamaConfig, HashMap<String, Tensor>)> {
    let mut file = GgufFile::open(path)?;
    let config = file.llama_config()?;
    let tensors = file.llama_tensors(&config, device)?;
    Ok((config, tensors))
}

/// The Hugging Face name of a llama.cpp LLaMA tensor, `None` when there is none.
pub fn hf_tensor_name(gguf_name: &str) -> Option<String> {
    match gguf_name {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (site, kind) = rest.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let hf_site = match site {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf_site}.{kind}"))
}

/// The shape a HF tensor must have under `config` (None for names it does not constrain).
fn expected_shape(hf_name: &str, c: &LlamaConfig) -> Option<Vec<usize>> {
    let (h, i, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
    let kv = c.num_kv_heads() * c.head_dim();
    let site = match hf_name {
        "model.embed_tokens.weight" | "lm_head.weight" => return Some(vec![v, h]),
        "model.norm.weight" => return Some(vec![h]),
        n => n.strip_prefix("model.layers.")?.split_once('.')?.1,
    };
    Some(match site {
        "self_attn.q_proj.weight" | "self_attn.o_proj.weight" => vec![h, h],
        "self_attn.k_proj.weight" | "self_attn.v_proj.weight" => vec![kv, h],
        "self_attn.q_proj.bias" => vec![h],
        "self_attn.k_proj.bias" | "self_attn.v_proj.bias" => vec![kv],
        "mlp.gate_proj.weight" | "mlp.up_proj.weight" => vec![i, h],
        "mlp.down_proj.weight" => vec![h, i],
        "input_layernorm.weight" | "post_attention_layernorm.weight" => vec![h],
        _ => return None,
    })
}

/// Undoes llama.cpp's q/k row permutation for `n_head` heads: within each head, row
/// `2j + s` of the GGUF tensor is row `s * head_dim/2 + j` of the HF tensor. Works on
/// weights `(n_head * head_dim, in)` and biases `(n_head * head_dim,)`.
pub fn unpermute_rope_rows(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let dims = w.dims().to_vec();
    let rows = dims[0];
    if n_head == 0 || rows % (2 * n_head) != 0 {
        return Err(ModelError::Tensor {
            name: "q/k projection".into(),
            message: format!("{rows} rows cannot be split into {n_head} heads of even size"),
        });
    }
    let half = rows / n_head / 2;
    let inner: usize = dims[1..].iter().product();
    Ok(w.reshape((n_head, half, 2, inner))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?)
}

/// The shortest decimal that rounds to the same f32: undoes the widening of an f32
/// metadata value (1e-5f32 -> 9.999999747378752e-6).
fn round_f32_decimal(x: f64) -> f64 {
    let f = x as f32;
    if f as f64 != x {
        return x; // a true f64 value: keep it.
    }
    format!("{f}").parse().unwrap_or(x)
}

fn gguf_dtype_name(d: candle_core::quantized::GgmlDType) -> String {
    use candle_core::quantized::GgmlDType as G;
    match d {
        G::Q2K => "Q2_K".into(),
        G::Q3K => "Q3_K".into(),
        G::Q4K => "Q4_K".into(),
        G::Q5K => "Q5_K".into(),
        G::Q6K => "Q6_K".into(),
        G::Q8K => "Q8_K".into(),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_hugging_face() {
        let cases = [
            ("token_embd.weight", "model.embed_tokens.weight"),
            ("output_norm.weight", "model.norm.weight"),
            ("output.weight", "lm_head.weight"),
            (
                "blk.0.attn_q.weight",
                "model.layers.0.self_attn.q_proj.weight",
            ),
            (
                "blk.12.attn_k.weight",
                "model.layers.12.self_attn.k_proj.weight",
            ),
            ("blk.3.attn_v.bias", "model.layers.3.self_attn.v_proj.bias"),
            (
                "blk.29.attn_output.weight",
                "model.layers.29.self_attn.o_proj.weight",
            ),
            (
                "blk.1.ffn_gate.weight",
                "model.layers.1.mlp.gate_proj.weight",
            ),
            ("blk.1.ffn_up.weight", "model.layers.1.mlp.up_proj.weight"),
            (
                "blk.1.ffn_down.weight",
                "model.layers.1.mlp.down_proj.weight",
            ),
            (
                "blk.7.attn_norm.weight",
                "model.layers.7.input_layernorm.weight",
            ),
            (
                "blk.7.ffn_norm.weight",
                "model.layers.7.post_attention_layernorm.weight",
            ),
        ];
        for (g, h) in cases {
            assert_eq!(hf_tensor_name(g).as_deref(), Some(h), "{g}");
        }
        for g in [
            "rope_freqs.weight",
            "blk.x.attn_q.weight",
            "blk.0.attn_qkv.weight",
            "blk.0.attn_q.scale",
        ] {
            assert_eq!(hf_tensor_name(g), None, "{g}");
        }
    }

    /// llama.cpp's convert permute, written the way its converter writes it, so the
    /// inverse is checked against the forward map rather than against itself.
    fn llama_cpp_permute(w: &[f32], n_head: usize, rows: usize, cols: usize) -> Vec<f32> {
        // w.reshape(n_head, 2, rows/n_head/2, cols).swapaxes(1, 2).reshape(rows, cols)
        let half = rows / n_head / 2;
        let mut out = vec![0.0; rows * cols];
        for h in 0..n_head {
            for j in 0..half {
                for s in 0..2 {
                    let src = h * 2 * half + s * half + j;
                    let dst = h * 2 * half + j * 2 + s;
                    out[dst * cols..(dst + 1) * cols]
                        .copy_from_slice(&w[src * cols..(src + 1) * cols]);
                }
            }
        }
        out
    }

    #[test]
    fn unpermute_inverts_the_llama_cpp_permute() -> Result<()> {
        for (n_head, head_dim, cols) in [(3, 4, 5), (9, 64, 2), (1, 6, 1)] {
            let rows = n_head * head_dim;
            let hf: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
            let gguf = llama_cpp_permute(&hf, n_head, rows, cols);
            assert_ne!(
                gguf, hf,
                "the permute must move rows for this test to mean anything"
            );
            let t = Tensor::from_vec(gguf, (rows, cols), &Device::Cpu)?;
            let back = unpermute_rope_rows(&t, n_head)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            assert_eq!(back, hf);
            // Biases are 1-D and take the same row map.
            let b: Vec<f32> = (0..rows).map(|x| x as f32).collect();
            let pb = llama_cpp_permute(&b, n_head, rows, 1);
            let t = Tensor::from_vec(pb, rows, &Device::Cpu)?;
            assert_eq!(unpermute_rope_rows(&t, n_head)?.to_vec1::<f32>()?, b);
        }
        Ok(())
    }

    #[test]
    fn unpermute_rejects_odd_heads() {
        let t = Tensor::zeros((6, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(unpermute_rope_rows(&t, 4).is_err());
    }

    #[test]
    fn f32_metadata_rounds_to_its_decimal() {
        assert_eq!(round_f32_decimal(1e-5f32 as f64), 1e-5);
        assert_eq!(round_f32_decimal(100000.0), 100000.0);
        assert_eq!(round_f32_decimal(0.1), 0.1);
    }
}

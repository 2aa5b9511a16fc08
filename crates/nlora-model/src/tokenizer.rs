//! Text <-> token ids for the decoder models, built from a Hugging Face `tokenizer.json`
//! or from the vocabulary stored in a GGUF file.
//!
//! The GGUF path rebuilds the byte-level BPE the way llama.cpp runs it: candle's
//! `TokenizerFromGguf` adds a prefix space (wrong for SmolLM2), and transformers' GGUF
//! loader knows no "smollm" pre-tokenizer and so skips the digit split.
use std::path::{Path, PathBuf};

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;

/// GGUF `tokenizer.ggml.token_type` values (llama.cpp `llama_token_type`).
const TOKEN_TYPE_UNKNOWN: i64 = 2;
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// `tokenizer.ggml.pre` values whose text split is "each digit alone, then GPT-2's regex"
/// (llama.cpp groups these together).
const DIGIT_SPLIT_PRE: &[&str] = &[
    "smollm",
    "starcoder",
    "refact",
    "codeshell",
    "command-r",
    "exaone",
    "minerva",
];
/// `tokenizer.ggml.pre` values that use GPT-2's regex alone.
const GPT2_PRE: &[&str] = &["gpt2", "default", "mpt", "olmo", "jais"];

/// A tokenizer plus the special ids and BOS policy of its model.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    pad_id: Option<u32>,
    add_bos: bool,
    source: PathBuf,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("source", &self.source)
            .field("vocab_size", &self.vocab_size())
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .field("add_bos", &self.add_bos)
            .finish()
    }
}

impl TextTokenizer {
    /// From a Hugging Face model folder (or a `tokenizer.json` path). Special ids come
    /// from `tokenizer_config.json`, then `config.json`; PAD falls back to EOS.
    pub fn from_hf(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let (dir, json) = if path.is_dir() {
            (path.to_path_buf(), path.join("tokenizer.json"))
        } else {
            (
                path.parent().unwrap_or(Path::new(".")).to_path_buf(),
                path.to_path_buf(),
            )
        };
        if !json.is_file() {
            return Err(ModelError::BadFile {
                path: json,
                message: "not found (a Hugging Face model folder needs its tokenizer.json)".into(),
            });
        }
        let inner = Tokenizer::from_file(&json).map_err(|e| ModelError::BadFile {
            path: json.clone(),
            message: format!("cannot read the tokenizer: {e}"),
        })?;
        let tok_config = read_json_opt(&dir.join("tokenizer_config.json"))?;
        let model_config = read_json_opt(&dir.join("config.json"))?;

        let special_id = |token_key: &str, id_key: &str| -> Option<u32> {
            let by_token = tok_config
                .as_ref()
                .and_then(|c| c.get(token_key))
                .and_then(|v| match v {
                    serde_json::Value::String(s) => Some(s.as_str()),
                    serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()),
                    _ => None,
                })
                .and_then(|t| inner.token_to_id(t));
            let by_id = || {
                model_config
                    .as_ref()
                    .and_then(|c| c.get(id_key))
                    .and_then(|v| {
                        // eos_token_id may be a list (several stop tokens): the first is the
                        // one appended to training sequences.
                        v.as_u64()
                            .or_else(|| {
                                v.as_array()
                                    .and_then(|a| a.first())
                                    .and_then(|x| x.as_u64())
                            })
                            .map(|x| x as u32)
                    })
            };
            by_token.or_else(by_id)
        };
        let bos_id = special_id("bos_token", "bos_token_id");
        let eos_id = special_id("eos_token", "eos_token_id");
        let pad_id = special_id("pad_token", "pad_token_id").or(eos_id);
        let add_bos = tok_config
            .as_ref()
            .and_then(|c| c.get("add_bos_token"))
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        Ok(Self {
            inner,
            bos_id,
            eos_id,
            pad_id,
            add_bos,
            source: json,
        })
    }

    /// From the vocabulary and merges of a GGUF file (byte-level BPE, `tokenizer.ggml.model
    /// = "gpt2"`).
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let path = gguf.path().to_path_buf();
        let bad = |field: &str, message: String| ModelError::BadField {
            path: path.clone(),
            field: field.to_string(),
            message,
        };
        let model = gguf.get_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(bad(
                "tokenizer.ggml.model",
                format!(
                    "tokenizer `{model}` is not supported (supported: gpt2, i.e. byte-level BPE)"
                ),
            ));
        }
        let pre = match gguf.metadata().get("tokenizer.ggml.pre") {
            Some(_) => gguf.get_str("tokenizer.ggml.pre")?,
            None => "default",
        };
        let digit_split = if DIGIT_SPLIT_PRE.contains(&pre) {
            true
        } else if GPT2_PRE.contains(&pre) {
            false
        } else {
            return Err(bad(
                "tokenizer.ggml.pre",
                format!(
                    "pre-tokenizer `{pre}` is not supported (supported: {}, {})",
                    DIGIT_SPLIT_PRE.join(", "),
                    GPT2_PRE.join(", ")
                ),
            ));
        };

        let tokens = gguf.get_string_array("tokenizer.ggml.tokens")?;
        let token_types = match gguf.metadata().get("tokenizer.ggml.token_type") {
            Some(_) => gguf.get_int_array("tokenizer.ggml.token_type")?,
            None => vec![1; tokens.len()],
        };
        if token_types.len() != tokens.len() {
            return Err(bad(
                "tokenizer.ggml.token_type",
                format!("{} entries for {} tokens", token_types.len(), tokens.len()),
            ));
        }
        let merges = gguf.get_string_array("tokenizer.ggml.merges")?;

        let byte_chars = bytes_to_unicode();
        let alphabet: std::collections::HashSet<char> = byte_chars.iter().copied().collect();
        // A token outside the byte alphabet is stored as plain text: respell it byte by byte,
        // as transformers does, so it can be matched.
        let spell = |t: &str| -> String {
            if t.chars().all(|c| alphabet.contains(&c)) {
                t.to_string()
            } else {
                t.bytes().map(|b| byte_chars[b as usize]).collect()
            }
        };
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (spell(t), i as u32))
            .collect();
        let merges = merges
            .iter()
            .enumerate()
            .map(|(i, m)| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| {
                        bad(
                            "tokenizer.ggml.merges",
                            format!("merge {i} `{m}` is not two tokens"),
                        )
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| {
                bad(
                    "tokenizer.ggml.merges",
                    format!("cannot build the BPE: {e}"),
                )
            })?;

        let mut inner = Tokenizer::new(bpe);
        let byte_level = ByteLevel::new(false, true, true);
        let pre_tokenizer: PreTokenizerWrapper = if digit_split {
            Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()
        } else {
            byte_level.into()
        };
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        inner.with_decoder(Some(ByteLevelDecoder::default()));

        // Control tokens (`<|im_start|>` ...) must be matched whole, never split by BPE.
        let mut special = Vec::new();
        let mut user = Vec::new();
        for (t, &ty) in tokens.iter().zip(&token_types) {
            let in_alphabet = t.chars().all(|c| alphabet.contains(&c));
            match ty {
                // A control token outside the byte alphabet is a llama.cpp mislabel.
                TOKEN_TYPE_CONTROL | TOKEN_TYPE_UNKNOWN if in_alphabet => {
                    special.push(AddedToken::from(t.to_string(), true).normalized(false))
                }
                TOKEN_TYPE_USER_DEFINED => {
                    user.push(AddedToken::from(t.to_string(), false).normalized(false))
                }
                _ => {}
            }
        }
        let tok_err = |e: tokenizers::Error| {
            bad(
                "tokenizer.ggml.tokens",
                format!("cannot add special tokens: {e}"),
            )
        };
        inner.add_special_tokens(special).map_err(tok_err)?;
        inner.add_tokens(user).map_err(tok_err)?;

        let id = |k: &str| gguf.get_token_id(k);
        let eos_id = id("tokenizer.ggml.eos_token_id")?;
        Ok(Self {
            inner,
            bos_id: id("tokenizer.ggml.bos_token_id")?,
            eos_id,
            pad_id: id("tokenizer.ggml.padding_token_id")?.or(eos_id),
            // llama.cpp adds no BOS for a byte-level vocabulary that does not ask for it.
            add_bos: gguf
                .get_bool("tokenizer.ggml.add_bos_token")?
                .unwrap_or(false),
            source: path,
        })
    }

    /// Opens the GGUF at `path` and builds its tokenizer.
    pub fn from_gguf_path(path: impl AsRef<Path>) -> Result<Self> {
        Self::from_gguf(&GgufFile::open(path)?)
    }

    /// From a `.gguf` file or a Hugging Face folder / tokenizer.json.
    pub fn from_path(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        {
            Self::from_gguf_path(path)
        } else {
            Self::from_hf(path)
        }
    }

    /// Token ids of `text`, with BOS in front when the model asks for it. Special tokens
    /// written in the text (`<|im_start|>`) map to their ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, true).map_err(|e| {
            ModelError::Tokenizer(format!("{}: cannot encode: {e}", self.source.display()))
        })?;
        let mut ids = enc.get_ids().to_vec();
        if self.add_bos {
            if let Some(bos) = self.bos_id {
                // A tokenizer.json post-processor may already have put it there.
                if ids.first() != Some(&bos) {
                    ids.insert(0, bos);
                }
            }
        }
        Ok(ids)
    }

    /// Token ids of `text` exactly, never with BOS (labels, continuations).
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| {
            ModelError::Tokenizer(format!("{}: cannot encode: {e}", self.source.display()))
        })?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn encode_batch(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>> {
        texts.iter().map(|t| self.encode(t)).collect()
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner.decode(ids, skip_special_tokens).map_err(|e| {
            ModelError::Tokenizer(format!("{}: cannot decode: {e}", self.source.display()))
        })
    }

    pub fn decode_batch(
        &self,
        batch: &[Vec<u32>],
        skip_special_tokens: bool,
    ) -> Result<Vec<String>> {
        batch
            .iter()
            .map(|ids| self.decode(ids, skip_special_tokens))
            .collect()
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }
    pub fn pad_id(&self) -> Option<u32> {
        self.pad_id
    }
    /// Whether [`encode`](Self::encode) puts BOS in front.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }
    pub fn set_add_bos(&mut self, add_bos: bool) {
        self.add_bos = add_bos;
    }
    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }
    /// The file it was built from.
    pub fn source(&self) -> &Path {
        &self.source
    }
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// Writes the tokenizer as a Hugging Face `tokenizer.json` (atomically: temp + rename).
    pub fn save_tokenizer_json(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let text = self
            .inner
            .to_string(false)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let tmp = path.with_extension("json.tmp");
        let io = |source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        };
        std::fs::write(&tmp, text).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }
}

fn read_json_opt(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| ModelError::BadFile {
            path: path.to_path_buf(),
            message: format!("invalid JSON: {e}"),
        })
}

/// GPT-2's byte -> printable character table (byte-level BPE spelling).
fn bytes_to_unicode() -> Vec<char> {
    let printable = |b: u8| {
        (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
    };
    let mut next = 256u32;
    (0..=255u8)
        .map(|b| {
            if printable(b) {
                char::from(b)
            } else {
                let c = char::from_u32(next).expect("below the surrogate range");
                next += 1;
                c
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_matches_gpt2() {
        let t = bytes_to_unicode();
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        assert_eq!(t[b'A' as usize], 'A');
        assert_eq!(t[0], 'Ā');
        let set: std::collections::HashSet<char> = t.iter().copied().collect();
        assert_eq!(set, ByteLevel::alphabet().into_iter().collect());
    }
}

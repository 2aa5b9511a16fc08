//! T5 / T5 v1.1 / Flan-T5 encoder-decoder written for training with LoRA
//! adapters, mirroring transformers' `modeling_t5.py` (Raffel et al., 2020,
//! "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
//! Transformer").
//!
//! What sets T5 apart from a LLaMA-style decoder, all reproduced here:
//! - pre-norm blocks with T5's layer norm (RMS, no mean, no bias);
//! - no positional embeddings: a learned relative-position bias added to the
//!   attention scores, bidirectional buckets in the encoder and causal ones in
//!   the decoder; only the first block of each stack owns the bias table and
//!   every block of that stack reuses it; none in the cross-attention;
//! - attention scores are not scaled by 1/sqrt(d_kv);
//! - v1.0: ReLU feed-forward `wi`/`wo`, lm_head tied to the shared embedding
//!   and the decoder output multiplied by `d_model^-0.5` before it;
//!   v1.1 / Flan-T5: gated-GELU (tanh approximation) `wi_0`/`wi_1`/`wo`, own
//!   lm_head, no rescale.
//!
//! Every linear layer is an [`AdapterSite`] in one [`AdapterSites`], under its
//! PEFT module path (`encoder.block.0.layer.0.SelfAttention.q`,
//! `decoder.block.1.layer.1.EncDecAttention.v`, `lm_head`), so the
//! frozen-weight linear op applies everywhere and adapters go where a
//! [`LoraConfig`](nlora_adapter::LoraConfig) targets. The training path uses
//! differentiable compositions only (layer norm, softmax, GELU); inference uses
//! candle's fused kernels, which have no backward.
use std::cell::Cell;
use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, D};
use nlora_adapter::{AdapterSite, AdapterSites, ForwardMode, SiteId};

use super::config::{Activation, T5Config};
use crate::error::{ModelError, Result};

/// `target_modules` of the reference setup: q and v of every self- and
/// cross-attention, in encoder and decoder (PEFT's default for T5).
pub const DEFAULT_TARGET_MODULES: &[&str] = &["q", "v"];

/// T5's layer norm: `x / sqrt(mean(x^2) + eps) * w`, no mean, no bias.
#[derive(Debug, Clone)]
struct T5LayerNorm {
    weight: Tensor,
    eps: f64,
}

impl T5LayerNorm {
    fn forward(&self, x: &Tensor, mode: ForwardMode) -> Result<Tensor> {
        // candle's fused kernel: no backward, and F32/F16/BF16 only
        if !mode.tracks_gradients() && x.dtype() == DType::F32 {
            return Ok(candle_nn::ops::rms_norm(x, &self.weight, self.eps as f32)?);
        }
        let inv_rms = (x.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?
            .sqrt()?
            .recip()?;
        Ok(x.broadcast_mul(&inv_rms)?.broadcast_mul(&self.weight)?)
    }
}

fn activate(x: &Tensor, act: Activation, mode: ForwardMode) -> Result<Tensor> {
    let train = mode.tracks_gradients();
    Ok(match act {
        Activation::Relu => x.relu()?,
        Activation::Silu => x.silu()?,
        Activation::GeluTanh if !train => x.gelu()?,
        Activation::GeluErf if !train => x.gelu_erf()?,
        // candle's fused GELU backward uses 6-digit constants: compose instead.
        Activation::GeluTanh => {
            let c = (2.0 / std::f64::consts::PI).sqrt();
            let inner = ((x + (x.powf(3.0)? * 0.044715)?)? * c)?;
            ((x * 0.5)? * (inner.tanh()? + 1.0)?)?
        }
        Activation::GeluErf => {
            let e = (x * std::f64::consts::FRAC_1_SQRT_2)?.erf()?;
            ((x * 0.5)? * (e + 1.0)?)?
        }
    })
}

/// The model's own dropout layers during one training forward pass: inverted
/// dropout whose masks come from the step's seed and the call's index, so a
/// step is reproducible. Inactive without a seed (inference, gradient checks).
pub(crate) struct Dropout {
    rate: f64,
    seed: Option<u64>,
    calls: Cell<u64>,
}

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

fn splitmix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Dropout {
    pub(crate) fn new(rate: f64, mode: ForwardMode) -> Self {
        let seed = match mode {
            ForwardMode::Train {
                dropout_seed: Some(s),
            } if rate > 0.0 => Some(s),
            _ => None,
        };
        Self {
            rate,
            seed,
            calls: Cell::new(0),
        }
    }

    pub(crate) fn inactive() -> Self {
        Self::new(0.0, ForwardMode::Inference)
    }

    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let Some(seed) = self.seed else {
            return Ok(x.clone());
        };
        let call = self.calls.get();
        self.calls.set(call + 1);
        // a stream apart from the adapter sites' dropout streams
        let mut state =
            splitmix(seed ^ 0x5435_2D64_726F_706F ^ call.wrapping_add(1).wrapping_mul(GOLDEN));
        let keep = (1.0 / (1.0 - self.rate)) as f32;
        let p = self.rate;
        let mask: Vec<f32> = (0..x.elem_count())
            .map(|_| {
                state = state.wrapping_add(GOLDEN);
                let u = (splitmix(state) >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
                if u < p {
                    0.0
                } else {
                    keep
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        Ok(x.mul(&mask)?)
    }
}

/// transformers' `T5Attention._relative_position_bucket` for one relative
/// position (memory position - query position). The logarithmic part is
/// computed in f32 like transformers, so the bucket edges fall the same way.
pub fn relative_position_bucket(
    relative_position: i64,
    bidirectional: bool,
    num_buckets: usize,
    max_distance: usize,
) -> usize {
    let mut num_buckets = num_buckets as i64;
    let mut bucket = 0i64;
    let distance = if bidirectional {
        num_buckets /= 2;
        if relative_position > 0 {
            bucket += num_buckets;
        }
        relative_position.abs()
    } else {
        -relative_position.min(0)
    };
    let max_exact = num_buckets / 2;
    if distance < max_exact {
        return (bucket + distance) as usize;
    }
    let log_ratio = (distance as f32 / max_exact as f32).ln();
    let log_range = (max_distance as f64 / max_exact as f64).ln() as f32;
    let large = max_exact + (log_ratio / log_range * (num_buckets - max_exact) as f32) as i64;
    (bucket + large.min(num_buckets - 1)) as usize
}

#[derive(Debug, Clone)]
struct Attention {
    q: SiteId,
    k: SiteId,
    v: SiteId,
    o: SiteId,
    num_heads: usize,
    d_kv: usize,
}

impl Attention {
    /// `x (b, s, d_model)` through `site`, split into heads `(b, heads, s, d_kv)`.
    fn heads(
        &self,
        sites: &AdapterSites,
        site: SiteId,
        x: &Tensor,
        mode: ForwardMode,
    ) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        Ok(sites
            .forward(site, x, mode)?
            .reshape((b, s, self.num_heads, self.d_kv))?
            .transpose(1, 2)?
            .contiguous()?)
    }

    /// Keys and values of `x`, each `(b, heads, s, d_kv)`.
    fn key_values(
        &self,
        sites: &AdapterSites,
        x: &Tensor,
        mode: ForwardMode,
    ) -> Result<(Tensor, Tensor)> {
        Ok((
            self.heads(sites, self.k, x, mode)?,
            self.heads(sites, self.v, x, mode)?,
        ))
    }

    /// Queries from `x (b, t, d_model)` attend to `k`, `v` with the additive
    /// `bias` (position bias + mask, broadcastable to `(b, heads, t, T)`).
    /// No 1/sqrt(d_kv) scaling: T5 folds it into the initialisation.
    fn attend(
        &self,
        sites: &AdapterSites,
        x: &Tensor,
        (k, v): (&Tensor, &Tensor),
        bias: &Tensor,
        mode: ForwardMode,
        dropout: &Dropout,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let q = self.heads(sites, self.q, x, mode)?;
        let scores = q.matmul(&k.t()?)?.broadcast_add(bias)?;
        let probs = match mode {
            ForwardMode::Inference => candle_nn::ops::softmax_last_dim(&scores)?,
            ForwardMode::Train { .. } => candle_nn::ops::softmax(&scores, D::Minus1)?,
        };
        let probs = dropout.apply(&probs)?;
        let out = probs
            .matmul(v)?
            .transpose(1, 2)?
            .reshape((b, t, self.num_heads * self.d_kv))?;
        Ok(sites.forward(self.o, &out, mode)?)
    }
}

#[derive(Debug, Clone)]
enum FeedForwardKind {
    /// T5 v1.0: `wo(act(wi x))`.
    Dense { wi: SiteId },
    /// T5 v1.1: `wo(act(wi_0 x) * wi_1 x)`.
    Gated { wi_0: SiteId, wi_1: SiteId },
}

#[derive(Debug, Clone)]
struct FeedForward {
    kind: FeedForwardKind,
    wo: SiteId,
    act: Activation,
}

impl FeedForward {
    fn forward(
        &self,
        sites: &AdapterSites,
        x: &Tensor,
        mode: ForwardMode,
        dropout: &Dropout,
    ) -> Result<Tensor> {
        let h = match &self.kind {
            FeedForwardKind::Dense { wi } => {
                activate(&sites.forward(*wi, x, mode)?, self.act, mode)?
            }
            FeedForwardKind::Gated { wi_0, wi_1 } => {
                let gate = activate(&sites.forward(*wi_0, x, mode)?, self.act, mode)?;
                (gate * sites.forward(*wi_1, x, mode)?)?
            }
        };
        Ok(sites.forward(self.wo, &dropout.apply(&h)?, mode)?)
    }
}

#[derive(Debug, Clone)]
struct Block {
    self_norm: T5LayerNorm,
    self_attn: Attention,
    /// Decoder blocks only: `layer.1`, `EncDecAttention`.
    cross: Option<(T5LayerNorm, Attention)>,
    ff_norm: T5LayerNorm,
    ff: FeedForward,
}

#[derive(Debug, Clone)]
struct Stack {
    blocks: Vec<Block>,
    final_norm: T5LayerNorm,
    /// `(num_buckets, num_heads)`, owned by block 0 and shared by all blocks.
    relative_attention_bias: Tensor,
    bidirectional: bool,
}

impl Stack {
    /// Relative position bias `(1, heads, q_len, k_len)` for queries at
    /// positions `past..past + q_len` and keys at `0..k_len`.
    fn position_bias(
        &self,
        q_len: usize,
        k_len: usize,
        past: usize,
        config: &T5Config,
    ) -> Result<Tensor> {
        let mut idx = Vec::with_capacity(q_len * k_len);
        for i in 0..q_len {
            for j in 0..k_len {
                let rel = j as i64 - (i + past) as i64;
                idx.push(relative_position_bucket(
                    rel,
                    self.bidirectional,
                    config.relative_attention_num_buckets,
                    config.relative_attention_max_distance,
                ) as u32);
            }
        }
        let table = &self.relative_attention_bias;
        let idx = Tensor::from_vec(idx, q_len * k_len, table.device())?;
        Ok(table
            .index_select(&idx, 0)?
            .reshape((q_len, k_len, config.num_heads))?
            .permute((2, 0, 1))?
            .unsqueeze(0)?
            .contiguous()?)
    }
}

/// The encoder's output and its padding, as the decoder's cross-attention reads them.
#[derive(Debug, Clone)]
pub(crate) struct EncoderState {
    /// `(b, s, d_model)`
    pub(crate) hidden: Tensor,
    /// `(b, 1, 1, s)` additive: 0 for real tokens, the dtype's minimum for padding.
    pub(crate) mask_bias: Tensor,
}

impl EncoderState {
    /// Row `0` repeated `n` times (one prompt, several candidate targets).
    pub(crate) fn repeat_first(&self, n: usize) -> Result<Self> {
        let (_, s, d) = self.hidden.dims3()?;
        Ok(Self {
            hidden: self
                .hidden
                .narrow(0, 0, 1)?
                .broadcast_as((n, s, d))?
                .contiguous()?,
            mask_bias: self
                .mask_bias
                .narrow(0, 0, 1)?
                .broadcast_as((n, 1, 1, s))?
                .contiguous()?,
        })
    }
}

/// Decoder keys/values kept across generation steps: self-attention grows by
/// one position per step; cross-attention's are computed once.
pub(crate) struct DecoderCache {
    self_kv: Vec<Option<(Tensor, Tensor)>>,
    cross_kv: Vec<(Tensor, Tensor)>,
    past: usize,
}

/// The T5 encoder-decoder with adapter sites on every linear layer.
#[derive(Debug, Clone)]
pub struct T5 {
    config: T5Config,
    /// `(vocab, d_model)`, the embedding of encoder and decoder.
    shared: Tensor,
    encoder: Stack,
    decoder: Stack,
    lm_head: SiteId,
    scale_decoder_outputs: bool,
    dropout_rate: f64,
    sites: AdapterSites,
    device: Device,
    dtype: DType,
}

/// Takes HF-named tensors out of a map, checking presence and shape.
struct WeightSource {
    tensors: HashMap<String, Tensor>,
    dtype: DType,
    device: Device,
}

impl WeightSource {
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self
            .tensors
            .remove(name)
            .ok_or_else(|| ModelError::Tensor {
                name: name.into(),
                message: "missing from the checkpoint".into(),
            })?;
        self.fit(name, t, shape)
    }

    fn fit(&self, name: &str, t: Tensor, shape: &[usize]) -> Result<Tensor> {
        if t.dims() != shape {
            return Err(ModelError::Tensor {
                name: name.into(),
                message: format!("has shape {:?}, the config implies {shape:?}", t.dims()),
            });
        }
        Ok(t.to_device(&self.device)?.to_dtype(self.dtype)?)
    }
}

use crate::config_io::mask_value;

impl T5 {
    /// Builds the model from Hugging Face-named tensors (`shared.weight`,
    /// `encoder.block.0.layer.0.SelfAttention.q.weight`, ...) converted to
    /// `dtype` (F32, or F64 for numerical checks) on `device`. No adapter is
    /// attached; see [`AdapterSites::init_new_adapters`] with
    /// [`DEFAULT_TARGET_MODULES`].
    pub fn from_tensors(
        config: T5Config,
        tensors: HashMap<String, Tensor>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        config.validate().map_err(|(field, message)| {
            ModelError::Unsupported(format!("T5 config field `{field}`: {message}"))
        })?;
        if !matches!(dtype, DType::F32 | DType::F64) {
            return Err(ModelError::Unsupported(format!(
                "model dtype {dtype:?}: weights are computed in F32 (or F64 for checks)"
            )));
        }
        let (gated, act) = config.feed_forward().map_err(|(field, message)| {
            ModelError::Unsupported(format!("T5 config field `{field}`: {message}"))
        })?;
        let c = &config;
        let (d, inner, d_ff, vocab) = (c.d_model, c.inner_dim(), c.d_ff, c.vocab_size);
        let mut w = WeightSource {
            tensors,
            dtype,
            device: device.clone(),
        };
        let mut sites = AdapterSites::new();
        let mut site =
            |w: &mut WeightSource, path: String, out_f: usize, in_f: usize| -> Result<SiteId> {
                let weight = w.take(&format!("{path}.weight"), &[out_f, in_f])?;
                sites
                    .insert(path, AdapterSite::new(weight, None)?)
                    .map_err(|e| ModelError::Unsupported(e.to_string()))
            };

        // One embedding for both stacks; old checkpoints also carry copies.
        let shared_name = if !w.tensors.contains_key("shared.weight")
            && w.tensors.contains_key("encoder.embed_tokens.weight")
        {
            "encoder.embed_tokens.weight"
        } else {
            "shared.weight"
        };
        let shared = w.take(shared_name, &[vocab, d])?;
        for copy in ["encoder.embed_tokens.weight", "decoder.embed_tokens.weight"] {
            if let Some(t) = w.tensors.remove(copy) {
                let t = w.fit(copy, t, &[vocab, d])?;
                let diff = (&t - &shared)?
                    .abs()?
                    .max_all()?
                    .to_dtype(DType::F64)?
                    .to_scalar::<f64>()?;
                if diff != 0.0 {
                    return Err(ModelError::Tensor {
                        name: copy.into(),
                        message: format!(
                            "differs from shared.weight (max abs difference {diff:e}); T5 uses one shared embedding"
                        ),
                    });
                }
            }
        }

        let norm = |w: &mut WeightSource, name: String| -> Result<T5LayerNorm> {
            Ok(T5LayerNorm {
                weight: w.take(&name, &[d])?,
                eps: c.layer_norm_epsilon,
            })
        };
        let mut stacks = Vec::with_capacity(2);
        for (stack, n_blocks) in [("encoder", c.num_layers), ("decoder", c.decoder_layers())] {
            let is_decoder = stack == "decoder";
            let relative_attention_bias = w.take(
                &format!("{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
                &[c.relative_attention_num_buckets, c.num_heads],
            )?;
            let mut blocks = Vec::with_capacity(n_blocks);
            for i in 0..n_blocks {
                let p = format!("{stack}.block.{i}");
                let mut attention = |w: &mut WeightSource, path: String| -> Result<Attention> {
                    Ok(Attention {
                        q: site(w, format!("{path}.q"), inner, d)?,
                        k: site(w, format!("{path}.k"), inner, d)?,
                        v: site(w, format!("{path}.v"), inner, d)?,
                        o: site(w, format!("{path}.o"), d, inner)?,
                        num_heads: c.num_heads,
                        d_kv: c.d_kv,
                    })
                };
                let self_attn = attention(&mut w, format!("{p}.layer.0.SelfAttention"))?;
                let self_norm = norm(&mut w, format!("{p}.layer.0.layer_norm.weight"))?;
                let cross = if is_decoder {
                    let a = attention(&mut w, format!("{p}.layer.1.EncDecAttention"))?;
                    Some((norm(&mut w, format!("{p}.layer.1.layer_norm.weight"))?, a))
                } else {
                    None
                };
                let ff_layer = if is_decoder { 2 } else { 1 };
                let ffp = format!("{p}.layer.{ff_layer}.DenseReluDense");
                let kind = if gated {
                    FeedForwardKind::Gated {
                        wi_0: site(&mut w, format!("{ffp}.wi_0"), d_ff, d)?,
                        wi_1: site(&mut w, format!("{ffp}.wi_1"), d_ff, d)?,
                    }
                } else {
                    FeedForwardKind::Dense {
                        wi: site(&mut w, format!("{ffp}.wi"), d_ff, d)?,
                    }
                };
                let ff = FeedForward {
                    kind,
                    wo: site(&mut w, format!("{ffp}.wo"), d, d_ff)?,
                    act,
                };
                let ff_norm = norm(&mut w, format!("{p}.layer.{ff_layer}.layer_norm.weight"))?;
                blocks.push(Block {
                    self_norm,
                    self_attn,
                    cross,
                    ff_norm,
                    ff,
                });
            }
            stacks.push(Stack {
                blocks,
                final_norm: norm(&mut w, format!("{stack}.final_layer_norm.weight"))?,
                relative_attention_bias,
                bidirectional: !is_decoder,
            });
        }
        let decoder = stacks.pop().expect("two stacks");
        let encoder = stacks.pop().expect("two stacks");

        // A checkpoint's own lm_head wins (transformers 5 unties when both are
        // present and differ); without one, v1.0 ties it to the embedding.
        let lm_head = if w.tensors.contains_key("lm_head.weight") || !c.ties_word_embeddings() {
            site(&mut w, "lm_head".into(), vocab, d)?
        } else {
            sites
                .insert("lm_head", AdapterSite::new(shared.clone(), None)?)
                .map_err(|e| ModelError::Unsupported(e.to_string()))?
        };
        // Some checkpoints keep a bias table transformers never uses.
        w.tensors
            .remove("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight");
        if let Some(name) = w.tensors.keys().min() {
            return Err(ModelError::Tensor {
                name: name.clone(),
                message: "is not part of a T5 model with this config; refusing to ignore it".into(),
            });
        }
        Ok(Self {
            scale_decoder_outputs: config.scales_decoder_outputs(),
            dropout_rate: config.dropout_rate,
            config,
            shared,
            encoder,
            decoder,
            lm_head,
            sites,
            device: device.clone(),
            dtype,
        })
    }

    pub fn config(&self) -> &T5Config {
        &self.config
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Dropout of the model's own layers in training steps that pass a
    /// dropout seed (transformers' `dropout_rate`, 0.1 in the published
    /// configs). 0 turns it off; LoRA's own dropout is separate.
    pub fn dropout_rate(&self) -> f64 {
        self.dropout_rate
    }
    pub fn set_dropout_rate(&mut self, rate: f64) -> Result<()> {
        if !(0.0..1.0).contains(&rate) {
            return Err(ModelError::Unsupported(format!(
                "dropout rate {rate} is not in [0, 1)"
            )));
        }
        self.dropout_rate = rate;
        Ok(())
    }

    pub(crate) fn sites(&self) -> &AdapterSites {
        &self.sites
    }
    pub(crate) fn sites_mut(&mut self) -> &mut AdapterSites {
        &mut self.sites
    }
    pub(crate) fn device_ref(&self) -> &Device {
        &self.device
    }

    pub(crate) fn new_dropout(&self, mode: ForwardMode) -> Dropout {
        Dropout::new(self.dropout_rate, mode)
    }

    /// Embeddings of `ids (b, s)`, checking that every id is in the vocabulary.
    fn embed(&self, ids: &Tensor, name: &str) -> Result<Tensor> {
        let (b, s) = ids.dims2()?;
        if b * s > 0 {
            let max = ids.flatten_all()?.max(0)?.to_scalar::<u32>()?;
            if max as usize >= self.config.vocab_size {
                return Err(ModelError::Tensor {
                    name: name.into(),
                    message: format!(
                        "token id {max} is outside the vocabulary (0..{})",
                        self.config.vocab_size
                    ),
                });
            }
        }
        Ok(self.shared.index_select(&ids.flatten_all()?, 0)?.reshape((
            b,
            s,
            self.config.d_model,
        ))?)
    }

    /// Additive key-padding mask `(b, 1, 1, s)` from `key_mask` rows (true = token).
    fn padding_bias(&self, key_mask: &[Vec<bool>]) -> Result<Tensor> {
        let b = key_mask.len();
        let s = key_mask.first().map_or(0, Vec::len);
        let neg = mask_value(self.dtype);
        let m: Vec<f64> = key_mask
            .iter()
            .flat_map(|row| row.iter().map(|&real| if real { 0.0 } else { neg }))
            .collect();
        Ok(Tensor::from_vec(m, (b, 1, 1, s), &self.device)?.to_dtype(self.dtype)?)
    }

    /// Runs the encoder over `input_ids (b, s)` with `key_mask` rows (true = token).
    pub(crate) fn encode(
        &self,
        input_ids: &Tensor,
        key_mask: &[Vec<bool>],
        mode: ForwardMode,
        dropout: &Dropout,
    ) -> Result<EncoderState> {
        let (b, s) = input_ids.dims2()?;
        if key_mask.len() != b || key_mask.iter().any(|r| r.len() != s) {
            return Err(ModelError::Tensor {
                name: "attention_mask".into(),
                message: format!("does not match input_ids ({b}, {s})"),
            });
        }
        if let Some(r) = key_mask.iter().position(|row| !row.iter().any(|&m| m)) {
            return Err(ModelError::Tensor {
                name: "attention_mask".into(),
                message: format!("row {r} has no token: the encoder needs at least one per row"),
            });
        }
        let mask_bias = self.padding_bias(key_mask)?;
        let bias = self
            .encoder
            .position_bias(s, s, 0, &self.config)?
            .broadcast_add(&mask_bias)?;
        let mut x = dropout.apply(&self.embed(input_ids, "input_ids")?)?;
        for blk in &self.encoder.blocks {
            let h = blk.self_norm.forward(&x, mode)?;
            let (k, v) = blk.self_attn.key_values(&self.sites, &h, mode)?;
            let a = blk
                .self_attn
                .attend(&self.sites, &h, (&k, &v), &bias, mode, dropout)?;
            x = (x + dropout.apply(&a)?)?;
            let h = blk.ff_norm.forward(&x, mode)?;
            x = (x + dropout.apply(&blk.ff.forward(&self.sites, &h, mode, dropout)?)?)?;
        }
        let hidden = dropout.apply(&self.encoder.final_norm.forward(&x, mode)?)?;
        Ok(EncoderState { hidden, mask_bias })
    }

    /// A cache holding the cross-attention keys/values of `enc`, computed once.
    pub(crate) fn new_cache(&self, enc: &EncoderState) -> Result<DecoderCache> {
        let mode = ForwardMode::Inference;
        let cross_kv = self
            .decoder
            .blocks
            .iter()
            .map(|blk| {
                let (_, attn) = blk
                    .cross
                    .as_ref()
                    .expect("decoder blocks have cross-attention");
                attn.key_values(&self.sites, &enc.hidden, mode)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(DecoderCache {
            self_kv: vec![None; self.decoder.blocks.len()],
            cross_kv,
            past: 0,
        })
    }

    /// Decoder hidden states `(b, t, d_model)` for `decoder_ids (b, t)`
    /// (teacher forcing without a cache; one step at a time with one).
    pub(crate) fn decode(
        &self,
        decoder_ids: &Tensor,
        enc: &EncoderState,
        mut cache: Option<&mut DecoderCache>,
        mode: ForwardMode,
        dropout: &Dropout,
    ) -> Result<Tensor> {
        let (_, t) = decoder_ids.dims2()?;
        let past = cache.as_ref().map_or(0, |c| c.past);
        let total = past + t;
        let neg = mask_value(self.dtype);
        let causal: Vec<f64> = (0..t)
            .flat_map(|i| (0..total).map(move |j| if j <= past + i { 0.0 } else { neg }))
            .collect();
        let causal =
            Tensor::from_vec(causal, (1, 1, t, total), &self.device)?.to_dtype(self.dtype)?;
        let self_bias = self
            .decoder
            .position_bias(t, total, past, &self.config)?
            .broadcast_add(&causal)?;
        let mut x = dropout.apply(&self.embed(decoder_ids, "decoder_input_ids")?)?;
        for (i, blk) in self.decoder.blocks.iter().enumerate() {
            let h = blk.self_norm.forward(&x, mode)?;
            let (mut k, mut v) = blk.self_attn.key_values(&self.sites, &h, mode)?;
            if let Some(c) = cache.as_deref_mut() {
                if let Some((pk, pv)) = &c.self_kv[i] {
                    k = Tensor::cat(&[pk, &k], 2)?.contiguous()?;
                    v = Tensor::cat(&[pv, &v], 2)?.contiguous()?;
                }
                c.self_kv[i] = Some((k.clone(), v.clone()));
            }
            let a = blk
                .self_attn
                .attend(&self.sites, &h, (&k, &v), &self_bias, mode, dropout)?;
            x = (x + dropout.apply(&a)?)?;

            let (cross_norm, cross) = blk
                .cross
                .as_ref()
                .expect("decoder blocks have cross-attention");
            let h = cross_norm.forward(&x, mode)?;
            let a = match cache.as_deref() {
                Some(c) => {
                    let (ck, cv) = &c.cross_kv[i];
                    cross.attend(&self.sites, &h, (ck, cv), &enc.mask_bias, mode, dropout)?
                }
                None => {
                    let (ck, cv) = cross.key_values(&self.sites, &enc.hidden, mode)?;
                    cross.attend(&self.sites, &h, (&ck, &cv), &enc.mask_bias, mode, dropout)?
                }
            };
            x = (x + dropout.apply(&a)?)?;

            let h = blk.ff_norm.forward(&x, mode)?;
            x = (x + dropout.apply(&blk.ff.forward(&self.sites, &h, mode, dropout)?)?)?;
        }
        if let Some(c) = cache {
            c.past = total;
        }
        dropout.apply(&self.decoder.final_norm.forward(&x, mode)?)
    }

    /// Logits from decoder hidden states (any leading shape), with v1.0's
    /// `d_model^-0.5` rescale before the tied lm_head.
    pub(crate) fn lm_logits(&self, h: &Tensor, mode: ForwardMode) -> Result<Tensor> {
        let h = if self.scale_decoder_outputs {
            (h * (self.config.d_model as f64).powf(-0.5))?
        } else {
            h.clone()
        };
        Ok(self.sites.forward(self.lm_head, &h, mode)?)
    }
}

//! LLaMA-family decoder (LLaMA 2/3, SmolLM2, Qwen2-style q/k/v biases)
//! written for training with LoRA adapters, mirroring transformers'
//! `modeling_llama.py` (and candle-transformers' `llama.rs` for the layout).
//!
//! Every linear layer is an [`AdapterSite`] held in one [`AdapterSites`], so
//! the frozen-weight linear op (no gradient for W0) applies everywhere and an
//! adapter can go on any of them. The training path uses only differentiable
//! compositions (RMSNorm, rotate-half RoPE, softmax); inference may use
//! candle's fused kernels, which have no backward.
use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, D};
use nlora_adapter::{use_fused, AdapterSite, AdapterSites, ForwardMode, SiteId};

use super::{fused, LlamaConfig};
use crate::error::{ModelError, Result};
use crate::lm::{GenerateOptions, LabelLogits, LanguageModel, LmBatch, IGNORE_INDEX};

/// Root-mean-square layer norm: `x / sqrt(mean(x^2) + eps) * w`.
#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn forward(&self, x: &Tensor, mode: ForwardMode) -> Result<Tensor> {
        if use_fused(x) {
            return Ok(fused::rms_norm(x, &self.weight, self.eps)?);
        }
        // candle's fused kernel has no backward, and no F64 version
        if mode == ForwardMode::Inference && x.dtype() != DType::F64 {
            return Ok(candle_nn::ops::rms_norm(x, &self.weight, self.eps as f32)?);
        }
        // bf16 is normalised in f32, as transformers does
        let dtype = x.dtype();
        let x = x.to_dtype(compute_dtype(dtype))?;
        let inv_rms = (x.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?
            .sqrt()?
            .recip()?;
        let normed = x.broadcast_mul(&inv_rms)?.to_dtype(dtype)?;
        Ok(normed.broadcast_mul(&self.weight)?)
    }
}

/// cos/sin of the rotary angles for given positions.
struct Rope {
    /// `(b, s, head_dim / 2)`
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// Angles `pos * theta^(-2i/d)` computed in f32 like transformers.
    fn new(
        positions: &[Vec<u32>],
        head_dim: usize,
        theta: f64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let half = head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
            .collect();
        let (b, s) = (positions.len(), positions.first().map_or(0, Vec::len));
        let mut cos = Vec::with_capacity(b * s * half);
        let mut sin = Vec::with_capacity(b * s * half);
        for row in positions {
            for &p in row {
                for &f in &inv_freq {
                    let a = p as f32 * f;
                    cos.push(a.cos());
                    sin.push(a.sin());
                }
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (b, s, half), device)?.to_dtype(dtype)?,
            sin: Tensor::from_vec(sin, (b, s, half), device)?.to_dtype(dtype)?,
        })
    }

    /// `x (b, s, n, d)` (a projection's output split into heads) rotated
    /// and laid out `(b, n, s, d)`; HF rotate-half convention (pairs `(i, i + d/2)`).
    fn to_heads(&self, x: &Tensor, mode: ForwardMode) -> Result<Tensor> {
        if use_fused(x) {
            return Ok(fused::rope_to_heads(x, &self.cos, &self.sin)?);
        }
        let x = x.transpose(1, 2)?.contiguous()?;
        if mode == ForwardMode::Inference {
            return Ok(candle_nn::rotary_emb::rope(&x, &self.cos, &self.sin)?);
        }
        let cos = Tensor::cat(&[&self.cos, &self.cos], D::Minus1)?.unsqueeze(1)?;
        let sin = Tensor::cat(&[&self.sin, &self.sin], D::Minus1)?.unsqueeze(1)?;
        let d = x.dim(D::Minus1)?;
        let x1 = x.narrow(D::Minus1, 0, d / 2)?;
        let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        Ok((x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?)
    }
}

/// Keys and values seen so far, per layer, `(b, kv_heads, t, head_dim)`.
#[derive(Debug, Clone, Default)]
struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
        }
    }
    /// The cache of one sequence repeated for `b` rows.
    fn repeat_rows(&mut self, b: usize) -> Result<()> {
        for (k, v) in self.layers.iter_mut().flatten() {
            *k = k.repeat((b, 1, 1, 1))?;
            *v = v.repeat((b, 1, 1, 1))?;
        }
        Ok(())
    }

    /// Number of cached positions.
    fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |(k, _)| k.dims()[2])
    }
}

#[derive(Debug, Clone)]
struct Attention {
    q_proj: SiteId,
    k_proj: SiteId,
    v_proj: SiteId,
    o_proj: SiteId,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    /// `x (b, s, hidden)`, `mask (b, 1, s, t)` additive over all `t` keys (cached + new).
    fn forward(
        &self,
        sites: &AdapterSites,
        x: &Tensor,
        rope: &Rope,
        mask: &Tensor,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        mode: ForwardMode,
    ) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let q = sites
            .forward(self.q_proj, x, mode)?
            .reshape((b, s, nh, hd))?;
        let q = rope.to_heads(&q, mode)?;
        let k = sites
            .forward(self.k_proj, x, mode)?
            .reshape((b, s, nkv, hd))?;
        let mut k = rope.to_heads(&k, mode)?;
        let mut v = sites
            .forward(self.v_proj, x, mode)?
            .reshape((b, s, nkv, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        if let Some(slot) = cache {
            if let Some((pk, pv)) = slot.as_ref() {
                k = Tensor::cat(&[pk, &k], 2)?.contiguous()?;
                v = Tensor::cat(&[pv, &v], 2)?.contiguous()?;
            }
            *slot = Some((k.clone(), v.clone()));
        }
        let scale = 1.0 / (hd as f64).sqrt();
        if use_fused(&q) {
            let out = fused::attention(&q, &k, &v, mask, scale)?;
            return Ok(sites.forward(self.o_proj, &out, mode)?);
        }
        let t = k.dim(2)?;
        // Grouped-query attention without copying K/V: the n_rep query heads
        // sharing a kv head (heads j*n_rep .. (j+1)*n_rep, as transformers'
        // repeat_kv) are stacked along the sequence axis.
        let n_rep = nh / nkv;
        let q = q.reshape((b, nkv, n_rep * s, hd))?;
        // scores and softmax in f32 (the mask is f32) also on a bf16 model
        let scores = (q.matmul(&k.t()?)? * scale)?
            .reshape((b, nh, s, t))?
            .to_dtype(mask.dtype())?
            .broadcast_add(mask)?;
        let probs = match mode {
            ForwardMode::Inference => candle_nn::ops::softmax_last_dim(&scores)?,
            ForwardMode::Train { .. } => candle_nn::ops::softmax(&scores, D::Minus1)?,
        }
        .to_dtype(v.dtype())?;
        let out = probs
            .reshape((b, nkv, n_rep * s, t))?
            .matmul(&v)?
            .reshape((b, nh, s, hd))?
            .transpose(1, 2)?
            .reshape((b, s, nh * hd))?;
        Ok(sites.forward(self.o_proj, &out, mode)?)
    }
}

#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: SiteId,
    up_proj: SiteId,
    down_proj: SiteId,
}

impl Mlp {
    fn forward(&self, sites: &AdapterSites, x: &Tensor, mode: ForwardMode) -> Result<Tensor> {
        let gate = sites.forward(self.gate_proj, x, mode)?;
        let up = sites.forward(self.up_proj, x, mode)?;
        let down = sites.site(self.down_proj);
        // An opened (trainable) base weight needs the site's differentiable path.
        let plain_down = down.current().is_none()
            && down.history().is_empty()
            && down.base().bias().is_none()
            && down.base_var().is_none();
        if use_fused(x) && plain_down {
            return Ok(fused::swiglu_linear(&gate, &up, down.base().weight())?);
        }
        let h = if use_fused(x) {
            fused::swiglu(&gate, &up)?
        } else {
            (gate.silu()? * up)?
        };
        Ok(sites.forward(self.down_proj, &h, mode)?)
    }
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

/// The LLaMA-family causal language model. A clone shares the tensors, the
/// current adapters' variables included (training one trains the other).
#[derive(Debug, Clone)]
pub struct Llama {
    config: LlamaConfig,
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: SiteId,
    sites: AdapterSites,
    device: Device,
    dtype: DType,
}

/// Takes HF-named tensors out of a map, checking presence and shape.
struct WeightSource {
    tensors: HashMap<String, Tensor>,
    dtype: DType,
    device: Device,
    /// Random weights of the right shapes instead (speed benchmarks at a paper's shapes).
    random: bool,
}

impl WeightSource {
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        if self.random {
            // drawn on the device: a 7B model never passes through host memory
            let t = Tensor::randn(0f32, 0.02, shape, &self.device)?;
            return Ok(t.to_dtype(self.dtype)?);
        }
        let t = self
            .tensors
            .remove(name)
            .ok_or_else(|| ModelError::Tensor {
                name: name.into(),
                message: "missing".into(),
            })?;
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

/// Where a bf16 model computes its norms, softmax and loss: f32.
fn compute_dtype(dtype: DType) -> DType {
    if dtype == DType::BF16 {
        DType::F32
    } else {
        dtype
    }
}

impl Llama {
    /// Builds the model from Hugging Face-named tensors
    /// (`model.embed_tokens.weight`, `model.layers.{i}.self_attn.q_proj.weight`, ...),
    /// converted to `dtype` (F32, or F64 for numerical checks) on `device`.
    /// No adapter is attached; see [`AdapterSites::init_new_adapters`].
    pub fn from_tensors(
        config: LlamaConfig,
        tensors: HashMap<String, Tensor>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Self::build(config, tensors, false, dtype, device)
    }

    /// A model of `config`'s shapes with random weights (N(0, 0.02), norms
    /// too): for measuring speed at a model size one cannot download.
    pub fn random(config: LlamaConfig, dtype: DType, device: &Device) -> Result<Self> {
        Self::build(config, HashMap::new(), true, dtype, device)
    }

    fn build(
        config: LlamaConfig,
        tensors: HashMap<String, Tensor>,
        random: bool,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        check_config(&config)?;
        if !matches!(dtype, DType::F32 | DType::F64 | DType::BF16) {
            return Err(ModelError::Unsupported(format!(
                "model dtype {dtype:?}: weights are F32, BF16 (GPU), or F64 for checks"
            )));
        }
        let mut w = WeightSource {
            tensors,
            dtype,
            device: device.clone(),
            random,
        };
        let c = &config;
        let (h, hd, nh, nkv, inter) = (
            c.hidden_size,
            c.head_dim(),
            c.num_attention_heads,
            c.num_kv_heads(),
            c.intermediate_size,
        );
        let mut sites = AdapterSites::new();
        let mut site = |w: &mut WeightSource,
                        path: String,
                        out_f: usize,
                        in_f: usize,
                        bias: bool|
         -> Result<SiteId> {
            let weight = w.take(&format!("{path}.weight"), &[out_f, in_f])?;
            let bias = if bias {
                Some(w.take(&format!("{path}.bias"), &[out_f])?)
            } else {
                None
            };
            sites
                .insert(path, AdapterSite::new(weight, bias)?)
                .map_err(|e| ModelError::Unsupported(e.to_string()))
        };
        let embed_tokens = w.take("model.embed_tokens.weight", &[c.vocab_size, h])?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let qkv_bias = c.attention_bias;
            let self_attn = Attention {
                q_proj: site(
                    &mut w,
                    format!("{p}.self_attn.q_proj"),
                    nh * hd,
                    h,
                    qkv_bias,
                )?,
                k_proj: site(
                    &mut w,
                    format!("{p}.self_attn.k_proj"),
                    nkv * hd,
                    h,
                    qkv_bias,
                )?,
                v_proj: site(
                    &mut w,
                    format!("{p}.self_attn.v_proj"),
                    nkv * hd,
                    h,
                    qkv_bias,
                )?,
                o_proj: site(&mut w, format!("{p}.self_attn.o_proj"), h, nh * hd, false)?,
                num_heads: nh,
                num_kv_heads: nkv,
                head_dim: hd,
            };
            let mlp = Mlp {
                gate_proj: site(&mut w, format!("{p}.mlp.gate_proj"), inter, h, false)?,
                up_proj: site(&mut w, format!("{p}.mlp.up_proj"), inter, h, false)?,
                down_proj: site(&mut w, format!("{p}.mlp.down_proj"), h, inter, false)?,
            };
            layers.push(DecoderLayer {
                input_layernorm: RmsNorm {
                    weight: w.take(&format!("{p}.input_layernorm.weight"), &[h])?,
                    eps: c.rms_norm_eps,
                },
                self_attn,
                post_attention_layernorm: RmsNorm {
                    weight: w.take(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                    eps: c.rms_norm_eps,
                },
                mlp,
            });
        }
        let norm = RmsNorm {
            weight: w.take("model.norm.weight", &[h])?,
            eps: c.rms_norm_eps,
        };
        let lm_head = if c.tie_word_embeddings {
            // Some tied checkpoints still carry a copy; it must equal the embeddings.
            w.tensors.remove("lm_head.weight");
            sites
                .insert("lm_head", AdapterSite::new(embed_tokens.clone(), None)?)
                .map_err(|e| ModelError::Unsupported(e.to_string()))?
        } else {
            site(&mut w, "lm_head".into(), c.vocab_size, h, false)?
        };
        // Buffers some exporters keep; everything else left over is a layer this code would ignore.
        w.tensors.retain(|k, _| !k.ends_with("rotary_emb.inv_freq"));
        if let Some(name) = w.tensors.keys().min() {
            let hint = if name.ends_with(".bias") && !c.attention_bias {
                " (biases need `attention_bias: true` in the config, and only q/k/v biases are supported)"
            } else {
                ""
            };
            return Err(ModelError::Tensor {
                name: name.clone(),
                message: format!(
                    "is not part of a LLaMA model with this config{hint}; refusing to ignore it"
                ),
            });
        }
        Ok(Self {
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
            sites,
            device: device.clone(),
            dtype,
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Final hidden states `(b, s, hidden)` for new tokens `input_ids (b, s)`
    /// at `positions`, attending to the cache (if any) and themselves under
    /// `key_mask (b, t_total)` (true = real token).
    fn hidden_states(
        &self,
        input_ids: &Tensor,
        positions: &[Vec<u32>],
        key_mask: &[Vec<bool>],
        mut cache: Option<&mut KvCache>,
        mode: ForwardMode,
    ) -> Result<Tensor> {
        let (b, s) = input_ids.dims2()?;
        let past = cache.as_ref().map_or(0, |c| c.len());
        let t = past + s;
        // additive mask (b, 1, s, t): causal and padding
        let neg = mask_value(compute_dtype(self.dtype));
        let mut m = Vec::with_capacity(b * s * t);
        for row in key_mask {
            if row.len() != t {
                return Err(ModelError::Tensor {
                    name: "attention_mask".into(),
                    message: format!("has {} columns, expected {t}", row.len()),
                });
            }
            for i in 0..s {
                for (j, &real) in row.iter().enumerate() {
                    m.push(if real && j <= past + i { 0.0 } else { neg });
                }
            }
        }
        let mask =
            Tensor::from_vec(m, (b, 1, s, t), &self.device)?.to_dtype(compute_dtype(self.dtype))?;
        let rope = Rope::new(
            positions,
            self.config.head_dim(),
            self.config.rope_theta,
            self.dtype,
            &self.device,
        )?;
        let mut x = self
            .embed_tokens
            .index_select(&input_ids.flatten_all()?, 0)?
            .reshape((b, s, self.config.hidden_size))?;
        for (i, layer) in self.layers.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            let h = layer.input_layernorm.forward(&x, mode)?;
            let h = layer
                .self_attn
                .forward(&self.sites, &h, &rope, &mask, slot, mode)?;
            x = (x + h)?;
            let h = layer.post_attention_layernorm.forward(&x, mode)?;
            x = (x + layer.mlp.forward(&self.sites, &h, mode)?)?;
        }
        self.norm.forward(&x, mode)
    }

    /// Logits in f32 (or f64) whatever the weights' dtype: the loss and
    /// the scores are computed from them.
    fn lm_head(&self, h: &Tensor, mode: ForwardMode) -> Result<Tensor> {
        let logits = self.sites.forward(self.lm_head, h, mode)?;
        Ok(logits.to_dtype(compute_dtype(logits.dtype()))?)
    }

    /// Full-sequence hidden states of a batch (no cache), positions from the mask.
    fn batch_hidden_states(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        mode: ForwardMode,
    ) -> Result<Tensor> {
        let key_mask = mask_rows(attention_mask)?;
        let positions = positions_from_mask(&key_mask);
        self.hidden_states(input_ids, &positions, &key_mask, None, mode)
    }

    /// Final hidden states `(n, hidden)` at the n positions that carry a
    /// label (position t predicts `labels[t + 1]`), their targets, and the
    /// batch row of each.
    fn label_hidden_states(
        &self,
        batch: &LmBatch,
        mode: ForwardMode,
    ) -> Result<(Tensor, Vec<u32>, Vec<usize>)> {
        let (b, s) = batch.input_ids.dims2()?;
        if batch.labels.dims() != [b, s] {
            return Err(ModelError::Tensor {
                name: "labels".into(),
                message: format!(
                    "shape {:?} must equal input_ids {:?} for a decoder-only model",
                    batch.labels.shape(),
                    batch.input_ids.shape()
                ),
            });
        }
        let labels = batch.labels.to_vec2::<i64>()?;
        // gather the predicting hidden states before the lm_head
        let (mut idx, mut targets, mut rows) = (Vec::new(), Vec::new(), Vec::new());
        for (r, row) in labels.iter().enumerate() {
            for t in 0..s.saturating_sub(1) {
                let y = row[t + 1];
                if y == IGNORE_INDEX {
                    continue;
                }
                if y < 0 || y as usize >= self.config.vocab_size {
                    return Err(ModelError::Tensor {
                        name: "labels".into(),
                        message: format!(
                            "row {r}, position {}: label {y} is outside the vocabulary (0..{})",
                            t + 1,
                            self.config.vocab_size
                        ),
                    });
                }
                idx.push((r * s + t) as u32);
                targets.push(y as u32);
                rows.push(r);
            }
        }
        let h = self.batch_hidden_states(&batch.input_ids, &batch.attention_mask, mode)?;
        let n = idx.len();
        let h = h
            .reshape((b * s, self.config.hidden_size))?
            .index_select(&Tensor::from_vec(idx, n, &self.device)?, 0)?;
        Ok((h, targets, rows))
    }

    /// Sum of log-likelihoods of each `(prompt, continuation)` pair, batched.
    pub fn score_pairs(&self, pairs: &[(&[u32], &[u32])]) -> Result<Vec<f64>> {
        let rows: Vec<Vec<u32>> = pairs.iter().map(|(p, c)| [*p, *c].concat()).collect();
        let loss_mask: Vec<Vec<bool>> = pairs
            .iter()
            .map(|(p, c)| {
                if p.is_empty() && !c.is_empty() {
                    // the first token has no prediction: nothing conditions it
                    return Err(ModelError::Tokenizer(
                        "scoring needs a non-empty prompt (e.g. the BOS token)".into(),
                    ));
                }
                Ok([vec![false; p.len()], vec![true; c.len()]].concat())
            })
            .collect::<Result<_>>()?;
        let batch = LmBatch::causal_right_padded(&rows, &loss_mask, 0, &self.device)?;
        let ll = self.label_logits(&batch, ForwardMode::Inference)?;
        let logp = ll
            .target_log_probs()?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        let mut out = vec![0.0; pairs.len()];
        for (row, lp) in ll.rows.iter().zip(logp) {
            out[*row] += lp;
        }
        Ok(out)
    }
}

/// `mask (b, s)` of any dtype to rows of booleans (true = real token).
fn mask_rows(attention_mask: &Tensor) -> Result<Vec<Vec<bool>>> {
    Ok(attention_mask
        .to_dtype(DType::F32)?
        .to_vec2::<f32>()?
        .into_iter()
        .map(|r| r.into_iter().map(|v| v > 0.5).collect())
        .collect())
}

/// Shortest prefix worth sharing in [`LanguageModel::generate`] (below it,
/// the separate prefill costs more than it saves).
const MIN_SHARED_PREFIX: usize = 8;

/// Tokens all prompts start with, at most all but each prompt's last token
/// (which must be computed in the batch to predict the first new token);
/// 0 for a single prompt or a prefix shorter than [`MIN_SHARED_PREFIX`].
fn shared_prefix_len(prompts: &[Vec<u32>]) -> usize {
    let Some((first, rest)) = prompts.split_first() else {
        return 0;
    };
    if rest.is_empty() {
        return 0;
    }
    let mut n = prompts
        .iter()
        .map(Vec::len)
        .min()
        .unwrap_or(0)
        .saturating_sub(1);
    for p in rest {
        n = n.min(first.iter().zip(p).take_while(|(a, b)| a == b).count());
    }
    if n >= MIN_SHARED_PREFIX {
        n
    } else {
        0
    }
}

/// Position of each token: the count of real tokens before it (left or right
/// padding alike), as transformers' generate computes it; padding gets 0.
fn positions_from_mask(key_mask: &[Vec<bool>]) -> Vec<Vec<u32>> {
    key_mask
        .iter()
        .map(|row| {
            let mut n = 0u32;
            row.iter()
                .map(|&real| {
                    if real {
                        n += 1;
                        n - 1
                    } else {
                        0
                    }
                })
                .collect()
        })
        .collect()
}

fn check_config(c: &LlamaConfig) -> Result<()> {
    let bad = |field: &str, message: String| {
        Err(ModelError::Unsupported(format!(
            "config field `{field}`: {message}"
        )))
    };
    if c.num_attention_heads == 0 || c.hidden_size % c.num_attention_heads != 0 {
        return bad(
            "num_attention_heads",
            format!(
                "{} does not divide hidden_size {}",
                c.num_attention_heads, c.hidden_size
            ),
        );
    }
    if c.num_kv_heads() == 0 || c.num_attention_heads % c.num_kv_heads() != 0 {
        return bad(
            "num_key_value_heads",
            format!(
                "{} does not divide num_attention_heads {}",
                c.num_kv_heads(),
                c.num_attention_heads
            ),
        );
    }
    if c.head_dim() % 2 != 0 {
        return bad(
            "hidden_size",
            format!("head dimension {} is odd; RoPE needs pairs", c.head_dim()),
        );
    }
    if c.hidden_act != "silu" {
        return bad(
            "hidden_act",
            format!("`{}` is not supported, only silu", c.hidden_act),
        );
    }
    Ok(())
}

impl LanguageModel for Llama {
    fn device(&self) -> &Device {
        &self.device
    }
    fn adapter_sites(&self) -> &AdapterSites {
        &self.sites
    }
    fn adapter_sites_mut(&mut self) -> &mut AdapterSites {
        &mut self.sites
    }

    fn forward_logits(&self, batch: &LmBatch, mode: ForwardMode) -> Result<Tensor> {
        let h = self.batch_hidden_states(&batch.input_ids, &batch.attention_mask, mode)?;
        self.lm_head(&h, mode)
    }

    fn label_logits(&self, batch: &LmBatch, mode: ForwardMode) -> Result<LabelLogits> {
        let (h, targets, rows) = self.label_hidden_states(batch, mode)?;
        let n = targets.len();
        Ok(LabelLogits {
            logits: self.lm_head(&h, mode)?,
            targets: Tensor::from_vec(targets, n, &self.device)?,
            rows,
        })
    }

    fn loss(&self, batch: &LmBatch, mode: ForwardMode) -> Result<Tensor> {
        let head = self.sites.site(self.lm_head);
        let plain_head = head.current().is_none()
            && head.history().is_empty()
            && head.base().bias().is_none()
            && head.base_var().is_none();
        // The fused lm_head + cross-entropy computes its input gradient in the
        // forward: worth it only when a backward follows.
        if !(mode.tracks_gradients() && plain_head && use_fused(head.base().weight())) {
            return self.label_logits(batch, mode)?.mean_cross_entropy();
        }
        let (h, targets, _) = self.label_hidden_states(batch, mode)?;
        if targets.is_empty() {
            return Err(ModelError::Tensor {
                name: "labels".into(),
                message: "no position carries a label: nothing to compute a loss on".into(),
            });
        }
        Ok(fused::linear_cross_entropy(&h, head.base().weight(), &targets)?.mean_all()?)
    }

    fn generate(&self, prompts: &[Vec<u32>], opts: &GenerateOptions) -> Result<Vec<Vec<u32>>> {
        let mode = ForwardMode::Inference;
        if prompts.iter().any(Vec::is_empty) {
            return Err(ModelError::Tokenizer(
                "generation needs a non-empty prompt for every row".into(),
            ));
        }
        let b = prompts.len();
        let mut out = vec![Vec::new(); b];
        if b == 0 || opts.max_new_tokens == 0 {
            return Ok(out);
        }
        // Prompts that start alike (an evaluation batch: the task's
        // instruction and options, 40-60 % of each prompt here) compute
        // the shared prefix's keys and values once, for one row, and every
        // row attends to copies of them: the same attention, less prefill.
        let mut cache = KvCache::new(self.layers.len());
        let shared = shared_prefix_len(prompts);
        if shared > 0 {
            let ids = Tensor::from_vec(prompts[0][..shared].to_vec(), (1, shared), &self.device)?;
            let positions = vec![(0..shared as u32).collect::<Vec<_>>()];
            self.hidden_states(
                &ids,
                &positions,
                &[vec![true; shared]],
                Some(&mut cache),
                mode,
            )?;
            cache.repeat_rows(b)?;
        }
        let l = prompts.iter().map(|p| p.len() - shared).max().unwrap_or(0);
        // left padding after the shared prefix: every row's last prompt
        // token sits at the last column
        let mut key_mask: Vec<Vec<bool>> = prompts
            .iter()
            .map(|p| {
                let pad = l - (p.len() - shared);
                (0..shared + l)
                    .map(|j| j < shared || j >= shared + pad)
                    .collect()
            })
            .collect();
        let ids: Vec<u32> = prompts
            .iter()
            .flat_map(|p| {
                std::iter::repeat_n(opts.pad_token_id, l - (p.len() - shared))
                    .chain(p[shared..].iter().copied())
            })
            .collect();
        let mut positions: Vec<Vec<u32>> = positions_from_mask(&key_mask)
            .into_iter()
            .map(|row| row[shared..].to_vec())
            .collect();
        let mut next_pos: Vec<u32> = prompts.iter().map(|p| p.len() as u32).collect();
        let mut input = Tensor::from_vec(ids, (b, l), &self.device)?;
        let mut finished = vec![false; b];
        for _ in 0..opts.max_new_tokens {
            let h = self.hidden_states(&input, &positions, &key_mask, Some(&mut cache), mode)?;
            let last = h.narrow(1, h.dim(1)? - 1, 1)?.squeeze(1)?;
            let next = self
                .lm_head(&last, mode)?
                .argmax(D::Minus1)?
                .to_vec1::<u32>()?;
            let mut step = Vec::with_capacity(b);
            for (r, &tok) in next.iter().enumerate() {
                if finished[r] {
                    step.push(opts.pad_token_id);
                    continue;
                }
                if opts.eos_token_ids.contains(&tok) {
                    finished[r] = true;
                } else {
                    out[r].push(tok);
                }
                step.push(tok);
            }
            if finished.iter().all(|&f| f) {
                break;
            }
            for row in key_mask.iter_mut() {
                row.push(true);
            }
            positions = next_pos.iter().map(|&p| vec![p]).collect();
            for p in next_pos.iter_mut() {
                *p += 1;
            }
            input = Tensor::from_vec(step, (b, 1), &self.device)?;
        }
        Ok(out)
    }

    fn score(&self, prompt: &[u32], candidates: &[Vec<u32>]) -> Result<Vec<f64>> {
        let pairs: Vec<(&[u32], &[u32])> =
            candidates.iter().map(|c| (prompt, c.as_slice())).collect();
        self.score_pairs(&pairs)
    }
}

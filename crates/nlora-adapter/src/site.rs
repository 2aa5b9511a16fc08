//! One adapted linear layer: `y = W0 x + sum_i s_i B_i A_i x + s B A dropout(x)`.
//!
//! W0 (and its bias) is the frozen pretrained weight; `(A_i, B_i, s_i)` are the
//! frozen adapters of the tasks already learned (the reference code's
//! "previous" LoRA, stacked along the rank axis); `(A, B, s)` is the current
//! task's trainable adapter. Shapes follow PEFT: A `(r, in)`, B `(out, r)`,
//! scale `s = alpha / r`.
use candle_core::{DType, Device, Result, Tensor, Var};
use rand::Rng;

use crate::config::LoraConfig;
use crate::frozen::{frozen_matmul_t, FrozenLinear};
use crate::lora_op::{lora_linear, Frozen};

/// How a forward pass runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardMode {
    /// No dropout, no autograd graph (the adapters are read detached).
    Inference,
    /// Autograd graph on the current adapters. Dropout on the current
    /// adapter's input when a seed is given (each site derives its own
    /// stream from it, so a step is reproducible); `None` disables dropout
    /// (gradient checks, Fisher information).
    Train { dropout_seed: Option<u64> },
}

impl ForwardMode {
    pub fn tracks_gradients(&self) -> bool {
        matches!(self, ForwardMode::Train { .. })
    }
}

/// A finished task's adapter: frozen, with its own scale.
#[derive(Debug, Clone)]
pub struct FrozenAdapter {
    /// `(r, in)`
    pub a: Tensor,
    /// `(out, r)`
    pub b: Tensor,
    /// `alpha / r` of the task that trained it.
    pub scale: f64,
}

impl FrozenAdapter {
    /// The update `dW = s B A`, `(out, in)`.
    pub fn delta_weight(&self) -> Result<Tensor> {
        self.b.matmul(&self.a)?.affine(self.scale, 0.0)
    }
}

/// The current task's trainable adapter.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    a: Var,
    b: Var,
    alpha: f64,
    dropout: f32,
}

impl LoraAdapter {
    /// PEFT's initialisation: A kaiming-uniform with `a = sqrt(5)`, i.e.
    /// `U(-1/sqrt(in), 1/sqrt(in))`, and B zeros, so the update starts at 0.
    pub fn init(
        cfg: &LoraConfig,
        in_features: usize,
        out_features: usize,
        dtype: DType,
        device: &Device,
        rng: &mut impl Rng,
    ) -> Result<Self> {
        if cfg.r == 0 {
            candle_core::bail!("LoRA rank r must be at least 1");
        }
        let bound = 1.0 / (in_features as f64).sqrt();
        let a: Vec<f64> = (0..cfg.r * in_features)
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        let a = Tensor::from_vec(a, (cfg.r, in_features), device)?.to_dtype(dtype)?;
        let b = Tensor::zeros((out_features, cfg.r), dtype, device)?;
        Self::from_tensors(a, b, cfg.alpha, cfg.dropout)
    }

    /// Wraps existing `A (r, in)`, `B (out, r)` (e.g. loaded from PEFT files) as trainable.
    pub fn from_tensors(a: Tensor, b: Tensor, alpha: f64, dropout: f32) -> Result<Self> {
        let (r, _) = a.dims2()?;
        let (_, rb) = b.dims2()?;
        if r != rb {
            candle_core::bail!(
                "LoRA A {:?} and B {:?} disagree on the rank",
                a.shape(),
                b.shape()
            );
        }
        if !(0.0..1.0).contains(&dropout) {
            candle_core::bail!("LoRA dropout must be in [0, 1), got {dropout}");
        }
        Ok(Self {
            a: Var::from_tensor(&a.detach())?,
            b: Var::from_tensor(&b.detach())?,
            alpha,
            dropout,
        })
    }

    pub fn rank(&self) -> usize {
        self.a.dims()[0]
    }
    pub fn alpha(&self) -> f64 {
        self.alpha
    }
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank() as f64
    }
    pub fn dropout(&self) -> f32 {
        self.dropout
    }
    /// lora_A, `(r, in)`; the trainable variable.
    pub fn a(&self) -> &Var {
        &self.a
    }
    /// lora_B, `(out, r)`; the trainable variable.
    pub fn b(&self) -> &Var {
        &self.b
    }
    /// The update `dW = s B A`, `(out, in)`, differentiable w.r.t. A and B.
    pub fn delta_weight(&self) -> Result<Tensor> {
        self.b
            .as_tensor()
            .matmul(self.a.as_tensor())?
            .affine(self.scale(), 0.0)
    }
    /// A detached copy, for the history.
    pub fn to_frozen(&self) -> FrozenAdapter {
        FrozenAdapter {
            a: self.a.as_tensor().detach(),
            b: self.b.as_tensor().detach(),
            scale: self.scale(),
        }
    }
}

/// The history stacked along the rank axis, scales folded into B:
/// `sum_i s_i B_i A_i x = [s_1 B_1 | s_2 B_2 | ...] [A_1; A_2; ...] x`.
#[derive(Debug, Clone)]
struct StackedHistory {
    a: Tensor,
    b_scaled: Tensor,
}

/// An adapted linear layer (PEFT's `LoraLinear`): frozen base, frozen history, trainable current adapter.
/// For full fine-tuning the base weight itself can be opened ([`AdapterSite::open_base`]).
#[derive(Debug, Clone)]
pub struct AdapterSite {
    base: FrozenLinear,
    /// The base weight as a trainable variable (full fine-tuning). `base`'s
    /// weight shares its storage, so inference reads the trained values
    /// through the frozen path with no copy.
    trainable_base: Option<Var>,
    history: Vec<FrozenAdapter>,
    stacked: Option<StackedHistory>,
    current: Option<LoraAdapter>,
}

impl AdapterSite {
    /// A site with only its frozen base weight `(out, in)` (and bias), no adapter.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        Ok(Self {
            base: FrozenLinear::new(weight, bias)?,
            trainable_base: None,
            history: Vec::new(),
            stacked: None,
            current: None,
        })
    }

    pub fn base(&self) -> &FrozenLinear {
        &self.base
    }
    pub fn in_features(&self) -> usize {
        self.base.in_features()
    }
    pub fn out_features(&self) -> usize {
        self.base.out_features()
    }
    pub fn current(&self) -> Option<&LoraAdapter> {
        self.current.as_ref()
    }

    /// The base weight as a trainable variable, when full fine-tuning opened it.
    pub fn base_var(&self) -> Option<&Var> {
        self.trainable_base.as_ref()
    }

    /// Makes the base weight `(out, in)` trainable (full fine-tuning): it
    /// becomes a variable, and in training the layer's forward uses a
    /// differentiable matmul on it, so its gradient is computed (the frozen
    /// path skips it). The bias stays frozen. Opening an open site is a no-op.
    pub fn open_base(&mut self) -> Result<&Var> {
        if self.trainable_base.is_none() {
            // One copy: the variable owns the values, the frozen view shares them.
            let var = Var::from_tensor(&self.base.weight().contiguous()?)?;
            self.base.set_weight(var.as_tensor().detach());
            self.trainable_base = Some(var);
        }
        Ok(self.trainable_base.as_ref().expect("set above"))
    }

    /// Freezes an opened base weight again at its current values.
    pub fn close_base(&mut self) {
        self.trainable_base = None;
    }
    /// Earlier tasks' adapters, oldest first.
    pub fn history(&self) -> &[FrozenAdapter] {
        &self.history
    }
    /// The earlier tasks' lora_A stacked along the rank axis, `(R, in)` with R
    /// the sum of their ranks (the reference code's "previous" lora_A, used by
    /// O-LoRA's orthogonality term). `None` when there is no history.
    pub fn previous_a(&self) -> Option<&Tensor> {
        self.stacked.as_ref().map(|s| &s.a)
    }

    /// Installs a trainable adapter (replacing any current one).
    pub fn set_current(&mut self, adapter: LoraAdapter) -> Result<()> {
        let (r, in_f) = adapter.a.dims2()?;
        let (out_f, _) = adapter.b.dims2()?;
        if in_f != self.in_features() || out_f != self.out_features() {
            candle_core::bail!(
                "adapter A ({r}, {in_f}) / B ({out_f}, {r}) does not fit a ({}, {}) layer",
                self.out_features(),
                self.in_features()
            );
        }
        self.current = Some(adapter);
        Ok(())
    }

    /// Removes the current adapter without keeping it.
    pub fn clear_current(&mut self) -> Option<LoraAdapter> {
        self.current.take()
    }

    /// Appends a finished task's adapter to the history.
    pub fn push_history(&mut self, adapter: FrozenAdapter) -> Result<()> {
        let (r, in_f) = adapter.a.dims2()?;
        let (out_f, rb) = adapter.b.dims2()?;
        if r != rb || in_f != self.in_features() || out_f != self.out_features() {
            candle_core::bail!(
                "frozen adapter A {:?} / B {:?} does not fit a ({}, {}) layer",
                adapter.a.shape(),
                adapter.b.shape(),
                self.out_features(),
                self.in_features()
            );
        }
        self.history.push(FrozenAdapter {
            a: adapter.a.detach(),
            b: adapter.b.detach(),
            scale: adapter.scale,
        });
        self.restack()
    }

    /// End of task: the current adapter joins the history (frozen); no current adapter remains.
    pub fn freeze_current(&mut self) -> Result<()> {
        if let Some(cur) = self.current.take() {
            self.push_history(cur.to_frozen())?;
        }
        Ok(())
    }

    /// Folds the history into the base weight: `W0 <- W0 + sum_i s_i B_i A_i`.
    /// Same outputs, one matmul less per step; the earlier adapters are no
    /// longer available separately afterwards.
    pub fn merge_history_into_base(&mut self) -> Result<()> {
        if self.history.is_empty() {
            return Ok(());
        }
        if self.trainable_base.is_some() {
            candle_core::bail!(
                "cannot merge adapters into a base weight opened for full fine-tuning"
            );
        }
        let mut w = self.base.weight().clone();
        for h in &self.history {
            w = (w + h.delta_weight()?.to_dtype(self.base.weight().dtype())?)?;
        }
        self.base.set_weight(w);
        self.history.clear();
        self.restack()
    }

    fn restack(&mut self) -> Result<()> {
        self.stacked = if self.history.is_empty() {
            None
        } else {
            let a = Tensor::cat(&self.history.iter().map(|h| &h.a).collect::<Vec<_>>(), 0)?;
            let bs = self
                .history
                .iter()
                .map(|h| h.b.affine(h.scale, 0.0))
                .collect::<Result<Vec<_>>>()?;
            Some(StackedHistory {
                a: a.contiguous()?,
                b_scaled: Tensor::cat(&bs, 1)?.contiguous()?,
            })
        };
        Ok(())
    }

    /// `x (..., in) -> (..., out)`. `dropout_seed` seeds this site's dropout
    /// mask (only used in [`ForwardMode::Train`] with a positive dropout).
    ///
    /// On the CPU (f32/f64, one dtype) the whole layer is one fused op;
    /// elsewhere ([`crate::device::use_fused`]) a composition of candle ops.
    /// Mixed precision meets here: a bf16 base computes `x W0^T` in bf16,
    /// the adapters (f32) see `x` cast to f32, and their update is cast back
    /// to bf16 before the sum; the casts are differentiable.
    pub fn forward(&self, x: &Tensor, mode: ForwardMode) -> Result<Tensor> {
        let train_base = match (&self.trainable_base, mode) {
            (Some(w), ForwardMode::Train { .. }) => Some(w),
            _ => None,
        };
        let dropout_for = |cur: &LoraAdapter| match mode {
            ForwardMode::Train {
                dropout_seed: Some(seed),
            } if cur.dropout > 0.0 => Some(Dropout {
                p: cur.dropout,
                seed,
            }),
            _ => None,
        };
        let current = self.current.as_ref().map(|cur| match mode {
            ForwardMode::Inference => (cur, cur.a.as_tensor().detach(), cur.b.as_tensor().detach()),
            ForwardMode::Train { .. } => {
                (cur, cur.a.as_tensor().clone(), cur.b.as_tensor().clone())
            }
        });
        if let (Some((cur, a, b)), None) = (&current, train_base) {
            if crate::device::use_fused(x) && a.dtype() == x.dtype() {
                let frozen = Frozen {
                    weight: self.base.weight(),
                    bias: self.base.bias(),
                    history: self.stacked.as_ref().map(|h| (&h.a, &h.b_scaled)),
                };
                return lora_linear(x, a, b, frozen, cur.scale(), dropout_for(cur));
            }
        }
        let mut y = match train_base {
            // Full fine-tuning: candle's matmul, whose backward gives dW too.
            Some(w) => {
                let in_f = self.in_features();
                let x_in = x.dim(candle_core::D::Minus1)?;
                if x_in != in_f {
                    candle_core::bail!(
                        "linear: input has {x_in} features, the weight {:?} expects {in_f}",
                        w.shape()
                    );
                }
                let m = x.elem_count() / in_f;
                let mut dims = x.dims().to_vec();
                *dims.last_mut().expect("rank checked by in_features") = self.out_features();
                let y = x
                    .reshape((m, in_f))?
                    .matmul(&w.as_tensor().t()?)?
                    .reshape(dims)?;
                match self.base.bias() {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                }
            }
            None => self.base.forward(x)?,
        };
        let adapter_dtype = match (&current, &self.stacked) {
            (Some((_, a, _)), _) => a.dtype(),
            (None, Some(h)) => h.a.dtype(),
            (None, None) => return Ok(y),
        };
        let xa = x.to_dtype(adapter_dtype)?;
        if let Some(h) = &self.stacked {
            let hx = frozen_matmul_t(&xa, &h.a)?;
            let dtype = y.dtype();
            y = (y + frozen_matmul_t(&hx, &h.b_scaled)?.to_dtype(dtype)?)?;
        }
        if let Some((cur, a, b)) = &current {
            let x_in = match dropout_for(cur) {
                Some(d) => d.composed(&xa)?,
                None => xa,
            };
            let in_f = self.in_features();
            let m = x_in.elem_count() / in_f;
            let x2 = x_in.reshape((m, in_f))?;
            // the scale on the (m, r) intermediate: one (m, out) tensor fewer in the graph
            let u = x2
                .matmul(&a.t()?)?
                .affine(cur.scale(), 0.0)?
                .matmul(&b.t()?)?
                .reshape(y.shape())?
                .to_dtype(y.dtype())?;
            y = (y + u)?;
        }
        Ok(y)
    }
}

/// Inverted dropout with a mask drawn from `seed` (reproducible steps). On
/// the CPU the mask is never stored: the backward draws it again from the
/// seed, so the graph holds only the dropped-out input.
#[cfg(test)]
fn dropout(x: &Tensor, p: f32, seed: u64) -> Result<Tensor> {
    let d = Dropout { p, seed };
    if crate::device::use_fused(x) {
        x.contiguous()?.apply_op1(d)
    } else {
        d.composed(x)
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Dropout {
    pub(crate) p: f32,
    pub(crate) seed: u64,
}

crate::simd_fn! {
    /// `o[i] = x[i] * keep` where position `first + i` of the stream `key`
    /// clears `threshold`, else 0.
    fn dropout_block<T: candle_core::WithDType>(
        o: &mut [T],
        x: &[T],
        key: u64,
        first: u32,
        threshold: u32,
        keep: T,
    ) {
        let zero = T::from_f64(0.0);
        for (i, (o, &v)) in o.iter_mut().zip(x).enumerate() {
            let kept = crate::kernels::hash_u32(key, first.wrapping_add(i as u32)) >= threshold;
            *o = if kept { v * keep } else { zero };
        }
    }
}

impl Dropout {
    /// `x * mask` with the mask `0` (probability p) or `1 / (1 - p)`. Entry
    /// i is kept when a hash of (seed, i) clears `p x 2^32`: the same mask
    /// whatever the thread count or block split, drawn in parallel vector
    /// lanes (a ChaCha stream per block cost ~5 % of a training step).
    fn apply<T: candle_core::WithDType>(&self, x: &[T]) -> Vec<T> {
        use rayon::prelude::*;
        const BLOCK: usize = 16 * 1024;
        let keep = T::from_f64((1.0 / (1.0 - self.p)) as f64);
        let zero = T::from_f64(0.0);
        let threshold = (f64::from(self.p) * 4_294_967_296.0).min(u32::MAX as f64) as u32;
        let key = crate::kernels::stream_key(self.seed);
        let mut out = vec![zero; x.len()];
        out.par_chunks_mut(BLOCK)
            .zip(x.par_chunks(BLOCK))
            .enumerate()
            .for_each(|(block, (o, x))| {
                let first = (block * BLOCK) as u32;
                dropout_block::<T>(o, x, key, first, threshold, keep);
            });
        out
    }

    /// The same inverted dropout as differentiable candle ops on any device:
    /// `x * mask`, the mask drawn on the CPU from the same block streams (so
    /// every device drops the same entries for a seed) and sent to `x`'s
    /// device. The graph keeps the mask; the backward is candle's `mul`.
    pub(crate) fn composed(&self, x: &Tensor) -> Result<Tensor> {
        let ones = vec![1f32; x.elem_count()];
        let mask = Tensor::from_vec(self.apply(&ones), x.shape(), &Device::Cpu)?
            .to_device(x.device())?
            .to_dtype(x.dtype())?;
        x.mul(&mask)
    }

    /// The dropped-out copy of a contiguous storage.
    pub(crate) fn cpu_apply(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> Result<candle_core::CpuStorage> {
        let _p = crate::profile::scope("lora dropout");
        use candle_core::backend::BackendStorage;
        use candle_core::{CpuStorage, DType};
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("dropout: input must be contiguous");
        };
        Ok(match storage.dtype() {
            DType::F32 => CpuStorage::F32(self.apply(&storage.as_slice::<f32>()?[start..end])),
            DType::F64 => CpuStorage::F64(self.apply(&storage.as_slice::<f64>()?[start..end])),
            other => candle_core::bail!("dropout: dtype {other:?} is not supported (f32, f64)"),
        })
    }
}

impl candle_core::CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "lora-dropout"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        Ok((self.cpu_apply(storage, layout)?, layout.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // the same mask, drawn again from the seed
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(self)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    #[test]
    fn an_opened_base_weight_gets_the_linear_layers_gradient() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f64, 1.0, (5, 3), &dev).unwrap();
        let bias = Tensor::randn(0f64, 1.0, 5, &dev).unwrap();
        let x = Tensor::randn(0f64, 1.0, (2, 4, 3), &dev).unwrap();
        let mut site = AdapterSite::new(w.clone(), Some(bias.clone())).unwrap();
        let frozen_y = site.forward(&x, ForwardMode::Inference).unwrap();
        let var = site.open_base().unwrap().clone();
        let train = ForwardMode::Train { dropout_seed: None };
        let y = site.forward(&x, train).unwrap();
        let diff = |a: &Tensor, b: &Tensor| -> f64 {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        assert!(diff(&y, &frozen_y) < 1e-12);
        // L = sum(y * probe): dL/dW = probe^T x over all rows.
        let probe = Tensor::randn(0f64, 1.0, (2, 4, 5), &dev).unwrap();
        let grads = (&y * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gw = grads
            .get(var.as_tensor())
            .expect("the opened weight has a gradient");
        let want = probe
            .reshape((8, 5))
            .unwrap()
            .t()
            .unwrap()
            .matmul(&x.reshape((8, 3)).unwrap())
            .unwrap();
        assert!(diff(gw, &want) < 1e-10);
        // An update of the variable is what inference sees, with no copy.
        var.set(&(var.as_tensor() * 2.0).unwrap()).unwrap();
        let y2 = site.forward(&x, ForwardMode::Inference).unwrap();
        let want2 = (x
            .broadcast_matmul(&(w * 2.0).unwrap().t().unwrap())
            .unwrap()
            .broadcast_add(&bias))
        .unwrap();
        assert!(diff(&y2, &want2) < 1e-10);
        // The frozen path of a closed site gives the weight no gradient.
        site.close_base();
        assert!(site.base_var().is_none());
        let y3 = site.forward(&x, train).unwrap();
        assert!(y3
            .sum_all()
            .unwrap()
            .backward()
            .unwrap()
            .get(var.as_tensor())
            .is_none());
    }

    #[test]
    fn dropout_masks_value_and_gradient_alike_and_is_seeded() {
        dropout_check();
        // the composed path (CUDA's) drops the same entries
        crate::device::with_composed_ops(dropout_check);
    }

    fn dropout_check() {
        let x = Var::from_tensor(&Tensor::arange(1f64, 2001.0, &Device::Cpu).unwrap()).unwrap();
        let y = dropout(x.as_tensor(), 0.25, 7).unwrap();
        let kept: Vec<f64> = y.to_vec1().unwrap();
        let grad = y.sum_all().unwrap().backward().unwrap();
        let g: Vec<f64> = grad.get(x.as_tensor()).unwrap().to_vec1().unwrap();
        let mut zeros = 0;
        for (i, (&v, &g)) in kept.iter().zip(&g).enumerate() {
            // as the mask was drawn before: 1 / (1 - p) in f32
            let keep = f64::from(1.0f32 / (1.0 - 0.25f32));
            if v == 0.0 {
                zeros += 1;
                assert_eq!(g, 0.0, "a dropped entry gets no gradient");
            } else {
                assert!((v - (i + 1) as f64 * keep).abs() < 1e-9);
                assert!((g - keep).abs() < 1e-12);
            }
        }
        // about a quarter dropped
        assert!((400..600).contains(&zeros), "{zeros} of 2000 dropped");
        let again: Vec<f64> = dropout(x.as_tensor(), 0.25, 7).unwrap().to_vec1().unwrap();
        assert_eq!(kept, again);
        let other: Vec<f64> = dropout(x.as_tensor(), 0.25, 8).unwrap().to_vec1().unwrap();
        assert_ne!(kept, other);
    }
}

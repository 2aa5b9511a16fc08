//! Fused CPU kernels with a backward, for the training path (and, where the
//! same kernel serves, inference).
//!
//! Why: candle keeps every intermediate tensor of the autograd graph alive
//! until `backward`, and its generic compositions (softmax as max, sub, exp,
//! sum, div; rotate-half RoPE as narrow, neg, cat, mul, add; cross-entropy
//! as log-softmax then gather) make one full-size tensor per step. For
//! SmolLM2-135M at 8 x 128 tokens that is gigabytes and a dozen memory passes
//! per layer. Each op here makes one output tensor and knows its own
//! gradient; the parity and finite-difference tests of the whole model
//! (tests/llama_parity.rs, tests/llama_adapters.rs) and the unit tests below
//! check them.
//!
//! CPU only (f32/f64): callers ask `nlora_adapter::use_fused` and fall back
//! to the compositions elsewhere (CUDA, bf16); `with_composed_ops` forces the
//! compositions on the CPU, and tests/device_parity.rs checks the two agree.
use std::ops::Range;
use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType,
};
use rayon::prelude::*;

/// f32 / f64 with the few functions the kernels need.
trait Real: WithDType {
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn larger(self, other: Self) -> Self;
    const NEG_INFINITY: Self;
    const ZERO: Self;
    const ONE: Self;
}

macro_rules! real {
    ($t:ty, $exp:expr) => {
        impl Real for $t {
            #[inline(always)]
            fn exp(self) -> Self {
                $exp(self)
            }
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            /// The larger of the two; `other` when either is NaN (a plain
            /// compare-and-select vectorises, `max`'s NaN rule does not).
            #[inline(always)]
            fn larger(self, other: Self) -> Self {
                if self > other {
                    self
                } else {
                    other
                }
            }
            const NEG_INFINITY: Self = <$t>::NEG_INFINITY;
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
        }
    };
}
// f32: the vectorisable exp (2 ulp); f64 (tests, references): libm's.
real!(f32, nlora_adapter::kernels::exp_f32);
real!(f64, f64::exp);

/// Max and sum over a slice in 8 independent lanes, so the loops vectorise
/// (a single running float accumulator is a serial dependency chain).
#[inline(always)]
fn lane_max<T: Real>(x: &[T]) -> T {
    let mut acc = [T::NEG_INFINITY; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = a.larger(v);
        }
    }
    rest.iter()
        .chain(&acc)
        .fold(T::NEG_INFINITY, |m, &v| m.larger(v))
}

#[inline(always)]
fn lane_sum<T: Real>(x: &[T]) -> T {
    let mut acc = [T::ZERO; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    rest.iter().chain(&acc).fold(T::ZERO, |s, &v| s + v)
}

/// `row <- exp(row - max(row))`, returning the sum of the new row.
#[inline(always)]
fn exp_shifted<T: Real>(row: &mut [T]) -> (T, T) {
    let max = lane_max(row);
    row.iter_mut().for_each(|v| *v = (*v - max).exp());
    (max, lane_sum(row))
}

// The row kernels below are `inline(always)` so that each is compiled into
// `with_simd`'s AVX2 + FMA function (a closure body big enough not to be
// inlined stays baseline SSE2 code).

nlora_adapter::simd_fn! {
    /// Rows of `softmax(scale * x + m)`, `t` entries each.
    fn softmax_rows<T: Real>(o: &mut [T], x: &[T], m: &[T], t: usize, scale: T) {
        for ((o, x), m) in o.chunks_mut(t).zip(x.chunks(t)).zip(m.chunks(t)) {
            for ((o, &x), &m) in o.iter_mut().zip(x).zip(m) {
                *o = x * scale + m;
            }
            let (_, sum) = exp_shifted(o);
            let inv = T::ONE / sum;
            o.iter_mut().for_each(|o| *o *= inv);
        }
    }
}

nlora_adapter::simd_fn! {
    /// Rows of the softmax's input gradient `scale * p * (g - sum(g * p))`.
    fn softmax_grad_rows<T: Real>(o: &mut [T], g: &[T], p: &[T], t: usize, scale: T) {
        for ((o, g), p) in o.chunks_mut(t).zip(g.chunks(t)).zip(p.chunks(t)) {
            for ((o, &g), &p) in o.iter_mut().zip(g).zip(p) {
                *o = g * p;
            }
            let dot = lane_sum(o);
            for ((o, &g), &p) in o.iter_mut().zip(g).zip(p) {
                *o = scale * p * (g - dot);
            }
        }
    }
}

nlora_adapter::simd_fn! {
    /// `o[i] = f(a[i], b[i], c[i])`.
    fn map3<T: Real>(o: &mut [T], abc: [&[T]; 3], f: &(impl Fn(T, T, T) -> T + Sync)) {
        let [a, b, c] = abc;
        for (((o, &a), &b), &c) in o.iter_mut().zip(a).zip(b).zip(c) {
            *o = f(a, b, c);
        }
    }
}

nlora_adapter::simd_fn! {
    /// Turns a row of logits into `softmax - onehot(target)` in place and
    /// returns the row's cross-entropy `-log softmax[target]`.
    fn softmax_minus_onehot<T: Real>(row: &mut [T], target: usize) -> T {
        let logit = row[target];
        let (max, sum) = exp_shifted(row);
        let inv = T::ONE / sum;
        row.iter_mut().for_each(|v| *v *= inv);
        row[target] -= T::ONE;
        sum.ln() + max - logit
    }
}

/// `e^x` through [`Real`] (inside `float_dispatch!`, where `T` is a concrete
/// type, a method call `x.exp()` would pick libm's inherent `exp`).
#[inline(always)]
fn exp<T: Real>(x: T) -> T {
    Real::exp(x)
}

/// The contiguous slice a layout covers.
fn contiguous<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&s.as_slice::<T>()?[start..end]),
        None => candle_core::bail!("{what}: input must be contiguous"),
    }
}

/// Runs `$body` with `$t` bound to the storage's float type.
macro_rules! float_dispatch {
    ($dtype:expr, $what:expr, |$t:ident| $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $t = f32;
                $body
            }
            DType::F64 => {
                type $t = f64;
                $body
            }
            other => candle_core::bail!("{}: dtype {other:?} is not supported (f32, f64)", $what),
        }
    };
}

// ---------------------------------------------------------------- softmax

/// `softmax(scale * x + mask)` over the last axis, `x (b, h, s, t)`,
/// `mask (b, 1, s, t)` additive (0 or a large negative value). Gradient for
/// `x` only (the mask is a constant).
pub fn masked_softmax(x: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, _, s, t) = x.dims4()?;
    if mask.dims() != [b, 1, s, t] {
        candle_core::bail!(
            "masked softmax: mask {:?} does not fit scores {:?}",
            mask.shape(),
            x.shape()
        );
    }
    x.contiguous()?
        .apply_op2(&mask.contiguous()?.detach(), MaskedSoftmax { scale })
}

struct MaskedSoftmax {
    scale: f64,
}

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "masked-softmax"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ms: &CpuStorage,
        ml: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _p = nlora_adapter::profile::scope("masked softmax (fwd)");
        let (b, h, s, t) = xl.shape().dims4()?;
        float_dispatch!(xs.dtype(), self.name(), |T| {
            let x = contiguous::<T>(xs, xl, self.name())?;
            let mask = contiguous::<T>(ms, ml, self.name())?;
            let scale = T::from_f64(self.scale);
            let mut out = vec![T::ZERO; x.len()];
            // one (batch, head) block of s rows per task
            out.par_chunks_mut(s * t)
                .zip(x.par_chunks(s * t))
                .enumerate()
                .for_each(|(bh, (o, x))| {
                    let m = &mask[(bh / h) * s * t..(bh / h + 1) * s * t];
                    softmax_rows::<T>(o, x, m, t, scale)
                });
            let _ = b;
            Ok((T::to_cpu_storage_owned(out), xl.shape().clone()))
        })
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _mask: &Tensor,
        probs: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let _p = nlora_adapter::profile::scope("masked softmax (bwd)");
        let g = grad
            .contiguous()?
            .apply_op2_no_bwd(probs, &SoftmaxBackward { scale: self.scale })?;
        Ok((Some(g), None))
    }
}

/// `scale * p * (g - sum(g * p))` row by row: the softmax's input gradient.
struct SoftmaxBackward {
    scale: f64,
}

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "masked-softmax-backward"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _p = nlora_adapter::profile::scope("softmax backward");
        let t = *gl.dims().last().unwrap_or(&1);
        float_dispatch!(gs.dtype(), self.name(), |T| {
            let g = contiguous::<T>(gs, gl, self.name())?;
            let p = contiguous::<T>(ps, pl, self.name())?;
            let scale = T::from_f64(self.scale);
            let mut out = vec![T::ZERO; g.len()];
            let rows_per_task = (4096 / t.max(1)).max(1) * t;
            out.par_chunks_mut(rows_per_task)
                .zip(g.par_chunks(rows_per_task).zip(p.par_chunks(rows_per_task)))
                .for_each(|(o, (g, p))| softmax_grad_rows::<T>(o, g, p, t, scale));
            Ok((T::to_cpu_storage_owned(out), gl.shape().clone()))
        })
    }
}

// ---------------------------------------------------------------- attention

/// Grouped-query attention `softmax(scale * q k^T + mask) v` for `q (b, nh, s,
/// hd)`, `k`, `v (b, nkv, t, hd)` and an additive `mask (b, 1, s, t)`,
/// returned as `(b, s, nh * hd)` (the o_proj's input). The n_rep query heads
/// sharing a kv head (heads `j*n_rep .. (j+1)*n_rep`, as transformers'
/// repeat_kv) are stacked along the sequence axis, so K/V are never copied.
///
/// With a gradient to track, the graph holds only q, k, v and the output:
/// the backward recomputes the scores and probabilities (a few percent of a
/// step's FLOPs) instead of keeping two `(b, nh, s, t)` tensors per layer.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    let tracked = q.track_op() || k.track_op() || v.track_op();
    let out = attention_forward(&q.detach(), &k.detach(), &v.detach(), mask, scale)?;
    if !tracked {
        return Ok(out);
    }
    q.apply_op3(
        k,
        v,
        Attention {
            out: Precomputed::new(out),
            mask: mask.detach(),
            scale,
        },
    )
}

/// Per-head products (outside autograd): one single-threaded GEMM per head,
/// the heads split across threads (see `nlora_adapter::kernels`).
fn bmm(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    nlora_adapter::kernels::batched_matmul(a, b)
}

/// The probabilities `(b, nkv, n_rep * s, t)` and the dims.
fn attention_probs(
    q: &Tensor,
    k: &Tensor,
    mask: &Tensor,
    scale: f64,
) -> Result<(Tensor, [usize; 6])> {
    let (b, nh, s, hd) = q.dims4()?;
    let (_, nkv, t, _) = k.dims4()?;
    let n_rep = nh / nkv;
    let q_stacked = q.contiguous()?.reshape((b, nkv, n_rep * s, hd))?;
    let scores = bmm(&q_stacked, &k.t()?)?.reshape((b, nh, s, t))?;
    let probs = masked_softmax(&scores, mask, scale)?.reshape((b, nkv, n_rep * s, t))?;
    Ok((probs, [b, nh, nkv, s, t, hd]))
}

fn attention_forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let (probs, [b, nh, _, s, _, hd]) = attention_probs(q, k, mask, scale)?;
    bmm(&probs, &v.contiguous()?)?
        .reshape((b, nh, s, hd))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b, s, nh * hd))
}

/// An output computed outside the graph, handed to the graph by the op's
/// forward (one copy of the output instead of every intermediate kept).
struct Precomputed(Mutex<Option<Tensor>>);

impl Precomputed {
    fn new(t: Tensor) -> Self {
        Self(Mutex::new(Some(t)))
    }

    fn take(&self, what: &str) -> Result<(CpuStorage, Shape)> {
        let out = self
            .0
            .lock()
            .map_err(|_| candle_core::Error::Msg(format!("{what}: poisoned")))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg(format!("{what}: forward run twice")))?;
        let (st, l) = out.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*st else {
            candle_core::bail!("{what}: CPU tensors only");
        };
        let (start, end) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg(format!("{what}: output not contiguous")))?;
        let data = float_dispatch!(cpu.dtype(), what, |T| {
            T::to_cpu_storage(&cpu.as_slice::<T>()?[start..end])
        });
        Ok((data, l.shape().clone()))
    }
}

struct Attention {
    out: Precomputed,
    mask: Tensor,
    scale: f64,
}

impl candle_core::CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _p = nlora_adapter::profile::scope("attention (fwd)");
        self.out.take(self.name())
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _p = nlora_adapter::profile::scope("attention (bwd)");
        let (q, k, v) = (q.detach(), k.detach(), v.detach());
        let (probs, [b, nh, nkv, s, _, hd]) = attention_probs(&q, &k, &self.mask, self.scale)?;
        let n_rep = nh / nkv;
        // dO in the stacked-heads layout (b, nkv, n_rep * s, hd)
        let d_out = grad
            .reshape((b, s, nh, hd))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, nkv, n_rep * s, hd))?;
        let v = v.contiguous()?;
        let d_v = bmm(&probs.t()?, &d_out)?;
        let d_probs = bmm(&d_out, &v.t()?)?.contiguous()?;
        let d_scores = d_probs.apply_op2_no_bwd(&probs, &SoftmaxBackward { scale: self.scale })?;
        let k = k.contiguous()?;
        let d_q = bmm(&d_scores, &k)?.reshape((b, nh, s, hd))?;
        let q_stacked = q.contiguous()?.reshape((b, nkv, n_rep * s, hd))?;
        let d_k = bmm(&d_scores.t()?, &q_stacked)?;
        Ok((Some(d_q), Some(d_k), Some(d_v)))
    }
}

// ---------------------------------------------------------------- RoPE

/// Rotary embedding, HF rotate-half convention (pairs `(i, i + d/2)`), fused
/// with the head transpose: `x (b, s, n, d)` (a linear layer's output
/// reshaped) to `(b, n, s, d)` rotated; `cos`, `sin` are `(b, s, d/2)`.
pub fn rope_to_heads(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, s, _n, d) = x.dims4()?;
    if cos.dims() != [b, s, d / 2] || sin.dims() != [b, s, d / 2] {
        candle_core::bail!(
            "rope: cos {:?} / sin {:?} do not fit x {:?}",
            cos.shape(),
            sin.shape(),
            x.shape()
        );
    }
    x.contiguous()?.apply_op1(Rope {
        cos: cos.contiguous()?.detach(),
        sin: sin.contiguous()?.detach(),
        to_heads: true,
    })
}

/// `to_heads`: input `(b, s, n, d)`, output `(b, n, s, d)`, rotation by +angle.
/// Otherwise the adjoint: input `(b, n, s, d)`, output `(b, s, n, d)`,
/// rotation by -angle (the gradient of the forward).
struct Rope {
    cos: Tensor,
    sin: Tensor,
    to_heads: bool,
}

impl Rope {
    fn run<T: Real>(&self, x: &[T], dims: &[usize]) -> Result<Vec<T>> {
        let (a1, a2, d) = (dims[1], dims[2], dims[3]);
        let (s, n) = if self.to_heads { (a1, a2) } else { (a2, a1) };
        let half = d / 2;
        let cos = self.cos.flatten_all()?.to_vec1::<T>()?;
        let sin = self.sin.flatten_all()?.to_vec1::<T>()?;
        let mut out = vec![T::ZERO; x.len()];
        // one output (batch, head) block of s x d per task
        out.par_chunks_mut(s * d).enumerate().for_each(|(bh, o)| {
            let (bi, hi) = (bh / n, bh % n);
            for si in 0..s {
                let src = if self.to_heads {
                    ((bi * s + si) * n + hi) * d
                } else {
                    ((bi * n + hi) * s + si) * d
                };
                let x = &x[src..src + d];
                let o = &mut o[si * d..(si + 1) * d];
                let cs = (bi * s + si) * half;
                let (c, sn) = (&cos[cs..cs + half], &sin[cs..cs + half]);
                for i in 0..half {
                    let (x1, x2) = (x[i], x[i + half]);
                    if self.to_heads {
                        o[i] = x1 * c[i] - x2 * sn[i];
                        o[i + half] = x2 * c[i] + x1 * sn[i];
                    } else {
                        o[i] = x1 * c[i] + x2 * sn[i];
                        o[i + half] = x2 * c[i] - x1 * sn[i];
                    }
                }
            }
        });
        if self.to_heads {
            Ok(out)
        } else {
            // the adjoint wrote (b, n, s, d) blocks; reorder to (b, s, n, d)
            let mut t = vec![T::ZERO; out.len()];
            t.par_chunks_mut(n * d).enumerate().for_each(|(bs, row)| {
                let (bi, si) = (bs / s, bs % s);
                for hi in 0..n {
                    let src = ((bi * n + hi) * s + si) * d;
                    row[hi * d..(hi + 1) * d].copy_from_slice(&out[src..src + d]);
                }
            });
            Ok(t)
        }
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "rope-to-heads"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let _p = nlora_adapter::profile::scope("rope (fwd)");
        let (b, a1, a2, d) = l.shape().dims4()?;
        float_dispatch!(st.dtype(), self.name(), |T| {
            let x = contiguous::<T>(st, l, self.name())?;
            let out = self.run::<T>(x, &[b, a1, a2, d])?;
            let (s, n) = if self.to_heads { (a1, a2) } else { (a2, a1) };
            let shape = if self.to_heads {
                (b, n, s, d)
            } else {
                (b, s, n, d)
            };
            Ok((T::to_cpu_storage_owned(out), Shape::from(shape)))
        })
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let _p = nlora_adapter::profile::scope("rope (bwd)");
        let adjoint = Rope {
            cos: self.cos.clone(),
            sin: self.sin.clone(),
            to_heads: !self.to_heads,
        };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&adjoint)?))
    }
}

// ---------------------------------------------------------------- RMSNorm

/// `x / sqrt(mean(x^2) + eps) * w` over the last axis; gradient for `x`
/// only (the norm weights are frozen: LoRA trains adapters alone).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let d = x.dim(candle_core::D::Minus1)?;
    if w.dims() != [d] {
        candle_core::bail!(
            "rms norm: weight {:?} does not fit x {:?}",
            w.shape(),
            x.shape()
        );
    }
    x.contiguous()?.apply_op2(&w.detach(), RmsNorm { eps })
}

struct RmsNorm {
    eps: f64,
}

fn rows_per_task(d: usize) -> usize {
    (8192 / d.max(1)).max(1)
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _p = nlora_adapter::profile::scope("rms norm (fwd)");
        let d = *xl.dims().last().unwrap_or(&1);
        float_dispatch!(xs.dtype(), self.name(), |T| {
            let x = contiguous::<T>(xs, xl, self.name())?;
            let w = contiguous::<T>(ws, wl, self.name())?;
            let eps = T::from_f64(self.eps);
            let n = T::from_f64(d as f64);
            let mut out = vec![T::ZERO; x.len()];
            let chunk = rows_per_task(d) * d;
            out.par_chunks_mut(chunk)
                .zip(x.par_chunks(chunk))
                .for_each(|(o, x)| {
                    for (o, x) in o.chunks_mut(d).zip(x.chunks(d)) {
                        let mut ss = T::ZERO;
                        x.iter().for_each(|&v| ss += v * v);
                        let r = T::ONE / (ss / n + eps).sqrt();
                        for ((o, &x), &w) in o.iter_mut().zip(x).zip(w) {
                            *o = x * r * w;
                        }
                    }
                });
            Ok((T::to_cpu_storage_owned(out), xl.shape().clone()))
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let _p = nlora_adapter::profile::scope("rms norm (bwd)");
        let gx = x.apply_op2_no_bwd(
            &Tensor::cat(&[&grad.contiguous()?.flatten_all()?, w], 0)?,
            &RmsNormBackward {
                eps: self.eps,
                d: w.dim(0)?,
            },
        )?;
        Ok((Some(gx), None))
    }
}

/// `gx = r (g w) - x r^3 mean(g w x)`, with `r = 1 / sqrt(mean(x^2) + eps)`.
/// The second operand is `[g (flattened); w]`, so one custom op sees all three.
struct RmsNormBackward {
    eps: f64,
    d: usize,
}

impl CustomOp2 for RmsNormBackward {
    fn name(&self) -> &'static str {
        "rms-norm-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gws: &CpuStorage,
        gwl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _p = nlora_adapter::profile::scope("rms norm backward");
        let d = self.d;
        float_dispatch!(xs.dtype(), self.name(), |T| {
            let x = contiguous::<T>(xs, xl, self.name())?;
            let gw = contiguous::<T>(gws, gwl, self.name())?;
            let (g, w) = gw.split_at(x.len());
            let eps = T::from_f64(self.eps);
            let n = T::from_f64(d as f64);
            let mut out = vec![T::ZERO; x.len()];
            let chunk = rows_per_task(d) * d;
            out.par_chunks_mut(chunk)
                .zip(x.par_chunks(chunk).zip(g.par_chunks(chunk)))
                .for_each(|(o, (x, g))| {
                    for ((o, x), g) in o.chunks_mut(d).zip(x.chunks(d)).zip(g.chunks(d)) {
                        let (mut ss, mut dot) = (T::ZERO, T::ZERO);
                        for ((&x, &g), &w) in x.iter().zip(g).zip(w) {
                            ss += x * x;
                            dot += g * w * x;
                        }
                        let r = T::ONE / (ss / n + eps).sqrt();
                        let k = r * r * r * dot / n;
                        for (((o, &x), &g), &w) in o.iter_mut().zip(x).zip(g).zip(w) {
                            *o = r * g * w - x * k;
                        }
                    }
                });
            Ok((T::to_cpu_storage_owned(out), xl.shape().clone()))
        })
    }
}

// ---------------------------------------------------------------- SwiGLU

/// `silu(gate) * up`, the LLaMA MLP's gating, with gradients for both.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.shape() != up.shape() {
        candle_core::bail!(
            "swiglu: gate {:?} and up {:?} differ",
            gate.shape(),
            up.shape()
        );
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, Swiglu)
}

struct Swiglu;

/// Elementwise over equally long slices, in parallel blocks.
#[inline(always)]
fn zip_map<T: Real>(inputs: [&[T]; 3], f: impl Fn(T, T, T) -> T + Sync) -> Vec<T> {
    let [a, b, c] = inputs;
    let mut out = vec![T::ZERO; a.len()];
    const BLOCK: usize = 16 * 1024;
    let f = &f;
    out.par_chunks_mut(BLOCK)
        .zip(a.par_chunks(BLOCK))
        .zip(b.par_chunks(BLOCK).zip(c.par_chunks(BLOCK)))
        .for_each(|((o, a), (b, c))| map3::<T>(o, [a, b, c], f));
    out
}

impl CustomOp2 for Swiglu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _p = nlora_adapter::profile::scope("swiglu (fwd)");
        float_dispatch!(gs.dtype(), self.name(), |T| {
            let g = contiguous::<T>(gs, gl, self.name())?;
            let u = contiguous::<T>(us, ul, self.name())?;
            let out = zip_map::<T>([g, u, u], |g, u, _| g / (1.0 + exp(-g)) * u);
            Ok((T::to_cpu_storage_owned(out), gl.shape().clone()))
        })
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let _p = nlora_adapter::profile::scope("swiglu (bwd)");
        let grad = grad.contiguous()?;
        let d_gate = grad.apply_op3_no_bwd(gate, up, &SwigluBackward { for_gate: true })?;
        let d_up = grad.apply_op3_no_bwd(gate, up, &SwigluBackward { for_gate: false })?;
        Ok((Some(d_gate), Some(d_up)))
    }
}

/// `silu(gate) * up` projected by a frozen `w (out, inter)`: the LLaMA MLP
/// after its gate and up projections, when down_proj carries no adapter.
/// The graph holds gate, up and the output; the gated `(m, inter)` product,
/// the largest activation of a layer, lives only inside the forward.
pub fn swiglu_linear(gate: &Tensor, up: &Tensor, w: &Tensor) -> Result<Tensor> {
    let h = swiglu(&gate.detach(), &up.detach())?;
    let (m_dims, inter) = (h.dims().to_vec(), w.dim(1)?);
    if m_dims.last() != Some(&inter) {
        candle_core::bail!(
            "swiglu linear: h {:?} does not fit W {:?}",
            h.shape(),
            w.shape()
        );
    }
    let y = nlora_adapter::frozen_matmul_t(&h, w)?;
    if !(gate.track_op() || up.track_op()) {
        return Ok(y);
    }
    gate.apply_op2(
        up,
        SwigluLinear {
            out: Precomputed::new(y),
            w: w.detach(),
        },
    )
}

struct SwigluLinear {
    out: Precomputed,
    w: Tensor,
}

impl CustomOp2 for SwigluLinear {
    fn name(&self) -> &'static str {
        "swiglu-linear"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _p = nlora_adapter::profile::scope("swiglu + down_proj (fwd)");
        self.out.take(self.name())
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let _p = nlora_adapter::profile::scope("swiglu + down_proj (bwd)");
        let out_f = self.w.dim(0)?;
        let m = grad.elem_count() / out_f;
        let d_h = grad
            .contiguous()?
            .reshape((m, out_f))?
            .matmul(&self.w)?
            .reshape(gate.shape())?;
        let (gate, up) = (gate.detach(), up.detach());
        let d_gate = d_h.apply_op3_no_bwd(&gate, &up, &SwigluBackward { for_gate: true })?;
        let d_up = d_h.apply_op3_no_bwd(&gate, &up, &SwigluBackward { for_gate: false })?;
        Ok((Some(d_gate), Some(d_up)))
    }
}

/// `d gate = g * up * silu'(gate)` or `d up = g * silu(gate)`.
struct SwigluBackward {
    for_gate: bool,
}

impl candle_core::CustomOp3 for SwigluBackward {
    fn name(&self) -> &'static str {
        "swiglu-backward"
    }

    fn cpu_fwd(
        &self,
        ds: &CpuStorage,
        dl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _p = nlora_adapter::profile::scope("swiglu backward");
        float_dispatch!(ds.dtype(), self.name(), |T| {
            let d = contiguous::<T>(ds, dl, self.name())?;
            let g = contiguous::<T>(gs, gl, self.name())?;
            let u = contiguous::<T>(us, ul, self.name())?;
            let out = if self.for_gate {
                zip_map::<T>([d, g, u], |d, g, u| {
                    let s = T::ONE / (T::ONE + exp(-g));
                    d * u * s * (T::ONE + g * (T::ONE - s))
                })
            } else {
                zip_map::<T>([d, g, u], |d, g, _| d * g / (T::ONE + exp(-g)))
            };
            Ok((T::to_cpu_storage_owned(out), dl.shape().clone()))
        })
    }
}

// ---------------------------------------------------------------- lm_head + cross-entropy

/// Rows of logits computed at once: a (ROWS, vocab) block, 25 MB for a 49k
/// vocabulary, instead of the whole (n, vocab) matrix. Each block repacks the
/// vocab x d weight for its two matmuls: at 64 rows that cost 20 % more
/// time than at 128 (measured, SmolLM2, 1016 rows); larger blocks gain
/// little more.
const CE_ROWS: usize = 128;

/// Per-position cross-entropy `-log softmax(h W^T)[target]`, `(n,)`, for
/// hidden states `h (n, d)` and a frozen output matrix `W (vocab, d)`,
/// without materialising the `(n, vocab)` logits: each block of rows is
/// projected, reduced to its losses, and turned at once into its share of
/// `dL/dh = (softmax - onehot) W` (the loss's input gradient, which the
/// backward only scales). Costs the same two matmuls as the unfused
/// forward + backward, but only when a gradient is wanted: use it on the
/// training path.
pub fn linear_cross_entropy(h: &Tensor, w: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let (n, d) = h.dims2()?;
    let (vocab, dw) = w.dims2()?;
    if d != dw || targets.len() != n {
        candle_core::bail!(
            "linear cross-entropy: h {:?}, W {:?} and {} targets do not fit",
            h.shape(),
            w.shape(),
            targets.len()
        );
    }
    if let Some(&t) = targets.iter().find(|&&t| t as usize >= vocab) {
        candle_core::bail!(
            "linear cross-entropy: target {t} is outside the vocabulary (0..{vocab})"
        );
    }
    h.contiguous()?.apply_op2(
        &w.contiguous()?.detach(),
        LinearCrossEntropy {
            targets: targets.to_vec(),
            grad_h: Mutex::new(None),
        },
    )
}

struct LinearCrossEntropy {
    targets: Vec<u32>,
    /// `(softmax - onehot) W`, `(n, d)`, filled by the forward.
    grad_h: Mutex<Option<Tensor>>,
}

impl LinearCrossEntropy {
    fn run<T: Real>(
        &self,
        hs: &CpuStorage,
        hl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(Vec<T>, Vec<T>)> {
        let (n, d) = hl.shape().dims2()?;
        let (vocab, _) = wl.shape().dims2()?;
        let (h_start, _) = hl.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("linear cross-entropy: h must be contiguous".into())
        })?;
        let w_t = wl.transpose(0, 1)?;
        let w_kn = Layout::contiguous_with_offset((vocab, d), wl.start_offset());
        let mut losses = vec![T::ZERO; n];
        let mut grad_h = Vec::with_capacity(n * d);
        for rows in (0..n).step_by(CE_ROWS).map(|r| r..(r + CE_ROWS).min(n)) {
            let Range { start, end } = rows;
            let m = end - start;
            let h_l = Layout::contiguous_with_offset((m, d), h_start + start * d);
            let logits = hs.matmul(ws, (1, m, vocab, d), &h_l, &w_t)?;
            let mut p = T::cpu_storage_data(logits)?;
            let targets = &self.targets[start..end];
            p.par_chunks_mut(vocab)
                .zip(losses[start..end].par_iter_mut())
                .zip(targets.par_iter())
                .for_each(|((row, loss), &t)| *loss = softmax_minus_onehot::<T>(row, t as usize));
            let p = T::to_cpu_storage_owned(p);
            let p_l = Layout::contiguous((m, vocab));
            let gh = p.matmul(ws, (1, m, d, vocab), &p_l, &w_kn)?;
            grad_h.extend_from_slice(T::cpu_storage_as_slice(&gh)?);
        }
        Ok((losses, grad_h))
    }
}

impl CustomOp2 for LinearCrossEntropy {
    fn name(&self) -> &'static str {
        "linear-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        hs: &CpuStorage,
        hl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _p = nlora_adapter::profile::scope("lm_head + cross-entropy (fwd)");
        let (n, d) = hl.shape().dims2()?;
        float_dispatch!(hs.dtype(), self.name(), |T| {
            let (losses, grad_h) = self.run::<T>(hs, hl, ws, wl)?;
            let g = Tensor::from_vec(grad_h, (n, d), &candle_core::Device::Cpu)?;
            *self
                .grad_h
                .lock()
                .map_err(|_| candle_core::Error::Msg("poisoned".into()))? = Some(g);
            Ok((T::to_cpu_storage_owned(losses), Shape::from(n)))
        })
    }

    fn bwd(
        &self,
        _h: &Tensor,
        _w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let _p = nlora_adapter::profile::scope("lm_head + cross-entropy (bwd)");
        let g = self
            .grad_h
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned".into()))?
            .clone()
            .ok_or_else(|| {
                candle_core::Error::Msg("linear cross-entropy: backward before forward".into())
            })?;
        Ok((Some(g.broadcast_mul(&grad.unsqueeze(1)?)?), None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        // deterministic values without a RNG dependency
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n)
            .map(|i| (((i as u64 + 1) * 2654435761 + seed * 97) % 1000) as f64 / 500.0 - 1.0)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    /// Value and input gradient (against a random probe) of `f` and `g` agree.
    fn same_value_and_grad(x: &Var, f: impl Fn(&Tensor) -> Tensor, g: impl Fn(&Tensor) -> Tensor) {
        let (yf, yg) = (f(x.as_tensor()), g(x.as_tensor()));
        assert_eq!(yf.dims(), yg.dims());
        assert!(
            max_diff(&yf, &yg) < 1e-12,
            "values differ by {}",
            max_diff(&yf, &yg)
        );
        let probe = rand(yf.dims(), 7);
        let gf = (yf * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gg = (yg * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let (a, b) = (
            gf.get(x.as_tensor()).unwrap(),
            gg.get(x.as_tensor()).unwrap(),
        );
        assert!(
            max_diff(a, b) < 1e-12,
            "gradients differ by {}",
            max_diff(a, b)
        );
    }

    #[test]
    fn masked_softmax_matches_the_composition() {
        let x = Var::from_tensor(&rand(&[2, 3, 4, 5], 1)).unwrap();
        let mut m = rand(&[2, 1, 4, 5], 2).to_vec1_flat();
        // mask some keys out entirely, as padding does
        for (i, v) in m.iter_mut().enumerate() {
            *v = if i % 3 == 0 { -1e9 } else { 0.0 };
        }
        let mask = Tensor::from_vec(m, (2, 1, 4, 5), &Device::Cpu).unwrap();
        same_value_and_grad(
            &x,
            |x| masked_softmax(x, &mask, 0.3).unwrap(),
            |x| {
                candle_nn::ops::softmax(
                    &(x * 0.3).unwrap().broadcast_add(&mask).unwrap(),
                    D::Minus1,
                )
                .unwrap()
            },
        );
    }

    trait Flat {
        fn to_vec1_flat(&self) -> Vec<f64>;
    }
    impl Flat for Tensor {
        fn to_vec1_flat(&self) -> Vec<f64> {
            self.flatten_all().unwrap().to_vec1::<f64>().unwrap()
        }
    }

    /// The composition the model used before: rotate-half with cat/narrow.
    fn rope_reference(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
        let x = x.transpose(1, 2).unwrap().contiguous().unwrap(); // (b, n, s, d)
        let cos = Tensor::cat(&[cos, cos], D::Minus1)
            .unwrap()
            .unsqueeze(1)
            .unwrap();
        let sin = Tensor::cat(&[sin, sin], D::Minus1)
            .unwrap()
            .unsqueeze(1)
            .unwrap();
        let d = x.dim(D::Minus1).unwrap();
        let x1 = x.narrow(D::Minus1, 0, d / 2).unwrap();
        let x2 = x.narrow(D::Minus1, d / 2, d / 2).unwrap();
        let rotated = Tensor::cat(&[&x2.neg().unwrap(), &x1], D::Minus1).unwrap();
        (x.broadcast_mul(&cos).unwrap() + rotated.broadcast_mul(&sin).unwrap()).unwrap()
    }

    #[test]
    fn rope_to_heads_matches_the_composition() {
        let (b, s, n, d) = (2, 5, 3, 8);
        let x = Var::from_tensor(&rand(&[b, s, n, d], 3)).unwrap();
        let angles = rand(&[b, s, d / 2], 4);
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        same_value_and_grad(
            &x,
            |x| rope_to_heads(x, &cos, &sin).unwrap(),
            |x| rope_reference(x, &cos, &sin),
        );
    }

    #[test]
    fn rms_norm_matches_the_composition() {
        let x = Var::from_tensor(&rand(&[2, 3, 6], 5)).unwrap();
        let w = rand(&[6], 6);
        same_value_and_grad(
            &x,
            |x| rms_norm(x, &w, 1e-5).unwrap(),
            |x| {
                let inv = (x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + 1e-5)
                    .unwrap()
                    .sqrt()
                    .unwrap()
                    .recip()
                    .unwrap();
                x.broadcast_mul(&inv).unwrap().broadcast_mul(&w).unwrap()
            },
        );
    }

    #[test]
    fn attention_matches_the_composition_for_each_input() {
        // 6 query heads sharing 2 kv heads, 4 new positions after 1 cached key
        let (b, nh, nkv, s, t, hd) = (2, 6, 2, 4, 5, 3);
        let mut m = Vec::new();
        for bi in 0..b {
            for i in 0..s {
                for j in 0..t {
                    let padded = bi == 1 && j == 0;
                    m.push(if j <= i + 1 && !padded { 0.0 } else { -1e9 });
                }
            }
        }
        let mask = Tensor::from_vec(m, (b, 1, s, t), &Device::Cpu).unwrap();
        let (q, k, v) = (
            rand(&[b, nh, s, hd], 12),
            rand(&[b, nkv, t, hd], 13),
            rand(&[b, nkv, t, hd], 14),
        );
        let reference = |q: &Tensor, k: &Tensor, v: &Tensor| {
            // repeat_kv, then plain attention
            let rep = |x: &Tensor| {
                let (b, n, t, d) = x.dims4().unwrap();
                x.unsqueeze(2)
                    .unwrap()
                    .expand((b, n, nh / nkv, t, d))
                    .unwrap()
                    .reshape((b, nh, t, d))
                    .unwrap()
            };
            let scores = (q.matmul(&rep(k).t().unwrap()).unwrap() * 0.4)
                .unwrap()
                .broadcast_add(&mask)
                .unwrap();
            candle_nn::ops::softmax(&scores, D::Minus1)
                .unwrap()
                .matmul(&rep(v))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .reshape((b, s, nh * hd))
                .unwrap()
        };
        let x = Var::from_tensor(&q).unwrap();
        same_value_and_grad(
            &x,
            |q| attention(q, &k, &v, &mask, 0.4).unwrap(),
            |q| reference(q, &k, &v),
        );
        let x = Var::from_tensor(&k).unwrap();
        same_value_and_grad(
            &x,
            |k| attention(&q, k, &v, &mask, 0.4).unwrap(),
            |k| reference(&q, k, &v),
        );
        let x = Var::from_tensor(&v).unwrap();
        same_value_and_grad(
            &x,
            |v| attention(&q, &k, v, &mask, 0.4).unwrap(),
            |v| reference(&q, &k, v),
        );
    }

    #[test]
    fn swiglu_matches_the_composition() {
        let x = Var::from_tensor(&rand(&[3, 10], 10)).unwrap();
        let up = rand(&[3, 10], 11);
        // gradient for the gate
        same_value_and_grad(
            &x,
            |g| swiglu(g, &up).unwrap(),
            |g| (g.silu().unwrap() * &up).unwrap(),
        );
        // and for the up projection
        same_value_and_grad(
            &x,
            |u| swiglu(&up, u).unwrap(),
            |u| (up.silu().unwrap() * u).unwrap(),
        );
    }

    #[test]
    fn swiglu_linear_matches_the_composition() {
        let gate = Var::from_tensor(&rand(&[2, 3, 10], 15)).unwrap();
        let up = rand(&[2, 3, 10], 16);
        let w = rand(&[4, 10], 17);
        let reference = |g: &Tensor, u: &Tensor| {
            (g.silu().unwrap() * u)
                .unwrap()
                .broadcast_matmul(&w.t().unwrap())
                .unwrap()
        };
        same_value_and_grad(
            &gate,
            |g| swiglu_linear(g, &up, &w).unwrap(),
            |g| reference(g, &up),
        );
        same_value_and_grad(
            &gate,
            |u| swiglu_linear(&up, u, &w).unwrap(),
            |u| reference(&up, u),
        );
    }

    #[test]
    fn linear_cross_entropy_matches_log_softmax_of_the_logits() {
        // more rows than one block, so the blocking is exercised
        let (n, d, vocab) = (CE_ROWS + 7, 4, 11);
        let h = Var::from_tensor(&rand(&[n, d], 8)).unwrap();
        let w = rand(&[vocab, d], 9);
        let targets: Vec<u32> = (0..n).map(|i| (i * 5 % vocab) as u32).collect();
        let t = Tensor::from_vec(targets.clone(), n, &Device::Cpu).unwrap();
        same_value_and_grad(
            &h,
            |h| linear_cross_entropy(h, &w, &targets).unwrap(),
            |h| {
                let logits = h.matmul(&w.t().unwrap()).unwrap();
                candle_nn::ops::log_softmax(&logits, D::Minus1)
                    .unwrap()
                    .gather(&t.unsqueeze(1).unwrap(), 1)
                    .unwrap()
                    .squeeze(1)
                    .unwrap()
                    .neg()
                    .unwrap()
            },
        );
        assert!(linear_cross_entropy(h.as_tensor(), &w, &[vocab as u32; CE_ROWS + 7]).is_err());
    }
}

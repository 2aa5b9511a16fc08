//! The whole adapted linear layer as one op on the CPU:
//! `y = x W0^T + b0 + (x A_h^T) B_h^T + s (dropout(x) A^T) B^T`.
//!
//! Composed from candle ops, the layer leaves five activation-sized tensors
//! in the autograd graph (the base output, the dropped-out input, the
//! update, and two sums); this op leaves only `y` and a small `(m, r)`
//! intermediate, and its backward draws the dropout mask again from the
//! seed. Gradients: for `x`, `A` and `B`; W0, the bias and the earlier
//! tasks' adapters are frozen.
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};
use std::sync::Mutex;

use crate::site::Dropout;

/// The frozen parts of a site, as the op needs them.
pub(crate) struct Frozen<'a> {
    pub weight: &'a Tensor,
    pub bias: Option<&'a Tensor>,
    /// Earlier tasks' `(A_h (R, in), s_h B_h (out, R))`.
    pub history: Option<(&'a Tensor, &'a Tensor)>,
}

/// `x (..., in)`, current `a (r, in)`, `b (out, r)` with scale `scale`;
/// `dropout` = (p, seed) when the current adapter's input is dropped out.
pub(crate) fn lora_linear(
    x: &Tensor,
    a: &Tensor,
    b: &Tensor,
    frozen: Frozen<'_>,
    scale: f64,
    dropout: Option<Dropout>,
) -> Result<Tensor> {
    x.contiguous()?.apply_op3(
        &a.contiguous()?,
        &b.contiguous()?,
        LoraLinear {
            weight: frozen.weight.contiguous()?,
            bias: frozen.bias.cloned(),
            history: match frozen.history {
                Some((ha, hb)) => Some((ha.contiguous()?, hb.contiguous()?)),
                None => None,
            },
            scale,
            dropout,
            xa: Mutex::new(None),
        },
    )
}

struct LoraLinear {
    weight: Tensor,
    bias: Option<Tensor>,
    history: Option<(Tensor, Tensor)>,
    scale: f64,
    dropout: Option<Dropout>,
    /// `dropout(x) A^T`, `(m, r)`, kept by the forward for B's gradient.
    xa: Mutex<Option<Tensor>>,
}

/// `lhs (m, k) @ rhs^T` for a contiguous `rhs (n, k)` held by a tensor.
fn matmul_t(lhs: &CpuStorage, lhs_l: &Layout, rhs: &Tensor) -> Result<CpuStorage> {
    let (n, k) = rhs.dims2()?;
    let m = lhs_l.shape().elem_count() / k;
    let (st, l) = rhs.storage_and_layout();
    let Storage::Cpu(rs) = &*st else {
        candle_core::bail!("lora linear: CPU tensors only");
    };
    lhs.matmul(rs, (1, m, n, k), lhs_l, &l.transpose(0, 1)?)
}

/// `acc += add` elementwise (same dtype and length).
fn add_into(acc: &mut CpuStorage, add: &CpuStorage) -> Result<()> {
    match (acc, add) {
        (CpuStorage::F32(a), CpuStorage::F32(b)) => a.iter_mut().zip(b).for_each(|(a, b)| *a += b),
        (CpuStorage::F64(a), CpuStorage::F64(b)) => a.iter_mut().zip(b).for_each(|(a, b)| *a += b),
        _ => candle_core::bail!("lora linear: f32 or f64 tensors of one dtype only"),
    }
    Ok(())
}

/// Adds `row` to every row of `y`.
fn add_rows<T: Copy + std::ops::AddAssign>(y: &mut [T], row: &[T]) {
    for chunk in y.chunks_mut(row.len()) {
        chunk.iter_mut().zip(row).for_each(|(y, &b)| *y += b);
    }
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        as_: &CpuStorage,
        al: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _p = crate::profile::scope("lora linear (fwd)");
        if !matches!(xs.dtype(), DType::F32 | DType::F64) {
            candle_core::bail!("lora linear: dtype {:?} (f32, f64 only)", xs.dtype());
        }
        let (out_f, in_f) = self.weight.dims2()?;
        let (r, _) = al.shape().dims2()?;
        let m = xl.shape().elem_count() / in_f;
        let Some((x_start, _)) = xl.contiguous_offsets() else {
            candle_core::bail!("lora linear: input must be contiguous");
        };
        let x2 = Layout::contiguous_with_offset((m, in_f), x_start);
        let mut y = matmul_t(xs, &x2, &self.weight)?;
        if let Some(bias) = &self.bias {
            let (st, l) = bias.storage_and_layout();
            let Storage::Cpu(bias) = &*st else {
                candle_core::bail!("lora linear: CPU tensors only");
            };
            let start = l.start_offset();
            match (&mut y, bias) {
                (CpuStorage::F32(y), CpuStorage::F32(b)) => add_rows(y, &b[start..start + out_f]),
                (CpuStorage::F64(y), CpuStorage::F64(b)) => add_rows(y, &b[start..start + out_f]),
                _ => candle_core::bail!("lora linear: bias dtype differs from the input's"),
            }
        }
        if let Some((ha, hb)) = &self.history {
            let hx = matmul_t(xs, &x2, ha)?;
            let hr = ha.dim(0)?;
            add_into(&mut y, &matmul_t(&hx, &Layout::contiguous((m, hr)), hb)?)?;
        }
        // s (dropout(x) A^T) B^T, the scale on the (m, r) intermediate
        let a_l = al.transpose(0, 1)?;
        let xa = match &self.dropout {
            Some(d) => {
                let xd = d.cpu_apply(xs, &x2)?;
                xd.matmul(as_, (1, m, r, in_f), &Layout::contiguous((m, in_f)), &a_l)?
            }
            None => xs.matmul(as_, (1, m, r, in_f), &x2, &a_l)?,
        };
        let xa_l = Layout::contiguous((m, r));
        let xa_scaled = xa.affine(&xa_l, self.scale, 0.0)?;
        let u = xa_scaled.matmul(bs, (1, m, out_f, r), &xa_l, &bl.transpose(0, 1)?)?;
        add_into(&mut y, &u)?;
        let xa = match xa {
            CpuStorage::F32(v) => Tensor::from_vec(v, (m, r), &candle_core::Device::Cpu)?,
            CpuStorage::F64(v) => Tensor::from_vec(v, (m, r), &candle_core::Device::Cpu)?,
            _ => candle_core::bail!("lora linear: f32 or f64 only"),
        };
        *self
            .xa
            .lock()
            .map_err(|_| candle_core::Error::Msg("lora linear: poisoned".into()))? = Some(xa);
        let mut dims = xl.dims().to_vec();
        *dims.last_mut().expect("rank >= 1") = out_f;
        Ok((y, Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _p = crate::profile::scope("lora linear (bwd)");
        let (out_f, in_f) = self.weight.dims2()?;
        let m = grad.elem_count() / out_f;
        let (a, b) = (a.detach(), b.detach());
        let g = grad.contiguous()?.reshape((m, out_f))?;
        let x2 = x.detach().reshape((m, in_f))?;
        let xa = self
            .xa
            .lock()
            .map_err(|_| candle_core::Error::Msg("lora linear: poisoned".into()))?
            .clone()
            .ok_or_else(|| {
                candle_core::Error::Msg("lora linear: backward before forward".into())
            })?;
        let gb = g.matmul(&b)?; // (m, r)
        let grad_b = (g.t()?.matmul(&xa)? * self.scale)?; // (out, r)
        let xd = match &self.dropout {
            Some(d) => x2.apply_op1_no_bwd(d)?,
            None => x2,
        };
        let grad_a = (gb.t()?.matmul(&xd)? * self.scale)?; // (r, in)
        let mut gx_lora = (gb.matmul(&a)? * self.scale)?; // (m, in)
        if let Some(d) = &self.dropout {
            // dropout's backward: the same mask on the gradient
            gx_lora = gx_lora.apply_op1_no_bwd(d)?;
        }
        let mut gx = (g.matmul(&self.weight)? + gx_lora)?;
        if let Some((ha, hb)) = &self.history {
            gx = (gx + g.matmul(hb)?.matmul(ha)?)?;
        }
        Ok((Some(gx.reshape(x.shape())?), Some(grad_a), Some(grad_b)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n)
            .map(|i| (((i as u64 + 3) * 2654435761 + seed * 7919) % 2000) as f64 / 1000.0 - 1.0)
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

    #[test]
    fn fused_layer_matches_the_composition_in_value_and_gradients() {
        let (in_f, out_f, r, hr) = (6, 5, 3, 4);
        let w = rand(&[out_f, in_f], 1);
        let bias = rand(&[out_f], 2);
        let (ha, hb) = (rand(&[hr, in_f], 3), rand(&[out_f, hr], 4));
        for dropout in [None, Some(Dropout { p: 0.3, seed: 9 })] {
            for with_extras in [false, true] {
                let x = Var::from_tensor(&rand(&[2, 7, in_f], 5)).unwrap();
                let a = Var::from_tensor(&rand(&[r, in_f], 6)).unwrap();
                let b = Var::from_tensor(&rand(&[out_f, r], 7)).unwrap();
                let frozen = Frozen {
                    weight: &w,
                    bias: with_extras.then_some(&bias),
                    history: with_extras.then_some((&ha, &hb)),
                };
                let fused = lora_linear(
                    x.as_tensor(),
                    a.as_tensor(),
                    b.as_tensor(),
                    frozen,
                    1.7,
                    dropout.clone(),
                )
                .unwrap();
                let xt = x.as_tensor();
                let mut reference = xt.broadcast_matmul(&w.t().unwrap()).unwrap();
                if with_extras {
                    reference = reference.broadcast_add(&bias).unwrap();
                    let h = xt
                        .broadcast_matmul(&ha.t().unwrap())
                        .unwrap()
                        .broadcast_matmul(&hb.t().unwrap())
                        .unwrap();
                    reference = (reference + h).unwrap();
                }
                let xd = match &dropout {
                    Some(d) => xt.contiguous().unwrap().apply_op1(d.clone()).unwrap(),
                    None => xt.clone(),
                };
                let u = xd
                    .broadcast_matmul(&a.as_tensor().t().unwrap())
                    .unwrap()
                    .broadcast_matmul(&b.as_tensor().t().unwrap())
                    .unwrap();
                let reference = (reference + (u * 1.7).unwrap()).unwrap();
                assert!(max_diff(&fused, &reference) < 1e-12);
                let probe = rand(fused.dims(), 8);
                let gf = (fused * &probe)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let gr = (reference * &probe)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                for v in [x.as_tensor(), a.as_tensor(), b.as_tensor()] {
                    let d = max_diff(gf.get(v).unwrap(), gr.get(v).unwrap());
                    assert!(d < 1e-12, "gradient of {:?} differs by {d}", v.dims());
                }
            }
        }
    }
}

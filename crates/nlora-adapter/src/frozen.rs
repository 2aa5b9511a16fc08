//! A linear layer whose weight never receives a gradient.
//!
//! candle's `matmul` backward always computes the gradient of both operands,
//! even when one of them is a constant: for a frozen base weight W0 that is a
//! full `in x out` product per layer and step, thrown away afterwards. The
//! custom op below runs the same matmul forward but its backward returns only
//! dL/dx = dL/dy W0, so training LoRA adapters costs what it should.
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

/// `y = x W^T` for `x (..., in)` and a frozen `W (out, in)`; gradient flows to `x` only.
pub fn frozen_matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (out_f, in_f) = w.dims2()?;
    let x_in = x.dim(candle_core::D::Minus1)?;
    if x_in != in_f {
        candle_core::bail!(
            "frozen linear: input has {x_in} features, weight {:?} expects {in_f}",
            w.shape()
        );
    }
    if x.dtype() != w.dtype() {
        candle_core::bail!(
            "frozen linear: input dtype {:?} differs from weight dtype {:?}",
            x.dtype(),
            w.dtype()
        );
    }
    if out_f == 0 || in_f == 0 {
        candle_core::bail!("frozen linear: empty weight {:?}", w.shape());
    }
    // The op reads x as one (m, in) row-major block; the graph records it only
    // when x depends on a trainable variable.
    x.contiguous()?.apply_op2(&w.detach(), FrozenMatmulT)
}

/// Forward `x (..., in) @ w (out, in)^T`; backward `dx = dy @ w`, nothing for `w`.
struct FrozenMatmulT;

impl FrozenMatmulT {
    fn fwd<S: BackendStorage>(x: &S, x_l: &Layout, w: &S, w_l: &Layout) -> Result<(S, Shape)> {
        let (out_f, in_f) = w_l.shape().dims2()?;
        let m = x_l.shape().elem_count() / in_f.max(1);
        let x_2d = match x_l.contiguous_offsets() {
            Some((start, _)) => Layout::contiguous_with_offset((m, in_f), start),
            None => candle_core::bail!("frozen linear: input must be contiguous"),
        };
        let w_t = w_l.transpose(0, 1)?;
        let y = x.matmul(w, (1, m, out_f, in_f), &x_2d, &w_t)?;
        let mut dims = x_l.dims().to_vec();
        *dims.last_mut().expect("rank >= 1 checked by dim(Minus1)") = out_f;
        Ok((y, Shape::from(dims)))
    }
}

impl CustomOp2 for FrozenMatmulT {
    fn name(&self) -> &'static str {
        "frozen-matmul-t"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_l: &Layout,
        w: &CpuStorage,
        w_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _p = crate::profile::scope("frozen linear (fwd)");
        Self::fwd(x, x_l, w, w_l)
    }

    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        x_l: &Layout,
        w: &candle_core::CudaStorage,
        w_l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Self::fwd(x, x_l, w, w_l)
    }

    fn metal_fwd(
        &self,
        x: &candle_core::MetalStorage,
        x_l: &Layout,
        w: &candle_core::MetalStorage,
        w_l: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        Self::fwd(x, x_l, w, w_l)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let _p = crate::profile::scope("frozen linear (bwd)");
        let out_f = w.dim(0)?;
        let m = grad_y.elem_count() / out_f.max(1);
        let grad_x = grad_y
            .contiguous()?
            .reshape((m, out_f))?
            .matmul(w)?
            .reshape(x.shape())?;
        Ok((Some(grad_x), None))
    }
}

/// A frozen linear layer `y = x W0^T + b0` (PyTorch/PEFT weight layout `(out, in)`).
#[derive(Debug, Clone)]
pub struct FrozenLinear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl FrozenLinear {
    /// `weight (out, in)`, optional `bias (out)`. Both are detached: they never train.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (out_f, _) = weight.dims2()?;
        if let Some(b) = &bias {
            if b.dims() != [out_f] {
                candle_core::bail!(
                    "frozen linear: bias shape {:?} does not match weight {:?}",
                    b.shape(),
                    weight.shape()
                );
            }
        }
        Ok(Self {
            weight: weight.detach(),
            bias: bias.map(|b| b.detach()),
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = frozen_matmul_t(x, &self.weight)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    pub fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }

    /// Replaces W0 (e.g. after merging earlier adapters into it).
    pub(crate) fn set_weight(&mut self, weight: Tensor) {
        self.weight = weight.detach();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    fn rand(shape: &[usize]) -> Tensor {
        Tensor::randn(0f64, 1.0, shape, &Device::Cpu).unwrap()
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
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
    fn forward_and_input_gradient_match_plain_matmul() {
        let w = rand(&[5, 3]);
        // a transposed (non-contiguous) input exercises the contiguity handling
        let x = Var::from_tensor(&rand(&[2, 3, 4])).unwrap();
        let xt = x.as_tensor().transpose(1, 2).unwrap(); // (2, 4, 3)
        let y = frozen_matmul_t(&xt, &w).unwrap();
        let y_ref = xt.broadcast_matmul(&w.t().unwrap()).unwrap();
        assert_eq!(y.dims(), [2, 4, 5]);
        assert!(max_abs_diff(&y, &y_ref) < 1e-12);

        let probe = rand(&[2, 4, 5]);
        let g = (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let g_ref = (y_ref * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let (gx, gx_ref) = (
            g.get(x.as_tensor()).unwrap(),
            g_ref.get(x.as_tensor()).unwrap(),
        );
        assert!(max_abs_diff(gx, gx_ref) < 1e-12);
    }

    #[test]
    fn backward_returns_no_weight_gradient() {
        let w = rand(&[5, 3]);
        let x = rand(&[4, 3]);
        let y = frozen_matmul_t(&x, &w).unwrap();
        let gy = rand(&[4, 5]);
        let (gx, gw) = FrozenMatmulT.bwd(&x, &w, &y, &gy).unwrap();
        assert!(gw.is_none(), "a frozen weight must get no gradient");
        assert!(max_abs_diff(&gx.unwrap(), &gy.matmul(&w).unwrap()) < 1e-12);
    }

    #[test]
    fn mismatched_input_is_an_error_not_a_panic() {
        let w = rand(&[5, 3]);
        assert!(frozen_matmul_t(&rand(&[4, 2]), &w).is_err());
        let x32 = rand(&[4, 3]).to_dtype(DType::F32).unwrap();
        assert!(frozen_matmul_t(&x32, &w).is_err());
        assert!(FrozenLinear::new(w.clone(), Some(rand(&[4]))).is_err());
    }
}

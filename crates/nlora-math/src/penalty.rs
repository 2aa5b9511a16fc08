//! Training regularisers on candle tensors, differentiable, summed over the
//! adapter sites of a model: N-LoRA's l1 on the update (paper eq. 3-4), the
//! reference code's r x r variant, O-LoRA's orthogonality and l2 terms
//! (paper eq. 1), and the ablations SA / SB / SAB (paper section 4.5).
//!
//! Shapes follow PEFT: lora_A is (r, in), lora_B is (out, r), dW = B @ A.
//! Every function returns a 0-dim tensor in the sites' dtype (f32 or f64).
//!
//! Three choices keep the gradients right and the memory small:
//! - |x| is composed as `x * sign(x)` with the sign detached, so that an exact
//!   zero gets the subgradient 0 (PyTorch's convention). candle's own `abs`
//!   backward uses `x >= 0 ? 1 : -1`, which gives +1 at zero: a freshly
//!   initialised adapter (B = 0) would be pushed off zero by the penalty.
//! - The l1 of the full update is computed with a hand-written gradient
//!   ([`nlora_l1`]), so that each site's out x in update lives only while that
//!   site is processed instead of being held by the autograd graph until
//!   `backward`.
//! - The plain (not squared) l2 norm has a zero subgradient at a zero matrix
//!   rather than candle's `0 / 0`.

use candle_core::Tensor;

use crate::error::{site_label, MathError, Result};

/// One adapter site as the penalties see it: the trainable adapter of the
/// current task and, optionally, the frozen earlier tasks' adapters stacked
/// along the rank axis (as the reference code keeps them).
#[derive(Clone, Copy, Debug)]
pub struct Site<'a> {
    /// Module path, used in error messages (e.g. `model.layers.3.self_attn.v_proj`).
    pub name: Option<&'a str>,
    /// Current task's lora_A, (r, in).
    pub a: &'a Tensor,
    /// Current task's lora_B, (out, r).
    pub b: &'a Tensor,
    /// Earlier tasks' lora_A stacked along the rank axis, (r_prev, in).
    pub previous_a: Option<&'a Tensor>,
    /// Earlier tasks' lora_B stacked along the rank axis, (out, r_prev).
    pub previous_b: Option<&'a Tensor>,
}

impl<'a> Site<'a> {
    /// A site with the current adapter only (no earlier tasks).
    pub fn new(a: &'a Tensor, b: &'a Tensor) -> Self {
        Site {
            name: None,
            a,
            b,
            previous_a: None,
            previous_b: None,
        }
    }

    /// Names the site for error messages.
    pub fn named(mut self, name: &'a str) -> Self {
        self.name = Some(name);
        self
    }

    /// Adds the frozen earlier tasks' stacked adapters.
    pub fn with_previous(mut self, previous_a: &'a Tensor, previous_b: &'a Tensor) -> Self {
        self.previous_a = Some(previous_a);
        self.previous_b = Some(previous_b);
        self
    }

    /// Checks the PEFT shapes and dtypes; returns (r, in, out).
    fn check(&self, index: usize) -> Result<(usize, usize, usize)> {
        let label = || site_label(index, self.name);
        let shape_err = |detail: String| MathError::Shape {
            site: label(),
            detail,
        };
        let (r, in_features) = self.a.dims2().map_err(|_| {
            shape_err(format!(
                "lora_A must be 2-D (r, in), got {:?}",
                self.a.dims()
            ))
        })?;
        let (out_features, r_b) = self.b.dims2().map_err(|_| {
            shape_err(format!(
                "lora_B must be 2-D (out, r), got {:?}",
                self.b.dims()
            ))
        })?;
        if r_b != r {
            return Err(shape_err(format!(
                "lora_A is {r}x{in_features} but lora_B is {out_features}x{r_b}: their ranks differ \
                 (PEFT layout is lora_A (r, in), lora_B (out, r))"
            )));
        }
        let dtype = self.a.dtype();
        if !dtype.is_float() {
            return Err(shape_err(format!(
                "lora_A has dtype {dtype:?}; penalties need a float dtype"
            )));
        }
        let check_dtype = |what: &str, t: &Tensor| {
            if t.dtype() == dtype {
                Ok(())
            } else {
                Err(shape_err(format!(
                    "{what} has dtype {:?} but lora_A has {dtype:?}; convert them to one dtype",
                    t.dtype()
                )))
            }
        };
        check_dtype("lora_B", self.b)?;
        if let Some(pa) = self.previous_a {
            check_dtype("previous lora_A", pa)?;
            let (_, pin) = pa.dims2().map_err(|_| {
                shape_err(format!(
                    "previous lora_A must be 2-D (r_prev, in), got {:?}",
                    pa.dims()
                ))
            })?;
            if pin != in_features {
                return Err(shape_err(format!(
                    "previous lora_A is {:?} but the current lora_A has in = {in_features}",
                    pa.dims()
                )));
            }
        }
        if let Some(pb) = self.previous_b {
            check_dtype("previous lora_B", pb)?;
            let (pout, _) = pb.dims2().map_err(|_| {
                shape_err(format!(
                    "previous lora_B must be 2-D (out, r_prev), got {:?}",
                    pb.dims()
                ))
            })?;
            if pout != out_features {
                return Err(shape_err(format!(
                    "previous lora_B is {:?} but the current lora_B has out = {out_features}",
                    pb.dims()
                )));
            }
        }
        Ok((r, in_features, out_features))
    }
}

/// Which matrix N-LoRA's l1 penalty is taken on.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum NLoraForm {
    /// Paper eq. 3-4: `||scale * B @ A||_1`, the full out x in update. The paper
    /// and the reference code both use scale = 1 (no alpha / r).
    Update {
        /// The factor in dW = scale * B @ A.
        scale: f64,
    },
    /// The reference code's `||A @ B||_1` (lora_A @ lora_B, r x r); defined only
    /// when in == out.
    ReferenceCode,
}

impl Default for NLoraForm {
    /// The paper form with scale 1.
    fn default() -> Self {
        NLoraForm::Update { scale: 1.0 }
    }
}

/// Which form of O-LoRA's orthogonality loss (paper eq. 1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OrthogonalityForm {
    /// Paper eq. 1: `SUM ||A_prev @ A_new^T||_F^2`.
    #[default]
    FrobeniusSquared,
    /// The reference code: `SUM |A_prev @ A_new^T|`, an elementwise absolute sum.
    AbsSum,
}

/// Which LoRA factor the ablations of paper section 4.5 make sparse.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FactorSparsity {
    /// SA: `lambda * SUM ||A||_1`.
    OnlyA,
    /// SB: `lambda * SUM ||B||_1`.
    OnlyB,
    /// SAB: `lambda * SUM (||A||_1 + ||B||_1)`.
    Both,
}

/// N-LoRA's sparsity penalty, paper eq. 3-4: `lambda * SUM_sites ||scale * B @ A||_1`
/// (or the reference code's `||A @ B||_1`, see [`NLoraForm`]).
///
/// The paper form's gradient is written by hand, `d/dA = |scale| B^T sign(BA)`,
/// `d/dB = |scale| sign(BA) A^T` with sign(0) = 0, and attached through a
/// surrogate `v + <A - A', G_A> + <B - B', G_B>` (A', B' detached) whose value is
/// `v` and whose gradient is (G_A, G_B). Each site's dW is dropped before the
/// next site is processed; only r x in and out x r tensors stay in the graph.
pub fn nlora_l1(sites: &[Site<'_>], lambda: f64, form: NLoraForm) -> Result<Tensor> {
    check_weight("lambda", lambda)?;
    if sites.is_empty() {
        return Err(MathError::NoSites { what: "nlora_l1" });
    }
    let mut total = Accumulator::default();
    for (index, site) in sites.iter().enumerate() {
        let (r, in_features, out_features) = site.check(index)?;
        let term = match form {
            NLoraForm::Update { scale } => {
                check_scale(scale)?;
                update_l1(site.a, site.b)?.affine(scale.abs(), 0.0)?
            }
            NLoraForm::ReferenceCode => {
                if in_features != out_features {
                    return Err(MathError::ReferenceCodeNotSquare {
                        site: site_label(index, site.name),
                        r,
                        in_features,
                        out_features,
                    });
                }
                l1_sum(&site.a.matmul(site.b)?)?
            }
        };
        total.add(term)?;
    }
    total.finish(sites[0].a, lambda)
}

/// O-LoRA's orthogonality loss (paper eq. 1): `lambda_1 * SUM_sites ||A_prev @ A_new^T||`,
/// squared Frobenius (paper) or elementwise absolute sum (reference code).
/// Sites without earlier tasks contribute 0.
pub fn olora_orthogonality(
    sites: &[Site<'_>],
    lambda_1: f64,
    form: OrthogonalityForm,
) -> Result<Tensor> {
    check_weight("lambda_1", lambda_1)?;
    if sites.is_empty() {
        return Err(MathError::NoSites {
            what: "olora_orthogonality",
        });
    }
    let mut total = Accumulator::default();
    for (index, site) in sites.iter().enumerate() {
        site.check(index)?;
        let Some(previous_a) = site.previous_a else {
            continue;
        };
        // (r_prev, in) @ (in, r): small, so plain autograd is fine here.
        let overlap = previous_a.matmul(&site.a.t()?)?;
        let term = match form {
            OrthogonalityForm::FrobeniusSquared => overlap.sqr()?.sum_all()?,
            OrthogonalityForm::AbsSum => l1_sum(&overlap)?,
        };
        total.add(term)?;
    }
    total.finish(sites[0].a, lambda_1)
}

/// O-LoRA's l2 term as coded: `lambda_2 * SUM_sites (||A||_2 + ||B||_2)`, the plain
/// (not squared) Frobenius norm of the new adapter's factors. Its gradient at a
/// zero matrix (B at initialisation) is 0, not NaN.
pub fn olora_l2(sites: &[Site<'_>], lambda_2: f64) -> Result<Tensor> {
    check_weight("lambda_2", lambda_2)?;
    if sites.is_empty() {
        return Err(MathError::NoSites { what: "olora_l2" });
    }
    let mut total = Accumulator::default();
    for (index, site) in sites.iter().enumerate() {
        site.check(index)?;
        total.add(frobenius_norm(site.a)?)?;
        total.add(frobenius_norm(site.b)?)?;
    }
    total.finish(sites[0].a, lambda_2)
}

/// The sparsity ablations of paper section 4.5 (SA, SB, SAB): l1 on the LoRA
/// factors instead of on their product.
pub fn factor_l1(sites: &[Site<'_>], lambda: f64, which: FactorSparsity) -> Result<Tensor> {
    check_weight("lambda", lambda)?;
    if sites.is_empty() {
        return Err(MathError::NoSites { what: "factor_l1" });
    }
    let mut total = Accumulator::default();
    for (index, site) in sites.iter().enumerate() {
        site.check(index)?;
        if matches!(which, FactorSparsity::OnlyA | FactorSparsity::Both) {
            total.add(l1_sum(site.a)?)?;
        }
        if matches!(which, FactorSparsity::OnlyB | FactorSparsity::Both) {
            total.add(l1_sum(site.b)?)?;
        }
    }
    total.finish(sites[0].a, lambda)
}

/// `||B @ A||_1` with the hand-written gradient described at [`nlora_l1`].
fn update_l1(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let a_const = a.detach();
    let b_const = b.detach();
    let update = b_const.matmul(&a_const)?; // out x in, dropped at the end of this function
    let value = update.abs()?.sum_all()?;
    let sign = update.sign()?;
    let grad_a = b_const.t()?.matmul(&sign)?; // r x in
    let grad_b = sign.matmul(&a_const.t()?)?; // out x r
    drop(sign);
    drop(update);
    // a - a_const is exactly zero, so the value is exactly `value`.
    let carrier_a = ((a - &a_const)? * grad_a)?.sum_all()?;
    let carrier_b = ((b - &b_const)? * grad_b)?.sum_all()?;
    Ok(((value + carrier_a)? + carrier_b)?)
}

/// `sum |x|` whose gradient is sign(x), 0 at exact zeros.
fn l1_sum(x: &Tensor) -> Result<Tensor> {
    let sign = x.detach().sign()?;
    Ok((x * sign)?.sum_all()?)
}

/// `||x||_F` whose gradient at x = 0 is 0 instead of 0/0: both branches of the
/// `where` are finite, the classic "double where".
fn frobenius_norm(x: &Tensor) -> Result<Tensor> {
    let squares = x.sqr()?.sum_all()?;
    let positive = squares.gt(0.0)?;
    let ones = squares.ones_like()?;
    let safe = positive.where_cond(&squares, &ones)?;
    Ok(positive.where_cond(&safe.sqrt()?, &squares.zeros_like()?)?)
}

/// Sums scalar terms; an empty sum is a zero of the sites' dtype and device.
#[derive(Default)]
struct Accumulator {
    total: Option<Tensor>,
}

impl Accumulator {
    fn add(&mut self, term: Tensor) -> Result<()> {
        self.total = Some(match self.total.take() {
            None => term,
            Some(total) => (total + term)?,
        });
        Ok(())
    }

    fn finish(self, like: &Tensor, weight: f64) -> Result<Tensor> {
        match self.total {
            Some(total) => Ok(total.affine(weight, 0.0)?),
            None => Ok(Tensor::zeros((), like.dtype(), like.device())?),
        }
    }
}

fn check_weight(name: &'static str, value: f64) -> Result<()> {
    if value.is_finite() && value >= 0.0 {
        Ok(())
    } else {
        Err(MathError::InvalidParameter {
            name,
            value,
            reason: "a penalty weight must be a finite number >= 0",
        })
    }
}

fn check_scale(scale: f64) -> Result<()> {
    if scale.is_finite() {
        Ok(())
    } else {
        Err(MathError::InvalidParameter {
            name: "scale",
            value: scale,
            reason: "the update's scale must be finite (1 as in the paper, or alpha / r)",
        })
    }
}

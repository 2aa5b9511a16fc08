//! EWC (Kirkpatrick et al. 2017): SeqFT plus
//! `ewc_lambda * sum_i F_i (theta_i - theta*_i)^2` over every trainable weight.
//!
//! F is the diagonal empirical Fisher: the mean over `fisher_examples`
//! training examples of the task (seeded choice) of each example's squared
//! gradient of its task loss (mean cross-entropy over its label tokens, no
//! dropout), at the weights the task ended with. Online form (Schwarz et al.
//! 2018): one accumulated `F <- ewc_gamma * F + F_task` and theta* = the
//! weights at the latest task's end, rather than one term per earlier task
//! (each term would hold two more copies of the weights: ~0.9 GB per task
//! for SmolLM2-135M). With gamma = 1 the importances of all tasks add up.
//! The accumulated F is saved beside the task's weights (`ewc_fisher.safetensors`)
//! for resume.
use candle_core::{Tensor, Var};
use nlora_adapter::{AdapterSites, ForwardMode, LoraConfig};
use nlora_model::lm::LanguageModel;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::baseline::save_tensors;
use super::{Baseline, LossPart, Method, StageContext};
use crate::checkpoint::{load_safetensors, named_trainable};
use crate::config::{MethodName, MethodSection};
use crate::error::{Result, TrainError};
use crate::trainer::derive_seed;

/// The accumulated Fisher at a task's end (the trainable variables' names).
pub const FISHER_FILE: &str = "ewc_fisher.safetensors";

/// The diagonal empirical Fisher of `vars`: the mean over `n` examples of
/// the squared gradient of `loss_of(i)` (one example's loss). A variable the
/// loss does not reach gets zeros.
pub fn diagonal_fisher(
    vars: &[(String, Var)],
    n: usize,
    mut loss_of: impl FnMut(usize) -> Result<Tensor>,
) -> Result<Vec<(String, Tensor)>> {
    let mut acc: Vec<Tensor> = vars
        .iter()
        .map(|(_, v)| Ok(v.zeros_like()?))
        .collect::<Result<_>>()?;
    for i in 0..n {
        let grads = loss_of(i)?.backward()?;
        for ((_, v), a) in vars.iter().zip(acc.iter_mut()) {
            if let Some(g) = grads.get(v.as_tensor()) {
                *a = (&*a + g.sqr()?)?;
            }
        }
    }
    let inv = 1.0 / n.max(1) as f64;
    vars.iter()
        .zip(acc)
        .map(|((name, _), a)| Ok((name.clone(), a.affine(inv, 0.0)?)))
        .collect()
}

/// `lambda * sum_i F_i (theta_i - theta*_i)^2`, differentiable in `params`;
/// `fisher` and `star` name the same variables in the same order.
pub fn ewc_penalty(
    params: &[(String, Var)],
    fisher: &[(String, Tensor)],
    star: &[(String, Tensor)],
    lambda: f64,
) -> Result<Tensor> {
    if params.len() != fisher.len() || params.len() != star.len() {
        return Err(TrainError::Other(format!(
            "ewc: {} trainable tensors but a Fisher of {} and anchors of {}",
            params.len(),
            fisher.len(),
            star.len()
        )));
    }
    let mut total: Option<Tensor> = None;
    for (((name, v), (fname, f)), (sname, s)) in params.iter().zip(fisher).zip(star) {
        if name != fname || name != sname {
            return Err(TrainError::Other(format!(
                "ewc: trainable `{name}` paired with Fisher `{fname}` and anchor `{sname}`"
            )));
        }
        let term = (f * (v.as_tensor() - s)?.sqr()?)?.sum_all()?;
        total = Some(match total {
            Some(t) => (t + term)?,
            None => term,
        });
    }
    let total = total.ok_or_else(|| TrainError::Other("ewc: nothing trainable".into()))?;
    Ok(total.affine(lambda, 0.0)?)
}

fn snapshot(sites: &AdapterSites) -> Result<Vec<(String, Tensor)>> {
    named_trainable(sites)
        .into_iter()
        .map(|(n, v)| Ok((n, v.as_tensor().copy()?.detach())))
        .collect()
}

pub struct Ewc {
    inner: Baseline,
    lambda: f64,
    gamma: f64,
    examples: usize,
    /// The accumulated Fisher and the anchor theta*, once a task has ended.
    fisher: Option<Vec<(String, Tensor)>>,
    star: Option<Vec<(String, Tensor)>>,
}

impl Ewc {
    pub fn new(cfg: &MethodSection) -> Self {
        let mut inner = Baseline::new(MethodName::Ewc, cfg.trainable);
        inner.extra_files.push(FISHER_FILE);
        Self {
            inner,
            lambda: cfg.ewc_lambda,
            gamma: cfg.ewc_gamma,
            examples: cfg.fisher_examples,
            fisher: None,
            star: None,
        }
    }

    pub fn fisher(&self) -> Option<&[(String, Tensor)]> {
        self.fisher.as_deref()
    }
}

impl Method for Ewc {
    fn name(&self) -> &'static str {
        "ewc"
    }

    fn begin_stage(
        &mut self,
        sites: &mut AdapterSites,
        stage: usize,
        lora: &LoraConfig,
        seed: u64,
    ) -> Result<()> {
        self.inner.begin_stage(sites, stage, lora, seed)
    }

    fn penalty(&self, sites: &AdapterSites, _stage: usize) -> Result<Vec<LossPart>> {
        match (&self.fisher, &self.star) {
            (Some(f), Some(s)) if self.lambda > 0.0 => Ok(vec![LossPart {
                name: "ewc",
                value: ewc_penalty(&named_trainable(sites), f, s, self.lambda)?,
            }]),
            _ => Ok(Vec::new()),
        }
    }

    fn end_stage(&mut self, sites: &mut AdapterSites, stage: usize) -> Result<()> {
        self.inner.end_stage(sites, stage)
    }

    fn after_training(
        &mut self,
        model: &mut dyn LanguageModel,
        ctx: &StageContext<'_, '_>,
    ) -> Result<()> {
        self.inner.after_training(model, ctx)?;
        let mut chosen = ctx.examples.to_vec();
        let mut rng = rand::rngs::StdRng::seed_from_u64(derive_seed(ctx.seed, ctx.stage, 4, 0));
        chosen.shuffle(&mut rng);
        chosen.truncate(self.examples);
        let vars = named_trainable(model.adapter_sites());
        let device = model.device().clone();
        let model = &*model;
        let started = std::time::Instant::now();
        let task = diagonal_fisher(&vars, chosen.len(), |i| {
            let (batch, _) = ctx.batching.lm_batch(&chosen[i..=i], &device)?;
            Ok(model.loss(&batch, ForwardMode::Train { dropout_seed: None })?)
        })?;
        let mut sum = 0f64;
        let mut max = 0f64;
        for (_, f) in &task {
            let f = f.to_dtype(candle_core::DType::F64)?;
            sum += f.sum_all()?.to_scalar::<f64>()?;
            max = max.max(f.max_all()?.to_scalar::<f64>()?);
        }
        if !sum.is_finite() {
            return Err(TrainError::Other(format!(
                "ewc: the Fisher of task {} is not finite ({sum}): a training example gives a non-finite gradient",
                ctx.stage + 1
            )));
        }
        let count: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
        tracing::info!(
            "ewc: Fisher of task {} from {} examples in {:.1}s: mean {:.3e}, max {:.3e} over {count} weights",
            ctx.stage + 1,
            chosen.len(),
            started.elapsed().as_secs_f64(),
            sum / count.max(1) as f64,
            max
        );
        self.fisher = Some(match self.fisher.take() {
            None => task,
            Some(old) => old
                .into_iter()
                .zip(task)
                .map(|((n, o), (_, t))| Ok((n, ((o * self.gamma)? + t)?)))
                .collect::<Result<_>>()?,
        });
        self.star = Some(snapshot(model.adapter_sites())?);
        Ok(())
    }

    fn save_stage(&self, model: &dyn LanguageModel, ctx: &StageContext<'_, '_>) -> Result<()> {
        self.inner.save_stage(model, ctx)?;
        let fisher = self.fisher.as_ref().ok_or_else(|| {
            TrainError::Other("ewc: the task's Fisher was not computed before its save".into())
        })?;
        save_tensors(&ctx.dir.join(FISHER_FILE), fisher)
    }

    fn restore_from(
        &mut self,
        model: &mut dyn LanguageModel,
        ctx: &StageContext<'_, '_>,
    ) -> Result<()> {
        self.inner.restore_from(model, ctx)?;
        let path = ctx.dir.join(FISHER_FILE);
        // Absent with the weights when a later task superseded them.
        if path.exists() {
            let device = model.device().clone();
            let loaded = load_safetensors(&path, &device)?;
            let sites = model.adapter_sites();
            let mut fisher = Vec::new();
            for (name, v) in named_trainable(sites) {
                let f = loaded.get(&name).ok_or_else(|| TrainError::File {
                    path: path.clone(),
                    message: format!("has no Fisher for `{name}`: the file is of another config"),
                })?;
                if f.shape() != v.shape() {
                    return Err(TrainError::File {
                        path: path.clone(),
                        message: format!(
                            "Fisher of `{name}` is {:?}, the weight {:?}",
                            f.shape(),
                            v.shape()
                        ),
                    });
                }
                fisher.push((name, f.clone()));
            }
            self.fisher = Some(fisher);
            self.star = Some(snapshot(sites)?);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(v: &[f64]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }
    fn vals(t: &Tensor) -> Vec<f64> {
        t.to_vec1().unwrap()
    }

    /// Toy model: y = w . x, loss_i = (w . x_i - y_i)^2. Per-example
    /// gradient 2 (w . x_i - y_i) x_i, so by hand with w = (1, 2):
    /// example 1, x = (1, 0), y = 0: residual 1, g = (2, 0);
    /// example 2, x = (1, 1), y = 1: residual 2, g = (4, 4);
    /// F = mean g^2 = ((4 + 16) / 2, (0 + 16) / 2) = (10, 8).
    #[test]
    fn fisher_penalty_and_gradient_by_hand() {
        let w = Var::from_tensor(&t(&[1.0, 2.0])).unwrap();
        let vars = vec![("w".to_string(), w.clone())];
        let xs = [([1.0, 0.0], 0.0), ([1.0, 1.0], 1.0)];
        let fisher = diagonal_fisher(&vars, 2, |i| {
            let (x, y) = xs[i];
            let pred = (w.as_tensor() * t(&x))?.sum_all()?;
            Ok(pred.affine(1.0, -y)?.sqr()?)
        })
        .unwrap();
        assert_eq!(fisher[0].0, "w");
        assert_eq!(vals(&fisher[0].1), [10.0, 8.0]);

        // theta* = (0.5, 3): penalty = lambda (10 * 0.25 + 8 * 1) = 3 * 10.5.
        let star = vec![("w".to_string(), t(&[0.5, 3.0]))];
        let p = ewc_penalty(&vars, &fisher, &star, 3.0).unwrap();
        assert!((p.to_scalar::<f64>().unwrap() - 31.5).abs() < 1e-12);
        // d/dw = 2 lambda F (w - theta*) = 6 * (10 * 0.5, 8 * -1) = (30, -48).
        let g = p.backward().unwrap();
        assert_eq!(vals(g.get(w.as_tensor()).unwrap()), [30.0, -48.0]);

        // At theta* the penalty and its gradient vanish.
        w.set(&t(&[0.5, 3.0])).unwrap();
        let p0 = ewc_penalty(&vars, &fisher, &star, 3.0).unwrap();
        assert_eq!(p0.to_scalar::<f64>().unwrap(), 0.0);
        // Mismatched names are refused, not paired silently.
        let wrong = vec![("v".to_string(), t(&[0.5, 3.0]))];
        assert!(ewc_penalty(&vars, &fisher, &wrong, 1.0).is_err());
    }
}

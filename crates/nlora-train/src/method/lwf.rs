//! LwF (Li & Hoiem 2016) for a language model: SeqFT plus
//! `lwf_alpha * T^2 * KL(p_teacher^T || p_student^T)`, where p^T is the
//! softmax of the logits over the vocabulary at temperature T and the
//! teacher is the model as it was at the end of the previous task (frozen).
//!
//! Positions: the current task's answer (label) tokens, the same positions
//! as the task loss, averaged over them. Those are the outputs the previous
//! model's knowledge is about (what it would answer), and the output head
//! then runs on a handful of positions instead of every token (49,152
//! logits per token for SmolLM2). The T^2 factor keeps the gradient's scale
//! independent of T (Hinton et al. 2015).
//!
//! The teacher needs no second model: its weights are a snapshot taken when
//! the task begins, set into the trainable variables for one inference
//! forward per batch and swapped back before the backward pass (full mode:
//! one extra copy of the linear weights, ~0.43 GB for SmolLM2-135M).
use candle_core::{DType, Tensor, D};
use nlora_adapter::{AdapterSites, ForwardMode, LoraConfig};
use nlora_model::lm::{LanguageModel, LmBatch};

use super::{Baseline, LossPart, Method, StageContext};
use crate::checkpoint::named_trainable;
use crate::config::{MethodName, MethodSection};
use crate::error::{Result, TrainError};

/// `T^2 * mean over rows of KL(softmax(teacher / T) || softmax(student / T))`
/// for logits `(n, vocab)`; differentiable in `student` only.
pub fn distillation_kl(student: &Tensor, teacher: &Tensor, temperature: f64) -> Result<Tensor> {
    if student.dims() != teacher.dims() {
        return Err(TrainError::Other(format!(
            "lwf: student logits {:?} and teacher logits {:?} differ",
            student.shape(),
            teacher.shape()
        )));
    }
    let up = |t: &Tensor| -> Result<Tensor> {
        Ok(match t.dtype() {
            DType::F64 => t.clone(),
            _ => t.to_dtype(DType::F32)?,
        })
    };
    let inv_t = 1.0 / temperature;
    let log_s = candle_nn::ops::log_softmax(&up(student)?.affine(inv_t, 0.0)?, D::Minus1)?;
    let log_t =
        candle_nn::ops::log_softmax(&up(&teacher.detach())?.affine(inv_t, 0.0)?, D::Minus1)?;
    let kl_rows = (log_t.exp()? * (&log_t - &log_s)?)?.sum(D::Minus1)?;
    Ok(kl_rows.mean_all()?.affine(temperature * temperature, 0.0)?)
}

pub struct Lwf {
    inner: Baseline,
    alpha: f64,
    temperature: f64,
    /// The trainable tensors at the previous task's end.
    teacher: Option<Vec<Tensor>>,
}

impl Lwf {
    pub fn new(cfg: &MethodSection) -> Self {
        Self {
            inner: Baseline::new(MethodName::Lwf, cfg.trainable),
            alpha: cfg.lwf_alpha,
            temperature: cfg.lwf_temperature,
            teacher: None,
        }
    }

    /// The teacher's logits at the batch's label positions: the snapshot set
    /// into the variables for one inference forward, the trained values put back.
    fn teacher_logits(
        &self,
        model: &dyn LanguageModel,
        batch: &LmBatch,
        teacher: &[Tensor],
    ) -> Result<Tensor> {
        let vars = named_trainable(model.adapter_sites());
        if vars.len() != teacher.len() {
            return Err(TrainError::Other(format!(
                "lwf: {} trainable tensors but a teacher of {}",
                vars.len(),
                teacher.len()
            )));
        }
        let current = vars
            .iter()
            .map(|(_, v)| Ok(v.as_tensor().copy()?))
            .collect::<Result<Vec<_>>>()?;
        for ((_, v), t) in vars.iter().zip(teacher) {
            v.set(t)?;
        }
        let logits = model.label_logits(batch, ForwardMode::Inference);
        for ((_, v), c) in vars.iter().zip(&current) {
            v.set(c)?;
        }
        Ok(logits?.logits.detach())
    }
}

impl Method for Lwf {
    fn name(&self) -> &'static str {
        "lwf"
    }

    fn begin_stage(
        &mut self,
        sites: &mut AdapterSites,
        stage: usize,
        lora: &LoraConfig,
        seed: u64,
    ) -> Result<()> {
        self.inner.begin_stage(sites, stage, lora, seed)?;
        // The model as the previous task left it (restored first on resume).
        self.teacher = if stage > 0 && self.alpha > 0.0 {
            Some(
                named_trainable(sites)
                    .iter()
                    .map(|(_, v)| Ok(v.as_tensor().copy()?.detach()))
                    .collect::<Result<_>>()?,
            )
        } else {
            None
        };
        Ok(())
    }

    fn batch_loss(
        &self,
        model: &dyn LanguageModel,
        batch: &LmBatch,
        mode: ForwardMode,
        _stage: usize,
    ) -> Result<Vec<LossPart>> {
        let Some(teacher) = &self.teacher else {
            return Ok(vec![LossPart {
                name: "task",
                value: model.loss(batch, mode)?,
            }]);
        };
        let student = model.label_logits(batch, mode)?;
        let task = student.mean_cross_entropy()?;
        let t_logits = self.teacher_logits(model, batch, teacher)?;
        let kl = distillation_kl(&student.logits, &t_logits, self.temperature)?;
        Ok(vec![
            LossPart {
                name: "task",
                value: task,
            },
            LossPart {
                name: "lwf",
                value: kl.affine(self.alpha, 0.0)?,
            },
        ])
    }

    fn end_stage(&mut self, sites: &mut AdapterSites, stage: usize) -> Result<()> {
        // The snapshot is not needed until the next task takes a new one.
        self.teacher = None;
        self.inner.end_stage(sites, stage)
    }

    fn after_training(
        &mut self,
        model: &mut dyn LanguageModel,
        ctx: &StageContext<'_, '_>,
    ) -> Result<()> {
        self.inner.after_training(model, ctx)
    }

    fn save_stage(&self, model: &dyn LanguageModel, ctx: &StageContext<'_, '_>) -> Result<()> {
        self.inner.save_stage(model, ctx)
    }

    fn restore_from(
        &mut self,
        model: &mut dyn LanguageModel,
        ctx: &StageContext<'_, '_>,
    ) -> Result<()> {
        self.inner.restore_from(model, ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn distillation_matches_a_hand_computed_kl() {
        // Two positions, three-word vocabulary, T = 2.
        let s = [[1.0, 2.0, 0.0], [0.0, 0.0, 0.0]];
        let te = [[2.0, 0.0, 0.0], [1.0, -1.0, 3.0]];
        let temp = 2.0f64;
        let softmax = |row: &[f64; 3]| -> Vec<f64> {
            let e: Vec<f64> = row.iter().map(|v| (v / temp).exp()).collect();
            let z: f64 = e.iter().sum();
            e.iter().map(|v| v / z).collect()
        };
        let mut want = 0.0;
        for (srow, trow) in s.iter().zip(&te) {
            let (ps, pt) = (softmax(srow), softmax(trow));
            want += pt
                .iter()
                .zip(&ps)
                .map(|(t, s)| t * (t / s).ln())
                .sum::<f64>();
        }
        want = want / 2.0 * temp * temp;
        let student = Var::from_tensor(&Tensor::new(&s, &Device::Cpu).unwrap()).unwrap();
        let teacher = Tensor::new(&te, &Device::Cpu).unwrap();
        let kl = distillation_kl(student.as_tensor(), &teacher, temp).unwrap();
        let got = kl.to_scalar::<f64>().unwrap();
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        // d/ds of T^2 mean KL = T (p_s - p_t) / n per row.
        let g = kl.backward().unwrap();
        let g: Vec<Vec<f64>> = g.get(student.as_tensor()).unwrap().to_vec2().unwrap();
        for (r, (srow, trow)) in s.iter().zip(&te).enumerate() {
            let (ps, pt) = (softmax(srow), softmax(trow));
            for k in 0..3 {
                let want = temp * (ps[k] - pt[k]) / 2.0;
                assert!((g[r][k] - want).abs() < 1e-12);
            }
        }
        // Identical distributions: no distillation loss.
        let same = distillation_kl(&teacher, &teacher, temp).unwrap();
        assert!(same.to_scalar::<f64>().unwrap().abs() < 1e-12);
        assert!(distillation_kl(&teacher, &teacher.narrow(1, 0, 2).unwrap(), temp).is_err());
    }
}

//! IncLoRA and the methods built on it: a new adapter per task, earlier ones
//! frozen (stacked beside the base weight, or merged into it). O-LoRA,
//! N-LoRA, O-LoRA+N-LoRA and the sparsity ablations differ from IncLoRA only
//! in the penalty on the current adapter, so they share this file.
use std::cell::Cell;

use nlora_adapter::{AdapterSites, LoraConfig};
use nlora_math::penalty::{
    factor_l1, nlora_l1, olora_l2, olora_orthogonality, FactorSparsity, NLoraForm,
    OrthogonalityForm,
};

use super::{penalty_sites, LossPart, Method};
use crate::config::{HistoryMode, L1Form, MethodName, MethodSection, OrthoForm, PerTask};
use crate::error::Result;

/// Which penalties join the task loss, with their weights.
#[derive(Debug, Clone, Default)]
pub struct Penalties {
    /// N-LoRA's l1 on dW (eq. 3), lambda per task.
    pub nlora: Option<(PerTask<f64>, NLoraForm)>,
    /// Ablations: l1 on the factors A and/or B.
    pub factor: Option<(PerTask<f64>, FactorSparsity)>,
    /// O-LoRA's orthogonality (lambda_1) and l2 (lambda_2) terms.
    pub orthogonality: Option<(f64, OrthogonalityForm)>,
    pub l2: f64,
}

impl Penalties {
    pub fn none() -> Self {
        Self::default()
    }

    pub fn from_config(cfg: &MethodSection, lora_scale: f64) -> Self {
        let lambda = cfg
            .lambda
            .clone()
            .unwrap_or(PerTask::One(cfg.lambda_for(0)));
        let nlora_form = match cfg.l1_form {
            L1Form::Dw => NLoraForm::Update {
                scale: if cfg.l1_scaled { lora_scale } else { 1.0 },
            },
            L1Form::ReferenceCode => NLoraForm::ReferenceCode,
        };
        let ortho_form = match cfg.ortho_form {
            OrthoForm::Code => OrthogonalityForm::AbsSum,
            OrthoForm::Paper => OrthogonalityForm::FrobeniusSquared,
        };
        let mut p = Penalties::default();
        match cfg.name {
            MethodName::NLora => p.nlora = Some((lambda, nlora_form)),
            MethodName::OLora => p.orthogonality = Some((cfg.ortho_lambda, ortho_form)),
            MethodName::OLoraNLora => {
                p.nlora = Some((lambda, nlora_form));
                p.orthogonality = Some((cfg.ortho_lambda, ortho_form));
            }
            MethodName::SparseA => p.factor = Some((lambda, FactorSparsity::OnlyA)),
            MethodName::SparseB => p.factor = Some((lambda, FactorSparsity::OnlyB)),
            MethodName::SparseAB => p.factor = Some((lambda, FactorSparsity::Both)),
            _ => {}
        }
        if cfg.name.uses_orthogonality() {
            p.l2 = cfg.l2_lambda;
        }
        p
    }
}

pub struct IncLora {
    name: MethodName,
    history: HistoryMode,
    penalties: Penalties,
    /// The controller's lambda (`method.auto_lambda`), replacing the
    /// configured one for the l1 terms; a Cell because it changes between
    /// steps while the trainer holds the method by shared reference.
    auto_lambda: Cell<Option<f64>>,
}

impl IncLora {
    pub fn new(name: MethodName, history: HistoryMode, penalties: Penalties) -> Self {
        Self {
            name,
            history,
            penalties,
            auto_lambda: Cell::new(None),
        }
    }
}

impl Method for IncLora {
    fn name(&self) -> &'static str {
        self.name.as_str()
    }

    fn begin_stage(
        &mut self,
        sites: &mut AdapterSites,
        stage: usize,
        lora: &LoraConfig,
        seed: u64,
    ) -> Result<()> {
        // A different seed per task: each task's A starts somewhere new.
        sites.init_new_adapters(lora, seed.wrapping_add(stage as u64))?;
        Ok(())
    }

    fn penalty(&self, sites: &AdapterSites, stage: usize) -> Result<Vec<LossPart>> {
        let p = &self.penalties;
        let mut parts = Vec::new();
        if p.nlora.is_none() && p.factor.is_none() && p.orthogonality.is_none() && p.l2 == 0.0 {
            return Ok(parts);
        }
        let view = penalty_sites(sites);
        let lambda_at = |lambda: &PerTask<f64>| self.auto_lambda.get().unwrap_or(lambda.get(stage));
        if let Some((lambda, form)) = &p.nlora {
            let l = lambda_at(lambda);
            if l > 0.0 {
                let value = nlora_l1(&view, l, *form)?;
                parts.push(LossPart { name: "l1", value });
            }
        }
        if let Some((lambda, which)) = &p.factor {
            let l = lambda_at(lambda);
            if l > 0.0 {
                let value = factor_l1(&view, l, *which)?;
                parts.push(LossPart { name: "l1", value });
            }
        }
        if let Some((lambda_1, form)) = &p.orthogonality {
            if *lambda_1 > 0.0 && view.iter().any(|s| s.previous_a.is_some()) {
                let value = olora_orthogonality(&view, *lambda_1, *form)?;
                parts.push(LossPart {
                    name: "orth",
                    value,
                });
            }
        }
        if p.l2 > 0.0 {
            let value = olora_l2(&view, p.l2)?;
            parts.push(LossPart { name: "l2", value });
        }
        Ok(parts)
    }

    fn set_lambda(&self, lambda: f64) -> bool {
        if self.penalties.nlora.is_none() && self.penalties.factor.is_none() {
            return false;
        }
        self.auto_lambda.set(Some(lambda));
        true
    }

    fn end_stage(&mut self, sites: &mut AdapterSites, _stage: usize) -> Result<()> {
        sites.freeze_current_into_history()?;
        if self.history == HistoryMode::Merged {
            sites.merge_history_into_base()?;
        }
        Ok(())
    }
}

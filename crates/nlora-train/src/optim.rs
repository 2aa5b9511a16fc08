//! AdamW with a state that can be saved and restored. The update rule is
//! candle_nn's `AdamW` (decoupled weight decay, bias-corrected moments, the
//! same operations in the same order), but its moments and step count are
//! reachable, so a checkpoint can hold them and a resumed run continues with
//! bit-identical updates. candle_nn keeps them private.
use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::error::{Result, TrainError};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWParams {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    /// torch's and candle's betas and eps; weight decay 0 (the reference's).
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

struct Slot {
    name: String,
    var: Var,
    m: Tensor,
    v: Tensor,
}

/// AdamW over named variables.
pub struct AdamW {
    slots: Vec<Slot>,
    step_t: usize,
    params: AdamWParams,
}

impl AdamW {
    /// Moments start at zero. Names must be unique: they key the saved state.
    pub fn new(vars: Vec<(String, Var)>, params: AdamWParams) -> Result<Self> {
        let mut slots = Vec::with_capacity(vars.len());
        for (name, var) in vars {
            if slots.iter().any(|s: &Slot| s.name == name) {
                return Err(TrainError::Other(format!(
                    "optimizer: two variables named `{name}`"
                )));
            }
            let m = var.zeros_like()?;
            let v = var.zeros_like()?;
            slots.push(Slot { name, var, m, v });
        }
        Ok(Self {
            slots,
            step_t: 0,
            params,
        })
    }

    pub fn set_learning_rate(&mut self, lr: f64) {
        self.params.lr = lr;
    }

    /// Optimizer steps taken so far (the bias correction depends on it).
    pub fn steps(&self) -> usize {
        self.step_t
    }

    /// One update. As in candle_nn, a variable without a gradient is left
    /// alone (its moments too), but the step count still advances.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step_t += 1;
        let AdamWParams {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.params;
        let lr_lambda = lr * weight_decay;
        let scale_m = 1f64 / (1f64 - beta1.powi(self.step_t as i32));
        let scale_v = 1f64 / (1f64 - beta2.powi(self.step_t as i32));
        for slot in &mut self.slots {
            let theta = &slot.var;
            let Some(g) = grads.get(theta.as_tensor()) else {
                continue;
            };
            let next_m = ((&slot.m * beta1)? + (g * (1.0 - beta1))?)?;
            let next_v = ((&slot.v * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
            let m_hat = (&next_m * scale_m)?;
            let v_hat = (&next_v * scale_v)?;
            let next_theta = (theta.as_tensor() * (1f64 - lr_lambda))?;
            let adjusted = (m_hat / (v_hat.sqrt()? + eps)?)?;
            let next_theta = (next_theta - (adjusted * lr)?)?;
            slot.m = next_m;
            slot.v = next_v;
            theta.set(&next_theta)?;
        }
        Ok(())
    }

    /// The moments as named tensors (`m.NAME`, `v.NAME`), for a checkpoint.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        self.slots
            .iter()
            .flat_map(|s| {
                [
                    (format!("m.{}", s.name), s.m.clone()),
                    (format!("v.{}", s.name), s.v.clone()),
                ]
            })
            .collect()
    }

    /// Puts back a state saved by [`AdamW::state_tensors`] after `steps`
    /// steps. Every variable must have its two moments with its own shape.
    pub fn restore(&mut self, tensors: &HashMap<String, Tensor>, steps: usize) -> Result<()> {
        let expected = 2 * self.slots.len();
        if tensors.len() != expected {
            return Err(TrainError::Other(format!(
                "optimizer state holds {} tensors, the adapters need {expected}",
                tensors.len()
            )));
        }
        let mut restored = Vec::with_capacity(self.slots.len());
        for s in &self.slots {
            let get = |key: String| -> Result<Tensor> {
                let t = tensors
                    .get(&key)
                    .ok_or_else(|| TrainError::Other(format!("optimizer state has no `{key}`")))?;
                if t.shape() != s.var.shape() || t.dtype() != s.var.dtype() {
                    return Err(TrainError::Other(format!(
                        "optimizer state `{key}` is {:?} {:?}, the variable is {:?} {:?}",
                        t.shape(),
                        t.dtype(),
                        s.var.shape(),
                        s.var.dtype()
                    )));
                }
                Ok(t.to_device(s.var.device())?)
            };
            restored.push((get(format!("m.{}", s.name))?, get(format!("v.{}", s.name))?));
        }
        for (s, (m, v)) in self.slots.iter_mut().zip(restored) {
            s.m = m;
            s.v = v;
        }
        self.step_t = steps;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::Optimizer;

    fn var(seed: u64, shape: (usize, usize)) -> Var {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let v: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        Var::from_tensor(&Tensor::from_vec(v, shape, &Device::Cpu).unwrap()).unwrap()
    }

    /// A loss with a non-trivial gradient: sum((x W)^2 * c) + sum(W^3).
    fn loss(w: &Var, x: &Tensor) -> Tensor {
        let y = x.matmul(w.as_tensor()).unwrap();
        let a = (y.sqr().unwrap() * 0.3).unwrap().sum_all().unwrap();
        let b = w.as_tensor().powf(3.0).unwrap().sum_all().unwrap();
        (a + b).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn matches_candle_nn_adamw_step_by_step() {
        let x = var(9, (5, 4)).as_tensor().clone();
        for wd in [0.0, 0.01, 0.1] {
            let ours_w = var(1, (4, 3));
            let theirs_w = var(1, (4, 3));
            let params = AdamWParams {
                lr: 0.02,
                weight_decay: wd,
                ..Default::default()
            };
            let mut ours = AdamW::new(vec![("w".into(), ours_w.clone())], params).unwrap();
            let mut theirs = candle_nn::AdamW::new(
                vec![theirs_w.clone()],
                candle_nn::ParamsAdamW {
                    lr: 0.02,
                    weight_decay: wd,
                    ..Default::default()
                },
            )
            .unwrap();
            for step in 0..8 {
                // A changing learning rate, as the schedules give.
                let lr = 0.02 / (1.0 + step as f64);
                ours.set_learning_rate(lr);
                theirs.set_learning_rate(lr);
                ours.step(&loss(&ours_w, &x).backward().unwrap()).unwrap();
                theirs
                    .step(&loss(&theirs_w, &x).backward().unwrap())
                    .unwrap();
                let d = max_diff(ours_w.as_tensor(), theirs_w.as_tensor());
                assert!(d <= 1e-6, "wd {wd} step {step}: max |diff| {d}");
            }
            // The weights really moved: the comparison is not of two no-ops.
            assert!(max_diff(ours_w.as_tensor(), var(1, (4, 3)).as_tensor()) > 1e-2);
        }
    }

    #[test]
    fn restored_state_continues_bit_identically() {
        let x = var(9, (5, 4)).as_tensor().clone();
        let params = AdamWParams {
            lr: 0.05,
            weight_decay: 0.01,
            ..Default::default()
        };
        let w = var(2, (4, 3));
        let mut opt = AdamW::new(vec![("w".into(), w.clone())], params).unwrap();
        for _ in 0..3 {
            opt.step(&loss(&w, &x).backward().unwrap()).unwrap();
        }
        // Save (through safetensors bytes, as a checkpoint does) and go on.
        let saved_w = w.as_tensor().copy().unwrap();
        let state = opt.state_tensors();
        let bytes =
            safetensors::tensor::serialize(state.iter().map(|(k, t)| (k.as_str(), t)), None)
                .unwrap();
        let steps = opt.steps();
        for _ in 0..3 {
            opt.step(&loss(&w, &x).backward().unwrap()).unwrap();
        }
        // A fresh optimizer on a fresh variable, restored, does the same.
        let w2 = Var::from_tensor(&saved_w).unwrap();
        let mut opt2 = AdamW::new(vec![("w".into(), w2.clone())], params).unwrap();
        let loaded = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
        opt2.restore(&loaded, steps).unwrap();
        for _ in 0..3 {
            opt2.step(&loss(&w2, &x).backward().unwrap()).unwrap();
        }
        assert_eq!(
            w.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            w2.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        );
        // Without the state the continuation differs: the test can fail.
        let w3 = Var::from_tensor(&saved_w).unwrap();
        let mut opt3 = AdamW::new(vec![("w".into(), w3.clone())], params).unwrap();
        for _ in 0..3 {
            opt3.step(&loss(&w3, &x).backward().unwrap()).unwrap();
        }
        assert!(max_diff(w.as_tensor(), w3.as_tensor()) > 1e-4);
    }

    #[test]
    fn restore_rejects_a_state_of_other_shapes() {
        let w = var(2, (4, 3));
        let mut opt = AdamW::new(vec![("w".into(), w)], AdamWParams::default()).unwrap();
        let bad = HashMap::from([
            (
                "m.w".to_string(),
                Tensor::zeros((3, 4), DType::F32, &Device::Cpu).unwrap(),
            ),
            (
                "v.w".to_string(),
                Tensor::zeros((4, 3), DType::F32, &Device::Cpu).unwrap(),
            ),
        ]);
        let err = opt.restore(&bad, 1).unwrap_err().to_string();
        assert!(err.contains("m.w"), "{err}");
        let missing = HashMap::from([
            (
                "m.w".to_string(),
                Tensor::zeros((4, 3), DType::F32, &Device::Cpu).unwrap(),
            ),
            (
                "v.x".to_string(),
                Tensor::zeros((4, 3), DType::F32, &Device::Cpu).unwrap(),
            ),
        ]);
        let err = opt.restore(&missing, 1).unwrap_err().to_string();
        assert!(err.contains("v.w"), "{err}");
    }
}

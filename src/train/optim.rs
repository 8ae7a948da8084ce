//! Optimisers and learning-rate schedules of the fine-tuner.
//!
//! AdamW with a cosine decay was the first recipe; SGD with Nesterov momentum and a one-cycle
//! schedule is the usual one for convolutional networks with BatchNorm, and the one that
//! measures best on reduced graphs once BatchNorm is re-inserted (README, "Fine-tuning").

use anyhow::{Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// SGD with Nesterov momentum 0.9
    Sgd,
    /// AdamW (betas 0.9/0.999)
    Adamw,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ScheduleKind {
    /// Warm up to the peak over the first 30% of steps, then anneal along a cosine
    OneCycle,
    /// Cosine decay from the peak to zero
    Cosine,
}

/// The peak learning rate when none is given: 0.02 for SGD (the rate of the PyTorch
/// measurement in the training-engine issue, 47.1% -> 87.2% with recalibration), AdamW's usual
/// 1e-3.
pub fn default_lr(kind: OptimizerKind) -> f64 {
    match kind {
        OptimizerKind::Sgd => 0.02,
        OptimizerKind::Adamw => 1e-3,
    }
}

/// SGD momentum, as in most published ResNet recipes.
pub const SGD_MOMENTUM: f64 = 0.9;
/// One-cycle: share of the steps spent warming up, and the start and end divisors
/// (PyTorch's `OneCycleLR` defaults).
const ONE_CYCLE_WARMUP: f64 = 0.3;
const ONE_CYCLE_DIV: f64 = 25.0;
const ONE_CYCLE_FINAL_DIV: f64 = 1e4;

/// The learning rate at `step` of `total` under `schedule` with peak `peak`.
pub fn learning_rate(schedule: ScheduleKind, peak: f64, step: usize, total: usize) -> f64 {
    let total = total.max(1) as f64;
    let t = step as f64 / total;
    let cos = |from: f64, to: f64, frac: f64| {
        to + 0.5 * (from - to) * (1.0 + (std::f64::consts::PI * frac.clamp(0.0, 1.0)).cos())
    };
    match schedule {
        ScheduleKind::Cosine => cos(peak, 0.0, t),
        ScheduleKind::OneCycle => {
            let start = peak / ONE_CYCLE_DIV;
            if t < ONE_CYCLE_WARMUP {
                cos(start, peak, t / ONE_CYCLE_WARMUP)
            } else {
                cos(
                    peak,
                    start / ONE_CYCLE_FINAL_DIV,
                    (t - ONE_CYCLE_WARMUP) / (1.0 - ONE_CYCLE_WARMUP),
                )
            }
        }
    }
}

/// SGD with Nesterov momentum and L2 weight decay, PyTorch's formulation:
/// `g += wd * w; b = m * b + g; w -= lr * (g + m * b)`. The update runs on every core.
pub struct NesterovSgd {
    vars: Vec<Var>,
    buffers: Vec<Vec<f32>>,
    lr: f64,
    momentum: f64,
    weight_decay: f64,
}

impl NesterovSgd {
    pub fn new(vars: Vec<Var>, lr: f64, weight_decay: f64) -> Self {
        let buffers = vars.iter().map(|v| vec![0.0; v.elem_count()]).collect();
        NesterovSgd { vars, buffers, lr, momentum: SGD_MOMENTUM, weight_decay }
    }

    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        let (lr, m, wd) = (self.lr as f32, self.momentum as f32, self.weight_decay as f32);
        for (var, buf) in self.vars.iter().zip(&mut self.buffers) {
            let Some(grad) = grads.get(var) else { continue };
            let g: Vec<f32> = grad.flatten_all()?.to_vec1()?;
            let mut w: Vec<f32> = var.as_tensor().flatten_all()?.to_vec1()?;
            w.par_iter_mut().zip(buf.par_iter_mut()).zip(g.par_iter()).for_each(|((w, b), &g)| {
                let g = g + wd * *w;
                *b = m * *b + g;
                *w -= lr * (g + m * *b);
            });
            var.set(&Tensor::from_vec(w, var.dims(), var.device())?)?;
        }
        Ok(())
    }
}

/// Read `elements` floats saved as `name`, for a buffer of that size.
fn saved_buffer(state: &HashMap<String, Tensor>, name: &str, elements: usize) -> Result<Vec<f32>> {
    let t = state.get(name).with_context(|| format!("the saved optimiser state lacks {name}"))?;
    let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
    anyhow::ensure!(v.len() == elements, "{name} holds {} values, not {elements}", v.len());
    Ok(v)
}

fn buffer_tensor(buffer: &[f32]) -> Result<Tensor> {
    Ok(Tensor::from_slice(buffer, buffer.len(), &candle_core::Device::Cpu)?)
}

/// AdamW, PyTorch's formulation (decoupled weight decay, bias-corrected moments), its moments
/// held here so that a checkpoint can save them: candle-nn's keeps them private.
pub struct AdamW {
    vars: Vec<Var>,
    first: Vec<Vec<f32>>,
    second: Vec<Vec<f32>>,
    steps: u32,
    lr: f64,
    weight_decay: f64,
}

/// AdamW's constants (PyTorch's defaults).
const ADAM_BETA1: f64 = 0.9;
const ADAM_BETA2: f64 = 0.999;
const ADAM_EPS: f64 = 1e-8;

impl AdamW {
    pub fn new(vars: Vec<Var>, lr: f64, weight_decay: f64) -> Self {
        let zeros = || vars.iter().map(|v| vec![0.0; v.elem_count()]).collect();
        AdamW { first: zeros(), second: zeros(), vars, steps: 0, lr, weight_decay }
    }

    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.steps += 1;
        let (b1, b2, eps) = (ADAM_BETA1 as f32, ADAM_BETA2 as f32, ADAM_EPS as f32);
        // The complements in f64, then rounded: 1 - 0.9f32 is not 0.1f32.
        let (c1, c2) = ((1.0 - ADAM_BETA1) as f32, (1.0 - ADAM_BETA2) as f32);
        let scale_m = (1.0 / (1.0 - ADAM_BETA1.powi(self.steps as i32))) as f32;
        let scale_v = (1.0 / (1.0 - ADAM_BETA2.powi(self.steps as i32))) as f32;
        let (lr, decay) = (self.lr as f32, (1.0 - self.lr * self.weight_decay) as f32);
        for ((var, m), v) in self.vars.iter().zip(&mut self.first).zip(&mut self.second) {
            let Some(grad) = grads.get(var) else { continue };
            let g: Vec<f32> = grad.flatten_all()?.to_vec1()?;
            let mut w: Vec<f32> = var.as_tensor().flatten_all()?.to_vec1()?;
            w.par_iter_mut()
                .zip(m.par_iter_mut())
                .zip(v.par_iter_mut())
                .zip(g.par_iter())
                .for_each(|(((w, m), v), &g)| {
                    *m = *m * b1 + g * c1;
                    *v = *v * b2 + g * g * c2;
                    let step = (*m * scale_m) / ((*v * scale_v).sqrt() + eps);
                    *w = *w * decay - step * lr;
                });
            var.set(&Tensor::from_vec(w, var.dims(), var.device())?)?;
        }
        Ok(())
    }
}

/// The optimiser a run uses.
pub enum Optimizer {
    Sgd(NesterovSgd),
    AdamW(AdamW),
}

impl Optimizer {
    pub fn new(kind: OptimizerKind, vars: Vec<Var>, lr: f64, weight_decay: f64) -> Result<Self> {
        Ok(match kind {
            OptimizerKind::Sgd => Optimizer::Sgd(NesterovSgd::new(vars, lr, weight_decay)),
            OptimizerKind::Adamw => Optimizer::AdamW(AdamW::new(vars, lr, weight_decay)),
        })
    }

    pub fn set_learning_rate(&mut self, lr: f64) {
        match self {
            Optimizer::Sgd(s) => s.lr = lr,
            Optimizer::AdamW(a) => a.lr = lr,
        }
    }

    /// Back-propagate `loss`, update the weights, and return the gradients (of every variable
    /// the loss reads, weights or not) for whoever updates the rest.
    pub fn backward_step(&mut self, loss: &Tensor) -> Result<GradStore> {
        let grads = loss.backward()?;
        self.step(&grads)?;
        Ok(grads)
    }

    /// Update this optimiser's variables from gradients back-propagated elsewhere.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        match self {
            Optimizer::Sgd(s) => s.step(grads),
            Optimizer::AdamW(a) => a.step(grads),
        }
    }

    /// The optimiser's own state by name (momentum buffers, Adam's moments and step count),
    /// for a checkpoint that resumes to the same bits.
    pub fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        match self {
            Optimizer::Sgd(s) => {
                for (i, b) in s.buffers.iter().enumerate() {
                    out.push((format!("sgd/momentum/{i}"), buffer_tensor(b)?));
                }
            }
            Optimizer::AdamW(a) => {
                for (i, (m, v)) in a.first.iter().zip(&a.second).enumerate() {
                    out.push((format!("adamw/first/{i}"), buffer_tensor(m)?));
                    out.push((format!("adamw/second/{i}"), buffer_tensor(v)?));
                }
                let steps = Tensor::from_slice(&[a.steps], 1, &candle_core::Device::Cpu)?;
                out.push(("adamw/steps".into(), steps));
            }
        }
        Ok(out)
    }

    /// Restore what [`Self::state`] saved, into an optimiser over the same variables.
    pub fn restore_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        match self {
            Optimizer::Sgd(s) => {
                for (i, b) in s.buffers.iter_mut().enumerate() {
                    *b = saved_buffer(state, &format!("sgd/momentum/{i}"), b.len())?;
                }
            }
            Optimizer::AdamW(a) => {
                for (i, (m, v)) in a.first.iter_mut().zip(&mut a.second).enumerate() {
                    *m = saved_buffer(state, &format!("adamw/first/{i}"), m.len())?;
                    *v = saved_buffer(state, &format!("adamw/second/{i}"), v.len())?;
                }
                let steps =
                    state.get("adamw/steps").context("the saved state lacks adamw/steps")?;
                a.steps = steps.flatten_all()?.to_vec1::<u32>()?[0];
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_cycle_warms_up_then_anneals() {
        let lr = |s| learning_rate(ScheduleKind::OneCycle, 0.1, s, 100);
        assert!((lr(0) - 0.1 / 25.0).abs() < 1e-12);
        assert!((lr(30) - 0.1).abs() < 1e-12);
        assert!(lr(15) > lr(0) && lr(15) < lr(30));
        assert!(lr(60) < lr(30) && lr(99) < 1e-3);
        let cos = |s| learning_rate(ScheduleKind::Cosine, 0.1, s, 100);
        assert!((cos(0) - 0.1).abs() < 1e-12 && (cos(50) - 0.05).abs() < 1e-12);
    }

    #[test]
    fn nesterov_matches_the_formula() {
        // Minimise 0.5 * w^2 from w = 1: gradient w. Two steps by hand.
        let var = Var::new(&[1.0f32], &candle_core::Device::Cpu).unwrap();
        let mut opt = NesterovSgd::new(vec![var.clone()], 0.1, 0.0);
        let (mut w, mut b) = (1.0f32, 0.0f32);
        for _ in 0..2 {
            let loss = (var.as_tensor().sqr().unwrap() * 0.5).unwrap().sum_all().unwrap();
            opt.step(&loss.backward().unwrap()).unwrap();
            let g = w;
            b = 0.9 * b + g;
            w -= 0.1 * (g + 0.9 * b);
        }
        let got: Vec<f32> = var.as_tensor().to_vec1().unwrap();
        assert!((got[0] - w).abs() < 1e-6, "{} vs {w}", got[0]);
    }

    #[test]
    fn adamw_matches_candle_nn() {
        use candle_nn::Optimizer as _;
        let init = [0.5f32, -1.5, 2.0, 0.25];
        let ours = Var::new(&init, &candle_core::Device::Cpu).unwrap();
        let theirs = Var::new(&init, &candle_core::Device::Cpu).unwrap();
        let mut a = AdamW::new(vec![ours.clone()], 0.05, 0.01);
        let params = candle_nn::ParamsAdamW { lr: 0.05, weight_decay: 0.01, ..Default::default() };
        let mut b = candle_nn::AdamW::new(vec![theirs.clone()], params).unwrap();
        let loss = |v: &Var| (v.as_tensor().sqr().unwrap() * 0.5).unwrap().sum_all().unwrap();
        for _ in 0..5 {
            a.step(&loss(&ours).backward().unwrap()).unwrap();
            b.step(&loss(&theirs).backward().unwrap()).unwrap();
        }
        let got: Vec<f32> = ours.as_tensor().to_vec1().unwrap();
        let want: Vec<f32> = theirs.as_tensor().to_vec1().unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-6, "{got:?} vs {want:?}");
        }
        assert!(got.iter().zip(&init).all(|(g, i)| g.abs() < i.abs()), "it descended");
    }

    #[test]
    fn a_restored_optimiser_continues_as_the_original() {
        for kind in [OptimizerKind::Sgd, OptimizerKind::Adamw] {
            let run = |resume_after: Option<usize>| {
                let var = Var::new(&[1.0f32, -2.0], &candle_core::Device::Cpu).unwrap();
                let mut opt = Optimizer::new(kind, vec![var.clone()], 0.05, 0.01).unwrap();
                for step in 0..6 {
                    if resume_after == Some(step) {
                        let saved: HashMap<String, Tensor> =
                            opt.state().unwrap().into_iter().collect();
                        opt = Optimizer::new(kind, vec![var.clone()], 0.05, 0.01).unwrap();
                        opt.restore_state(&saved).unwrap();
                    }
                    let loss = (var.as_tensor().sqr().unwrap() * 0.5).unwrap().sum_all().unwrap();
                    opt.backward_step(&loss).unwrap();
                }
                var.as_tensor().to_vec1::<f32>().unwrap()
            };
            assert_eq!(run(Some(3)), run(None), "{kind:?}");
        }
    }
}

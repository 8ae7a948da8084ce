//! Optimisers and learning-rate schedules of the fine-tuner.
//!
//! AdamW with a cosine decay was the first recipe; SGD with Nesterov momentum and a one-cycle
//! schedule is the usual one for convolutional networks with BatchNorm, and the one that
//! measures best on reduced graphs once BatchNorm is re-inserted (README, "Fine-tuning").

use anyhow::Result;
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use candle_nn::{AdamW, Optimizer as _, ParamsAdamW};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

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

/// The optimiser a run uses.
pub enum Optimizer {
    Sgd(NesterovSgd),
    AdamW(AdamW),
}

impl Optimizer {
    pub fn new(kind: OptimizerKind, vars: Vec<Var>, lr: f64, weight_decay: f64) -> Result<Self> {
        Ok(match kind {
            OptimizerKind::Sgd => Optimizer::Sgd(NesterovSgd::new(vars, lr, weight_decay)),
            OptimizerKind::Adamw => Optimizer::AdamW(AdamW::new(
                vars,
                ParamsAdamW { lr, weight_decay, ..Default::default() },
            )?),
        })
    }

    pub fn set_learning_rate(&mut self, lr: f64) {
        match self {
            Optimizer::Sgd(s) => s.lr = lr,
            Optimizer::AdamW(a) => a.set_learning_rate(lr),
        }
    }

    /// Back-propagate `loss`, update the weights, and return the gradients (of every variable
    /// the loss reads, weights or not) for whoever updates the rest.
    pub fn backward_step(&mut self, loss: &Tensor) -> Result<GradStore> {
        let grads = loss.backward()?;
        match self {
            Optimizer::Sgd(s) => s.step(&grads)?,
            Optimizer::AdamW(a) => a.step(&grads)?,
        }
        Ok(grads)
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
}

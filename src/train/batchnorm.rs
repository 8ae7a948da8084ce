//! Train-mode BatchNorm re-inserted after every convolution of the student.
//!
//! The graphs relucompile emits have BatchNorm folded into the convolutions, and a culled
//! graph's activations are far from normalised (its logits start around 1e3), which SGD cannot
//! train from (it diverges) and AdamW trains slowly. So the fine-tuner puts a BatchNorm back
//! after every Conv, trains with batch statistics, and folds it into the Conv's weight and bias
//! when it writes the graph. Each inserted BN starts as the identity at inference: its running
//! statistics are the conv output's on a calibration batch and `gamma = sqrt(var + eps)`,
//! `beta = mean`.

use crate::passes::recalibrate::channel_moments;
use anyhow::Result;
use candle_core::{Tensor, Var};
use std::sync::Mutex;

/// PyTorch's defaults.
pub const BN_MOMENTUM: f32 = 0.1;
pub const BN_EPS: f64 = 1e-5;

pub struct InsertedBatchNorm {
    pub gamma: Var,
    pub beta: Var,
    /// Running mean and (unbiased) variance, updated by every training step.
    running: Mutex<(Vec<f32>, Vec<f32>)>,
}

impl InsertedBatchNorm {
    /// A BN that maps the statistics of `y` (a calibration batch's conv output) to themselves.
    pub fn identity_for(y: &Tensor) -> Result<Self> {
        let m = channel_moments(y)?;
        let mean: Vec<f32> = m.mean.iter().map(|&v| v as f32).collect();
        let var: Vec<f32> = m.std.iter().map(|&s| (s * s) as f32).collect();
        let gamma: Vec<f32> = var.iter().map(|&v| (v as f64 + BN_EPS).sqrt() as f32).collect();
        let c = mean.len();
        Ok(InsertedBatchNorm {
            gamma: Var::from_vec(gamma, c, y.device())?,
            beta: Var::from_vec(mean.clone(), c, y.device())?,
            running: Mutex::new((mean, var)),
        })
    }

    fn channel_shape(y: &Tensor) -> Vec<usize> {
        let mut shape = vec![1; y.rank()];
        shape[1] = y.dim(1).unwrap_or(1);
        shape
    }

    /// Training: normalise by the batch's statistics and update the running ones.
    pub fn forward_train(&self, y: &Tensor) -> Result<Tensor> {
        let shape = Self::channel_shape(y);
        let mut mean = y.mean_keepdim(0)?;
        for axis in 2..y.rank() {
            mean = mean.mean_keepdim(axis)?;
        }
        let centered = y.broadcast_sub(&mean)?;
        let mut var = centered.sqr()?.mean_keepdim(0)?;
        for axis in 2..y.rank() {
            var = var.mean_keepdim(axis)?;
        }
        let out = centered
            .broadcast_div(&(&var + BN_EPS)?.sqrt()?)?
            .broadcast_mul(&self.gamma.as_tensor().reshape(shape.clone())?)?
            .broadcast_add(&self.beta.as_tensor().reshape(shape)?)?;
        let count = y.elem_count() / y.dim(1)?;
        let unbiased = count as f32 / (count.max(2) - 1) as f32;
        let batch_mean: Vec<f32> = mean.flatten_all()?.to_vec1()?;
        let batch_var: Vec<f32> = var.flatten_all()?.to_vec1()?;
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let (rm, rv) = &mut *running;
        for c in 0..rm.len() {
            rm[c] = (1.0 - BN_MOMENTUM) * rm[c] + BN_MOMENTUM * batch_mean[c];
            rv[c] = (1.0 - BN_MOMENTUM) * rv[c] + BN_MOMENTUM * batch_var[c] * unbiased;
        }
        Ok(out)
    }

    /// Inference: the per-channel affine map `scale * y + shift` of the running statistics.
    pub fn affine(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        let gamma: Vec<f32> = self.gamma.as_tensor().to_vec1()?;
        let beta: Vec<f32> = self.beta.as_tensor().to_vec1()?;
        let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let (rm, rv) = &*running;
        let scale: Vec<f32> =
            gamma.iter().zip(rv).map(|(g, v)| g / ((*v as f64 + BN_EPS).sqrt() as f32)).collect();
        let shift = beta.iter().zip(rm).zip(&scale).map(|((b, m), s)| b - m * s).collect();
        Ok((scale, shift))
    }

    pub fn forward_eval(&self, y: &Tensor) -> Result<Tensor> {
        let shape = Self::channel_shape(y);
        let (scale, shift) = self.affine()?;
        let scale = Tensor::from_vec(scale, shape.clone(), y.device())?;
        let shift = Tensor::from_vec(shift, shape, y.device())?;
        Ok(y.broadcast_mul(&scale)?.broadcast_add(&shift)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn starts_as_the_identity_at_inference_and_normalises_in_training() {
        let y = Tensor::from_vec(
            (0..48).map(|i| (i as f32 * 0.37).sin() * 3.0 + 1.0).collect::<Vec<_>>(),
            (4, 3, 2, 2),
            &Device::Cpu,
        )
        .unwrap();
        let bn = InsertedBatchNorm::identity_for(&y).unwrap();
        let back: Vec<f32> = bn.forward_eval(&y).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let orig: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        for (a, b) in back.iter().zip(&orig) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        // In training, on the same batch, the output is the input up to eps.
        let train: Vec<f32> =
            bn.forward_train(&y).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        for (a, b) in train.iter().zip(&orig) {
            assert!((a - b).abs() < 1e-3, "{a} vs {b}");
        }
    }
}

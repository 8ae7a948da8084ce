//! The distillation loss.

use anyhow::Result;
use candle_core::{Tensor, D};

/// Mean over the batch of `KL(softmax(t/T) || softmax(s/T))`.
pub fn kl_divergence(student: &Tensor, teacher: &Tensor, temperature: f64) -> Result<Tensor> {
    let log_s = candle_nn::ops::log_softmax(&(student / temperature)?, D::Minus1)?;
    let log_t = candle_nn::ops::log_softmax(&(teacher / temperature)?, D::Minus1)?;
    let p_t = log_t.exp()?;
    let n = student.dim(0)? as f64;
    Ok(((p_t * (log_t - log_s)?)?.sum_all()? / n)?)
}

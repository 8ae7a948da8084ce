//! Per-channel statistics of activations, in a fixed summation order (so that recalibration
//! and BatchNorm initialisation give the same bytes on any thread count).

use anyhow::Result;
use candle_core::Tensor;
use rayon::prelude::*;

/// Per-channel mean and standard deviation of one value.
#[derive(Debug, Clone)]
pub struct Moments {
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
}

/// Per-channel (axis 1) moments of a `[N, C, ...]` tensor, in a fixed summation order.
pub fn channel_moments(t: &Tensor) -> Result<Moments> {
    let dims = t.dims().to_vec();
    anyhow::ensure!(dims.len() >= 2, "value of rank {} has no channel axis", dims.len());
    let (n, c) = (dims[0], dims[1]);
    let spatial: usize = dims[2..].iter().product();
    let data: Vec<f32> = t.flatten_all()?.to_vec1()?;
    let count = (n * spatial) as f64;
    let (mean, std) = (0..c)
        .into_par_iter()
        .map(|ch| {
            let values = (0..n).flat_map(|i| {
                let start = (i * c + ch) * spatial;
                data[start..start + spatial].iter()
            });
            let (mut sum, mut sq) = (0.0f64, 0.0f64);
            for &v in values {
                sum += v as f64;
                sq += (v as f64) * (v as f64);
            }
            let mean = sum / count;
            (mean, (sq / count - mean * mean).max(0.0).sqrt())
        })
        .unzip();
    Ok(Moments { mean, std })
}

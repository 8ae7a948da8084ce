//! Train-mode BatchNorm re-inserted after every convolution of the student.
//!
//! The graphs relucompile emits have BatchNorm folded into the convolutions, and a culled
//! graph's activations are far from normalised (its logits start around 1e3), which SGD cannot
//! train from (it diverges) and AdamW trains slowly. So the fine-tuner puts a BatchNorm back
//! after every Conv, trains with batch statistics, and folds it into the Conv's weight and bias
//! when it writes the graph. Each inserted BN starts as the identity at inference: its running
//! statistics are the conv output's on a calibration batch and `gamma = sqrt(var + eps)`,
//! `beta = mean`.

use super::conv::cpu_slice;
use crate::passes::recalibrate::channel_moments;
use anyhow::Result;
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Storage};
use candle_core::{Tensor, Var};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

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

    /// Training: normalise by the batch's statistics and update the running ones. One fused,
    /// parallel op ([`BatchNormTrainOp`]) instead of a dozen single-threaded elementwise ones.
    pub fn forward_train(&self, y: &Tensor) -> Result<Tensor> {
        let stats = Arc::new(Mutex::new((vec![], vec![])));
        let op = BatchNormTrainOp::new(stats.clone());
        let out = y.contiguous()?.apply_op3(
            &self.gamma.as_tensor().contiguous()?,
            &self.beta.as_tensor().contiguous()?,
            op,
        )?;
        let count = y.elem_count() / y.dim(1)?;
        let unbiased = count as f32 / (count.max(2) - 1) as f32;
        let (batch_mean, batch_var) = stats.lock().unwrap_or_else(|e| e.into_inner()).clone();
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

/// A parallel task of the BatchNorm op takes planes (one image's one channel) of at least
/// this many floats together: at 4x4 a plane is 16 floats, far below rayon's per-task cost.
const TASK_FLOATS: usize = 1 << 13;

/// Planes per parallel task, for planes of `spatial` floats.
fn planes_per_task(spatial: usize) -> usize {
    TASK_FLOATS.div_ceil(spatial.max(1))
}

/// `f(p)` for every plane `p` of an array of `len` floats in planes of `spatial`, in parallel,
/// collected in plane order.
fn per_plane<T: Send>(len: usize, spatial: usize, f: impl Fn(usize) -> T + Sync + Send) -> Vec<T> {
    let planes = len / spatial.max(1);
    (0..planes).into_par_iter().with_min_len(planes_per_task(spatial)).map(f).collect()
}

/// `f(p, out)` on every plane `out` (`spatial` floats, index `p`) of `out`, in parallel.
fn for_planes(out: &mut [f32], spatial: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let per_task = planes_per_task(spatial);
    out.par_chunks_mut(per_task * spatial.max(1)).enumerate().for_each(|(t, chunk)| {
        for (j, plane) in chunk.chunks_mut(spatial.max(1)).enumerate() {
            f(t * per_task + j, plane);
        }
    });
}

/// `sum((a - sa) * (b - sb))` in eight interleaved f32 lanes (a fixed order the compiler
/// vectorises), the lanes added in f64. Centred, so that the variance of a channel whose mean
/// is far from zero (a culled graph's logits are around 1e3) does not cancel.
fn centred_dot(a: &[f32], sa: f32, b: &[f32], sb: f32) -> f64 {
    let mut lanes = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b[..a.len()].chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            lanes[l] += (x[l] - sa) * (y[l] - sb);
        }
    }
    for (l, (x, y)) in ra.iter().zip(rb).enumerate() {
        lanes[l] += (x - sa) * (y - sb);
    }
    lanes.iter().map(|&v| v as f64).sum()
}

/// Per-channel sums of per-plane values, each channel's planes added in image order.
fn by_channel(planes: &[f64], c: usize) -> Vec<f64> {
    let mut out = vec![0f64; c];
    for (i, v) in planes.iter().enumerate() {
        out[i % c] += v;
    }
    out
}

/// Per-channel batch mean and biased variance of a contiguous `[N, C, S...]` array: the mean,
/// then the mean squared deviation from it; each plane summed in f32 lanes, the planes in f64
/// in a fixed order.
fn channel_stats(x: &[f32], n: usize, c: usize, spatial: usize) -> (Vec<f64>, Vec<f64>) {
    let m = (n * spatial).max(1) as f64;
    let plane = |p: usize| &x[p * spatial..][..spatial];
    let sums = per_plane(x.len(), spatial, |p| super::conv::sum(plane(p)) as f64);
    let mean: Vec<f64> = by_channel(&sums, c).into_iter().map(|s| s / m).collect();
    let squares = per_plane(x.len(), spatial, |p| {
        let mu = mean[p % c] as f32;
        centred_dot(plane(p), mu, plane(p), mu)
    });
    let var = by_channel(&squares, c).into_iter().map(|s| (s / m).max(0.0)).collect();
    (mean, var)
}

/// `gamma * (x - mean) / sqrt(var + eps) + beta` with the batch's per-channel statistics, and
/// its exact gradient for `x`, `gamma` and `beta`. The batch statistics it used are left in
/// `stats` for the running averages.
struct BatchNormTrainOp {
    stats: Arc<Mutex<(Vec<f32>, Vec<f32>)>>,
    /// The batch's mean and biased variance in f64, kept by the forward for the backward.
    batch: Mutex<Option<(Vec<f64>, Vec<f64>)>>,
}

impl BatchNormTrainOp {
    fn new(stats: Arc<Mutex<(Vec<f32>, Vec<f32>)>>) -> Self {
        BatchNormTrainOp { stats, batch: Mutex::new(None) }
    }
}

fn dims_ncs(dims: &[usize]) -> (usize, usize, usize) {
    (dims[0], dims[1], dims[2..].iter().product())
}

impl CustomOp3 for BatchNormTrainOp {
    fn name(&self) -> &'static str {
        "batchnorm-train"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, gamma, beta) = (cpu_slice(s1, l1)?, cpu_slice(s2, l2)?, cpu_slice(s3, l3)?);
        let (n, c, spatial) = dims_ncs(l1.dims());
        let (mean, var) = channel_stats(x, n, c, spatial);
        let scale: Vec<f32> =
            (0..c).map(|ch| gamma[ch] / ((var[ch] + BN_EPS).sqrt() as f32)).collect();
        let shift: Vec<f32> = (0..c).map(|ch| beta[ch] - mean[ch] as f32 * scale[ch]).collect();
        let mut y = vec![0f32; x.len()];
        for_planes(&mut y, spatial, |p, out| {
            let (ch, inp) = (p % c, &x[p * spatial..][..out.len()]);
            for (o, &v) in out.iter_mut().zip(inp) {
                *o = v * scale[ch] + shift[ch];
            }
        });
        *self.stats.lock().unwrap_or_else(|e| e.into_inner()) =
            (mean.iter().map(|&m| m as f32).collect(), var.iter().map(|&v| v as f32).collect());
        *self.batch.lock().unwrap_or_else(|e| e.into_inner()) = Some((mean, var));
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, c, spatial) = dims_ncs(x.dims());
        let g: Vec<f32> = gamma.flatten_all()?.to_vec1()?;
        let grad = grad.contiguous()?;
        let (xs, xl) = x.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let (Storage::Cpu(xs), Storage::Cpu(gs)) = (&*xs, &*gs) else {
            candle_core::bail!("batchnorm: only the CPU is supported");
        };
        let (xs, dy) = (cpu_slice(xs, xl)?, cpu_slice(gs, gl)?);
        let kept = self.batch.lock().unwrap_or_else(|e| e.into_inner()).take();
        let (mean, var) = kept.unwrap_or_else(|| channel_stats(xs, n, c, spatial));
        let invstd: Vec<f64> = var.iter().map(|v| 1.0 / (v + BN_EPS).sqrt()).collect();
        let mean32: Vec<f32> = mean.iter().map(|&m| m as f32).collect();
        fn plane(v: &[f32], p: usize, spatial: usize) -> &[f32] {
            &v[p * spatial..][..spatial]
        }
        // Per channel: sum(dy) and sum(dy * xhat), in a fixed order.
        let sum_dy = by_channel(
            &per_plane(dy.len(), spatial, |p| super::conv::sum(plane(dy, p, spatial)) as f64),
            c,
        );
        let sum_dy_xc = by_channel(
            &per_plane(dy.len(), spatial, |p| {
                centred_dot(plane(dy, p, spatial), 0.0, plane(xs, p, spatial), mean32[p % c])
            }),
            c,
        );
        let sum_dy_xhat: Vec<f64> = sum_dy_xc.iter().zip(&invstd).map(|(s, i)| s * i).collect();
        // dx = k * (dy - sum_dy / m - xhat * sum_dy_xhat / m), k = gamma * invstd, as
        // `k * dy + q * (x - mean) + r` with per-channel constants.
        let m = (n * spatial) as f64;
        let coef: Vec<(f32, f32, f32)> = (0..c)
            .map(|ch| {
                let k = g[ch] as f64 * invstd[ch];
                let q = -k * invstd[ch] * sum_dy_xhat[ch] / m;
                (k as f32, q as f32, (-k * sum_dy[ch] / m) as f32)
            })
            .collect();
        let mut dx = vec![0f32; xs.len()];
        for_planes(&mut dx, spatial, |p, out| {
            let ((k, q, r), mu) = (coef[p % c], mean32[p % c]);
            let (d, v) = (plane(dy, p, spatial), plane(xs, p, spatial));
            for ((o, &d), &v) in out.iter_mut().zip(d).zip(v) {
                *o = k * d + q * (v - mu) + r;
            }
        });
        let to_f32 = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<f32>>();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            Some(Tensor::from_vec(to_f32(sum_dy_xhat), c, x.device())?),
            Some(Tensor::from_vec(to_f32(sum_dy), c, x.device())?),
        ))
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
    /// The fused op's outputs and gradients equal those of the same formula written with
    /// candle's elementwise ops.
    #[test]
    fn fused_op_matches_the_composed_formula() {
        let dev = Device::Cpu;
        let xv: Vec<f32> = (0..2 * 3 * 4 * 5).map(|i| ((i * 29 % 17) as f32 - 8.0) * 0.3).collect();
        let x = Var::from_vec(xv, (2, 3, 4, 5), &dev).unwrap();
        let gamma = Var::from_vec(vec![0.5f32, 1.5, -2.0], 3, &dev).unwrap();
        let beta = Var::from_vec(vec![0.1f32, -0.2, 0.3], 3, &dev).unwrap();
        let w = Tensor::from_vec(
            (0..120).map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.1).collect::<Vec<_>>(),
            (2, 3, 4, 5),
            &dev,
        )
        .unwrap();
        let fused = x
            .as_tensor()
            .apply_op3(
                gamma.as_tensor(),
                beta.as_tensor(),
                BatchNormTrainOp::new(Arc::new(Mutex::new((vec![], vec![])))),
            )
            .unwrap();
        let shape = (1, 3, 1, 1);
        let mean = x
            .as_tensor()
            .mean_keepdim(0)
            .unwrap()
            .mean_keepdim(2)
            .unwrap()
            .mean_keepdim(3)
            .unwrap();
        let centered = x.as_tensor().broadcast_sub(&mean).unwrap();
        let var = centered
            .sqr()
            .unwrap()
            .mean_keepdim(0)
            .unwrap()
            .mean_keepdim(2)
            .unwrap()
            .mean_keepdim(3)
            .unwrap();
        let composed = centered
            .broadcast_div(&(var + BN_EPS).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(&gamma.as_tensor().reshape(shape).unwrap())
            .unwrap()
            .broadcast_add(&beta.as_tensor().reshape(shape).unwrap())
            .unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (a, b) in flat(&fused).iter().zip(flat(&composed)) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
        let gf = (fused * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gc = (composed * &w).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&x, &gamma, &beta] {
            let (a, b) = (flat(gf.get(v).unwrap()), flat(gc.get(v).unwrap()));
            for (p, q) in a.iter().zip(&b) {
                assert!((p - q).abs() < 1e-4, "{p} vs {q}");
            }
        }
    }
}

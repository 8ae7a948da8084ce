//! Train-mode BatchNorm re-inserted after every convolution of the student.
//!
//! The graphs relucompile emits have BatchNorm folded into the convolutions, and a culled
//! graph's activations are far from normalised (its logits start around 1e3), which SGD cannot
//! train from (it diverges) and AdamW trains slowly. So the fine-tuner puts a BatchNorm back
//! after every Conv, trains with batch statistics, and folds it into the Conv's weight and bias
//! when it writes the graph. Each inserted BN starts as the identity at inference: its running
//! statistics are the conv output's on a calibration batch and `gamma = sqrt(var + eps)`,
//! `beta = mean`.

use super::candle::cpu_slice;
use super::conv::{self, Conv2dParams, ConvGeometry};
use super::stats::channel_moments;
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
        self.update_running(&stats, out.elem_count() / out.dim(1)?);
        Ok(out)
    }

    /// [`Self::forward_train`] of the convolution of `x` with `w` and `b`, as one op
    /// ([`ConvBatchNormOp`]).
    pub fn conv_forward_train(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        conv: Conv2dParams,
    ) -> Result<Tensor> {
        let mut parts = Vec::with_capacity(3);
        if let Some(b) = b {
            parts.push(b.flatten_all()?);
        }
        parts.extend([self.gamma.as_tensor().clone(), self.beta.as_tensor().clone()]);
        let packed = Tensor::cat(&parts, 0)?;
        let stats = Arc::new(Mutex::new((vec![], vec![])));
        let op = ConvBatchNormOp {
            conv,
            with_bias: b.is_some(),
            stats: stats.clone(),
            saved: Mutex::new(None),
        };
        let out = x.contiguous()?.apply_op3(&w.contiguous()?, &packed, op)?;
        self.update_running(&stats, out.elem_count() / out.dim(1)?);
        Ok(out)
    }

    /// The running mean and variance (a training checkpoint saves them).
    pub fn running(&self) -> (Vec<f32>, Vec<f32>) {
        self.running.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replace the running statistics (a resumed training restores them).
    pub fn set_running(&self, mean: Vec<f32>, var: Vec<f32>) {
        *self.running.lock().unwrap_or_else(|e| e.into_inner()) = (mean, var);
    }

    /// Move the running statistics towards the batch's (`count` values per channel).
    fn update_running(&self, stats: &Mutex<(Vec<f32>, Vec<f32>)>, count: usize) {
        let unbiased = count as f32 / (count.max(2) - 1) as f32;
        let (batch_mean, batch_var) = stats.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let (rm, rv) = &mut *running;
        for c in 0..rm.len() {
            rm[c] = (1.0 - BN_MOMENTUM) * rm[c] + BN_MOMENTUM * batch_mean[c];
            rv[c] = (1.0 - BN_MOMENTUM) * rv[c] + BN_MOMENTUM * batch_var[c] * unbiased;
        }
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

/// The batch's mean and biased variance per channel, in f64.
type Moments = (Vec<f64>, Vec<f64>);

/// `gamma * (x - mean) / sqrt(var + eps) + beta` over a contiguous `[N, C, S...]` array (`dims`
/// = `(N, C, S)`) with its batch statistics, which are returned too.
fn normalise(
    x: &[f32],
    dims: (usize, usize, usize),
    gamma: &[f32],
    beta: &[f32],
) -> (Vec<f32>, Moments) {
    let (n, c, spatial) = dims;
    let (mean, var) = channel_stats(x, n, c, spatial);
    let scale: Vec<f32> = (0..c).map(|ch| gamma[ch] / ((var[ch] + BN_EPS).sqrt() as f32)).collect();
    let shift: Vec<f32> = (0..c).map(|ch| beta[ch] - mean[ch] as f32 * scale[ch]).collect();
    let mut y = conv::zeroed(x.len());
    for_planes(&mut y, spatial, |p, out| {
        let (ch, inp) = (p % c, &x[p * spatial..][..out.len()]);
        for (o, &v) in out.iter_mut().zip(inp) {
            *o = v * scale[ch] + shift[ch];
        }
    });
    (y, (mean, var))
}

/// The exact gradients `(dx, dgamma, dbeta)` of [`normalise`] at `x` for output gradient
/// `dy`, given the statistics it used.
fn normalise_grads(
    x: &[f32],
    dims: (usize, usize, usize),
    gamma: &[f32],
    dy: &[f32],
    (mean, var): &Moments,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (n, c, spatial) = dims;
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
            centred_dot(plane(dy, p, spatial), 0.0, plane(x, p, spatial), mean32[p % c])
        }),
        c,
    );
    let sum_dy_xhat: Vec<f64> = sum_dy_xc.iter().zip(&invstd).map(|(s, i)| s * i).collect();
    // dx = k * (dy - sum_dy / m - xhat * sum_dy_xhat / m), k = gamma * invstd, as
    // `k * dy + q * (x - mean) + r` with per-channel constants.
    let m = (n * spatial) as f64;
    let coef: Vec<(f32, f32, f32)> = (0..c)
        .map(|ch| {
            let k = gamma[ch] as f64 * invstd[ch];
            let q = -k * invstd[ch] * sum_dy_xhat[ch] / m;
            (k as f32, q as f32, (-k * sum_dy[ch] / m) as f32)
        })
        .collect();
    let mut dx = conv::zeroed(x.len());
    for_planes(&mut dx, spatial, |p, out| {
        let ((k, q, r), mu) = (coef[p % c], mean32[p % c]);
        let (d, v) = (plane(dy, p, spatial), plane(x, p, spatial));
        for ((o, &d), &v) in out.iter_mut().zip(d).zip(v) {
            *o = k * d + q * (v - mu) + r;
        }
    });
    let to_f32 = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<f32>>();
    (dx, to_f32(sum_dy_xhat), to_f32(sum_dy))
}

/// Leave the batch statistics in `stats` (as f32) for the running averages.
fn record(stats: &Mutex<(Vec<f32>, Vec<f32>)>, (mean, var): &Moments) {
    *stats.lock().unwrap_or_else(|e| e.into_inner()) =
        (mean.iter().map(|&m| m as f32).collect(), var.iter().map(|&v| v as f32).collect());
}

/// [`normalise`] and its gradients for `x`, `gamma` and `beta` as a candle op. The batch
/// statistics it used are left in `stats` for the running averages.
struct BatchNormTrainOp {
    stats: Arc<Mutex<(Vec<f32>, Vec<f32>)>>,
    /// The batch's statistics, kept by the forward for the backward.
    batch: Mutex<Option<Moments>>,
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
        let (y, moments) = normalise(x, dims_ncs(l1.dims()), gamma, beta);
        record(&self.stats, &moments);
        *self.batch.lock().unwrap_or_else(|e| e.into_inner()) = Some(moments);
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
        let dims = dims_ncs(x.dims());
        let g: Vec<f32> = gamma.flatten_all()?.to_vec1()?;
        let grad = grad.contiguous()?;
        let (xs, xl) = x.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let (Storage::Cpu(xs), Storage::Cpu(gs)) = (&*xs, &*gs) else {
            candle_core::bail!("batchnorm: only the CPU is supported");
        };
        let (xs, dy) = (cpu_slice(xs, xl)?, cpu_slice(gs, gl)?);
        let kept = self.batch.lock().unwrap_or_else(|e| e.into_inner()).take();
        let moments = kept.unwrap_or_else(|| channel_stats(xs, dims.0, dims.1, dims.2));
        let (dx, dgamma, dbeta) = normalise_grads(xs, dims, &g, dy, &moments);
        let c = dims.1;
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            Some(Tensor::from_vec(dgamma, c, x.device())?),
            Some(Tensor::from_vec(dbeta, c, x.device())?),
        ))
    }
}

/// A convolution and the BatchNorm after it as one candle op over `(x, w, packed)`, `packed`
/// being `[bias (when the conv has one), gamma, beta]`: the convolution's output never becomes
/// a tensor of the autodiff graph, so candle does not zero and add its gradient on one core
/// (a tenth of a training step when they were two ops).
struct ConvBatchNormOp {
    conv: Conv2dParams,
    with_bias: bool,
    stats: Arc<Mutex<(Vec<f32>, Vec<f32>)>>,
    /// The convolution's output and the batch statistics, kept by the forward for the backward.
    saved: Mutex<Option<(Vec<f32>, Moments)>>,
}

/// A convolution's bias (when it has one), and its BatchNorm's gamma and beta.
type Unpacked<'a> = (Option<&'a [f32]>, &'a [f32], &'a [f32]);

impl ConvBatchNormOp {
    fn geometry(&self, x: &[usize], w: &[usize]) -> candle_core::Result<ConvGeometry> {
        ConvGeometry::new(x, w, self.conv).map_err(candle_core::Error::Msg)
    }

    /// `(bias, gamma, beta)` of `packed`, for `o` output channels.
    fn unpack<'a>(&self, packed: &'a [f32], o: usize) -> candle_core::Result<Unpacked<'a>> {
        let bias = usize::from(self.with_bias);
        if packed.len() != (2 + bias) * o {
            candle_core::bail!("conv-batchnorm: {} parameters for {o} channels", packed.len());
        }
        let (b, rest) = packed.split_at(bias * o);
        let (gamma, beta) = rest.split_at(o);
        Ok((self.with_bias.then_some(b), gamma, beta))
    }
}

impl CustomOp3 for ConvBatchNormOp {
    fn name(&self) -> &'static str {
        "conv-batchnorm-train"
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
        let g = self.geometry(l1.dims(), l2.dims())?;
        let (x, w, packed) = (cpu_slice(s1, l1)?, cpu_slice(s2, l2)?, cpu_slice(s3, l3)?);
        let (bias, gamma, beta) = self.unpack(packed, g.o)?;
        let y = conv::forward(x, w, bias, &g);
        let (out, moments) = normalise(&y, (g.n, g.o, g.oh * g.ow), gamma, beta);
        record(&self.stats, &moments);
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some((y, moments));
        Ok((CpuStorage::F32(out), Shape::from(g.out_dims().to_vec())))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        packed: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = self.geometry(x.dims(), w.dims())?;
        let params: Vec<f32> = packed.flatten_all()?.to_vec1()?;
        let (bias, gamma, _) = self.unpack(&params, g.o)?;
        let grad = grad.contiguous()?;
        let need_dx = x.track_op();
        let (dconv, dgamma, dbeta, r) = {
            let (xs, xl) = x.storage_and_layout();
            let (ws, wl) = w.storage_and_layout();
            let (gs, gl) = grad.storage_and_layout();
            let (Storage::Cpu(xs), Storage::Cpu(ws), Storage::Cpu(gs)) = (&*xs, &*ws, &*gs) else {
                candle_core::bail!("conv-batchnorm: only the CPU is supported");
            };
            let (xs, ws, dy) = (cpu_slice(xs, xl)?, cpu_slice(ws, wl)?, cpu_slice(gs, gl)?);
            let kept = self.saved.lock().unwrap_or_else(|e| e.into_inner()).take();
            let (y, moments) = match kept {
                Some(kept) => kept,
                None => {
                    let y = conv::forward(xs, ws, bias, &g);
                    let moments = channel_stats(&y, g.n, g.o, g.oh * g.ow);
                    (y, moments)
                }
            };
            let dims = (g.n, g.o, g.oh * g.ow);
            let (dconv, dgamma, dbeta) = normalise_grads(&y, dims, gamma, dy, &moments);
            let r = conv::backward(xs, ws, &dconv, &g, need_dx, self.with_bias);
            (dconv, dgamma, dbeta, r)
        };
        drop(dconv);
        let mut dparams = r.db.unwrap_or_default();
        dparams.extend(dgamma);
        dparams.extend(dbeta);
        let dx = r.dx.map(|d| Tensor::from_vec(d, x.shape(), x.device())).transpose()?;
        Ok((
            dx,
            Some(Tensor::from_vec(r.dw, w.shape(), w.device())?),
            Some(Tensor::from_vec(dparams, packed.shape(), packed.device())?),
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

    /// The fused Conv + BatchNorm op computes what the two ops compute one after the other,
    /// forward and every gradient (input, weight, bias, gamma, beta), with and without a bias,
    /// at stride 1 (the direct kernel on a wide plane) and 2.
    #[test]
    fn fused_conv_batchnorm_matches_the_two_ops() {
        use crate::kernels::conv::{conv2d, tests::rand_vec};
        let dev = Device::Cpu;
        for (stride, with_bias) in [(1, true), (2, false), (1, false)] {
            let p = Conv2dParams { stride: (stride, stride), pads: [1; 4], ..Default::default() };
            let x = Var::from_vec(rand_vec(3 * 4 * 14 * 15, 1), (3, 4, 14, 15), &dev).unwrap();
            let w = Var::from_vec(rand_vec(6 * 4 * 9, 2), (6, 4, 3, 3), &dev).unwrap();
            let b = Var::from_vec(rand_vec(6, 3), 6, &dev).unwrap();
            let b = with_bias.then_some(b);
            let y0 =
                conv2d(x.as_tensor(), w.as_tensor(), b.as_ref().map(|b| b.as_tensor()), p).unwrap();
            let bn = InsertedBatchNorm::identity_for(&(&y0 * 1.5).unwrap()).unwrap();
            let r = Tensor::from_vec(rand_vec(y0.elem_count(), 4), y0.shape(), &dev).unwrap();
            let run = |fused: bool| {
                let b = b.as_ref().map(|b| b.as_tensor());
                let y = if fused {
                    bn.conv_forward_train(x.as_tensor(), w.as_tensor(), b, p).unwrap()
                } else {
                    bn.forward_train(&conv2d(x.as_tensor(), w.as_tensor(), b, p).unwrap()).unwrap()
                };
                let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
                let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let mut out = vec![flat(&y)];
                let vars =
                    [x.as_tensor(), w.as_tensor(), bn.gamma.as_tensor(), bn.beta.as_tensor()];
                for v in vars.into_iter().chain(b) {
                    out.push(flat(grads.get(v).unwrap()));
                }
                out
            };
            let (fused, apart) = (run(true), run(false));
            for (k, (a, b)) in fused.iter().zip(&apart).enumerate() {
                assert_eq!(a.len(), b.len());
                for (i, (u, v)) in a.iter().zip(b).enumerate() {
                    assert!(
                        (u - v).abs() <= 1e-4 * (1.0 + v.abs()),
                        "stride {stride} part {k}[{i}]: {u} vs {v}"
                    );
                }
            }
        }
    }
}

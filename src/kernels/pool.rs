//! 2-D max and average pooling for training, as a candle custom op with its own backward.
//!
//! candle 0.9's `max_pool2d` / `avg_pool2d` backward only exists for kernels equal to their
//! stride, scales max-pool gradients by (maxima in the window) / (window size), and misplaces
//! gradients when the size is not a multiple of the stride. This op follows ONNX MaxPool /
//! AveragePool (pads per side, `count_include_pad`; no `ceil_mode`, no dilations): a max-pool
//! gradient goes to the window's first maximum in row-major order (as PyTorch's does), an
//! average-pool gradient is spread evenly over the cells it averaged. Planes run in parallel;
//! nothing is summed across planes, so any thread count gives the same bits.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolMode {
    Max,
    /// Divide by the whole window (`count_include_pad`) or by its cells inside the input.
    Average {
        count_include_pad: bool,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pool2dParams {
    /// (height, width).
    pub kernel: (usize, usize),
    /// (vertical, horizontal).
    pub stride: (usize, usize),
    /// `[top, left, bottom, right]`, the order of ONNX's `pads`.
    pub pads: [usize; 4],
    pub mode: PoolMode,
    /// ONNX's `ceil_mode` (max pooling only): output sizes rounded up, the last window clipped
    /// to the input (GoogLeNet's and SqueezeNet's exports).
    pub ceil: bool,
}

/// Output size of one axis, when the kernel fits and every window touches the input.
fn out_len(len: usize, pad0: usize, pad1: usize, k: usize, s: usize, ceil: bool) -> Option<usize> {
    if k == 0 || s == 0 || len + pad0 + pad1 < k || pad0 >= k || pad1 >= k {
        return None;
    }
    let span = len + pad0 + pad1 - k;
    let mut out = if ceil { span.div_ceil(s) + 1 } else { span / s + 1 };
    // As ONNX and PyTorch: no window starts in the end padding.
    if ceil && (out - 1) * s >= len + pad0 {
        out -= 1;
    }
    Some(out)
}

/// Output `(OH, OW)` for an input plane of `h x w`.
pub fn out_dims(h: usize, w: usize, p: &Pool2dParams) -> Result<(usize, usize), String> {
    let oh = out_len(h, p.pads[0], p.pads[2], p.kernel.0, p.stride.0, p.ceil);
    let ow = out_len(w, p.pads[1], p.pads[3], p.kernel.1, p.stride.1, p.ceil);
    oh.zip(ow).ok_or_else(|| format!("pool {p:?} does not fit a {h}x{w} input"))
}

/// The input rows (or columns) window `o` covers, clipped to the input.
fn window(o: usize, s: usize, pad: usize, k: usize, len: usize) -> std::ops::Range<usize> {
    let start = (o * s) as isize - pad as isize;
    let lo = start.max(0) as usize;
    let hi = ((start + k as isize).max(0) as usize).min(len);
    lo..hi.max(lo)
}

/// What each output cell of one plane reads: (rows, columns, divisor for averages).
fn windows(
    h: usize,
    w: usize,
    p: &Pool2dParams,
) -> impl Iterator<Item = (std::ops::Range<usize>, std::ops::Range<usize>, f32)> + '_ {
    let (oh, ow) = out_dims(h, w, p).expect("checked by the caller");
    (0..oh).flat_map(move |oy| {
        let rows = window(oy, p.stride.0, p.pads[0], p.kernel.0, h);
        (0..ow).map(move |ox| {
            let cols = window(ox, p.stride.1, p.pads[1], p.kernel.1, w);
            let count = match p.mode {
                PoolMode::Average { count_include_pad: true } => p.kernel.0 * p.kernel.1,
                _ => rows.len() * cols.len(),
            };
            (rows.clone(), cols, count as f32)
        })
    })
}

/// Index (in the plane) of the first maximum of a window, row-major.
fn argmax(
    plane: &[f32],
    w: usize,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
) -> usize {
    let mut best = rows.start * w + cols.start;
    for y in rows {
        for x in cols.clone() {
            if plane[y * w + x] > plane[best] {
                best = y * w + x;
            }
        }
    }
    best
}

/// Pool `x`, `planes` planes of `h x w` (`[N * C, H, W]`), into `[N * C, OH, OW]`.
pub fn forward(x: &[f32], h: usize, w: usize, p: &Pool2dParams) -> Vec<f32> {
    let (oh, ow) = out_dims(h, w, p).expect("pool geometry");
    let planes = x.len() / (h * w).max(1);
    let mut y = vec![0f32; planes * oh * ow];
    if y.is_empty() {
        return y;
    }
    let per_task = PLANES_PER_TASK_FLOATS.div_ceil(h * w).max(1);
    y.par_chunks_mut(oh * ow * per_task).zip(x.par_chunks(h * w * per_task)).for_each(
        |(outs, planes)| {
            for (out, plane) in outs.chunks_exact_mut(oh * ow).zip(planes.chunks_exact(h * w)) {
                forward_plane(plane, h, w, p, out);
            }
        },
    );
    y
}

/// Input floats a parallel task pools at least: one 28x28 plane per task spent more on
/// scheduling than on pooling (a quarter of the VGG's evaluation time, perf).
const PLANES_PER_TASK_FLOATS: usize = 1 << 14;

/// Pool one plane into `out`.
fn forward_plane(plane: &[f32], h: usize, w: usize, p: &Pool2dParams, out: &mut [f32]) {
    if p.pads == [0; 4] && p.mode == PoolMode::Max && !p.ceil {
        // Every window lies inside the plane: no clipping, no index kept. Same value as the
        // first maximum the general path takes.
        let ow = out_dims(h, w, p).expect("pool geometry").1;
        let ((kh, kw), (sh, sw)) = (p.kernel, p.stride);
        if (kh, kw, sh, sw) == (2, 2, 2, 2) {
            // The VGG's pools: pairs of pairs, in a form the compiler vectorises.
            let larger = |a: f32, b: f32| if b > a { b } else { a };
            for (oy, row) in out.chunks_exact_mut(ow).enumerate() {
                let top = plane[2 * oy * w..][..2 * ow].chunks_exact(2);
                let bottom = plane[(2 * oy + 1) * w..][..2 * ow].chunks_exact(2);
                for (o, (t, b)) in row.iter_mut().zip(top.zip(bottom)) {
                    *o = larger(larger(t[0], t[1]), larger(b[0], b[1]));
                }
            }
            return;
        }
        for (oy, row) in out.chunks_exact_mut(ow).enumerate() {
            let top = &plane[oy * sh * w..];
            for (ox, o) in row.iter_mut().enumerate() {
                let mut m = top[ox * sw];
                for ky in 0..kh {
                    for &v in &top[ky * w + ox * sw..][..kw] {
                        if v > m {
                            m = v;
                        }
                    }
                }
                *o = m;
            }
        }
        return;
    }
    for (o, (rows, cols, count)) in out.iter_mut().zip(windows(h, w, p)) {
        *o = match p.mode {
            PoolMode::Max => plane[argmax(plane, w, rows, cols)],
            PoolMode::Average { .. } => {
                let mut s = 0f32;
                for y in rows {
                    for v in &plane[y * w + cols.start..y * w + cols.end] {
                        s += *v;
                    }
                }
                s / count
            }
        };
    }
}

/// The gradient of [`forward`] at `x` for output gradient `dy`.
pub fn backward(x: &[f32], dy: &[f32], h: usize, w: usize, p: &Pool2dParams) -> Vec<f32> {
    let (oh, ow) = out_dims(h, w, p).expect("pool geometry");
    let mut dx = vec![0f32; x.len()];
    if dx.is_empty() || dy.is_empty() {
        return dx;
    }
    dx.par_chunks_mut(h * w).zip(x.par_chunks(h * w)).zip(dy.par_chunks(oh * ow)).for_each(
        |((dplane, plane), g)| {
            for (&g, (rows, cols, count)) in g.iter().zip(windows(h, w, p)) {
                match p.mode {
                    PoolMode::Max => dplane[argmax(plane, w, rows, cols)] += g,
                    PoolMode::Average { .. } => {
                        let share = g / count;
                        for y in rows {
                            for d in &mut dplane[y * w + cols.start..y * w + cols.end] {
                                *d += share;
                            }
                        }
                    }
                }
            }
        },
    );
    dx
}

struct PoolOp(Pool2dParams);

impl CustomOp1 for PoolOp {
    fn name(&self) -> &'static str {
        "pool2d"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let &[n, c, h, w] = l.dims() else { candle_core::bail!("pool: input is not 4-D") };
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("pool: input is not contiguous")
        };
        let (oh, ow) = out_dims(h, w, &self.0).map_err(candle_core::Error::Msg)?;
        let y = forward(&s.as_slice::<f32>()?[a..b], h, w, &self.0);
        Ok((CpuStorage::F32(y), Shape::from((n, c, oh, ow))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (_, _, h, w) = x.dims4()?;
        let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let g: Vec<f32> = grad.flatten_all()?.to_vec1()?;
        let dx = backward(&xs, &g, h, w, &self.0);
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// Pool `x` (`[N, C, H, W]`, f32, CPU), differentiably.
pub fn pool2d(x: &Tensor, p: Pool2dParams) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(PoolOp(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pooling straight from the definition, in f64, padding as -inf / excluded cells.
    fn naive(x: &[f32], h: usize, w: usize, p: &Pool2dParams) -> Vec<f64> {
        let (oh, ow) = out_dims(h, w, p).unwrap();
        let mut out = vec![];
        for plane in x.chunks(h * w) {
            for oy in 0..oh {
                for ox in 0..ow {
                    let (mut best, mut sum, mut inside) = (f64::NEG_INFINITY, 0f64, 0usize);
                    for ky in 0..p.kernel.0 {
                        for kx in 0..p.kernel.1 {
                            let iy = (oy * p.stride.0 + ky) as isize - p.pads[0] as isize;
                            let ix = (ox * p.stride.1 + kx) as isize - p.pads[1] as isize;
                            if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                continue;
                            }
                            let v = plane[iy as usize * w + ix as usize] as f64;
                            best = best.max(v);
                            sum += v;
                            inside += 1;
                        }
                    }
                    out.push(match p.mode {
                        PoolMode::Max => best,
                        PoolMode::Average { count_include_pad: true } => {
                            sum / (p.kernel.0 * p.kernel.1) as f64
                        }
                        PoolMode::Average { count_include_pad: false } => sum / inside as f64,
                    });
                }
            }
        }
        out
    }

    use crate::kernels::conv::tests::rand_vec;

    fn params() -> Vec<Pool2dParams> {
        let mut out = vec![];
        for kernel in [(2, 2), (3, 3), (3, 2), (1, 1)] {
            for stride in [(1, 1), (2, 2), (2, 1)] {
                for pads in [[0; 4], [1; 4], [0, 1, 1, 0]] {
                    for mode in [
                        PoolMode::Max,
                        PoolMode::Average { count_include_pad: false },
                        PoolMode::Average { count_include_pad: true },
                    ] {
                        out.push(Pool2dParams { kernel, stride, pads, mode, ceil: false });
                        if mode == PoolMode::Max {
                            out.push(Pool2dParams { kernel, stride, pads, mode, ceil: true });
                        }
                    }
                }
            }
        }
        out
    }

    #[test]
    fn forward_matches_the_definition_and_backward_is_its_gradient() {
        for p in params() {
            for (h, w) in [(5, 6), (4, 4), (7, 3)] {
                if out_dims(h, w, &p).is_err() {
                    continue;
                }
                let x = rand_vec(2 * h * w, 3);
                let y = forward(&x, h, w, &p);
                for (a, b) in y.iter().zip(naive(&x, h, w, &p)) {
                    assert!((*a as f64 - b).abs() < 1e-5, "{p:?} {h}x{w}");
                }
                // Pooling is piecewise linear; the random inputs have no ties, so a small
                // central difference is exact but for rounding.
                let r = rand_vec(y.len(), 4);
                let dx = backward(&x, &r, h, w, &p);
                let loss = |x: &[f32]| -> f64 {
                    naive(x, h, w, &p).iter().zip(&r).map(|(a, b)| a * *b as f64).sum()
                };
                for i in 0..x.len() {
                    let (mut a, mut b) = (x.clone(), x.clone());
                    a[i] += 1e-3;
                    b[i] -= 1e-3;
                    let fd = (loss(&a) - loss(&b)) / 2e-3;
                    assert!(
                        (dx[i] as f64 - fd).abs() < 1e-3,
                        "{p:?} {h}x{w} dx[{i}] {} vs {fd}",
                        dx[i]
                    );
                }
            }
        }
    }

    #[test]
    fn max_pool_ties_go_to_the_first_maximum() {
        let p = Pool2dParams {
            kernel: (2, 2),
            stride: (2, 2),
            pads: [0; 4],
            mode: PoolMode::Max,
            ceil: false,
        };
        let dx = backward(&[1.0, 1.0, 0.0, 1.0], &[5.0], 2, 2, &p);
        assert_eq!(dx, vec![5.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn candle_op_matches_the_functions_and_differentiates() {
        let p = Pool2dParams {
            kernel: (3, 3),
            stride: (2, 2),
            pads: [1; 4],
            mode: PoolMode::Average { count_include_pad: false },
            ceil: false,
        };
        let x0 = rand_vec(2 * 3 * 5 * 6, 8);
        let x = candle_core::Var::from_vec(x0.clone(), (2, 3, 5, 6), &candle_core::Device::Cpu)
            .unwrap();
        let y = pool2d(&x, p).unwrap();
        assert_eq!(y.dims(), &[2, 3, 3, 3]);
        let flat: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(flat, forward(&x0, 5, 6, &p));
        let r = rand_vec(flat.len(), 9);
        let rt = Tensor::from_vec(r.clone(), y.dims(), &candle_core::Device::Cpu).unwrap();
        let grads = (y * rt).unwrap().sum_all().unwrap().backward().unwrap();
        let dx: Vec<f32> = grads.get(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(dx, backward(&x0, &r, 5, 6, &p));
    }
}

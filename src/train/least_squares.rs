//! Ridge least squares for refitting a convolution (or a Gemm, as a 1x1 convolution) to target
//! outputs: the normal equations accumulated image by image over the im2col matrix, then a
//! Cholesky solve in f64.
//!
//! Written here rather than taken from a linear-algebra crate: the one solve needed is a
//! symmetric positive definite system of at most a few thousand unknowns (a 40-line Cholesky,
//! tested below), and a clean CI build already takes most of its time budget.

use super::conv::{im2col, matmul, ConvGeometry, MatRef};
use anyhow::{bail, Result};
use gemm::Parallelism;
use rayon::prelude::*;

/// Images whose products are summed in f32 before they are added to the f64 totals: 8 images
/// of 28x28 outputs are 6,272 terms per entry, far inside f32's precision, and the chunks keep
/// both cores busy. The chunks are summed in index order, so the result does not depend on
/// scheduling.
const IMAGES_PER_CHUNK: usize = 8;

/// `G = [X 1]^T [X 1]` and `R = [X 1]^T T` over every output position of every image, where a
/// row of `X` is one position's im2col column and `T` the target there: the unknowns are each
/// output channel's `K` weights and its bias.
pub struct NormalEquations {
    /// Unknowns per output channel: `K + 1` (the last is the bias).
    pub unknowns: usize,
    pub outputs: usize,
    /// `unknowns x unknowns`, row-major.
    pub gram: Vec<f64>,
    /// `unknowns x outputs`, row-major.
    pub cross: Vec<f64>,
}

/// The normal equations of the convolution `g` (one group) from its input `x` (`[N, C, H, W]`)
/// to `target` (`[N, O, OH, OW]`).
pub fn conv_normal_equations(x: &[f32], target: &[f32], g: &ConvGeometry) -> NormalEquations {
    assert_eq!(g.p.groups, 1, "refitting grouped convolutions is not supported");
    let (k, o, l) = (g.k(), g.o, g.oh * g.ow);
    let (x_len, t_len) = (g.c * g.h * g.w, o * l);
    assert_eq!(x.len(), g.n * x_len, "conv input does not hold {} images", g.n);
    assert_eq!(target.len(), g.n * t_len, "conv target does not hold {} images", g.n);
    let chunk = |images: std::ops::Range<usize>| {
        let (mut gram, mut cross) = (vec![0f32; k * k], vec![0f32; k * o]);
        let (mut col_sum, mut t_sum) = (vec![0f64; k], vec![0f64; o]);
        let mut col = vec![0f32; k * l];
        for i in images {
            im2col(&x[i * x_len..(i + 1) * x_len], g, &mut col);
            let t = &target[i * t_len..(i + 1) * t_len];
            let col_m = MatRef::new(&col, k, l);
            matmul(&mut gram, col_m, col_m.t(), true, Parallelism::None);
            matmul(&mut cross, col_m, MatRef::new(t, o, l).t(), true, Parallelism::None);
            for (s, row) in col_sum.iter_mut().zip(col.chunks_exact(l)) {
                *s += row.iter().map(|&v| v as f64).sum::<f64>();
            }
            for (s, row) in t_sum.iter_mut().zip(t.chunks_exact(l)) {
                *s += row.iter().map(|&v| v as f64).sum::<f64>();
            }
        }
        (gram, cross, col_sum, t_sum)
    };
    let starts: Vec<usize> = (0..g.n).step_by(IMAGES_PER_CHUNK).collect();
    let parts: Vec<_> =
        starts.par_iter().map(|&s| chunk(s..(s + IMAGES_PER_CHUNK).min(g.n))).collect();
    let n = k + 1;
    let (mut gram, mut cross) = (vec![0f64; n * n], vec![0f64; n * o]);
    for (pg, pc, cs, ts) in parts {
        for i in 0..k {
            for j in 0..k {
                gram[i * n + j] += pg[i * k + j] as f64;
            }
            gram[i * n + k] += cs[i];
            gram[k * n + i] += cs[i];
            for c in 0..o {
                cross[i * o + c] += pc[i * o + c] as f64;
            }
        }
        for c in 0..o {
            cross[k * o + c] += ts[c];
        }
    }
    gram[k * n + k] = (g.n * l) as f64;
    NormalEquations { unknowns: n, outputs: o, gram, cross }
}

/// The solution of `(G + lambda I) W = R + lambda W0` with `lambda = ridge * trace(G) / n`:
/// least squares pulled towards the current weights `w0` (`unknowns x outputs`, row-major), so
/// directions the calibration data does not excite keep their trained values. `None` when the
/// system is not positive definite (a degenerate input).
pub fn ridge_solve(eq: &NormalEquations, w0: &[f64], ridge: f64) -> Option<Vec<f64>> {
    let (n, o) = (eq.unknowns, eq.outputs);
    assert_eq!(w0.len(), n * o, "initial weights are not {n}x{o}");
    let lambda = ridge * (0..n).map(|i| eq.gram[i * n + i]).sum::<f64>() / n as f64;
    let mut a = eq.gram.clone();
    for i in 0..n {
        a[i * n + i] += lambda;
    }
    let mut b: Vec<f64> = eq.cross.iter().zip(w0).map(|(r, w)| r + lambda * w).collect();
    cholesky_solve(&mut a, n, &mut b, o).ok()?;
    b.iter().all(|v| v.is_finite()).then_some(b)
}

/// Solve `A X = B` in place for symmetric positive definite `A` (`n x n`) and `B` (`n x m`,
/// overwritten by `X`); `A` is overwritten by its Cholesky factor.
fn cholesky_solve(a: &mut [f64], n: usize, b: &mut [f64], m: usize) -> Result<()> {
    for j in 0..n {
        let d = a[j * n + j] - (0..j).map(|k| a[j * n + k] * a[j * n + k]).sum::<f64>();
        if d <= 0.0 || !d.is_finite() {
            bail!("matrix is not positive definite at pivot {j}");
        }
        let d = d.sqrt();
        a[j * n + j] = d;
        for i in j + 1..n {
            let s = a[i * n + j] - (0..j).map(|k| a[i * n + k] * a[j * n + k]).sum::<f64>();
            a[i * n + j] = s / d;
        }
    }
    for c in 0..m {
        // L y = b, then L^T x = y.
        for i in 0..n {
            let s = b[i * m + c] - (0..i).map(|k| a[i * n + k] * b[k * m + c]).sum::<f64>();
            b[i * m + c] = s / a[i * n + i];
        }
        for i in (0..n).rev() {
            let s = b[i * m + c] - (i + 1..n).map(|k| a[k * n + i] * b[k * m + c]).sum::<f64>();
            b[i * m + c] = s / a[i * n + i];
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::conv::{forward, tests::rand_vec, Conv2dParams};

    #[test]
    fn cholesky_solves_a_known_system() {
        // A = [[4, 2], [2, 3]], X = [[1, -1], [2, 0.5]] -> B = A X.
        let mut a = vec![4.0, 2.0, 2.0, 3.0];
        let mut b = vec![8.0, -3.0, 8.0, -0.5];
        cholesky_solve(&mut a, 2, &mut b, 2).unwrap();
        for (x, e) in b.iter().zip([1.0, -1.0, 2.0, 0.5]) {
            assert!((x - e).abs() < 1e-12, "{b:?}");
        }
        assert!(cholesky_solve(&mut [0.0], 1, &mut [1.0], 1).is_err());
    }

    /// Targets made by a known convolution are recovered exactly (no ridge), from a different
    /// starting point, over padding and stride.
    #[test]
    fn refit_recovers_the_convolution_that_made_the_targets() {
        let p = Conv2dParams { stride: (2, 1), pads: [1, 1, 0, 1], ..Default::default() };
        let g = ConvGeometry::new(&[6, 3, 7, 6], &[4, 3, 3, 2], p).unwrap();
        let x = rand_vec(6 * 3 * 7 * 6, 1);
        let w = rand_vec(4 * 3 * 3 * 2, 2);
        let bias = rand_vec(4, 3);
        let target = forward(&x, &w, Some(&bias), &g);
        let eq = conv_normal_equations(&x, &target, &g);
        assert_eq!((eq.unknowns, eq.outputs), (19, 4));
        let w0 = vec![0.0; 19 * 4];
        let fit = ridge_solve(&eq, &w0, 0.0).unwrap();
        for o in 0..4 {
            for k in 0..18 {
                assert!((fit[k * 4 + o] - w[o * 18 + k] as f64).abs() < 1e-3, "w[{o}][{k}]");
            }
            assert!((fit[18 * 4 + o] - bias[o] as f64).abs() < 1e-3, "bias {o}");
        }
        // A large ridge keeps the starting weights.
        let kept = ridge_solve(&eq, &vec![0.5; 19 * 4], 1e9).unwrap();
        assert!(kept.iter().all(|v| (v - 0.5).abs() < 1e-3), "{kept:?}");
    }
}

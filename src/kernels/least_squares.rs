//! Ridge least squares for refitting a convolution (or a Gemm, as a 1x1 convolution) to target
//! outputs: the normal equations accumulated image by image over the im2col matrix, then a
//! Cholesky solve in f64.
//!
//! Written here rather than taken from a linear-algebra crate: the one solve needed is a
//! symmetric positive definite system of at most a few thousand unknowns (a 40-line Cholesky,
//! tested below), and a clean CI build already takes most of its time budget.

use super::conv::{gather, im2col_rows, matmul, matmul_sub, ConvGeometry, MatRef};
use anyhow::{bail, Result};
use gemm::Parallelism;
use rayon::prelude::*;

/// Output positions whose products are summed in f32, by one gemm, before they are added to the
/// f64 totals: whole images of one geometry side by side up to about this many columns (1,024
/// at 28x28 outputs is 1-2 images, 6,272 terms per entry at most with 8, far inside f32's
/// precision). One wide gemm per chunk instead of one per image: the `K x K` Gram accumulator
/// is read and written once per chunk, not once per image (a 1,152-unknown refit spent more
/// time streaming it than multiplying). A function of the shapes only, and the chunks are
/// summed in index order, so the result does not depend on scheduling.
const COLUMNS_PER_CHUNK: usize = 1024;

/// `G = [X 1]^T [X 1]` and `R = [X 1]^T T` over every output position of every image, where a
/// row of `X` is one position's im2col column and `T` the target there: the unknowns are each
/// output channel's `K` weights and its bias.
#[derive(Clone)]
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
/// to `target` (`[N, O, OH, OW]`), or to `relu(target)` when `rectify` (read chunk by chunk,
/// so the rectified target is never a whole copy: 100 MB a layer at width 64).
pub fn conv_normal_equations(
    x: &[f32],
    target: &[f32],
    g: &ConvGeometry,
    rectify: bool,
) -> NormalEquations {
    assert_eq!(g.p.groups, 1, "refitting grouped convolutions is not supported");
    let (k, o, l) = (g.k(), g.o, g.oh * g.ow);
    let (x_len, t_len) = (g.c * g.h * g.w, o * l);
    assert_eq!(x.len(), g.n * x_len, "conv input does not hold {} images", g.n);
    assert_eq!(target.len(), g.n * t_len, "conv target does not hold {} images", g.n);
    let n = k + 1;
    let per_chunk = COLUMNS_PER_CHUNK.div_ceil(l.max(1)).clamp(1, g.n.max(1));
    let starts: Vec<usize> = (0..g.n).step_by(per_chunk).collect();
    let par = if starts.len() > 1 { Parallelism::None } else { Parallelism::Rayon(0) };
    // `[X 1]^T` and `T^T` of a chunk's images, side by side: the row of ones gives the bias
    // column's sums and the count within the same gemms.
    let chunk = |first: usize| {
        let images = per_chunk.min(g.n - first);
        let ld = images * l;
        let mut col = vec![0f32; n * ld];
        let mut t = vec![0f32; o * ld];
        for b in 0..images {
            let i = first + b;
            im2col_rows(&x[i * x_len..(i + 1) * x_len], g, &mut col[b * l..], ld);
        }
        col[k * ld..].fill(1.0);
        gather(&target[first * t_len..], t_len, 0, o, l, &mut t);
        if rectify {
            t.iter_mut().for_each(|v| *v = v.max(0.0)); // as candle's relu
        }
        let (mut gram, mut cross) = (vec![0f32; n * n], vec![0f32; n * o]);
        lower_gram(&col, n, ld, &mut gram, par);
        matmul(&mut cross, MatRef::new(&col, n, ld), MatRef::new(&t, o, ld).t(), false, par);
        (gram, cross)
    };
    // One wave of chunks per thread at a time, added in index order: the chunks' partial
    // products (`n x n` each, 85 MB at 4,609 unknowns) are held a wave at a time, not all at once.
    let (mut gram, mut cross) = (vec![0f64; n * n], vec![0f64; n * o]);
    for wave in starts.chunks(rayon::current_num_threads().max(1)) {
        let parts: Vec<_> = wave.par_iter().map(|&s| chunk(s)).collect();
        for (pg, pc) in parts {
            for (acc, v) in gram.iter_mut().zip(&pg) {
                *acc += *v as f64;
            }
            for (acc, v) in cross.iter_mut().zip(&pc) {
                *acc += *v as f64;
            }
        }
    }
    gram[k * n + k] = (g.n * l) as f64;
    for i in 0..n {
        for j in i + 1..n {
            gram[i * n + j] = gram[j * n + i];
        }
    }
    NormalEquations { unknowns: n, outputs: o, gram, cross }
}

/// Rows of the Gram matrix computed per gemm: only blocks on or below the diagonal are
/// computed (15 of 25 for a 1,153-unknown refit), the Gram matrix being symmetric.
const GRAM_BLOCK: usize = 256;

/// The blocks of `X X^T` (`X` is `n x ld`, row-major) on and below the diagonal into `gram`
/// (`n x n`, row-major); the blocks above it are left as they are.
fn lower_gram(x: &[f32], n: usize, ld: usize, gram: &mut [f32], par: Parallelism) {
    let mut block = vec![0f32; GRAM_BLOCK.min(n) * GRAM_BLOCK.min(n)];
    for r0 in (0..n).step_by(GRAM_BLOCK) {
        let rows = GRAM_BLOCK.min(n - r0);
        let xi = MatRef::new(&x[r0 * ld..(r0 + rows) * ld], rows, ld);
        for c0 in (0..=r0).step_by(GRAM_BLOCK) {
            let cols = GRAM_BLOCK.min(n - c0);
            let xj = MatRef::new(&x[c0 * ld..(c0 + cols) * ld], cols, ld);
            let out = &mut block[..rows * cols];
            matmul(out, xi, xj.t(), false, par);
            for (i, src) in out.chunks_exact(cols).enumerate() {
                gram[(r0 + i) * n + c0..][..cols].copy_from_slice(src);
            }
        }
    }
}

/// The solution of `(G + lambda I) W = R + lambda W0` (`eq` is consumed) with `lambda = ridge * trace(G) / n`:
/// least squares pulled towards the current weights `w0` (`unknowns x outputs`, row-major), so
/// directions the calibration data does not excite keep their trained values. `None` when the
/// system is not positive definite (a degenerate input).
pub fn ridge_solve(eq: NormalEquations, w0: &[f64], ridge: f64) -> Option<Vec<f64>> {
    let (n, o) = (eq.unknowns, eq.outputs);
    assert_eq!(w0.len(), n * o, "initial weights are not {n}x{o}");
    let lambda = ridge * (0..n).map(|i| eq.gram[i * n + i]).sum::<f64>() / n as f64;
    // Factored in place: the Gram matrix is 170 MB at 4,609 unknowns.
    let mut a = eq.gram;
    for i in 0..n {
        a[i * n + i] += lambda;
    }
    let mut b: Vec<f64> = eq.cross.iter().zip(w0).map(|(r, w)| r + lambda * w).collect();
    cholesky_solve(&mut a, n, &mut b, o).ok()?;
    b.iter().all(|v| v.is_finite()).then_some(b)
}

/// Dot product in a fixed order (four interleaved lanes, then the lanes pairwise), which the
/// compiler keeps in vector registers.
#[inline(always)]
fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut lanes = [0f64; 4];
    let (ca, cb) = (a.chunks_exact(4), b[..a.len()].chunks_exact(4));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..4 {
            lanes[l] += x[l] * y[l];
        }
    }
    let tail: f64 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    (lanes[0] + lanes[2]) + (lanes[1] + lanes[3]) + tail
}

/// `dst -= s * src`, element-wise.
#[inline(always)]
fn sub_scaled(dst: &mut [f64], s: f64, src: &[f64]) {
    for (d, v) in dst.iter_mut().zip(src) {
        *d -= s * v;
    }
}

/// Columns per block of the blocked Cholesky factorisation and triangular solves. Inside a
/// block the work is dot products; everything outside it is f64 gemm, which streams the
/// matrix once per block instead of once per column. (The unblocked column-by-column
/// factorisation read the whole lower triangle from memory for every column: 4,609 unknowns,
/// the refit of a 512-channel 3x3 convolution, took seconds per layer.)
const CHOLESKY_BLOCK: usize = 128;

/// Rows of the trailing update given to one gemm: only blocks on or below the diagonal are
/// computed, the factor being lower triangular.
const CHOLESKY_UPDATE_ROWS: usize = 256;

/// Solve `A X = B` in place for symmetric positive definite `A` (`n x n`) and `B` (`n x m`,
/// overwritten by `X`); `A`'s lower triangle is overwritten by its Cholesky factor `L`, its
/// upper triangle by scratch. Blocked (right-looking factorisation, block forward and back
/// substitution), every entry computed by the same operations whatever the thread count.
fn cholesky_solve(a: &mut [f64], n: usize, b: &mut [f64], m: usize) -> Result<()> {
    assert!(a.len() == n * n && b.len() == n * m);
    cholesky_factor(a, n)?;
    // L Y = B, a block of rows at a time: B_k -= L_k,<k Y_<k (gemm), then within the block.
    for k0 in (0..n).step_by(CHOLESKY_BLOCK) {
        let k1 = (k0 + CHOLESKY_BLOCK).min(n);
        let (done, rest) = b.split_at_mut(k0 * m);
        let block = &mut rest[..(k1 - k0) * m];
        if k0 > 0 {
            let l = MatRef { data: &a[k0 * n..], rows: k1 - k0, cols: k0, rs: n, cs: 1 };
            matmul_sub(block, m, l, MatRef::new(done, k0, m), Parallelism::Rayon(0));
        }
        for i in k0..k1 {
            let (before, row) = block.split_at_mut((i - k0) * m);
            let bi = &mut row[..m];
            for (kk, yk) in before.chunks_exact(m).enumerate() {
                sub_scaled(bi, a[i * n + k0 + kk], yk);
            }
            let d = a[i * n + i];
            bi.iter_mut().for_each(|v| *v /= d);
        }
    }
    // L^T X = Y, from the last block: Y_k -= (L_>k,k)^T X_>k (gemm), then within the block.
    let last = n.div_ceil(CHOLESKY_BLOCK.max(1));
    for blk in (0..last).rev() {
        let (k0, k1) = (blk * CHOLESKY_BLOCK, ((blk + 1) * CHOLESKY_BLOCK).min(n));
        let (head, done) = b.split_at_mut(k1 * m);
        let block = &mut head[k0 * m..];
        if k1 < n {
            let lt = MatRef { data: &a[k1 * n + k0..], rows: k1 - k0, cols: n - k1, rs: 1, cs: n };
            matmul_sub(block, m, lt, MatRef::new(done, n - k1, m), Parallelism::Rayon(0));
        }
        for i in (k0..k1).rev() {
            let (row, after) = block.split_at_mut((i + 1 - k0) * m);
            let bi = &mut row[(i - k0) * m..];
            for (kk, xk) in after.chunks_exact(m).enumerate() {
                sub_scaled(bi, a[(i + 1 + kk) * n + i], xk);
            }
            let d = a[i * n + i];
            bi.iter_mut().for_each(|v| *v /= d);
        }
    }
    Ok(())
}

/// `A = L L^T` in place (lower triangle), a block of [`CHOLESKY_BLOCK`] columns at a time:
/// factor the diagonal block, solve the rows below it against that block (rows in
/// parallel), then subtract the block column's outer product from the rest (gemm).
fn cholesky_factor(a: &mut [f64], n: usize) -> Result<()> {
    let mut panel = vec![];
    for k0 in (0..n).step_by(CHOLESKY_BLOCK) {
        let k1 = (k0 + CHOLESKY_BLOCK).min(n);
        let (head, below) = a.split_at_mut(k1 * n);
        // The diagonal block, column by column (the columns before k0 are already subtracted).
        for j in k0..k1 {
            let (row_j, rest) = head[j * n..].split_at_mut(n);
            let d = row_j[j] - dot(&row_j[k0..j], &row_j[k0..j]);
            if d <= 0.0 || !d.is_finite() {
                bail!("matrix is not positive definite at pivot {j}");
            }
            row_j[j] = d.sqrt();
            for row in rest.chunks_mut(n).take(k1 - j - 1) {
                row[j] = (row[j] - dot(&row[k0..j], &row_j[k0..j])) / row_j[j];
            }
        }
        if k1 == n {
            break;
        }
        // The rows below against the diagonal block: each row on its own.
        let diag = &head[k0 * n..];
        below.par_chunks_mut(n).for_each(|row| {
            for j in k0..k1 {
                let lj = &diag[(j - k0) * n..];
                row[j] = (row[j] - dot(&row[k0..j], &lj[k0..j])) / lj[j];
            }
        });
        // Trailing update A22 -= L21 L21^T on and below the diagonal, from a copy of L21.
        let (rows, width) = (n - k1, k1 - k0);
        panel.clear();
        for row in below.chunks(n) {
            panel.extend_from_slice(&row[k0..k1]);
        }
        for r0 in (0..rows).step_by(CHOLESKY_UPDATE_ROWS) {
            let r1 = (r0 + CHOLESKY_UPDATE_ROWS).min(rows);
            let lhs =
                MatRef { data: &panel[r0 * width..], rows: r1 - r0, cols: width, rs: width, cs: 1 };
            let rhs = MatRef { data: &panel[..], rows: r1, cols: width, rs: width, cs: 1 }.t();
            let dst = &mut below[r0 * n + k1..];
            matmul_sub(dst, n, lhs, rhs, Parallelism::Rayon(0));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::conv::{forward, im2col, tests::rand_vec, Conv2dParams};

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

    /// `R R^T + n I` for a pseudo-random `n x n` matrix `R`: symmetric positive definite.
    fn random_spd(n: usize, seed: u64) -> Vec<f64> {
        let r: Vec<f64> = rand_vec(n * n, seed).iter().map(|&v| v as f64).collect();
        let mut a = vec![0f64; n * n];
        for i in 0..n {
            for j in 0..n {
                a[i * n + j] =
                    dot(&r[i * n..][..n], &r[j * n..][..n]) + if i == j { n as f64 } else { 0.0 };
            }
        }
        a
    }

    /// The blocked factorisation and solves against the textbook unblocked ones, over several
    /// blocks and a ragged last one; the same bits on 1 and 3 threads.
    #[test]
    fn blocked_cholesky_matches_the_unblocked_one() {
        let (n, m) = (2 * CHOLESKY_BLOCK + 37, 5);
        let a = random_spd(n, 15);
        let b: Vec<f64> = rand_vec(n * m, 16).iter().map(|&v| v as f64).collect();
        // Unblocked: L column by column, then L Y = B and L^T X = Y row by row.
        let mut l = a.clone();
        for j in 0..n {
            let d =
                (l[j * n + j] - (0..j).map(|k| l[j * n + k] * l[j * n + k]).sum::<f64>()).sqrt();
            l[j * n + j] = d;
            for i in j + 1..n {
                let s: f64 = (0..j).map(|k| l[i * n + k] * l[j * n + k]).sum();
                l[i * n + j] = (l[i * n + j] - s) / d;
            }
        }
        let mut x = b.clone();
        for i in 0..n {
            for c in 0..m {
                let s: f64 = (0..i).map(|k| l[i * n + k] * x[k * m + c]).sum();
                x[i * m + c] = (x[i * m + c] - s) / l[i * n + i];
            }
        }
        for i in (0..n).rev() {
            for c in 0..m {
                let s: f64 = (i + 1..n).map(|k| l[k * n + i] * x[k * m + c]).sum();
                x[i * m + c] = (x[i * m + c] - s) / l[i * n + i];
            }
        }
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let (mut fa, mut fb) = (a.clone(), b.clone());
            pool.install(|| cholesky_solve(&mut fa, n, &mut fb, m)).unwrap();
            (fa, fb)
        };
        let (fa, fb) = run(1);
        for i in 0..n {
            for j in 0..=i {
                let (got, want) = (fa[i * n + j], l[i * n + j]);
                assert!(
                    (got - want).abs() <= 1e-10 * want.abs().max(1.0),
                    "L({i},{j}) {got} {want}"
                );
            }
        }
        for (got, want) in fb.iter().zip(&x) {
            assert!((got - want).abs() <= 1e-10 * want.abs().max(1.0), "{got} vs {want}");
        }
        assert!(run(3) == (fa, fb), "the thread count changed the bits");
    }

    /// A system large enough for the parallel row updates is solved to the precision of f64.
    #[test]
    fn cholesky_solves_a_large_random_system() {
        let (n, m) = (300, 7);
        let mut a = random_spd(n, 5);
        let x: Vec<f64> = rand_vec(n * m, 6).iter().map(|&v| v as f64).collect();
        let mut b = vec![0f64; n * m];
        for i in 0..n {
            for c in 0..m {
                b[i * m + c] = (0..n).map(|k| a[i * n + k] * x[k * m + c]).sum();
            }
        }
        cholesky_solve(&mut a, n, &mut b, m).unwrap();
        for (got, want) in b.iter().zip(&x) {
            assert!((got - want).abs() < 1e-9, "{got} vs {want}");
        }
    }

    /// The chunked Gram and cross products equal sums over every position of every image.
    #[test]
    fn normal_equations_match_a_naive_sum_over_chunks() {
        let p = Conv2dParams { pads: [1, 1, 1, 1], ..Default::default() };
        let g = ConvGeometry::new(&[150, 2, 4, 4], &[3, 2, 3, 3], p).unwrap();
        let (k, l) = (g.k(), 16);
        assert!(150 * l > 2 * COLUMNS_PER_CHUNK, "several chunks");
        let x = rand_vec(150 * 2 * 16, 8);
        let t = rand_vec(150 * 3 * 16, 9);
        let eq = conv_normal_equations(&x, &t, &g, false);
        let n = k + 1;
        let (mut gram, mut cross) = (vec![0f64; n * n], vec![0f64; n * 3]);
        let mut col = vec![0f32; k * l];
        for i in 0..150 {
            im2col(&x[i * 32..][..32], &g, &mut col);
            for p in 0..l {
                let row: Vec<f64> =
                    (0..n).map(|r| if r == k { 1.0 } else { col[r * l + p] as f64 }).collect();
                for r in 0..n {
                    for c in 0..n {
                        gram[r * n + c] += row[r] * row[c];
                    }
                    for o in 0..3 {
                        cross[r * 3 + o] += row[r] * t[i * 48 + o * l + p] as f64;
                    }
                }
            }
        }
        for (got, want) in eq.gram.iter().zip(&gram).chain(eq.cross.iter().zip(&cross)) {
            assert!((got - want).abs() <= 1e-4 * want.abs().max(1.0), "{got} vs {want}");
        }
    }

    /// Blocks on and below the diagonal match a full product, over several blocks.
    #[test]
    fn lower_gram_matches_the_full_product_below_the_diagonal() {
        let (n, ld) = (GRAM_BLOCK * 2 + 37, 11);
        let x = rand_vec(n * ld, 4);
        let mut full = vec![0f32; n * n];
        matmul(
            &mut full,
            MatRef::new(&x, n, ld),
            MatRef::new(&x, n, ld).t(),
            false,
            Parallelism::None,
        );
        let mut lower = vec![f32::NAN; n * n];
        lower_gram(&x, n, ld, &mut lower, Parallelism::None);
        for i in 0..n {
            for j in 0..=i {
                assert_eq!(lower[i * n + j], full[i * n + j], "({i}, {j})");
            }
        }
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
        let eq = conv_normal_equations(&x, &target, &g, false);
        assert_eq!((eq.unknowns, eq.outputs), (19, 4));
        let w0 = vec![0.0; 19 * 4];
        let fit = ridge_solve(eq.clone(), &w0, 0.0).unwrap();
        for o in 0..4 {
            for k in 0..18 {
                assert!((fit[k * 4 + o] - w[o * 18 + k] as f64).abs() < 1e-3, "w[{o}][{k}]");
            }
            assert!((fit[18 * 4 + o] - bias[o] as f64).abs() < 1e-3, "bias {o}");
        }
        // A large ridge keeps the starting weights.
        let kept = ridge_solve(eq, &vec![0.5; 19 * 4], 1e9).unwrap();
        assert!(kept.iter().all(|v| (v - 0.5).abs() < 1e-3), "{kept:?}");
    }
}

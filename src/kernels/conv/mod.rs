//! 2-D convolution for training and inference on the CPU: the forward (bias fused), the input
//! gradient and the weight and bias gradients, exposed to candle as a custom op so that
//! autodiff calls it instead of candle's scalar `conv2d` / `conv_transpose2d`. 3x3 stride-1
//! convolutions of 16 or more input channels (32 on AVX2) run Winograd F(2x2, 3x3)
//! ([`winograd`]) for the forward and both gradients; the other forwards and stride-1 input
//! gradients run the direct AVX-512 kernel ([`direct`]) on planes 7 or more wide; the rest,
//! and the other weight gradients, run im2col / gemm / col2im. (A direct weight gradient, 3
//! output channels x 9 taps of vector accumulators, was built and measured 8% slower on the
//! training benchmark than im2col + gemm: not kept.)
//!
//! Layouts are candle's and ONNX's: input `[N, C, H, W]`, weight `[O, C/groups, KH, KW]`,
//! output `[N, O, OH, OW]`, all contiguous row-major.
//!
//! Threads: the forward and the input gradient work image by image, so any split of the batch
//! gives the same bits. The weight and bias gradients are sums over the batch; they are summed
//! in a fixed order that depends only on the shapes (the batch is cut into a fixed number of
//! chunks, each chunk's partial sum is taken image by image, the partials are added in chunk
//! order), so identical runs give identical bytes on any number of threads.

mod backward;
mod direct;
mod forward;
mod geometry;
mod im2col;
mod matrix;
mod op;
mod scratch;
#[cfg(target_arch = "x86_64")]
mod winograd;
#[cfg(target_arch = "x86_64")]
mod winograd_gemm;

pub use backward::*;
pub use forward::*;
pub use geometry::*;
pub use im2col::*;
pub use matrix::*;
pub use op::*;
pub(crate) use scratch::*;

use super::elementwise::relu_in_place;
use ::gemm::Parallelism;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Storage, Tensor};
use direct::DirectConv;
use rayon::prelude::*;
use std::cell::RefCell;

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A deterministic pseudo-random vector in [-1, 1) (also used by `pool`'s tests).
    pub(crate) fn rand_vec(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    fn naive_matmul(a: MatRef, b: MatRef) -> Vec<f64> {
        let mut out = vec![0f64; a.rows * b.cols];
        for i in 0..a.rows {
            for j in 0..b.cols {
                for l in 0..a.cols {
                    out[i * b.cols + j] +=
                        a.data[i * a.rs + l * a.cs] as f64 * b.data[l * b.rs + j * b.cs] as f64;
                }
            }
        }
        out
    }

    #[test]
    fn matmul_matches_a_naive_product_for_every_layout() {
        for &(m, k, n) in &[(1, 1, 1), (3, 5, 7), (17, 33, 9), (64, 27, 100), (5, 0, 4), (0, 3, 2)]
        {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let a_data = rand_vec(m * k, 1);
                let b_data = rand_vec(k * n, 2);
                let a =
                    if ta { MatRef::new(&a_data, k, m).t() } else { MatRef::new(&a_data, m, k) };
                let b =
                    if tb { MatRef::new(&b_data, n, k).t() } else { MatRef::new(&b_data, k, n) };
                let want = naive_matmul(a, b);
                let start = rand_vec(m * n, 3);
                for accumulate in [false, true] {
                    let mut outs = vec![];
                    for par in [Parallelism::None, Parallelism::Rayon(0), Parallelism::Rayon(3)] {
                        let mut dst = start.clone();
                        matmul(&mut dst, a, b, accumulate, par);
                        for (i, (&d, &w)) in dst.iter().zip(&want).enumerate() {
                            let w = w + if accumulate { start[i] as f64 } else { 0.0 };
                            assert!((d as f64 - w).abs() < 1e-4 * (1.0 + w.abs()), "{m}x{k}x{n}");
                        }
                        outs.push(dst);
                    }
                    // gemm's own threads split the output, never the sums: same bits.
                    assert!(
                        outs.windows(2).all(|p| p[0] == p[1]),
                        "{m}x{k}x{n} differs by threads"
                    );
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "strides run past")]
    fn matmul_rejects_views_past_their_data() {
        let data = vec![0f32; 6];
        let a = MatRef { data: &data, rows: 2, cols: 3, rs: 4, cs: 1 };
        let b_data = vec![0f32; 3];
        matmul(&mut [0.0; 2], a, MatRef::new(&b_data, 3, 1), false, Parallelism::None);
    }

    #[test]
    fn copy_row_and_add_row_match_element_loops() {
        for n in 0..80 {
            let src = rand_vec(n + 9, n as u64);
            let mut dst = vec![f32::NAN; n + 5];
            copy_row(&mut dst[..n], &src);
            assert_eq!(&dst[..n], &src[..n], "copy of {n}");
            assert!(dst[n..].iter().all(|v| v.is_nan()), "copy of {n} wrote past the row");
            let start = rand_vec(n + 5, 100 + n as u64);
            let mut acc = start.clone();
            add_row(&mut acc[..n], &src);
            for i in 0..n + 5 {
                let want = if i < n { start[i] + src[i] } else { start[i] };
                assert_eq!(acc[i], want, "add of {n} at {i}");
            }
        }
    }

    fn geometries() -> Vec<ConvGeometry> {
        let mut out = vec![];
        for stride in [(1, 1), (2, 2), (2, 1)] {
            for pads in [[0; 4], [1; 4], [2, 0, 1, 3]] {
                for (kh, kw) in [(1, 1), (3, 3), (2, 3)] {
                    for dilation in [(1, 1), (2, 2), (1, 2)] {
                        for groups in [1, 2] {
                            let p = Conv2dParams { stride, dilation, pads, groups };
                            if let Ok(g) =
                                ConvGeometry::new(&[2, 4, 7, 6], &[6, 4 / groups, kh, kw], p)
                            {
                                out.push(g);
                            }
                        }
                    }
                }
            }
        }
        out
    }

    fn naive_im2col(x: &[f32], g: &ConvGeometry) -> Vec<f32> {
        let mut col = vec![0f32; g.k() * g.oh * g.ow];
        for c in 0..g.cg() {
            for ki in 0..g.kh {
                for kj in 0..g.kw {
                    let row = (c * g.kh + ki) * g.kw + kj;
                    for oy in 0..g.oh {
                        for ox in 0..g.ow {
                            let iy = (oy * g.p.stride.0 + ki * g.p.dilation.0) as isize
                                - g.p.pads[0] as isize;
                            let ix = (ox * g.p.stride.1 + kj * g.p.dilation.1) as isize
                                - g.p.pads[1] as isize;
                            if (0..g.h as isize).contains(&iy) && (0..g.w as isize).contains(&ix) {
                                col[(row * g.oh + oy) * g.ow + ox] =
                                    x[(c * g.h + iy as usize) * g.w + ix as usize];
                            }
                        }
                    }
                }
            }
        }
        col
    }

    #[test]
    fn im2col_matches_a_naive_unrolling_and_col2im_is_its_adjoint() {
        for g in geometries() {
            let x = rand_vec(g.cg() * g.h * g.w, 5);
            let mut col = vec![f32::NAN; g.k() * g.oh * g.ow];
            im2col(&x, &g, &mut col);
            assert_eq!(col, naive_im2col(&x, &g), "{g:?}");
            // <im2col(x), c> == <x, col2im(c)>, for c and each unit x.
            let c = rand_vec(col.len(), 6);
            let mut back = vec![0.5f32; x.len()];
            col2im(&c, &g, &mut back);
            for i in 0..x.len() {
                let mut unit = vec![0f32; x.len()];
                unit[i] = 1.0;
                let u = naive_im2col(&unit, &g);
                let want: f64 = u.iter().zip(&c).map(|(a, b)| *a as f64 * *b as f64).sum();
                assert!((back[i] as f64 - 0.5 - want).abs() < 1e-5, "{g:?} at {i}");
            }
        }
    }

    #[test]
    fn avx2_builds_match_the_portable_bodies() {
        for g in geometries() {
            let pd = Padded::of(&g);
            let x = rand_vec(g.cg() * g.h * g.w, 7);
            let (mut a, mut b) = (vec![0f32; pd.len(&g)], vec![0f32; pd.len(&g)]);
            pad_planes(&x, &g, &mut a);
            pad_planes_body(&x, &g, &mut b);
            assert_eq!(a, b, "{g:?}");
            let (mut ca, mut cb) =
                (vec![0f32; g.k() * g.oh * g.ow], vec![1f32; g.k() * g.oh * g.ow]);
            im2col_padded(&a, &g, &mut ca, g.oh * g.ow);
            im2col_padded_body(&a, &g, &mut cb, g.oh * g.ow);
            assert_eq!(ca, cb, "{g:?}");
            col2im_padded(&ca, &g, &mut a, g.oh * g.ow);
            col2im_padded_body(&ca, &g, &mut b, g.oh * g.ow);
            assert_eq!(a, b, "{g:?}");
        }
    }

    #[test]
    fn sum_matches_a_naive_sum() {
        for len in [0, 1, 7, 8, 9, 100, 1023] {
            let v = rand_vec(len, 9);
            let want: f64 = v.iter().map(|&x| x as f64).sum();
            assert!((sum(&v) as f64 - want).abs() < 1e-4, "{len}");
        }
    }
}

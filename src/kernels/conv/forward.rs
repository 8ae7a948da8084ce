//! The forward: a plan per layer (Winograd, direct or im2col + gemm), bias and ReLU fused.

use super::*;

/// `out = a @ b` for the `nb` images side by side in `b`'s columns, written to the images in
/// `dst` (image `i`'s rows at `dst[i * stride + off..]`), through `tmp` when `nb > 1`. With
/// `bias`, each output row starts from its bias.
#[allow(clippy::too_many_arguments)]
pub(super) fn matmul_into_images(
    a: MatRef,
    b: MatRef,
    nb: usize,
    bias: Option<&[f32]>,
    dst: &mut [f32],
    stride: usize,
    off: usize,
    tmp: &mut [f32],
    par: Parallelism,
) {
    let (rows, len) = (a.rows, b.cols / nb.max(1));
    let out = if nb == 1 { &mut dst[off..off + rows * len] } else { &mut tmp[..rows * nb * len] };
    if let Some(bias) = bias {
        for (row, &v) in out.chunks_exact_mut(nb * len).zip(bias) {
            row.fill(v);
        }
    }
    matmul(out, a, b, bias.is_some(), par);
    if nb > 1 {
        scatter(&tmp[..rows * nb * len], rows, len, dst, stride, off);
    }
}

/// The convolution of `x` (`[N, C, H, W]`) with `w` (`[O, C/groups, KH, KW]`) plus `bias`
/// (`[O]`), as `[N, O, OH, OW]`.
pub fn forward(x: &[f32], w: &[f32], bias: Option<&[f32]>, g: &ConvGeometry) -> Vec<f32> {
    forward_fused(x, w, bias, g, false)
}

/// [`forward`], with a ReLU applied to each output while it is still in cache when `relu`
/// (the inference engine fuses a Conv's sole Relu consumer this way), through the fastest
/// algorithm that takes `g` ([`ConvPlan`]).
pub fn forward_fused(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    g: &ConvGeometry,
    relu: bool,
) -> Vec<f32> {
    forward_planned(&ConvPlan::new(w, bias, g), x, w, bias, g, relu)
}

/// The algorithm a convolution runs, with its weights laid out for it. It depends on the
/// weights and on every size but the batch, so the inference engine builds it once per layer
/// (re-laying the weights on every batch was 14% of the evaluator's time).
pub(crate) enum ConvPlan {
    /// Winograd F(2x2, 3x3): 3x3 stride-1 convolutions of 32 or more input channels.
    #[cfg(target_arch = "x86_64")]
    Winograd(winograd::Winograd),
    /// The direct kernel: other convolutions on planes 7 or more wide.
    Direct(DirectConv),
    /// im2col + gemm: the rest, and CPUs without AVX-512.
    Im2col,
}

impl ConvPlan {
    pub(crate) fn new(w: &[f32], bias: Option<&[f32]>, g: &ConvGeometry) -> Self {
        #[cfg(target_arch = "x86_64")]
        if let Some(wg) = winograd::Winograd::new(w, bias, g) {
            return ConvPlan::Winograd(wg);
        }
        match DirectConv::new(w, bias, g) {
            Some(d) => ConvPlan::Direct(d),
            None => ConvPlan::Im2col,
        }
    }
}

/// The algorithms a convolution can run, named for benchmarks that time them side by side
/// (`benches/conv_paths.rs`, which chose the thresholds in [`ConvPlan::new`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvPath {
    Winograd,
    Direct,
    Im2col,
}

/// [`forward_fused`] through `path` whatever [`ConvPlan::new`] would choose; `None` when
/// `path` cannot compute `g` on this CPU.
pub fn forward_via(
    path: ConvPath,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    g: &ConvGeometry,
    relu: bool,
) -> Option<Vec<f32>> {
    let plan = match path {
        #[cfg(target_arch = "x86_64")]
        ConvPath::Winograd => ConvPlan::Winograd(winograd::Winograd::forced(w, bias, g)?),
        #[cfg(not(target_arch = "x86_64"))]
        ConvPath::Winograd => return None,
        ConvPath::Direct => ConvPlan::Direct(DirectConv::new(w, bias, g)?),
        ConvPath::Im2col => ConvPlan::Im2col,
    };
    Some(forward_planned(&plan, x, w, bias, g, relu))
}

/// [`forward_fused`] with a plan built for `w`, `bias` and `g`'s sizes (any batch).
pub(crate) fn forward_planned(
    plan: &ConvPlan,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    g: &ConvGeometry,
    relu: bool,
) -> Vec<f32> {
    check_forward(x, w, bias, g);
    match plan {
        #[cfg(target_arch = "x86_64")]
        ConvPlan::Winograd(wg) => forward_winograd(x, wg, g, relu),
        ConvPlan::Direct(d) => forward_direct(x, d, g, relu),
        ConvPlan::Im2col => forward_im2col(x, w, bias, g, relu),
    }
}

pub(super) fn check_forward(x: &[f32], w: &[f32], bias: Option<&[f32]>, g: &ConvGeometry) {
    assert_eq!(x.len(), g.n * g.c * g.h * g.w, "conv input length");
    assert_eq!(w.len(), g.o * g.k(), "conv weight length");
    assert!(bias.is_none_or(|b| b.len() == g.o), "conv bias length");
}

/// [`forward_fused`] through Winograd F(2x2, 3x3), a few images per task.
#[cfg(target_arch = "x86_64")]
pub(super) fn forward_winograd(
    x: &[f32],
    wg: &winograd::Winograd,
    g: &ConvGeometry,
    relu: bool,
) -> Vec<f32> {
    let (chw, ohw_all) = (g.c * g.h * g.w, g.o * g.oh * g.ow);
    let mut y = zeroed(g.n * ohw_all);
    if y.is_empty() {
        return y;
    }
    let per_run = wg.images_per_run();
    y.par_chunks_mut(per_run * ohw_all).enumerate().for_each(|(ci, ys)| {
        let xs = &x[ci * per_run * chw..][..ys.len() / ohw_all * chw];
        with_scratch(wg.scratch_len(), |buf| {
            wg.clear(buf);
            wg.run(xs, ys, relu, buf);
        })
    });
    y
}

/// [`forward_fused`] through the direct kernel, image by image.
pub(super) fn forward_direct(x: &[f32], d: &DirectConv, g: &ConvGeometry, relu: bool) -> Vec<f32> {
    let (chw, ohw_all) = (g.c * g.h * g.w, g.o * g.oh * g.ow);
    let mut y = zeroed(g.n * ohw_all);
    if y.is_empty() {
        return y;
    }
    let per_chunk = Split::of(g).per_chunk;
    y.par_chunks_mut(per_chunk * ohw_all).enumerate().for_each(|(ci, ys)| {
        let xs = &x[ci * per_chunk * chw..];
        with_scratch(d.scratch_len(), |buf| {
            d.clear(buf);
            for (b, yb) in ys.chunks_exact_mut(ohw_all).enumerate() {
                d.image(&xs[b * chw..][..chw], yb, relu, buf);
            }
        })
    });
    y
}

/// [`forward_fused`] as im2col + gemm, several small images to a gemm.
pub(super) fn forward_im2col(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    g: &ConvGeometry,
    relu: bool,
) -> Vec<f32> {
    check_forward(x, w, bias, g);
    let (cg, og, k, hw, ohw) = (g.cg(), g.og(), g.k(), g.h * g.w, g.oh * g.ow);
    let (chw, ohw_all) = (g.c * hw, g.o * ohw);
    let mut y = zeroed(g.n * ohw_all);
    if y.is_empty() {
        return y;
    }
    let sp = Split::of(g);
    let par = sp.gemm_par();
    let pg = sp.per_gemm;
    let tmp_len = if pg > 1 { og * pg * ohw } else { 0 };
    y.par_chunks_mut(sp.per_chunk * ohw_all).enumerate().for_each(|(ci, ys)| {
        let xs = &x[ci * sp.per_chunk * chw..];
        with_scratch(Unroll::len(g, pg) + tmp_len, |mut buf| {
            let mut un = Unroll::new(g, pg, &mut buf);
            let tmp = take(&mut buf, tmp_len);
            for (s, nb) in sp.gemms(ys.len() / ohw_all) {
                for grp in 0..g.p.groups {
                    let cols = un.cols(nb, |b| &xs[(s + b) * chw + grp * cg * hw..][..cg * hw]);
                    let wg = MatRef::new(&w[grp * og * k..][..og * k], og, k);
                    let bg = bias.map(|b| &b[grp * og..][..og]);
                    let (cols, ys) = (MatRef::new(cols, k, nb * ohw), &mut ys[s * ohw_all..]);
                    matmul_into_images(wg, cols, nb, bg, ys, ohw_all, grp * og * ohw, tmp, par);
                }
                if relu {
                    relu_in_place(&mut ys[s * ohw_all..(s + nb) * ohw_all]);
                }
            }
        })
    });
    y
}

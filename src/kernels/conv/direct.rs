//! Direct convolution on CPUs with AVX-512: no im2col matrix, no gemm packing.
//!
//! Why: on the shipped ResNet, im2col, the padding and gemm's packing of the 16- and 32-channel
//! layers took over a third of the evaluator's time (perf: im2col 24%, packing 7%, padding 4%),
//! because their gemms (16 or 32 rows) are too thin to hide a copy nine times the input's size.
//!
//! The trick: outputs are computed over the padded input's width. Output position
//! `p = oy * WP + ox` reads the flat padded plane at `p + ki * DH * WP + kj * DW` through tap
//! `(ki, kj)`: one constant offset per tap, so 16 consecutive outputs read 16 consecutive
//! inputs, one unaligned load. The columns `ox >= OW` are computed and dropped (2 of every 30
//! at 28x28). Strided kernels read the input split by stride phase ([`Phases`]), where each
//! tap is again one offset. A micro-tile keeps 8 output channels x 3 vectors of 16 positions
//! in 24 of the 32 vector registers; each (input channel, tap) step loads 3 input vectors and
//! 8 broadcast weights for 24 FMAs, so the FMA units, not the loads, set the pace.
//!
//! Sums run over input channels, then taps, in that fixed order: the same bits on every run.

use super::{copy_row, pad_planes, ConvGeometry, Padded};

/// Output channels per micro-tile (one broadcast weight each).
pub(super) const CHANNELS: usize = 8;
/// Vectors of output positions per micro-tile: 8 x 3 accumulators of the 32 registers.
const VECTORS: usize = 3;
/// Floats per AVX-512 vector.
pub(super) const LANES: usize = 16;
/// Narrowest output the kernel takes. At 4x4 half of every position computed would be
/// dropped (4 of 6 columns, 24 positions rounded up to 32); those layers have channels enough
/// (128) for Winograd or gemm to run well. Taking the 7x7 layers (7 rather than 12) measured
/// 3,507 against 3,383 images/s on the shipped ResNet (scripts/bench_eval.py, one run of 3
/// each).
const MIN_WIDTH: usize = 7;

/// One group's zero-padded input, split by stride phase: channel `c`'s phase `(a, b)` holds
/// the padded pixels `(SH * i + a, SW * j + b)` at `[c][a * SW + b][i][j]`, so that a strided
/// output reads each tap's pixels at one flat offset, as at stride 1 (where the split is the
/// padded plane itself).
#[derive(Clone, Copy, Debug)]
struct Phases {
    stride: (usize, usize),
    pads: (usize, usize),
    /// Rows and columns of one phase.
    hq: usize,
    wq: usize,
}

impl Phases {
    fn of(g: &ConvGeometry) -> Self {
        let pd = Padded::of(g);
        let (sh, sw) = g.p.stride;
        Phases {
            stride: (sh, sw),
            pads: (g.p.pads[0], g.p.pads[1]),
            hq: pd.hp.div_ceil(sh),
            wq: pd.wp.div_ceil(sw),
        }
    }

    /// Floats per channel: every phase.
    fn plane(&self) -> usize {
        self.stride.0 * self.stride.1 * self.hq * self.wq
    }

    /// Flat offset of padded pixel `(r, c)` within its channel.
    fn offset(&self, r: usize, c: usize) -> usize {
        let (sh, sw) = self.stride;
        ((r % sh * sw + c % sw) * self.hq + r / sh) * self.wq + c / sw
    }

    /// Write one group of one image, `[C/groups, H, W]`, into the phases in `dst`; the
    /// padding is left as it is (zero, once the buffer was cleared).
    fn split(&self, x: &[f32], g: &ConvGeometry, dst: &mut [f32]) {
        let plane = self.plane();
        let dst = &mut dst[..g.cg() * plane];
        if self.stride == (1, 1) {
            return pad_planes(x, g, dst);
        }
        let sw = self.stride.1;
        for (ch, src) in x.chunks_exact(g.h * g.w).enumerate() {
            for (y, row) in src.chunks_exact(g.w).enumerate() {
                if sw == 2 && g.w >= 2 {
                    // Both column phases in one pass over pairs of columns, which the compiler
                    // vectorises (one float at a time, below, was 5% of the evaluator).
                    let at = |c: usize| ch * plane + self.offset(y + self.pads.0, c + self.pads.1);
                    // Even and odd columns' first places, in different phases.
                    let (a0, a1) = (at(0), at(1));
                    let (head, tail) = dst.split_at_mut(a0.max(a1));
                    let (low, high) = (&mut head[a0.min(a1)..], tail);
                    let (even, odd) = if a0 < a1 { (low, high) } else { (high, low) };
                    let pairs = row.chunks_exact(2);
                    let (n, last) = (pairs.len(), pairs.remainder().first().copied());
                    for ((e, o), p) in even[..n].iter_mut().zip(&mut odd[..n]).zip(pairs) {
                        *e = p[0];
                        *o = p[1];
                    }
                    if let Some(v) = last {
                        even[n] = v;
                    }
                    continue;
                }
                for phase in 0..sw {
                    // The first column of this row in column phase `phase`.
                    let first = (phase + sw - self.pads.1 % sw) % sw;
                    if first >= g.w {
                        continue;
                    }
                    let at = ch * plane + self.offset(y + self.pads.0, first + self.pads.1);
                    let cols = row[first..].iter().step_by(sw);
                    for (d, &v) in dst[at..].iter_mut().zip(cols) {
                        *d = v;
                    }
                }
            }
        }
    }
}

/// A convolution prepared for the direct kernel: its weights re-laid in micro-tile order.
pub(crate) struct DirectConv {
    g: ConvGeometry,
    phases: Phases,
    /// Per group, per block of [`CHANNELS`] output channels: `[C/groups][taps][CHANNELS]`,
    /// zero for channels past `O/groups`.
    weights: Vec<f32>,
    /// Per group, per block: [`CHANNELS`] biases (zero past `O/groups`, or without a bias).
    bias: Vec<f32>,
    /// Flat offset of each tap, `(ki, kj)` in the weight's order.
    offsets: Vec<usize>,
    /// Blocks of [`CHANNELS`] output channels per group.
    blocks: usize,
    /// Flat output positions computed per channel: `OH * WQ` (a phase's width) rounded up to
    /// whole vectors.
    positions: usize,
}

impl DirectConv {
    /// The convolution of weight `w` (`[O, C/groups, KH, KW]`) and `bias` over geometry `g`,
    /// or `None` when the kernel does not take it: an output narrower than [`MIN_WIDTH`], or
    /// a CPU without AVX-512.
    pub(crate) fn new(w: &[f32], bias: Option<&[f32]>, g: &ConvGeometry) -> Option<Self> {
        if g.ow < MIN_WIDTH || !avx512() {
            return None;
        }
        Some(Self::build(w, bias, g))
    }

    fn build(w: &[f32], bias: Option<&[f32]>, g: &ConvGeometry) -> Self {
        let (cg, og, taps) = (g.cg(), g.og(), g.kh * g.kw);
        assert_eq!(w.len(), g.o * cg * taps, "conv weight length");
        let blocks = og.div_ceil(CHANNELS);
        let mut weights = vec![0f32; g.p.groups * blocks * cg * taps * CHANNELS];
        let mut biases = vec![0f32; g.p.groups * blocks * CHANNELS];
        for grp in 0..g.p.groups {
            for o in 0..og {
                let (blk, q) = (grp * blocks + o / CHANNELS, o % CHANNELS);
                let src = &w[(grp * og + o) * cg * taps..][..cg * taps];
                for (ct, &v) in src.iter().enumerate() {
                    weights[(blk * cg * taps + ct) * CHANNELS + q] = v;
                }
                biases[blk * CHANNELS + q] = bias.map_or(0.0, |b| b[grp * og + o]);
            }
        }
        let phases = Phases::of(g);
        let offsets = (0..g.kh)
            .flat_map(|ki| (0..g.kw).map(move |kj| (ki, kj)))
            .map(|(ki, kj)| phases.offset(ki * g.p.dilation.0, kj * g.p.dilation.1))
            .collect();
        let positions = (g.oh * phases.wq).next_multiple_of(LANES);
        DirectConv { g: *g, phases, weights, bias: biases, offsets, blocks, positions }
    }

    /// Floats read from the phases of one group: the phases, and past the last channel's the
    /// dropped positions' reach.
    fn padded_len(&self) -> usize {
        let plane = self.phases.plane();
        let reach = (self.g.cg() - 1) * plane
            + self.positions
            + self.offsets.iter().copied().max().unwrap_or(0);
        reach.max(self.g.cg() * plane)
    }

    /// Scratch floats [`Self::image`] needs: the padded planes and one group's output tile.
    pub(crate) fn scratch_len(&self) -> usize {
        self.padded_len() + self.blocks * CHANNELS * self.positions
    }

    /// Zero `scratch`'s padding once; [`Self::image`] only writes the planes' interiors.
    pub(crate) fn clear(&self, scratch: &mut [f32]) {
        scratch[..self.padded_len()].fill(0.0);
    }

    /// One image: `x` (`[C, H, W]`) convolved into `y` (`[O, OH, OW]`, overwritten), with a
    /// ReLU applied when `relu`. `scratch` is [`Self::scratch_len`] floats, [`Self::clear`]ed
    /// before the first image of this convolution.
    pub(crate) fn image(&self, x: &[f32], y: &mut [f32], relu: bool, scratch: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f")]
            unsafe fn wide(d: &DirectConv, x: &[f32], y: &mut [f32], relu: bool, s: &mut [f32]) {
                d.image_body(x, y, relu, s)
            }
            // SAFETY: a DirectConv exists only where the CPU has AVX-512F (`new`); the body is
            // safe code, built with wider moves for its copies.
            unsafe { wide(self, x, y, relu, scratch) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        self.image_body(x, y, relu, scratch)
    }

    #[inline(always)]
    fn image_body(&self, x: &[f32], y: &mut [f32], relu: bool, scratch: &mut [f32]) {
        let g = &self.g;
        let (cg, og, taps, hw, ohw) = (g.cg(), g.og(), g.kh * g.kw, g.h * g.w, g.oh * g.ow);
        assert_eq!(x.len(), g.c * hw, "conv input length");
        assert_eq!(y.len(), g.o * ohw, "conv output length");
        let (pad, out) = scratch[..self.scratch_len()].split_at_mut(self.padded_len());
        let vectors = self.positions / LANES;
        let block_len = cg * taps * CHANNELS;
        for grp in 0..g.p.groups {
            self.phases.split(&x[grp * cg * hw..][..cg * hw], g, pad);
            let mut v0 = 0;
            for width in tile_widths(vectors) {
                let plane = self.phases.plane();
                let tile = Tile { pad, p0: v0 * LANES, plane, channels: cg };
                v0 += width;
                for blk in 0..self.blocks {
                    let b = grp * self.blocks + blk;
                    let w = &self.weights[b * block_len..][..block_len];
                    let bias = &self.bias[b * CHANNELS..][..CHANNELS];
                    let out = &mut out[blk * CHANNELS * self.positions..];
                    let (offsets, ld) = (&self.offsets[..], self.positions);
                    match width {
                        VECTORS => tile.run::<VECTORS>(offsets, w, bias, relu, out, ld),
                        2 => tile.run::<2>(offsets, w, bias, relu, out, ld),
                        _ => tile.run::<1>(offsets, w, bias, relu, out, ld),
                    }
                }
            }
            for o in 0..og {
                let src = &out[o * self.positions..];
                let dst = &mut y[(grp * og + o) * ohw..][..ohw];
                for (oy, row) in dst.chunks_exact_mut(g.ow).enumerate() {
                    copy_row(row, &src[oy * self.phases.wq..]);
                }
            }
        }
    }
}

/// Widths, in vectors, of the micro-tiles covering `vectors` vectors: [`VECTORS`] wide, a
/// remainder of one made two tiles of 2 (a 1-wide tile ran at half the speed per vector).
pub(super) fn tile_widths(vectors: usize) -> impl Iterator<Item = usize> {
    let (full, rest) = (vectors / VECTORS, vectors % VECTORS);
    let (full, tail): (usize, &[usize]) = match rest {
        0 => (full, &[]),
        2 => (full, &[2]),
        _ if full == 0 => (0, &[1]),
        _ => (full - 1, &[2, 2]),
    };
    std::iter::repeat_n(VECTORS, full).chain(tail.iter().copied())
}

/// Whether this CPU runs AVX-512 (F) code.
pub(super) fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The input side of one micro-tile: positions `p0..` of every channel's padded plane.
#[derive(Clone, Copy)]
pub(super) struct Tile<'a> {
    pub(super) pad: &'a [f32],
    pub(super) p0: usize,
    pub(super) plane: usize,
    pub(super) channels: usize,
}

impl Tile<'_> {
    /// `out[q * ld + p0 + i]` for the tile's `V * LANES` positions and [`CHANNELS`] channels:
    /// bias plus the sum over channels and taps, through a ReLU when `relu`.
    pub(super) fn run<const V: usize>(
        &self,
        offsets: &[usize],
        w: &[f32],
        bias: &[f32],
        relu: bool,
        out: &mut [f32],
        ld: usize,
    ) {
        let reach = self.p0 + V * LANES + offsets.iter().copied().max().unwrap_or(0);
        assert!(self.channels == 0 || (self.channels - 1) * self.plane + reach <= self.pad.len());
        assert_eq!(w.len(), self.channels * offsets.len() * CHANNELS);
        assert_eq!(bias.len(), CHANNELS);
        assert!(out.len() >= (CHANNELS - 1) * ld + self.p0 + V * LANES);
        #[cfg(target_arch = "x86_64")]
        {
            assert!(avx512(), "the direct kernel needs AVX-512");
            // SAFETY: the CPU has AVX-512F (checked); every load is within `pad` (the reach of
            // the last channel's largest offset, asserted), `w`, `bias`, and every store within
            // `out` (asserted above).
            unsafe { self.run_avx512::<V>(offsets, w, bias, relu, out, ld) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("DirectConv::new refuses CPUs without AVX-512")
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn run_avx512<const V: usize>(
        &self,
        offsets: &[usize],
        w: &[f32],
        bias: &[f32],
        relu: bool,
        out: &mut [f32],
        ld: usize,
    ) {
        use std::arch::x86_64::*;
        let mut acc = [[_mm512_setzero_ps(); V]; CHANNELS];
        for (row, &b) in acc.iter_mut().zip(bias) {
            *row = [_mm512_set1_ps(b); V];
        }
        let mut wp = w.as_ptr();
        let base = self.pad.as_ptr().add(self.p0);
        for c in 0..self.channels {
            let src = base.add(c * self.plane);
            for &off in offsets {
                let s = src.add(off);
                let mut xv = [_mm512_setzero_ps(); V];
                for (v, x) in xv.iter_mut().enumerate() {
                    *x = _mm512_loadu_ps(s.add(v * LANES));
                }
                for (q, row) in acc.iter_mut().enumerate() {
                    let wq = _mm512_set1_ps(*wp.add(q));
                    for (a, x) in row.iter_mut().zip(&xv) {
                        *a = _mm512_fmadd_ps(*x, wq, *a);
                    }
                }
                wp = wp.add(CHANNELS);
            }
        }
        let zero = _mm512_setzero_ps();
        let dst = out.as_mut_ptr().add(self.p0);
        for (q, row) in acc.iter().enumerate() {
            for (v, a) in row.iter().enumerate() {
                let r = if relu { _mm512_max_ps(*a, zero) } else { *a };
                _mm512_storeu_ps(dst.add(q * ld + v * LANES), r);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::rand_vec;
    use super::super::{forward_im2col, Conv2dParams};
    use super::*;

    #[test]
    fn direct_kernel_matches_im2col_and_gemm() {
        if !avx512() {
            // Without AVX-512 the kernel must never be chosen (its code would fault): every
            // geometry goes to im2col and GEMM, which their own tests check.
            let g = ConvGeometry::new(&[3, 16, 28, 29], &[16, 16, 3, 3], Conv2dParams::default())
                .unwrap();
            assert!(DirectConv::new(&rand_vec(16 * g.k(), 12), None, &g).is_none());
            eprintln!("note: no AVX-512 here: checked only that the direct kernel is never chosen");
            return;
        }
        let mut tried = 0;
        for (c, o, hw) in [(16, 16, 28), (3, 5, 13), (32, 24, 14), (8, 17, 12), (4, 8, 30)] {
            for pads in [[1; 4], [0; 4], [2, 0, 1, 3]] {
                for (kh, kw) in [(3, 3), (1, 1), (5, 3)] {
                    for dilation in [(1, 1), (2, 1)] {
                        for (groups, stride) in [(1, (1, 1)), (2, (1, 1)), (1, (2, 2)), (2, (2, 1))]
                        {
                            if c % groups != 0 || o % groups != 0 {
                                continue;
                            }
                            let p = Conv2dParams { stride, dilation, pads, groups };
                            let wd = [o, c / groups, kh, kw];
                            let Ok(g) = ConvGeometry::new(&[3, c, hw, hw + 1], &wd, p) else {
                                continue;
                            };
                            let x = rand_vec(g.n * g.c * g.h * g.w, 11);
                            let w = rand_vec(o * g.k(), 12);
                            let bias = rand_vec(o, 13);
                            for relu in [false, true] {
                                for bias in [None, Some(&bias[..])] {
                                    let want = forward_im2col(&x, &w, bias, &g, relu);
                                    let Some(d) = DirectConv::new(&w, bias, &g) else {
                                        assert!(g.ow < MIN_WIDTH, "{g:?} refused");
                                        continue;
                                    };
                                    // Stale values everywhere but the zeroed padding.
                                    let mut scratch = vec![f32::NAN; d.scratch_len()];
                                    d.clear(&mut scratch);
                                    let ohw_all = g.o * g.oh * g.ow;
                                    let mut got = vec![f32::NAN; want.len()];
                                    for (b, y) in got.chunks_exact_mut(ohw_all).enumerate() {
                                        let xb = &x[b * g.c * g.h * g.w..][..g.c * g.h * g.w];
                                        d.image(xb, y, relu, &mut scratch);
                                    }
                                    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                                        assert!(
                                            (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                                            "{g:?} relu {relu} at {i}: {a} vs {b}"
                                        );
                                    }
                                    tried += 1;
                                }
                            }
                        }
                    }
                }
            }
        }
        assert!(tried > 100, "only {tried} cases ran");
    }

    #[test]
    fn tiles_cover_every_vector_once() {
        for n in 0..40 {
            let widths: Vec<usize> = tile_widths(n).collect();
            assert_eq!(widths.iter().sum::<usize>(), n, "{n}: {widths:?}");
            assert!(widths.iter().all(|&w| (1..=VECTORS).contains(&w)), "{n}: {widths:?}");
            assert!(n < 2 || !widths.contains(&1), "{n}: {widths:?}");
        }
    }
}

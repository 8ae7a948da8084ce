//! Winograd F(2x2, 3x3) for stride-1 3x3 convolutions: AVX-512 code here, and on CPUs without
//! AVX-512 the same algebra in portable loops with gemm's products ([`super::winograd_gemm`]).
//!
//! Why: the 3x3 stride-1 convolutions are nearly all of a ResNet's arithmetic, and Winograd's
//! minimal filtering computes each 2x2 block of outputs from a 4x4 block of inputs with 16
//! multiplications per (input, output) channel pair instead of 36: 2.25 times fewer.
//!
//! How (Lavin and Gray, "Fast algorithms for convolutional neural networks", 2016): the input
//! is cut into overlapping 4x4 tiles two pixels apart; each tile `d` becomes `B^T d B` and each
//! kernel `g` becomes `G g G^T` (4x4 each); for each of the 16 positions `xi` of a 4x4 block the
//! transformed tiles of all channels are multiplied by the transformed kernels, a
//! `[O, C] x [C, tiles]` product, which runs on the direct kernel's micro-tile as a 1x1
//! convolution ([`Tile`]: no packing, no call overhead); each output tile is then
//! `A^T m A` (2x2). Tiles of several small images go side by side into one product, so that
//! a 4x4 layer's product is as wide as a 28x28 one's.
//!
//! The input transform reads the zero-padded input (padded to whole tiles) a pixel row at a
//! time: four loads split into even and odd columns give pixels `2 tx + j` of 16 tiles, and
//! each pixel row's transform serves the two tile rows that share it. (Reading the input split
//! into its four parity phases instead, one load per tile pixel, cost 35% more with the split.)
//!
//! The fine-tuner runs the same algebra backwards: the input gradient is the convolution of the
//! output gradient with the flipped kernel (stride 1 again, so Winograd again), and the weight
//! gradient of a kernel `g` is `G^T dU G` with `dU = sum over tiles of (A dY A^T) * (B^T d B)`
//! per block position, 16 gemms summing over tiles ([`Winograd::weight_grad_run`]).
//!
//! Rounding: the transforms use only 1/2 and +-1 and the products sum over channels in a
//! fixed order, so results differ from a direct convolution's by a few ulps of the
//! magnitudes involved, and are the same bits on every run.

use super::direct::{avx512, tile_widths, Tile, CHANNELS, LANES};
use super::winograd_gemm::{self as portable, Tiling};
use super::{matmul, pad_planes, ConvGeometry, MatRef, Padded};
use ::gemm::Parallelism;
use rayon::prelude::*;

/// Positions of a transformed 4x4 block.
const BLOCK: usize = 16;
/// Least input channels to take where the products run through gemm (AVX2): the transforms
/// cost per channel and the products gain per channel pair, so thin layers gain nothing.
/// Measured on an earlier build (one core, 32 images, 3x3 pad 1): 16 channels at 28x28 ran
/// even with the direct kernel (952 against 980 us), 32 at 14x14 and up faster (763 against
/// 930, 762 against 1,180 at 64x7x7, 862 against 1,260 at 128x4x4). Not re-measured on AVX2,
/// where the alternative is im2col + gemm.
const MIN_CHANNELS: usize = 32;
/// [`MIN_CHANNELS`] with the AVX-512 kernels, whose transforms and products now beat the
/// direct kernel from 16 channels on (Zen 4, `RAYON_NUM_THREADS=1 cargo bench --bench conv_paths`:
/// 1,297 against 1,451 us at 16x16@28). The evaluator on the shipped ResNet, 2 cores,
/// alternating with the build that took 32 and up: 3,686 against 3,476 images/s, medians of 4.
const MIN_CHANNELS_AVX512: usize = 16;
/// The weight gradient's least input and output channels: lower than the forward's, since
/// the alternative there is im2col (nine copies of the input) and gemm's packing of it, not the
/// direct kernel. Taking the ResNet's 16-channel layers: 497 against 522 images/s on the
/// fine-tuning benchmark's command (medians of 3, alternating runs of the two builds).
const MIN_WEIGHT_GRAD_CHANNELS: usize = 8;
/// Tiles a product should span at least (several small images side by side). 64 against 32
/// and 128 measured fastest at every ResNet layer (the stage timings in the tests below):
/// wider products outgrow the L2 cache, narrower ones run the micro-tile's narrow tails.
/// The weight gradient's products, which sum over the tiles, measured the same at 64, 128 and
/// 256 (489-504 images/s on the fine-tuning benchmark's command).
const MIN_COLUMNS: usize = 64;
/// [`MIN_COLUMNS`] where the products run through gemm (AVX2). The 15 layer shapes of
/// `benches/conv_paths.rs` (widths 16-64, one core, beside two training runs, so noisy) took
/// in all a median of 213 ms at 128 columns, 222 ms at 256, 215-233 ms at 64, 96 and 512:
/// wider products amortise gemm's packing of the transformed kernels, narrower ones keep the
/// transformed tiles in cache.
const MIN_GEMM_COLUMNS: usize = 128;

/// Which code computes the transforms and products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernels {
    /// AVX-512 transforms, products on the direct kernel's micro-tile.
    Avx512,
    /// Portable transforms (built for AVX2 where the CPU has it), products through gemm.
    Gemm,
}

impl Kernels {
    fn here() -> Option<Self> {
        if avx512() {
            Some(Kernels::Avx512)
        } else if portable::avx2_fma() {
            Some(Kernels::Gemm)
        } else {
            None
        }
    }
}

/// A 3x3 stride-1 convolution prepared for Winograd F(2x2, 3x3).
pub(crate) struct Winograd {
    g: ConvGeometry,
    /// `g` with its bottom and right padding widened to whole tiles: the padded planes the
    /// input transform reads, built by [`pad_planes`].
    padded_g: ConvGeometry,
    /// Rows and columns of a padded plane.
    padded: (usize, usize),
    /// `G g G^T` per block of [`CHANNELS`] output channels, per block position:
    /// `[blocks][16][C][CHANNELS]`, zero for channels past `O`.
    weights: Vec<f32>,
    /// `[O]`, zero without a bias.
    bias: Vec<f32>,
    blocks: usize,
    /// Tile rows and columns of one image.
    th: usize,
    tw: usize,
    /// Images whose tiles share one product.
    per_run: usize,
    /// Columns of the products' matrices: `per_run` images' tiles rounded up to whole vectors.
    columns: usize,
    kernels: Kernels,
}

/// Floats from one channel's 16 rows of columns to the next channel's: their size plus one
/// cache line, so that the streams a product reads or writes fall in different cache sets. (At
/// strides of a multiple of 4 KiB they shared one set, and a transform ran up to four times
/// slower.)
fn skewed(len: usize) -> usize {
    len + LANES
}

impl Winograd {
    /// `w` (`[O, C, 3, 3]`) and `bias` over `g`, or `None` when `g` is not a 3x3, stride-1,
    /// undilated, ungrouped convolution of at least [`MIN_CHANNELS`] input channels
    /// ([`MIN_CHANNELS_AVX512`] with AVX-512), or the CPU has neither AVX-512 nor AVX2 with FMA.
    pub(crate) fn new(w: &[f32], bias: Option<&[f32]>, g: &ConvGeometry) -> Option<Self> {
        Self::takes(g).then(|| Self::build(w, bias, g))
    }

    /// `g`'s tiling without a kernel, for [`Self::weight_grad_run`]; `None` as [`Self::new`].
    pub(crate) fn for_weight_grad(g: &ConvGeometry) -> Option<Self> {
        let fits = Self::fits(g) && g.c.min(g.o) >= MIN_WEIGHT_GRAD_CHANNELS;
        fits.then(|| Self::tiling(g, Vec::new(), Vec::new()))
    }

    /// [`Self::new`] without the channel threshold, for benchmarks that time every path.
    pub(crate) fn forced(w: &[f32], bias: Option<&[f32]>, g: &ConvGeometry) -> Option<Self> {
        Self::fits(g).then(|| Self::build(w, bias, g))
    }

    fn takes(g: &ConvGeometry) -> bool {
        let least = match Kernels::here() {
            Some(Kernels::Avx512) => MIN_CHANNELS_AVX512,
            _ => MIN_CHANNELS,
        };
        Self::fits(g) && g.c >= least
    }

    fn fits(g: &ConvGeometry) -> bool {
        let p = &g.p;
        (g.kh, g.kw) == (3, 3)
            && p.stride == (1, 1)
            && p.dilation == (1, 1)
            && p.groups == 1
            && g.oh * g.ow > 0
            && Kernels::here().is_some()
    }

    fn build(w: &[f32], bias: Option<&[f32]>, g: &ConvGeometry) -> Self {
        let (c, o) = (g.c, g.o);
        assert_eq!(w.len(), o * c * 9, "conv weight length");
        let bias = bias.map_or_else(|| vec![0.0; o], <[f32]>::to_vec);
        if Kernels::here() == Some(Kernels::Gemm) {
            return Self::tiling(g, portable::kernel_transforms(w, o, c), bias);
        }
        let blocks = o.div_ceil(CHANNELS);
        // The fine-tuner builds this at every step, forward and backward: on all cores (one
        // core: 442-452 images/s on the fine-tuning benchmark's command; all: 483-492).
        let mut weights = vec![0f32; blocks * BLOCK * c * CHANNELS];
        weights.par_chunks_mut(BLOCK * c * CHANNELS).enumerate().for_each(|(blk, wb)| {
            for q in 0..CHANNELS.min(o - blk * CHANNELS) {
                let oc = blk * CHANNELS + q;
                for ci in 0..c {
                    let k = &w[(oc * c + ci) * 9..][..9];
                    let u = kernel_transform(k.try_into().expect("nine taps"));
                    for (xi, &v) in u.iter().enumerate() {
                        wb[(xi * c + ci) * CHANNELS + q] = v;
                    }
                }
            }
        });
        Self::tiling(g, weights, bias)
    }

    fn tiling(g: &ConvGeometry, weights: Vec<f32>, bias: Vec<f32>) -> Self {
        let blocks = g.o.div_ceil(CHANNELS);
        let (th, tw) = (g.oh.div_ceil(2), g.ow.div_ceil(2));
        // Tile (ty, tx) reads padded rows 2 ty..2 ty + 4 and columns 2 tx..2 tx + 4.
        let [top, left, bottom, right] = g.p.pads;
        let (hp, wp) = (2 * th + 2, 2 * tw + 2);
        let pads = [top, left, bottom + hp - Padded::of(g).hp, right + wp - Padded::of(g).wp];
        let padded_g = ConvGeometry { p: super::Conv2dParams { pads, ..g.p }, ..*g };
        let kernels = Kernels::here().expect("Winograd on a CPU without AVX-512 or AVX2");
        let min_columns = match kernels {
            Kernels::Avx512 => MIN_COLUMNS,
            Kernels::Gemm => MIN_GEMM_COLUMNS,
        };
        let per_run = min_columns.div_ceil(th * tw);
        Winograd {
            g: *g,
            padded_g,
            padded: (hp, wp),
            weights,
            bias,
            blocks,
            th,
            tw,
            per_run,
            // The portable transforms write up to a vector past the last tile.
            columns: (per_run * th * tw
                + if kernels == Kernels::Gemm { portable::OVERRUN } else { 0 })
            .next_multiple_of(LANES),
            kernels,
        }
    }

    /// The sizes the portable transforms take.
    fn portable_tiling(&self) -> Tiling {
        let (xs, cs) = self.layout();
        Tiling { th: self.th, tw: self.tw, wp: self.padded.1, xs, cs }
    }

    /// Images [`Self::run`] takes at once (the plan serves any batch).
    pub(crate) fn images_per_run(&self) -> usize {
        self.per_run
    }

    /// The padded planes and the slack the last row's vector loads read past them.
    fn padded_len(&self) -> usize {
        self.g.c * self.padded.0 * self.padded.1 + 2 * LANES + 2
    }

    /// Strides of the transformed tiles and of the products, `(block position, channel)`:
    /// each channel's 16 rows of columns together, so that a channel's transform reads or
    /// writes one stretch of memory. (The other way round, `[16][C][columns]`, the output
    /// transform ran 15% slower; the products and the input transform the same.)
    fn layout(&self) -> (usize, usize) {
        (self.columns, skewed(BLOCK * self.columns))
    }

    fn tiles_len(&self) -> usize {
        self.g.c * self.layout().1
    }

    fn products_len(&self) -> usize {
        self.blocks * CHANNELS * self.layout().1
    }

    /// Scratch floats [`Self::run`] needs: one image's padded planes, the transformed tiles and the
    /// products.
    pub(crate) fn scratch_len(&self) -> usize {
        self.padded_len() + self.tiles_len() + self.products_len() + self.work_len()
    }

    /// The portable input transform's work space.
    fn work_len(&self) -> usize {
        match self.kernels {
            Kernels::Avx512 => 0,
            Kernels::Gemm => self.portable_tiling().work_len(),
        }
    }

    /// Zero `scratch`'s padding once; [`Self::run`] only writes the planes' interiors.
    pub(crate) fn clear(&self, scratch: &mut [f32]) {
        scratch[..self.padded_len()].fill(0.0);
    }

    /// Up to [`Self::images_per_run`] images: `x` (`[nb, C, H, W]`) convolved into `y`
    /// (`[nb, O, OH, OW]`, overwritten), through a ReLU when `relu`. `scratch` is
    /// [`Self::scratch_len`] floats, [`Self::clear`]ed before the convolution's first run.
    pub(crate) fn run(&self, x: &[f32], y: &mut [f32], relu: bool, scratch: &mut [f32]) {
        let (nb, ohw_all) =
            (self.images_of(x, y.len(), "conv output"), self.g.o * self.g.oh * self.g.ow);
        let (pad, tiles, products, work) = self.carve(scratch);
        for (b, xb) in x.chunks_exact(x.len() / nb.max(1)).enumerate() {
            self.pad_and_transform(xb, pad, tiles, work, b);
        }
        let used = nb * self.th * self.tw;
        match self.kernels {
            Kernels::Avx512 => self.multiply(tiles, products, used.div_ceil(LANES)),
            Kernels::Gemm => {
                let t = self.portable_tiling();
                portable::multiply(&self.weights, self.g.o, self.g.c, &t, tiles, products, used)
            }
        }
        for (b, yb) in y.chunks_exact_mut(ohw_all).enumerate() {
            match self.kernels {
                // SAFETY: `Avx512` is chosen only where the CPU has AVX-512F (`Kernels::here`);
                // the transform checks its slices' bounds before any vector access.
                Kernels::Avx512 => unsafe { self.output_transform(products, yb, b, relu) },
                Kernels::Gemm => {
                    let (t, t0) = (self.portable_tiling(), b * self.th * self.tw);
                    portable::output_transform(
                        products, &self.g, &t, &self.bias, yb, t0, relu, work,
                    )
                }
            }
        }
    }

    /// Images in `x` (`[nb, C, H, W]`), checked against a run's capacity and against `out_len`,
    /// the length of the matching `[nb, O, OH, OW]` output or output gradient (`what`).
    fn images_of(&self, x: &[f32], out_len: usize, what: &str) -> usize {
        let g = &self.g;
        let (chw, ohw_all) = (g.c * g.h * g.w, g.o * g.oh * g.ow);
        let nb = x.len() / chw.max(1);
        assert!(nb <= self.per_run, "{nb} images for a run of {}", self.per_run);
        assert_eq!(x.len(), nb * chw, "conv input length");
        assert_eq!(out_len, nb * ohw_all, "{what} length");
        nb
    }

    /// `scratch` as the padded planes, the transformed tiles, the products and the portable
    /// transforms' work space.
    #[allow(clippy::type_complexity)]
    fn carve<'s>(
        &self,
        scratch: &'s mut [f32],
    ) -> (&'s mut [f32], &'s mut [f32], &'s mut [f32], &'s mut [f32]) {
        assert!(scratch.len() >= self.scratch_len(), "Winograd scratch");
        let (pad, rest) = scratch.split_at_mut(self.padded_len());
        let (tiles, rest) = rest.split_at_mut(self.tiles_len());
        let (products, work) = rest.split_at_mut(self.products_len());
        (pad, tiles, products, &mut work[..self.work_len()])
    }

    /// Image `b`'s input `xb` zero-padded into `pad`, then [`Self::input_transform`]ed.
    fn pad_and_transform(
        &self,
        xb: &[f32],
        pad: &mut [f32],
        tiles: &mut [f32],
        work: &mut [f32],
        b: usize,
    ) {
        let planes = self.g.c * self.padded.0 * self.padded.1;
        pad_planes(xb, &self.padded_g, &mut pad[..planes]);
        match self.kernels {
            // SAFETY: `Avx512` is chosen only where the CPU has AVX-512F (`Kernels::here`); the
            // transform checks its slices' bounds before any vector access.
            Kernels::Avx512 => unsafe { self.input_transform(pad, tiles, b) },
            Kernels::Gemm => {
                let (t, t0) = (self.portable_tiling(), b * self.th * self.tw);
                portable::input_transform(pad, self.g.c, &t, tiles, t0, work)
            }
        }
    }

    /// `B^T d B` of every tile of image `b` (its padded planes in `pad`), written to
    /// `tiles[c][xi][b * TH * TW + ty * TW + tx]`. A row of up to 16 tiles reads each pixel
    /// row once, as two pairs of vectors split into even and odd columns; the row transform of
    /// a pixel row serves the two tile rows that share it.
    #[target_feature(enable = "avx512f")]
    unsafe fn input_transform(&self, pad: &[f32], tiles: &mut [f32], b: usize) {
        use std::arch::x86_64::*;
        let (c, wp, plane) = (self.g.c, self.padded.1, self.padded.0 * self.padded.1);
        let t_img = b * self.th * self.tw;
        // The last chunk's last row reads 2 tx0 + 34 floats from the row's start.
        let reach = (self.th * 2 + 1) * wp + 2 * (self.tw - 1) / LANES * LANES + 2 * LANES + 2;
        assert!((c - 1) * plane + reach <= pad.len(), "padded planes too short");
        assert!(t_img + self.th * self.tw <= self.columns, "tiles past the columns");
        let (xs, cs) = self.layout();
        assert!(tiles.len() >= self.tiles_len(), "tiles buffer");
        let out = tiles.as_mut_ptr();
        for ch in 0..c {
            let src = pad.as_ptr().add(ch * plane);
            for tx0 in (0..self.tw).step_by(LANES) {
                let mask = lanes_mask(self.tw - tx0);
                let row = |r: usize| src.add(r * wp + 2 * tx0);
                let (mut e0, mut e1) = (pixel_row(row(0)), pixel_row(row(1)));
                for ty in 0..self.th {
                    let (e2, e3) = (pixel_row(row(2 * ty + 2)), pixel_row(row(2 * ty + 3)));
                    let t = ch * cs + t_img + ty * self.tw + tx0;
                    for (j, col) in transpose(&[e0, e1, e2, e3]).iter().enumerate() {
                        for (k, v) in b_transpose(col).iter().enumerate() {
                            _mm512_mask_storeu_ps(out.add((4 * k + j) * xs + t), mask, *v);
                        }
                    }
                    (e0, e1) = (e2, e3);
                }
            }
        }
    }

    /// Floats of the transformed-kernel gradient [`Self::weight_grad_run`] accumulates:
    /// `[16][O][C]`.
    pub(crate) fn kernel_grad_len(&self) -> usize {
        BLOCK * self.g.o * self.g.c
    }

    /// The weight gradient's share of up to [`Self::images_per_run`] images, `x`
    /// (`[nb, C, H, W]`) and the output gradient `dy` (`[nb, O, OH, OW]`), added to the
    /// transformed-kernel gradient `du` (`[16][O][C]`): for each block position, `A dY A^T` of
    /// the output tiles times `B^T d B` of the input tiles, summed over tiles by gemm. 16
    /// products of depth `tiles` instead of 9 of depth `4 tiles`: 2.25 times fewer
    /// multiplications than im2col + gemm. [`Self::weight_grad_finish`] turns `du` into the
    /// kernel's gradient.
    pub(crate) fn weight_grad_run(
        &self,
        x: &[f32],
        dy: &[f32],
        du: &mut [f32],
        scratch: &mut [f32],
    ) {
        let g = &self.g;
        let nb = self.images_of(x, dy.len(), "conv output gradient");
        assert_eq!(du.len(), self.kernel_grad_len(), "kernel gradient length");
        let (pad, tiles, products, work) = self.carve(scratch);
        let (chw, ohw_all) = (g.c * g.h * g.w, g.o * g.oh * g.ow);
        for (b, (xb, dyb)) in x.chunks_exact(chw).zip(dy.chunks_exact(ohw_all)).enumerate() {
            self.pad_and_transform(xb, pad, tiles, work, b);
            match self.kernels {
                // SAFETY: `Avx512` is chosen only where the CPU has AVX-512F; the transform
                // checks its slices' bounds before any vector access.
                Kernels::Avx512 => unsafe { self.output_adjoint(dyb, products, b) },
                Kernels::Gemm => {
                    let (t, t0) = (self.portable_tiling(), b * self.th * self.tw);
                    portable::output_adjoint(dyb, g, &t, products, t0, work)
                }
            }
        }
        let (used, (xs, stride)) = (nb * self.th * self.tw, self.layout());
        for (xi, du) in du.chunks_exact_mut(g.o * g.c).enumerate() {
            let dm =
                MatRef { data: &products[xi * xs..], rows: g.o, cols: used, rs: stride, cs: 1 };
            let v = MatRef { data: &tiles[xi * xs..], rows: g.c, cols: used, rs: stride, cs: 1 };
            matmul(du, dm, v.t(), true, Parallelism::None);
        }
    }

    /// Add the kernel gradient `G^T dU G` of the transformed-kernel gradient `du` (`[16][O][C]`)
    /// to `dw` (`[O, C, 3, 3]`).
    pub(crate) fn weight_grad_finish(&self, du: &[f32], dw: &mut [f32]) {
        let (o, c) = (self.g.o, self.g.c);
        assert_eq!(du.len(), self.kernel_grad_len(), "kernel gradient length");
        assert_eq!(dw.len(), o * c * 9, "conv weight gradient length");
        // G^T = [[1, 1/2, 1/2, 0], [0, 1/2, -1/2, 0], [0, 1/2, 1/2, 1]].
        let gt = |v: [f32; 4]| {
            [v[0] + 0.5 * (v[1] + v[2]), 0.5 * (v[1] - v[2]), 0.5 * (v[1] + v[2]) + v[3]]
        };
        dw.par_chunks_mut(c * 9).enumerate().for_each(|(oc, dwo)| {
            for (ci, dwk) in dwo.chunks_exact_mut(9).enumerate() {
                let mut u = [0f32; 16];
                for (xi, v) in u.iter_mut().enumerate() {
                    *v = du[(xi * o + oc) * c + ci];
                }
                let rows = [
                    gt([u[0], u[1], u[2], u[3]]),
                    gt([u[4], u[5], u[6], u[7]]),
                    gt([u[8], u[9], u[10], u[11]]),
                    gt([u[12], u[13], u[14], u[15]]),
                ];
                for j in 0..3 {
                    let col = gt([rows[0][j], rows[1][j], rows[2][j], rows[3][j]]);
                    for (i, v) in col.iter().enumerate() {
                        dwk[3 * i + j] += v;
                    }
                }
            }
        });
    }

    /// The adjoint of [`Self::output_transform`]: `A dY A^T` of each 2x2 block of image `b`'s
    /// output gradient `dy` (`[O, OH, OW]`; zero past the edges), written where the products
    /// go.
    #[target_feature(enable = "avx512f")]
    unsafe fn output_adjoint(&self, dy: &[f32], products: &mut [f32], b: usize) {
        use std::arch::x86_64::*;
        let g = &self.g;
        let t_img = b * self.th * self.tw;
        let (xs, os) = self.layout();
        assert!(products.len() >= self.products_len(), "products buffer");
        assert!(t_img + self.th * self.tw <= self.columns, "tiles past the columns");
        assert_eq!(dy.len(), g.o * g.oh * g.ow, "conv output gradient length");
        let (src, dst, zero) = (dy.as_ptr(), products.as_mut_ptr(), _mm512_setzero_ps());
        for o in 0..g.o {
            for ty in 0..self.th {
                for tx0 in (0..self.tw).step_by(LANES) {
                    let mask = lanes_mask(self.tw - tx0);
                    let cols = (g.ow - 2 * tx0).min(2 * LANES);
                    let (mask_lo, mask_hi) =
                        (lanes_mask(cols.min(LANES)), lanes_mask(cols.saturating_sub(LANES)));
                    // s[i][l]: row i of the block times A^T, i.e. (y0, y0 + y1, y0 - y1, -y1).
                    let mut s = [[zero; 4]; 2];
                    for (i, si) in s.iter_mut().enumerate() {
                        let oy = 2 * ty + i;
                        if oy >= g.oh {
                            break;
                        }
                        let row = src.add((o * g.oh + oy) * g.ow + 2 * tx0);
                        let lo = _mm512_maskz_loadu_ps(mask_lo, row);
                        let hi = _mm512_maskz_loadu_ps(mask_hi, row.add(LANES));
                        let [y0, y1] = even_odd(lo, hi);
                        *si = [
                            y0,
                            _mm512_add_ps(y0, y1),
                            _mm512_sub_ps(y0, y1),
                            _mm512_sub_ps(zero, y1),
                        ];
                    }
                    // Rows: A times the two rows, (s0, s0 + s1, s0 - s1, -s1).
                    let mut z = [s[0]; 4];
                    for (l, (s0, s1)) in s[0].iter().zip(&s[1]).enumerate() {
                        z[1][l] = _mm512_add_ps(*s0, *s1);
                        z[2][l] = _mm512_sub_ps(*s0, *s1);
                        z[3][l] = _mm512_sub_ps(zero, *s1);
                    }
                    let t = o * os + t_img + ty * self.tw + tx0;
                    for (k, zk) in z.iter().enumerate() {
                        for (l, v) in zk.iter().enumerate() {
                            _mm512_mask_storeu_ps(dst.add((4 * k + l) * xs + t), mask, *v);
                        }
                    }
                }
            }
        }
    }

    /// For each block position, the `[O, C] x [C, tiles]` product over the first `vectors`
    /// vectors of tile columns.
    fn multiply(&self, tiles: &[f32], products: &mut [f32], vectors: usize) {
        let c = self.g.c;
        let zero = [0f32; CHANNELS];
        for xi in 0..BLOCK {
            let ((vx, vc), (mx, mo)) = (self.layout(), self.layout());
            let v = &tiles[xi * vx..];
            let m = &mut products[xi * mx..];
            let mut v0 = 0;
            for width in tile_widths(vectors) {
                let tile = Tile { pad: v, p0: v0 * LANES, plane: vc, channels: c };
                v0 += width;
                for blk in 0..self.blocks {
                    let w = &self.weights[(blk * BLOCK + xi) * c * CHANNELS..][..c * CHANNELS];
                    let out = &mut m[blk * CHANNELS * mo..];
                    match width {
                        3 => tile.run::<3>(&[0], w, &zero, false, out, mo),
                        2 => tile.run::<2>(&[0], w, &zero, false, out, mo),
                        _ => tile.run::<1>(&[0], w, &zero, false, out, mo),
                    }
                }
            }
        }
    }

    /// `A^T m A` plus bias (and ReLU) of image `b`'s tiles, into `y` (`[O, OH, OW]`).
    #[target_feature(enable = "avx512f")]
    unsafe fn output_transform(&self, products: &[f32], y: &mut [f32], b: usize, relu: bool) {
        use std::arch::x86_64::*;
        let g = &self.g;
        let cols = self.columns;
        let t_img = b * self.th * self.tw;
        let (xs, os) = self.layout();
        assert!(products.len() >= self.products_len(), "products buffer");
        assert!(t_img + self.th * self.tw <= cols, "tiles past the columns");
        assert_eq!(y.len(), g.o * g.oh * g.ow, "conv output length");
        // Lanes 0..8 and 8..16 of two vectors, interleaved: columns 2 tx and 2 tx + 1.
        let low = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
        let high = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
        let (src, dst, zero) = (products.as_ptr(), y.as_mut_ptr(), _mm512_setzero_ps());
        for o in 0..g.o {
            let bias = _mm512_set1_ps(self.bias[o]);
            for ty in 0..self.th {
                for tx0 in (0..self.tw).step_by(LANES) {
                    let mask = lanes_mask(self.tw - tx0);
                    let t = t_img + ty * self.tw + tx0;
                    let mut m = [[_mm512_setzero_ps(); 4]; 4];
                    for (k, mrow) in m.iter_mut().enumerate() {
                        for (j, v) in mrow.iter_mut().enumerate() {
                            let at = (4 * k + j) * xs + o * os + t;
                            *v = _mm512_maskz_loadu_ps(mask, src.add(at));
                        }
                    }
                    // Columns (A^T over k), then rows (A^T over j).
                    let mut s = [[zero; 2]; 4];
                    for (srow, col) in s.iter_mut().zip(&transpose(&m)) {
                        *srow = a_transpose(col);
                    }
                    let out_cols = (g.ow - 2 * tx0).min(2 * LANES);
                    let (mask_lo, mask_hi) = (
                        lanes_mask(out_cols.min(LANES)),
                        lanes_mask(out_cols.saturating_sub(LANES)),
                    );
                    for (i, line) in transpose(&s).iter().enumerate() {
                        let oy = 2 * ty + i;
                        if oy >= g.oh {
                            break;
                        }
                        let [mut y0, mut y1] = a_transpose(line);
                        y0 = _mm512_add_ps(y0, bias);
                        y1 = _mm512_add_ps(y1, bias);
                        if relu {
                            y0 = _mm512_max_ps(y0, zero);
                            y1 = _mm512_max_ps(y1, zero);
                        }
                        let row = dst.add((o * g.oh + oy) * g.ow + 2 * tx0);
                        _mm512_mask_storeu_ps(row, mask_lo, _mm512_permutex2var_ps(y0, low, y1));
                        _mm512_mask_storeu_ps(
                            row.add(LANES),
                            mask_hi,
                            _mm512_permutex2var_ps(y0, high, y1),
                        );
                    }
                }
            }
        }
    }
}

/// `a`'s columns as rows.
#[inline(always)]
fn transpose<T: Copy, const R: usize, const C: usize>(a: &[[T; C]; R]) -> [[T; R]; C] {
    let mut t = [[a[0][0]; R]; C];
    for (r, row) in a.iter().enumerate() {
        for (c, v) in row.iter().enumerate() {
            t[c][r] = *v;
        }
    }
    t
}

/// A mask of the first `n` (at most 16) lanes.
fn lanes_mask(n: usize) -> u16 {
    if n >= LANES {
        u16::MAX
    } else {
        (1u16 << n) - 1
    }
}

/// `G g G^T` of a 3x3 kernel `k` (row-major), as 16 values in row-major 4x4 order.
#[inline(always)]
pub(super) fn kernel_transform(k: &[f32; 9]) -> [f32; 16] {
    // G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]].
    let g = |v: [f32; 3]| -> [f32; 4] {
        [v[0], 0.5 * (v[0] + v[1] + v[2]), 0.5 * (v[0] - v[1] + v[2]), v[2]]
    };
    // Spelled out: `[0, 1, 2].map(..)` compiled to a call per kernel (`try_map`, 1.6% of a
    // training step's perf samples).
    let rows = [g([k[0], k[1], k[2]]), g([k[3], k[4], k[5]]), g([k[6], k[7], k[8]])];
    let mut u = [0f32; 16];
    for j in 0..4 {
        let col = g([rows[0][j], rows[1][j], rows[2][j]]);
        for (i, v) in col.iter().enumerate() {
            u[4 * i + j] = *v;
        }
    }
    u
}

/// The row transform `B^T d` of one pixel row of 16 tiles: pixels `2 tx + j` for `j` in 0..4
/// from the 34 floats at `p`.
#[inline(always)]
unsafe fn pixel_row(p: *const f32) -> [std::arch::x86_64::__m512; 4] {
    use std::arch::x86_64::*;
    let (a, b) = (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(LANES)));
    let (c, d) = (_mm512_loadu_ps(p.add(2)), _mm512_loadu_ps(p.add(LANES + 2)));
    let ([e0, o0], [e2, o2]) = (even_odd(a, b), even_odd(c, d));
    b_transpose(&[e0, o0, e2, o2])
}

/// The even and the odd lanes of the 32 floats `lo, hi`, each as one vector.
#[inline(always)]
unsafe fn even_odd(
    lo: std::arch::x86_64::__m512,
    hi: std::arch::x86_64::__m512,
) -> [std::arch::x86_64::__m512; 2] {
    use std::arch::x86_64::*;
    let even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    let odd = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
    [_mm512_permutex2var_ps(lo, even, hi), _mm512_permutex2var_ps(lo, odd, hi)]
}

/// `B^T v` for one line of four vectors:
/// `B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]`.
#[inline(always)]
unsafe fn b_transpose(v: &[std::arch::x86_64::__m512; 4]) -> [std::arch::x86_64::__m512; 4] {
    use std::arch::x86_64::*;
    [
        _mm512_sub_ps(v[0], v[2]),
        _mm512_add_ps(v[1], v[2]),
        _mm512_sub_ps(v[2], v[1]),
        _mm512_sub_ps(v[1], v[3]),
    ]
}

/// `A^T v` for one line of four vectors: `A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]`.
#[inline(always)]
unsafe fn a_transpose(v: &[std::arch::x86_64::__m512; 4]) -> [std::arch::x86_64::__m512; 2] {
    use std::arch::x86_64::*;
    [_mm512_add_ps(_mm512_add_ps(v[0], v[1]), v[2]), _mm512_sub_ps(_mm512_sub_ps(v[1], v[2]), v[3])]
}

#[cfg(test)]
mod tests {
    use super::super::tests::rand_vec;
    use super::super::{forward_im2col, Conv2dParams};
    use super::*;

    #[test]
    fn kernel_transform_of_a_delta_is_its_row_and_column_of_g() {
        // g = e_(1,1): G g G^T = G[:, 1] G[:, 1]^T with G[:, 1] = (0, 1/2, -1/2, 0).
        let mut k = [0f32; 9];
        k[4] = 1.0;
        let col = [0.0, 0.5, -0.5, 0.0];
        let u = kernel_transform(&k);
        for i in 0..4 {
            for j in 0..4 {
                assert_eq!(u[4 * i + j], col[i] * col[j], "({i}, {j})");
            }
        }
    }

    #[test]
    fn winograd_matches_im2col_and_gemm() {
        // Whichever kernels this CPU has: AVX-512's, or the portable ones with gemm's products.
        assert!(Kernels::here().is_some(), "an x86-64 CPU without AVX2: none of these kernels");
        let mut tried = 0;
        for (n, c, o, h, w) in [
            (3, 16, 16, 28, 28),
            (2, 8, 17, 7, 7),
            (5, 9, 8, 4, 4),
            (2, 12, 24, 5, 9),
            (1, 8, 3, 1, 2),
            (3, 32, 40, 14, 33),
        ] {
            for pads in [[1; 4], [0; 4], [2, 0, 1, 3]] {
                let p = Conv2dParams { pads, ..Conv2dParams::default() };
                let Ok(g) = ConvGeometry::new(&[n, c, h, w], &[o, c, 3, 3], p) else {
                    continue;
                };
                let x = rand_vec(n * c * h * w, 21);
                let wt = rand_vec(o * c * 9, 22);
                let bias = rand_vec(o, 23);
                for relu in [false, true] {
                    for bias in [None, Some(&bias[..])] {
                        let want = forward_im2col(&x, &wt, bias, &g, relu);
                        // `build`: the narrow cases too, which `new` leaves to the direct kernel.
                        let wg = Winograd::build(&wt, bias, &g);
                        // Stale values everywhere but the zeroed padding.
                        let mut scratch = vec![f32::NAN; wg.scratch_len()];
                        wg.clear(&mut scratch);
                        let (chw, ohw_all) = (c * h * w, o * g.oh * g.ow);
                        let mut got = vec![f32::NAN; want.len()];
                        let per = wg.images_per_run();
                        for (xs, ys) in x.chunks(per * chw).zip(got.chunks_mut(per * ohw_all)) {
                            wg.run(xs, ys, relu, &mut scratch);
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
        assert!(tried >= 60, "only {tried} cases ran");
    }

    #[test]
    fn winograd_refuses_what_it_does_not_compute() {
        let x = [1, 32, 8, 8];
        let w = rand_vec(32 * 32 * 15, 1);
        let take = |wd: [usize; 4], p: Conv2dParams| {
            let g = ConvGeometry::new(&x, &wd, p).unwrap();
            Winograd::new(&w[..wd.iter().product()], None, &g).is_some()
        };
        let d = Conv2dParams::default();
        assert_eq!(take([16, 32, 3, 3], d), Kernels::here().is_some());
        assert!(!take([16, 32, 3, 3], Conv2dParams { stride: (2, 2), ..d }));
        assert!(!take([16, 32, 3, 3], Conv2dParams { dilation: (2, 2), ..d }));
        assert!(!take([16, 16, 3, 3], Conv2dParams { groups: 2, ..d }));
        assert!(!take([16, 32, 1, 1], d));
        assert!(!take([16, 32, 5, 3], d));
        // Thin layers: 16 channels only with the AVX-512 kernels, 8 never.
        let thin = |c: usize| {
            let g = ConvGeometry::new(&[1, c, 8, 8], &[16, c, 3, 3], d).unwrap();
            Winograd::new(&w[..16 * c * 9], None, &g).is_some()
        };
        assert_eq!(thin(16), Kernels::here() == Some(Kernels::Avx512));
        assert!(!thin(8));
    }
}

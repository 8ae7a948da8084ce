//! Winograd F(2x2, 3x3) on CPUs without AVX-512: the transforms as portable loops the compiler
//! vectorises for AVX2 (built with `avx2,fma` enabled where the CPU has them), the 16 products
//! of each run through gemm.
//!
//! Why: on AVX2 machines every 3x3 convolution ran im2col + gemm, whose gemm was 66-70% of a
//! training step and of the evaluator at base width 32 and 64 (perf). Winograd does the same
//! convolution in 16 products of depth `C` per 2x2 block instead of 9 of depth `C` per pixel
//! (2.25 times fewer multiplications), and its transformed input is 16/36 of im2col's matrix.
//!
//! The layouts are [`super::winograd::Winograd`]'s: transformed tiles at
//! `tiles[c * cs + xi * xs + t]` and products at `products[o * os + xi * xs + t]`, block
//! position `xi = 4 * row + column`; here the transformed kernels are `[16][O][C]`, one gemm
//! operand per block position. The loops run on `[f32; 8]` values along a row of tiles (`t`,
//! consecutive), a whole vector at a time even at a row's end: up to [`OVERRUN`] columns past
//! it are written, where a later row, image or the products' slack columns take them. The
//! input's row transform reads a padded plane as pixel pairs (a row of `2 tw + 2` pixels is
//! `tw + 1` pairs), so one loop covers a band of pixel rows.

use super::{ConvGeometry, MatRef};
use ::gemm::Parallelism;

/// Whether this CPU runs the AVX2 + FMA builds of these loops (the portable builds run elsewhere).
pub(super) fn avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Floats per vector: the loops below run on `[f32; LANES]` values, which the compiler keeps
/// in AVX2 registers.
const LANES: usize = 8;
type Lanes = [f32; LANES];

/// Columns past a row of tiles that the transforms may write (a whole vector from the row's
/// last one): each image's, band's and row's overflow lands where later writes go, and the
/// products' matrices end with this much slack ([`super::winograd::Winograd`]'s `columns`).
pub(super) const OVERRUN: usize = LANES;

/// Pixel rows the row transform takes at once, as one loop.
const BAND_ROWS: usize = 16;

#[inline(always)]
fn load(s: &[f32], at: usize) -> Lanes {
    s[at..at + LANES].try_into().expect("a whole vector")
}

#[inline(always)]
fn store(d: &mut [f32], at: usize, v: Lanes) {
    d[at..at + LANES].copy_from_slice(&v);
}

// Element loops rather than `array::from_fn` or `map`, whose closures perf showed called, not
// inlined, inside the AVX2 builds.
#[inline(always)]
fn add(a: Lanes, b: Lanes) -> Lanes {
    let mut r = a;
    for l in 0..LANES {
        r[l] += b[l];
    }
    r
}

#[inline(always)]
fn sub(a: Lanes, b: Lanes) -> Lanes {
    let mut r = a;
    for l in 0..LANES {
        r[l] -= b[l];
    }
    r
}

#[inline(always)]
fn neg(a: Lanes) -> Lanes {
    sub([0.0; LANES], a)
}

#[inline(always)]
fn rectify(a: Lanes) -> Lanes {
    let mut r = a;
    for v in r.iter_mut() {
        *v = v.max(0.0);
    }
    r
}

/// Sizes the transforms share.
#[derive(Clone, Copy, Debug)]
pub(super) struct Tiling {
    /// Tile rows and columns of one image.
    pub(super) th: usize,
    pub(super) tw: usize,
    /// Columns of a padded plane (`2 * tw + 2`).
    pub(super) wp: usize,
    /// Strides of a block position and of a channel in the tiles and the products.
    pub(super) xs: usize,
    pub(super) cs: usize,
}

impl Tiling {
    /// Floats of one row transform over [`BAND_ROWS`] pixel rows (`tw + 1` pairs a row).
    fn band_len(&self) -> usize {
        BAND_ROWS * (self.tw + 1) + LANES
    }

    /// A row of tiles rounded up to whole vectors.
    fn tw_lanes(&self) -> usize {
        self.tw.next_multiple_of(LANES)
    }

    /// Floats of work space the transforms need.
    pub(super) fn work_len(&self) -> usize {
        (4 * self.band_len()).max(4 * self.tw_lanes())
    }
}

/// `G g G^T` of every kernel of `w` (`[O, C, 3, 3]`), as `[16][O][C]`.
pub(super) fn kernel_transforms(w: &[f32], o: usize, c: usize) -> Vec<f32> {
    let mut out = vec![0f32; 16 * o * c];
    for (oc_ci, k) in w.chunks_exact(9).enumerate() {
        let u = super::winograd::kernel_transform(k.try_into().expect("nine taps"));
        for (xi, v) in u.iter().enumerate() {
            out[xi * o * c + oc_ci] = *v;
        }
    }
    out
}

built_for! {
    ["avx2", "fma"]
    /// `B^T d B` of every tile of one image's padded planes `pad` (`[C][2 th + 2][wp]`, then at
    /// least four floats of slack), written to `tiles[ch * cs + xi * xs + t0 + ty * tw + tx]`
    /// (and up to [`OVERRUN`] columns past each row of tiles).
    pub(super) fn input_transform(
        pad: &[f32],
        c: usize,
        t: &Tiling,
        tiles: &mut [f32],
        t0: usize,
        work: &mut [f32],
    ) {
        let (th, tw, wp) = (t.th, t.tw, t.wp);
        let (plane, pairs, band) = ((2 * th + 2) * wp, tw + 1, t.band_len());
        assert_eq!(wp, 2 * pairs, "padded rows of whole tiles");
        assert!(pad.len() >= c * plane + 4, "padded planes too short");
        let reach = (t0 + th * tw).next_multiple_of(LANES) + 15 * t.xs;
        assert!(c == 0 || (c - 1) * t.cs + reach <= tiles.len(), "tiles buffer");
        assert!(work.len() >= t.work_len(), "Winograd work space");
        let [h0, h1, h2, h3] = pieces::<4>(work, band);
        for ch in 0..c {
            let src = &pad[ch * plane..];
            let out = &mut tiles[ch * t.cs..];
            // Tile rows whose four pixel rows lie in one band of BAND_ROWS rows.
            let per_band = (BAND_ROWS - 2) / 2;
            for ty0 in (0..th).step_by(per_band) {
                let rows = per_band.min(th - ty0);
                // The row transform `d B` of pixel rows 2 ty0 .. 2 (ty0 + rows) + 2, one loop:
                // a padded row is `tw + 1` pixel pairs, so pair `q` of the band starts at pixel
                // `2 q` (the last pair of each row mixes two rows: never read below).
                let first = 2 * ty0 * pairs;
                let n = (2 * rows + 2) * pairs;
                let src = &src[2 * first..][..2 * n + 2];
                for q in 0..n {
                    let (e0, o0) = (src[2 * q], src[2 * q + 1]);
                    let (e1, o1) = (src[2 * q + 2], src[2 * q + 3]);
                    h0[q] = e0 - e1;
                    h1[q] = o0 + e1;
                    h2[q] = e1 - o0;
                    h3[q] = o0 - o1;
                }
                for ty in 0..rows {
                    let at = t0 + (ty0 + ty) * tw;
                    for (j, h) in [&*h0, &*h1, &*h2, &*h3].into_iter().enumerate() {
                        let row = |i: usize| (2 * ty + i) * pairs;
                        for x in (0..tw).step_by(LANES) {
                            let d = [
                                load(h, row(0) + x),
                                load(h, row(1) + x),
                                load(h, row(2) + x),
                                load(h, row(3) + x),
                            ];
                            // B^T down the column: (d0 - d2, d1 + d2, d2 - d1, d1 - d3).
                            let at = at + x;
                            store(out, j * t.xs + at, sub(d[0], d[2]));
                            store(out, (4 + j) * t.xs + at, add(d[1], d[2]));
                            store(out, (8 + j) * t.xs + at, sub(d[2], d[1]));
                            store(out, (12 + j) * t.xs + at, sub(d[1], d[3]));
                        }
                    }
                }
            }
        }
    }
}

/// The front of `buf` cut into `K` pieces of `len` floats.
#[inline(always)]
fn pieces<const K: usize>(buf: &mut [f32], len: usize) -> [&mut [f32]; K] {
    let mut rest = buf;
    std::array::from_fn(|_| {
        let (head, tail) = std::mem::take(&mut rest).split_at_mut(len);
        rest = tail;
        head
    })
}

/// For each block position, `products = U_xi @ tiles` over the first `used` columns, with
/// `weights` the transformed kernels (`[16][O][C]`).
pub(super) fn multiply(
    weights: &[f32],
    o: usize,
    c: usize,
    t: &Tiling,
    tiles: &[f32],
    products: &mut [f32],
    used: usize,
) {
    for xi in 0..16 {
        let u = MatRef::new(&weights[xi * o * c..][..o * c], o, c);
        let v = MatRef { data: &tiles[xi * t.xs..], rows: c, cols: used, rs: t.cs, cs: 1 };
        // The products' rows (output channels) are as far apart as the tiles' channels.
        super::matmul_strided(&mut products[xi * t.xs..], t.cs, u, v, Parallelism::None);
    }
}

built_for! {
    ["avx2", "fma"]
    /// `A^T m A` plus `bias` (and a ReLU) of one image's tiles (`products`, from column `t0`), into
    /// `y` (`[O, OH, OW]`).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn output_transform(
        products: &[f32],
        g: &ConvGeometry,
        t: &Tiling,
        bias: &[f32],
        y: &mut [f32],
        t0: usize,
        relu: bool,
        work: &mut [f32],
    ) {
        let tw = t.tw;
        assert_eq!(y.len(), g.o * g.oh * g.ow, "conv output length");
        assert_eq!(bias.len(), g.o, "conv bias length");
        assert!(work.len() >= t.work_len(), "Winograd work space");
        let [line0, line1] = pieces::<2>(work, 2 * t.tw_lanes());
        for o in 0..g.o {
            let m = &products[o * t.cs..];
            let b = [bias[o]; LANES];
            for ty in 0..t.th {
                let at = t0 + ty * tw;
                for x in (0..tw).step_by(LANES) {
                    let mv = |k: usize, j: usize| load(m, (4 * k + j) * t.xs + at + x);
                    // A^T down the columns: s[i][j] = (m0 + m1 + m2, m1 - m2 - m3)[i].
                    let (mut s0, mut s1) = ([[0f32; LANES]; 4], [[0f32; LANES]; 4]);
                    for (j, (a, b)) in s0.iter_mut().zip(&mut s1).enumerate() {
                        let (m0, m1, m2, m3) = (mv(0, j), mv(1, j), mv(2, j), mv(3, j));
                        *a = add(add(m0, m1), m2);
                        *b = sub(sub(m1, m2), m3);
                    }
                    let s = [s0, s1];
                    for (si, line) in s.iter().zip([&mut *line0, &mut *line1]) {
                        let mut y0 = add(add(add(si[0], si[1]), si[2]), b);
                        let mut y1 = add(sub(sub(si[1], si[2]), si[3]), b);
                        if relu {
                            (y0, y1) = (rectify(y0), rectify(y1));
                        }
                        let pairs: &mut [f32; 2 * LANES] = (&mut line[2 * x..][..2 * LANES])
                            .try_into()
                            .expect("a vector of pairs");
                        for l in 0..LANES {
                            pairs[2 * l] = y0[l];
                            pairs[2 * l + 1] = y1[l];
                        }
                    }
                }
                for (i, line) in [&*line0, &*line1].into_iter().enumerate() {
                    let oy = 2 * ty + i;
                    if oy < g.oh {
                        y[(o * g.oh + oy) * g.ow..][..g.ow].copy_from_slice(&line[..g.ow]);
                    }
                }
            }
        }
    }
}

built_for! {
    ["avx2", "fma"]
    /// The adjoint of [`output_transform`]: `A dY A^T` of each 2x2 block of one image's output
    /// gradient `dy` (`[O, OH, OW]`, zero past its edges), written where the products go (and up
    /// to [`OVERRUN`] columns past each row of tiles).
    pub(super) fn output_adjoint(
        dy: &[f32],
        g: &ConvGeometry,
        t: &Tiling,
        products: &mut [f32],
        t0: usize,
        work: &mut [f32],
    ) {
        let tw = t.tw;
        assert_eq!(dy.len(), g.o * g.oh * g.ow, "conv output gradient length");
        assert!(work.len() >= t.work_len(), "Winograd work space");
        let reach = (t0 + t.th * tw).next_multiple_of(LANES) + 15 * t.xs;
        assert!(g.o == 0 || (g.o - 1) * t.cs + reach <= products.len(), "products buffer");
        // The block's two rows of output gradient, zero past the edges, as pixel pairs.
        let [line0, line1] = pieces::<2>(work, 2 * t.tw_lanes());
        for o in 0..g.o {
            let out = &mut products[o * t.cs..];
            for ty in 0..t.th {
                for (i, line) in [&mut *line0, &mut *line1].into_iter().enumerate() {
                    let oy = 2 * ty + i;
                    line.fill(0.0);
                    if oy < g.oh {
                        line[..g.ow].copy_from_slice(&dy[(o * g.oh + oy) * g.ow..][..g.ow]);
                    }
                }
                let at = t0 + ty * tw;
                for x in (0..tw).step_by(LANES) {
                    // s[i][l]: row i of the block times A^T, (y0, y0 + y1, y0 - y1, -y1) at l.
                    let mut s = [[[0f32; LANES]; 4]; 2];
                    for (si, line) in s.iter_mut().zip([&*line0, &*line1]) {
                        let pairs: &[f32; 2 * LANES] =
                            line[2 * x..][..2 * LANES].try_into().expect("a vector of pairs");
                        let (mut y0, mut y1) = ([0f32; LANES], [0f32; LANES]);
                        for l in 0..LANES {
                            (y0[l], y1[l]) = (pairs[2 * l], pairs[2 * l + 1]);
                        }
                        *si = [y0, add(y0, y1), sub(y0, y1), neg(y1)];
                    }
                    // Down the rows: (s0, s0 + s1, s0 - s1, -s1).
                    let at = at + x;
                    for (l, (&a, &b)) in s[0].iter().zip(&s[1]).enumerate() {
                        store(out, l * t.xs + at, a);
                        store(out, (4 + l) * t.xs + at, add(a, b));
                        store(out, (8 + l) * t.xs + at, sub(a, b));
                        store(out, (12 + l) * t.xs + at, neg(b));
                    }
                }
            }
        }
    }
}

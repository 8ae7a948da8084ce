//! 2-D convolution for training and inference on the CPU: the forward (bias fused), the input
//! gradient and the weight and bias gradients, exposed to candle as a custom op so that
//! autodiff calls it instead of candle's scalar `conv2d` / `conv_transpose2d`. 3x3 stride-1
//! convolutions of 32 or more channels run Winograd F(2x2, 3x3) ([`winograd`]) for the forward
//! and both gradients; the other forwards and stride-1 input gradients run the direct AVX-512
//! kernel ([`direct`]) on planes 7 or more wide; the rest, and the other weight gradients, run
//! im2col / gemm / col2im. (A direct weight gradient, 3 output channels x 9 taps of vector
//! accumulators, was built and measured 8% slower on the training benchmark than im2col +
//! gemm: not kept.)
//!
//! Layouts are candle's and ONNX's: input `[N, C, H, W]`, weight `[O, C/groups, KH, KW]`,
//! output `[N, O, OH, OW]`, all contiguous row-major.
//!
//! Threads: the forward and the input gradient work image by image, so any split of the batch
//! gives the same bits. The weight and bias gradients are sums over the batch; they are summed
//! in a fixed order that depends only on the shapes (the batch is cut into a fixed number of
//! chunks, each chunk's partial sum is taken image by image, the partials are added in chunk
//! order), so identical runs give identical bytes on any number of threads.

mod direct;
#[cfg(target_arch = "x86_64")]
mod winograd;

use super::elementwise::relu_in_place;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Storage, Tensor};
use direct::DirectConv;
use gemm::Parallelism;
use rayon::prelude::*;
use std::cell::RefCell;

/// Convolution attributes as ONNX Conv has them (2-D).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dParams {
    /// (vertical, horizontal).
    pub stride: (usize, usize),
    /// (vertical, horizontal).
    pub dilation: (usize, usize),
    /// `[top, left, bottom, right]`, the order of ONNX's `pads`.
    pub pads: [usize; 4],
    pub groups: usize,
}

impl Default for Conv2dParams {
    fn default() -> Self {
        Conv2dParams { stride: (1, 1), dilation: (1, 1), pads: [0; 4], groups: 1 }
    }
}

/// Every size of one convolution, checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeometry {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub o: usize,
    pub kh: usize,
    pub kw: usize,
    pub oh: usize,
    pub ow: usize,
    pub p: Conv2dParams,
}

impl ConvGeometry {
    /// Sizes for input dims `[N, C, H, W]` and weight dims `[O, C/groups, KH, KW]`.
    pub fn new(x: &[usize], wt: &[usize], p: Conv2dParams) -> Result<Self, String> {
        let [n, c, h, w] =
            <[usize; 4]>::try_from(x).map_err(|_| format!("conv input {x:?} is not 4-D"))?;
        let [o, cg, kh, kw] =
            <[usize; 4]>::try_from(wt).map_err(|_| format!("conv weight {wt:?} is not 4-D"))?;
        let g = p.groups;
        if g == 0 || c % g != 0 || o % g != 0 || cg * g != c {
            return Err(format!("conv input {x:?} / weight {wt:?} do not fit {g} groups"));
        }
        if p.stride.0 == 0 || p.stride.1 == 0 || p.dilation.0 == 0 || p.dilation.1 == 0 {
            return Err(format!("conv strides {:?} / dilations {:?}", p.stride, p.dilation));
        }
        let out = |len: usize, pad: usize, k: usize, s: usize, d: usize| -> Result<usize, String> {
            let span = d * (k.max(1) - 1) + 1;
            if k == 0 || len + pad < span {
                return Err(format!("conv kernel {wt:?} does not fit the padded input {x:?}"));
            }
            Ok((len + pad - span) / s + 1)
        };
        let oh = out(h, p.pads[0] + p.pads[2], kh, p.stride.0, p.dilation.0)?;
        let ow = out(w, p.pads[1] + p.pads[3], kw, p.stride.1, p.dilation.1)?;
        Ok(ConvGeometry { n, c, h, w, o, kh, kw, oh, ow, p })
    }

    /// Input channels per group.
    pub fn cg(&self) -> usize {
        self.c / self.p.groups
    }
    /// Output channels per group.
    pub fn og(&self) -> usize {
        self.o / self.p.groups
    }
    /// Rows of one group's im2col matrix: `C/groups * KH * KW`.
    pub fn k(&self) -> usize {
        self.cg() * self.kh * self.kw
    }
    pub fn out_dims(&self) -> [usize; 4] {
        [self.n, self.o, self.oh, self.ow]
    }
    /// A 1x1 kernel at stride 1 without padding reads the input itself as its im2col matrix.
    fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.p.stride == (1, 1) && self.p.pads == [0; 4]
    }
}

/// Sizes of a group's zero-padded input planes, `[C/groups, H + pads, W + pads]`.
#[derive(Clone, Copy, Debug)]
struct Padded {
    hp: usize,
    wp: usize,
}

impl Padded {
    fn of(g: &ConvGeometry) -> Self {
        Padded { hp: g.h + g.p.pads[0] + g.p.pads[2], wp: g.w + g.p.pads[1] + g.p.pads[3] }
    }
    fn plane(&self) -> usize {
        self.hp * self.wp
    }
    fn len(&self, g: &ConvGeometry) -> usize {
        g.cg() * self.plane()
    }
}

/// Copy `src` (at least `dst.len()` long) into `dst` without calling `memcpy`: the rows here are
/// 4 to 32 floats, where the call cost more than the copy. Straight-line overlapping 8- and
/// 4-float blocks, as `memcpy` itself does for short copies.
#[inline(always)]
fn copy_row(dst: &mut [f32], src: &[f32]) {
    let n = dst.len();
    let src = &src[..n];
    match n {
        0 => {}
        1..=3 => {
            for (d, s) in dst.iter_mut().zip(src) {
                *d = *s;
            }
        }
        4..=7 => {
            dst[..4].copy_from_slice(&src[..4]);
            dst[n - 4..].copy_from_slice(&src[n - 4..]);
        }
        8..=16 => {
            dst[..8].copy_from_slice(&src[..8]);
            dst[n - 8..].copy_from_slice(&src[n - 8..]);
        }
        17..=32 => {
            dst[..16].copy_from_slice(&src[..16]);
            dst[n - 16..].copy_from_slice(&src[n - 16..]);
        }
        _ => dst.copy_from_slice(src),
    }
}

/// `dst += src` element-wise, in 8-float blocks the compiler keeps in vector registers.
#[inline(always)]
fn add_row(dst: &mut [f32], src: &[f32]) {
    let src = &src[..dst.len()];
    let mut d8 = dst.chunks_exact_mut(8);
    let mut s8 = src.chunks_exact(8);
    for (d, s) in (&mut d8).zip(&mut s8) {
        for (d, s) in d.iter_mut().zip(s) {
            *d += *s;
        }
    }
    for (d, s) in d8.into_remainder().iter_mut().zip(s8.remainder()) {
        *d += *s;
    }
}

/// [`pad_planes_body`], built for AVX2 where the CPU has it (wider moves for its short rows).
fn pad_planes(x: &[f32], g: &ConvGeometry, pad: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        #[target_feature(enable = "avx2")]
        unsafe fn avx2(x: &[f32], g: &ConvGeometry, pad: &mut [f32]) {
            pad_planes_body(x, g, pad)
        }
        // SAFETY: the CPU supports AVX2, as just checked; the body is safe code.
        return unsafe { avx2(x, g, pad) };
    }
    pad_planes_body(x, g, pad)
}

/// Copy one group of one image, `[C/groups, H, W]`, into the interior of `pad`
/// ([`Padded`] planes). The border is left as it is: zero, once the buffer was zeroed.
#[inline(always)]
fn pad_planes_body(x: &[f32], g: &ConvGeometry, pad: &mut [f32]) {
    let (h, w) = (g.h, g.w);
    let pd = Padded::of(g);
    assert!(x.len() == g.cg() * h * w && pad.len() == pd.len(g));
    for (src, dst) in x.chunks_exact(h * w).zip(pad.chunks_exact_mut(pd.plane())) {
        for (s, d) in src.chunks_exact(w).zip(dst[g.p.pads[0] * pd.wp..].chunks_mut(pd.wp)) {
            copy_row(&mut d[g.p.pads[1]..g.p.pads[1] + w], s);
        }
    }
}

/// [`im2col_padded_body`], built for AVX2 where the CPU has it (wider moves for its short rows).
fn im2col_padded(pad: &[f32], g: &ConvGeometry, col: &mut [f32], ld: usize) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        #[target_feature(enable = "avx2")]
        unsafe fn avx2(pad: &[f32], g: &ConvGeometry, col: &mut [f32], ld: usize) {
            im2col_padded_body(pad, g, col, ld)
        }
        // SAFETY: the CPU supports AVX2, as just checked; the body is safe code.
        return unsafe { avx2(pad, g, col, ld) };
    }
    im2col_padded_body(pad, g, col, ld)
}

/// [`im2col`] from planes already padded ([`pad_planes`]): no bounds to test, one short copy
/// (stride 1) or gather (otherwise) per output row. Row `r` of the matrix is
/// `col[r * ld..r * ld + OH * OW]`, so that several images can sit side by side.
#[inline(always)]
fn im2col_padded_body(pad: &[f32], g: &ConvGeometry, col: &mut [f32], ld: usize) {
    let (ow, ohw) = (g.ow, g.oh * g.ow);
    let pd = Padded::of(g);
    assert!(pad.len() == pd.len(g) && ld >= ohw);
    assert!(g.k() == 0 || col.len() >= (g.k() - 1) * ld + ohw);
    let (sh, sw) = g.p.stride;
    let (dh, dw) = g.p.dilation;
    let mut r = 0;
    for plane in pad.chunks_exact(pd.plane()) {
        for ki in 0..g.kh {
            for kj in 0..g.kw {
                let row = &mut col[r * ld..r * ld + ohw];
                r += 1;
                let base = ki * dh * pd.wp + kj * dw;
                for (oy, line) in row.chunks_exact_mut(ow).enumerate() {
                    let src = &plane[base + oy * sh * pd.wp..];
                    if sw == 1 {
                        copy_row(line, src);
                    } else {
                        let src = &src[..(ow - 1) * sw + 1];
                        for (i, d) in line.iter_mut().enumerate() {
                            *d = src[i * sw];
                        }
                    }
                }
            }
        }
    }
}

/// [`col2im_padded_body`], built for AVX2 where the CPU has it (wider moves for its short rows).
fn col2im_padded(col: &[f32], g: &ConvGeometry, pad: &mut [f32], ld: usize) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        #[target_feature(enable = "avx2")]
        unsafe fn avx2(col: &[f32], g: &ConvGeometry, pad: &mut [f32], ld: usize) {
            col2im_padded_body(col, g, pad, ld)
        }
        // SAFETY: the CPU supports AVX2, as just checked; the body is safe code.
        return unsafe { avx2(col, g, pad, ld) };
    }
    col2im_padded_body(col, g, pad, ld)
}

/// The adjoint of [`im2col_padded`]: adds `col` (rows `ld` apart) onto the padded planes.
#[inline(always)]
fn col2im_padded_body(col: &[f32], g: &ConvGeometry, pad: &mut [f32], ld: usize) {
    let (ow, ohw) = (g.ow, g.oh * g.ow);
    let pd = Padded::of(g);
    assert!(pad.len() == pd.len(g) && ld >= ohw);
    assert!(g.k() == 0 || col.len() >= (g.k() - 1) * ld + ohw);
    let (sh, sw) = g.p.stride;
    let (dh, dw) = g.p.dilation;
    let mut r = 0;
    for plane in pad.chunks_exact_mut(pd.plane()) {
        for ki in 0..g.kh {
            for kj in 0..g.kw {
                let row = &col[r * ld..r * ld + ohw];
                r += 1;
                let base = ki * dh * pd.wp + kj * dw;
                for (oy, line) in row.chunks_exact(ow).enumerate() {
                    let dst = &mut plane[base + oy * sh * pd.wp..];
                    if sw == 1 {
                        add_row(&mut dst[..ow], line);
                    } else {
                        let dst = &mut dst[..(ow - 1) * sw + 1];
                        for (i, v) in line.iter().enumerate() {
                            dst[i * sw] += *v;
                        }
                    }
                }
            }
        }
    }
}

/// Add the interior of the padded planes `pad` onto `x`, `[C/groups, H, W]`.
fn unpad_add(pad: &[f32], g: &ConvGeometry, x: &mut [f32]) {
    let (h, w) = (g.h, g.w);
    let pd = Padded::of(g);
    assert!(x.len() == g.cg() * h * w && pad.len() == pd.len(g));
    for (dst, src) in x.chunks_exact_mut(h * w).zip(pad.chunks_exact(pd.plane())) {
        for (d, s) in dst.chunks_exact_mut(w).zip(src[g.p.pads[0] * pd.wp..].chunks(pd.wp)) {
            add_row(d, &s[g.p.pads[1]..]);
        }
    }
}

/// One group of one image, `[C/groups, H, W]`, unrolled into `col`, `[C/groups * KH * KW,
/// OH * OW]`: row `(c, ki, kj)` holds the input pixel each output position reads through tap
/// `(ki, kj)` of channel `c` (zero in the padding).
pub fn im2col(x: &[f32], g: &ConvGeometry, col: &mut [f32]) {
    im2col_rows(x, g, col, g.oh * g.ow);
}

/// [`im2col`] with the matrix's rows `ld` apart, so that several images can sit side by side.
pub fn im2col_rows(x: &[f32], g: &ConvGeometry, col: &mut [f32], ld: usize) {
    let mut pad = vec![0f32; Padded::of(g).len(g)];
    pad_planes(x, g, &mut pad);
    im2col_padded(&pad, g, col, ld);
}

/// The adjoint of [`im2col`]: adds every entry of `col` back onto the input pixel it was read
/// from. `x` is `[C/groups, H, W]` and is added to, not overwritten.
pub fn col2im(col: &[f32], g: &ConvGeometry, x: &mut [f32]) {
    let mut pad = vec![0f32; Padded::of(g).len(g)];
    col2im_padded(col, g, &mut pad, g.oh * g.ow);
    unpad_add(&pad, g, x);
}

/// A strided read-only matrix: element `(i, j)` is `data[i * rs + j * cs]`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> MatRef<'a> {
    /// A contiguous row-major `rows x cols` matrix.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        assert_eq!(data.len(), rows * cols, "matrix data does not hold {rows}x{cols}");
        MatRef { data, rows, cols, rs: cols, cs: 1 }
    }
    /// The transpose, as a view.
    pub fn t(self) -> Self {
        MatRef { data: self.data, rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs }
    }
    /// Whether every element lies inside `data`.
    fn in_bounds(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1)
                .checked_mul(self.rs)
                .zip((self.cols - 1).checked_mul(self.cs))
                .and_then(|(a, b)| a.checked_add(b))
                .is_some_and(|last| last < self.data.len())
    }
}

/// `dst = a @ b`, or `dst += a @ b` when `accumulate`; `dst` is `[a.rows, b.cols]` row-major.
pub fn matmul(dst: &mut [f32], a: MatRef, b: MatRef, accumulate: bool, par: Parallelism) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "matmul of {m}x{k} by {}x{n}", b.rows);
    assert_eq!(dst.len(), m * n, "matmul destination is not {m}x{n}");
    assert!(a.in_bounds() && b.in_bounds(), "matmul operand strides run past its data");
    assert!(
        [a.rs, a.cs, b.rs, b.cs, n].iter().all(|&s| s <= isize::MAX as usize),
        "matmul strides overflow"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst.fill(0.0);
        }
        return;
    }
    // SAFETY: `dst` holds exactly `m * n` elements at row stride `n` and column stride 1, `a`
    // and `b` were checked above to address only elements inside their slices, and `dst`
    // (borrowed mutably) cannot alias them. With `read_dst == false` gemm writes `dst`
    // without reading it, so its previous contents need no initialisation invariant.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

/// Sum of `v` in a fixed order (eight interleaved lanes, then the lanes pairwise), which the
/// compiler can vectorise.
pub fn sum(v: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let chunks = v.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (l, x) in lanes.iter_mut().zip(c) {
            *l += *x;
        }
    }
    for (l, x) in lanes.iter_mut().zip(rest) {
        *l += *x;
    }
    let q = [lanes[0] + lanes[4], lanes[1] + lanes[5], lanes[2] + lanes[6], lanes[3] + lanes[7]];
    (q[0] + q[2]) + (q[1] + q[3])
}

/// Floats a task of [`zeroed`] fills.
const ZERO_TASK: usize = 1 << 16;

/// `len` zeros, written by every core: a fresh activation or gradient is a few megabytes, and
/// zeroing it on one core was 6% of a training step (perf, `memset`).
pub(crate) fn zeroed(len: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(len);
    v.par_extend(rayon::iter::repeat_n(0f32, len).with_min_len(ZERO_TASK));
    v
}

/// Most chunks the batch is cut into.
const MAX_CHUNKS: usize = 16;
/// Fewest chunks wanted when small images are batched into wider gemms instead.
const MIN_CHUNKS: usize = 8;
/// Output positions a gemm should span at least: images smaller than this go several to a
/// gemm, side by side (at 4x4, one image alone left gemm's widest kernel idle).
const GEMM_COLUMNS: usize = 256;
/// Most floats the per-chunk partial weight gradients may hold together.
const MAX_PARTIAL_FLOATS: usize = 1 << 24;

/// How the batch is cut: into chunks (the parallel tasks, and the weight gradient's partial
/// sums), each into gemms of a few images. A function of the shapes only, never of the
/// thread count, so that the weight gradient's summation order is fixed.
#[derive(Clone, Copy, Debug)]
struct Split {
    per_chunk: usize,
    per_gemm: usize,
    chunks: usize,
}

impl Split {
    fn of(g: &ConvGeometry) -> Self {
        let n = g.n.max(1);
        let want = GEMM_COLUMNS.div_ceil((g.oh * g.ow).max(1));
        let by_memory = (MAX_PARTIAL_FLOATS / (g.o * g.k()).max(1)).max(1);
        let per_chunk =
            n.div_ceil(MAX_CHUNKS).max(want.min(n.div_ceil(MIN_CHUNKS))).max(n.div_ceil(by_memory));
        Split { per_chunk, per_gemm: want.min(per_chunk), chunks: n.div_ceil(per_chunk) }
    }

    /// gemm's own threads when the batch gives no parallelism (one chunk), none otherwise:
    /// the chunks already run in parallel.
    fn gemm_par(&self) -> Parallelism {
        if self.chunks <= 1 {
            Parallelism::Rayon(0)
        } else {
            Parallelism::None
        }
    }

    /// The gemms of a chunk of `images`: (first image, images).
    fn gemms(&self, images: usize) -> impl Iterator<Item = (usize, usize)> {
        let per = self.per_gemm;
        (0..images).step_by(per).map(move |s| (s, per.min(images - s)))
    }
}

thread_local! {
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Run `f` on `len` floats of this thread's scratch memory, kept from call to call (its
/// contents are whatever the last user left), or on a fresh buffer when the scratch is in use
/// further up this thread's stack (a rayon job taken up while waiting inside gemm).
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < len {
                buf.resize(len, 0.0);
            }
            f(&mut buf[..len])
        }
        Err(_) => f(&mut vec![0f32; len]),
    })
}

/// The first `len` floats of `buf`, leaving the rest in `buf`.
fn take<'a>(buf: &mut &'a mut [f32], len: usize) -> &'a mut [f32] {
    let (head, tail) = std::mem::take(buf).split_at_mut(len);
    *buf = tail;
    head
}

/// Copy `rows x len` blocks of `nb` images (image `b`'s at `src[b * stride + off..]`, rows
/// `len` apart) side by side into `dst`, `[rows, nb * len]`.
pub(crate) fn gather(
    src: &[f32],
    stride: usize,
    off: usize,
    rows: usize,
    len: usize,
    dst: &mut [f32],
) {
    let nb = dst.len() / (rows * len).max(1);
    for (b, img) in (0..nb).map(|b| &src[b * stride + off..][..rows * len]).enumerate() {
        for (r, s) in img.chunks_exact(len).enumerate() {
            copy_row(&mut dst[r * nb * len + b * len..][..len], s);
        }
    }
}

/// The inverse of [`gather`]: `src`, `[rows, nb * len]`, back to the images in `dst`.
fn scatter(src: &[f32], rows: usize, len: usize, dst: &mut [f32], stride: usize, off: usize) {
    let nb = src.len() / (rows * len).max(1);
    for b in 0..nb {
        let img = &mut dst[b * stride + off..][..rows * len];
        for (r, d) in img.chunks_exact_mut(len).enumerate() {
            copy_row(d, &src[r * nb * len + b * len..]);
        }
    }
}

/// Working memory for unrolling images of one geometry: zero-bordered padded planes and the
/// im2col matrix of up to `images` images side by side.
struct Unroll<'a> {
    g: ConvGeometry,
    pad: &'a mut [f32],
    col: &'a mut [f32],
}

impl<'a> Unroll<'a> {
    fn len(g: &ConvGeometry, images: usize) -> usize {
        match (g.pointwise(), images) {
            (true, 1) => 0,
            (true, _) => g.k() * images * g.oh * g.ow,
            (false, _) => Padded::of(g).len(g) + g.k() * images * g.oh * g.ow,
        }
    }

    /// Carved from `buf`; zeroes the padded planes (their border stays zero from then on).
    fn new(g: &ConvGeometry, images: usize, buf: &mut &'a mut [f32]) -> Self {
        let pad = take(buf, if g.pointwise() { 0 } else { Padded::of(g).len(g) });
        pad.fill(0.0);
        let col = take(buf, Self::len(g, images) - pad.len());
        Unroll { g: *g, pad, col }
    }

    /// The im2col matrix, `[C/groups * KH * KW, nb * OH * OW]`, of one group of `nb` images
    /// (image `b`'s group is `x(b)`), side by side.
    fn cols<'b>(&'b mut self, nb: usize, x: impl Fn(usize) -> &'b [f32]) -> &'b [f32] {
        let (g, ohw) = (self.g, self.g.oh * self.g.ow);
        let ld = nb * ohw;
        if g.pointwise() {
            if nb == 1 {
                return x(0);
            }
            for b in 0..nb {
                for (r, s) in x(b).chunks_exact(ohw).enumerate() {
                    copy_row(&mut self.col[r * ld + b * ohw..][..ohw], s);
                }
            }
        } else {
            for b in 0..nb {
                pad_planes(x(b), &g, self.pad);
                im2col_padded(self.pad, &g, &mut self.col[..g.k() * ld][b * ohw..], ld);
            }
        }
        &self.col[..g.k() * ld]
    }
}

impl ConvGeometry {
    /// At stride 1 the input gradient is itself a convolution, of the output gradient with
    /// the kernel flipped and its in/out channels swapped, padded by the kernel's span less
    /// the forward padding: its geometry, when the padding is no wider than the span.
    fn input_grad_geometry(&self) -> Option<ConvGeometry> {
        if self.p.stride != (1, 1) {
            return None;
        }
        let (sh, sw) = (self.p.dilation.0 * (self.kh - 1), self.p.dilation.1 * (self.kw - 1));
        let [t, l, b, r] = self.p.pads;
        let pads = [sh.checked_sub(t)?, sw.checked_sub(l)?, sh.checked_sub(b)?, sw.checked_sub(r)?];
        let p = Conv2dParams { pads, ..self.p };
        let gt = ConvGeometry::new(
            &[self.n, self.o, self.oh, self.ow],
            &[self.c, self.og(), self.kh, self.kw],
            p,
        )
        .ok()?;
        (gt.oh == self.h && gt.ow == self.w).then_some(gt)
    }
}

/// `w` (`[O, C/groups, KH, KW]`) as the kernel of the input-gradient convolution,
/// `[C, O/groups, KH, KW]`: channels swapped within each group, taps reversed.
fn flip_kernel(w: &[f32], g: &ConvGeometry) -> Vec<f32> {
    let (cg, og, taps) = (g.cg(), g.og(), g.kh * g.kw);
    let mut out = vec![0f32; w.len()];
    // On all cores: once per training step per layer, 0.6% of the step on one core.
    out.par_chunks_mut(og * taps).enumerate().for_each(|(row, dst)| {
        let (grp, ci) = (row / cg, row % cg);
        for (oj, dst) in dst.chunks_exact_mut(taps).enumerate() {
            let src = &w[((grp * og + oj) * cg + ci) * taps..][..taps];
            for (d, s) in dst.iter_mut().zip(src.iter().rev()) {
                *d = *s;
            }
        }
    });
    out
}

/// `out = a @ b` for the `nb` images side by side in `b`'s columns, written to the images in
/// `dst` (image `i`'s rows at `dst[i * stride + off..]`), through `tmp` when `nb > 1`. With
/// `bias`, each output row starts from its bias.
#[allow(clippy::too_many_arguments)]
fn matmul_into_images(
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

fn check_forward(x: &[f32], w: &[f32], bias: Option<&[f32]>, g: &ConvGeometry) {
    assert_eq!(x.len(), g.n * g.c * g.h * g.w, "conv input length");
    assert_eq!(w.len(), g.o * g.k(), "conv weight length");
    assert!(bias.is_none_or(|b| b.len() == g.o), "conv bias length");
}

/// [`forward_fused`] through Winograd F(2x2, 3x3), a few images per task.
#[cfg(target_arch = "x86_64")]
fn forward_winograd(x: &[f32], wg: &winograd::Winograd, g: &ConvGeometry, relu: bool) -> Vec<f32> {
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
fn forward_direct(x: &[f32], d: &DirectConv, g: &ConvGeometry, relu: bool) -> Vec<f32> {
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
fn forward_im2col(
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

/// Gradients of a convolution's inputs given the gradient `dy` of its output.
#[derive(Debug, Clone)]
pub struct ConvGrads {
    /// `[N, C, H, W]`, when asked for.
    pub dx: Option<Vec<f32>>,
    /// `[O, C/groups, KH, KW]`.
    pub dw: Vec<f32>,
    /// `[O]`, when asked for.
    pub db: Option<Vec<f32>>,
}

/// How the input gradient is computed.
enum InputGrad {
    /// Not asked for.
    Skip,
    /// `W^T @ dY`, a 1x1 kernel at stride 1 without padding.
    Pointwise,
    /// A stride-1 convolution of `dY` ([`ConvGeometry::input_grad_geometry`]) with the
    /// flipped kernel.
    Flipped(ConvGeometry, Vec<f32>),
    /// That convolution through the direct kernel, image by image.
    Direct(DirectConv),
    /// That convolution through Winograd, a few images at a time.
    #[cfg(target_arch = "x86_64")]
    Winograd(winograd::Winograd),
    /// `col2im(W^T @ dY)`.
    Col2im,
}

/// The input gradient (if `need_dx`), the weight gradient and the bias gradient (if
/// `need_db`) of [`forward`] at `x`, `w` for output gradient `dy`, in one pass over the batch.
pub fn backward(
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    g: &ConvGeometry,
    need_dx: bool,
    need_db: bool,
) -> ConvGrads {
    let (cg, og, k, hw, ohw) = (g.cg(), g.og(), g.k(), g.h * g.w, g.oh * g.ow);
    let (chw, ohw_all) = (g.c * hw, g.o * ohw);
    assert_eq!(x.len(), g.n * chw, "conv input length");
    assert_eq!(w.len(), g.o * k, "conv weight length");
    assert_eq!(dy.len(), g.n * ohw_all, "conv output gradient length");
    let sp = Split::of(g);
    let (par, pg) = (sp.gemm_par(), sp.per_gemm);
    let plan = match g.input_grad_geometry() {
        _ if !need_dx => InputGrad::Skip,
        _ if g.pointwise() => InputGrad::Pointwise,
        Some(gt) => {
            let wf = flip_kernel(w, g);
            match ConvPlan::new(&wf, None, &gt) {
                #[cfg(target_arch = "x86_64")]
                ConvPlan::Winograd(wg) => InputGrad::Winograd(wg),
                ConvPlan::Direct(d) => InputGrad::Direct(d),
                ConvPlan::Im2col => InputGrad::Flipped(gt, wf),
            }
        }
        None => InputGrad::Col2im,
    };
    // The weight gradient through Winograd wherever the forward runs it.
    #[cfg(target_arch = "x86_64")]
    let wgrad = winograd::Winograd::for_weight_grad(g);
    #[cfg(target_arch = "x86_64")]
    let fast_dw = wgrad.is_some();
    #[cfg(not(target_arch = "x86_64"))]
    let fast_dw = false;
    let pd = Padded::of(g);
    let many = |len: usize| if pg > 1 { len * pg } else { 0 };
    // The im2col of `x` serves only the gemm weight gradient.
    let scratch = if fast_dw { 0 } else { Unroll::len(g, pg) }
        + many(og * ohw)
        + match &plan {
            InputGrad::Skip => 0,
            InputGrad::Direct(d) => d.scratch_len(),
            #[cfg(target_arch = "x86_64")]
            InputGrad::Winograd(wg) => wg.scratch_len(),
            InputGrad::Pointwise => many(cg * ohw),
            InputGrad::Flipped(gt, _) => Unroll::len(gt, pg) + many(cg * hw),
            InputGrad::Col2im => k * pg * ohw + pd.len(g),
        };
    #[cfg(target_arch = "x86_64")]
    let scratch = scratch + wgrad.as_ref().map_or(0, |w| w.scratch_len());
    #[cfg(target_arch = "x86_64")]
    let dw_len = wgrad.as_ref().map_or(g.o * k, |w| w.kernel_grad_len());
    #[cfg(not(target_arch = "x86_64"))]
    let dw_len = g.o * k;
    let mut dx = if need_dx { zeroed(g.n * chw) } else { Vec::new() };
    let dx_parts: Vec<Option<&mut [f32]>> = if need_dx && chw > 0 {
        dx.chunks_mut(sp.per_chunk * chw).map(Some).collect()
    } else {
        (0..sp.chunks).map(|_| None).collect()
    };
    // Each chunk's partial weight and bias gradients, in chunk order.
    let partials: Vec<(Vec<f32>, Vec<f32>)> = dx_parts
        .into_par_iter()
        .enumerate()
        .map(|(ci, mut dxc)| {
            let first = ci * sp.per_chunk;
            let images = sp.per_chunk.min(g.n - first);
            let (xc, dyc) = (&x[first * chw..], &dy[first * ohw_all..]);
            // With Winograd, the chunk's transformed-kernel gradient, finished once below.
            let mut dw = vec![0f32; dw_len];
            let mut db = vec![0f32; if need_db { g.o } else { 0 }];
            with_scratch(scratch, |mut buf| {
                let mut ux = (!fast_dw).then(|| Unroll::new(g, pg, &mut buf));
                let dybuf = take(&mut buf, many(og * ohw));
                let mut udy = match &plan {
                    InputGrad::Flipped(gt, _) => Some(Unroll::new(gt, pg, &mut buf)),
                    _ => None,
                };
                let dcol =
                    take(&mut buf, if let InputGrad::Col2im = plan { k * pg * ohw } else { 0 });
                let dxpad =
                    take(&mut buf, if let InputGrad::Col2im = plan { pd.len(g) } else { 0 });
                let mut direct = match &plan {
                    InputGrad::Direct(d) => {
                        let dbuf = take(&mut buf, d.scratch_len());
                        d.clear(dbuf);
                        Some((d, dbuf))
                    }
                    _ => None,
                };
                #[cfg(target_arch = "x86_64")]
                let mut winograd = match &plan {
                    InputGrad::Winograd(wg) => {
                        let wbuf = take(&mut buf, wg.scratch_len());
                        wg.clear(wbuf);
                        Some((wg, wbuf))
                    }
                    _ => None,
                };
                #[cfg(target_arch = "x86_64")]
                let mut wgrad = wgrad.as_ref().map(|wg| {
                    let wbuf = take(&mut buf, wg.scratch_len());
                    wg.clear(wbuf);
                    (wg, wbuf)
                });
                let tmp = buf;
                for (s, nb) in sp.gemms(images) {
                    let ld = nb * ohw;
                    if let (Some((d, dbuf)), Some(dxc)) = (&mut direct, dxc.as_deref_mut()) {
                        for b in s..s + nb {
                            let dyb = &dyc[b * ohw_all..][..ohw_all];
                            d.image(dyb, &mut dxc[b * chw..][..chw], false, dbuf);
                        }
                    }
                    #[cfg(target_arch = "x86_64")]
                    if let (Some((wg, wbuf)), Some(dxc)) = (&mut winograd, dxc.as_deref_mut()) {
                        let per = wg.images_per_run();
                        for r in (s..s + nb).step_by(per) {
                            let e = (r + per).min(s + nb);
                            let dx_run = &mut dxc[r * chw..e * chw];
                            wg.run(&dyc[r * ohw_all..e * ohw_all], dx_run, false, wbuf);
                        }
                    }
                    for grp in 0..g.p.groups {
                        let dyg = if ux.is_none() {
                            // Neither the Winograd weight gradient nor a stride-1 input
                            // gradient reads it.
                            MatRef::new(&[], 0, 0)
                        } else if nb == 1 {
                            MatRef::new(&dyc[s * ohw_all + grp * og * ohw..][..og * ohw], og, ohw)
                        } else {
                            let d = &mut dybuf[..og * ld];
                            gather(&dyc[s * ohw_all..], ohw_all, grp * og * ohw, og, ohw, d);
                            MatRef::new(d, og, ld)
                        };
                        if let Some(ux) = ux.as_mut() {
                            // dW_g += dY_g @ col^T
                            let xb = |b: usize| &xc[(s + b) * chw + grp * cg * hw..][..cg * hw];
                            let cols = ux.cols(nb, xb);
                            let dwg = &mut dw[grp * og * k..][..og * k];
                            matmul(dwg, dyg, MatRef::new(cols, k, ld).t(), true, par);
                        }
                        if need_db {
                            for b in s..s + nb {
                                let dyb = &dyc[b * ohw_all + grp * og * ohw..][..og * ohw];
                                let dbg = &mut db[grp * og..][..og];
                                for (acc, row) in dbg.iter_mut().zip(dyb.chunks(ohw)) {
                                    *acc += sum(row);
                                }
                            }
                        }
                        let Some(dxc) = dxc.as_deref_mut() else { continue };
                        let wt = MatRef::new(&w[grp * og * k..][..og * k], og, k).t();
                        let (dxs, off) = (&mut dxc[s * chw..], grp * cg * hw);
                        match &plan {
                            InputGrad::Skip | InputGrad::Direct(_) => {}
                            #[cfg(target_arch = "x86_64")]
                            InputGrad::Winograd(_) => {}
                            InputGrad::Pointwise => {
                                matmul_into_images(wt, dyg, nb, None, dxs, chw, off, tmp, par)
                            }
                            InputGrad::Flipped(gt, wf) => {
                                let kt = gt.k();
                                let wf = MatRef::new(&wf[grp * cg * kt..][..cg * kt], cg, kt);
                                let udy = udy.as_mut().unwrap();
                                let dyb = |b: usize| {
                                    &dyc[(s + b) * ohw_all + grp * og * ohw..][..og * ohw]
                                };
                                let cols = MatRef::new(udy.cols(nb, dyb), kt, nb * hw);
                                matmul_into_images(wf, cols, nb, None, dxs, chw, off, tmp, par);
                            }
                            InputGrad::Col2im => {
                                let dcol = &mut dcol[..k * ld];
                                matmul(dcol, wt, dyg, false, par);
                                for b in 0..nb {
                                    dxpad.fill(0.0);
                                    col2im_padded(&dcol[b * ohw..], g, dxpad, ld);
                                    unpad_add(dxpad, g, &mut dxs[b * chw + off..][..cg * hw]);
                                }
                            }
                        }
                    }
                }
                #[cfg(target_arch = "x86_64")]
                if let Some((wg, wbuf)) = wgrad.as_mut() {
                    let per = wg.images_per_run();
                    for r in (0..images).step_by(per) {
                        let e = (r + per).min(images);
                        let (xr, dyr) = (&xc[r * chw..e * chw], &dyc[r * ohw_all..e * ohw_all]);
                        wg.weight_grad_run(xr, dyr, &mut dw, wbuf);
                    }
                }
            });
            (dw, db)
        })
        .collect();
    let (dw, db) = reduce_in_order(partials, dw_len, if need_db { g.o } else { 0 });
    #[cfg(target_arch = "x86_64")]
    let dw = match &wgrad {
        Some(wg) => {
            let mut out = vec![0f32; g.o * k];
            wg.weight_grad_finish(&dw, &mut out);
            out
        }
        None => dw,
    };
    ConvGrads { dx: need_dx.then_some(dx), dw, db: need_db.then_some(db) }
}

/// Element-wise sums of the partials, each element summed in the partials' order (zeros of
/// the given lengths when there are none).
fn reduce_in_order(
    mut partials: Vec<(Vec<f32>, Vec<f32>)>,
    dw_len: usize,
    db_len: usize,
) -> (Vec<f32>, Vec<f32>) {
    if partials.is_empty() {
        return (vec![0f32; dw_len], vec![0f32; db_len]);
    }
    let rest = partials.split_off(1);
    let (mut dw, mut db) = partials.pop().unwrap();
    const BLOCK: usize = 1 << 14;
    dw.par_chunks_mut(BLOCK).enumerate().for_each(|(bi, out)| {
        for (p, _) in &rest {
            for (o, v) in out.iter_mut().zip(&p[bi * BLOCK..]) {
                *o += *v;
            }
        }
    });
    for (_, p) in &rest {
        for (o, v) in db.iter_mut().zip(p) {
            *o += *v;
        }
    }
    (dw, db)
}

/// [`forward`] and [`backward`] as a candle op over `(x, w)` or `(x, w, bias)`.
#[derive(Clone, Copy, Debug)]
struct ConvOp(Conv2dParams);

/// The f32 data of a contiguous candle operand (the custom ops here take no other).
pub(crate) fn cpu_slice<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("a custom op's operand is not contiguous"),
    }
}

impl ConvOp {
    fn geometry(&self, x: &[usize], w: &[usize]) -> candle_core::Result<ConvGeometry> {
        ConvGeometry::new(x, w, self.0).map_err(candle_core::Error::Msg)
    }

    fn fwd(
        &self,
        (x, lx): (&CpuStorage, &Layout),
        (w, lw): (&CpuStorage, &Layout),
        bias: Option<(&CpuStorage, &Layout)>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.geometry(lx.dims(), lw.dims())?;
        let bias = bias.map(|(b, lb)| cpu_slice(b, lb)).transpose()?;
        if bias.is_some_and(|b| b.len() != g.o) {
            candle_core::bail!("conv: bias does not hold {} values", g.o);
        }
        let y = forward(cpu_slice(x, lx)?, cpu_slice(w, lw)?, bias, &g);
        Ok((CpuStorage::F32(y), Shape::from(g.out_dims().to_vec())))
    }

    #[allow(clippy::type_complexity)]
    fn grads(
        &self,
        x: &Tensor,
        w: &Tensor,
        with_bias: bool,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Tensor, Option<Tensor>)> {
        let g = self.geometry(x.dims(), w.dims())?;
        let grad = grad.contiguous()?;
        // The data fed to the network needs no gradient: skip the input gradient when nothing
        // upstream is trainable.
        let need_dx = x.track_op();
        let r = {
            let (xs, xl) = x.storage_and_layout();
            let (ws, wl) = w.storage_and_layout();
            let (gs, gl) = grad.storage_and_layout();
            let (Storage::Cpu(xs), Storage::Cpu(ws), Storage::Cpu(gs)) = (&*xs, &*ws, &*gs) else {
                candle_core::bail!("conv: only the CPU is supported");
            };
            backward(
                cpu_slice(xs, xl)?,
                cpu_slice(ws, wl)?,
                cpu_slice(gs, gl)?,
                &g,
                need_dx,
                with_bias,
            )
        };
        let dx = r.dx.map(|d| Tensor::from_vec(d, x.shape(), x.device())).transpose()?;
        let dw = Tensor::from_vec(r.dw, w.shape(), w.device())?;
        let db = r.db.map(|d| Tensor::from_vec(d, g.o, w.device())).transpose()?;
        Ok((dx, dw, db))
    }
}

impl CustomOp2 for ConvOp {
    fn name(&self) -> &'static str {
        "im2col-conv2d"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.fwd((x, lx), (w, lw), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = self.grads(x, w, false, grad)?;
        Ok((dx, Some(dw)))
    }
}

impl CustomOp3 for ConvOp {
    fn name(&self) -> &'static str {
        "im2col-conv2d-bias"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
        b: &CpuStorage,
        lb: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.fwd((x, lx), (w, lw), Some((b, lb)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = self.grads(x, w, true, grad)?;
        Ok((dx, Some(dw), db))
    }
}

/// The 2-D convolution of `x` (`[N, C, H, W]`, f32, CPU) with `w` plus `b`, differentiable
/// in candle: its backward is [`backward`].
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    p: Conv2dParams,
) -> candle_core::Result<Tensor> {
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    match b {
        Some(b) => x.apply_op3(&w, &b.flatten_all()?.contiguous()?, ConvOp(p)),
        None => x.apply_op2(&w, ConvOp(p)),
    }
}

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

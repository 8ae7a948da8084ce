//! Zero-padded planes and im2col / col2im: the unrolled matrices the gemm paths multiply.

use super::*;

/// Sizes of a group's zero-padded input planes, `[C/groups, H + pads, W + pads]`.
#[derive(Clone, Copy, Debug)]
pub(super) struct Padded {
    pub(super) hp: usize,
    pub(super) wp: usize,
}

impl Padded {
    pub(super) fn of(g: &ConvGeometry) -> Self {
        Padded { hp: g.h + g.p.pads[0] + g.p.pads[2], wp: g.w + g.p.pads[1] + g.p.pads[3] }
    }
    pub(super) fn plane(&self) -> usize {
        self.hp * self.wp
    }
    pub(super) fn len(&self, g: &ConvGeometry) -> usize {
        g.cg() * self.plane()
    }
}

/// Copy `src` (at least `dst.len()` long) into `dst` without calling `memcpy`: the rows here are
/// 4 to 32 floats, where the call cost more than the copy. Straight-line overlapping 8- and
/// 4-float blocks, as `memcpy` itself does for short copies.
#[inline(always)]
pub(super) fn copy_row(dst: &mut [f32], src: &[f32]) {
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
pub(super) fn add_row(dst: &mut [f32], src: &[f32]) {
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

built_for! {
    ["avx2"]
    /// [`pad_planes_body`], built for AVX2 where the CPU has it (wider moves for its short rows).
    pub(super) fn pad_planes(x: &[f32], g: &ConvGeometry, pad: &mut [f32]) {
        pad_planes_body(x, g, pad)
    }
}

/// Copy one group of one image, `[C/groups, H, W]`, into the interior of `pad`
/// ([`Padded`] planes). The border is left as it is: zero, once the buffer was zeroed.
#[inline(always)]
pub(super) fn pad_planes_body(x: &[f32], g: &ConvGeometry, pad: &mut [f32]) {
    let (h, w) = (g.h, g.w);
    let pd = Padded::of(g);
    assert!(x.len() == g.cg() * h * w && pad.len() == pd.len(g));
    for (src, dst) in x.chunks_exact(h * w).zip(pad.chunks_exact_mut(pd.plane())) {
        for (s, d) in src.chunks_exact(w).zip(dst[g.p.pads[0] * pd.wp..].chunks_mut(pd.wp)) {
            copy_row(&mut d[g.p.pads[1]..g.p.pads[1] + w], s);
        }
    }
}

built_for! {
    ["avx2"]
    /// [`im2col_padded_body`], built for AVX2 where the CPU has it (wider moves, short rows).
    pub(super) fn im2col_padded(pad: &[f32], g: &ConvGeometry, col: &mut [f32], ld: usize) {
        im2col_padded_body(pad, g, col, ld)
    }
}

/// [`im2col`] from planes already padded ([`pad_planes`]): no bounds to test, one short copy
/// (stride 1) or gather (otherwise) per output row. Row `r` of the matrix is
/// `col[r * ld..r * ld + OH * OW]`, so that several images can sit side by side.
#[inline(always)]
pub(super) fn im2col_padded_body(pad: &[f32], g: &ConvGeometry, col: &mut [f32], ld: usize) {
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

built_for! {
    ["avx2"]
    /// [`col2im_padded_body`], built for AVX2 where the CPU has it (wider moves, short rows).
    pub(super) fn col2im_padded(col: &[f32], g: &ConvGeometry, pad: &mut [f32], ld: usize) {
        col2im_padded_body(col, g, pad, ld)
    }
}

/// The adjoint of [`im2col_padded`]: adds `col` (rows `ld` apart) onto the padded planes.
#[inline(always)]
pub(super) fn col2im_padded_body(col: &[f32], g: &ConvGeometry, pad: &mut [f32], ld: usize) {
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
pub(super) fn unpad_add(pad: &[f32], g: &ConvGeometry, x: &mut [f32]) {
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

/// Working memory for unrolling images of one geometry: zero-bordered padded planes and the
/// im2col matrix of up to `images` images side by side.
pub(super) struct Unroll<'a> {
    pub(super) g: ConvGeometry,
    pub(super) pad: &'a mut [f32],
    pub(super) col: &'a mut [f32],
}

impl<'a> Unroll<'a> {
    pub(super) fn len(g: &ConvGeometry, images: usize) -> usize {
        match (g.pointwise(), images) {
            (true, 1) => 0,
            (true, _) => g.k() * images * g.oh * g.ow,
            (false, _) => Padded::of(g).len(g) + g.k() * images * g.oh * g.ow,
        }
    }

    /// Carved from `buf`; zeroes the padded planes (their border stays zero from then on).
    pub(super) fn new(g: &ConvGeometry, images: usize, buf: &mut &'a mut [f32]) -> Self {
        let pad = take(buf, if g.pointwise() { 0 } else { Padded::of(g).len(g) });
        pad.fill(0.0);
        let col = take(buf, Self::len(g, images) - pad.len());
        Unroll { g: *g, pad, col }
    }

    /// The im2col matrix, `[C/groups * KH * KW, nb * OH * OW]`, of one group of `nb` images
    /// (image `b`'s group is `x(b)`), side by side.
    pub(super) fn cols<'b>(&'b mut self, nb: usize, x: impl Fn(usize) -> &'b [f32]) -> &'b [f32] {
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

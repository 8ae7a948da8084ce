//! A convolution's attributes and every size that follows from them, checked once.

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
    pub(super) fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.p.stride == (1, 1) && self.p.pads == [0; 4]
    }
}

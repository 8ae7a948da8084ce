//! Strided matrices, the gemm call every path ends in, and a fixed-order sum.

use super::*;

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
    pub(super) fn in_bounds(&self) -> bool {
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
        ::gemm::gemm(
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

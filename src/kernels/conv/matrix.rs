//! Strided matrices, the gemm call every path ends in, and a fixed-order sum.

use super::*;

/// The element types the gemm calls take: f32 for the kernels, f64 for the least-squares solve.
pub trait GemmScalar: Copy + Send + Sync + 'static {
    const ZERO: Self;
    const ONE: Self;
    const MINUS_ONE: Self;
}

impl GemmScalar for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const MINUS_ONE: Self = -1.0;
}

impl GemmScalar for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const MINUS_ONE: Self = -1.0;
}

/// A strided read-only matrix: element `(i, j)` is `data[i * rs + j * cs]`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a, T = f32> {
    pub data: &'a [T],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a, T> MatRef<'a, T> {
    /// A contiguous row-major `rows x cols` matrix.
    pub fn new(data: &'a [T], rows: usize, cols: usize) -> Self {
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
pub fn matmul<T: GemmScalar>(
    dst: &mut [T],
    a: MatRef<T>,
    b: MatRef<T>,
    accumulate: bool,
    par: Parallelism,
) {
    let (m, n) = (a.rows, b.cols);
    assert_eq!(dst.len(), m * n, "matmul destination is not {m}x{n}");
    let alpha = if accumulate { T::ONE } else { T::ZERO };
    gemm_into(dst, n, a, b, accumulate, alpha, T::ONE, par);
}

/// `dst = a @ b` where `dst` is `[a.rows, b.cols]` at row stride `ld`: products written
/// straight into a larger buffer's rows (Winograd's, on CPUs without AVX-512).
pub fn matmul_strided(dst: &mut [f32], ld: usize, a: MatRef, b: MatRef, par: Parallelism) {
    gemm_into(dst, ld, a, b, false, 0.0, 1.0, par);
}

/// `dst -= a @ b` where `dst` is `[a.rows, b.cols]` at row stride `ld` (a block of a larger
/// row-major matrix): the blocked Cholesky's updates.
pub fn matmul_sub<T: GemmScalar>(
    dst: &mut [T],
    ld: usize,
    a: MatRef<T>,
    b: MatRef<T>,
    par: Parallelism,
) {
    gemm_into(dst, ld, a, b, true, T::ONE, T::MINUS_ONE, par);
}

/// `dst = alpha * dst + beta * a @ b` (`dst` read only when `read_dst`), `dst` row-major at
/// row stride `ld`.
#[allow(clippy::too_many_arguments)]
fn gemm_into<T: GemmScalar>(
    dst: &mut [T],
    ld: usize,
    a: MatRef<T>,
    b: MatRef<T>,
    read_dst: bool,
    alpha: T,
    beta: T,
    par: Parallelism,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "matmul of {m}x{k} by {}x{n}", b.rows);
    assert!(ld >= n, "matmul destination stride {ld} is below its {n} columns");
    assert!(
        m == 0 || n == 0 || (m - 1) * ld + n <= dst.len(),
        "matmul destination does not hold {m}x{n} at stride {ld}"
    );
    assert!(a.in_bounds() && b.in_bounds(), "matmul operand strides run past its data");
    assert!(
        [a.rs, a.cs, b.rs, b.cs, ld].iter().all(|&s| s <= isize::MAX as usize),
        "matmul strides overflow"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !read_dst {
            for row in dst.chunks_mut(ld).take(m) {
                row[..n].fill(T::ZERO);
            }
        }
        return;
    }
    // SAFETY: `dst` holds every element `i * ld + j` (i < m, j < n), checked above, `a` and
    // `b` were checked to address only elements inside their slices, and `dst` (borrowed
    // mutably) cannot alias them. With `read_dst == false` gemm writes `dst` without reading
    // it, so its previous contents need no initialisation invariant.
    unsafe {
        ::gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            ld as isize,
            read_dst,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            alpha,
            beta,
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

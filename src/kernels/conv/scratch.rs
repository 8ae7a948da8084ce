//! How a batch is cut into chunks and gemms (a function of the shapes only, so sums have a
//! fixed order), per-thread scratch memory, and gathering images side by side.

use super::*;

/// Floats a task of [`zeroed`] fills.
pub(super) const ZERO_TASK: usize = 1 << 16;

/// `len` zeros, written by every core: a fresh activation or gradient is a few megabytes, and
/// zeroing it on one core was 6% of a training step (perf, `memset`).
pub(crate) fn zeroed(len: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(len);
    v.par_extend(rayon::iter::repeat_n(0f32, len).with_min_len(ZERO_TASK));
    v
}

/// Most chunks the batch is cut into.
pub(super) const MAX_CHUNKS: usize = 16;
/// Fewest chunks wanted when small images are batched into wider gemms instead.
pub(super) const MIN_CHUNKS: usize = 8;
/// Output positions a gemm should span at least: images smaller than this go several to a
/// gemm, side by side (at 4x4, one image alone left gemm's widest kernel idle).
pub(super) const GEMM_COLUMNS: usize = 256;
/// Most floats the per-chunk partial weight gradients may hold together.
pub(super) const MAX_PARTIAL_FLOATS: usize = 1 << 24;

/// How the batch is cut: into chunks (the parallel tasks, and the weight gradient's partial
/// sums), each into gemms of a few images. A function of the shapes only, never of the
/// thread count, so that the weight gradient's summation order is fixed.
#[derive(Clone, Copy, Debug)]
pub(super) struct Split {
    pub(super) per_chunk: usize,
    pub(super) per_gemm: usize,
    pub(super) chunks: usize,
}

impl Split {
    pub(super) fn of(g: &ConvGeometry) -> Self {
        let n = g.n.max(1);
        let want = GEMM_COLUMNS.div_ceil((g.oh * g.ow).max(1));
        let by_memory = (MAX_PARTIAL_FLOATS / (g.o * g.k()).max(1)).max(1);
        let per_chunk =
            n.div_ceil(MAX_CHUNKS).max(want.min(n.div_ceil(MIN_CHUNKS))).max(n.div_ceil(by_memory));
        Split { per_chunk, per_gemm: want.min(per_chunk), chunks: n.div_ceil(per_chunk) }
    }

    /// gemm's own threads when the batch gives no parallelism (one chunk), none otherwise:
    /// the chunks already run in parallel.
    pub(super) fn gemm_par(&self) -> Parallelism {
        if self.chunks <= 1 {
            Parallelism::Rayon(0)
        } else {
            Parallelism::None
        }
    }

    /// The gemms of a chunk of `images`: (first image, images).
    pub(super) fn gemms(&self, images: usize) -> impl Iterator<Item = (usize, usize)> {
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
pub(super) fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
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
pub(super) fn take<'a>(buf: &mut &'a mut [f32], len: usize) -> &'a mut [f32] {
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
pub(super) fn scatter(
    src: &[f32],
    rows: usize,
    len: usize,
    dst: &mut [f32],
    stride: usize,
    off: usize,
) {
    let nb = src.len() / (rows * len).max(1);
    for b in 0..nb {
        let img = &mut dst[b * stride + off..][..rows * len];
        for (r, d) in img.chunks_exact_mut(len).enumerate() {
            copy_row(d, &src[r * nb * len + b * len..]);
        }
    }
}

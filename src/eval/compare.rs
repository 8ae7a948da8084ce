//! Differential testing: run two graphs on the same inputs and measure how far apart they are.

use crate::exec::tract::Runner;
use crate::ir::Model;
use anyhow::Result;
use serde::Serialize;

/// Outputs of a lossless rewrite may differ by float rounding only (BatchNorm folding reorders
/// multiplications). Differences are judged relative to the largest output magnitude.
pub const LOSSLESS_REL_TOLERANCE: f32 = 1e-4;

#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub samples: usize,
    pub max_abs_diff: f32,
    pub max_abs_output: f32,
    /// `max_abs_diff / max(1, max_abs_output)`.
    pub rel_diff: f32,
    /// Fraction of samples whose arg-max agrees.
    pub argmax_agreement: f64,
}

impl Comparison {
    pub fn within(&self, rel_tolerance: f32) -> bool {
        self.rel_diff.is_finite() && self.rel_diff <= rel_tolerance
    }
}

/// Run `a` and `b` on `inputs` (whole samples of `sample` shape) and compare the first outputs.
pub fn compare_models(
    a: &Model,
    b: &Model,
    sample: &[usize],
    inputs: &[f32],
) -> Result<Comparison> {
    Ok(compare_models_on(a, b, sample, &[inputs])?.remove(0))
}

/// Batch size of the comparison runs: small, since the input sets are small.
const COMPARE_BATCH: usize = 16;
/// Input values per comparison batch at most; larger samples run in smaller batches, down to
/// one. Tract's activations at batch 16 on a 224x224 ResNet-50 are tens of megabytes each,
/// which glibc maps and unmaps on every run: its lossless compile took 11.6 s (5.1 s of it in
/// the kernel, clearing pages) at batch 16, 6.9 s at 4 and 6.2 s at 1 (beside a training run).
const COMPARE_BATCH_VALUES: usize = 16 * 3 * 64 * 64;

/// [`compare_models`] on several input sets, preparing each graph once.
pub fn compare_models_on(
    a: &Model,
    b: &Model,
    sample: &[usize],
    input_sets: &[&[f32]],
) -> Result<Vec<Comparison>> {
    // The two graphs are independent: each is optimised and run on its own core (on an
    // ImageNet-shaped ResNet-50 the check is most of a lossless compile).
    let per: usize = sample.iter().product();
    let batch = (COMPARE_BATCH_VALUES / per.max(1)).clamp(1, COMPARE_BATCH);
    let (ra, rb) = rayon::join(|| Runner::new(a, sample, batch), || Runner::new(b, sample, batch));
    let (ra, rb) = (ra?, rb?);
    input_sets.iter().map(|inputs| compare_runs(&ra, &rb, sample, inputs)).collect()
}

fn compare_runs(ra: &Runner, rb: &Runner, sample: &[usize], inputs: &[f32]) -> Result<Comparison> {
    let per: usize = sample.iter().product();
    let samples = inputs.len() / per;
    let batch = ra.batch().min(rb.batch());
    let (mut max_abs_diff, mut max_abs_output, mut agree) = (0f32, 0f32, 0usize);
    for chunk in inputs.chunks(batch * per) {
        let (ya, yb) = rayon::join(|| ra.run(chunk), || rb.run(chunk));
        let ((ya, width), (yb, width_b)) = (ya?, yb?);
        anyhow::ensure!(width == width_b, "output sizes differ: {width} vs {width_b} per sample");
        for (x, y) in ya.iter().zip(&yb) {
            let d = (x - y).abs();
            max_abs_diff = if d.is_nan() { f32::NAN } else { max_abs_diff.max(d) };
            max_abs_output = max_abs_output.max(x.abs());
        }
        for (ra_row, rb_row) in ya.chunks(width).zip(yb.chunks(width)) {
            agree += (argmax(ra_row) == argmax(rb_row)) as usize;
        }
    }
    Ok(Comparison {
        samples,
        max_abs_diff,
        max_abs_output,
        rel_diff: max_abs_diff / max_abs_output.max(1.0),
        argmax_agreement: agree as f64 / samples.max(1) as f64,
    })
}

pub fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &v)| if v > best.1 { (i, v) } else { best })
        .0
}

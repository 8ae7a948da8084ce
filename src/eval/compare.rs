//! Differential testing: run two graphs on the same inputs and measure how far apart they are.

use super::Runner;
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

/// Deterministic pseudo-random inputs in [-3, 3): a splitmix64 stream, so runs are repeatable
/// without a random-number dependency in the library.
pub fn random_inputs(count: usize, seed: u64) -> Vec<f32> {
    let mut state = seed;
    (0..count)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32) * 6.0 - 3.0
        })
        .collect()
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

/// [`compare_models`] on several input sets, preparing each graph once.
pub fn compare_models_on(
    a: &Model,
    b: &Model,
    sample: &[usize],
    input_sets: &[&[f32]],
) -> Result<Vec<Comparison>> {
    let ra = Runner::new(a, sample, COMPARE_BATCH)?;
    let rb = Runner::new(b, sample, COMPARE_BATCH)?;
    input_sets.iter().map(|inputs| compare_runs(&ra, &rb, sample, inputs)).collect()
}

fn compare_runs(ra: &Runner, rb: &Runner, sample: &[usize], inputs: &[f32]) -> Result<Comparison> {
    let per: usize = sample.iter().product();
    let samples = inputs.len() / per;
    let batch = ra.batch().min(rb.batch());
    let (mut max_abs_diff, mut max_abs_output, mut agree) = (0f32, 0f32, 0usize);
    for chunk in inputs.chunks(batch * per) {
        let (ya, width) = ra.run(chunk)?;
        let (yb, width_b) = rb.run(chunk)?;
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

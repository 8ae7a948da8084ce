//! Per-ReLU-layer sensitivity and the budget split it suggests (after SENet, Kundu et al., ICLR
//! 2023, which allocates a ReLU budget across layers by measured sensitivity before learning
//! the masks): a layer's sensitivity is how far the network's output moves from the original's
//! (mean KL divergence on held-out calibration images) when that layer's ReLUs alone become the
//! identity and the graph is refitted as a search candidate is. `linearize --allocation
//! sensitivity` gives each layer a share of the budget in proportion to it.

use crate::eval::data::Dataset;
use crate::eval::evaluator::predict;
use crate::ir::Model;
use crate::passes::{place_lossy, run_pipeline, PassContext, Pipeline, VerifyOptions};
use anyhow::{Context, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// One ReLU layer's measured sensitivity and the ReLUs the split gave it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerShare {
    pub relu: String,
    pub relus: u64,
    /// Mean KL(original || this layer linear, refitted) over the scoring images.
    pub sensitivity: f64,
    pub budget: u64,
}

/// Logits of `model` on `data`, row-major, and the number of classes.
fn logits(model: &Model, data: &Dataset) -> Result<(Vec<f32>, usize)> {
    let runner = crate::eval::Backend::new(model, &data.sample_shape, Default::default())?;
    predict(&runner, data, None)
}

/// Mean KL(p || q) of softmax rows.
fn mean_kl(p_logits: &[f32], q_logits: &[f32], classes: usize) -> f64 {
    let log_softmax = |row: &[f32]| -> Vec<f64> {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
        let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
        row.iter().map(|&v| v as f64 - max - sum.ln()).collect()
    };
    let rows = p_logits.len() / classes.max(1);
    let total: f64 = p_logits
        .chunks(classes)
        .zip(q_logits.chunks(classes))
        .map(|(p, q)| {
            let (lp, lq) = (log_softmax(p), log_softmax(q));
            lp.iter().zip(&lq).map(|(a, b)| a.exp() * (a - b)).sum::<f64>()
        })
        .sum();
    total / rows.max(1) as f64
}

/// The sensitivity of each Relu of `layers` (node names, with their ReLU counts) in `base`,
/// refitted with `ctx` and scored on `data`.
pub fn layer_sensitivity(
    base: &Model,
    ctx: &PassContext,
    data: &Dataset,
    layers: &[(String, u64)],
) -> Result<Vec<f64>> {
    let (original, classes) = logits(base, data)?;
    let refit = Pipeline::parse(&place_lossy(
        crate::passes::AFTER_STRUCTURAL,
        &["recalibrate".to_string()],
    ))?;
    layers
        .par_iter()
        .map(|(relu, _)| {
            let mut m = base.clone();
            crate::passes::bypass_named(&mut m, std::slice::from_ref(relu));
            run_pipeline(&mut m, &refit, ctx, &VerifyOptions::default())
                .with_context(|| format!("refitting with {relu} linear"))?;
            let (variant, _) = logits(&m, data)?;
            Ok(mean_kl(&original, &variant, classes))
        })
        .collect()
}

/// Split `budget` ReLUs over layers of `relus` ReLUs in proportion to `sensitivity`, no layer
/// over its own count (what a full layer cannot take goes to the others, by the same
/// proportions). Shares are floored, so they add up to at most `budget`.
pub fn split_budget(relus: &[u64], sensitivity: &[f64], budget: u64) -> Vec<u64> {
    let n = relus.len();
    let mut share = vec![0u64; n];
    let mut full = vec![false; n];
    let mut left = budget.min(relus.iter().sum()) as f64;
    loop {
        let weight: f64 = (0..n).filter(|&l| !full[l]).map(|l| sensitivity[l].max(0.0)).sum();
        if weight <= 0.0 {
            break;
        }
        // Layers whose proportional share exceeds their size take all of it and leave.
        let over: Vec<usize> = (0..n)
            .filter(|&l| !full[l] && left * sensitivity[l].max(0.0) / weight >= relus[l] as f64)
            .collect();
        if over.is_empty() {
            for l in (0..n).filter(|&l| !full[l]) {
                share[l] = (left * sensitivity[l].max(0.0) / weight).floor() as u64;
            }
            break;
        }
        for l in over {
            full[l] = true;
            share[l] = relus[l];
            left -= relus[l] as f64;
        }
    }
    share
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_is_split_by_sensitivity_and_full_layers_pass_on_the_rest() {
        // Proportional: 1:3 of 400.
        assert_eq!(split_budget(&[1000, 1000], &[1.0, 3.0], 400), vec![100, 300]);
        // Layer 1 would get 750 of 1000 but holds 500: it keeps all 500 and layer 0 the rest.
        assert_eq!(split_budget(&[1000, 500], &[1.0, 3.0], 1000), vec![500, 500]);
        // An insensitive layer gets nothing; a budget over the total fills every layer.
        assert_eq!(split_budget(&[10, 20, 30], &[0.0, 1.0, 1.0], 20), vec![0, 10, 10]);
        assert_eq!(split_budget(&[10, 20], &[1.0, 1.0], 99), vec![10, 20]);
        let shares = split_budget(&[7, 11, 13], &[0.3, 0.5, 0.9], 17);
        assert!(shares.iter().sum::<u64>() <= 17 && shares.iter().sum::<u64>() >= 15);
    }

    #[test]
    fn kl_is_zero_for_equal_rows_and_matches_a_hand_computation() {
        let p = [1.0f32, 2.0, 0.5, 0.5];
        assert!(mean_kl(&p, &p, 2).abs() < 1e-12);
        // Row 1: p = softmax(1, 2), q = softmax(2, 1); row 2: equal, KL 0.
        let q = [2.0f32, 1.0, 0.5, 0.5];
        let (a, b) = (1.0 / (1.0 + 1f64.exp()), 1f64.exp() / (1.0 + 1f64.exp()));
        let want = (a * (a / b).ln() + b * (b / a).ln()) / 2.0;
        assert!((mean_kl(&p, &q, 2) - want).abs() < 1e-9);
    }
}

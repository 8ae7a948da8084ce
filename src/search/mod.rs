//! Searching combinations of lossy passes: the configuration that meets a budget (ReLUs, or
//! estimated PI bytes or latency) with the least accuracy loss, measured on calibration data
//! (training split), never on test data.

pub mod candidates;
pub mod criticality;
pub mod journal;
pub mod objective;
pub mod pareto;
pub mod probe;

use crate::analysis::census::{census, Census};
use crate::analysis::cost::CostModel;
use crate::analysis::stages::{find_stages, residual_adds};
use crate::data::Dataset;
use crate::eval::compare::argmax;
use crate::eval::evaluator::predict;
use crate::ir::Model;
use crate::passes::{
    lossy_pipeline, run_pipeline, PassContext, Pipeline, VerifyOptions, AFTER_STRUCTURAL,
};
use anyhow::Result;
use candidates::{CullSubsets, CHANNEL_THRESHOLDS};
use objective::{Budget, Cost};
use rayon::prelude::*;
use serde::Serialize;
use std::collections::BTreeSet;
use std::sync::Arc;

#[derive(Debug, Clone, Serialize)]
pub struct Candidate {
    /// The lossy passes, as pipeline text (empty: the original).
    pub pipeline: String,
    /// Counted from the candidate's graph.
    pub relus: u64,
    /// Estimated PI bytes per image (the cost model's).
    pub bytes: f64,
    /// Estimated PI seconds per image (the cost model's).
    pub seconds: f64,
    /// Top-1 accuracy on the calibration images; absent when not evaluated.
    pub calibration_accuracy: Option<f64>,
    /// Calibration accuracy after a recovery probe (`--probe-images`), which ranked it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe_accuracy: Option<f64>,
    /// Not scored: this candidate under the budget keeps every ReLU this one keeps, and more.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dominated_by: Option<String>,
}

impl Candidate {
    fn new(pipeline: String, cost: Cost) -> Self {
        Candidate {
            pipeline,
            relus: cost.relus,
            bytes: cost.bytes,
            seconds: cost.seconds,
            calibration_accuracy: None,
            probe_accuracy: None,
            dominated_by: None,
        }
    }

    pub fn cost(&self) -> Cost {
        Cost { relus: self.relus, bytes: self.bytes, seconds: self.seconds }
    }
}

/// Apply `lossy` pipeline text to `base` and count the result's ReLUs. When the context holds
/// the original graph (and `lossy` is not empty), the candidate is recalibrated against it, as
/// `relucompile` would compile it.
pub fn build_candidate(base: &Model, lossy: &str, ctx: &PassContext) -> Result<(Model, u64)> {
    let mut m = base.clone();
    let steps = lossy_pipeline(AFTER_STRUCTURAL, lossy, ctx.reference.is_some())?;
    let pipeline = Pipeline::new(steps)?;
    run_pipeline(&mut m, &pipeline, ctx, &VerifyOptions::default())?;
    let relus = census(&m, &ctx.sample)?.total_relus;
    Ok((m, relus))
}

/// Top-1 accuracy of `model` on `data`.
pub fn accuracy(model: &Model, data: &Dataset) -> Result<f64> {
    let runner = crate::eval::Backend::new(model, &data.sample_shape, Default::default())?;
    let (logits, classes) = predict(&runner, data, None)?;
    let correct = logits
        .chunks(classes.max(1))
        .zip(&data.labels)
        .filter(|(row, &label)| argmax(row) == label as usize)
        .count();
    Ok(correct as f64 / data.len().max(1) as f64)
}

/// Every cull subset combined with each thinning, each also at half resolution and half width
/// where the graph allows them, and with max-pooling replaced when `pooling` (a bytes or
/// latency budget) and the graph has MaxPool.
fn structural_candidates(base: &Model, ctx: &PassContext, pooling: bool) -> Result<Vec<String>> {
    let shapes = crate::analysis::shapes::infer_shapes(base, &ctx.sample, 1)?;
    let stages: Vec<usize> = (0..find_stages(&base.graph, &shapes).count()).collect();
    let residual = !residual_adds(&base.graph, &shapes).is_empty();
    let knobs = candidates::knobs_for(base, &ctx.sample, true, pooling);
    Ok(candidates::structural_configs(&stages, residual, &knobs, CullSubsets::All))
}

/// What a candidate still computes that costs in private inference: its ReLU layers (name
/// and shape) and its pooling.
struct KeptUnits {
    relus: BTreeSet<(String, Vec<usize>)>,
    pools: Vec<(String, u64)>,
}

impl KeptUnits {
    fn of(c: &Census) -> Self {
        KeptUnits {
            relus: c.nodes.iter().map(|n| (n.name.clone(), n.shape.clone())).collect(),
            pools: c.pools.iter().map(|p| (p.name.clone(), p.comparisons)).collect(),
        }
    }

    /// Whether `other` keeps every ReLU layer this keeps, and more, at the same shapes and
    /// with the same pooling: the same network with fewer ReLUs linearised. Only such maximal
    /// candidates are refitted and scored, since each refit costs a minute on one core at
    /// width 64 (a 25% budget fits 204 candidates there). Checked against scoring them all on
    /// the shipped ResNet (1,024 calibration images): at 25% and 10% the 174 and 72 dominated
    /// candidates' best (88.87%, 82.03%) stayed under the maximal one chosen (91.41%, 83.79%),
    /// the same choice in 66 and 37 s instead of 217 and 95 s (beside two one-core training
    /// runs), though 61 and 29 of them scored above the candidate that dominated them: it
    /// prunes, it does not prove.
    fn strictly_within(&self, other: &KeptUnits) -> bool {
        self.pools == other.pools
            && self.relus.len() < other.relus.len()
            && self.relus.is_subset(&other.relus)
    }
}

/// How a budget search scores the candidates that fit.
pub struct BudgetScoring<'a> {
    /// The calibration images candidates are ranked on.
    pub calibration: &'a Dataset,
    /// Ranks the best few again after a short distillation (`--probe-images`).
    pub prober: Option<&'a probe::Prober<'a>>,
    /// Score the candidates another under the budget dominates too (`--score-dominated`):
    /// the pruning is a measured heuristic, not a proof (see [`KeptUnits::strictly_within`]).
    pub score_dominated: bool,
    /// A progress bar on stderr (plain lines when it is not a terminal).
    pub progress: bool,
}

/// The configuration meeting `budget` with the best calibration accuracy (ties: the lower
/// cost). Returns it and every candidate considered.
pub fn best_under_budget(
    base: &Model,
    budget: &Budget,
    cost_model: &CostModel,
    ctx: &PassContext,
    scoring: &BudgetScoring,
) -> Result<(Candidate, Vec<Candidate>)> {
    let BudgetScoring { calibration, prober, score_dominated, progress } = *scoring;
    // Costing needs the structure only; recalibration (which keeps the cost) is paid for the
    // candidates that fit, when they are scored.
    let structure_only = PassContext::new(ctx.sample.clone());
    let pooling = budget.objective.values_pooling();
    let (mut considered, kept): (Vec<Candidate>, Vec<KeptUnits>) =
        structural_candidates(base, ctx, pooling)?
            .into_par_iter()
            .map(|text| {
                let (m, _) = build_candidate(base, &text, &structure_only)?;
                let c = census(&m, &ctx.sample)?;
                Ok((Candidate::new(text, Cost::from_census(&c, cost_model)), KeptUnits::of(&c)))
            })
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .unzip();
    let fits: Vec<usize> =
        (0..considered.len()).filter(|&ix| budget.fits(&considered[ix].cost())).collect();
    if !score_dominated {
        for &ix in &fits {
            let by = fits.iter().find(|&&other| kept[ix].strictly_within(&kept[other]));
            considered[ix].dominated_by = by.map(|&other| considered[other].pipeline.clone());
        }
    }
    let mut fitting: Vec<(usize, Option<Model>)> = fits
        .into_iter()
        .filter(|&ix| considered[ix].dominated_by.is_none())
        .map(|ix| (ix, None))
        .collect();
    if fitting.is_empty() {
        // Culling and thinning alone cannot get there: add channel thinning, from the least
        // lossy structural configuration down.
        let with_images = PassContext {
            calibration: Some(
                ctx.calibration.clone().unwrap_or_else(|| Arc::new(calibration.images.clone())),
            ),
            ..ctx.clone()
        };
        let mut structural: Vec<Candidate> = considered.clone();
        structural.sort_by_key(|c| std::cmp::Reverse(c.relus));
        for c in structural {
            for t in CHANNEL_THRESHOLDS {
                let text = [c.pipeline.as_str(), &format!("channel-thin({t})")]
                    .iter()
                    .filter(|s| !s.is_empty())
                    .copied()
                    .collect::<Vec<_>>()
                    .join(",");
                let (m, _) = build_candidate(base, &text, &with_images)?;
                let cost = Cost::of(&m, &ctx.sample, cost_model)?;
                considered.push(Candidate::new(text, cost));
                if budget.fits(&cost) {
                    fitting.push((considered.len() - 1, Some(m)));
                }
            }
            if fitting.len() >= 8 {
                break;
            }
        }
    }
    if fitting.is_empty() {
        let o = budget.objective;
        let least = considered.iter().map(|c| c.cost().get(o)).fold(f64::INFINITY, f64::min);
        return Err(crate::error::CompileError::new(
            crate::error::ExitCode::Usage,
            format!(
                "no combination of culling, thinning, channel thinning{} meets a budget of {} \
                 (the least reached is {})",
                if pooling { " and max-pool replacement" } else { "" },
                budget.describe(),
                o.show(least),
            ),
        )
        .into());
    }
    let bar = crate::eval::evaluator::counted_progress_bar(
        fitting.len(),
        "budget search",
        "candidates",
        progress,
    );
    let scores: Vec<f64> = fitting
        .par_iter()
        .map(|(ix, built)| {
            let acc = match built {
                Some(m) => accuracy(m, calibration)?,
                None => accuracy(
                    &build_candidate(base, &considered[*ix].pipeline, ctx)?.0,
                    calibration,
                )?,
            };
            bar.inc(1);
            Ok(acc)
        })
        .collect::<Result<_>>()?;
    for ((ix, _), acc) in fitting.iter().zip(scores) {
        considered[*ix].calibration_accuracy = Some(acc);
    }
    bar.finish_and_clear();
    let o = budget.objective;
    let rank = |a: &Candidate, b: &Candidate, key: fn(&Candidate) -> Option<f64>| {
        let (x, y) = (key(a).unwrap_or(0.0), key(b).unwrap_or(0.0));
        x.total_cmp(&y).then(b.cost().get(o).total_cmp(&a.cost().get(o)))
    };
    let mut order: Vec<usize> = fitting.iter().map(|(ix, _)| *ix).collect();
    order.sort_by(|&a, &b| rank(&considered[b], &considered[a], |c| c.calibration_accuracy));
    let mut key: fn(&Candidate) -> Option<f64> = |c| c.calibration_accuracy;
    if let Some(prober) = prober {
        // The most accurate candidates after the refit, ranked again by what a short
        // distillation wins back.
        order.truncate(probe::PROBED_FOR_BUDGET);
        let configs: Vec<String> = order.iter().map(|&i| considered[i].pipeline.clone()).collect();
        for (&i, record) in order.iter().zip(prober.probe(&configs)?) {
            considered[i].probe_accuracy = Some(record.accuracy);
        }
        key = |c| c.probe_accuracy;
    }
    let best = order
        .iter()
        .map(|&ix| &considered[ix])
        .max_by(|a, b| rank(a, b, key))
        .cloned()
        .expect("fitting is not empty");
    Ok((best, considered))
}

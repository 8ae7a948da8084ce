//! ReLU criticality per stage (DeepReDuce): how much accuracy each stage's ReLUs are worth.
//!
//! For every stage s, two variants are measured on calibration data: only s keeps its ReLUs
//! (every other stage culled), and only s loses them. The score is the accuracy the stage's
//! ReLUs add over the all-linear network, per thousand ReLUs; stages are culled in ascending
//! order of score. With a [`Prober`], every variant is scored after a recovery probe (a short
//! distillation) instead of straight after the refit.

use super::probe::Prober;
use super::{accuracy, build_candidate};
use crate::analysis::census::census;
use crate::data::Dataset;
use crate::ir::Model;
use crate::passes::PassContext;
use anyhow::Result;
use rayon::prelude::*;
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct StageCriticality {
    pub stage: usize,
    pub relus: u64,
    /// Accuracy when only this stage keeps its ReLUs.
    pub accuracy_only_this: f64,
    /// Accuracy when only this stage loses its ReLUs.
    pub accuracy_without_this: f64,
    /// (accuracy_only_this - all-linear accuracy) per 1,000 ReLUs.
    pub score: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Criticality {
    pub images: usize,
    /// Training images of each variant's recovery probe (0: scored after the refit).
    pub probe_images: usize,
    pub accuracy_original: f64,
    pub accuracy_all_linear: f64,
    pub stages: Vec<StageCriticality>,
    /// Stages with ReLUs, least critical first: the order to cull them in.
    pub cull_order: Vec<usize>,
    /// How pixels became the inputs, and what states it (the driver fills it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub normalisation: Option<crate::data::Normalisation>,
}

fn cull_text(stages: impl Iterator<Item = usize>) -> String {
    let list: Vec<String> = stages.map(|s| s.to_string()).collect();
    if list.is_empty() {
        String::new()
    } else {
        format!("cull({})", list.join(","))
    }
}

pub fn criticality(
    base: &Model,
    ctx: &PassContext,
    data: &Dataset,
    prober: Option<&Prober>,
) -> Result<Criticality> {
    let c = census(base, &ctx.sample)?;
    let n = c.stages.len();
    let with_relus: Vec<usize> = c.stages.iter().filter(|s| s.relus > 0).map(|s| s.index).collect();
    // Every variant to evaluate: original, all-linear, and two per stage.
    let mut texts = vec![String::new(), cull_text(with_relus.iter().copied())];
    for &s in &with_relus {
        texts.push(cull_text(with_relus.iter().copied().filter(|&t| t != s)));
        texts.push(cull_text(std::iter::once(s)));
    }
    let score = |t: &String| -> Result<f64> { accuracy(&build_candidate(base, t, ctx)?.0, data) };
    let accs: Vec<f64> = match prober {
        // The original needs no recovery; every reduced variant is probed.
        Some(prober) => std::iter::once(score(&texts[0]))
            .chain(prober.probe(&texts[1..])?.into_iter().map(|r| Ok(r.accuracy)))
            .collect::<Result<_>>()?,
        None => texts.par_iter().map(score).collect::<Result<_>>()?,
    };
    let (original, linear) = (accs[0], accs[1]);
    let mut stages = Vec::new();
    for (k, &s) in with_relus.iter().enumerate() {
        let relus = c.stages[s].relus;
        let only = accs[2 + 2 * k];
        stages.push(StageCriticality {
            stage: s,
            relus,
            accuracy_only_this: only,
            accuracy_without_this: accs[3 + 2 * k],
            score: 1000.0 * (only - linear) / relus as f64,
        });
    }
    let mut order: Vec<&StageCriticality> = stages.iter().collect();
    order.sort_by(|a, b| a.score.total_cmp(&b.score).then(a.stage.cmp(&b.stage)));
    let cull_order = order.iter().map(|s| s.stage).collect();
    debug_assert!(stages.len() <= n);
    Ok(Criticality {
        images: data.len(),
        probe_images: prober.map_or(0, |p| p.train.len()),
        accuracy_original: original,
        accuracy_all_linear: linear,
        stages,
        cull_order,
        normalisation: None,
    })
}

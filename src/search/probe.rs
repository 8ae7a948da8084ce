//! Recovery probes: a search ranks the candidates near its frontier by the accuracy a short
//! distillation wins back, not by their accuracy straight after recalibration. Two networks at
//! 60% after the refit can end 2 points apart after training; what a user keeps is the trained
//! network, so that is what the frontier should compare.
//!
//! A probe trains a candidate with the fine-tuner's recipe (one epoch over a few thousand
//! training images, none of them calibration images) and scores it on the calibration images
//! the search scores with. Probes run one after another (each uses every core) and are
//! journaled, so an interrupted search does not pay for them twice.

use super::build_candidate;
use crate::data::Dataset;
use crate::ir::Model;
use crate::passes::PassContext;
use crate::train::{FinetuneOptions, Finetuner};
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

/// A probe's peak learning rate as a fraction of the recipe's (0.02 -> 0.005). Measured on
/// the README's main network (ResNet `cull(1,2),thin(bottom)`, 89.8% on 1,000 test images
/// after the refit): a one-epoch probe over 2,048 images ends at 33.5%, 75.6% or 87.5% with
/// peak lr 0.02, 0.005 or 0.001, since a short one-cycle run spends its steps in the
/// disruptive part of the schedule; over 8,192 images it ends at 87.9% with 0.02 and 90.0%
/// with 0.005 (crops and flips on).
pub const PROBE_LR_FRACTION: f64 = 0.25;

/// How many of the candidates that meet a budget are probed, best calibration accuracy first.
pub const PROBED_FOR_BUDGET: usize = 4;

/// How many Pareto layers of the calibration ranking are probed: the frontier itself and the
/// layer just behind it, where a candidate that recovers better than its neighbours would be.
pub const PROBED_LAYERS: usize = 2;

/// `n` training images for probes, none of them among the `calibration` images drawn from
/// `train` by `seed` (the seeded draw of more images starts with the same ones).
pub fn probe_set(train: &Dataset, calibration: usize, n: usize, seed: u64) -> Dataset {
    let end = (calibration + n).min(train.len());
    train.seeded_subset(calibration + n, seed).subset(calibration.min(end)..end)
}

/// A usage error when probes were asked for (`asked > 0`) but `probes` holds no image.
pub fn ensure_probe_images(
    probes: &Dataset,
    asked: usize,
    calibration: usize,
    data: &str,
) -> Result<()> {
    if asked > 0 && probes.is_empty() {
        return Err(crate::error::CompileError::new(
            crate::error::ExitCode::InvalidData,
            format!(
                "--probe-images {asked}: the training split of {data} has no images left beside \
                 the {calibration} calibration images"
            ),
        )
        .into());
    }
    Ok(())
}

/// The first `layers` Pareto layers of `points` (cost, accuracy): the frontier, then the
/// frontier of what is left, and so on. Indices in increasing order.
pub fn pareto_layers(points: &[(f64, f64)], layers: usize) -> Vec<usize> {
    let mut left: Vec<usize> = (0..points.len()).collect();
    let mut out = Vec::new();
    for _ in 0..layers {
        if left.is_empty() {
            break;
        }
        let sub: Vec<(f64, f64)> = left.iter().map(|&i| points[i]).collect();
        let front: Vec<usize> =
            super::pareto::frontier_indices(&sub).into_iter().map(|k| left[k]).collect();
        left.retain(|i| !front.contains(i));
        out.extend(front);
    }
    out.sort_unstable();
    out
}

/// One probe's result, as journaled.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProbeRecord {
    pub config: String,
    /// Training images the probe distilled on.
    pub images: usize,
    /// Calibration accuracy after the probe (0 when the probe's training diverged).
    pub accuracy: f64,
    /// Why the probe failed, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
}

/// Probes candidates of one search.
pub struct Prober<'a> {
    /// The prepared original the candidates are built from; also the teacher.
    pub base: &'a Model,
    pub ctx: &'a PassContext,
    /// The probes' training images (disjoint from the calibration images).
    pub train: &'a Dataset,
    /// The images the search scores candidates on.
    pub score: &'a Dataset,
    /// The fine-tuning recipe; a probe runs one epoch of it over `train`, at a fraction of
    /// its learning rate.
    pub recipe: FinetuneOptions,
    /// Journal of finished probes (JSON lines), if any.
    pub journal: Option<&'a Path>,
    pub progress: bool,
}

impl Prober<'_> {
    /// The calibration accuracy of each of `configs` after its probe, in order.
    pub fn probe(&self, configs: &[String]) -> Result<Vec<ProbeRecord>> {
        let images = self.train.len();
        let mut done: HashMap<String, ProbeRecord> = HashMap::new();
        let mut file = None;
        if let Some(journal) = self.journal {
            for r in super::journal::read_records::<ProbeRecord>(&[journal]) {
                if r.images == images {
                    done.insert(r.config.clone(), r);
                }
            }
            file = Some(super::journal::open_journal(journal, "probe")?);
        }
        let bar = crate::eval::evaluator::counted_progress_bar(
            configs.len(),
            "recovery probes",
            "candidates",
            self.progress,
        );
        let mut out = Vec::with_capacity(configs.len());
        for config in configs {
            let record = match done.get(config) {
                Some(r) => r.clone(),
                None => {
                    let r = self.probe_one(config)?;
                    if let Some(file) = file.as_mut() {
                        writeln!(file, "{}", serde_json::to_string(&r)?)?;
                        file.flush()?;
                    }
                    r
                }
            };
            bar.inc(1);
            out.push(record);
        }
        bar.finish_and_clear();
        Ok(out)
    }

    fn probe_one(&self, config: &str) -> Result<ProbeRecord> {
        let (student, _) = build_candidate(self.base, config, self.ctx)?;
        // The candidate is recalibrated already when the search recalibrates.
        let options = FinetuneOptions {
            epochs: 1,
            recalibrate: false,
            lr: self.recipe.lr * PROBE_LR_FRACTION,
            // PROBE_LR_FRACTION was measured for these one-epoch probes as they are.
            scale_lr_to_run: false,
            ..self.recipe.clone()
        };
        let trained = Finetuner {
            student: &student,
            teacher: self.base,
            train: self.train,
            options,
            checkpoint_dir: None,
            resume: false,
            progress: false,
        }
        .run();
        let (accuracy, failure) = match trained {
            Ok(t) => (super::accuracy(&t.model, self.score)?, None),
            // A candidate the recipe cannot train is not one it can recover.
            Err(e) => (0.0, Some(format!("{e:#}"))),
        };
        Ok(ProbeRecord { config: config.to_string(), images: self.train.len(), accuracy, failure })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_peel_the_frontier_then_the_next() {
        // (cost, accuracy): 0 and 2 are the frontier; 1 and 3 the second layer; 4 the third.
        let points = [(1.0, 0.5), (2.0, 0.55), (2.0, 0.7), (3.0, 0.68), (3.0, 0.6)];
        assert_eq!(pareto_layers(&points, 1), vec![0, 2]);
        assert_eq!(pareto_layers(&points, 2), vec![0, 1, 2, 3]);
        assert_eq!(pareto_layers(&points, 3), vec![0, 1, 2, 3, 4]);
        assert_eq!(pareto_layers(&points, 9), vec![0, 1, 2, 3, 4]);
    }
}

//! The Pareto frontier of a cost (ReLU count, or estimated PI bytes or latency) against
//! accuracy (DeepReDuce's output, on ReLUs).
//!
//! Guided by criticality, the search tries culling the least critical stages first (prefixes
//! of the cull order), each combined with thinning and channel thresholds. Candidates are
//! scored on calibration images from the training split; only the frontier's points are then
//! measured once on the held-out test split. Channel statistics are computed once per
//! structural configuration and reused for every threshold, and finished candidates are
//! appended to a journal so an interrupted search resumes where it stopped.

use super::candidates::{
    join, structural_configs, CullSubsets, CHANNEL_THRESHOLDS, MAX_EXHAUSTIVE_STAGES,
};
use super::objective::Cost;
use super::{accuracy, build_candidate};
use crate::analysis::cost::CostModel;
use crate::data::Dataset;
use crate::ir::Model;
use crate::passes::channel_thin::{apply_channel_thin, channel_stats};
use crate::passes::PassContext;
use anyhow::Result;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Scored {
    /// Lossy passes as pipeline text ("" is the original).
    pub config: String,
    pub relus: u64,
    /// Estimated PI cost (ReLUs again, bytes, seconds). Absent from journals written before
    /// the cost objectives; such entries are scored again.
    #[serde(default)]
    pub cost: Option<Cost>,
    pub calibration_accuracy: f64,
}

/// Indices of the points no other point dominates (lower or equal cost and higher or equal
/// accuracy, one of them strictly), sorted by cost. Among equal points the first wins.
pub fn frontier_indices(points: &[(f64, f64)]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..points.len()).collect();
    order.sort_by(|&a, &b| {
        points[a]
            .0
            .total_cmp(&points[b].0)
            .then(points[b].1.total_cmp(&points[a].1))
            .then(a.cmp(&b))
    });
    let mut best = f64::NEG_INFINITY;
    let mut out = Vec::new();
    for i in order {
        if points[i].1 > best {
            best = points[i].1;
            out.push(i);
        }
    }
    out
}

/// Where scores are recorded and found: this process's journal, and the journals of the other
/// shards of the same search (`pareto --shard`), whose records it takes instead of scoring
/// them again. Scores are deterministic, so whoever scored a candidate, the search is the same.
pub struct Journals {
    pub own: PathBuf,
    pub others: Vec<PathBuf>,
    /// This process's share of the candidates, `(I, N)`: it scores its own (every N-th) first,
    /// then the others' from the back ([`shard_order`]).
    pub start: (usize, usize),
}

impl Journals {
    /// One process's journal, no other shards.
    pub fn single(own: PathBuf) -> Self {
        Journals { own, others: vec![], start: (0, 1) }
    }
}

/// `items` in the order shard `index` of `count` scores them: its own (every `count`-th from
/// `index`) first, then the others' from the back. A shard that finishes its own meets the
/// others' owners coming the other way, instead of scoring in step behind one of them (which
/// a rotated start did: two shards scored 946 records for the shipped ResNet's 564 candidates).
pub fn shard_order<T>(items: Vec<T>, (index, count): (usize, usize)) -> Vec<T> {
    let count = count.max(1);
    let (mut own, mut others): (Vec<_>, Vec<_>) =
        items.into_iter().enumerate().partition(|(j, _)| j % count == index);
    others.reverse();
    own.append(&mut others);
    own.into_iter().map(|(_, item)| item).collect()
}

/// The scores in the journals at `paths`, by configuration.
fn read_records(paths: &[PathBuf]) -> HashMap<String, Scored> {
    super::journal::read_records::<Scored>(paths)
        .into_iter()
        .filter(|s| s.cost.is_some())
        .map(|s| (s.config.clone(), s))
        .collect()
}

/// How often a shard rereads the other shards' journals while it scores: a reread of a few
/// hundred lines is a millisecond, a shipped-ResNet candidate 2.5 s on one core (two 1-core
/// shards scored 946 records in 22 minutes).
const REREAD_OTHERS: std::time::Duration = std::time::Duration::from_secs(2);

/// Score every configuration on the calibration images, resuming from the journals (and
/// taking what other shards have scored as it goes).
#[allow(clippy::too_many_arguments)]
pub fn score_all(
    base: &Model,
    cull_order: &[usize],
    residual: bool,
    knobs: &[&str],
    exhaustive: bool,
    ctx: &PassContext,
    calibration: &Dataset,
    cost_model: &CostModel,
    journals: &Journals,
    progress: bool,
) -> Result<Vec<Scored>> {
    let journal = journals.own.as_path();
    let mut done = read_records(std::slice::from_ref(&journals.own));
    done.extend(read_records(&journals.others));
    // What the other shards have scored, reread now and then while this one scores.
    let others = std::sync::Mutex::new((std::time::Instant::now(), HashMap::new()));
    let scored_elsewhere = |config: &str| -> bool {
        if journals.others.is_empty() {
            return false;
        }
        let mut seen = others.lock().expect("journal cache lock");
        if seen.0.elapsed() >= REREAD_OTHERS {
            *seen = (std::time::Instant::now(), read_records(&journals.others));
        }
        seen.1.contains_key(config)
    };
    let subsets = if exhaustive && cull_order.len() <= MAX_EXHAUSTIVE_STAGES {
        CullSubsets::All
    } else {
        CullSubsets::Prefixes
    };
    let structural = structural_configs(cull_order, residual, knobs, subsets);
    let structural = shard_order(structural, journals.start);
    // Channel thresholds on full-size configurations only: the knobs' candidates are many
    // already, and channel statistics shift with resolution and width.
    let sized = |c: &str| knobs.iter().any(|k| c.contains(k));
    let total: usize =
        structural.iter().map(|c| if sized(c) { 1 } else { 1 + CHANNEL_THRESHOLDS.len() }).sum();
    let bar = crate::eval::evaluator::counted_progress_bar(
        total,
        "pareto search",
        "candidates",
        progress,
    );
    bar.inc(done.len().min(total) as u64);
    let file = super::journal::open_journal(journal, "search")?;
    let file = std::sync::Mutex::new(file);
    let record = |s: &Scored| -> Result<()> {
        let mut f = file.lock().expect("journal lock");
        writeln!(f, "{}", serde_json::to_string(s)?)?;
        f.flush()?;
        Ok(())
    };
    let fresh: Vec<Scored> = structural
        .par_iter()
        .map(|config| -> Result<Vec<Scored>> {
            let mut out = Vec::new();
            let thresholds = if sized(config) { &[][..] } else { CHANNEL_THRESHOLDS };
            let group: Vec<String> = std::iter::once(config.clone())
                .chain(thresholds.iter().map(|t| join(config, &format!("channel-thin({t})"))))
                .filter(|c| !done.contains_key(c))
                .collect();
            let wanted: Vec<String> =
                group.iter().filter(|c| !scored_elsewhere(c)).cloned().collect();
            bar.inc((group.len() - wanted.len()) as u64);
            if wanted.is_empty() {
                return Ok(out);
            }
            let (model, relus) = build_candidate(base, config, ctx)?;
            if wanted.contains(config) {
                let s = Scored {
                    config: config.clone(),
                    relus,
                    cost: Some(Cost::of(&model, &ctx.sample, cost_model)?),
                    calibration_accuracy: accuracy(&model, calibration)?,
                };
                record(&s)?;
                bar.inc(1);
                out.push(s);
            }
            if thresholds.is_empty() {
                return Ok(out);
            }
            // Channel statistics once per structural configuration, for every threshold, on
            // the images the `channel-thin` pass itself measures (so a rebuilt point is this one).
            let fitting = ctx.calibration.as_deref().unwrap_or(&calibration.images);
            let stats = channel_stats(&model, &ctx.sample, fitting)?;
            for t in thresholds {
                let name = join(config, &format!("channel-thin({t})"));
                if !wanted.contains(&name) {
                    continue;
                }
                let mut m = model.clone();
                apply_channel_thin(&mut m, &stats, *t);
                m.graph.remove_dead();
                let cost = Cost::of(&m, &ctx.sample, cost_model)?;
                let s = Scored {
                    config: name,
                    relus: cost.relus,
                    cost: Some(cost),
                    calibration_accuracy: accuracy(&m, calibration)?,
                };
                record(&s)?;
                bar.inc(1);
                out.push(s);
            }
            Ok(out)
        })
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .flatten()
        .collect();
    bar.finish_and_clear();
    done.extend(fresh.into_iter().map(|s| (s.config.clone(), s)));
    // What was left to the other shards, from their journals as they stand now.
    for (config, s) in read_records(&journals.others) {
        done.entry(config).or_insert(s);
    }
    // A deterministic order, whatever order the threads finished in.
    let mut all: Vec<Scored> = done.into_values().collect();
    all.sort_by(|a, b| a.relus.cmp(&b.relus).then(a.config.cmp(&b.config)));
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_score_their_own_candidates_first_then_the_others_from_the_back() {
        let order = |i| shard_order((0..7).collect::<Vec<_>>(), (i, 2));
        assert_eq!(order(0), vec![0, 2, 4, 6, 5, 3, 1]);
        assert_eq!(order(1), vec![1, 3, 5, 6, 4, 2, 0]);
        assert_eq!(shard_order(vec![1, 2, 3], (0, 1)), vec![1, 2, 3], "one process: as given");
    }
}

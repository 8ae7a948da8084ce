//! ReLU culling (DeepReDuce's "ReLU dropping"): remove every ReLU of the chosen stages, which
//! makes those stages linear. Lossy: the evaluator measures what it costs.

use super::{Pass, PassContext};
use crate::analysis::{relu_kind, shapes::infer_shapes, stages::find_stages};
use crate::error::{CompileError, ExitCode};
use crate::ir::Model;
use anyhow::Result;
use std::collections::BTreeSet;

pub struct Cull {
    pub stages: BTreeSet<usize>,
}

/// Parse a list of stage numbers: `1,2` (also accepts ranges like `1-3`).
pub fn parse_stage_list(args: &[String]) -> Result<BTreeSet<usize>> {
    let mut stages = BTreeSet::new();
    for arg in args {
        let bad = || CompileError::new(ExitCode::Usage, format!("'{arg}' is not a stage number"));
        match arg.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) =
                    (a.trim().parse().map_err(|_| bad())?, b.trim().parse().map_err(|_| bad())?);
                stages.extend(a..=b);
            }
            None => {
                stages.insert(arg.trim().parse().map_err(|_| bad())?);
            }
        }
    }
    if stages.is_empty() {
        return Err(CompileError::new(ExitCode::Usage, "no stage given").into());
    }
    Ok(stages)
}

impl Cull {
    pub fn from_args(args: &[String]) -> Result<Box<dyn Pass>> {
        Ok(Box::new(Cull { stages: parse_stage_list(args)? }))
    }
}

/// The stages a graph has, checked against the ones a pass was asked to touch.
pub fn check_stages_exist(wanted: &BTreeSet<usize>, count: usize, pass: &str) -> Result<()> {
    if let Some(&bad) = wanted.iter().find(|&&s| s >= count) {
        return Err(CompileError::new(
            ExitCode::Usage,
            format!(
                "{pass}: stage {bad} does not exist; this model has stages 0 to {} (see `relucompile inspect`)",
                count - 1
            ),
        )
        .into());
    }
    Ok(())
}

impl Pass for Cull {
    fn run(&self, model: &mut Model, ctx: &PassContext) -> Result<usize> {
        let shapes = infer_shapes(model, &ctx.sample, 1)?;
        let stages = find_stages(&model.graph, &shapes);
        check_stages_exist(&self.stages, stages.count(), "cull")?;
        let graph = &model.graph;
        let victims: Vec<String> = graph
            .nodes
            .iter()
            .enumerate()
            .filter(|(ix, n)| {
                self.stages.contains(&stages.of_node[*ix]) && relu_kind(graph, n).is_some()
            })
            .map(|(_, n)| n.name.clone())
            .collect();
        Ok(bypass_named(model, &victims))
    }
}

/// Remove the named one-input activation nodes, rewiring readers to their inputs.
pub fn bypass_named(model: &mut Model, names: &[String]) -> usize {
    let mut removed = 0;
    for name in names {
        if let Some(ix) = model.graph.nodes.iter().position(|n| &n.name == name) {
            if model.graph.bypass_node(ix, 0) {
                removed += 1;
            }
        }
    }
    removed
}

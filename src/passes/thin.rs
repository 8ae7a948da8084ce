//! ReLU thinning: in the stages kept, remove every other ReLU layer. In a residual basic block
//! DeepReDuce drops either the ReLU after the residual add (`bottom`) or the one after the
//! block's first convolution (`top`); in a plain chain every second ReLU layer (`alternate`).

use super::cull::{bypass_named, check_stages_exist, parse_stage_list};
use super::{Pass, PassContext};
use crate::analysis::relu_kind;
use crate::analysis::shapes::infer_shapes;
use crate::analysis::stages::{find_stages, residual_adds};
use crate::error::{CompileError, ExitCode};
use crate::ir::{Graph, Model};
use anyhow::Result;
use std::collections::{BTreeSet, HashMap};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThinMode {
    Bottom,
    Top,
    Alternate,
}

pub struct Thin {
    pub mode: ThinMode,
    /// Only these stages; `None` means every stage with ReLU layers to thin.
    pub stages: Option<BTreeSet<usize>>,
}

impl Thin {
    /// `thin(bottom)`, `thin(top,3,4)`, `thin(alternate)`.
    pub fn from_args(args: &[String]) -> Result<Box<dyn Pass>> {
        let usage = |m: String| anyhow::Error::from(CompileError::new(ExitCode::Usage, m));
        let mode = match args.first().map(|s| s.as_str()) {
            Some("bottom") => ThinMode::Bottom,
            Some("top") => ThinMode::Top,
            Some("alternate") => ThinMode::Alternate,
            other => {
                return Err(usage(format!(
                    "thin needs a mode: bottom, top or alternate (got {other:?})"
                )))
            }
        };
        let stages = if args.len() > 1 { Some(parse_stage_list(&args[1..])?) } else { None };
        Ok(Box::new(Thin { mode, stages }))
    }
}

/// The ReLU-like node reading `value` directly, if exactly one does.
fn relu_reading(
    graph: &Graph,
    consumers: &HashMap<&str, Vec<usize>>,
    value: &str,
) -> Option<usize> {
    let readers = consumers.get(value)?;
    let relus: Vec<usize> =
        readers.iter().copied().filter(|&c| relu_kind(graph, &graph.nodes[c]).is_some()).collect();
    (relus.len() == 1).then(|| relus[0])
}

/// Walking back from a residual add's branch along data inputs, the first ReLU before a fork
/// (a value read by more than one node): the block's "top" ReLU.
fn top_relu(graph: &Graph, add: usize) -> Option<usize> {
    let producers = graph.producers();
    let consumers = graph.consumers();
    for branch in graph.nodes[add].inputs.iter().filter(|i| !i.is_empty()) {
        let mut value = branch.as_str();
        while let Some(&p) = producers.get(value) {
            let node = &graph.nodes[p];
            if relu_kind(graph, node).is_some() {
                return Some(p);
            }
            let Some(input) = node.input(0) else { break };
            if consumers.get(input).map(|c| c.len()).unwrap_or(0) > 1 {
                break; // reached the block's fork: this branch is the shortcut
            }
            value = input;
        }
    }
    None
}

impl Pass for Thin {
    fn run(&self, model: &mut Model, ctx: &PassContext) -> Result<usize> {
        let shapes = infer_shapes(model, &ctx.sample, 1)?;
        let stages = find_stages(&model.graph, &shapes);
        if let Some(wanted) = &self.stages {
            check_stages_exist(wanted, stages.count(), "thin")?;
        }
        let in_scope = |stage: usize| self.stages.as_ref().is_none_or(|s| s.contains(&stage));
        let graph = &model.graph;
        let consumers = graph.consumers();
        let mut victims = Vec::new();
        match self.mode {
            ThinMode::Bottom | ThinMode::Top => {
                for add in residual_adds(graph, &shapes) {
                    if !in_scope(stages.of_node[add]) {
                        continue;
                    }
                    let relu = match self.mode {
                        ThinMode::Bottom => {
                            relu_reading(graph, &consumers, &graph.nodes[add].outputs[0])
                        }
                        _ => top_relu(graph, add),
                    };
                    victims.extend(relu.map(|r| graph.nodes[r].name.clone()));
                }
            }
            ThinMode::Alternate => {
                let mut seen_in_stage: HashMap<usize, usize> = HashMap::new();
                for (ix, node) in graph.nodes.iter().enumerate() {
                    let stage = stages.of_node[ix];
                    if relu_kind(graph, node).is_none() || !in_scope(stage) {
                        continue;
                    }
                    let k = seen_in_stage.entry(stage).or_default();
                    if *k % 2 == 1 {
                        victims.push(node.name.clone());
                    }
                    *k += 1;
                }
            }
        }
        Ok(bypass_named(model, &victims))
    }
}

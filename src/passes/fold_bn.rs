//! Fold BatchNormalization into the Conv or Gemm that feeds it. At inference BN is an affine
//! map per channel, so it merges into the weights and bias and the PI engine has one linear
//! layer fewer to evaluate.

use super::{Pass, PassContext};
use crate::ir::channel_affine::apply_channel_affine;
use crate::ir::{Graph, Model};
use anyhow::Result;

#[derive(Default)]
pub struct FoldBatchNorm;

impl Pass for FoldBatchNorm {
    fn run(&self, model: &mut Model, _ctx: &PassContext) -> Result<usize> {
        let mut folded = 0;
        let mut stuck = std::collections::HashSet::new();
        loop {
            let graph = &model.graph;
            let producers = graph.producers();
            let consumers = graph.consumers();
            let found = graph.nodes.iter().enumerate().find_map(|(b, bn)| {
                if bn.op_type != "BatchNormalization" || stuck.contains(&bn.name) {
                    return None;
                }
                // Training-mode outputs (running statistics) must not be in use.
                if bn.outputs.iter().skip(1).any(|o| !o.is_empty()) {
                    return None;
                }
                let x = bn.input(0)?;
                let &l = producers.get(x)?;
                let lin = &graph.nodes[l];
                let only_bn =
                    consumers.get(x).map(|c| c.len()) == Some(1) && !graph.is_graph_output(x);
                (only_bn && (lin.op_type == "Conv" || lin.op_type == "Gemm")).then_some((l, b))
            });
            let Some((l, b)) = found else { break };
            match fold(&mut model.graph, l, b) {
                Some(()) => folded += 1,
                None => {
                    stuck.insert(model.graph.nodes[b].name.clone());
                }
            }
        }
        Ok(folded)
    }
}

/// Per-channel scale and shift of a BN node: `y = scale * x + shift`.
fn bn_affine(graph: &Graph, bn: &crate::ir::Node) -> Option<(Vec<f32>, Vec<f32>)> {
    let get = |ix| graph.constant(bn.input(ix)?).map(|t| t.to_f32());
    let (gamma, beta, mean, var) = (get(1)?, get(2)?, get(3)?, get(4)?);
    let eps = bn.attr_float("epsilon").unwrap_or(1e-5);
    let n = gamma.len();
    if [beta.len(), mean.len(), var.len()].iter().any(|&l| l != n) {
        return None;
    }
    let scale: Vec<f32> = (0..n).map(|c| gamma[c] / (var[c] + eps).sqrt()).collect();
    let shift = (0..n).map(|c| beta[c] - mean[c] * scale[c]).collect();
    Some((scale, shift))
}

fn fold(graph: &mut Graph, l: usize, b: usize) -> Option<()> {
    let (scale, shift) = bn_affine(graph, &graph.nodes[b])?;
    apply_channel_affine(graph, l, &scale, &shift, "bn")?;
    let bn_out = graph.nodes[b].outputs[0].clone();
    graph.nodes[l].outputs[0] = bn_out;
    let bn_name = graph.nodes[b].name.clone();
    graph.nodes.retain(|n| n.name != bn_name);
    graph.remove_unused_initializers();
    Some(())
}

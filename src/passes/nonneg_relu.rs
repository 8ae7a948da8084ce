//! Remove a ReLU whose input can never be negative: `relu(x) = x` there, and each one costs
//! a comparison per element in private inference.

use super::{Pass, PassContext};
use crate::analysis::{ranges::nonnegative_values, relu_kind, ReluKind};
use crate::ir::Model;
use anyhow::Result;

#[derive(Default)]
pub struct NonNegRelu;

impl Pass for NonNegRelu {
    fn run(&self, model: &mut Model, _ctx: &PassContext) -> Result<usize> {
        let mut removed = 0;
        let mut stuck = std::collections::HashSet::new();
        loop {
            let graph = &model.graph;
            let nonneg = nonnegative_values(graph);
            // Only plain ReLU: ReLU6 still clips at 6, Leaky variants are not the identity.
            let candidate = graph.nodes.iter().position(|n| {
                relu_kind(graph, n) == Some(ReluKind::Relu)
                    && !stuck.contains(&n.name)
                    && n.input(0).is_some_and(|x| nonneg.contains(x))
            });
            let Some(ix) = candidate else { break };
            let name = model.graph.nodes[ix].name.clone();
            if model.graph.bypass_node(ix, 0) {
                removed += 1;
            } else {
                stuck.insert(name);
            }
        }
        Ok(removed)
    }
}

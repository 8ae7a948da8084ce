//! Merge ReLU-like nodes that read the same value with the same attributes: the exporters
//! emit one per use when a module is called twice, and each is paid for separately.

use super::{Pass, PassContext};
use crate::analysis::relu_kind;
use crate::ir::Model;
use anyhow::Result;

#[derive(Default)]
pub struct DedupRelu;

impl Pass for DedupRelu {
    fn run(&self, model: &mut Model, _ctx: &PassContext) -> Result<usize> {
        let mut merged = 0;
        let mut stuck = std::collections::HashSet::new();
        loop {
            let graph = &model.graph;
            let relus: Vec<usize> = (0..graph.nodes.len())
                .filter(|&i| relu_kind(graph, &graph.nodes[i]).is_some())
                .collect();
            let pair = relus.iter().enumerate().find_map(|(k, &a)| {
                relus[k + 1..].iter().find_map(|&b| {
                    let (na, nb) = (&graph.nodes[a], &graph.nodes[b]);
                    (na.op_type == nb.op_type
                        && na.inputs == nb.inputs
                        && na.attributes == nb.attributes
                        && !stuck.contains(&nb.name))
                    .then_some((a, b))
                })
            });
            let Some((keep, drop)) = pair else { break };
            let kept = model.graph.nodes[keep].outputs[0].clone();
            let dropped = model.graph.nodes[drop].outputs[0].clone();
            let name = model.graph.nodes[drop].name.clone();
            if model.graph.is_graph_output(&dropped) {
                stuck.insert(name);
                continue;
            }
            model.graph.replace_uses(&dropped, &kept);
            model.graph.nodes.retain(|n| n.name != name);
            merged += 1;
        }
        Ok(merged)
    }
}

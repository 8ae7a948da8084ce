//! Identity elimination. The PyTorch exporters leave Identity nodes (and Dropout, an identity
//! at inference), and CrypTen refuses to import a graph containing one.

use super::{Pass, PassContext};
use crate::ir::Model;
use anyhow::Result;

#[derive(Default)]
pub struct IdentityElim;

impl Pass for IdentityElim {
    fn run(&self, model: &mut Model, _ctx: &PassContext) -> Result<usize> {
        let mut removed = 0;
        let mut stuck = std::collections::HashSet::new();
        loop {
            let graph = &model.graph;
            let consumers = graph.consumers();
            let candidate = graph.nodes.iter().position(|n| {
                !stuck.contains(&n.name)
                    && match n.op_type.as_str() {
                        "Identity" => true,
                        // Dropout is the identity unless training_mode is on; its mask must be unused.
                        "Dropout" => {
                            let training = n
                                .input(2)
                                .map(|t| {
                                    graph
                                        .constant(t)
                                        .is_none_or(|t| t.to_i64().iter().any(|&v| v != 0))
                                })
                                .unwrap_or(false);
                            let mask_used = n.outputs.get(1).is_some_and(|m| {
                                !m.is_empty()
                                    && (consumers.contains_key(m.as_str())
                                        || graph.is_graph_output(m))
                            });
                            !training && !mask_used
                        }
                        _ => false,
                    }
            });
            let Some(ix) = candidate else { break };
            let name = model.graph.nodes[ix].name.clone();
            if model.graph.bypass_node(ix, 0) {
                removed += 1;
            } else {
                // An output fed straight by an input or a weight: nothing can take its name.
                stuck.insert(name);
            }
        }
        Ok(removed)
    }
}

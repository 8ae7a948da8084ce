//! The IR verifier: structural invariants every pass must preserve.

use super::{Graph, Model};
use std::collections::HashSet;

/// A broken invariant, with a message naming the node or value at fault.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct VerifyError(pub String);

/// Check that values are defined once, before use, that every output is produced,
/// node names are unique and weights have the size their dims say.
pub fn verify(model: &Model) -> Result<(), VerifyError> {
    verify_graph(&model.graph)
}

fn verify_graph(graph: &Graph) -> Result<(), VerifyError> {
    let err = |m: String| Err(VerifyError(m));
    let mut defined: HashSet<&str> = HashSet::new();
    for input in &graph.inputs {
        if !defined.insert(&input.name) {
            return err(format!("graph input '{}' is declared twice", input.name));
        }
    }
    for (name, tensor) in &graph.initializers {
        if !defined.insert(name) {
            return err(format!("initializer '{name}' is also a graph input"));
        }
        if tensor.raw.len() != tensor.numel() * tensor.data_type.size() {
            return err(format!("initializer '{name}' has data that does not match its dims"));
        }
    }
    let mut node_names = HashSet::new();
    for node in &graph.nodes {
        if node.op_type.is_empty() {
            return err(format!("node '{}' has no op type", node.name));
        }
        if !node.name.is_empty() && !node_names.insert(node.name.as_str()) {
            return err(format!("two nodes are named '{}'", node.name));
        }
        for input in node.inputs.iter().filter(|i| !i.is_empty()) {
            if !defined.contains(input.as_str()) {
                return err(format!(
                    "node {} reads '{input}', which is not defined before it",
                    node.label()
                ));
            }
        }
        for output in node.outputs.iter().filter(|o| !o.is_empty()) {
            if !defined.insert(output) {
                return err(format!(
                    "value '{output}' is defined twice (again by {})",
                    node.label()
                ));
            }
        }
    }
    let mut seen_outputs = HashSet::new();
    for output in &graph.outputs {
        if !defined.contains(output.name.as_str()) {
            return err(format!("graph output '{}' is not produced by any node", output.name));
        }
        if !seen_outputs.insert(&output.name) {
            return err(format!("graph output '{}' is listed twice", output.name));
        }
    }
    Ok(())
}

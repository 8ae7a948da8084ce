//! Sign analysis: which values are provably non-negative for every input.

use crate::ir::Graph;
use std::collections::HashSet;

/// Values that can never be negative, found by one forward sweep in topological order.
pub fn nonnegative_values(graph: &Graph) -> HashSet<String> {
    let mut nonneg: HashSet<String> = graph
        .initializers
        .iter()
        .filter(|(_, t)| t.to_f32().iter().all(|&v| v >= 0.0))
        .map(|(name, _)| name.clone())
        .collect();
    for node in &graph.nodes {
        let is = |ix: usize| node.input(ix).map(|v| nonneg.contains(v));
        let all_inputs = node.inputs.iter().filter(|i| !i.is_empty()).all(|i| nonneg.contains(i));
        let data = is(0) == Some(true);
        let result = match node.op_type.as_str() {
            "Relu" | "Sigmoid" | "Softmax" | "Abs" | "Exp" | "Softplus" => true,
            "Clip" => {
                let min = node.attr_float("min").or_else(|| {
                    graph.constant(node.input(1)?).and_then(|t| t.to_f32().first().copied())
                });
                data || min.is_some_and(|m| m >= 0.0)
            }
            "Constant" => graph
                .constant(&node.outputs[0])
                .is_some_and(|t| t.to_f32().iter().all(|&v| v >= 0.0)),
            // Order-preserving or rearranging ops keep the sign of their data input.
            "MaxPool" | "AveragePool" | "GlobalAveragePool" | "GlobalMaxPool" | "Flatten"
            | "Reshape" | "Transpose" | "Squeeze" | "Unsqueeze" | "Slice" | "Identity"
            | "Dropout" | "Split" | "Gather" | "Expand" | "Tile" => data,
            "Pad" => {
                let value = node.input(2).and_then(|v| graph.constant(v)).map(|t| t.to_f32());
                let mode = node.attr_string("mode").unwrap_or_else(|| "constant".into());
                let fill = value.and_then(|v| v.first().copied()).or(node.attr_float("value"));
                data && (mode != "constant" || fill.unwrap_or(0.0) >= 0.0)
            }
            // max(x, y) >= 0 as soon as one operand is.
            "Max" => node.inputs.iter().any(|i| nonneg.contains(i)),
            "Min" | "Concat" | "Add" | "Sum" | "Mul" | "Div" => all_inputs,
            "Conv" | "Gemm" | "MatMul" => all_inputs,
            _ => false,
        };
        if result {
            nonneg.extend(node.outputs.iter().filter(|o| !o.is_empty()).cloned());
        }
    }
    nonneg
}

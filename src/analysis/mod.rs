//! Analyses read the IR and never change it.

pub mod census;
pub mod cost;
pub mod input_normalisation;
pub mod ranges;
pub mod shapes;
pub mod stages;

/// The ReLU-like operators: what private inference pays a comparison protocol for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum ReluKind {
    Relu,
    /// `Clip(0, 6)` and other `Clip`s with a lower bound of zero: one comparison per bound.
    Relu6,
    /// LeakyRelu and PRelu are counted apart: removing them changes the function differently.
    Leaky,
}

/// Whether `node` is ReLU-like, reading Clip's bounds from attributes (opset < 11) or inputs.
pub fn relu_kind(graph: &crate::ir::Graph, node: &crate::ir::Node) -> Option<ReluKind> {
    match node.op_type.as_str() {
        "Relu" => Some(ReluKind::Relu),
        "LeakyRelu" | "PRelu" => Some(ReluKind::Leaky),
        "Clip" => {
            let min = node.attr_float("min").or_else(|| {
                let t = graph.constant(node.input(1)?)?;
                t.to_f32().first().copied()
            });
            (min == Some(0.0)).then_some(ReluKind::Relu6)
        }
        _ => None,
    }
}

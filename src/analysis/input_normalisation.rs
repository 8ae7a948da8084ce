//! Normalisation inside the graph: wrapper modules export `(x - mean) / std` as `Sub` and `Div`
//! (or `Mul` and `Add`) by constants on the input, before the first convolution. A model that
//! holds it takes pixels scaled to [0, 1], and says so without any metadata.

use crate::ir::Graph;

/// Element-wise operators of an input normalisation (one operand a constant).
const AFFINE_OPS: [&str; 4] = ["Sub", "Div", "Mul", "Add"];
/// Operators that reshape or retype the input without changing its values.
const VALUE_PRESERVING: [&str; 3] = ["Identity", "Cast", "Reshape"];
/// Where the normalisation must end: the first layer with weights.
const FIRST_LAYERS: [&str; 3] = ["Conv", "Gemm", "MatMul"];

/// The normalising nodes (labels, in order) between the graph's first input and its first
/// Conv (or Gemm/MatMul): `Sub`/`Div`/`Mul`/`Add` by a constant, each the input's only
/// consumer. `None` when the input reaches the first layer without one, or reaches anything
/// else first.
pub fn in_graph_normalisation(graph: &Graph) -> Option<Vec<String>> {
    let consumers = graph.consumers();
    let mut value = graph.inputs.first()?.name.clone();
    let mut found = Vec::new();
    loop {
        let [ix] = consumers.get(value.as_str())?.as_slice() else {
            return None;
        };
        let node = &graph.nodes[*ix];
        let op = node.op_type.as_str();
        if FIRST_LAYERS.contains(&op) {
            return (!found.is_empty()).then_some(found);
        }
        let by_constant = node.inputs.len() == 2
            && node.inputs.iter().any(|i| *i != value && graph.constant(i).is_some());
        if AFFINE_OPS.contains(&op) && by_constant {
            found.push(node.label());
        } else if !VALUE_PRESERVING.contains(&op) {
            return None;
        }
        value = node.outputs.first()?.clone();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{Node, Tensor};

    fn graph(ops: &[(&str, bool)]) -> Graph {
        let mut g = Graph::default();
        for name in ["x", "y"] {
            g.inputs
                .push(tract_onnx::pb::ValueInfoProto { name: name.into(), ..Default::default() });
        }
        let mut value = "x".to_string();
        for (i, (op, constant)) in ops.iter().enumerate() {
            let out = format!("v{i}");
            let mut inputs = vec![value.clone()];
            if *constant {
                let c = format!("c{i}");
                g.initializers.insert(c.clone(), Tensor::from_f32(vec![1], &[0.5]));
                inputs.push(c);
            } else if AFFINE_OPS.contains(op) {
                inputs.push("y".into());
            }
            g.nodes.push(Node::new(format!("n{i}"), *op, inputs, vec![out.clone()]));
            value = out;
        }
        g
    }

    #[test]
    fn finds_sub_div_before_the_first_conv_only() {
        let found = in_graph_normalisation(&graph(&[("Sub", true), ("Div", true), ("Conv", true)]));
        assert_eq!(found.map(|f| f.len()), Some(2));
        let found = in_graph_normalisation(&graph(&[("Mul", true), ("Add", true), ("Gemm", true)]));
        assert_eq!(found.map(|f| f.len()), Some(2));
        // No normalisation before the first Conv; one after it does not count.
        assert_eq!(in_graph_normalisation(&graph(&[("Conv", true), ("Sub", true)])), None);
        // Another operator first, or an operand that is not a constant.
        assert_eq!(in_graph_normalisation(&graph(&[("Relu", false), ("Conv", true)])), None);
        assert_eq!(in_graph_normalisation(&graph(&[("Sub", false), ("Conv", true)])), None);
        // Cast passes values through.
        let found =
            in_graph_normalisation(&graph(&[("Cast", false), ("Sub", true), ("Conv", true)]));
        assert_eq!(found.map(|f| f.len()), Some(1));
    }
}

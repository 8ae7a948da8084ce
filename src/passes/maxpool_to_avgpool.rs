//! Max-pool replacement: every MaxPool becomes an AveragePool of the same window, strides,
//! padding and ceil mode. Secure max-pooling is a tree of comparisons (the shipped VGG's three
//! MaxPools send 58% of its bytes in CrypTen); average pooling is linear and nearly free.
//! Lossy; recalibration and distillation recover what it costs.
//!
//! Padding: the average divides by the whole window (`count_include_pad = 1`, zeros in the
//! padding), the convention every PI engine's average pool implements as a fixed convolution,
//! so the emitted graph means the same thing everywhere. Placed before `relu-after-maxpool`, so
//! the ReLUs stay in front of the pool: moving them behind an average pool would cut them 4x
//! but is itself lossy. Measured on the shipped VGG without training: ReLUs in front 91.85%
//! (81,792 ReLUs, 45.7 MB in CrypTen), behind 69.69% (48,448 ReLUs, 30.2 MB); original 93.07%,
//! 108.2 MB.

use super::{Pass, PassContext};
use crate::ir::Model;
use anyhow::Result;

#[derive(Default)]
pub struct MaxPoolToAvgPool;

impl Pass for MaxPoolToAvgPool {
    fn run(&self, model: &mut Model, _ctx: &PassContext) -> Result<usize> {
        let mut rewrites = 0;
        for node in model.graph.nodes.iter_mut().filter(|n| n.op_type == "MaxPool") {
            // The Indices output of MaxPool has no AveragePool counterpart.
            if node.outputs.iter().skip(1).any(|o| !o.is_empty()) {
                continue;
            }
            node.outputs.truncate(1);
            node.op_type = "AveragePool".into();
            // AveragePool has no dilations or storage_order; both are defaults for every pool
            // exporters emit, anything else stays a MaxPool.
            let dilated = node.attr_ints("dilations").is_some_and(|d| d.iter().any(|&v| v != 1));
            if dilated {
                node.op_type = "MaxPool".into();
                continue;
            }
            node.attributes.retain(|a| a.name != "dilations" && a.name != "storage_order");
            let padded = node.attr_ints("pads").is_some_and(|p| p.iter().any(|&v| v != 0))
                || node.attr_string("auto_pad").is_some_and(|p| p != "NOTSET" && p != "VALID");
            if padded {
                node.set_attr_int("count_include_pad", 1);
            }
            rewrites += 1;
        }
        Ok(rewrites)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::tract::Runner;
    use crate::ir::{Graph, Node};
    use tract_onnx::pb;

    /// `x [1, 1, 4, 4] -> MaxPool(2x2, stride 2, pads) -> y`.
    fn one_pool(pads: [i64; 4]) -> Model {
        let mut pool = Node::new("pool", "MaxPool", vec!["x".into()], vec!["y".into()]);
        pool.set_attr_ints("kernel_shape", vec![2, 2]);
        pool.set_attr_ints("strides", vec![2, 2]);
        pool.set_attr_ints("pads", pads.to_vec());
        let value = |name: &str| pb::ValueInfoProto {
            name: name.into(),
            r#type: Some(pb::TypeProto {
                value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                    elem_type: 1,
                    shape: None,
                })),
                ..Default::default()
            }),
            ..Default::default()
        };
        Model {
            ir_version: 8,
            opset_imports: vec![pb::OperatorSetIdProto { domain: String::new(), version: 13 }],
            producer_name: String::new(),
            producer_version: String::new(),
            domain: String::new(),
            model_version: 0,
            doc_string: String::new(),
            metadata_props: vec![],
            graph: Graph {
                name: "g".into(),
                inputs: vec![value("x")],
                outputs: vec![value("y")],
                initializers: Default::default(),
                nodes: vec![pool],
            },
        }
    }

    fn run(model: &Model, x: &[f32]) -> Vec<f32> {
        Runner::new(model, &[1, 4, 4], 1).unwrap().run(x).unwrap().0
    }

    #[test]
    fn without_padding_it_is_the_window_average() {
        let x: Vec<f32> = (0..16).map(|i| (i * 7 % 16) as f32 - 5.0).collect();
        let mut model = one_pool([0; 4]);
        let ctx = PassContext::new(vec![1, 4, 4]);
        assert_eq!(MaxPoolToAvgPool.run(&mut model, &ctx).unwrap(), 1);
        assert_eq!(model.graph.nodes[0].op_type, "AveragePool");
        let expected: Vec<f32> = [(0, 0), (0, 2), (2, 0), (2, 2)]
            .iter()
            .map(|&(r, c)| {
                (x[r * 4 + c] + x[r * 4 + c + 1] + x[(r + 1) * 4 + c] + x[(r + 1) * 4 + c + 1])
                    / 4.0
            })
            .collect();
        assert_eq!(run(&model, &x), expected);
    }

    #[test]
    fn padded_windows_divide_by_the_whole_window() {
        // Pads of 1 on every side: a 6x6 padded input, 3x3 outputs; the corner window holds
        // one real cell, so its average is that cell / 4.
        let x: Vec<f32> = (1..=16).map(|i| i as f32).collect();
        let mut model = one_pool([1, 1, 1, 1]);
        MaxPoolToAvgPool.run(&mut model, &PassContext::new(vec![1, 4, 4])).unwrap();
        assert_eq!(model.graph.nodes[0].attr_int("count_include_pad"), Some(1));
        let y = run(&model, &x);
        assert_eq!(y.len(), 9);
        assert_eq!(y[0], 1.0 / 4.0);
        assert_eq!(y[4], (6.0 + 7.0 + 10.0 + 11.0) / 4.0);
    }
}

//! Max-pool replacement: every MaxPool becomes an AveragePool of the same window, strides,
//! padding and ceil mode. Secure max-pooling is a tree of comparisons (the shipped VGG's three
//! MaxPools send 58% of its bytes in CrypTen); average pooling is linear and nearly free.
//! Lossy; recalibration and distillation recover what it costs.
//!
//! Padding: the average divides by the whole window (`count_include_pad = 1`, zeros in the
//! padding), the convention every PI engine's average pool implements as a fixed convolution,
//! so the emitted graph means the same thing everywhere. Placed after `relu-after-maxpool`, so
//! the ReLUs a max-pool had gathered behind it stay there (4x fewer for a 2x2 pool).

use super::{Pass, PassContext};
use crate::ir::Model;
use anyhow::Result;

#[derive(Default)]
pub struct MaxPoolToAvgPool;

impl Pass for MaxPoolToAvgPool {
    fn name(&self) -> &'static str {
        "maxpool-to-avgpool"
    }
    fn lossless(&self) -> bool {
        false
    }
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

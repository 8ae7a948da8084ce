//! Move a ReLU after the MaxPool it feeds. Any non-decreasing elementwise function commutes
//! with max, so `maxpool(relu(x)) = relu(maxpool(x))`, and after a k x k pool with stride k the
//! ReLU runs on k^2 times fewer elements.

use super::{Pass, PassContext};
use crate::analysis::relu_kind;
use crate::ir::Model;
use anyhow::Result;

#[derive(Default)]
pub struct ReluAfterMaxPool;

impl Pass for ReluAfterMaxPool {
    fn run(&self, model: &mut Model, _ctx: &PassContext) -> Result<usize> {
        let mut moved = 0;
        loop {
            let graph = &model.graph;
            let consumers = graph.consumers();
            let found = graph.nodes.iter().enumerate().find_map(|(r, relu)| {
                relu_kind(graph, relu)?;
                let out = relu.outputs.first()?;
                if graph.is_graph_output(out) {
                    return None;
                }
                let [p] = consumers.get(out.as_str())?.as_slice() else { return None };
                let pool = &graph.nodes[*p];
                let single_output = pool.outputs.iter().skip(1).all(|o| o.is_empty());
                let is_max = pool.op_type == "GlobalMaxPool"
                    || (pool.op_type == "MaxPool" && every_window_is_real(pool));
                (is_max && single_output && pool.input(0) == Some(out)).then_some((r, *p))
            });
            let Some((r, p)) = found else { break };
            let g = &mut model.graph;
            let x = g.nodes[r].inputs[0].clone();
            let pooled = g.fresh_name(&format!("{}_pooled", g.nodes[p].outputs[0]));
            let final_out = g.nodes[p].outputs[0].clone();
            g.nodes[p].inputs[0] = x;
            g.nodes[p].outputs[0] = pooled.clone();
            g.nodes[r].inputs[0] = pooled;
            g.nodes[r].outputs[0] = final_out;
            // The pool now reads what the ReLU read, so it moves to the ReLU's slot and the ReLU
            // to the pool's: both stay in topological order.
            g.nodes.swap(r, p);
            moved += 1;
        }
        Ok(moved)
    }
}

/// Whether every window of a MaxPool covers at least one real input element. A window of
/// padding alone yields -inf (tract: the lowest float), where relu-then-pool yields 0, so the
/// rewrite is exact only then. Per axis, with extent `e = (k - 1) * d + 1`, stride `s` and pads
/// `b`, `a`: the first window starts at 0 in padded coordinates and the real cells at `b`, so
/// `b < e`; the last starts at most `in + b + a - e` (ceil_mode 0) or `in + b + a - e + s - 1`
/// (ceil_mode 1) and must start before `b + in`: `a < e`, or `a + s <= e`.
fn every_window_is_real(pool: &crate::ir::Node) -> bool {
    if pool.attr_string("auto_pad").is_some_and(|p| p != "NOTSET" && p != "VALID") {
        return false;
    }
    let ceil = pool.attr_int("ceil_mode").unwrap_or(0) != 0;
    let Some(kernel) = pool.attr_ints("kernel_shape") else { return false };
    let n = kernel.len();
    let ones = vec![1; n];
    let dilations = pool.attr_ints("dilations").unwrap_or(&ones);
    let strides = pool.attr_ints("strides").unwrap_or(&ones);
    let zeros = vec![0; 2 * n];
    let pads = pool.attr_ints("pads").unwrap_or(&zeros);
    if dilations.len() != n || strides.len() != n || pads.len() != 2 * n {
        return false;
    }
    (0..n).all(|i| {
        let (k, d, s) = (kernel[i], dilations[i], strides[i]);
        let extent = (k - 1) * d + 1;
        let (before, after) = (pads[i], pads[i + n]);
        let last_fits = if ceil { after + s <= extent } else { after < extent };
        k >= 1 && d >= 1 && s >= 1 && (0..extent).contains(&before) && after >= 0 && last_fits
    })
}

//! Fold BatchNormalization into the Conv or Gemm that feeds it. At inference BN is an affine
//! map per channel, so it merges into the weights and bias and the PI engine has one linear
//! layer fewer to evaluate.

use super::{Pass, PassContext};
use crate::ir::{Graph, Model, Tensor};
use anyhow::Result;

#[derive(Default)]
pub struct FoldBatchNorm;

impl Pass for FoldBatchNorm {
    fn name(&self) -> &'static str {
        "fold-bn"
    }
    fn run(&self, model: &mut Model, _ctx: &PassContext) -> Result<usize> {
        let mut folded = 0;
        let mut stuck = std::collections::HashSet::new();
        loop {
            let graph = &model.graph;
            let producers = graph.producers();
            let consumers = graph.consumers();
            let found = graph.nodes.iter().enumerate().find_map(|(b, bn)| {
                if bn.op_type != "BatchNormalization" || stuck.contains(&bn.name) {
                    return None;
                }
                // Training-mode outputs (running statistics) must not be in use.
                if bn.outputs.iter().skip(1).any(|o| !o.is_empty()) {
                    return None;
                }
                let x = bn.input(0)?;
                let &l = producers.get(x)?;
                let lin = &graph.nodes[l];
                let only_bn =
                    consumers.get(x).map(|c| c.len()) == Some(1) && !graph.is_graph_output(x);
                (only_bn && (lin.op_type == "Conv" || lin.op_type == "Gemm")).then_some((l, b))
            });
            let Some((l, b)) = found else { break };
            match fold(&mut model.graph, l, b) {
                Some(()) => folded += 1,
                None => {
                    stuck.insert(model.graph.nodes[b].name.clone());
                }
            }
        }
        Ok(folded)
    }
}

/// Per-channel scale and shift of a BN node: `y = scale * x + shift`.
fn bn_affine(graph: &Graph, bn: &crate::ir::Node) -> Option<(Vec<f32>, Vec<f32>)> {
    let get = |ix| graph.constant(bn.input(ix)?).map(|t| t.to_f32());
    let (gamma, beta, mean, var) = (get(1)?, get(2)?, get(3)?, get(4)?);
    let eps = bn.attr_float("epsilon").unwrap_or(1e-5);
    let n = gamma.len();
    if [beta.len(), mean.len(), var.len()].iter().any(|&l| l != n) {
        return None;
    }
    let scale: Vec<f32> = (0..n).map(|c| gamma[c] / (var[c] + eps).sqrt()).collect();
    let shift = (0..n).map(|c| beta[c] - mean[c] * scale[c]).collect();
    Some((scale, shift))
}

fn fold(graph: &mut Graph, l: usize, b: usize) -> Option<()> {
    let (scale, shift) = bn_affine(graph, &graph.nodes[b])?;
    apply_channel_affine(graph, l, &scale, &shift, "bn")?;
    let bn_out = graph.nodes[b].outputs[0].clone();
    graph.nodes[l].outputs[0] = bn_out;
    let bn_name = graph.nodes[b].name.clone();
    graph.nodes.retain(|n| n.name != bn_name);
    graph.remove_unused_initializers();
    Some(())
}

/// Make the Conv or Gemm at `l` compute `scale[c] * y[c] + shift[c]` per output channel `c`,
/// by rewriting its weight and bias into fresh initializers (`<node>.weight_<tag>`). `None`
/// (and nothing changed) when the node's layout does not allow it or a value would not be
/// finite.
pub(crate) fn apply_channel_affine(
    graph: &mut Graph,
    l: usize,
    scale: &[f32],
    shift: &[f32],
    tag: &str,
) -> Option<()> {
    let lin = graph.nodes[l].clone();
    let weight = graph.constant(lin.input(1)?)?;
    let mut w = weight.to_f32();
    let channels = scale.len();
    let is_conv = lin.op_type == "Conv";
    let trans_b = lin.attr_int("transB").unwrap_or(0) != 0;
    if !is_conv && (lin.attr_float("alpha").unwrap_or(1.0) != 1.0 || weight.dims.len() != 2) {
        return None;
    }
    // Which output channel each weight belongs to.
    let out_channels = if is_conv {
        *weight.dims.first()?
    } else if trans_b {
        weight.dims[0]
    } else {
        weight.dims[1]
    };
    if out_channels != channels || shift.len() != channels {
        return None;
    }
    if is_conv || trans_b {
        let per = w.len() / channels;
        for (c, chunk) in w.chunks_mut(per).enumerate() {
            chunk.iter_mut().for_each(|v| *v *= scale[c]);
        }
    } else {
        for row in w.chunks_mut(channels) {
            row.iter_mut().zip(scale).for_each(|(v, s)| *v *= s);
        }
    }
    let bias_ix = 2;
    let old_bias = match lin.input(bias_ix).filter(|n| !n.is_empty()) {
        Some(name) => {
            let t = graph.constant(name)?;
            let v = t.to_f32();
            let beta = if is_conv { 1.0 } else { lin.attr_float("beta").unwrap_or(1.0) };
            match v.len() {
                n if n == channels => v.iter().map(|x| x * beta).collect(),
                1 => vec![v[0] * beta; channels],
                _ => return None,
            }
        }
        None => vec![0.0; channels],
    };
    let bias: Vec<f32> = (0..channels).map(|c| old_bias[c] * scale[c] + shift[c]).collect();
    replace_linear_params(graph, l, &w, &bias, tag)
}

/// Give the Conv or Gemm at `l` the weight `w` (its current weight's layout) and the bias
/// `bias`, as fresh initializers (`<node>.weight_<tag>`, `<node>.bias_<tag>`); a Gemm's `beta`
/// becomes 1. `None` (and nothing changed) when a value is not finite: a negative variance or
/// an overflow would bake NaN or infinity into the weights, which no loader accepts back.
pub(crate) fn replace_linear_params(
    graph: &mut Graph,
    l: usize,
    w: &[f32],
    bias: &[f32],
    tag: &str,
) -> Option<()> {
    if !w.iter().chain(bias).all(|v| v.is_finite()) {
        return None;
    }
    let lin = &graph.nodes[l];
    let weight_dims = graph.constant(lin.input(1)?)?.dims;
    let w_name = graph.fresh_name(&format!("{}.weight_{tag}", lin.name));
    let b_name = graph.fresh_name(&format!("{}.bias_{tag}", lin.name));
    graph.initializers.insert(w_name.clone(), Tensor::from_f32(weight_dims, w));
    graph.initializers.insert(b_name.clone(), Tensor::from_f32(vec![bias.len()], bias));
    let node = &mut graph.nodes[l];
    let is_conv = node.op_type == "Conv";
    node.inputs[1] = w_name;
    if node.inputs.len() < 3 {
        node.inputs.resize(3, String::new());
    }
    node.inputs[2] = b_name;
    if !is_conv && node.attr("beta").is_some() {
        // The bias now holds beta's factor. Written out rather than dropped: ONNX defaults it
        // to 1, but CrypTen 0.4.1's Gemm import requires the attribute.
        node.set_attr_float("beta", 1.0);
    }
    Some(())
}

//! Channel-affine rewrites of a linear layer: make a Conv or Gemm compute `scale * y + shift`
//! per output channel, or swap in new weights, by writing fresh initializers. Folding a
//! BatchNorm, recalibrating a reduced graph and folding a trained BatchNorm back all need it,
//! so it lives with the graph rather than with any one of them.

use super::{Graph, Tensor};

/// Make the Conv or Gemm at `l` compute `scale[c] * y[c] + shift[c]` per output channel `c`,
/// by rewriting its weight and bias into fresh initializers (`<node>.weight_<tag>`). `None`
/// (and nothing changed) when the node's layout does not allow it or a value would not be
/// finite.
pub fn apply_channel_affine(
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
pub fn replace_linear_params(
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

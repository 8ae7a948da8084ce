//! Channel-level ReLU reduction from calibration statistics.
//!
//! For each ReLU, calibration images (training split, never the test split) say how often each
//! channel's input is positive. A channel positive almost always is replaced by the identity,
//! one negative almost always by zero, and only the rest keep their ReLU. The emitted graph
//! gathers the kept channels, applies Relu to them alone and puts the channels back in order,
//! so a PI engine counts (and pays for) only those ReLUs.

use super::{Pass, PassContext};
use crate::analysis::shapes::infer_shapes;
use crate::error::{CompileError, ExitCode};
use crate::exec::tract::Runner;
use crate::ir::{Model, Node, Tensor};
use anyhow::Result;
use rayon::prelude::*;
use tract_onnx::pb;

pub struct ChannelThin {
    /// A channel is "almost always positive" when at least this fraction of its inputs is.
    pub threshold: f64,
}

impl ChannelThin {
    pub fn from_args(args: &[String]) -> Result<Box<dyn Pass>> {
        let threshold = super::one_number_arg(args, "channel-thin", "channel-thin(0.99)")?;
        if !(0.5..=1.0).contains(&threshold) {
            return Err(super::usage(format!(
                "channel-thin threshold {threshold} must lie in [0.5, 1]"
            )));
        }
        Ok(Box::new(ChannelThin { threshold }))
    }
}

/// Per-channel fraction of positive inputs for each ReLU input value, over calibration images.
pub fn positive_fractions(
    model: &Model,
    values: &[String],
    sample: &[usize],
    images: &[f32],
) -> Result<Vec<Vec<f64>>> {
    let shapes = infer_shapes(model, sample, 1)?;
    let mut probe = model.clone();
    probe.graph.outputs = values
        .iter()
        .map(|v| pb::ValueInfoProto { name: v.clone(), ..Default::default() })
        .collect();
    const BATCH: usize = 32;
    let runner = Runner::new(&probe, sample, BATCH)?;
    let per: usize = sample.iter().product();
    let channels: Vec<(usize, usize)> = values
        .iter()
        .map(|v| {
            let s = &shapes[v];
            (s[1], s[2..].iter().product::<usize>())
        })
        .collect();
    let counts = images
        .par_chunks(runner.batch() * per)
        .map(|chunk| -> Result<Vec<Vec<u64>>> {
            let outs = runner.run_all(chunk)?;
            Ok(outs
                .iter()
                .zip(&channels)
                .map(|(out, &(c, spatial))| {
                    let mut pos = vec![0u64; c];
                    for (i, v) in out.iter().enumerate() {
                        if *v > 0.0 {
                            pos[(i / spatial) % c] += 1;
                        }
                    }
                    pos
                })
                .collect())
        })
        .try_reduce(
            || channels.iter().map(|&(c, _)| vec![0u64; c]).collect(),
            |mut a, b| {
                for (x, y) in a.iter_mut().zip(b) {
                    x.iter_mut().zip(y).for_each(|(p, q)| *p += q);
                }
                Ok(a)
            },
        )?;
    let n = (images.len() / per) as f64;
    Ok(counts
        .into_iter()
        .zip(&channels)
        .map(|(pos, &(_, spatial))| {
            pos.into_iter().map(|p| p as f64 / (n * spatial as f64)).collect()
        })
        .collect())
}

impl Pass for ChannelThin {
    fn run(&self, model: &mut Model, ctx: &PassContext) -> Result<usize> {
        let images = ctx.calibration.as_deref().ok_or_else(|| {
            CompileError::new(
                ExitCode::Usage,
                "channel-thin needs calibration images (training split): give --data",
            )
        })?;
        let stats = channel_stats(model, &ctx.sample, images)?;
        Ok(apply_channel_thin(model, &stats, self.threshold))
    }
}

/// Calibration statistics of every plain ReLU: computed once, applied at any threshold.
#[derive(Debug, Clone)]
pub struct ChannelStats {
    /// (ReLU node name, its input value, the input's rank).
    targets: Vec<(String, String, usize)>,
    /// Per target, per channel: the fraction of positive inputs.
    fractions: Vec<Vec<f64>>,
}

pub fn channel_stats(model: &Model, sample: &[usize], images: &[f32]) -> Result<ChannelStats> {
    let shapes = infer_shapes(model, sample, 1)?;
    // Plain ReLUs on [N, C, ...] values; ReLU6 and leaky variants are left alone.
    let targets: Vec<(String, String, usize)> = model
        .graph
        .nodes
        .iter()
        .filter(|n| n.op_type == "Relu")
        .filter_map(|n| {
            let x = n.input(0)?;
            shapes.get(x).filter(|s| s.len() >= 2).map(|s| (n.name.clone(), x.to_string(), s.len()))
        })
        .collect();
    if targets.is_empty() {
        return Ok(ChannelStats { targets, fractions: vec![] });
    }
    let values: Vec<String> = targets.iter().map(|(_, x, _)| x.clone()).collect();
    let fractions = positive_fractions(model, &values, sample, images)?;
    Ok(ChannelStats { targets, fractions })
}

/// Rewrite every ReLU the statistics cover at `threshold`; returns how many changed.
pub fn apply_channel_thin(model: &mut Model, stats: &ChannelStats, threshold: f64) -> usize {
    let mut rewritten = 0;
    for ((name, x, rank), frac) in stats.targets.iter().zip(&stats.fractions) {
        let keep: Vec<i64> = (0..frac.len())
            .filter(|&c| frac[c] < threshold && frac[c] > 1.0 - threshold)
            .map(|c| c as i64)
            .collect();
        if keep.len() == frac.len() || !model.graph.nodes.iter().any(|n| &n.name == name) {
            continue;
        }
        let zero: Vec<usize> = (0..frac.len()).filter(|&c| frac[c] <= 1.0 - threshold).collect();
        if !zero.is_empty() && zero.len() < frac.len() && prune_zero_channels(model, name, x, &zero)
        {
            // The zero channels are gone from the producer and the consumers: thin what is left.
            let left: Vec<f64> =
                (0..frac.len()).filter(|c| !zero.contains(c)).map(|c| frac[c]).collect();
            let keep: Vec<i64> =
                (0..left.len()).filter(|&c| left[c] < threshold).map(|c| c as i64).collect();
            if keep.len() < left.len() {
                split_relu(model, name, x, &left, &keep, threshold, *rank);
            }
        } else {
            split_relu(model, name, x, frac, &keep, threshold, *rank);
        }
        rewritten += 1;
    }
    rewritten
}

/// Keep the ReLU of Relu `relu` (reading `input`, one image of which has shape `dims`,
/// `[C, ...]`) on the channels `kept` alone, the others becoming the identity: the graph
/// gathers the kept channels for the Relu, as channel thinning does. No channel kept removes
/// the Relu; all kept changes nothing. For learned masks (`relucompile linearize`).
pub fn keep_relu_channels(
    model: &mut Model,
    relu: &str,
    input: &str,
    dims: &[usize],
    kept: &[usize],
) {
    let channels = dims[0];
    if kept.len() == channels {
        return;
    }
    if kept.is_empty() {
        super::bypass_named(model, &[relu.to_string()]);
        return;
    }
    // Positive "almost always" at any threshold: the linear channels are the identity.
    let mut frac = vec![1.0; channels];
    for &c in kept {
        frac[c] = 0.5;
    }
    let keep: Vec<i64> = kept.iter().map(|&c| c as i64).collect();
    split_relu(model, relu, input, &frac, &keep, 1.0, dims.len() + 1);
}

/// Keep the ReLU of Relu `relu` (reading `input`, one image of which has shape `dims`) at the
/// flat positions `kept` of an image's activation alone (pixel masks): the graph flattens the
/// input to `[N, C*H*W]`, gathers the kept positions into one dense `[N, K]` Relu, puts them
/// back among the identity positions with a gather, and reshapes to `[N, C, H, W]`. So a PI
/// engine runs one vectorised ReLU of exactly K elements, whatever pattern the masks kept.
pub fn keep_relu_positions(
    model: &mut Model,
    relu: &str,
    input: &str,
    dims: &[usize],
    kept: &[usize],
) {
    let positions: usize = dims.iter().product();
    if kept.len() == positions {
        return;
    }
    if kept.is_empty() {
        super::bypass_named(model, &[relu.to_string()]);
        return;
    }
    let g = &mut model.graph;
    let ix = g.nodes.iter().position(|n| n.name == relu).expect("target exists");
    let out = g.nodes[ix].outputs[0].clone();
    let fresh = |g: &crate::ir::Graph, s: &str| g.fresh_name(&format!("{relu}.{s}"));
    let flat = fresh(g, "flat");
    let flat_out = fresh(g, "flat_out");
    let shape = fresh(g, "shape");
    let target: Vec<i64> = std::iter::once(-1).chain(dims.iter().map(|&d| d as i64)).collect();
    g.initializers.insert(shape.clone(), Tensor::from_i64(vec![target.len()], &target));
    let mut flatten =
        Node::new(fresh(g, "flatten"), "Flatten", vec![input.into()], vec![flat.clone()]);
    flatten.attributes.push(int_attr("axis", 1));
    let reshape =
        Node::new(fresh(g, "unflatten"), "Reshape", vec![flat_out.clone(), shape], vec![out]);
    g.nodes[ix].inputs[0] = flat.clone();
    g.nodes[ix].outputs[0] = flat_out;
    g.nodes.insert(ix + 1, reshape);
    g.nodes.insert(ix, flatten);
    // On `[N, C*H*W]`, positions are what channels are to `keep_relu_channels`.
    keep_relu_channels(model, relu, &flat, &[positions], kept);
}

/// Drop channels `zero` (whose ReLU output is almost always 0) from the Conv producing `x`
/// and from every Conv reading the ReLU's output, so neither computes them any more. Only
/// done when the producer is a Conv read by this ReLU alone and every reader of the ReLU is a
/// plain (group 1) Conv; returns false, changing nothing, otherwise.
fn prune_zero_channels(model: &mut Model, relu: &str, x: &str, zero: &[usize]) -> bool {
    let g = &model.graph;
    let producers = g.producers();
    let consumers = g.consumers();
    let Some(&p) = producers.get(x) else { return false };
    let Some(r) = g.nodes.iter().position(|n| n.name == relu) else { return false };
    let out = g.nodes[r].outputs[0].clone();
    let conv = |ix: usize| {
        g.nodes[ix].op_type == "Conv" && g.nodes[ix].attr_int("group").unwrap_or(1) == 1
    };
    let readers = consumers.get(out.as_str()).cloned().unwrap_or_default();
    if !conv(p)
        || consumers.get(x).map(|c| c.len()) != Some(1)
        || g.is_graph_output(x)
        || g.is_graph_output(&out)
        || readers.is_empty()
        || !readers.iter().all(|&c| conv(c) && g.nodes[c].input(0) == Some(out.as_str()))
    {
        return false;
    }
    // Every weight involved must be a constant we can rewrite.
    let weights: Option<Vec<Tensor>> = std::iter::once(p)
        .chain(readers.iter().copied())
        .map(|ix| g.nodes[ix].input(1).and_then(|w| g.constant(w)))
        .collect();
    let Some(weights) = weights else { return false };
    let bias = match g.nodes[p].input(2) {
        Some(b) => match g.constant(b) {
            Some(t) => Some(t),
            None => return false,
        },
        None => None,
    };
    let drop = |v: &[f32], dims: &[usize], axis: usize| -> (Vec<f32>, Vec<usize>) {
        let outer: usize = dims[..axis].iter().product();
        let inner: usize = dims[axis + 1..].iter().product();
        let mut kept = Vec::with_capacity(v.len());
        for o in 0..outer {
            for c in (0..dims[axis]).filter(|c| !zero.contains(c)) {
                let start = (o * dims[axis] + c) * inner;
                kept.extend_from_slice(&v[start..start + inner]);
            }
        }
        let mut new_dims = dims.to_vec();
        new_dims[axis] -= zero.len();
        (kept, new_dims)
    };
    let nodes: Vec<usize> = std::iter::once(p).chain(readers.iter().copied()).collect();
    for (k, (&ix, w)) in nodes.iter().zip(&weights).enumerate() {
        let axis = if k == 0 { 0 } else { 1 };
        let (values, dims) = drop(&w.to_f32(), &w.dims, axis);
        let name = model.graph.fresh_name(&format!("{}.weight_pruned", model.graph.nodes[ix].name));
        model.graph.initializers.insert(name.clone(), Tensor::from_f32(dims, &values));
        model.graph.nodes[ix].inputs[1] = name;
    }
    if let Some(b) = bias {
        let (values, dims) = drop(&b.to_f32(), &b.dims, 0);
        let name = model.graph.fresh_name(&format!("{}.bias_pruned", model.graph.nodes[p].name));
        model.graph.initializers.insert(name.clone(), Tensor::from_f32(dims, &values));
        model.graph.nodes[p].inputs[2] = name;
    }
    model.graph.remove_unused_initializers();
    true
}

fn int_attr(name: &str, i: i64) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Int as i32,
        i,
        ..Default::default()
    }
}

/// Replace Relu `name` (reading `x`) by: ReLU on the `keep` channels, identity on the positive
/// ones, zero on the negative ones, and a gather that restores the channel order.
fn split_relu(
    model: &mut Model,
    name: &str,
    x: &str,
    frac: &[f64],
    keep: &[i64],
    threshold: f64,
    rank: usize,
) {
    let g = &mut model.graph;
    let ix = g.nodes.iter().position(|n| n.name == name).expect("target exists");
    let out = g.nodes[ix].outputs[0].clone();
    let mut kept = vec![false; frac.len()];
    for &c in keep {
        kept[c as usize] = true;
    }
    let linear: Vec<i64> = (0..frac.len() as i64).filter(|&c| !kept[c as usize]).collect();
    // Position of each original channel in concat(keep, linear).
    let order: Vec<i64> = keep.iter().chain(&linear).copied().collect();
    let mut inverse = vec![0i64; order.len()];
    for (pos, &c) in order.iter().enumerate() {
        inverse[c as usize] = pos as i64;
    }
    let fresh = |g: &crate::ir::Graph, s: &str| g.fresh_name(&format!("{name}.{s}"));
    let mut nodes = Vec::new();
    let mut parts = Vec::new();
    if !keep.is_empty() {
        let idx = fresh(g, "keep_idx");
        g.initializers.insert(idx.clone(), Tensor::from_i64(vec![keep.len()], keep));
        let gathered = fresh(g, "keep");
        let relu_out = fresh(g, "keep_relu");
        let mut gather = Node::new(
            fresh(g, "gather_keep"),
            "Gather",
            vec![x.into(), idx],
            vec![gathered.clone()],
        );
        gather.attributes.push(int_attr("axis", 1));
        nodes.push(gather);
        nodes.push(Node::new(name.to_string(), "Relu", vec![gathered], vec![relu_out.clone()]));
        parts.push(relu_out);
    }
    let idx = fresh(g, "linear_idx");
    g.initializers.insert(idx.clone(), Tensor::from_i64(vec![linear.len()], &linear));
    let gathered = fresh(g, "linear");
    let mut gather =
        Node::new(fresh(g, "gather_linear"), "Gather", vec![x.into(), idx], vec![gathered.clone()]);
    gather.attributes.push(int_attr("axis", 1));
    nodes.push(gather);
    let mask: Vec<f32> =
        linear.iter().map(|&c| if frac[c as usize] >= threshold { 1.0 } else { 0.0 }).collect();
    if mask.contains(&0.0) {
        let mut dims = vec![1, linear.len()];
        dims.extend(std::iter::repeat_n(1, rank - 2));
        let m = fresh(g, "mask");
        g.initializers.insert(m.clone(), Tensor::from_f32(dims, &mask));
        let masked = fresh(g, "linear_masked");
        nodes.push(Node::new(fresh(g, "mask_mul"), "Mul", vec![gathered, m], vec![masked.clone()]));
        parts.push(masked);
    } else {
        parts.push(gathered);
    }
    let joined = if parts.len() == 1 {
        parts.pop().expect("one part")
    } else {
        let j = fresh(g, "joined");
        let mut concat = Node::new(fresh(g, "concat"), "Concat", parts, vec![j.clone()]);
        concat.attributes.push(int_attr("axis", 1));
        nodes.push(concat);
        j
    };
    let inv = fresh(g, "order");
    g.initializers.insert(inv.clone(), Tensor::from_i64(vec![inverse.len()], &inverse));
    let mut restore = Node::new(fresh(g, "restore"), "Gather", vec![joined, inv], vec![out]);
    restore.attributes.push(int_attr("axis", 1));
    nodes.push(restore);
    g.nodes.splice(ix..=ix, nodes);
}

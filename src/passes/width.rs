//! DeepReDuce's channel-width knob: every channel group keeps a fraction of its channels
//! (`width(0.5)`), so ReLUs fall by the fraction and MACs by about its square.
//!
//! Channels are tied across layers: a residual stream's channels are the outputs of several
//! convolutions added together, and every reader of the stream reads them all. So the pass
//! first groups values whose channel axis is the same (through ReLUs, pools, BatchNorm and
//! elementwise ops), then, per group, keeps the channels with the largest activations on the
//! calibration images (root mean square of the original graph's producer outputs), or with
//! the largest filter L1 norms when no data is given. Producers lose output channels,
//! consumers the matching input channels (a Flatten before a Gemm included), per-channel
//! constants are sliced alike. Groups that reach anything else (the graph's input or output,
//! Concat, Reshape, grouped convolutions) keep every channel.

use super::{Pass, PassContext};
use crate::analysis::shapes::{infer_shapes, Shapes};
use crate::error::{CompileError, ExitCode};
use crate::ir::{Graph, Model, Tensor};
use anyhow::Result;
use std::collections::{BTreeMap, HashMap};

pub struct Width {
    pub fraction: f64,
}

impl Width {
    pub fn from_args(args: &[String]) -> Result<Box<dyn Pass>> {
        let fraction = super::one_number_arg(args, "width", "width(0.5)")?;
        if !(fraction > 0.0 && fraction < 1.0) {
            return Err(super::usage(format!("width fraction {fraction} must lie in (0, 1)")));
        }
        Ok(Box::new(Width { fraction }))
    }
}

/// Ops whose output has its input's channels, one for one.
const CHANNEL_PRESERVING: &[&str] = &[
    "Relu",
    "Clip",
    "LeakyRelu",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "BatchNormalization",
    "Identity",
    "Dropout",
];
const ELEMENTWISE: &[&str] = &["Add", "Sum", "Sub", "Mul", "Div"];

/// How a node touches a channel group.
#[derive(Debug, Clone)]
enum Role {
    /// A Conv or Gemm... writing the group's channels: its weight's output axis.
    Producer(usize),
    /// A Conv reading them: its weight's input axis.
    ConvReader(usize),
    /// A Flatten of `[N, C, H, W]` read by a Gemm: the Gemm's feature axis, `spatial` per channel.
    FlattenGemm { gemm: usize, spatial: usize },
    /// A per-channel constant operand (input `input` of node `node`), or BN parameters.
    Constant { node: usize, input: usize },
}

#[derive(Default)]
struct UnionFind(HashMap<String, String>);

impl UnionFind {
    fn find(&mut self, v: &str) -> String {
        let parent = self.0.get(v).cloned().unwrap_or_else(|| v.to_string());
        if parent == v {
            return parent;
        }
        let root = self.find(&parent);
        self.0.insert(v.to_string(), root.clone());
        root
    }
    fn union(&mut self, a: &str, b: &str) {
        let (ra, rb) = (self.find(a), self.find(b));
        if ra != rb {
            // The smaller name becomes the root: deterministic whatever the visiting order.
            let (root, child) = if ra < rb { (ra, rb) } else { (rb, ra) };
            self.0.insert(child, root);
        }
    }
}

struct Group {
    channels: usize,
    roles: Vec<Role>,
    frozen: bool,
}

/// The channel groups of `graph`, by root value name (ordered: deterministic output).
fn channel_groups(graph: &Graph, shapes: &Shapes) -> BTreeMap<String, Group> {
    let is_const = |v: &str| graph.constant(v).is_some();
    let mut uf = UnionFind::default();
    for node in &graph.nodes {
        let Some(out) = node.outputs.first() else { continue };
        if CHANNEL_PRESERVING.contains(&node.op_type.as_str()) {
            if let Some(x) = node.input(0) {
                uf.union(x, out);
            }
        } else if ELEMENTWISE.contains(&node.op_type.as_str()) {
            for x in node.inputs.iter().filter(|x| !x.is_empty() && !is_const(x)) {
                if shapes.get(x.as_str()).map(|s| s.len()) == shapes.get(out).map(|s| s.len()) {
                    uf.union(x, out);
                }
            }
        }
    }
    let mut groups: BTreeMap<String, Group> = BTreeMap::new();
    let channels_of = |v: &str| shapes.get(v).filter(|s| s.len() == 4).map(|s| s[1]);
    let consumers = graph.consumers();
    let producers = graph.producers();
    let mut values: Vec<&str> =
        graph.nodes.iter().flat_map(|n| n.outputs.iter()).map(|s| s.as_str()).collect();
    values.extend(graph.inputs.iter().map(|v| v.name.as_str()));
    for v in values {
        let Some(c) = channels_of(v) else { continue };
        let root = uf.find(v);
        let g = groups.entry(root).or_insert(Group { channels: c, roles: vec![], frozen: false });
        if g.channels != c || graph.is_graph_output(v) || graph.is_graph_input(v) {
            g.frozen = true;
        }
        for &ix in consumers.get(v).map(|c| c.as_slice()).unwrap_or(&[]) {
            let n = &graph.nodes[ix];
            let op = n.op_type.as_str();
            let first = n.input(0) == Some(v);
            if CHANNEL_PRESERVING.contains(&op) && first {
                if op == "BatchNormalization" {
                    for input in 1..5 {
                        g.roles.push(Role::Constant { node: ix, input });
                    }
                }
                continue;
            }
            if ELEMENTWISE.contains(&op) {
                for (input, x) in n.inputs.iter().enumerate() {
                    if let Some(t) = graph.constant(x) {
                        match t.dims.as_slice() {
                            [1, d, 1, 1] if *d == c => {
                                g.roles.push(Role::Constant { node: ix, input })
                            }
                            dims if dims.iter().product::<usize>() == 1 => {}
                            _ => g.frozen = true,
                        }
                    }
                }
                continue;
            }
            if op == "Conv" && first && n.attr_int("group").unwrap_or(1) == 1 {
                g.roles.push(Role::ConvReader(ix));
                continue;
            }
            if op == "Flatten" && first && n.attr_int("axis").unwrap_or(1) == 1 {
                let readers =
                    consumers.get(n.outputs[0].as_str()).map(|c| c.as_slice()).unwrap_or(&[]);
                if let [gemm] = readers {
                    if graph.nodes[*gemm].op_type == "Gemm"
                        && graph.nodes[*gemm].input(0) == Some(n.outputs[0].as_str())
                    {
                        let spatial = shapes[v][2] * shapes[v][3];
                        g.roles.push(Role::FlattenGemm { gemm: *gemm, spatial });
                        continue;
                    }
                }
            }
            g.frozen = true;
        }
        // Producers: a Conv writing the value directly.
        if let Some(&p) = producers.get(v) {
            let n = &graph.nodes[p];
            if n.op_type == "Conv" {
                if n.attr_int("group").unwrap_or(1) == 1 {
                    g.roles.push(Role::Producer(p));
                } else {
                    g.frozen = true;
                }
            } else if !CHANNEL_PRESERVING.contains(&n.op_type.as_str())
                && !ELEMENTWISE.contains(&n.op_type.as_str())
            {
                g.frozen = true;
            }
        }
    }
    groups
}

/// Keep `keep` (sorted) along `axis` of `t`.
fn slice_axis(t: &Tensor, axis: usize, keep: &[usize], block: usize) -> Tensor {
    let values = t.to_f32();
    let dims = &t.dims;
    let outer: usize = dims[..axis].iter().product();
    let inner: usize = dims[axis + 1..].iter().product();
    let mut out = Vec::with_capacity(outer * keep.len() * block * inner);
    for o in 0..outer {
        for &k in keep {
            for b in 0..block {
                let start = (o * dims[axis] + k * block + b) * inner;
                out.extend_from_slice(&values[start..start + inner]);
            }
        }
    }
    let mut new_dims = dims.clone();
    new_dims[axis] = keep.len() * block;
    Tensor::from_f32(new_dims, &out)
}

/// Replace input `input` of node `node` (a constant) by `f(constant)` under a fresh name.
fn rewrite_constant(
    graph: &mut Graph,
    node: usize,
    input: usize,
    f: impl Fn(&Tensor) -> Tensor,
) -> Option<()> {
    let name = graph.nodes[node].input(input)?.to_string();
    let t = graph.constant(&name)?;
    let new = graph.fresh_name(&format!("{name}_width"));
    graph.initializers.insert(new.clone(), f(&t));
    graph.nodes[node].inputs[input] = new;
    Some(())
}

/// Per-channel importance: RMS of the original's producer outputs on calibration images when
/// known, else the producers' filter L1 norms.
fn channel_scores(graph: &Graph, g: &Group, ctx: &PassContext) -> Result<Vec<f64>> {
    let moments = match (&ctx.reference, &ctx.calibration) {
        (Some(r), Some(images)) => Some(r.moments(&ctx.sample, images)?),
        _ => None,
    };
    let mut score = vec![0.0; g.channels];
    for role in &g.roles {
        let Role::Producer(p) = role else { continue };
        let node = &graph.nodes[*p];
        let from_data = moments.as_ref().and_then(|m| m.get(&node.outputs[0]));
        match from_data {
            Some(m) => {
                for (c, s) in score.iter_mut().enumerate() {
                    *s += (m.mean[c] * m.mean[c] + m.std[c] * m.std[c]).sqrt();
                }
            }
            None => {
                if let Some(w) = node.input(1).and_then(|w| graph.constant(w)) {
                    let v = w.to_f32();
                    let per = v.len() / g.channels.max(1);
                    for (c, s) in score.iter_mut().enumerate() {
                        *s += v[c * per..(c + 1) * per].iter().map(|x| x.abs() as f64).sum::<f64>();
                    }
                }
            }
        }
    }
    Ok(score)
}

impl Pass for Width {
    fn run(&self, model: &mut Model, ctx: &PassContext) -> Result<usize> {
        let shapes = infer_shapes(model, &ctx.sample, 1)?;
        let groups = channel_groups(&model.graph, &shapes);
        let mut narrowed = 0;
        for g in groups.values().filter(|g| !g.frozen && g.channels > 1) {
            if !g.roles.iter().any(|r| matches!(r, Role::Producer(_))) {
                continue;
            }
            let k = ((g.channels as f64 * self.fraction).round() as usize).clamp(1, g.channels);
            if k == g.channels {
                continue;
            }
            let scores = channel_scores(&model.graph, g, ctx)?;
            let mut order: Vec<usize> = (0..g.channels).collect();
            order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
            let mut keep = order[..k].to_vec();
            keep.sort();
            let graph = &mut model.graph;
            for role in &g.roles {
                let done = match *role {
                    Role::Producer(p) => {
                        rewrite_constant(graph, p, 1, |t| slice_axis(t, 0, &keep, 1)).and_then(
                            |_| match graph.nodes[p].input(2) {
                                Some(_) => {
                                    rewrite_constant(graph, p, 2, |t| slice_axis(t, 0, &keep, 1))
                                }
                                None => Some(()),
                            },
                        )
                    }
                    Role::ConvReader(r) => {
                        rewrite_constant(graph, r, 1, |t| slice_axis(t, 1, &keep, 1))
                    }
                    Role::FlattenGemm { gemm, spatial } => {
                        let axis = if graph.nodes[gemm].attr_int("transB").unwrap_or(0) != 0 {
                            1
                        } else {
                            0
                        };
                        rewrite_constant(graph, gemm, 1, |t| slice_axis(t, axis, &keep, spatial))
                    }
                    Role::Constant { node, input } => {
                        let rank = graph.nodes[node]
                            .input(input)
                            .and_then(|n| graph.constant(n))
                            .map(|t| t.dims.len());
                        let axis = if rank == Some(1) { 0 } else { 1 };
                        rewrite_constant(graph, node, input, |t| slice_axis(t, axis, &keep, 1))
                    }
                };
                if done.is_none() {
                    return Err(CompileError::new(
                        ExitCode::Unsupported,
                        "width: a weight of a narrowed channel group is not a constant".to_string(),
                    )
                    .into());
                }
            }
            narrowed += 1;
        }
        model.graph.remove_unused_initializers();
        infer_shapes(model, &ctx.sample, 1)?;
        Ok(narrowed)
    }
}

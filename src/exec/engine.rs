//! The evaluator's own forward-only interpreter, for speed.
//!
//! tract runs a batch of N images as N times the work and reached 0.54x onnxruntime's best
//! throughput on the shipped ResNet (1,506 against 2,785-3,577 images/s, scripts/bench_eval.py).
//! This engine runs whole batches through the training engine's convolution
//! ([`crate::kernels::conv`]: the direct AVX-512 kernel on planes 7 or more wide, im2col + gemm
//! on the rest), fuses a ReLU into the Conv, Gemm, Add or BatchNormalization whose
//! only reader it is, frees every activation after its last reader, and is run one batch per
//! thread by the evaluator, so nothing between the gemms is serial.
//!
//! It takes the operators the passes emit and the shipped models use; a graph with any other
//! operator is refused at [`Engine::new`] and the evaluator runs it under tract. tract stays the
//! independent check: the compile harness compares graphs under tract, and the tests compare
//! this engine's outputs with tract's.

use super::op::{axis, reduce_axes, reshape_dims, Op};
use crate::error::CompileError;
use crate::ir::{DataType, Model, Node, Tensor as IrTensor};
use crate::kernels::conv::{self, Conv2dParams, ConvGeometry, ConvPlan, MatRef};
use crate::kernels::elementwise::{add_in_place, affine_in_place, relu_in_place};
use crate::kernels::pool::{self, Pool2dParams};
use anyhow::{Context, Result};
use std::collections::{BTreeMap, HashMap};
use std::sync::OnceLock;

/// Images a trial run uses to check, when the engine is built, that the graph runs batched.
const TRIAL_BATCH: usize = 2;

enum Kernel {
    Conv {
        weight: Vec<f32>,
        dims: [usize; 4],
        bias: Option<Vec<f32>>,
        params: Conv2dParams,
        /// Built on the first batch, for the sizes of one image (the engine's sample is fixed).
        plan: Box<OnceLock<(ConvGeometry, ConvPlan)>>,
    },
    /// `y = x @ weight + bias`, `weight` `[k, n]` row-major (Gemm's alpha, beta and
    /// transposes already applied), `x` `[rows, k]`.
    Dense {
        weight: Vec<f32>,
        k: usize,
        n: usize,
        bias: Option<Vec<f32>>,
    },
    /// Per-channel (axis 1) `y = x * scale + shift`: inference BatchNormalization.
    ChannelAffine {
        scale: Vec<f32>,
        shift: Vec<f32>,
    },
    /// Two activations of one shape.
    Add,
    Relu,
    /// Clip to `[lo, hi]` (constant bounds).
    Clip(f32, f32),
    Pool(Pool2dParams),
    GlobalAverage,
    GlobalMax,
    Flatten(i64),
    Reshape(Vec<i64>),
    /// Identity, Dropout (inference).
    Copy,
    /// Gather along an axis with constant indices (1-D).
    Gather {
        axis: i64,
        indices: Vec<i64>,
    },
    Concat(i64),
    /// Element-wise arithmetic of two activations, or of one and a constant, with numpy
    /// broadcasting (the input normalisation exporters put in the graph, a squeeze-excite
    /// block's scaling).
    Binary {
        op: Arith,
        /// The constant operand and whether it comes first (`c - x`).
        constant: Option<(Vec<f32>, Vec<usize>, bool)>,
    },
    /// The sum of any number of activations.
    Sum,
    /// Mean over axes (the attribute's, or constant input 1's; resolved per batch).
    ReduceMean {
        axes: Option<Vec<i64>>,
        keepdims: bool,
    },
    Sigmoid,
    /// Softmax along the last axis (given as `axis`, resolved per batch).
    Softmax(i64),
    /// Zero padding, `[begin..., end...]` per axis.
    Pad(Vec<i64>),
}

/// An element-wise arithmetic operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Arith {
    Add,
    Sub,
    Mul,
    Div,
}

impl Arith {
    #[inline(always)]
    fn apply(self, a: f32, b: f32) -> f32 {
        match self {
            Arith::Add => a + b,
            Arith::Sub => a - b,
            Arith::Mul => a * b,
            Arith::Div => a / b,
        }
    }
}

struct Step {
    kernel: Kernel,
    /// A ReLU fused into this step's output.
    relu: bool,
    inputs: Vec<usize>,
    output: usize,
    /// Slots read for the last time here, freed after the step.
    release: Vec<usize>,
    label: String,
}

/// One activation: row-major data and its dims (batch first).
struct Value {
    data: Vec<f32>,
    dims: Vec<usize>,
}

/// A graph prepared for the engine. Immutable, so one `Engine` serves every thread.
pub struct Engine {
    steps: Vec<Step>,
    slots: usize,
    output: usize,
    sample: Vec<usize>,
}

fn unsupported(node: &Node, why: impl std::fmt::Display) -> anyhow::Error {
    CompileError::unsupported(format!("node {}: {why}", node.label())).into()
}

impl Engine {
    /// Prepare `model` for samples of shape `sample` (without the batch). Refuses graphs with
    /// an operator, attribute or shape it does not take, with the node at fault named.
    pub fn new(model: &Model, sample: &[usize]) -> Result<Self> {
        // Every batch allocates and frees the same few-megabyte activations; without this
        // glibc returns them to the kernel and page-faults them back (2,370 against 1,915
        // images/s on the shipped ResNet).
        crate::kernels::malloc::retain_freed_memory();
        let graph = &model.graph;
        let input = &graph.inputs.first().context("the graph has no input")?.name;
        let output_name = &graph.outputs.first().context("the graph has no output")?.name;
        let mut constants: BTreeMap<&str, IrTensor> =
            graph.initializers.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        let mut readers: HashMap<&str, usize> = HashMap::new();
        for node in &graph.nodes {
            if node.op_type == "Constant" {
                let value = node
                    .attr("value")
                    .and_then(|a| a.t.as_ref())
                    .ok_or_else(|| unsupported(node, "a Constant without a tensor value"))?;
                let t = IrTensor::from_proto(value, None).map_err(|e| unsupported(node, e))?;
                constants.insert(&node.outputs[0], t);
            }
            // The TorchScript exporter passes some weights through Identity nodes.
            if matches!(node.op_type.as_str(), "Identity" | "Dropout") {
                if let Some(t) = node.input(0).and_then(|i| constants.get(i)).cloned() {
                    constants.insert(&node.outputs[0], t);
                }
            }
            for i in node.inputs.iter().filter(|i| !i.is_empty()) {
                *readers.entry(i.as_str()).or_default() += 1;
            }
        }
        let mut slot_of: HashMap<&str, usize> = HashMap::from([(input.as_str(), 0)]);
        let mut producer: HashMap<usize, usize> = HashMap::new();
        let mut steps: Vec<Step> = Vec::new();
        let is_constant = |n: &Node| {
            n.op_type == "Constant"
                || n.outputs.first().is_some_and(|o| constants.contains_key(o.as_str()))
        };
        for node in graph.nodes.iter().filter(|n| !is_constant(n)) {
            let activation = |name: &str| {
                slot_of.get(name).copied().ok_or_else(|| {
                    unsupported(node, format!("input {name} is not computed from the graph input"))
                })
            };
            let floats = |ix: usize| -> Result<Option<&IrTensor>> {
                match node.input(ix).filter(|n| !n.is_empty()) {
                    None => Ok(None),
                    Some(n) => match constants.get(n) {
                        Some(t) if t.data_type == DataType::F32 => Ok(Some(t)),
                        _ => Err(unsupported(node, format!("input {n} is not a float constant"))),
                    },
                }
            };
            let ints = |ix: usize| -> Result<Vec<i64>> {
                let name =
                    node.input(ix).ok_or_else(|| unsupported(node, "an input is missing"))?;
                match constants.get(name) {
                    Some(t) if matches!(t.data_type, DataType::I64 | DataType::I32) => {
                        Ok(t.to_i64())
                    }
                    _ => Err(unsupported(node, format!("input {name} is not an integer constant"))),
                }
            };
            let op = Op::decode(node).map_err(|e| unsupported(node, e))?;
            let arith = match op {
                Op::Add => Some(Arith::Add),
                Op::Sub => Some(Arith::Sub),
                Op::Mul => Some(Arith::Mul),
                Op::Div => Some(Arith::Div),
                _ => None,
            };
            // Arithmetic may take its constant first (`c - x`); every other op's input 0 is
            // an activation.
            let constant_first =
                arith.is_some() && node.input(0).is_some_and(|n| constants.contains_key(n));
            let x =
                if constant_first { None } else { node.input(0).map(activation).transpose()? };
            let mut inputs: Vec<usize> = x.into_iter().collect();
            let kernel = match op {
                Op::Conv(params) => {
                    let w = floats(1)?.ok_or_else(|| unsupported(node, "no weight"))?;
                    let dims = <[usize; 4]>::try_from(w.dims.as_slice())
                        .map_err(|_| unsupported(node, "only 2-D convolutions are taken"))?;
                    Kernel::Conv {
                        weight: w.to_f32(),
                        dims,
                        bias: floats(2)?.map(IrTensor::to_f32),
                        params,
                        plan: Box::default(),
                    }
                }
                Op::Gemm { trans_a, trans_b, alpha, beta } => {
                    if trans_a {
                        return Err(unsupported(node, "transA is not taken"));
                    }
                    dense(node, floats(1)?, floats(2)?, trans_b, alpha, beta)?
                }
                Op::MatMul => dense(node, floats(1)?, None, false, 1.0, 1.0)?,
                Op::BatchNormalization { epsilon: eps } => {
                    let get = |i| floats(i)?.ok_or_else(|| unsupported(node, "missing input"));
                    let (gamma, beta) = (get(1)?.to_f32(), get(2)?.to_f32());
                    let (mean, var) = (get(3)?.to_f32(), get(4)?.to_f32());
                    let scale: Vec<f32> =
                        gamma.iter().zip(&var).map(|(g, v)| g / (v + eps).sqrt()).collect();
                    let shift =
                        beta.iter().zip(&mean).zip(&scale).map(|((b, m), s)| b - m * s).collect();
                    Kernel::ChannelAffine { scale, shift }
                }
                // A per-channel constant factor (`channel-thin`'s mask of channels that become
                // zero): without it every such search candidate ran under tract, one image at
                // a time.
                Op::Add | Op::Sub | Op::Mul | Op::Div => {
                    let op = arith.context("an arithmetic operator")?;
                    let second = node.input(1).unwrap_or_default();
                    let constant = |ix: usize| {
                        floats(ix)?.ok_or_else(|| unsupported(node, "a missing operand"))
                    };
                    match (constant_first, constants.contains_key(second)) {
                        (true, true) => {
                            return Err(unsupported(node, "both operands are constants"))
                        }
                        (false, false) => {
                            inputs.push(activation(second)?);
                            match op {
                                Arith::Add => Kernel::Add,
                                _ => Kernel::Binary { op, constant: None },
                            }
                        }
                        (true, false) => {
                            inputs.push(activation(second)?);
                            let c = constant(0)?;
                            Kernel::Binary {
                                op,
                                constant: Some((c.to_f32(), c.dims.clone(), true)),
                            }
                        }
                        (false, true) => {
                            let c = constant(1)?;
                            // A per-channel factor (`channel-thin`'s mask of channels that
                            // become zero) as a channel affine map, which fuses a ReLU: without
                            // it every such search candidate ran under tract.
                            let per_channel = c.dims.len() >= 2
                                && c.dims[0] == 1
                                && c.dims[2..].iter().all(|&d| d == 1);
                            if op == Arith::Mul && per_channel {
                                let scale = c.to_f32();
                                Kernel::ChannelAffine { shift: vec![0.0; scale.len()], scale }
                            } else {
                                Kernel::Binary {
                                    op,
                                    constant: Some((c.to_f32(), c.dims.clone(), false)),
                                }
                            }
                        }
                    }
                }
                Op::Sum => {
                    for name in &node.inputs[1..] {
                        inputs.push(activation(name)?);
                    }
                    Kernel::Sum
                }
                Op::ReduceMean { axes, keepdims } => {
                    let axes = match (axes, node.input(1).filter(|n| !n.is_empty())) {
                        (Some(a), _) => Some(a),
                        (None, Some(_)) => Some(ints(1)?),
                        (None, None) => None,
                    };
                    Kernel::ReduceMean { axes, keepdims }
                }
                Op::Sigmoid => Kernel::Sigmoid,
                Op::Softmax { axis } => Kernel::Softmax(axis),
                Op::Pad { pads } => Kernel::Pad(match pads {
                    Some(p) => p,
                    None => ints(1)?,
                }),
                Op::Relu => Kernel::Relu,
                Op::Clip { min, max } => {
                    let bound = |ix: usize, attr: Option<f32>, default: f32| -> Result<f32> {
                        Ok(match floats(ix)? {
                            Some(t) => *t
                                .to_f32()
                                .first()
                                .ok_or_else(|| unsupported(node, "an empty bound"))?,
                            None => attr.unwrap_or(default),
                        })
                    };
                    let (lo, hi) = (bound(1, min, f32::MIN)?, bound(2, max, f32::MAX)?);
                    if lo.is_nan() || hi.is_nan() || lo > hi {
                        return Err(unsupported(node, format!("Clip bounds {lo} > {hi}")));
                    }
                    Kernel::Clip(lo, hi)
                }
                Op::Pool(params) => Kernel::Pool(params),
                Op::GlobalAveragePool => Kernel::GlobalAverage,
                Op::GlobalMaxPool => Kernel::GlobalMax,
                Op::Flatten { axis } => Kernel::Flatten(axis),
                Op::Reshape => Kernel::Reshape(ints(1)?),
                Op::Identity => Kernel::Copy,
                Op::Gather { axis } => {
                    let name = node.input(1).unwrap_or_default();
                    let rank = constants.get(name).map(|t| t.dims.len());
                    if rank != Some(1) {
                        return Err(unsupported(node, "only 1-D constant indices are taken"));
                    }
                    Kernel::Gather { axis, indices: ints(1)? }
                }
                Op::Concat { axis } => {
                    for name in &node.inputs[1..] {
                        inputs.push(activation(name)?);
                    }
                    Kernel::Concat(axis)
                }
                Op::Slice => {
                    return Err(unsupported(
                        node,
                        format!("operator {} is not taken", node.op_type),
                    ))
                }
            };
            if inputs.is_empty() {
                return Err(unsupported(node, "no input"));
            }
            let out_name = node.outputs.first().ok_or_else(|| unsupported(node, "no output"))?;
            // A Relu that is the only reader of a fusible step's output joins that step.
            if let Kernel::Relu = kernel {
                let src = node.input(0).unwrap_or_default();
                if let Some(&p) = producer.get(&inputs[0]) {
                    let fusible = matches!(
                        steps[p].kernel,
                        Kernel::Conv { .. }
                            | Kernel::Dense { .. }
                            | Kernel::ChannelAffine { .. }
                            | Kernel::Add
                    );
                    if fusible
                        && !steps[p].relu
                        && readers.get(src) == Some(&1)
                        && src != output_name
                    {
                        steps[p].relu = true;
                        slot_of.insert(out_name, inputs[0]);
                        continue;
                    }
                }
            }
            let output = slot_of.len();
            slot_of.insert(out_name, output);
            producer.insert(output, steps.len());
            steps.push(Step {
                kernel,
                relu: false,
                inputs,
                output,
                release: Vec::new(),
                label: node.label(),
            });
        }
        let output = *slot_of
            .get(output_name.as_str())
            .with_context(|| format!("the graph output {output_name} is never computed"))?;
        let mut last_read: HashMap<usize, usize> = HashMap::new();
        for (ix, step) in steps.iter().enumerate() {
            for &i in &step.inputs {
                last_read.insert(i, ix);
            }
        }
        for (slot, ix) in last_read {
            if slot != output {
                steps[ix].release.push(slot);
            }
        }
        let engine = Engine { steps, slots: slot_of.len(), output, sample: sample.to_vec() };
        // Shapes are only known at run time: a trial batch finds a graph that cannot run
        // batched (a Reshape baked to batch 1) or on this sample shape, here rather than later.
        let per: usize = sample.iter().product();
        engine.run(&vec![0.0; TRIAL_BATCH * per]).context("a trial batch")?;
        Ok(engine)
    }

    pub fn sample_len(&self) -> usize {
        self.sample.iter().product()
    }

    /// The first output for a batch of whole samples, row-major, and its length per sample.
    pub fn run(&self, input: &[f32]) -> Result<(Vec<f32>, usize)> {
        let per = self.sample_len();
        let n = input.len() / per.max(1);
        anyhow::ensure!(n > 0 && n * per == input.len(), "a batch must hold whole samples");
        let mut slots: Vec<Option<Value>> = (0..self.slots).map(|_| None).collect();
        let mut dims = vec![n];
        dims.extend_from_slice(&self.sample);
        slots[0] = Some(Value { data: input.to_vec(), dims });
        for step in &self.steps {
            let y = run_step(step, &mut slots).with_context(|| format!("node {}", step.label))?;
            for &r in &step.release {
                slots[r] = None;
            }
            slots[step.output] = Some(y);
        }
        let out = slots[self.output].take().context("the graph output was not computed")?;
        let width = out.data.len() / n;
        Ok((out.data, width))
    }
}

/// Gemm (`transA` 0, constant B and C) or MatMul (no C) by a constant 2-D matrix, as
/// [`Kernel::Dense`].
fn dense(
    node: &Node,
    b: Option<&IrTensor>,
    c: Option<&IrTensor>,
    trans_b: bool,
    alpha: f32,
    beta: f32,
) -> Result<Kernel> {
    let b = b.ok_or_else(|| unsupported(node, "the weight is not a float constant"))?;
    let [r, cols] = <[usize; 2]>::try_from(b.dims.as_slice())
        .map_err(|_| unsupported(node, "the weight is not 2-D"))?;
    let (k, n) = if trans_b { (cols, r) } else { (r, cols) };
    let src = b.to_f32();
    let mut weight = vec![0f32; k * n];
    for i in 0..k {
        for j in 0..n {
            weight[i * n + j] = alpha * if trans_b { src[j * cols + i] } else { src[i * cols + j] };
        }
    }
    let bias = match c {
        None => None,
        Some(c) => {
            let v = c.to_f32();
            let v: Vec<f32> = match v.len() {
                1 => vec![v[0]; n],
                len if len == n => v,
                _ => return Err(unsupported(node, "only a per-output bias C is taken")),
            };
            Some(v.iter().map(|x| x * beta).collect())
        }
    };
    Ok(Kernel::Dense { weight, k, n, bias })
}

/// The input at `slot`, taken when this step is its last reader, else copied.
fn take_or_copy(slots: &mut [Option<Value>], slot: usize, last: bool) -> Result<Value> {
    let v = if last { slots[slot].take() } else { None };
    match v {
        Some(v) => Ok(v),
        None => {
            let v = slots[slot].as_ref().context("an input was freed too early")?;
            Ok(Value { data: v.data.clone(), dims: v.dims.clone() })
        }
    }
}

fn input<'a>(step: &Step, slots: &'a [Option<Value>], i: usize) -> Result<&'a Value> {
    slots[step.inputs[i]].as_ref().context("an input was freed too early")
}

fn run_step(step: &Step, slots: &mut [Option<Value>]) -> Result<Value> {
    let last = |slot: usize| {
        step.release.contains(&slot) && step.inputs.iter().filter(|&&s| s == slot).count() == 1
    };
    let mut y = match &step.kernel {
        Kernel::Conv { weight, dims, bias, params, plan } => {
            let x = input(step, slots, 0)?;
            let g = ConvGeometry::new(&x.dims, dims, *params).map_err(anyhow::Error::msg)?;
            let (bias, one) = (bias.as_deref(), ConvGeometry { n: 1, ..g });
            let (planned, plan) = plan.get_or_init(|| (one, ConvPlan::new(weight, bias, &one)));
            let data = if *planned == one {
                conv::forward_planned(plan, &x.data, weight, bias, &g, step.relu)
            } else {
                conv::forward_fused(&x.data, weight, bias, &g, step.relu)
            };
            return Ok(Value { data, dims: g.out_dims().to_vec() });
        }
        Kernel::Dense { weight, k, n, bias } => {
            let x = input(step, slots, 0)?;
            let rows = x.data.len() / k;
            anyhow::ensure!(
                rows * k == x.data.len() && x.dims.last() == Some(k),
                "input {:?} is not [rows, {k}]",
                x.dims
            );
            let mut data = vec![0f32; rows * n];
            if let Some(b) = bias {
                for row in data.chunks_exact_mut(*n) {
                    row.copy_from_slice(b);
                }
            }
            let a = MatRef::new(&x.data, rows, *k);
            conv::matmul(
                &mut data,
                a,
                MatRef::new(weight, *k, *n),
                bias.is_some(),
                gemm::Parallelism::None,
            );
            let mut dims = x.dims.clone();
            *dims.last_mut().unwrap_or(&mut 0) = *n;
            Value { data, dims }
        }
        Kernel::ChannelAffine { scale, shift } => {
            let mut v = take_or_copy(slots, step.inputs[0], last(step.inputs[0]))?;
            anyhow::ensure!(
                v.dims.len() >= 2 && v.dims[1] == scale.len(),
                "input {:?} does not have {} channels",
                v.dims,
                scale.len()
            );
            let inner: usize = v.dims[2..].iter().product();
            for (ci, plane) in v.data.chunks_exact_mut(inner.max(1)).enumerate() {
                let c = ci % scale.len();
                affine_in_place(plane, scale[c], shift[c], step.relu);
            }
            return Ok(v);
        }
        Kernel::Add if !same_dims(step, slots)? => {
            let (a, b) = (input(step, slots, 0)?, input(step, slots, 1)?);
            broadcast(Arith::Add, (&a.data, &a.dims), (&b.data, &b.dims))?
        }
        Kernel::Add => {
            let (a, b) = (step.inputs[0], step.inputs[1]);
            let (keep, other) = if last(a) { (a, b) } else { (b, a) };
            let mut v = take_or_copy(slots, keep, last(keep))?;
            let o = slots[other].as_ref().context("an input was freed too early")?;
            anyhow::ensure!(
                v.dims == o.dims,
                "Add of {:?} and {:?}: only equal shapes are taken",
                v.dims,
                o.dims
            );
            add_in_place(&mut v.data, &o.data, step.relu);
            return Ok(v);
        }
        Kernel::Relu => {
            let mut v = take_or_copy(slots, step.inputs[0], last(step.inputs[0]))?;
            relu_in_place(&mut v.data);
            return Ok(v);
        }
        Kernel::Pool(p) => {
            let x = input(step, slots, 0)?;
            anyhow::ensure!(x.dims.len() == 4, "only 2-D pools are taken");
            let (h, w) = (x.dims[2], x.dims[3]);
            let (oh, ow) = pool::out_dims(h, w, p).map_err(anyhow::Error::msg)?;
            Value {
                data: pool::forward(&x.data, h, w, p),
                dims: vec![x.dims[0], x.dims[1], oh, ow],
            }
        }
        Kernel::GlobalAverage | Kernel::GlobalMax => {
            let x = input(step, slots, 0)?;
            anyhow::ensure!(x.dims.len() >= 3, "a global pool needs spatial axes");
            let inner: usize = x.dims[2..].iter().product();
            let max = matches!(step.kernel, Kernel::GlobalMax);
            let data = x
                .data
                .chunks_exact(inner.max(1))
                .map(|p| {
                    if max {
                        p.iter().copied().fold(f32::NEG_INFINITY, f32::max)
                    } else {
                        conv::sum(p) / inner as f32
                    }
                })
                .collect();
            let mut dims = x.dims.clone();
            dims[2..].iter_mut().for_each(|d| *d = 1);
            Value { data, dims }
        }
        Kernel::Flatten(a) => {
            let mut v = take_or_copy(slots, step.inputs[0], last(step.inputs[0]))?;
            let a = if *a == v.dims.len() as i64 { v.dims.len() } else { axis(*a, v.dims.len())? };
            v.dims = vec![v.dims[..a].iter().product(), v.dims[a..].iter().product()];
            return Ok(v);
        }
        Kernel::Reshape(target) => {
            let mut v = take_or_copy(slots, step.inputs[0], last(step.inputs[0]))?;
            let mut dims = reshape_dims(&v.dims, target)?;
            // A target shape exported with the batch baked in as 1 (`[1, 512]`): the batch
            // is the first axis on both sides, so it takes this batch's size.
            let n = v.dims.first().copied().unwrap_or(1);
            if target.first() == Some(&1) && dims.iter().product::<usize>() * n == v.data.len() {
                dims[0] = n;
            }
            anyhow::ensure!(
                dims.iter().product::<usize>() == v.data.len(),
                "cannot reshape {:?} to {target:?}",
                v.dims
            );
            v.dims = dims;
            return Ok(v);
        }
        Kernel::Clip(lo, hi) => {
            let mut v = take_or_copy(slots, step.inputs[0], last(step.inputs[0]))?;
            for x in &mut v.data {
                *x = x.clamp(*lo, *hi);
            }
            return Ok(v);
        }
        Kernel::Copy => return take_or_copy(slots, step.inputs[0], last(step.inputs[0])),
        Kernel::Gather { axis: a, indices } => {
            let x = input(step, slots, 0)?;
            let a = axis(*a, x.dims.len())?;
            let size = x.dims[a];
            let idx = indices
                .iter()
                .map(|&i| {
                    usize::try_from(if i < 0 { i + size as i64 } else { i })
                        .ok()
                        .filter(|&i| i < size)
                })
                .collect::<Option<Vec<usize>>>()
                .with_context(|| format!("an index is out of range for an axis of {size}"))?;
            let inner: usize = x.dims[a + 1..].iter().product();
            let outer: usize = x.dims[..a].iter().product();
            let mut data = Vec::with_capacity(outer * idx.len() * inner);
            for o in 0..outer {
                let base = o * size * inner;
                for &i in &idx {
                    data.extend_from_slice(&x.data[base + i * inner..][..inner]);
                }
            }
            let mut dims = x.dims.clone();
            dims[a] = idx.len();
            Value { data, dims }
        }
        Kernel::Binary { op, constant } => {
            let x = input(step, slots, 0)?;
            match constant {
                Some((c, dims, true)) => broadcast(*op, (c, dims), (&x.data, &x.dims))?,
                Some((c, dims, false)) => broadcast(*op, (&x.data, &x.dims), (c, dims))?,
                None => {
                    let y = input(step, slots, 1)?;
                    broadcast(*op, (&x.data, &x.dims), (&y.data, &y.dims))?
                }
            }
        }
        Kernel::Sum => {
            let mut v = take_or_copy(slots, step.inputs[0], last(step.inputs[0]))?;
            for i in 1..step.inputs.len() {
                let o = input(step, slots, i)?;
                if o.dims == v.dims {
                    add_in_place(&mut v.data, &o.data, false);
                } else {
                    v = broadcast(Arith::Add, (&v.data, &v.dims), (&o.data, &o.dims))?;
                }
            }
            v
        }
        Kernel::ReduceMean { axes, keepdims } => {
            let x = input(step, slots, 0)?;
            let rank = x.dims.len();
            let axes = reduce_axes(axes.as_deref(), None, rank)?;
            // Trailing axes only (a global average over the spatial axes): each mean is then
            // one contiguous block.
            let first = axes.first().copied().unwrap_or(rank);
            anyhow::ensure!(
                axes.iter().copied().eq(first..rank),
                "ReduceMean over axes {axes:?} of a rank-{rank} value: only trailing axes are taken"
            );
            let inner: usize = x.dims[first..].iter().product();
            let data =
                x.data.chunks_exact(inner.max(1)).map(|p| conv::sum(p) / inner as f32).collect();
            let mut dims = x.dims[..first].to_vec();
            if *keepdims {
                dims.extend(std::iter::repeat_n(1, rank - first));
            }
            Value { data, dims }
        }
        Kernel::Sigmoid => {
            let mut v = take_or_copy(slots, step.inputs[0], last(step.inputs[0]))?;
            for x in &mut v.data {
                *x = 1.0 / (1.0 + (-*x).exp());
            }
            return Ok(v);
        }
        Kernel::Softmax(a) => {
            let mut v = take_or_copy(slots, step.inputs[0], last(step.inputs[0]))?;
            let rank = v.dims.len();
            anyhow::ensure!(
                axis(*a, rank)? + 1 == rank,
                "Softmax along axis {a} of a rank-{rank} value: only the last axis is taken"
            );
            let width = v.dims[rank - 1].max(1);
            for row in v.data.chunks_exact_mut(width) {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut total = 0.0;
                for x in row.iter_mut() {
                    *x = (*x - max).exp();
                    total += *x;
                }
                row.iter_mut().for_each(|x| *x /= total);
            }
            return Ok(v);
        }
        Kernel::Pad(pads) => {
            let x = input(step, slots, 0)?;
            pad_zeros(x, pads)?
        }
        Kernel::Concat(a) => {
            let parts: Vec<&Value> =
                (0..step.inputs.len()).map(|i| input(step, slots, i)).collect::<Result<_>>()?;
            let rank = parts[0].dims.len();
            let a = axis(*a, rank)?;
            let outer: usize = parts[0].dims[..a].iter().product();
            for p in &parts {
                anyhow::ensure!(
                    p.dims.len() == rank
                        && p.dims[..a] == parts[0].dims[..a]
                        && p.dims[a + 1..] == parts[0].dims[a + 1..],
                    "Concat of mismatched shapes"
                );
            }
            let mut data = Vec::with_capacity(parts.iter().map(|p| p.data.len()).sum());
            for o in 0..outer {
                for p in &parts {
                    let len = p.data.len() / outer.max(1);
                    data.extend_from_slice(&p.data[o * len..][..len]);
                }
            }
            let mut dims = parts[0].dims.clone();
            dims[a] = parts.iter().map(|p| p.dims[a]).sum();
            Value { data, dims }
        }
    };
    if step.relu {
        relu_in_place(&mut y.data);
    }
    Ok(y)
}

/// Whether a two-input step's inputs have one shape.
fn same_dims(step: &Step, slots: &[Option<Value>]) -> Result<bool> {
    Ok(input(step, slots, 0)?.dims == input(step, slots, 1)?.dims)
}

/// `op` of `a` and `b` with numpy broadcasting.
fn broadcast(op: Arith, a: (&[f32], &[usize]), b: (&[f32], &[usize])) -> Result<Value> {
    let rank = a.1.len().max(b.1.len());
    let padded = |d: &[usize]| {
        let mut v = vec![1; rank - d.len()];
        v.extend_from_slice(d);
        v
    };
    let (ad, bd) = (padded(a.1), padded(b.1));
    let dims = (0..rank)
        .map(|i| match (ad[i], bd[i]) {
            (x, y) if x == y || y == 1 => Ok(x),
            (1, y) => Ok(y),
            _ => Err(anyhow::anyhow!("shapes {:?} and {:?} do not broadcast", a.1, b.1)),
        })
        .collect::<Result<Vec<usize>>>()?;
    // Row-major strides, 0 along the axes an operand is broadcast over.
    let strides = |d: &[usize]| {
        let mut s = vec![0; rank];
        let mut step = 1;
        for i in (0..rank).rev() {
            s[i] = if d[i] == 1 { 0 } else { step };
            step *= d[i];
        }
        s
    };
    let (sa, sb) = (strides(&ad), strides(&bd));
    let n: usize = dims.iter().product();
    anyhow::ensure!(
        a.0.len() == ad.iter().product::<usize>() && b.0.len() == bd.iter().product::<usize>(),
        "operands do not hold their shapes' values"
    );
    let mut data = Vec::with_capacity(n);
    if rank == 0 {
        data.push(op.apply(a.0[0], b.0[0]));
        return Ok(Value { data, dims });
    }
    let inner = dims[rank - 1];
    let (ia, ib) = (sa[rank - 1], sb[rank - 1]);
    let mut index = vec![0usize; rank - 1];
    for _ in 0..n / inner.max(1) {
        let oa: usize = index.iter().zip(&sa).map(|(i, s)| i * s).sum();
        let ob: usize = index.iter().zip(&sb).map(|(i, s)| i * s).sum();
        data.extend((0..inner).map(|j| op.apply(a.0[oa + j * ia], b.0[ob + j * ib])));
        for i in (0..rank - 1).rev() {
            index[i] += 1;
            if index[i] < dims[i] {
                break;
            }
            index[i] = 0;
        }
    }
    Ok(Value { data, dims })
}

/// `x` padded with zeros by `pads` (`[begin..., end...]`, one pair per axis, none negative).
fn pad_zeros(x: &Value, pads: &[i64]) -> Result<Value> {
    let rank = x.dims.len();
    anyhow::ensure!(
        pads.len() == 2 * rank && pads.iter().all(|&p| p >= 0),
        "pads {pads:?} are not non-negative begin and end pads for a rank-{rank} value"
    );
    let (begin, end): (Vec<usize>, Vec<usize>) =
        (0..rank).map(|i| (pads[i] as usize, pads[rank + i] as usize)).unzip();
    let dims: Vec<usize> = (0..rank).map(|i| x.dims[i] + begin[i] + end[i]).collect();
    let mut data = vec![0f32; dims.iter().product()];
    if rank == 0 || x.data.is_empty() {
        return Ok(Value { data, dims });
    }
    // Copy each innermost row of `x` to its place in the padded output.
    let row = x.dims[rank - 1];
    let mut out_strides = vec![1usize; rank];
    for i in (0..rank - 1).rev() {
        out_strides[i] = out_strides[i + 1] * dims[i + 1];
    }
    let mut index = vec![0usize; rank - 1];
    for src in x.data.chunks_exact(row.max(1)) {
        let at: usize =
            (0..rank - 1).map(|i| (index[i] + begin[i]) * out_strides[i]).sum::<usize>()
                + begin[rank - 1];
        data[at..at + row].copy_from_slice(src);
        for i in (0..rank - 1).rev() {
            index[i] += 1;
            if index[i] < x.dims[i] {
                break;
            }
            index[i] = 0;
        }
    }
    Ok(Value { data, dims })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::random_inputs;
    use crate::exec::tract::Runner;
    use crate::frontend::load_model;
    use std::path::Path;

    fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| (x - y).abs() / x.abs().max(1.0)).fold(0.0, f32::max)
    }

    /// The engine against tract on `n` random samples, batched.
    fn check_against_tract(path: &str, n: usize) {
        let model = load_model(Path::new(path)).unwrap();
        let sample = crate::analysis::shapes::sample_shape(&model, None).unwrap();
        let engine = Engine::new(&model, &sample).unwrap();
        let per: usize = sample.iter().product();
        let x = random_inputs(n * per, 11);
        let (ours, width) = engine.run(&x).unwrap();
        let runner = Runner::new(&model, &sample, 1).unwrap();
        for i in 0..n {
            let (want, w) = runner.run(&x[i * per..(i + 1) * per]).unwrap();
            assert_eq!(w, width);
            let d = max_rel_diff(&ours[i * width..(i + 1) * width], &want);
            assert!(d < 1e-4, "{path}: sample {i} differs from tract by {d}");
        }
    }

    /// Every fixture graph the engine takes computes what tract computes; the simple ones and
    /// the DeepReDuce reference graph must be taken.
    #[test]
    fn fixture_models_match_tract_or_are_refused() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/models");
        let mut taken = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "onnx") {
                continue;
            }
            let model = load_model(&path).unwrap();
            let sample = crate::analysis::shapes::sample_shape(&model, None).unwrap();
            if Engine::new(&model, &sample).is_ok() {
                check_against_tract(path.to_str().unwrap(), 3);
                taken.push(path.file_name().unwrap().to_string_lossy().to_string());
            }
        }
        eprintln!("taken: {taken:?}");
        for must in ["tiny_ts_opset13.onnx", "reference_resnet18w16_cull12_thin_bottom.onnx"] {
            assert!(taken.iter().any(|t| t == must), "{must} was refused; taken: {taken:?}");
        }
    }

    #[test]
    fn relu_is_fused_into_its_only_producer() {
        let root = env!("CARGO_MANIFEST_DIR");
        let model = load_model(Path::new(&format!("{root}/models/resnet18w16.onnx"))).unwrap();
        let engine = Engine::new(&model, &[1, 28, 28]).unwrap();
        let relus = engine.steps.iter().filter(|s| matches!(s.kernel, Kernel::Relu)).count();
        let fused = engine.steps.iter().filter(|s| s.relu).count();
        assert_eq!((relus, fused), (0, 17), "every ReLU of the ResNet follows a Conv or an Add");
    }

    #[test]
    fn unsupported_operators_are_refused_with_the_node_named() {
        let root = env!("CARGO_MANIFEST_DIR");
        let mut model = load_model(Path::new(&format!("{root}/models/resnet18w16.onnx"))).unwrap();
        let node = model.graph.nodes.iter_mut().find(|n| n.op_type == "Relu").unwrap();
        node.op_type = "Softplus".into();
        let label = node.label();
        let e = Engine::new(&model, &[1, 28, 28]).err().unwrap();
        let text = format!("{e:#}");
        assert!(text.contains(&label) && text.contains("Softplus"), "{text}");
    }

    /// A Mul by a per-channel constant (as `channel-thin` writes) runs in the engine and
    /// matches tract.
    #[test]
    fn a_per_channel_mul_matches_tract() {
        let root = env!("CARGO_MANIFEST_DIR");
        let mut model = load_model(Path::new(&format!("{root}/models/resnet18w16.onnx"))).unwrap();
        let g = &mut model.graph;
        let relu = g.nodes.iter().position(|n| n.op_type == "Relu").unwrap();
        let conv = g.nodes.iter().position(|n| n.outputs[0] == g.nodes[relu].inputs[0]).unwrap();
        let channels = g.initializers[&g.nodes[conv].inputs[1]].dims[0];
        let mask: Vec<f32> = (0..channels).map(|c| (c % 3) as f32 * 0.5).collect();
        g.initializers.insert("m".into(), IrTensor::from_f32(vec![1, channels, 1, 1], &mask));
        let out = g.nodes[relu].outputs[0].clone();
        for n in g.nodes.iter_mut() {
            for i in n.inputs.iter_mut().filter(|i| **i == out) {
                *i = "masked".into();
            }
        }
        let mul = Node::new("mul", "Mul", vec![out, "m".into()], vec!["masked".into()]);
        g.nodes.insert(relu + 1, mul);
        let engine = Engine::new(&model, &[1, 28, 28]).unwrap();
        assert!(engine.steps.iter().any(|s| matches!(s.kernel, Kernel::ChannelAffine { .. })));
        let file = tempfile::NamedTempFile::new().unwrap();
        crate::frontend::write_model_atomic(file.path(), &model).unwrap();
        check_against_tract(file.path().to_str().unwrap(), 3);
    }

    #[test]
    fn shipped_models_match_tract() {
        let root = env!("CARGO_MANIFEST_DIR");
        check_against_tract(&format!("{root}/models/resnet18w16.onnx"), 5);
        check_against_tract(&format!("{root}/models/vgg.onnx"), 3);
    }
}

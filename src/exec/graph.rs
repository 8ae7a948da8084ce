//! An IR graph as a differentiable candle computation: the float weights read by Conv, Gemm,
//! MatMul and BatchNormalization become trainable variables, every other constant stays fixed,
//! and the nodes are interpreted in order. Any graph the passes emit from the supported
//! operator set trains this way, not one hand-written network.

use super::op::{axis, reduce_axes, reshape_dims, Op, OPERATORS};
use crate::error::CompileError;
use crate::ir::{DataType, Model, Node, Tensor as IrTensor};
use crate::kernels::batchnorm::InsertedBatchNorm;
use crate::kernels::conv::{conv2d, Conv2dParams};
use crate::kernels::pool::pool2d;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor, Var};
use std::collections::{BTreeMap, HashMap};

pub struct TrainGraph {
    nodes: Vec<Node>,
    /// Each node's decoded op, by position.
    ops: Vec<Op>,
    input: String,
    output: String,
    /// Trainable weights by initializer name.
    pub params: BTreeMap<String, Var>,
    /// Fixed constants (shapes, indices, BN statistics, clip bounds), as candle tensors.
    fixed: HashMap<String, Tensor>,
    /// Integer constants (shapes, axes, indices) as read from the graph.
    ints: HashMap<String, Vec<i64>>,
    device: Device,
    /// BatchNorm re-inserted after Conv nodes (by node name), folded back by `write_back`.
    batchnorms: BTreeMap<String, InsertedBatchNorm>,
    /// Inserted BatchNorms use batch statistics (training) or their running ones.
    training: bool,
    /// Learnable per-channel ReLU masks by Relu node name (see [`super::masks`]).
    masks: BTreeMap<String, Var>,
}

fn to_candle(t: &IrTensor, device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(t.to_f32(), t.dims.clone(), device)?)
}

impl TrainGraph {
    pub fn new(model: &Model) -> Result<Self> {
        let device = Device::Cpu;
        let graph = &model.graph;
        let input = graph.inputs.first().context("the graph has no input")?.name.clone();
        let output = graph.outputs.first().context("the graph has no output")?.name.clone();
        let mut constants: BTreeMap<String, IrTensor> = graph.initializers.clone();
        let mut nodes = Vec::new();
        for node in &graph.nodes {
            if node.op_type == "Constant" {
                let value = node
                    .attr("value")
                    .and_then(|a| a.t.as_ref())
                    .with_context(|| format!("node {} holds no tensor value", node.label()))?;
                constants.insert(
                    node.outputs[0].clone(),
                    IrTensor::from_proto(value, None).map_err(anyhow::Error::msg)?,
                );
            } else {
                nodes.push(node.clone());
            }
        }
        let ops = nodes.iter().map(decode).collect::<Result<Vec<_>>>()?;
        let mut params = BTreeMap::new();
        for (node, op) in nodes.iter().zip(&ops) {
            for &ix in op.weight_inputs() {
                let Some(name) = node.input(ix) else { continue };
                if let Some(t) = graph.initializers.get(name) {
                    if t.data_type == DataType::F32 && !params.contains_key(name) {
                        params.insert(name.to_string(), Var::from_tensor(&to_candle(t, &device)?)?);
                    }
                }
            }
        }
        let mut fixed = HashMap::new();
        let mut ints = HashMap::new();
        for (name, t) in &constants {
            if params.contains_key(name) {
                continue;
            }
            match t.data_type {
                DataType::I64 | DataType::I32 => {
                    ints.insert(name.clone(), t.to_i64());
                }
                _ => {
                    fixed.insert(name.clone(), to_candle(t, &device)?);
                }
            }
        }
        Ok(TrainGraph {
            nodes,
            ops,
            input,
            output,
            params,
            fixed,
            ints,
            device,
            batchnorms: BTreeMap::new(),
            training: false,
            masks: BTreeMap::new(),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Every trainable variable: the graph's weights, then the inserted BatchNorms' scales and
    /// shifts.
    pub fn vars(&self) -> Vec<Var> {
        let mut vars: Vec<Var> = self.params.values().cloned().collect();
        for bn in self.batchnorms.values() {
            vars.push(bn.gamma.clone());
            vars.push(bn.beta.clone());
        }
        vars
    }

    /// Inserted BatchNorms normalise by batch statistics when training, by their running ones
    /// otherwise.
    pub fn set_training(&mut self, training: bool) {
        self.training = training;
    }

    /// Put a BatchNorm after every Conv whose weight is trainable and its own, each the identity
    /// at inference on the statistics of the calibration batch `x`. Returns how many.
    pub fn insert_batchnorm(&mut self, x: &Tensor) -> Result<usize> {
        let mut uses: HashMap<&str, usize> = HashMap::new();
        for node in &self.nodes {
            for input in &node.inputs {
                *uses.entry(input.as_str()).or_default() += 1;
            }
        }
        let eligible: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| n.op_type == "Conv")
            .filter(|n| {
                let own = |ix| n.input(ix).is_none_or(|w| w.is_empty() || uses.get(w) == Some(&1));
                n.input(1).is_some_and(|w| self.params.contains_key(w)) && own(1) && own(2)
            })
            .map(|n| n.name.clone())
            .collect();
        let mut inserted = BTreeMap::new();
        self.forward_observed(x, |node, _, y| {
            if eligible.contains(&node.name) {
                inserted.insert(node.name.clone(), InsertedBatchNorm::identity_for(y)?);
            }
            Ok(None)
        })?;
        let count = inserted.len();
        self.batchnorms = inserted;
        Ok(count)
    }

    /// Give every Relu reading an `[N, C, ...]` value a learnable mask per channel or per
    /// element, all ones (the function is unchanged). Returns each masked Relu's site, in graph
    /// order.
    pub fn insert_relu_masks(
        &mut self,
        x: &Tensor,
        granularity: super::relu_mask::Granularity,
    ) -> Result<Vec<super::relu_mask::MaskSite>> {
        let mut sites = vec![];
        self.forward_observed(x, |node, input, _| {
            if let (true, Some(input)) = (node.op_type == "Relu", input) {
                if input.rank() >= 2 {
                    sites.push(super::relu_mask::MaskSite::new(
                        &node.name,
                        &node.inputs[0],
                        &input.dims()[1..],
                        granularity,
                    ));
                }
            }
            Ok(None)
        })?;
        self.masks.clear();
        for site in &sites {
            let ones = Tensor::ones(site.mask_dims(), candle_core::DType::F32, &self.device)?;
            self.masks.insert(site.relu.clone(), Var::from_tensor(&ones)?);
        }
        Ok(sites)
    }

    /// The masks [`Self::insert_relu_masks`] made, by Relu node name.
    pub fn masks(&self) -> &BTreeMap<String, Var> {
        &self.masks
    }

    /// Logits for a batch `x` of shape `[N, C, H, W]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.run_nodes(x, true, |_, _, _| Ok(None))
    }

    /// A forward pass for observation only (no gradients) with a hook on every node's output:
    /// `observe` sees the node, its first input (when that is an activation, not a constant)
    /// and its value, and may return a replacement that later nodes read instead. Every value
    /// is detached from autodiff and dropped after its last reader, so the pass holds only the
    /// live activations. (Attached, each value kept its inputs alive through its backward op:
    /// the refit's reference pass on the width-64 ResNet-18 held every ReLU and Add output of
    /// 512 images, 1.3 GB more, measured with heaptrack.)
    pub fn forward_observed(
        &self,
        x: &Tensor,
        observe: impl FnMut(&Node, Option<&Tensor>, &Tensor) -> Result<Option<Tensor>>,
    ) -> Result<Tensor> {
        self.run_nodes(&x.detach(), false, observe)
    }

    /// The forward pass; `track` keeps autodiff's record (training), otherwise every node's
    /// output is detached.
    fn run_nodes(
        &self,
        x: &Tensor,
        track: bool,
        mut observe: impl FnMut(&Node, Option<&Tensor>, &Tensor) -> Result<Option<Tensor>>,
    ) -> Result<Tensor> {
        let mut last_use: HashMap<&str, usize> = HashMap::new();
        for (ix, node) in self.nodes.iter().enumerate() {
            for input in &node.inputs {
                last_use.insert(input.as_str(), ix);
            }
        }
        let mut values: HashMap<&str, Tensor> = HashMap::new();
        values.insert(&self.input, x.clone());
        for (ix, node) in self.nodes.iter().enumerate() {
            let op = &self.ops[ix];
            let y = match (self.batchnorms.get(&node.name), op) {
                // Training: the Conv and its BatchNorm as one op.
                (Some(bn), Op::Conv(params)) if self.training => {
                    let input = |i: usize| -> Result<Option<Tensor>> {
                        match node.input(i).filter(|n| !n.is_empty()) {
                            Some(n) => Ok(Some(self.value(&values, n)?)),
                            None => Ok(None),
                        }
                    };
                    let fused = || -> Result<Tensor> {
                        let x = input(0)?.context("input 0 missing")?;
                        let w = input(1)?.context("input 1 missing")?;
                        anyhow::ensure!(x.rank() == 4, "only 2-D convolutions are trainable");
                        bn.conv_forward_train(&x, &w, input(2)?.as_ref(), *params)
                    };
                    fused().with_context(|| format!("node {}", node.label()))?
                }
                (bn, _) => {
                    let y = self
                        .eval(node, op, &values)
                        .with_context(|| format!("node {}", node.label()))?;
                    match bn {
                        Some(bn) if self.training => bn.forward_train(&y)?,
                        Some(bn) => bn.forward_eval(&y)?,
                        None => y,
                    }
                }
            };
            let y = if track { y } else { y.detach() };
            let x = node.input(0).and_then(|i| values.get(i));
            let y = observe(node, x, &y)
                .with_context(|| format!("observing node {}", node.label()))?
                .unwrap_or(y);
            for input in &node.inputs {
                if last_use.get(input.as_str()) == Some(&ix) && input != &self.output {
                    values.remove(input.as_str());
                }
            }
            values.insert(&node.outputs[0], y);
        }
        values.remove(self.output.as_str()).context("the graph output was not computed")
    }

    fn value(&self, values: &HashMap<&str, Tensor>, name: &str) -> Result<Tensor> {
        if let Some(t) = values.get(name) {
            return Ok(t.clone());
        }
        if let Some(v) = self.params.get(name) {
            return Ok(v.as_tensor().clone());
        }
        if let Some(t) = self.fixed.get(name) {
            return Ok(t.clone());
        }
        bail!("value '{name}' is not available as a float tensor")
    }

    fn ints(&self, name: &str) -> Result<&[i64]> {
        self.ints
            .get(name)
            .map(|v| v.as_slice())
            .with_context(|| format!("'{name}' must be a constant integer tensor"))
    }

    fn eval(&self, node: &Node, op: &Op, values: &HashMap<&str, Tensor>) -> Result<Tensor> {
        let arg = |i: usize| -> Result<Tensor> {
            self.value(values, node.input(i).with_context(|| format!("input {i} missing"))?)
        };
        let opt_arg = |i: usize| -> Result<Option<Tensor>> {
            match node.input(i).filter(|n| !n.is_empty()) {
                Some(n) => Ok(Some(self.value(values, n)?)),
                None => Ok(None),
            }
        };
        let x = || arg(0);
        Ok(match op {
            Op::Identity => x()?,
            Op::Relu => match self.masks.get(&node.name) {
                Some(a) => super::relu_mask::masked_relu(&x()?, a.as_tensor())?,
                None => crate::kernels::elementwise::relu(&x()?)?,
            },
            Op::Clip { min, max } => {
                let (lo, hi) = clip_bounds(*min, *max, &opt_arg(1)?, &opt_arg(2)?)?;
                x()?.clamp(lo, hi)?
            }
            Op::Add => x()?.broadcast_add(&arg(1)?)?,
            Op::Sub => x()?.broadcast_sub(&arg(1)?)?,
            Op::Mul => x()?.broadcast_mul(&arg(1)?)?,
            Op::Div => x()?.broadcast_div(&arg(1)?)?,
            Op::Sum => {
                let mut acc = x()?;
                for i in 1..node.inputs.len() {
                    acc = acc.broadcast_add(&arg(i)?)?;
                }
                acc
            }
            Op::Conv(params) => conv(&x()?, &arg(1)?, opt_arg(2)?.as_ref(), *params)?,
            Op::Gemm { trans_a, trans_b, alpha, beta } => {
                let mut a = x()?;
                let mut b = arg(1)?;
                if *trans_a {
                    a = a.t()?;
                }
                if *trans_b {
                    b = b.t()?;
                }
                let mut y = (a.matmul(&b)? * *alpha as f64)?;
                if let Some(c) = opt_arg(2)? {
                    y = y.broadcast_add(&(c * *beta as f64)?)?;
                }
                y
            }
            Op::MatMul => x()?.broadcast_matmul(&arg(1)?)?,
            Op::Pool(params) => pool2d(&x()?, *params)?,
            Op::GlobalAveragePool => x()?.mean_keepdim(3)?.mean_keepdim(2)?,
            Op::GlobalMaxPool => x()?.max_keepdim(3)?.max_keepdim(2)?,
            Op::BatchNormalization { epsilon } => {
                let x = x()?;
                let c = x.dim(1)?;
                let mut shape = vec![1; x.rank()];
                shape[1] = c;
                let eps = *epsilon as f64;
                let gamma = arg(1)?.reshape(shape.clone())?;
                let beta = arg(2)?.reshape(shape.clone())?;
                let mean = arg(3)?.reshape(shape.clone())?;
                let std = (arg(4)?.reshape(shape)? + eps)?.sqrt()?;
                x.broadcast_sub(&mean)?
                    .broadcast_div(&std)?
                    .broadcast_mul(&gamma)?
                    .broadcast_add(&beta)?
            }
            Op::Flatten { axis: a } => {
                let x = x()?;
                let axis = axis(*a, x.rank())?;
                let dims = x.dims();
                let outer: usize = dims[..axis].iter().product();
                x.reshape((outer, dims[axis..].iter().product::<usize>()))?
            }
            Op::Reshape => {
                let x = x()?;
                let target = self.ints(node.input(1).context("Reshape has no shape")?)?;
                x.reshape(reshape_dims(x.dims(), target)?)?
            }
            Op::Concat { axis: a } => {
                let parts: Vec<Tensor> = (0..node.inputs.len()).map(arg).collect::<Result<_>>()?;
                let axis = axis(*a, parts[0].rank())?;
                Tensor::cat(&parts, axis)?
            }
            Op::Gather { axis: a } => {
                let x = x()?;
                let axis = axis(*a, x.rank())?;
                let name = node.input(1).context("Gather has no indices")?;
                let size = x.dim(axis)? as i64;
                let idx: Vec<u32> = self
                    .ints(name)?
                    .iter()
                    .map(|&i| (if i < 0 { i + size } else { i }) as u32)
                    .collect();
                let idx = Tensor::from_vec(idx.clone(), idx.len(), &self.device)?;
                x.index_select(&idx, axis)?
            }
            Op::ReduceMean { axes, keepdims } => {
                let mut x = x()?;
                let input = match node.input(1).filter(|n| !n.is_empty()) {
                    Some(n) => Some(self.ints(n)?),
                    None => None,
                };
                let axes = reduce_axes(axes.as_deref(), input, x.rank())?;
                for &a in axes.iter().rev() {
                    x = if *keepdims { x.mean_keepdim(a)? } else { x.mean(a)? };
                }
                x
            }
            Op::Sigmoid => candle_nn::ops::sigmoid(&x()?)?,
            Op::Softmax { axis: a } => {
                let x = x()?;
                let a = axis(*a, x.rank())?;
                candle_nn::ops::softmax(&x, a)?
            }
            Op::Pad { pads } => {
                let mut x = x()?;
                let pads = match pads {
                    Some(p) => p.clone(),
                    None => self.ints(node.input(1).context("Pad has no pads")?)?.to_vec(),
                };
                let rank = x.rank();
                anyhow::ensure!(
                    pads.len() == 2 * rank && pads.iter().all(|&p| p >= 0),
                    "pads {pads:?} are not non-negative begin and end pads for rank {rank}"
                );
                for i in 0..rank {
                    let (b, e) = (pads[i] as usize, pads[rank + i] as usize);
                    if b + e > 0 {
                        x = x.pad_with_zeros(i, b, e)?;
                    }
                }
                x
            }
            Op::Slice => {
                let mut x = x()?;
                let starts = self.ints(node.input(1).context("Slice has no starts")?)?.to_vec();
                let ends = self.ints(node.input(2).context("Slice has no ends")?)?.to_vec();
                let axes: Vec<i64> = match node.input(3).filter(|n| !n.is_empty()) {
                    Some(n) => self.ints(n)?.to_vec(),
                    None => (0..starts.len() as i64).collect(),
                };
                if let Some(steps) = node.input(4).filter(|n| !n.is_empty()) {
                    if self.ints(steps)?.iter().any(|&s| s != 1) {
                        bail!("Slice with steps other than 1 is not trainable yet");
                    }
                }
                for ((&s, &e), &a) in starts.iter().zip(&ends).zip(&axes) {
                    let a = axis(a, x.rank())?;
                    let n = x.dim(a)? as i64;
                    let clampi = |v: i64| (if v < 0 { v + n } else { v }).clamp(0, n);
                    let (s, e) = (clampi(s), clampi(e));
                    x = x.narrow(a, s as usize, (e - s).max(0) as usize)?;
                }
                x
            }
        })
    }

    /// Everything training changes, by name: the weights (`param/NAME`), the inserted
    /// BatchNorms' scales, shifts and running statistics (`bn/CONV/gamma`, `beta`, `mean`,
    /// `var`) and the ReLU masks (`mask/RELU`). A checkpoint of these (with the optimiser's
    /// state) resumes a run to the same bits; the folded graph alone does not.
    pub fn training_state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for (name, var) in &self.params {
            out.push((format!("param/{name}"), var.as_tensor().clone()));
        }
        for (conv, bn) in &self.batchnorms {
            let (mean, var) = bn.running();
            let c = mean.len();
            out.push((format!("bn/{conv}/gamma"), bn.gamma.as_tensor().clone()));
            out.push((format!("bn/{conv}/beta"), bn.beta.as_tensor().clone()));
            out.push((format!("bn/{conv}/mean"), Tensor::from_vec(mean, c, &self.device)?));
            out.push((format!("bn/{conv}/var"), Tensor::from_vec(var, c, &self.device)?));
        }
        for (relu, mask) in &self.masks {
            out.push((format!("mask/{relu}"), mask.as_tensor().clone()));
        }
        Ok(out)
    }

    /// Restore what [`Self::training_state`] saved into a graph built the same way (same
    /// student, same BatchNorms and masks inserted). Refuses a state of another graph.
    pub fn restore_training_state(&self, state: &HashMap<String, Tensor>) -> Result<()> {
        let expected = self.params.len() + 4 * self.batchnorms.len() + self.masks.len();
        anyhow::ensure!(
            expected == state.len(),
            "the saved training state holds {} tensors, this graph trains {}",
            state.len(),
            expected
        );
        let get = |name: &str, like: &Tensor| -> Result<Tensor> {
            let t = state.get(name).with_context(|| format!("the saved state lacks {name}"))?;
            anyhow::ensure!(
                t.dims() == like.dims(),
                "{name} is {:?} in the saved state, {:?} in this graph",
                t.dims(),
                like.dims()
            );
            Ok(t.clone())
        };
        for (name, var) in &self.params {
            var.set(&get(&format!("param/{name}"), var.as_tensor())?)?;
        }
        for (conv, bn) in &self.batchnorms {
            bn.gamma.set(&get(&format!("bn/{conv}/gamma"), bn.gamma.as_tensor())?)?;
            bn.beta.set(&get(&format!("bn/{conv}/beta"), bn.beta.as_tensor())?)?;
            let like = bn.beta.as_tensor();
            let mean = get(&format!("bn/{conv}/mean"), like)?.to_vec1()?;
            let var = get(&format!("bn/{conv}/var"), like)?.to_vec1()?;
            bn.set_running(mean, var);
        }
        for (relu, mask) in &self.masks {
            mask.set(&get(&format!("mask/{relu}"), mask.as_tensor())?)?;
        }
        Ok(())
    }

    /// `model` with every trainable weight replaced by its current value and every inserted
    /// BatchNorm folded into its Conv (no BatchNormalization node is written).
    pub fn write_back(&self, model: &Model) -> Result<Model> {
        let mut out = model.clone();
        for (name, var) in &self.params {
            let t = var.as_tensor();
            let data: Vec<f32> = t.flatten_all()?.to_vec1()?;
            out.graph
                .initializers
                .insert(name.clone(), IrTensor::from_f32(t.dims().to_vec(), &data));
        }
        for (node, bn) in &self.batchnorms {
            let (scale, shift) = bn.affine()?;
            let l = out
                .graph
                .nodes
                .iter()
                .position(|n| &n.name == node)
                .with_context(|| format!("node {node} is not in the graph written back"))?;
            crate::ir::channel_affine::apply_channel_affine(
                &mut out.graph,
                l,
                &scale,
                &shift,
                "bn",
            )
            .with_context(|| format!("cannot fold the trained BatchNorm into node {node}"))?;
        }
        out.graph.remove_unused_initializers();
        Ok(out)
    }
}

/// A node's op, or an error naming the node and what `finetune` takes.
fn decode(node: &Node) -> Result<Op> {
    Op::decode(node).map_err(|e| {
        CompileError::unsupported(format!(
            "node {}: {e}; `finetune` trains graphs of {}",
            node.label(),
            OPERATORS.join(", ")
        ))
        .into()
    })
}

fn clip_bounds(
    min: Option<f32>,
    max: Option<f32>,
    lo: &Option<Tensor>,
    hi: &Option<Tensor>,
) -> Result<(f32, f32)> {
    let scalar = |t: &Option<Tensor>| -> Result<Option<f32>> {
        t.as_ref().map(|t| Ok(t.flatten_all()?.to_vec1::<f32>()?[0])).transpose()
    };
    let lo = scalar(lo)?.or(min).unwrap_or(f32::MIN);
    let hi = scalar(hi)?.or(max).unwrap_or(f32::MAX);
    Ok((lo, hi))
}

fn conv(x: &Tensor, w: &Tensor, b: Option<&Tensor>, params: Conv2dParams) -> Result<Tensor> {
    anyhow::ensure!(x.rank() == 4, "only 2-D convolutions are trainable");
    Ok(conv2d(x, w, b, params)?)
}

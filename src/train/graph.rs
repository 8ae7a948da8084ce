//! An IR graph as a differentiable candle computation: the float weights read by Conv, Gemm,
//! MatMul and BatchNormalization become trainable variables, every other constant stays fixed,
//! and the nodes are interpreted in order. Any graph the passes emit from the supported
//! operator set trains this way, not one hand-written network.

use super::batchnorm::InsertedBatchNorm;
use super::conv::{conv2d, Conv2dParams};
use super::pool::{pool2d, Pool2dParams, PoolMode};
use crate::error::CompileError;
use crate::ir::{DataType, Model, Node, Tensor as IrTensor};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor, Var, D};
use std::collections::{BTreeMap, HashMap};

/// Inputs (by position) of these ops that hold trainable weights.
fn trainable_inputs(op: &str) -> &'static [usize] {
    match op {
        "Conv" | "Gemm" => &[1, 2],
        "MatMul" => &[1],
        "BatchNormalization" => &[1, 2],
        _ => &[],
    }
}

pub struct TrainGraph {
    nodes: Vec<Node>,
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
        let mut params = BTreeMap::new();
        for node in &nodes {
            for &ix in trainable_inputs(&node.op_type) {
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
        for node in &nodes {
            check_supported(node)?;
        }
        Ok(TrainGraph {
            nodes,
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
        self.forward_observed(&x.detach(), |node, _, y| {
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
        granularity: super::masks::Granularity,
    ) -> Result<Vec<super::masks::MaskSite>> {
        let mut sites = vec![];
        self.forward_observed(&x.detach(), |node, input, _| {
            if let (true, Some(input)) = (node.op_type == "Relu", input) {
                if input.rank() >= 2 {
                    sites.push(super::masks::MaskSite::new(
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
        self.forward_observed(x, |_, _, _| Ok(None))
    }

    /// The forward pass with a hook on every node's output: `observe` sees the node, its first
    /// input (when that is an activation, not a constant) and its value, and may return a
    /// replacement that later nodes read instead. Values are dropped
    /// after their last reader, so a forward-only pass holds only the live activations.
    pub fn forward_observed(
        &self,
        x: &Tensor,
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
            let y = match self.batchnorms.get(&node.name) {
                // Training: the Conv and its BatchNorm as one op.
                Some(bn) if self.training && node.op_type == "Conv" => {
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
                        bn.conv_forward_train(&x, &w, input(2)?.as_ref(), conv_params(node)?)
                    };
                    fused().with_context(|| format!("node {}", node.label()))?
                }
                bn => {
                    let y = self
                        .eval(node, &values)
                        .with_context(|| format!("node {}", node.label()))?;
                    match bn {
                        Some(bn) if self.training => bn.forward_train(&y)?,
                        Some(bn) => bn.forward_eval(&y)?,
                        None => y,
                    }
                }
            };
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

    fn eval(&self, node: &Node, values: &HashMap<&str, Tensor>) -> Result<Tensor> {
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
        Ok(match node.op_type.as_str() {
            "Identity" | "Dropout" => x()?,
            "Relu" => match self.masks.get(&node.name) {
                Some(a) => super::masks::masked_relu(&x()?, a.as_tensor())?,
                None => super::elementwise::relu(&x()?)?,
            },
            "Clip" => {
                let (lo, hi) = clip_bounds(node, &opt_arg(1)?, &opt_arg(2)?)?;
                x()?.clamp(lo, hi)?
            }
            "Add" => x()?.broadcast_add(&arg(1)?)?,
            "Sub" => x()?.broadcast_sub(&arg(1)?)?,
            "Mul" => x()?.broadcast_mul(&arg(1)?)?,
            "Div" => x()?.broadcast_div(&arg(1)?)?,
            "Sum" => {
                let mut acc = x()?;
                for i in 1..node.inputs.len() {
                    acc = acc.broadcast_add(&arg(i)?)?;
                }
                acc
            }
            "Conv" => conv(node, &x()?, &arg(1)?, opt_arg(2)?.as_ref())?,
            "Gemm" => {
                let mut a = x()?;
                let mut b = arg(1)?;
                if node.attr_int("transA").unwrap_or(0) != 0 {
                    a = a.t()?;
                }
                if node.attr_int("transB").unwrap_or(0) != 0 {
                    b = b.t()?;
                }
                let mut y = (a.matmul(&b)? * node.attr_float("alpha").unwrap_or(1.0) as f64)?;
                if let Some(c) = opt_arg(2)? {
                    y = y.broadcast_add(&(c * node.attr_float("beta").unwrap_or(1.0) as f64)?)?;
                }
                y
            }
            "MatMul" => x()?.broadcast_matmul(&arg(1)?)?,
            "MaxPool" => pool(node, &x()?, true)?,
            "AveragePool" => pool(node, &x()?, false)?,
            "GlobalAveragePool" => x()?.mean_keepdim(3)?.mean_keepdim(2)?,
            "GlobalMaxPool" => x()?.max_keepdim(3)?.max_keepdim(2)?,
            "BatchNormalization" => {
                let x = x()?;
                let c = x.dim(1)?;
                let mut shape = vec![1; x.rank()];
                shape[1] = c;
                let eps = node.attr_float("epsilon").unwrap_or(1e-5) as f64;
                let gamma = arg(1)?.reshape(shape.clone())?;
                let beta = arg(2)?.reshape(shape.clone())?;
                let mean = arg(3)?.reshape(shape.clone())?;
                let std = (arg(4)?.reshape(shape)? + eps)?.sqrt()?;
                x.broadcast_sub(&mean)?
                    .broadcast_div(&std)?
                    .broadcast_mul(&gamma)?
                    .broadcast_add(&beta)?
            }
            "Flatten" => {
                let x = x()?;
                let axis = axis(node.attr_int("axis").unwrap_or(1), x.rank())?;
                let dims = x.dims();
                let outer: usize = dims[..axis].iter().product();
                x.reshape((outer, dims[axis..].iter().product::<usize>()))?
            }
            "Reshape" => {
                let x = x()?;
                let target = self.ints(node.input(1).context("Reshape has no shape")?)?;
                x.reshape(reshape_dims(x.dims(), target)?)?
            }
            "Concat" => {
                let parts: Vec<Tensor> = (0..node.inputs.len()).map(arg).collect::<Result<_>>()?;
                let axis = axis(node.attr_int("axis").unwrap_or(0), parts[0].rank())?;
                Tensor::cat(&parts, axis)?
            }
            "Gather" => {
                let x = x()?;
                let axis = axis(node.attr_int("axis").unwrap_or(0), x.rank())?;
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
            "Slice" => {
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
            op => bail!("operator {op} is not supported by the fine-tuner"),
        })
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
            crate::passes::apply_channel_affine(&mut out.graph, l, &scale, &shift, "bn")
                .with_context(|| format!("cannot fold the trained BatchNorm into node {node}"))?;
        }
        out.graph.remove_unused_initializers();
        Ok(out)
    }
}

const SUPPORTED: &[&str] = &[
    "Identity",
    "Dropout",
    "Relu",
    "Clip",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Sum",
    "Conv",
    "Gemm",
    "MatMul",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "BatchNormalization",
    "Flatten",
    "Reshape",
    "Concat",
    "Gather",
    "Slice",
];

fn check_supported(node: &Node) -> Result<()> {
    if !SUPPORTED.contains(&node.op_type.as_str()) {
        return Err(CompileError::unsupported(format!(
            "node {} has operator {}, which `finetune` cannot train (it takes {})",
            node.label(),
            node.op_type,
            SUPPORTED.join(", ")
        ))
        .into());
    }
    Ok(())
}

pub(crate) fn axis(a: i64, rank: usize) -> Result<usize> {
    let r = rank as i64;
    anyhow::ensure!((-r..r).contains(&a), "axis {a} out of range for rank {rank}");
    Ok(if a < 0 { (a + r) as usize } else { a as usize })
}

pub(crate) fn reshape_dims(dims: &[usize], target: &[i64]) -> Result<Vec<usize>> {
    let total: usize = dims.iter().product();
    let mut out: Vec<usize> = target
        .iter()
        .enumerate()
        .map(|(i, &d)| if d == 0 { dims[i] } else { d.max(1) as usize })
        .collect();
    if let Some(pos) = target.iter().position(|&d| d == -1) {
        let known: usize =
            out.iter().enumerate().filter(|(i, _)| *i != pos).map(|(_, d)| d).product();
        out[pos] = total / known.max(1);
    }
    Ok(out)
}

fn clip_bounds(node: &Node, lo: &Option<Tensor>, hi: &Option<Tensor>) -> Result<(f32, f32)> {
    let scalar = |t: &Option<Tensor>| -> Result<Option<f32>> {
        t.as_ref().map(|t| Ok(t.flatten_all()?.to_vec1::<f32>()?[0])).transpose()
    };
    let lo = scalar(lo)?.or(node.attr_float("min")).unwrap_or(f32::MIN);
    let hi = scalar(hi)?.or(node.attr_float("max")).unwrap_or(f32::MAX);
    Ok((lo, hi))
}

fn pads_of(node: &Node) -> Result<Vec<usize>> {
    if let Some(p) = node.attr_string("auto_pad").filter(|p| p != "NOTSET") {
        bail!("auto_pad {p} is not supported by the fine-tuner; export with explicit pads");
    }
    let pads = node.attr_ints("pads").map(|p| p.to_vec()).unwrap_or_else(|| vec![0; 4]);
    anyhow::ensure!(pads.len() == 4 && pads.iter().all(|&p| p >= 0), "pads {pads:?} not 2-D");
    Ok(pads.iter().map(|&p| p as usize).collect())
}

fn pair(node: &Node, name: &str) -> Result<(usize, usize)> {
    match node.attr_ints(name) {
        None => Ok((1, 1)),
        Some([a, b]) if *a > 0 && *b > 0 => Ok((*a as usize, *b as usize)),
        Some(v) => bail!("{name} {v:?} is not a pair of positive numbers"),
    }
}

/// A Conv node's 2-D attributes.
pub(crate) fn conv_params(node: &Node) -> Result<Conv2dParams> {
    let pads = pads_of(node)?;
    Ok(Conv2dParams {
        stride: pair(node, "strides")?,
        dilation: pair(node, "dilations")?,
        pads: [pads[0], pads[1], pads[2], pads[3]],
        groups: usize::try_from(node.attr_int("group").unwrap_or(1))
            .ok()
            .filter(|&g| g > 0)
            .context("group must be positive")?,
    })
}

fn conv(node: &Node, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    anyhow::ensure!(x.rank() == 4, "only 2-D convolutions are trainable");
    Ok(conv2d(x, w, b, conv_params(node)?)?)
}

/// A MaxPool (`max`) or AveragePool node's 2-D attributes.
pub(crate) fn pool_params(node: &Node, max: bool) -> Result<Pool2dParams> {
    let kernel = pair(node, "kernel_shape")?;
    let strides = match node.attr_ints("strides") {
        Some(_) => pair(node, "strides")?,
        None => (1, 1),
    };
    anyhow::ensure!(
        node.attr_int("ceil_mode").unwrap_or(0) == 0,
        "ceil_mode pools are not supported"
    );
    anyhow::ensure!(
        node.attr_ints("dilations").is_none_or(|d| d.iter().all(|&v| v == 1)),
        "dilated pools are not supported"
    );
    let pads = pads_of(node)?;
    let mode = if max {
        PoolMode::Max
    } else {
        PoolMode::Average {
            count_include_pad: node.attr_int("count_include_pad").unwrap_or(0) != 0,
        }
    };
    Ok(Pool2dParams { kernel, stride: strides, pads: [pads[0], pads[1], pads[2], pads[3]], mode })
}

fn pool(node: &Node, x: &Tensor, max: bool) -> Result<Tensor> {
    Ok(pool2d(x, pool_params(node, max)?)?)
}

/// Mean over the batch of `KL(softmax(t/T) || softmax(s/T))`.
pub fn kl_divergence(student: &Tensor, teacher: &Tensor, temperature: f64) -> Result<Tensor> {
    let log_s = candle_nn::ops::log_softmax(&(student / temperature)?, D::Minus1)?;
    let log_t = candle_nn::ops::log_softmax(&(teacher / temperature)?, D::Minus1)?;
    let p_t = log_t.exp()?;
    let n = student.dim(0)? as f64;
    Ok(((p_t * (log_t - log_s)?)?.sum_all()? / n)?)
}

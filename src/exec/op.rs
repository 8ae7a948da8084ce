//! One typed decoding of the ONNX operators relucompile executes: the op and its parsed
//! attributes. The inference engine and the differentiable graph both match on [`Op`], so an
//! operator's attributes are read (and refused) in one place. Tensor inputs (weights, shapes,
//! indices, Clip bounds given as inputs) are the executors' business: they hold them in their
//! own form.

use crate::ir::Node;
use crate::kernels::conv::Conv2dParams;
use crate::kernels::pool::{Pool2dParams, PoolMode};
use anyhow::{bail, Context, Result};

#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// Identity, and Dropout (inference).
    Identity,
    Relu,
    /// Clip with its attribute bounds (before opset 11); bounds given as inputs 1 and 2 win.
    Clip {
        min: Option<f32>,
        max: Option<f32>,
    },
    Add,
    Sub,
    Mul,
    Div,
    /// Element-wise sum of any number of inputs.
    Sum,
    Conv(Conv2dParams),
    Gemm {
        trans_a: bool,
        trans_b: bool,
        alpha: f32,
        beta: f32,
    },
    MatMul,
    /// MaxPool or AveragePool.
    Pool(Pool2dParams),
    GlobalAveragePool,
    GlobalMaxPool,
    BatchNormalization {
        epsilon: f32,
    },
    Flatten {
        axis: i64,
    },
    /// Target shape from input 1.
    Reshape,
    Concat {
        axis: i64,
    },
    /// Indices from input 1.
    Gather {
        axis: i64,
    },
    /// Starts, ends, axes and steps from inputs 1-4.
    Slice,
    /// Mean over `axes` (before opset 18 an attribute, from opset 18 input 1).
    ReduceMean {
        axes: Option<Vec<i64>>,
        keepdims: bool,
    },
    Sigmoid,
    /// Softmax along `axis` (opset 13's default, the last axis, when the attribute is absent;
    /// earlier opsets' default, 1, is the same axis for the `[N, classes]` logits it is used on).
    Softmax {
        axis: i64,
    },
    /// Zero padding: `pads` from the attribute (before opset 11) or input 1, as
    /// `[begin..., end...]` per axis.
    Pad {
        pads: Option<Vec<i64>>,
    },
}

/// The operator names [`Op::decode`] takes.
pub const OPERATORS: &[&str] = &[
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
    "ReduceMean",
    "Sigmoid",
    "Softmax",
    "Pad",
];

impl Op {
    /// The node's op with its attributes parsed; an error names what is not taken.
    pub fn decode(node: &Node) -> Result<Op> {
        Ok(match node.op_type.as_str() {
            "Identity" | "Dropout" => Op::Identity,
            "Relu" => Op::Relu,
            "Clip" => Op::Clip { min: node.attr_float("min"), max: node.attr_float("max") },
            "Add" => Op::Add,
            "Sub" => Op::Sub,
            "Mul" => Op::Mul,
            "Div" => Op::Div,
            "Sum" => Op::Sum,
            "Conv" => Op::Conv(conv_params(node)?),
            "Gemm" => Op::Gemm {
                trans_a: node.attr_int("transA").unwrap_or(0) != 0,
                trans_b: node.attr_int("transB").unwrap_or(0) != 0,
                alpha: node.attr_float("alpha").unwrap_or(1.0),
                beta: node.attr_float("beta").unwrap_or(1.0),
            },
            "MatMul" => Op::MatMul,
            "MaxPool" => Op::Pool(pool_params(node, true)?),
            "AveragePool" => Op::Pool(pool_params(node, false)?),
            "GlobalAveragePool" => Op::GlobalAveragePool,
            "GlobalMaxPool" => Op::GlobalMaxPool,
            "BatchNormalization" => {
                Op::BatchNormalization { epsilon: node.attr_float("epsilon").unwrap_or(1e-5) }
            }
            "Flatten" => Op::Flatten { axis: node.attr_int("axis").unwrap_or(1) },
            "Reshape" => Op::Reshape,
            "Concat" => Op::Concat { axis: node.attr_int("axis").unwrap_or(0) },
            "Gather" => Op::Gather { axis: node.attr_int("axis").unwrap_or(0) },
            "Slice" => Op::Slice,
            "ReduceMean" => {
                if node.attr_int("noop_with_empty_axes").unwrap_or(0) != 0 {
                    bail!("ReduceMean with noop_with_empty_axes is not taken");
                }
                Op::ReduceMean {
                    axes: node.attr_ints("axes").map(<[i64]>::to_vec),
                    keepdims: node.attr_int("keepdims").unwrap_or(1) != 0,
                }
            }
            "Sigmoid" => Op::Sigmoid,
            "Softmax" => Op::Softmax { axis: node.attr_int("axis").unwrap_or(-1) },
            "Pad" => {
                let mode = node.attr_string("mode").unwrap_or_else(|| "constant".into());
                if mode != "constant" {
                    bail!("Pad mode {mode} is not taken (only constant zero padding)");
                }
                if node.attr_float("value").is_some_and(|v| v != 0.0) {
                    bail!("Pad with a non-zero value is not taken");
                }
                if node.input(2).is_some_and(|n| !n.is_empty()) {
                    bail!("Pad with a constant_value input is not taken");
                }
                if node.input(3).is_some_and(|n| !n.is_empty()) {
                    bail!("Pad with an axes input is not taken");
                }
                Op::Pad { pads: node.attr_ints("pads").map(<[i64]>::to_vec) }
            }
            op => bail!("operator {op} is not taken"),
        })
    }

    /// Inputs (by position) that hold trainable weights when they are float initializers.
    pub fn weight_inputs(&self) -> &'static [usize] {
        match self {
            Op::Conv(_) | Op::Gemm { .. } => &[1, 2],
            Op::MatMul => &[1],
            Op::BatchNormalization { .. } => &[1, 2],
            _ => &[],
        }
    }
}

/// The axes `ReduceMean` averages over, resolved and sorted: the attribute's, else input 1's
/// (`ints`), else every axis.
pub fn reduce_axes(attr: Option<&[i64]>, input: Option<&[i64]>, rank: usize) -> Result<Vec<usize>> {
    let mut axes = match attr.or(input) {
        Some(a) if !a.is_empty() => a.iter().map(|&a| axis(a, rank)).collect::<Result<Vec<_>>>()?,
        _ => (0..rank).collect(),
    };
    axes.sort_unstable();
    axes.dedup();
    Ok(axes)
}

/// `a` as an index into `rank` axes (negative counts from the end).
pub fn axis(a: i64, rank: usize) -> Result<usize> {
    let r = rank as i64;
    anyhow::ensure!((-r..r).contains(&a), "axis {a} out of range for rank {rank}");
    Ok(if a < 0 { (a + r) as usize } else { a as usize })
}

/// ONNX Reshape's target shape for `dims` (0 copies the input's axis, -1 is inferred).
pub fn reshape_dims(dims: &[usize], target: &[i64]) -> Result<Vec<usize>> {
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

fn pads_of(node: &Node) -> Result<Vec<usize>> {
    if let Some(p) = node.attr_string("auto_pad").filter(|p| p != "NOTSET") {
        bail!("auto_pad {p} is not supported; export with explicit pads");
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
pub fn conv_params(node: &Node) -> Result<Conv2dParams> {
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

/// A MaxPool (`max`) or AveragePool node's 2-D attributes.
fn pool_params(node: &Node, max: bool) -> Result<Pool2dParams> {
    let kernel = pair(node, "kernel_shape")?;
    let strides = match node.attr_ints("strides") {
        Some(_) => pair(node, "strides")?,
        None => (1, 1),
    };
    let ceil = node.attr_int("ceil_mode").unwrap_or(0) != 0;
    anyhow::ensure!(max || !ceil, "ceil_mode average pools are not supported");
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
    let pads = [pads[0], pads[1], pads[2], pads[3]];
    Ok(Pool2dParams { kernel, stride: strides, pads, mode, ceil })
}

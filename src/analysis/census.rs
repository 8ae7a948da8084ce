//! The ReLU census: every ReLU-like node with its stage, shape and count, and linear MACs.

use super::shapes::{infer_shapes, Shapes};
use super::stages::{find_stages, Stages};
use super::{relu_kind, ReluKind};
use crate::ir::Model;
use anyhow::Result;
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct ReluNode {
    pub name: String,
    pub op: String,
    pub kind: ReluKind,
    pub stage: usize,
    /// Per-sample shape (batch dimension dropped).
    pub shape: Vec<usize>,
    /// Elements per sample: one comparison each in private inference.
    pub relus: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct StageSummary {
    pub index: usize,
    pub resolution: [usize; 2],
    pub relus: u64,
    pub relu_layers: usize,
    pub macs: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LinearLayer {
    pub name: String,
    pub op: String,
    pub stage: usize,
    pub macs: u64,
    /// Input elements per sample plus weight elements: what a secret-shared multiplication
    /// opens (Beaver triples), so it drives a linear layer's communication.
    pub operands: u64,
}

/// A max-pool: each output is a max over a window, `window - 1` comparisons in PI.
#[derive(Debug, Clone, Serialize)]
pub struct PoolLayer {
    pub name: String,
    pub stage: usize,
    pub comparisons: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Census {
    pub input_shape: Vec<usize>,
    /// ReLU and ReLU6 elements per sample (what culling and thinning reduce).
    pub total_relus: u64,
    /// LeakyRelu and PRelu elements, counted apart.
    pub leaky_relus: u64,
    pub total_macs: u64,
    pub residual: bool,
    pub stages: Vec<StageSummary>,
    pub nodes: Vec<ReluNode>,
    pub linear: Vec<LinearLayer>,
    pub pools: Vec<PoolLayer>,
    /// Elementwise products (Mul): with encrypted weights each is a secret multiplication.
    pub muls: Vec<PoolLayer>,
    /// Every operator the engine executes, weights' Constant nodes excluded.
    pub operators: usize,
    /// Nonlinearities other than ReLU, max-pooling and products (Sigmoid, Tanh, GELU, ...):
    /// each costs a PI engine its own protocol, which no cost model here prices.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unpriced: Vec<UnpricedNode>,
}

/// A nonlinearity the cost model has no price for, and its elements per sample.
#[derive(Debug, Clone, Serialize)]
pub struct UnpricedNode {
    pub name: String,
    pub op: String,
    pub elements: u64,
}

/// Operators that are neither linear nor a ReLU, max-pool or product: a PI engine evaluates
/// each by its own protocol (approximations, exponentials, divisions).
pub const UNPRICED_NONLINEARITIES: &[&str] = &[
    "Sigmoid",
    "Tanh",
    "Gelu",
    "Erf",
    "Softmax",
    "LogSoftmax",
    "HardSwish",
    "HardSigmoid",
    "Elu",
    "Selu",
    "Celu",
    "Softplus",
    "Softsign",
    "Mish",
    "Exp",
    "Log",
    "Sqrt",
    "Reciprocal",
    "Pow",
];

/// Count ReLUs and MACs for one sample of shape `sample` (batch dimension excluded).
pub fn census(model: &Model, sample: &[usize]) -> Result<Census> {
    let shapes = infer_shapes(model, sample, 1)?;
    Ok(census_with(model, sample, &shapes, &find_stages(&model.graph, &shapes)))
}

pub fn census_with(model: &Model, sample: &[usize], shapes: &Shapes, stages: &Stages) -> Census {
    let graph = &model.graph;
    let per_sample = |value: &str| -> Option<Vec<usize>> {
        shapes.get(value).map(|s| s.iter().skip(1).copied().collect())
    };
    let mut nodes = Vec::new();
    let mut linear = Vec::new();
    let mut pools = Vec::new();
    let mut muls = Vec::new();
    let mut unpriced = Vec::new();
    let numel_of = |v: Option<&str>, batch: bool| -> u64 {
        v.and_then(|v| shapes.get(v))
            .map(|s| s.iter().skip(batch as usize).map(|&d| d as u64).product())
            .unwrap_or(0)
    };
    for (ix, node) in graph.nodes.iter().enumerate() {
        let stage = stages.of_node[ix];
        let Some(out) = node.outputs.first() else { continue };
        let Some(shape) = per_sample(out) else { continue };
        let numel: u64 = shape.iter().map(|&d| d as u64).product();
        if let Some(kind) = relu_kind(graph, node) {
            nodes.push(ReluNode {
                name: node.name.clone(),
                op: node.op_type.clone(),
                kind,
                stage,
                shape,
                relus: numel,
            });
            continue;
        }
        if node.op_type == "Mul" {
            muls.push(PoolLayer { name: node.name.clone(), stage, comparisons: numel });
            continue;
        }
        if UNPRICED_NONLINEARITIES.contains(&node.op_type.as_str()) {
            unpriced.push(UnpricedNode {
                name: node.label(),
                op: node.op_type.clone(),
                elements: numel,
            });
            continue;
        }
        if node.op_type == "MaxPool" || node.op_type == "GlobalMaxPool" {
            let window: u64 = match node.attr_ints("kernel_shape") {
                Some(k) => k.iter().map(|&d| d.max(1) as u64).product(),
                None => node
                    .input(0)
                    .and_then(|x| shapes.get(x))
                    .map(|s| s.iter().skip(2).map(|&d| d as u64).product())
                    .unwrap_or(1),
            };
            pools.push(PoolLayer {
                name: node.name.clone(),
                stage,
                comparisons: numel * window.saturating_sub(1),
            });
            continue;
        }
        let contracted = match node.op_type.as_str() {
            "Conv" => node
                .input(1)
                .and_then(|w| shapes.get(w))
                .filter(|w| !w.is_empty())
                .map(|w| w[1..].iter().product::<usize>()),
            "Gemm" => {
                let trans_a = node.attr_int("transA").unwrap_or(0) != 0;
                node.input(0).and_then(|a| shapes.get(a)).map(|a| {
                    if trans_a {
                        a[0]
                    } else {
                        a[a.len() - 1]
                    }
                })
            }
            "MatMul" => node.input(0).and_then(|a| shapes.get(a)).and_then(|a| a.last().copied()),
            _ => None,
        };
        if let Some(k) = contracted {
            linear.push(LinearLayer {
                name: node.name.clone(),
                op: node.op_type.clone(),
                stage,
                macs: numel * k as u64,
                operands: numel_of(node.input(0), true) + numel_of(node.input(1), false),
            });
        }
    }
    let stage_summaries = stages
        .resolution
        .iter()
        .enumerate()
        .map(|(index, &(h, w))| {
            let in_stage = nodes.iter().filter(|n| n.stage == index && n.kind != ReluKind::Leaky);
            StageSummary {
                index,
                resolution: [h, w],
                relus: in_stage.clone().map(|n| n.relus).sum(),
                relu_layers: in_stage.count(),
                macs: linear.iter().filter(|l| l.stage == index).map(|l| l.macs).sum(),
            }
        })
        .collect();
    Census {
        input_shape: sample.to_vec(),
        total_relus: nodes.iter().filter(|n| n.kind != ReluKind::Leaky).map(|n| n.relus).sum(),
        leaky_relus: nodes.iter().filter(|n| n.kind == ReluKind::Leaky).map(|n| n.relus).sum(),
        total_macs: linear.iter().map(|l| l.macs).sum(),
        residual: stages.residual,
        stages: stage_summaries,
        nodes,
        linear,
        pools,
        muls,
        operators: graph.nodes.iter().filter(|n| n.op_type != "Constant").count(),
        unpriced,
    }
}

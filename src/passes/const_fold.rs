//! Constant folding of weight subgraphs. Older exporters compute weights with `Constant`,
//! `ConstantOfShape` and arithmetic nodes; evaluating those once turns them into plain
//! initializers that later passes (and PI engines) can read directly. tract evaluates the
//! subgraph, so every operator it knows folds the same way it runs.

use super::{Pass, PassContext};
use crate::error::CompileError;
use crate::ir::{DataType, Model, Tensor};
use anyhow::Result;
use std::collections::HashSet;
use tract_onnx::pb;
use tract_onnx::prelude::*;

/// Operators whose output is not a function of their inputs.
const NONDETERMINISTIC: &[&str] = &[
    "RandomNormal",
    "RandomUniform",
    "RandomNormalLike",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
];

#[derive(Default)]
pub struct ConstFold;

impl Pass for ConstFold {
    fn run(&self, model: &mut Model, _ctx: &PassContext) -> Result<usize> {
        let graph = &model.graph;
        let mut constant: HashSet<&str> = graph.initializers.keys().map(|s| s.as_str()).collect();
        let mut foldable = Vec::new();
        for (ix, node) in graph.nodes.iter().enumerate() {
            let inputs_constant =
                node.inputs.iter().all(|i| i.is_empty() || constant.contains(i.as_str()));
            let sourceless = node.inputs.iter().all(|i| i.is_empty());
            let ok = inputs_constant
                && !NONDETERMINISTIC.contains(&node.op_type.as_str())
                && (!sourceless || node.op_type == "Constant");
            if ok {
                foldable.push(ix);
                constant.extend(node.outputs.iter().filter(|o| !o.is_empty()).map(|s| s.as_str()));
            }
        }
        if foldable.is_empty() {
            return Ok(0);
        }
        let folded: HashSet<usize> = foldable.iter().copied().collect();
        let produced: HashSet<&str> = foldable
            .iter()
            .flat_map(|&ix| graph.nodes[ix].outputs.iter().map(|s| s.as_str()))
            .collect();
        // Folded values still read by the rest of the graph, or returned by it.
        let mut needed: Vec<String> = Vec::new();
        for (ix, node) in graph.nodes.iter().enumerate() {
            if folded.contains(&ix) {
                continue;
            }
            for i in &node.inputs {
                if produced.contains(i.as_str()) && !needed.contains(i) {
                    needed.push(i.clone());
                }
            }
        }
        for o in &graph.outputs {
            if produced.contains(o.name.as_str()) && !needed.contains(&o.name) {
                needed.push(o.name.clone());
            }
        }
        let values = evaluate(model, &foldable, &needed)?;
        let graph = &mut model.graph;
        for (name, tensor) in needed.iter().zip(values) {
            graph.initializers.insert(name.clone(), tensor);
        }
        let mut ix = 0;
        graph.nodes.retain(|_| {
            ix += 1;
            !folded.contains(&(ix - 1))
        });
        graph.remove_unused_initializers();
        Ok(foldable.len())
    }
}

/// Run the constant nodes as a graph of their own under tract and read back `needed`.
fn evaluate(model: &Model, nodes: &[usize], needed: &[String]) -> Result<Vec<Tensor>> {
    if needed.is_empty() {
        return Ok(vec![]);
    }
    let graph = &model.graph;
    let mut sub = model.clone();
    sub.graph.nodes = nodes.iter().map(|&ix| graph.nodes[ix].clone()).collect();
    sub.graph.inputs.clear();
    sub.graph.outputs = needed
        .iter()
        .map(|n| pb::ValueInfoProto { name: n.clone(), ..Default::default() })
        .collect();
    sub.graph.remove_unused_initializers();
    let proto = crate::frontend::to_proto(&sub);
    let outputs = crate::error::catch_tract(|| {
        let plan =
            tract_onnx::onnx().parse(&proto, None)?.model.into_optimized()?.into_runnable()?;
        plan.run(tvec!())
    })
    .map_err(|e| {
        CompileError::invalid_model(format!("cannot evaluate the constant subgraph: {e:#}"))
    })?;
    outputs.iter().zip(needed).map(|(v, name)| from_tract(v, name)).collect()
}

fn from_tract(value: &tract_onnx::prelude::Tensor, name: &str) -> Result<Tensor> {
    let value = if value.datum_type() == TDim::datum_type() {
        value.cast_to::<i64>()?.into_owned()
    } else {
        value.clone()
    };
    let data_type = match value.datum_type() {
        DatumType::F32 => DataType::F32,
        DatumType::F64 => DataType::F64,
        DatumType::F16 => DataType::F16,
        DatumType::I64 => DataType::I64,
        DatumType::I32 => DataType::I32,
        DatumType::I16 => DataType::I16,
        DatumType::I8 => DataType::I8,
        DatumType::U8 => DataType::U8,
        DatumType::U16 => DataType::U16,
        DatumType::U32 => DataType::U32,
        DatumType::U64 => DataType::U64,
        DatumType::Bool => DataType::Bool,
        other => {
            return Err(CompileError::unsupported(format!(
                "constant '{name}' folds to element type {other:?}, which ONNX weights cannot hold"
            ))
            .into())
        }
    };
    Ok(Tensor { data_type, dims: value.shape().to_vec(), raw: value.as_bytes().to_vec() })
}

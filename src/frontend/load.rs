//! Reading ONNX files into the IR, refusing what the IR cannot represent with a message that
//! names the node or value at fault.

use crate::error::CompileError;
use crate::ir::{DataType, Graph, Model, Node, Tensor};
use anyhow::{Context, Result};
use prost::Message;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use tract_onnx::pb;

/// Operators that carry subgraphs; the IR is a single flat graph.
const CONTROL_FLOW_OPS: &[&str] = &["If", "Loop", "Scan", "SequenceMap"];

/// Read and decode an ONNX file; external data is resolved beside it.
pub fn load_model(path: &Path) -> Result<Model> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let dir = path.parent().map(|p| if p.as_os_str().is_empty() { Path::new(".") } else { p });
    model_from_bytes(&bytes, dir).with_context(|| format!("in model {}", path.display()))
}

/// Decode ONNX bytes; `model_dir` is where external data files are looked for.
pub fn model_from_bytes(bytes: &[u8], model_dir: Option<&Path>) -> Result<Model> {
    if bytes.is_empty() {
        return Err(CompileError::invalid_model("the file is empty, not an ONNX model").into());
    }
    let proto = pb::ModelProto::decode(bytes).map_err(|e| {
        CompileError::invalid_model(format!(
            "not a valid ONNX protobuf (truncated or corrupt): {e}"
        ))
    })?;
    model_from_proto(&proto, model_dir)
}

/// Translate a decoded `ModelProto` into the IR.
pub fn model_from_proto(proto: &pb::ModelProto, model_dir: Option<&Path>) -> Result<Model> {
    let gp = proto.graph.as_ref().ok_or_else(|| {
        CompileError::invalid_model("the protobuf has no graph: not an ONNX model")
    })?;
    if gp.node.is_empty() && gp.output.is_empty() {
        return Err(CompileError::invalid_model("the graph is empty (no nodes, no outputs)").into());
    }
    for opset in &proto.opset_import {
        let known = opset.domain.is_empty() || opset.domain == "ai.onnx";
        if known && !(7..=22).contains(&opset.version) {
            return Err(CompileError::unsupported(format!(
                "opset {} is not supported (relucompile reads opsets 7 to 22)",
                opset.version
            ))
            .into());
        }
    }
    let mut initializers = std::collections::BTreeMap::new();
    for t in &gp.initializer {
        if t.name.is_empty() {
            return Err(CompileError::invalid_model("an initializer has no name").into());
        }
        let tensor = Tensor::from_proto(t, model_dir)
            .map_err(|e| CompileError::invalid_model(format!("initializer '{}': {e}", t.name)))?;
        let floating = matches!(
            tensor.data_type,
            DataType::F32 | DataType::F64 | DataType::F16 | DataType::BF16
        );
        if floating && tensor.to_f32().iter().any(|v| !v.is_finite()) {
            return Err(CompileError::invalid_model(format!(
                "initializer '{}' holds NaN or infinite values",
                t.name
            ))
            .into());
        }
        if initializers.insert(t.name.clone(), tensor).is_some() {
            return Err(CompileError::invalid_model(format!(
                "initializer '{}' is defined twice",
                t.name
            ))
            .into());
        }
    }
    // Old IR versions list initializers among the inputs too; they are weights, not inputs.
    let inputs: Vec<pb::ValueInfoProto> =
        gp.input.iter().filter(|i| !initializers.contains_key(&i.name)).cloned().collect();
    if inputs.is_empty() {
        return Err(CompileError::invalid_model("the graph has no runtime input").into());
    }
    let known_ops = known_op_types();
    let mut nodes = Vec::with_capacity(gp.node.len());
    let mut names = HashSet::new();
    for (ix, n) in gp.node.iter().enumerate() {
        let name = if n.name.is_empty() || names.contains(&n.name) {
            format!("{}_{ix}", if n.op_type.is_empty() { "node" } else { &n.op_type })
        } else {
            n.name.clone()
        };
        names.insert(name.clone());
        let label = format!("'{name}' ({})", n.op_type);
        if CONTROL_FLOW_OPS.contains(&n.op_type.as_str())
            || n.attribute.iter().any(|a| a.g.is_some() || !a.graphs.is_empty())
        {
            return Err(CompileError::unsupported(format!(
                "node {label} uses control flow (subgraphs), which relucompile does not support"
            ))
            .into());
        }
        let default_domain = n.domain.is_empty() || n.domain == "ai.onnx";
        if !default_domain || !known_ops.contains(n.op_type.as_str()) {
            let op = if default_domain {
                n.op_type.clone()
            } else {
                format!("{}:{}", n.domain, n.op_type)
            };
            return Err(CompileError::unsupported(format!(
                "node '{name}' has operator '{op}', which relucompile cannot evaluate"
            ))
            .into());
        }
        if n.output.iter().all(|o| o.is_empty()) {
            return Err(CompileError::invalid_model(format!("node {label} has no output")).into());
        }
        // Tensors held in attributes (Constant's value) get the same checks as initializers:
        // tract would otherwise allocate whatever their dims claim.
        for a in &n.attribute {
            for t in a.t.iter().chain(&a.tensors) {
                Tensor::from_proto(t, model_dir).map_err(|e| {
                    CompileError::invalid_model(format!(
                        "node {label}, attribute '{}': {e}",
                        a.name
                    ))
                })?;
            }
        }
        nodes.push(Node {
            name,
            op_type: n.op_type.clone(),
            domain: String::new(),
            inputs: n.input.clone(),
            outputs: n.output.clone(),
            attributes: n.attribute.clone(),
        });
    }
    let mut graph =
        Graph { name: gp.name.clone(), inputs, outputs: gp.output.clone(), initializers, nodes };
    check_definitions(&graph)?;
    graph.topo_sort().map_err(CompileError::invalid_model)?;
    let model = Model {
        ir_version: proto.ir_version,
        opset_imports: proto.opset_import.clone(),
        producer_name: proto.producer_name.clone(),
        producer_version: proto.producer_version.clone(),
        domain: proto.domain.clone(),
        model_version: proto.model_version,
        doc_string: proto.doc_string.clone(),
        metadata_props: proto.metadata_props.clone(),
        graph,
    };
    crate::ir::verify(&model).map_err(|e| CompileError::invalid_model(e.0))?;
    check_ranks(&model.graph)?;
    check_constant_shapes(&model.graph)?;
    Ok(model)
}

/// The most elements a tensor built from a constant shape may have (1 GiB of f32): more than
/// any weight of a network relucompile is meant for, and tract would allocate it whole while
/// folding constants.
const MAX_CONSTANT_ELEMENTS: u128 = 1 << 28;

/// Refuse ConstantOfShape / Expand / Reshape nodes whose constant shape asks for a tensor past
/// [`MAX_CONSTANT_ELEMENTS`] or with negative dims beyond -1.
fn check_constant_shapes(graph: &Graph) -> Result<()> {
    for node in &graph.nodes {
        if !matches!(node.op_type.as_str(), "ConstantOfShape" | "Expand") {
            continue;
        }
        let shape_input = if node.op_type == "Expand" { 1 } else { 0 };
        let Some(name) = node.inputs.get(shape_input) else { continue };
        let Some(shape) = graph.constant(name) else { continue };
        if shape.data_type != DataType::I64 {
            continue;
        }
        let dims = shape.to_i64();
        let elements = dims.iter().try_fold(1u128, |acc, &d| {
            u128::try_from(d).ok().map(|d| acc.saturating_mul(d.max(1)))
        });
        if elements.is_none_or(|e| e > MAX_CONSTANT_ELEMENTS) {
            return Err(CompileError::invalid_model(format!(
                "node {} asks for a tensor of shape {dims:?}, which is negative or larger than \
                 relucompile's limit of {MAX_CONSTANT_ELEMENTS} elements",
                node.label()
            ))
            .into());
        }
    }
    Ok(())
}

/// Ops that read their first input as (N, C, spatial...) and the least rank they accept.
/// tract indexes the channel axis of these without a bounds check (BatchNormalization on a
/// rank-1 tensor reads out of bounds), so a graph that breaks this is refused here, first.
const CHANNEL_OPS: &[(&str, usize)] = &[
    ("Conv", 3),
    ("ConvTranspose", 3),
    ("MaxPool", 3),
    ("AveragePool", 3),
    ("LpPool", 3),
    ("GlobalAveragePool", 3),
    ("GlobalMaxPool", 3),
    ("BatchNormalization", 2),
    ("InstanceNormalization", 3),
];

/// Propagate tensor ranks where they are evident (declared inputs, weights, rank-preserving
/// and broadcasting ops) and refuse a channel op whose input has too few dimensions.
fn check_ranks(graph: &Graph) -> Result<()> {
    let mut rank: HashMap<&str, usize> = HashMap::new();
    for input in &graph.inputs {
        if let Some(pb::type_proto::Value::TensorType(t)) =
            input.r#type.as_ref().and_then(|t| t.value.as_ref())
        {
            if let Some(shape) = &t.shape {
                rank.insert(&input.name, shape.dim.len());
            }
        }
    }
    for (name, t) in &graph.initializers {
        rank.insert(name, t.dims.len());
    }
    // The loader sorted the nodes topologically, so one pass in order sees every producer first.
    for node in &graph.nodes {
        let Some(out) = node.outputs.first().filter(|o| !rank.contains_key(o.as_str())) else {
            continue;
        };
        let of = |i: usize| node.inputs.get(i).and_then(|v| rank.get(v.as_str()).copied());
        let r = match node.op_type.as_str() {
            "Constant" => node
                .attributes
                .iter()
                .find(|a| a.name == "value")
                .and_then(|a| a.t.as_ref().map(|t| t.dims.len())),
            "Flatten" | "Gemm" => Some(2),
            "Add" | "Sub" | "Mul" | "Div" | "Sum" | "Max" | "Min" | "Pow" => {
                let ranks: Option<Vec<usize>> = (0..node.inputs.len()).map(of).collect();
                ranks.and_then(|r| r.into_iter().max())
            }
            "Relu" | "Clip" | "Sigmoid" | "Tanh" | "LeakyRelu" | "Dropout" | "Identity" | "Neg"
            | "Abs" | "Exp" | "Sqrt" | "HardSigmoid" | "HardSwish" | "Softmax" | "Concat"
            | "Slice" => of(0),
            op if CHANNEL_OPS.iter().any(|(c, _)| *c == op) => of(0),
            _ => None,
        };
        if let Some(r) = r {
            rank.insert(out, r);
        }
    }
    for node in &graph.nodes {
        let Some(&(_, least)) = CHANNEL_OPS.iter().find(|(op, _)| *op == node.op_type) else {
            continue;
        };
        let Some(input) = node.inputs.first() else { continue };
        if let Some(&r) = rank.get(input.as_str()).filter(|&&r| r < least) {
            return Err(CompileError::invalid_model(format!(
                "node {} reads '{input}' of rank {r}; it needs at least {least} dimensions \
                 (batch, channels, ...)",
                node.label()
            ))
            .into());
        }
    }
    Ok(())
}

/// Every value read must be defined somewhere; a dangling input is named with its reader.
fn check_definitions(graph: &Graph) -> Result<()> {
    let defined = graph.value_names();
    for node in &graph.nodes {
        for input in node.inputs.iter().filter(|i| !i.is_empty()) {
            if !defined.contains(input) {
                return Err(CompileError::invalid_model(format!(
                    "node {} reads '{input}', which no node, input or initializer defines",
                    node.label()
                ))
                .into());
            }
        }
    }
    for output in &graph.outputs {
        if !defined.contains(&output.name) {
            return Err(CompileError::invalid_model(format!(
                "graph output '{}' is not produced by any node",
                output.name
            ))
            .into());
        }
    }
    Ok(())
}

/// The operators tract can evaluate, which bounds what relucompile can check.
fn known_op_types() -> HashSet<String> {
    tract_onnx::onnx().op_register.0.keys().cloned().collect()
}

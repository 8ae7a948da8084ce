//! Reading ONNX files into the IR, refusing what the IR cannot represent with a message that
//! names the node or value at fault.

use crate::error::CompileError;
use crate::ir::{DataType, Graph, Model, Node, Tensor};
use anyhow::{Context, Result};
use prost::Message;
use std::collections::HashSet;
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
    Ok(model)
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

//! Shapes of every value, from tract's inference on the model as the IR emits it.

use crate::error::CompileError;
use crate::frontend::to_proto;
use crate::ir::Model;
use anyhow::Result;
use std::collections::HashMap;
use tract_onnx::pb;
use tract_onnx::prelude::*;

/// Concrete shapes (batch included) by value name.
pub type Shapes = HashMap<String, Vec<usize>>;

/// The shape a model declares for its first input, with unknown (symbolic) dims as `None`.
pub fn declared_input_shape(model: &Model) -> Result<Vec<Option<usize>>> {
    let input = model
        .graph
        .inputs
        .first()
        .ok_or_else(|| CompileError::invalid_model("the graph has no runtime input"))?;
    let Some(pb::type_proto::Value::TensorType(tt)) =
        input.r#type.as_ref().and_then(|t| t.value.as_ref())
    else {
        return Err(CompileError::invalid_model(format!(
            "graph input '{}' has no tensor type",
            input.name
        ))
        .into());
    };
    let shape = tt.shape.as_ref().ok_or_else(|| {
        CompileError::invalid_model(format!(
            "graph input '{}' declares no shape: give one with --input-shape",
            input.name
        ))
    })?;
    Ok(shape
        .dim
        .iter()
        .map(|d| match d.value {
            Some(pb::tensor_shape_proto::dimension::Value::DimValue(v)) if v > 0 => {
                Some(v as usize)
            }
            _ => None,
        })
        .collect())
}

/// The per-sample input shape (batch dimension excluded): the user's `--input-shape` wins,
/// otherwise the model's declaration, which must be concrete apart from the batch.
pub fn sample_shape(model: &Model, user: Option<&[usize]>) -> Result<Vec<usize>> {
    if let Some(shape) = user {
        let rank = declared_input_shape(model).ok().map(|d| d.len()).filter(|&r| r > 1);
        let text = shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("x");
        return match rank {
            // The shape `inspect` prints: one sample, without the batch.
            Some(r) if shape.len() + 1 == r => Ok(shape.to_vec()),
            Some(r) if shape.len() == r => Ok(shape[1..].to_vec()),
            None if shape.len() >= 2 => Ok(shape[1..].to_vec()),
            _ => Err(CompileError::new(
                crate::error::ExitCode::Usage,
                format!(
                    "--input-shape {text} does not fit the model's input of rank {}: give the \
                     shape of one sample as `inspect` prints it (e.g. 1x28x28) or with the batch \
                     (e.g. 1x1x28x28)",
                    rank.map_or("unknown".into(), |r| r.to_string())
                ),
            )
            .into()),
        };
    }
    let declared = declared_input_shape(model)?;
    if declared.is_empty() {
        return Err(CompileError::invalid_model("the model's input is a scalar").into());
    }
    declared[1..]
        .iter()
        .map(|d| {
            d.ok_or_else(|| {
                CompileError::invalid_model(format!(
                    "the model's input shape {} has a dynamic dimension besides the batch: \
                     give one with --input-shape, e.g. 1x3x32x32",
                    format_declared(&declared)
                ))
                .into()
            })
        })
        .collect()
}

fn format_declared(d: &[Option<usize>]) -> String {
    d.iter()
        .map(|d| d.map(|v| v.to_string()).unwrap_or_else(|| "?".into()))
        .collect::<Vec<_>>()
        .join("x")
}

/// Run tract's inference with the input fixed to `[batch] + sample` and read back every value's
/// shape. Values whose shape stays unknown are left out.
pub fn infer_shapes(model: &Model, sample: &[usize], batch: usize) -> Result<Shapes> {
    let proto = to_proto(model);
    let parsed = crate::error::catch_tract(|| tract_onnx::onnx().parse(&proto, None))
        .map_err(|e| CompileError::invalid_model(format!("tract cannot load the graph: {e:#}")))?;
    let mut tm = parsed.model;
    let mut full = vec![batch];
    full.extend_from_slice(sample);
    tm.set_input_fact(0, f32::fact(&full).into())
        .map_err(|e| CompileError::invalid_model(format!("setting the input shape: {e:#}")))?;
    crate::error::catch_tract(|| tm.analyse(false)).map_err(|e| {
        CompileError::invalid_model(format!(
            "shape inference failed for input shape {full:?}: {e:#}"
        ))
    })?;
    let mut shapes = Shapes::new();
    for (name, outlet) in &parsed.outlets_by_name {
        if let Ok(fact) = tm.outlet_fact(*outlet) {
            if let Ok(Some(shape)) = fact.shape.as_concrete_finite() {
                shapes.insert(name.clone(), shape.to_vec());
            }
        }
    }
    Ok(shapes)
}

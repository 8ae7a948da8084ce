//! Writing the IR back to ONNX: deterministic bytes, written atomically.

use crate::ir::{DataType, Model};
use anyhow::{Context, Result};
use prost::Message;
use std::io::Write;
use std::path::Path;
use tract_onnx::pb;

/// The oldest IR version that allows initializers which are not graph inputs.
const MIN_IR_VERSION: i64 = 4;

/// Integer weights (Gather indices, shapes) are emitted as `Constant` nodes rather than
/// initializers: CrypTen turns every initializer into a trainable parameter, which an integer
/// tensor cannot be, and refuses the graph.
fn emitted_as_constant(t: &crate::ir::Tensor) -> bool {
    !matches!(t.data_type, DataType::F32 | DataType::F64 | DataType::F16 | DataType::BF16)
}

pub fn to_proto(model: &Model) -> pb::ModelProto {
    let g = &model.graph;
    let constants =
        g.initializers.iter().filter(|(_, t)| emitted_as_constant(t)).map(|(name, t)| {
            pb::NodeProto {
                name: format!("{name}.const"),
                op_type: "Constant".into(),
                output: vec![name.clone()],
                attribute: vec![pb::AttributeProto {
                    name: "value".into(),
                    r#type: pb::attribute_proto::AttributeType::Tensor as i32,
                    t: Some(t.to_proto(name)),
                    ..Default::default()
                }],
                ..Default::default()
            }
        });
    let graph = pb::GraphProto {
        name: g.name.clone(),
        node: constants
            .chain(g.nodes.iter().map(|n| pb::NodeProto {
                name: n.name.clone(),
                op_type: n.op_type.clone(),
                domain: n.domain.clone(),
                input: n.inputs.clone(),
                output: n.outputs.clone(),
                attribute: n.attributes.clone(),
                ..Default::default()
            }))
            .collect(),
        initializer: g
            .initializers
            .iter()
            .filter(|(_, t)| !emitted_as_constant(t))
            .map(|(name, t)| t.to_proto(name))
            .collect(),
        input: g.inputs.clone(),
        output: g.outputs.clone(),
        ..Default::default()
    };
    pb::ModelProto {
        ir_version: model.ir_version.max(MIN_IR_VERSION),
        opset_import: model.opset_imports.clone(),
        producer_name: model.producer_name.clone(),
        producer_version: model.producer_version.clone(),
        domain: model.domain.clone(),
        model_version: model.model_version,
        doc_string: model.doc_string.clone(),
        metadata_props: model.metadata_props.clone(),
        graph: Some(graph),
        ..Default::default()
    }
}

/// The bytes written to disk: see [`super::wire`] for why they are not prost's own encoding.
pub fn to_bytes(model: &Model) -> Vec<u8> {
    super::wire::model(&to_proto(model)).encode_to_vec()
}

/// Write to a temporary file beside `path` and rename it into place, so a reader never sees
/// a partial file and a failure leaves nothing behind.
pub fn write_model_atomic(path: &Path, model: &Model) -> Result<()> {
    write_bytes_atomic(path, &to_bytes(model))
}

/// A temporary file in `dir` that will carry the user's umask when persisted (tempfile's
/// default mode, 0600, would make every output private whatever the umask).
fn temp_file_in(dir: &Path) -> Result<tempfile::NamedTempFile> {
    let mut builder = tempfile::Builder::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o666));
    }
    builder
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a temporary file in {}", dir.display()))
}

pub fn write_bytes_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    if path.is_dir() {
        anyhow::bail!("output path {} is a directory", path.display());
    }
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = temp_file_in(dir)?;
    tmp.write_all(bytes).with_context(|| format!("writing {}", path.display()))?;
    tmp.as_file().sync_all().ok();
    tmp.persist(path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

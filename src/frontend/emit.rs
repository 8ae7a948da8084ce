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

/// A temporary file beside `path` that will carry the user's umask when persisted (tempfile's
/// default mode, 0600, would make every output private whatever the umask). Named
/// `.NAME.HOST-PID.XXXXXX.partial`: hidden, and telling which process wrote it, so that one
/// left by a killed process can be recognised and removed ([`remove_stale_partials`]).
fn temp_file_beside(dir: &Path, name: &str) -> Result<tempfile::NamedTempFile> {
    let mut builder = tempfile::Builder::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o666));
    }
    let prefix = format!(".{name}.{}.", process_tag());
    builder
        .prefix(&prefix)
        .suffix(PARTIAL_SUFFIX)
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a temporary file in {}", dir.display()))
}

const PARTIAL_SUFFIX: &str = ".partial";

/// `HOST-PID` of this process, the host name without dots or dashes.
fn process_tag() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host: String =
        host.trim().chars().map(|c| if c == '.' || c == '-' { '_' } else { c }).collect();
    format!("{}-{}", if host.is_empty() { "host" } else { &host }, std::process::id())
}

/// Remove the temporary files of `name` in `dir` that a killed process of this host left:
/// its process is gone. Files of live processes and of other hosts (a shared directory) stay.
fn remove_stale_partials(dir: &Path, name: &str) {
    let tag = process_tag();
    let Some((host, _)) = tag.rsplit_once('-') else { return };
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let prefix = format!(".{name}.{host}-");
    for entry in entries.flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = file.strip_prefix(&prefix) else { continue };
        if !file.ends_with(PARTIAL_SUFFIX) {
            continue;
        }
        let pid = rest.split('.').next().unwrap_or_default();
        let gone = pid
            .parse::<u32>()
            .is_ok_and(|p| p != std::process::id() && !Path::new(&format!("/proc/{p}")).exists());
        if gone && Path::new("/proc/self").exists() {
            std::fs::remove_file(entry.path()).ok();
        }
    }
}

/// Write `bytes` to `path` whole or not at all: a temporary file beside it, renamed over it.
/// Temporary files of `path` that killed writers left are removed after.
pub fn write_bytes_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    if path.is_dir() {
        anyhow::bail!("output path {} is a directory", path.display());
    }
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut tmp = temp_file_beside(dir, &name)?;
    tmp.write_all(bytes).with_context(|| format!("writing {}", path.display()))?;
    tmp.as_file().sync_all().ok();
    tmp.persist(path).with_context(|| format!("cannot write {}", path.display()))?;
    remove_stale_partials(dir, &name);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_removes_what_killed_writers_of_the_same_file_left() {
        let dir = tempfile::tempdir().unwrap();
        let tag = process_tag();
        let (host, _) = tag.rsplit_once('-').unwrap();
        let dead = (1_000_000..4_000_000u32)
            .rev()
            .find(|p| !Path::new(&format!("/proc/{p}")).exists())
            .unwrap();
        let stale = format!(".out.onnx.{host}-{dead}.AbC123.partial");
        let live = format!(".out.onnx.{host}-1.XyZ789.partial");
        let elsewhere = format!(".out.onnx.otherhost-{dead}.QqQ111.partial");
        let other_file = format!(".other.onnx.{host}-{dead}.RrR222.partial");
        for f in [&stale, &live, &elsewhere, &other_file] {
            std::fs::write(dir.path().join(f), b"half").unwrap();
        }
        write_bytes_atomic(&dir.path().join("out.onnx"), b"whole").unwrap();
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        let mut want = vec![live, elsewhere, other_file, "out.onnx".to_string()];
        want.sort();
        assert_eq!(left, want, "only the dead writer's file of out.onnx goes");
        assert_eq!(std::fs::read(dir.path().join("out.onnx")).unwrap(), b"whole");
    }
}

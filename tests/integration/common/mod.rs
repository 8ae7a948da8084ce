//! Shared helpers for the integration tests.
#![allow(dead_code)]

use npyz::WriterBuilder;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Set by `.ci/run`: a test whose prerequisite (data, Python packages, a CPU feature) is
/// missing fails instead of skipping, so a green CI run means every test really ran.
pub const REQUIRE_VAR: &str = "RELUCOMPILE_REQUIRE_PREREQUISITES";

/// The one skip policy: `true` when `available`; otherwise a skip notice and `false`, or a
/// failure when [`REQUIRE_VAR`] is set.
pub fn prerequisite(available: bool, what: &str) -> bool {
    if !available {
        assert!(
            std::env::var_os(REQUIRE_VAR).is_none(),
            "{what} is missing and {REQUIRE_VAR} is set"
        );
        eprintln!("SKIPPED: {what} is missing (.ci/run installs it)");
    }
    available
}

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn path(rel: &str) -> PathBuf {
    root().join(rel)
}

/// The models every lossless test runs on: the two shipped networks and the exporter variety.
pub const MODELS: &[&str] = &[
    "models/resnet18w16.onnx",
    "models/vgg.onnx",
    "fixtures/models/tiny_ts_opset9.onnx",
    "fixtures/models/tiny_ts_opset13.onnx",
    "fixtures/models/tiny_dynamo_opset18.onnx",
    "fixtures/models/tiny_dynamo_opset21.onnx",
    "fixtures/models/tiny_constant_nodes.onnx",
];

pub struct Output {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

pub fn relucompile(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_relucompile"))
        .args(args)
        .current_dir(root())
        .output()
        .expect("the relucompile binary runs");
    let o = Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert!(!o.stderr.contains("panicked"), "relucompile {args:?} panicked:\n{}", o.stderr);
    o
}

/// The JSON a successful command printed.
pub fn relucompile_json(args: &[&str]) -> serde_json::Value {
    let o = relucompile(args);
    assert_eq!(o.code, 0, "relucompile {args:?} failed:\n{}{}", o.stdout, o.stderr);
    serde_json::from_str(&o.stdout)
        .unwrap_or_else(|e| panic!("bad JSON from {args:?}: {e}\n{}", o.stdout))
}

/// Compare `actual` with the golden file, or rewrite it when UPDATE_GOLDEN=1.
pub fn assert_golden(rel: &str, actual: &serde_json::Value) {
    let file = path(rel);
    let text = serde_json::to_string_pretty(actual).unwrap() + "\n";
    if std::env::var("UPDATE_GOLDEN").as_deref() == Ok("1") {
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, &text).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&file)
        .unwrap_or_else(|e| panic!("golden file {rel} missing ({e}); run with UPDATE_GOLDEN=1"));
    let expected: serde_json::Value = serde_json::from_str(&expected).unwrap();
    assert_eq!(
        &expected, actual,
        "{rel} differs from the golden file; if the change is intended, rerun with UPDATE_GOLDEN=1"
    );
}

/// A file name for goldens: `models/vgg.onnx` -> `vgg`.
pub fn stem(model: &str) -> String {
    Path::new(model).file_stem().unwrap().to_string_lossy().into_owned()
}

/// The first 64 Fashion-MNIST test images, normalised as the shipped models expect.
pub fn real_images() -> Vec<f32> {
    let file = std::fs::File::open(path("fixtures/images/fmnist_test_64.npy")).unwrap();
    npyz::NpyFile::new(std::io::BufReader::new(file)).unwrap().into_vec().unwrap()
}

pub fn tmpdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("a temporary directory")
}

pub fn write_npy<T: npyz::AutoSerialize + Copy>(path: &Path, shape: &[u64], data: &[T]) {
    let mut w = npyz::WriteOptions::new()
        .default_dtype()
        .shape(shape)
        .writer(std::io::BufWriter::new(std::fs::File::create(path).unwrap()))
        .begin_nd()
        .unwrap();
    w.extend(data.iter().copied()).unwrap();
    w.finish().unwrap();
}

/// tract's outputs of `model` on `input` (a .npy file), written to `y`: one harness case.
pub fn tract_case(model: &Path, input: &Path, y: &Path) -> serde_json::Value {
    let o = relucompile(&[
        "run",
        model.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        y.to_str().unwrap(),
    ]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    serde_json::json!({"model": model, "input": input, "tract_output": y})
}

/// Whether python3 has these modules. Outside CI a missing one skips the caller (with a note);
/// in CI, where .ci/run installs them, it fails.
pub fn python_ready(modules: &[&str]) -> bool {
    let ready = Command::new("python3")
        .args(["-c", &format!("import {}", modules.join(", "))])
        .status()
        .is_ok_and(|s| s.success());
    prerequisite(ready, &format!("python3 with {modules:?} (tests/py/requirements.txt)"))
}

/// Run tests/py/check_onnx.py (onnx.checker full check, no Identity/dead nodes, onnxruntime
/// against tract and against the reference) on these cases; panics with its report on failure.
pub fn cross_check(dir: &Path, cases: &[serde_json::Value]) -> String {
    let manifest = dir.join("manifest.json");
    std::fs::write(&manifest, serde_json::to_string(cases).unwrap()).unwrap();
    let o = Command::new("python3")
        .arg(path("tests/py/check_onnx.py"))
        .arg(&manifest)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "cross-check failed:\n{stdout}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(stdout.contains(&format!("{} passed, 0 failed", cases.len())), "{stdout}");
    stdout
}

/// A float tensor value declaration with fixed dims, for graphs built in memory.
pub fn value_info(name: &str, dims: &[i64]) -> tract_onnx::pb::ValueInfoProto {
    use tract_onnx::pb::tensor_shape_proto::{dimension::Value, Dimension};
    tract_onnx::pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(tract_onnx::pb::TypeProto {
            value: Some(tract_onnx::pb::type_proto::Value::TensorType(
                tract_onnx::pb::type_proto::Tensor {
                    elem_type: 1,
                    shape: Some(tract_onnx::pb::TensorShapeProto {
                        dim: dims
                            .iter()
                            .map(|&d| Dimension {
                                value: Some(Value::DimValue(d)),
                                ..Default::default()
                            })
                            .collect(),
                    }),
                },
            )),
            ..Default::default()
        }),
        ..Default::default()
    }
}

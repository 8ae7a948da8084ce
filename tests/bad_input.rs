//! Malformed input: a clear message naming the problem, a documented exit code, no panic and
//! no output file.

mod common;
use common::*;

fn compile_fails(model: &str, code: i32, needles: &[&str]) {
    let dir = tmpdir();
    let out = dir.path().join("out.onnx");
    let o = relucompile(&[model, "-o", out.to_str().unwrap()]);
    assert_eq!(o.code, code, "{model}: expected exit {code}, got {}:\n{}", o.code, o.stderr);
    for needle in needles {
        assert!(o.stderr.contains(needle), "{model}: message lacks '{needle}':\n{}", o.stderr);
    }
    assert!(o.stderr.starts_with("error: "), "{}", o.stderr);
    assert!(!out.exists(), "{model}: an output file was written");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "{model}: left files behind");
    // inspect refuses the same file the same way.
    assert_eq!(relucompile(&["inspect", model]).code, code);
}

#[test]
fn empty_file() {
    compile_fails("fixtures/models/bad/empty.onnx", 3, &["empty.onnx", "empty"]);
}

#[test]
fn truncated_file() {
    compile_fails(
        "fixtures/models/bad/truncated.onnx",
        3,
        &["truncated.onnx", "truncated or corrupt"],
    );
}

#[test]
fn random_bytes() {
    compile_fails("fixtures/models/bad/random.onnx", 3, &["random.onnx"]);
}

#[test]
fn dangling_input() {
    compile_fails(
        "fixtures/models/bad/dangling_input.onnx",
        3,
        &["dangling_input.onnx", "which no node"],
    );
}

#[test]
fn unknown_op() {
    compile_fails("fixtures/models/bad/unknown_op.onnx", 4, &["FancyUnknownOp"]);
}

#[test]
fn control_flow() {
    compile_fails("fixtures/models/bad/control_flow.onnx", 4, &["control flow", "(If)"]);
}

#[test]
fn missing_file() {
    let o = relucompile(&["inspect", "no/such/model.onnx"]);
    assert_eq!(o.code, 1);
    assert!(o.stderr.contains("no/such/model.onnx"), "{}", o.stderr);
}

#[test]
fn input_is_never_overwritten_without_force() {
    let dir = tmpdir();
    let copy = dir.path().join("m.onnx");
    std::fs::copy(path("fixtures/models/tiny_ts_opset13.onnx"), &copy).unwrap();
    let before = std::fs::read(&copy).unwrap();
    let o = relucompile(&[copy.to_str().unwrap(), "-o", copy.to_str().unwrap()]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("--force"), "{}", o.stderr);
    assert_eq!(std::fs::read(&copy).unwrap(), before);
}

#[test]
fn output_directory_is_refused() {
    let dir = tmpdir();
    let o =
        relucompile(&["fixtures/models/tiny_ts_opset13.onnx", "-o", dir.path().to_str().unwrap()]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("is a directory"), "{}", o.stderr);
}

#[test]
fn unknown_pass_is_a_usage_error() {
    let dir = tmpdir();
    let out = dir.path().join("o.onnx");
    let o = relucompile(&[
        "fixtures/models/tiny_ts_opset13.onnx",
        "-o",
        out.to_str().unwrap(),
        "--passes",
        "fold-bn,frobnicate",
    ]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("frobnicate"), "{}", o.stderr);
    assert!(!out.exists());
}

#[test]
fn bad_input_shape_is_a_usage_error() {
    let o = relucompile(&["inspect", "models/vgg.onnx", "--input-shape", "1xfoo"]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("1xfoo"), "{}", o.stderr);
}

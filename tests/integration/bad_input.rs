//! Malformed input: a clear message naming the problem, a documented exit code, no panic and
//! no output file.

use crate::common::*;

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

/// Writes `bytes` as a model file in `dir` and returns its path.
fn model_file(dir: &std::path::Path, name: &str, bytes: &[u8]) -> String {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p.to_str().unwrap().to_string()
}

#[test]
fn wrong_protobuf_types() {
    // ModelProto field 7 (graph) must be a length-delimited message; here it is a varint.
    let dir = tmpdir();
    let m = model_file(dir.path(), "wiretype.onnx", &[0x08, 0x08, 0x38, 0x01]);
    let o = relucompile(&["inspect", &m]);
    assert_eq!(o.code, 3, "{}", o.stderr);
    assert!(o.stderr.contains("wiretype.onnx") && o.stderr.contains("protobuf"), "{}", o.stderr);
}

#[test]
fn op_with_missing_attributes() {
    use prost::Message;
    use tract_onnx::pb;
    let value = value_info;
    // MaxPool requires kernel_shape.
    let proto = pb::ModelProto {
        ir_version: 8,
        opset_import: vec![pb::OperatorSetIdProto { domain: String::new(), version: 13 }],
        graph: Some(pb::GraphProto {
            node: vec![pb::NodeProto {
                name: "pool_without_kernel".into(),
                op_type: "MaxPool".into(),
                input: vec!["x".into()],
                output: vec!["y".into()],
                ..Default::default()
            }],
            input: vec![value("x", &[1, 1, 8, 8])],
            output: vec![value("y", &[1, 1, 4, 4])],
            ..Default::default()
        }),
        ..Default::default()
    };
    let dir = tmpdir();
    let m = model_file(dir.path(), "noattr.onnx", &proto.encode_to_vec());
    let out = dir.path().join("out.onnx");
    let o = relucompile(&[&m, "-o", out.to_str().unwrap()]);
    assert_eq!(o.code, 3, "{}", o.stderr);
    assert!(
        o.stderr.contains("pool_without_kernel") && o.stderr.contains("kernel_shape"),
        "{}",
        o.stderr
    );
    assert!(!out.exists());
}

#[test]
fn output_path_that_cannot_be_created_is_refused() {
    let dir = tmpdir();
    let file = dir.path().join("plain_file");
    std::fs::write(&file, b"x").unwrap();
    let out = file.join("out.onnx"); // a "directory" that is a regular file
    let o = relucompile(&[
        "fixtures/models/tiny_ts_opset13.onnx",
        "-o",
        out.to_str().unwrap(),
        "--no-progress",
    ]);
    assert_ne!(o.code, 0);
    assert!(o.stderr.contains("plain_file"), "{}", o.stderr);
    assert_eq!(std::fs::read(&file).unwrap(), b"x");
}

// Regression tests from fuzzing (fuzz/, README "Fuzzing"): each input once crashed a target.

#[test]
fn fuzz_decode_constant_of_huge_shape() {
    // A shape constant mutated to ask for an 11 TB tensor: tract's allocation panicked.
    compile_fails(
        "fixtures/models/fuzz/decode-constant-of-huge-shape.onnx",
        3,
        &["decode-constant-of-huge-shape.onnx", "ConstantOfShape", "limit"],
    );
}

#[test]
fn fuzz_pipeline_division_by_zero() {
    // A mutated graph on which tract's shape arithmetic divides by zero when it is prepared.
    let model = "fixtures/models/fuzz/pipeline-division-by-zero.onnx";
    let dir = tmpdir();
    let out = dir.path().join("out.onnx");
    let o = relucompile(&[model, "-o", out.to_str().unwrap(), "--no-progress"]);
    assert_eq!(o.code, 3, "{}", o.stderr);
    assert!(
        o.stderr.contains("tract cannot prepare the graph")
            && o.stderr.contains("pipeline-division-by-zero.onnx"),
        "{}",
        o.stderr
    );
    assert!(!out.exists());
}

#[test]
fn fuzz_pipeline_batchnorm_on_rank_1() {
    // BatchNormalization reading a 1-D bias: tract indexed its channel axis out of bounds and
    // aborted the process (a non-unwinding panic) before relucompile checked ranks itself.
    compile_fails(
        "fixtures/models/fuzz/pipeline-batchnorm-on-rank-1.onnx",
        3,
        &["pipeline-batchnorm-on-rank-1.onnx", "'bn3.bias' of rank 1", "BatchNormalization"],
    );
}

#[test]
fn fuzz_decode_constant_of_shape_11gb() {
    // A ConstantOfShape weight whose shape was mutated to ask for 2.8e9 elements: tract
    // allocated 11 GB folding it before failing.
    compile_fails(
        "fixtures/models/fuzz/decode-constant-of-shape-11gb.onnx",
        3,
        &["decode-constant-of-shape-11gb.onnx", "ConstantOfShape", "limit"],
    );
}

#[test]
fn fuzz_pipeline_batchnorm_folds_to_infinity() {
    // A BatchNormalization whose folding would bake non-finite weights: fold-bn used to write
    // them, and the emitted graph was one relucompile itself refuses to load. Now the BN is
    // kept, the outputs match and the written graph loads again.
    let dir = tmpdir();
    let out = dir.path().join("out.onnx");
    let report = relucompile_json(&[
        "fixtures/models/fuzz/pipeline-batchnorm-folds-to-infinity.onnx",
        "-o",
        out.to_str().unwrap(),
        "--json",
        "--no-progress",
    ]);
    assert!(report["check_random"]["rel_diff"].as_f64().unwrap() <= 1e-4);
    assert_eq!(relucompile(&["inspect", out.to_str().unwrap()]).code, 0);
}

#[test]
fn fuzz_pipeline_maxpool_window_of_padding() {
    // A MaxPool whose top padding (2) is as tall as its kernel: its first row of windows sees
    // padding only (-inf), so moving the ReLU behind it turned 0 into -inf. relu-after-maxpool
    // now leaves such pools alone and the outputs match.
    let dir = tmpdir();
    let out = dir.path().join("out.onnx");
    let report = relucompile_json(&[
        "fixtures/models/fuzz/pipeline-maxpool-window-of-padding.onnx",
        "-o",
        out.to_str().unwrap(),
        "--json",
        "--no-progress",
        "--verify-each",
    ]);
    assert!(report["check_random"]["rel_diff"].as_f64().unwrap() <= 1e-4);
    let moved =
        report["passes"].as_array().unwrap().iter().find(|p| p["pass"] == "relu-after-maxpool");
    assert_eq!(moved.unwrap()["rewrites"], 1, "only the second pool's ReLU may move");
}

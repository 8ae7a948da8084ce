//! Malformed graphs built in memory: each is refused with a message naming the problem and
//! the exit code of an invalid model, never a panic.

use relucompile::error::{exit_code_of, ExitCode};
use relucompile::frontend::model_from_proto;
use tract_onnx::pb;

use crate::common::value_info as value;

fn node(name: &str, op: &str, inputs: &[&str], outputs: &[&str]) -> pb::NodeProto {
    pb::NodeProto {
        name: name.into(),
        op_type: op.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn model(
    nodes: Vec<pb::NodeProto>,
    inits: Vec<pb::TensorProto>,
    outputs: &[&str],
) -> pb::ModelProto {
    pb::ModelProto {
        ir_version: 8,
        opset_import: vec![pb::OperatorSetIdProto { domain: String::new(), version: 13 }],
        graph: Some(pb::GraphProto {
            node: nodes,
            initializer: inits,
            input: vec![value("x", &[1, 4])],
            output: outputs.iter().map(|o| value(o, &[1, 4])).collect(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn weight(name: &str, dims: &[i64], values: &[f32]) -> pb::TensorProto {
    pb::TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: 1,
        float_data: values.to_vec(),
        ..Default::default()
    }
}

fn refused(proto: pb::ModelProto, needle: &str) {
    let err = model_from_proto(&proto, None).expect_err("the model must be refused");
    let msg = format!("{err:#}");
    assert_eq!(exit_code_of(&err), ExitCode::InvalidModel, "{msg}");
    assert!(msg.contains(needle), "message lacks '{needle}': {msg}");
}

#[test]
fn a_valid_graph_is_accepted() {
    let m = model(vec![node("r", "Relu", &["x"], &["y"])], vec![], &["y"]);
    assert!(model_from_proto(&m, None).is_ok());
}

#[test]
fn cycle() {
    let m = model(
        vec![node("a", "Add", &["x", "c"], &["b"]), node("b", "Relu", &["b"], &["c"])],
        vec![],
        &["c"],
    );
    refused(m, "cycle");
}

#[test]
fn duplicate_output_names() {
    let m = model(vec![node("r", "Relu", &["x"], &["y"])], vec![], &["y", "y"]);
    refused(m, "listed twice");
}

#[test]
fn value_defined_twice() {
    let m = model(
        vec![node("r1", "Relu", &["x"], &["y"]), node("r2", "Relu", &["x"], &["y"])],
        vec![],
        &["y"],
    );
    refused(m, "defined twice");
}

#[test]
fn initializer_data_does_not_match_dims() {
    let m = model(
        vec![node("a", "Add", &["x", "w"], &["y"])],
        vec![weight("w", &[4], &[1.0, 2.0])],
        &["y"],
    );
    refused(m, "initializer 'w'");
}

#[test]
fn negative_dims() {
    let m =
        model(vec![node("a", "Add", &["x", "w"], &["y"])], vec![weight("w", &[-4], &[])], &["y"]);
    refused(m, "negative dimension");
}

#[test]
fn huge_dims() {
    let m = model(
        vec![node("a", "Add", &["x", "w"], &["y"])],
        vec![weight("w", &[1 << 40, 1 << 40], &[])],
        &["y"],
    );
    refused(m, "too large");
}

#[test]
fn nan_and_infinite_weights() {
    for bad in [f32::NAN, f32::INFINITY] {
        let m = model(
            vec![node("a", "Add", &["x", "w"], &["y"])],
            vec![weight("w", &[4], &[1.0, bad, 0.0, 0.0])],
            &["y"],
        );
        refused(m, "NaN or infinite");
    }
}

#[test]
fn missing_external_data_file() {
    let mut w = weight("w", &[4], &[]);
    w.data_location = Some(pb::tensor_proto::DataLocation::External as i32);
    w.external_data =
        vec![pb::StringStringEntryProto { key: "location".into(), value: "nowhere.bin".into() }];
    let m = model(vec![node("a", "Add", &["x", "w"], &["y"])], vec![w], &["y"]);
    let dir = tempfile::tempdir().unwrap();
    let err = model_from_proto(&m, Some(dir.path())).unwrap_err();
    assert!(format!("{err:#}").contains("nowhere.bin"), "{err:#}");
}

#[test]
fn output_nobody_produces() {
    let m = model(vec![node("r", "Relu", &["x"], &["y"])], vec![], &["z"]);
    refused(m, "'z'");
}

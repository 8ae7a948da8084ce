//! One convention across subcommands: `--input-shape` in the form `inspect` prints it,
//! `--json` on the commands that had none, and the cost model naming what it cannot price.

use crate::common::*;

#[test]
fn input_shape_takes_what_inspect_prints() {
    let census = relucompile_json(&["inspect", "models/vgg.onnx", "--json"]);
    let printed = relucompile(&["inspect", "models/vgg.onnx"]);
    assert!(printed.stdout.contains("(input 1x28x28)"), "{}", printed.stdout);
    for shape in ["1x28x28", "1x1x28x28"] {
        let again =
            relucompile_json(&["inspect", "models/vgg.onnx", "--input-shape", shape, "--json"]);
        assert_eq!(again["total_relus"], census["total_relus"], "{shape}");
    }
    let o = relucompile(&["inspect", "models/vgg.onnx", "--input-shape", "28x28"]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(
        o.stderr.contains("--input-shape 28x28") && o.stderr.contains("1x28x28"),
        "{}",
        o.stderr
    );
}

#[test]
fn passes_and_run_print_json() {
    let passes = relucompile_json(&["passes", "--json"]);
    let list = passes["passes"].as_array().unwrap();
    let recalibrate = list.iter().find(|p| p["name"] == "recalibrate").unwrap();
    assert_eq!(recalibrate["lossless"], false);
    assert!(list.iter().any(|p| p["name"] == "fold-bn" && p["lossless"] == true));
    assert!(passes["default_pipeline"].as_str().unwrap().contains("fold-bn"));

    let dir = tmpdir();
    let out = dir.path().join("y.npy");
    let input = path("fixtures/images/fmnist_test_64.npy");
    let r = relucompile_json(&[
        "run",
        "models/vgg.onnx",
        "--input",
        input.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(r["output_shape"], serde_json::json!([64, 10]), "{r}");
    assert_eq!(r["sample_shape"], serde_json::json!([1, 28, 28]), "{r}");
    assert_eq!(r["engine"], "tract", "{r}");
    assert!(out.metadata().unwrap().len() >= 64 * 10 * 4);
    // The native engine's outputs, written the same way, agree with tract's.
    let native = dir.path().join("native.npy");
    let n = relucompile_json(&[
        "run",
        "models/vgg.onnx",
        "--input",
        input.to_str().unwrap(),
        "--output",
        native.to_str().unwrap(),
        "--engine",
        "native",
        "--json",
    ]);
    assert_eq!(n["engine"], "native", "{n}");
    let read = |p: &std::path::Path| -> Vec<f32> {
        let file = std::fs::File::open(p).unwrap();
        npyz::NpyFile::new(std::io::BufReader::new(file)).unwrap().into_vec().unwrap()
    };
    let (a, b) = (read(&out), read(&native));
    assert_eq!(a.len(), 640);
    let largest = a.iter().fold(1f32, |m, v| m.max(v.abs()));
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-4 * largest, "native {y} against tract {x}");
    }
}

/// A nonlinearity other than ReLU (a Sigmoid here, in place of the tiny fixture's first ReLU)
/// is named in a warning and in the JSON, not counted as free.
#[test]
fn unpriced_nonlinearities_are_named() {
    let dir = tmpdir();
    let mut model =
        relucompile::frontend::load_model(&path("fixtures/models/tiny_ts_opset13.onnx")).unwrap();
    let relu = model.graph.nodes.iter_mut().find(|n| n.op_type == "Relu").unwrap();
    relu.op_type = "Sigmoid".into();
    let file = dir.path().join("sigmoid.onnx");
    relucompile::frontend::write_model_atomic(&file, &model).unwrap();
    let o = relucompile(&["inspect", file.to_str().unwrap(), "--json"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stderr.contains("no price for Sigmoid (1 node"), "{}", o.stderr);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["unpriced"][0]["op"], "Sigmoid", "{v}");
    assert!(v["cost"]["warning"].as_str().unwrap().contains("Sigmoid"), "{v}");
    let plain = relucompile(&["inspect", "fixtures/models/tiny_ts_opset13.onnx"]);
    assert!(!plain.stderr.contains("no price"), "{}", plain.stderr);
}

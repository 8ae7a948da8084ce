//! `relucompile in.onnx -o out.onnx` end to end: goldens of the rewritten graph's summary,
//! deterministic bytes, and the onnx.checker + onnxruntime cross-check of every output.

use crate::common::*;
use std::path::Path;

fn compile(model: &str, out: &Path) -> serde_json::Value {
    relucompile_json(&[model, "-o", out.to_str().unwrap(), "--json"])
}

/// The parts of a compile report that must not drift: what each pass did and both censuses.
fn summary(report: &serde_json::Value) -> serde_json::Value {
    let passes: Vec<serde_json::Value> = report["passes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| serde_json::json!({"pass": p["pass"], "rewrites": p["rewrites"], "nodes_after": p["nodes_after"]}))
        .collect();
    serde_json::json!({
        "pipeline": report["pipeline"],
        "passes": passes,
        "before": report["before"],
        "after": report["after"],
    })
}

#[test]
fn rewritten_graph_summaries_match_goldens() {
    let dir = tmpdir();
    for model in MODELS {
        let out = dir.path().join(format!("{}.onnx", stem(model)));
        let report = compile(model, &out);
        assert!(out.exists());
        let tol = report["check_tolerance"].as_f64().unwrap();
        assert!(report["check_random"]["rel_diff"].as_f64().unwrap() <= tol);
        assert_golden(&format!("fixtures/golden/{}.compile.json", stem(model)), &summary(&report));
    }
}

#[test]
fn shipped_models_are_checked_on_real_images() {
    let dir = tmpdir();
    for model in ["models/resnet18w16.onnx", "models/vgg.onnx"] {
        let report = compile(model, &dir.path().join("o.onnx"));
        let real = &report["check_real"];
        assert_eq!(real["samples"], 64, "{model}: {report}");
        assert_eq!(real["argmax_agreement"], 1.0);
    }
}

#[test]
fn moving_relus_after_pools_reduces_the_vgg_count() {
    let dir = tmpdir();
    let report = compile("models/vgg.onnx", &dir.path().join("o.onnx"));
    let before = report["before"]["total_relus"].as_u64().unwrap();
    let after = report["after"]["total_relus"].as_u64().unwrap();
    assert!(after < before, "{before} -> {after}");
}

#[test]
fn output_is_deterministic() {
    let dir = tmpdir();
    let (a, b) = (dir.path().join("a.onnx"), dir.path().join("b.onnx"));
    compile("models/resnet18w16.onnx", &a);
    compile("models/resnet18w16.onnx", &b);
    assert_eq!(std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
}

#[test]
fn verify_each_checks_every_pass() {
    let dir = tmpdir();
    let out = dir.path().join("o.onnx");
    let report = relucompile_json(&[
        "models/vgg.onnx",
        "-o",
        out.to_str().unwrap(),
        "--json",
        "--verify-each",
    ]);
    for p in report["passes"].as_array().unwrap() {
        if p["rewrites"].as_u64().unwrap() > 0 {
            assert!(p["check"]["rel_diff"].as_f64().unwrap() <= 1e-4, "{p}");
        }
    }
}

/// onnx.checker (full check) and onnxruntime agree with tract on every emitted graph.
#[test]
fn onnxruntime_and_checker_accept_every_output() {
    if !python_ready(&["onnx", "onnxruntime", "numpy"]) {
        return;
    }
    let dir = tmpdir();
    let mut cases = vec![];
    for model in MODELS {
        let name = stem(model);
        let out = dir.path().join(format!("{name}.onnx"));
        compile(model, &out);
        let v = relucompile_json(&["inspect", model, "--json"]);
        let sample: Vec<u64> =
            v["input_shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap()).collect();
        let per: u64 = sample.iter().product();
        let input = dir.path().join(format!("{name}_x.npy"));
        let data = relucompile::data::random_inputs(8 * per as usize, 11);
        let mut shape = vec![8];
        shape.extend(&sample);
        write_npy(&input, &shape, &data);
        let y = dir.path().join(format!("{name}_y.npy"));
        let mut case = tract_case(&out, &input, &y);
        case["reference"] = serde_json::json!(path(model));
        cases.push(case);
        if sample == [1, 28, 28] {
            let real = path("fixtures/images/fmnist_test_64.npy");
            let mut case = tract_case(&out, &real, &dir.path().join(format!("{name}_real_y.npy")));
            case["reference"] = serde_json::json!(path(model));
            cases.push(case);
        }
    }
    // Lossy graphs: no reference output to match, but the ReLU count is checked independently.
    let lossy: &[(&str, &[&str])] = &[
        ("models/resnet18w16.onnx", &["--cull", "1,2", "--thin", "bottom"]),
        ("models/resnet18w16.onnx", &["--channel-threshold", "0.99"]),
        ("models/vgg.onnx", &["--thin", "alternate"]),
        ("models/vgg.onnx", &["--channel-threshold", "0.95"]),
        ("models/vgg.onnx", &["--channel-threshold", "0.6"]),
        ("models/resnet18w16.onnx", &["--thin", "top"]),
        ("models/vgg.onnx", &["--cull", "1"]),
    ];
    for (k, (model, flags)) in lossy.iter().enumerate() {
        let out = dir.path().join(format!("lossy{k}.onnx"));
        // The harness checks the written graph, not its accuracy: a small refit will do.
        let mut args = vec![*model, "-o", out.to_str().unwrap(), "--json", "--limit", "200"];
        args.extend_from_slice(&["--calibration-images", "256"]);
        args.extend_from_slice(flags);
        let report = relucompile_json(&args);
        let real = path("fixtures/images/fmnist_test_64.npy");
        let mut case = tract_case(&out, &real, &dir.path().join(format!("lossy{k}_y.npy")));
        case["relus"] = report["after"]["total_relus"].clone();
        cases.push(case);
    }
    cross_check(dir.path(), &cases);
}

/// An output whose directory does not exist is refused before any work, naming it.
#[test]
fn a_missing_output_directory_is_refused_at_once() {
    let dir = tmpdir();
    let out = dir.path().join("missing_dir/x.onnx");
    let started = std::time::Instant::now();
    let o = relucompile(&["models/resnet18w16.onnx", "-o", out.to_str().unwrap(), "--cull", "1,2"]);
    let seconds = started.elapsed().as_secs_f64();
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(
        o.stderr.contains("missing_dir") && o.stderr.contains("does not exist"),
        "{}",
        o.stderr
    );
    assert!(seconds < 2.0, "the refusal took {seconds:.1} s");
    assert!(!out.exists());
}

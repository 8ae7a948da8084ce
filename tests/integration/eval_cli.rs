//! `relucompile eval` end to end: the built binary on the shipped models and Fashion-MNIST.
//!
//! Tests that need Fashion-MNIST skip (with a note on stderr) when it is not installed at
//! /usr/share/datasets/fashion-mnist; CI (.ci/run) installs it, so there they run. Tests on the
//! shipped models skip while models/*.onnx do not exist yet, and the tiny fixture stands in.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_relucompile");
const FASHION_MNIST: &str = "/usr/share/datasets/fashion-mnist";

/// How far (in accuracy points) the first 500 test images may stray from the full 10k test
/// accuracy recorded in models/metrics.json. The binomial standard error of a 500-image
/// estimate at ~92% accuracy is about 1.2 points, and the subset is fixed (the first 500), so
/// the check is deterministic: it catches a wrong normalisation, label order or channel layout
/// (tens of points), not sampling noise.
const SUBSET_TOLERANCE_POINTS: f64 = 1.5;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn have_fashion_mnist(test: &str) -> bool {
    let ok = Path::new(FASHION_MNIST).join("t10k-images-idx3-ubyte.gz").is_file()
        || Path::new(FASHION_MNIST).join("t10k-images-idx3-ubyte").is_file();
    crate::common::prerequisite(ok, &format!("{test}: Fashion-MNIST at {FASHION_MNIST}"))
}

/// `models/<name>.onnx`, which is committed: its absence is a failure, not a skip.
fn shipped(name: &str, test: &str) -> Option<PathBuf> {
    let p = root().join("models").join(format!("{name}.onnx"));
    assert!(p.is_file(), "{test}: {} is missing", p.display());
    Some(p)
}

fn tiny() -> PathBuf {
    root().join("fixtures/models/tiny_ts_opset13.onnx")
}

fn relucompile(args: &[&str]) -> Output {
    Command::new(BIN).args(args).current_dir(root()).output().expect("the binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Run `eval ... --json` and parse its stdout, which must be exactly one JSON object.
fn eval_json(args: &[&str]) -> serde_json::Value {
    let mut all = vec!["eval", "--json"];
    all.extend_from_slice(args);
    let out = relucompile(&all);
    assert!(
        out.status.success(),
        "relucompile {all:?} failed ({:?}):\n{}",
        out.status.code(),
        text(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("stdout of {all:?} is not one JSON object ({e}):\n{}", text(&out.stdout))
    })
}

fn recorded_accuracy(name: &str) -> f64 {
    let path = root().join("models/metrics.json");
    let metrics: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap();
    metrics[name]["test_accuracy"]
        .as_f64()
        .unwrap_or_else(|| panic!("{} has no {name}.test_accuracy", path.display()))
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn assert_no_panic(out: &Output) {
    let err = text(&out.stderr);
    assert!(!err.contains("panicked") && !err.contains("RUST_BACKTRACE"), "a panic:\n{err}");
}

#[test]
fn shipped_models_match_recorded_accuracy() {
    if !have_fashion_mnist("shipped_models_match_recorded_accuracy") {
        return;
    }
    for name in ["resnet18w16", "vgg"] {
        let Some(model) = shipped(name, "shipped_models_match_recorded_accuracy") else {
            continue;
        };
        let r = eval_json(&[path_str(&model), "--limit", "500"]);
        assert_eq!(r["images"], 500);
        assert_eq!(r["split"], "test");
        let got = r["accuracy"].as_f64().unwrap();
        let want = recorded_accuracy(name);
        assert!(
            (got - want).abs() * 100.0 <= SUBSET_TOLERANCE_POINTS,
            "{name}: accuracy on the first 500 test images {got:.4}, recorded on 10k {want:.4}"
        );
        assert!(r["images_per_second"].as_f64().unwrap() > 0.0);
        assert_eq!(r["correct"].as_u64().unwrap() as f64 / 500.0, got);
    }
}

#[test]
fn reference_against_itself_and_another_model() {
    if !have_fashion_mnist("reference_against_itself_and_another_model") {
        return;
    }
    let resnet = shipped("resnet18w16", "reference_against_itself_and_another_model");
    let model = resnet.clone().unwrap_or_else(tiny);
    let m = path_str(&model);
    let r = eval_json(&[m, "--limit", "200", "--reference", m, "--batch", "32"]);
    let rf = &r["reference"];
    assert_eq!(rf["agreement"].as_f64(), Some(1.0), "{r}");
    assert_eq!(rf["max_abs_diff"].as_f64(), Some(0.0), "{r}");
    assert_eq!(rf["accuracy"], r["accuracy"]);
    assert_eq!(r["batch"], 32);

    // A copy of the model in another file: the reference pass really runs, and agrees.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("copy.onnx");
    std::fs::copy(&model, &copy).unwrap();
    let r = eval_json(&[m, "--limit", "100", "--reference", path_str(&copy)]);
    assert_eq!(r["reference"]["agreement"].as_f64(), Some(1.0), "{r}");

    // Two different networks: both accuracies, partial agreement.
    if let (Some(resnet), Some(vgg)) =
        (resnet, shipped("vgg", "reference_against_itself_and_another_model"))
    {
        let r = eval_json(&[path_str(&resnet), "--limit", "500", "--reference", path_str(&vgg)]);
        let rf = &r["reference"];
        let vgg_acc = rf["accuracy"].as_f64().unwrap();
        assert!(
            (vgg_acc - recorded_accuracy("vgg")).abs() * 100.0 <= SUBSET_TOLERANCE_POINTS,
            "{r}"
        );
        let agreement = rf["agreement"].as_f64().unwrap();
        assert!(agreement > 0.8 && agreement < 1.0, "{r}");
        assert!(rf["max_abs_diff"].as_f64().unwrap() > 0.0, "{r}");
    }
}

#[test]
fn human_summary() {
    if !have_fashion_mnist("human_summary") {
        return;
    }
    let model = shipped("vgg", "human_summary").unwrap_or_else(tiny);
    let out = relucompile(&["eval", path_str(&model), "--limit", "64", "--no-progress"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    for needle in ["accuracy", "%", "images/s", FASHION_MNIST, "(test, 64 images)"] {
        assert!(stdout.contains(needle), "'{needle}' missing from:\n{stdout}");
    }
}

#[test]
fn images_of_the_wrong_size_exit_6_naming_both_shapes() {
    let model = shipped("resnet18w16", "images_of_the_wrong_size_exit_6").unwrap_or_else(tiny);
    let data = root().join("fixtures/models/bad/wrong_size_images");
    let out = relucompile(&["eval", path_str(&model), "--data", path_str(&data), "--json"]);
    assert_eq!(out.status.code(), Some(6), "stderr:\n{}", text(&out.stderr));
    assert_no_panic(&out);
    let err = text(&out.stderr);
    for needle in
        ["1x32x32", "1x28x28", "wrong_size_images", model.file_name().unwrap().to_str().unwrap()]
    {
        assert!(err.contains(needle), "'{needle}' missing from:\n{err}");
    }
    assert!(out.stdout.is_empty(), "nothing on stdout on error");
}

#[test]
fn missing_data_exits_6() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-dir");
    let out = relucompile(&["eval", path_str(&tiny()), "--data", path_str(&missing)]);
    assert_eq!(out.status.code(), Some(6), "stderr:\n{}", text(&out.stderr));
    assert_no_panic(&out);
    assert!(text(&out.stderr).contains("no-such-dir"), "{}", text(&out.stderr));

    // A directory without the IDX files.
    let out = relucompile(&["eval", path_str(&tiny()), "--data", path_str(dir.path())]);
    assert_eq!(out.status.code(), Some(6), "stderr:\n{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("t10k-images-idx3-ubyte"), "{}", text(&out.stderr));
}

#[test]
fn bad_options_are_usage_errors() {
    for args in [
        &["--input-shape", "1x1xbad"][..],
        &["--mean", "x"],
        &["--limit", "0"],
        &["--split", "validation"],
    ] {
        let model = tiny();
        let mut all = vec!["eval", path_str(&model)];
        all.extend_from_slice(args);
        let out = Command::new(BIN).args(&all).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out.stderr));
        assert!(text(&out.stderr).contains(args[0]), "{args:?}: {}", text(&out.stderr));
    }
}

/// The same images as a float .npy (already normalised) and as IDX give the same result.
#[test]
fn npy_data_matches_idx() {
    if !have_fashion_mnist("npy_data_matches_idx") {
        return;
    }
    use npyz::WriterBuilder;
    use relucompile::data;
    let model_path = shipped("resnet18w16", "npy_data_matches_idx").unwrap_or_else(tiny);
    let model = relucompile::frontend::load_model(&model_path).unwrap();
    let norm = data::try_normalisation_for(&model, None, None, None).unwrap();
    let d = data::load("fashion-mnist", data::Split::Test, Some(150), &norm).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("fm.npy");
    let mut w = npyz::WriteOptions::new()
        .default_dtype()
        .shape(&[150, 1, 28, 28])
        .writer(std::io::BufWriter::new(std::fs::File::create(&images).unwrap()))
        .begin_nd()
        .unwrap();
    w.extend(d.images.iter().copied()).unwrap();
    w.finish().unwrap();
    let mut w = npyz::WriteOptions::new()
        .default_dtype()
        .shape(&[150])
        .writer(std::io::BufWriter::new(
            std::fs::File::create(dir.path().join("fm_labels.npy")).unwrap(),
        ))
        .begin_nd()
        .unwrap();
    w.extend(d.labels.iter().map(|&l| l as i64)).unwrap();
    w.finish().unwrap();

    let m = path_str(&model_path);
    let from_idx = eval_json(&[m, "--limit", "150"]);
    let from_npy = eval_json(&[m, "--data", path_str(&images)]);
    assert_eq!(from_npy["images"], 150);
    assert_eq!(from_npy["correct"], from_idx["correct"], "idx {from_idx}\nnpy {from_npy}");
    assert_eq!(from_npy["split"], "npy");
}

/// The shipped ResNet as a wrapper module exports it: no normalisation metadata, the
/// normalisation in the graph as Sub and Div by constants before the first Conv (so it takes
/// pixels scaled to [0, 1]). It must run on the native engine, not tract, at the accuracy of
/// the original with its metadata.
#[test]
fn normalisation_in_the_graph_runs_natively_at_the_original_accuracy() {
    use relucompile::ir::{Node, Tensor};
    if !have_fashion_mnist("normalisation_in_the_graph_runs_natively_at_the_original_accuracy") {
        return;
    }
    let original = root().join("models/resnet18w16.onnx");
    let mut model = relucompile::frontend::load_model(&original).unwrap();
    let meta = |key: &str| -> f32 {
        let entry = model.metadata_props.iter().find(|e| e.key == key).unwrap();
        entry.value.parse().unwrap()
    };
    let (mean, std) = (meta("relucompile.mean"), meta("relucompile.std"));
    model.metadata_props.retain(|e| !e.key.starts_with("relucompile."));
    let g = &mut model.graph;
    let input = g.inputs[0].name.clone();
    for n in g.nodes.iter_mut() {
        for i in n.inputs.iter_mut().filter(|i| **i == input) {
            *i = "normalised".into();
        }
    }
    g.initializers.insert("pixel_mean".into(), Tensor::from_f32(vec![1, 1, 1, 1], &[mean]));
    g.initializers.insert("pixel_std".into(), Tensor::from_f32(vec![1, 1, 1, 1], &[std]));
    let sub = Node::new("sub", "Sub", vec![input, "pixel_mean".into()], vec!["centred".into()]);
    let div = Node::new(
        "div",
        "Div",
        vec!["centred".into(), "pixel_std".into()],
        vec!["normalised".into()],
    );
    g.nodes.insert(0, div);
    g.nodes.insert(0, sub);
    let dir = tempfile::tempdir().unwrap();
    let variant = dir.path().join("resnet18w16_in_graph.onnx");
    relucompile::frontend::write_model_atomic(&variant, &model).unwrap();
    let ours = eval_json(&[path_str(&variant), "--limit", "1000"]);
    let theirs = eval_json(&[path_str(&original), "--limit", "1000"]);
    assert_eq!(ours["engine"], "native", "{ours}");
    // Found in the graph: fed pixels scaled to [0, 1], and the report says why.
    assert_eq!(ours["normalisation"]["source"], "in-graph", "{ours}");
    assert_eq!(ours["normalisation"]["mean"], serde_json::json!([0.0]), "{ours}");
    assert_eq!(theirs["normalisation"]["source"], "metadata", "{theirs}");
    let (a, b) = (ours["accuracy"].as_f64().unwrap(), theirs["accuracy"].as_f64().unwrap());
    // Normalising in the graph rounds differently from normalising while loading: a prediction
    // may flip, not more.
    assert!((a - b).abs() <= 0.002, "in-graph {a} against metadata {b}");
}

/// The shipped ResNet with its normalisation metadata removed, as a plain export gives it. A
/// lossy compile is refused before any work (exit 8, nothing written) with a message naming
/// the flags; stating the wrong normalisation (`--raw-pixels`) leaves the original near chance
/// and is refused the same way (`eval` measures it and warns); the right `--mean/--std`
/// compiles, and the output carries them, so `eval` needs no flags.
#[test]
fn a_model_without_normalisation_is_refused_until_it_is_stated() {
    if !have_fashion_mnist("a_model_without_normalisation_is_refused_until_it_is_stated") {
        return;
    }
    let mut model =
        relucompile::frontend::load_model(&root().join("models/resnet18w16.onnx")).unwrap();
    let meta =
        |key: &str| model.metadata_props.iter().find(|e| e.key == key).unwrap().value.clone();
    let (mean, std) = (meta("relucompile.mean"), meta("relucompile.std"));
    model.metadata_props.retain(|e| !e.key.starts_with("relucompile."));
    let dir = tempfile::tempdir().unwrap();
    let variant = dir.path().join("plain_export.onnx");
    relucompile::frontend::write_model_atomic(&variant, &model).unwrap();
    let out = dir.path().join("out.onnx");
    let compile = |extra: &[&str]| {
        let mut args = vec![path_str(&variant), "-o", path_str(&out), "--cull", "1"];
        args.extend_from_slice(&["--limit", "200", "--calibration-images", "128", "--no-progress"]);
        args.extend_from_slice(extra);
        relucompile(&args)
    };
    let started = std::time::Instant::now();
    let refused = compile(&["--max-drop", "1.5"]);
    let err = text(&refused.stderr);
    assert_eq!(refused.status.code(), Some(8), "{err}");
    for needed in ["plain_export.onnx", "--mean", "--std", "--raw-pixels", "Nothing was written"] {
        assert!(err.contains(needed), "{needed} not in: {err}");
    }
    assert!(started.elapsed().as_secs_f64() < 5.0, "refused after {:?}", started.elapsed());
    assert!(!out.exists());

    let wrong = compile(&["--raw-pixels"]);
    let err = text(&wrong.stderr);
    assert_eq!(wrong.status.code(), Some(8), "{err}");
    assert!(err.contains("near chance") && err.contains("--data"), "{err}");
    assert!(!out.exists());
    let measured = eval_json(&[path_str(&variant), "--raw-pixels", "--limit", "200"]);
    assert!(measured["warning"].as_str().unwrap().contains("near chance"), "{measured}");
    assert_eq!(measured["normalisation"]["source"], "raw-pixels", "{measured}");

    let stated = compile(&["--mean", &mean, "--std", &std, "--json"]);
    assert!(stated.status.success(), "{}", text(&stated.stderr));
    let report: serde_json::Value = serde_json::from_slice(&stated.stdout).unwrap();
    let accuracy = &report["accuracy"];
    assert_eq!(accuracy["normalisation"]["source"], "flags", "{accuracy}");
    assert!(accuracy["before"].as_f64().unwrap() > 0.9, "{accuracy}");
    let written = relucompile::frontend::load_model(&out).unwrap();
    let entry =
        |key: &str| written.metadata_props.iter().find(|e| e.key == key).map(|e| e.value.clone());
    assert_eq!(entry("relucompile.mean").as_deref(), Some(mean.as_str()));
    assert_eq!(entry("relucompile.std").as_deref(), Some(std.as_str()));
    assert_eq!(entry("relucompile.scale").map(|s| s.parse::<f32>().unwrap()), Some(1.0 / 255.0));
    let again = eval_json(&[path_str(&out), "--limit", "200"]);
    assert_eq!(again["normalisation"]["source"], "metadata", "{again}");
    assert_eq!(again["accuracy"], accuracy["after"], "{again}");
}

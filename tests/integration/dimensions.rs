//! DeepReDuce's dimension knobs and max-pool replacement on the shipped models: the ReLU and
//! MAC counts they claim, counted again from the written file.

use crate::common::*;

fn compile(model: &str, flags: &[&str]) -> (serde_json::Value, serde_json::Value) {
    let dir = tmpdir();
    let out = dir.path().join("o.onnx");
    let mut args = vec![model, "-o", out.to_str().unwrap(), "--limit", "200", "--json"];
    args.extend_from_slice(flags);
    let report = relucompile_json(&args);
    let census = relucompile_json(&["inspect", out.to_str().unwrap(), "--json"]);
    assert_eq!(census["total_relus"], report["after"]["total_relus"]);
    assert_eq!(census["total_macs"], report["after"]["total_macs"]);
    (report, census)
}

fn stages(v: &serde_json::Value) -> Vec<u64> {
    v.as_array().unwrap().iter().map(|s| s.as_u64().unwrap()).collect()
}

/// Half resolution: the ResNet runs on 14x14. Stem and stage 1 at 14x14 (16 channels: 3,136
/// per layer, 1 + 4 layers), stage 2 at 7x7 x 32 (1,568 x 4), stage 3 at 4x4 x 64 (1,024 x 4;
/// a stride-2 pad-1 conv maps 7 to 4), stage 4 at 2x2 x 128 (512 x 4).
#[test]
fn half_resolution_quarters_the_resnet_relus() {
    let (r, _) = compile("models/resnet18w16.onnx", &["--resolution", "0.5"]);
    assert_eq!(stages(&r["after"]["stages"]), vec![3_136, 12_544, 6_272, 4_096, 2_048]);
    assert_eq!(r["after"]["total_relus"], 28_096);
    let (before, after) =
        (r["before"]["total_macs"].as_f64().unwrap(), r["after"]["total_macs"].as_f64().unwrap());
    assert!(after < 0.28 * before, "MACs {before} -> {after}");
}

/// Half width: every channel group of the ResNet keeps 8, 16, 32 or 64 of its 16, 32, 64 or
/// 128 channels, so every ReLU layer halves; a conv with both sides halved has a quarter of its
/// MACs, the stem (one input channel) and the classifier (ten outputs) half.
#[test]
fn half_width_halves_the_resnet_relus_and_quarters_its_macs() {
    let (r, _) = compile("models/resnet18w16.onnx", &["--width", "0.5"]);
    assert_eq!(stages(&r["after"]["stages"]), vec![6_272, 25_088, 12_544, 6_272, 4_096]);
    assert_eq!(r["after"]["total_relus"], 108_544 / 2);
    let (before, after) =
        (r["before"]["total_macs"].as_f64().unwrap(), r["after"]["total_macs"].as_f64().unwrap());
    assert!(after > 0.25 * before && after < 0.26 * before, "MACs {before} -> {after}");
    // Still a classifier that beats chance before any fine-tuning.
    assert!(r["accuracy"]["after"].as_f64().unwrap() > 0.2);
}

/// The VGG without max-pools: no MaxPool left, every ReLU stays in front of its (now average)
/// pool (moving it behind is not lossless for an average), and the estimated bytes fall by more
/// than half (the pools' comparisons were 58% of them), to 45.7 MB of 108.2.
#[test]
fn avg_pool_removes_every_max_pool_of_the_vgg() {
    let (r, census) = compile("models/vgg.onnx", &["--avg-pool"]);
    assert_eq!(r["after"]["total_relus"], 81_792);
    let text = serde_json::to_string(&census).unwrap();
    assert!(!text.contains("MaxPool"), "{text}");
    let (before, after) =
        (r["cost_before"]["bytes"].as_f64().unwrap(), r["cost_after"]["bytes"].as_f64().unwrap());
    assert!(after < 0.5 * before, "bytes {before} -> {after}");
}

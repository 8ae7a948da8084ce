//! ReLU census: exact counts on reference architectures and goldens for the shipped models.

use crate::common::*;

fn stage_relus(v: &serde_json::Value) -> Vec<u64> {
    v["stages"].as_array().unwrap().iter().map(|s| s["relus"].as_u64().unwrap()).collect()
}

#[test]
fn cifar_resnet18_width64_has_557056_relus_in_stem_plus_four_stages() {
    let v =
        relucompile_json(&["inspect", "fixtures/models/census_resnet18_cifar64.onnx", "--json"]);
    assert_eq!(v["total_relus"], 557_056);
    assert_eq!(stage_relus(&v), vec![65_536, 262_144, 131_072, 65_536, 32_768]);
    assert_eq!(v["nodes"].as_array().unwrap().len(), 17);
}

#[test]
fn torchvision_resnet18_at_224_has_2308096_relus() {
    let v = relucompile_json(&[
        "inspect",
        "fixtures/models/census_resnet18_torchvision.onnx",
        "--json",
    ]);
    assert_eq!(v["total_relus"], 2_308_096);
    assert_eq!(stage_relus(&v), vec![802_816, 802_816, 401_408, 200_704, 100_352]);
    // 1.82 GMACs is torchvision's published figure for ResNet-18.
    let macs = v["total_macs"].as_u64().unwrap();
    assert!((1_810_000_000..1_830_000_000).contains(&macs), "{macs} MACs");
}

#[test]
fn input_shape_option_rescales_the_count() {
    // The same CIFAR network at 3x64x64 has four times the ReLUs of 3x32x32.
    let v = relucompile_json(&[
        "inspect",
        "fixtures/models/census_resnet18_cifar64.onnx",
        "--json",
        "--input-shape",
        "1x3x64x64",
    ]);
    assert_eq!(v["total_relus"], 4 * 557_056);
}

#[test]
fn shipped_resnet_census_matches_deepreduce_layout() {
    let v = relucompile_json(&["inspect", "models/resnet18w16.onnx", "--json"]);
    assert_eq!(v["total_relus"], 108_544);
    assert_eq!(stage_relus(&v), vec![12_544, 50_176, 25_088, 12_544, 8_192]);
    for node in v["nodes"].as_array().unwrap() {
        let shape: Vec<u64> =
            node["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap()).collect();
        assert_eq!(node["relus"].as_u64().unwrap(), shape.iter().product::<u64>());
    }
}

/// The full-width model (64 base channels, issue 27): four times the shipped ResNet's ReLUs in
/// every stage.
#[test]
fn full_width_resnet_census_is_four_times_the_shipped_one() {
    let v = relucompile_json(&["inspect", "models/resnet18w64.onnx", "--json"]);
    assert_eq!(v["total_relus"], 434_176);
    assert_eq!(stage_relus(&v), vec![50_176, 200_704, 100_352, 50_176, 32_768]);
    assert_eq!(v["nodes"].as_array().unwrap().len(), 17);
}

#[test]
fn census_goldens_of_shipped_models() {
    for model in ["models/resnet18w16.onnx", "models/vgg.onnx"] {
        let mut v = relucompile_json(&["inspect", model, "--json"]);
        // The cost estimate follows the calibrated coefficients; it is tested on its own.
        v.as_object_mut().unwrap().remove("cost");
        assert_golden(&format!("fixtures/golden/{}.census.json", stem(model)), &v);
    }
}

#[test]
fn census_table_names_every_stage() {
    let o = relucompile(&["inspect", "models/resnet18w16.onnx"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stdout.contains("0 (stem)"), "{}", o.stdout);
    assert!(o.stdout.contains("Total: 108,544 ReLUs"), "{}", o.stdout);
}

#[test]
fn cost_estimate_adds_up_its_layers_and_falls_with_relus() {
    let full = relucompile_json(&["inspect", "models/resnet18w16.onnx", "--json"]);
    let model: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(path("src/analysis/cost/crypten.json")).unwrap(),
    )
    .unwrap();
    let cost = &full["cost"];
    let layers: f64 =
        cost["layers"].as_array().unwrap().iter().map(|l| l["bytes"].as_f64().unwrap()).sum();
    let total = cost["bytes"].as_f64().unwrap();
    assert!((layers + model["bytes_fixed"].as_f64().unwrap() - total).abs() <= 1e-6 * total);
    // One ReLU layer's bytes are its elements times the per-ReLU cost.
    let relu = cost["layers"].as_array().unwrap().iter().find(|l| l["op"] == "Relu").unwrap();
    let expected = 12_544.0 * model["bytes_per_relu"].as_f64().unwrap();
    assert!((relu["bytes"].as_f64().unwrap() - expected).abs() <= 1e-6 * expected, "{relu}");
    // A reduced graph is estimated cheaper.
    let dir = tmpdir();
    let out = dir.path().join("o.onnx");
    relucompile_json(&[
        "models/resnet18w16.onnx",
        "-o",
        out.to_str().unwrap(),
        "--cull",
        "1,2",
        "--limit",
        "50",
        "--json",
        "--no-progress",
    ]);
    let reduced = relucompile_json(&["inspect", out.to_str().unwrap(), "--json"]);
    assert!(reduced["cost"]["bytes"].as_f64().unwrap() < total);
    assert!(reduced["cost"]["seconds"].as_f64().unwrap() < cost["seconds"].as_f64().unwrap());
    // Another engine's coefficients load from a file.
    let o = relucompile(&["inspect", "models/vgg.onnx", "--cost-model", "no/such.json"]);
    assert_eq!(o.code, 2, "{}", o.stderr);
}

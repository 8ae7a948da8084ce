//! ReLU census: exact counts on reference architectures and goldens for the shipped models.

mod common;
use common::*;

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

#[test]
fn census_goldens_of_shipped_models() {
    for model in ["models/resnet18w16.onnx", "models/vgg.onnx"] {
        let v = relucompile_json(&["inspect", model, "--json"]);
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

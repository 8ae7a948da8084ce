//! Differential tests: every lossless pass, alone and in the default pipeline, on every model,
//! run against the original on real images and random inputs.

use crate::common::*;
use relucompile::analysis::shapes::sample_shape;
use relucompile::data::random_inputs;
use relucompile::eval::compare::{compare_models, LOSSLESS_REL_TOLERANCE};
use relucompile::frontend::load_model;
use relucompile::passes::{
    run_pipeline, PassContext, Pipeline, VerifyOptions, DEFAULT_PIPELINE, REGISTRY,
};

fn check_pipeline(model_path: &str, pipeline: &str) -> usize {
    let original = load_model(&path(model_path)).unwrap();
    let sample = sample_shape(&original, None).unwrap();
    let mut model = original.clone();
    let pipeline = Pipeline::parse(pipeline).unwrap();
    let opts = VerifyOptions { structure: true, outputs: None };
    let ctx = PassContext::new(sample.clone());
    let records = run_pipeline(&mut model, &pipeline, &ctx, &opts).unwrap();
    let per: usize = sample.iter().product();
    let mut inputs = vec![random_inputs(8 * per, 7)];
    if sample == [1, 28, 28] {
        inputs.push(real_images());
    }
    for x in &inputs {
        let cmp = compare_models(&original, &model, &sample, x).unwrap();
        assert!(
            cmp.within(LOSSLESS_REL_TOLERANCE),
            "{pipeline} on {model_path}: outputs differ by {:.3e} (relative {:.3e})",
            cmp.max_abs_diff,
            cmp.rel_diff,
            pipeline = pipeline.text()
        );
        assert_eq!(cmp.argmax_agreement, 1.0);
    }
    records.iter().map(|r| r.rewrites).sum()
}

#[test]
fn every_lossless_pass_alone_keeps_outputs_on_every_model() {
    for model in MODELS {
        for pass in REGISTRY.iter().filter(|p| p.lossless) {
            check_pipeline(model, pass.name);
        }
    }
}

#[test]
fn default_pipeline_keeps_outputs_on_every_model() {
    for model in MODELS {
        check_pipeline(model, DEFAULT_PIPELINE);
    }
}

/// The full-width ResNet-18 (64 base channels, 11.2 M weights): the default pipeline's output
/// against the original on real and random images, and every ReLU kept.
#[test]
fn default_pipeline_keeps_outputs_on_the_full_width_resnet() {
    check_pipeline("models/resnet18w64.onnx", DEFAULT_PIPELINE);
    let dir = tmpdir();
    let out = dir.path().join("w64.onnx");
    let r = relucompile_json(&[
        "models/resnet18w64.onnx",
        "-o",
        out.to_str().unwrap(),
        "--json",
        "--no-progress",
    ]);
    assert_eq!(r["after"]["total_relus"], 434_176, "{r}");
    assert!(r["check_real"]["max_abs_diff"].as_f64().unwrap() <= 1e-3, "{r}");
}

#[test]
fn passes_have_work_on_the_graphs_made_for_them() {
    // Each of these graphs was built to contain what the pass removes.
    assert!(check_pipeline("fixtures/models/tiny_constant_nodes.onnx", "const-fold") > 0);
    assert!(check_pipeline("fixtures/models/tiny_constant_nodes.onnx", "identity-elim") > 0);
    assert!(check_pipeline("fixtures/models/tiny_ts_opset9.onnx", "fold-bn") > 0);
    assert!(check_pipeline("models/vgg.onnx", "relu-after-maxpool") > 0);
}

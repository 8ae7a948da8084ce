//! Valid graphs, mutated: the fuzzer's bytes pick edits (rewire an input, change an op type,
//! an attribute, a dimension, drop or duplicate a node) to a small real ResNet-style graph.
//! Whatever comes out, relucompile must reject it with an error or run the default lossless
//! pipeline on it without changing what it computes, and emit bytes that load again.
#![no_main]

use libfuzzer_sys::fuzz_target;
#[path = "shared.rs"]
mod shared;
use prost::Message;
use relucompile::analysis::shapes::sample_shape;
use relucompile::data::random_inputs;
use relucompile::eval::compare::{compare_models, LOSSLESS_REL_TOLERANCE};
use relucompile::frontend::{model_from_bytes, to_bytes};
use relucompile::passes::{run_pipeline, PassContext, Pipeline, VerifyOptions, DEFAULT_PIPELINE};
use shared::abort_on_our_panics;
use tract_onnx::pb;

const SEED: &[u8] = include_bytes!("../../fixtures/models/tiny_ts_opset9.onnx");
const OPS: &[&str] = &[
    "Relu",
    "Add",
    "Sum",
    "Mul",
    "Conv",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "Identity",
    "Clip",
    "BatchNormalization",
    "Flatten",
    "Gemm",
    "Dropout",
    "Concat",
    "Reshape",
    "Sigmoid",
];

fn mutate(model: &mut pb::ModelProto, data: &[u8]) {
    let Some(graph) = model.graph.as_mut() else { return };
    let mut names: Vec<String> = graph.input.iter().map(|i| i.name.clone()).collect();
    names.extend(graph.node.iter().flat_map(|n| n.output.clone()));
    names.extend(graph.initializer.iter().map(|t| t.name.clone()));
    for edit in data.chunks(4).take(8) {
        let [kind, a, b, c] = [
            edit[0],
            *edit.get(1).unwrap_or(&0),
            *edit.get(2).unwrap_or(&0),
            *edit.get(3).unwrap_or(&0),
        ];
        let nodes = graph.node.len();
        if nodes == 0 {
            return;
        }
        let n = a as usize % nodes;
        match kind % 7 {
            0 => {
                let node = &mut graph.node[n];
                if !node.input.is_empty() {
                    let slot = b as usize % node.input.len();
                    node.input[slot] = names[c as usize % names.len()].clone();
                }
            }
            1 => graph.node[n].op_type = OPS[b as usize % OPS.len()].to_string(),
            2 => {
                let node = &mut graph.node[n];
                if !node.attribute.is_empty() {
                    let k = b as usize % node.attribute.len();
                    let attr = &mut node.attribute[k];
                    attr.i = c as i64 - 8;
                    for v in attr.ints.iter_mut().take(1) {
                        *v = c as i64 % 5;
                    }
                }
            }
            3 => {
                let k = b as usize % graph.initializer.len().max(1);
                if let Some(t) = graph.initializer.get_mut(k) {
                    if let Some(d) = t.dims.first_mut() {
                        *d = c as i64 - 2;
                    }
                }
            }
            4 => {
                graph.node.remove(n);
            }
            5 => {
                let copy = graph.node[n].clone();
                graph.node.insert(b as usize % nodes, copy);
            }
            _ => {
                let input = graph.input.first_mut().and_then(|i| i.r#type.as_mut());
                if let Some(pb::type_proto::Value::TensorType(t)) =
                    input.and_then(|t| t.value.as_mut())
                {
                    if let Some(dim) = t.shape.as_mut().and_then(|s| s.dim.get_mut(b as usize % 4))
                    {
                        dim.value =
                            Some(pb::tensor_shape_proto::dimension::Value::DimValue(c as i64 % 40));
                    }
                }
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    abort_on_our_panics();
    let mut proto = pb::ModelProto::decode(SEED).expect("the seed graph decodes");
    mutate(&mut proto, data);
    // `RELUCOMPILE_FUZZ_DUMP=path cargo fuzz run pipeline artifact` writes the mutated graph,
    // which is how a crash becomes a regression test on an ONNX file.
    if let Ok(path) = std::env::var("RELUCOMPILE_FUZZ_DUMP") {
        std::fs::write(path, proto.encode_to_vec()).unwrap();
    }
    let Ok(original) = model_from_bytes(&proto.encode_to_vec(), None) else { return };
    let Ok(sample) = sample_shape(&original, None) else { return };
    if sample.iter().product::<usize>() > 1 << 14 {
        return;
    }
    let pipeline = Pipeline::parse(DEFAULT_PIPELINE).unwrap();
    let mut model = original.clone();
    let ctx = PassContext::new(sample.clone());
    let opts = VerifyOptions { structure: true, outputs: None };
    if run_pipeline(&mut model, &pipeline, &ctx, &opts).is_err() {
        return;
    }
    let inputs = random_inputs(2 * sample.iter().product::<usize>(), 3);
    // A graph tract cannot run is refused before any output would be written; one that runs
    // must compute the same after the lossless pipeline.
    if let Ok(cmp) = compare_models(&original, &model, &sample, &inputs) {
        if cmp.max_abs_output.is_finite() {
            assert!(
                cmp.within(LOSSLESS_REL_TOLERANCE),
                "lossless pipeline changed outputs: {cmp:?}"
            );
        }
    }
    let bytes = to_bytes(&model);
    model_from_bytes(&bytes, None).expect("emitted bytes load again");
});

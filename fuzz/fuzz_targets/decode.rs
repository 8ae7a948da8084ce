//! Arbitrary bytes as an ONNX file: decoding, IR building, the verifier, shape inference and
//! the census must return an error or a result, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
#[path = "shared.rs"]
mod shared;
use relucompile::analysis::{census::census, shapes::sample_shape};
use relucompile::frontend::model_from_bytes;
use relucompile::ir::verify;
use shared::abort_on_our_panics;

fuzz_target!(|data: &[u8]| {
    abort_on_our_panics();
    let Ok(model) = model_from_bytes(data, None) else { return };
    if verify(&model).is_err() {
        return;
    }
    if let Ok(sample) = sample_shape(&model, None) {
        // Keep each run small: a fuzzed shape can ask for gigabytes.
        if sample.iter().product::<usize>() <= 1 << 16 {
            let _ = census(&model, &sample);
        }
    }
});

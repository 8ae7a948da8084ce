//! Compile a model from Rust code with the library API ([`relucompile::driver`]).
//!
//! Loads `models/resnet18w16.onnx`, removes every ReLU of stages 1 and 2 and the ReLU after
//! each residual add of the stages kept (`cull 1,2` + `thin bottom`, DeepReDuce), recalibrates
//! the result on 512 training images, measures both graphs on the first 500 Fashion-MNIST test
//! images (so the run takes about a minute), prints the ReLU counts and accuracies before and
//! after, and writes the rewritten graph.
//!
//! ```sh
//! cargo run --release --example compile_model            # writes resnet18w16.cull12.onnx
//! cargo run --release --example compile_model -- out.onnx
//! ```
//!
//! It is the same compile as
//! `relucompile models/resnet18w16.onnx -o resnet18w16.cull12.onnx --cull 1,2 --thin bottom
//! --limit 500` (`tests/integration/library_api.rs` checks that both write the same bytes).

use relucompile::driver::compile::{compile, CompileOptions, ThinMode};
use relucompile::error::exit_code_of;
use std::path::PathBuf;

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            // The library's errors carry the command line's exit codes (7: accuracy gate).
            std::process::ExitCode::from(exit_code_of(&err) as u8)
        }
    }
}

fn run() -> anyhow::Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let output =
        std::env::args_os().nth(1).map_or_else(|| "resnet18w16.cull12.onnx".into(), PathBuf::from);

    // The options start from the command line's defaults (the lossless default pipeline, data
    // from Fashion-MNIST); set only what differs.
    let options = CompileOptions {
        cull: vec![1, 2],
        thin: Some(ThinMode::Bottom),
        limit: Some(500),
        ..CompileOptions::new(root.join("models/resnet18w16.onnx"), &output)
    };

    // Runs the pipeline, checks the result and measures its accuracy; writes nothing yet.
    let compiled = compile(&options)?;
    let report = &compiled.report;
    println!("pipeline: {}", report.pipeline);
    println!("ReLUs:    {} -> {}", report.before.total_relus, report.after.total_relus);
    if let Some(acc) = &report.accuracy {
        println!(
            "accuracy: {:.2}% -> {:.2}% on {} test images (the graphs agree on {:.2}%)",
            100.0 * acc.before,
            100.0 * acc.after,
            acc.images,
            100.0 * acc.agreement
        );
    }
    println!(
        "est. PI latency: {:.3} s -> {:.3} s",
        report.cost_before.seconds, report.cost_after.seconds
    );

    // Writes the model unless a check or the accuracy gate (`max_drop`) failed.
    compiled.write()?;
    println!("wrote {}", output.display());
    Ok(())
}

//! `relucompile run`: a graph's outputs for inputs from a .npy file, written as .npy, so that
//! other runtimes (onnxruntime in the cross-check harness) can be compared with tract or the
//! native engine.

use crate::analysis::shapes::sample_shape;
use crate::error::CompileError;
use crate::eval::backend::{Backend, EngineChoice, RunSpec};
use crate::frontend::load_model;
use anyhow::{Context, Result};
use npyz::WriterBuilder;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// The ONNX model to run
    pub model: PathBuf,
    /// Inputs as a float32 .npy array whose first axis is the batch
    #[arg(long)]
    pub input: PathBuf,
    /// Where to write the first output as a float32 .npy array
    #[arg(long)]
    pub output: PathBuf,
    /// Which engine runs the graph: tract (the independent runtime), the native engine, or
    /// the native engine when it takes the graph, else tract
    #[arg(long, value_enum, default_value_t = EngineChoice::Tract)]
    pub engine: EngineChoice,
    /// Print what was run as one JSON object (model, samples, shapes, engine, output file)
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &RunArgs) -> Result<()> {
    let model = load_model(&args.model)?;
    let file = std::fs::File::open(&args.input)
        .with_context(|| format!("cannot open --input {}", args.input.display()))?;
    let npy = npyz::NpyFile::new(std::io::BufReader::new(file)).map_err(|e| {
        CompileError::invalid_data(format!(
            "--input {} is not a .npy file: {e}",
            args.input.display()
        ))
    })?;
    let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    let data: Vec<f32> = npy.into_vec().map_err(|e| {
        CompileError::invalid_data(format!(
            "--input {} must hold float32: {e}",
            args.input.display()
        ))
    })?;
    let Some((&n, sample)) = shape.split_first() else {
        return Err(CompileError::invalid_data("--input is a scalar; it needs a batch axis").into());
    };
    let expected = sample.to_vec();
    let declared = sample_shape(&model, None).unwrap_or_else(|_| expected.clone());
    if declared != expected {
        return Err(CompileError::invalid_data(format!(
            "--input {} holds samples of shape {expected:?} but the model takes {declared:?}",
            args.input.display()
        ))
        .into());
    }
    let spec = RunSpec { batch: Some(n.clamp(1, 64)), engine: args.engine };
    let runner = Backend::new(&model, sample, spec)
        .with_context(|| format!("preparing {} to run", args.model.display()))?;
    let per: usize = sample.iter().product();
    let mut outputs = Vec::with_capacity(n * 10);
    let mut width = 0;
    for chunk in data.chunks(runner.batch() * per) {
        let (y, w) = runner.run(chunk)?;
        outputs.extend(y);
        width = w;
    }
    let file = std::fs::File::create(&args.output)
        .with_context(|| format!("cannot create {}", args.output.display()))?;
    let mut writer = npyz::WriteOptions::new()
        .default_dtype()
        .shape(&[n as u64, width as u64])
        .writer(std::io::BufWriter::new(file))
        .begin_nd()?;
    writer.extend(outputs.iter().copied())?;
    writer.finish()?;
    if args.json {
        let report = serde_json::json!({
            "model": args.model.display().to_string(),
            "input": args.input.display().to_string(),
            "output": args.output.display().to_string(),
            "samples": n,
            "sample_shape": sample,
            "output_shape": [n, width],
            "engine": runner.name(),
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}

//! `relucompile inspect`: the ReLU census.

use crate::analysis::{census::census, shapes::sample_shape};
use crate::frontend::load_model;
use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct InspectArgs {
    /// The ONNX model to inspect
    pub model: PathBuf,
    /// Input shape with batch, e.g. 1x3x32x32 (default: the model's declared shape)
    #[arg(long, value_parser = super::parse_shape)]
    pub input_shape: Option<::std::vec::Vec<usize>>,
    /// Print one JSON object instead of tables
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &InspectArgs) -> Result<()> {
    let model = load_model(&args.model)?;
    let sample = sample_shape(&model, args.input_shape.as_deref())?;
    let c = census(&model, &sample)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&c)?);
    } else {
        println!("{}", args.model.display());
        print!("{}", crate::report::census_text(&c));
    }
    Ok(())
}

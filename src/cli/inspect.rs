//! `relucompile inspect`: the ReLU census.

use crate::analysis::{census::census, shapes::sample_shape};
use crate::frontend::load_model;
use anyhow::{Context, Result};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct InspectArgs {
    /// The ONNX model to inspect
    pub model: PathBuf,
    /// Input shape: one sample as `inspect` prints it (3x32x32) or with the batch (1x3x32x32)
    /// [default: the model's declared shape]
    #[arg(long, value_parser = super::parse_shape)]
    pub input_shape: Option<::std::vec::Vec<usize>>,
    /// Print one JSON object instead of tables
    #[arg(long)]
    pub json: bool,
    /// Estimate private-inference cost with this model: `crypten` (built in, calibrated on
    /// CrypTen 0.4.1) or a JSON file of coefficients (see src/analysis/cost/crypten.json)
    #[arg(long, default_value = "crypten")]
    pub cost_model: String,
}

#[derive(serde::Serialize)]
struct Inspection<'a> {
    #[serde(flatten)]
    census: &'a crate::analysis::census::Census,
    cost: crate::analysis::cost::CostEstimate,
}

pub fn run(args: &InspectArgs) -> Result<()> {
    let model = load_model(&args.model)?;
    let sample = sample_shape(&model, args.input_shape.as_deref())?;
    let c =
        census(&model, &sample).with_context(|| format!("in model {}", args.model.display()))?;
    let cost = crate::analysis::cost::CostModel::load(&args.cost_model)?.estimate(&c);
    if let Some(w) = &cost.warning {
        eprintln!("warning: {w}");
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&Inspection { census: &c, cost })?);
    } else {
        println!("{}", args.model.display());
        print!("{}", crate::report::census_text(&c));
        print!("{}", crate::report::cost_text(&cost));
    }
    Ok(())
}

//! `relucompile criticality`: DeepReDuce's per-stage ReLU criticality on calibration data.

use crate::driver::criticality::CriticalityJob;
use crate::report::{table, thousands};
use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct CriticalityArgs {
    /// The ONNX model to analyse
    pub model: PathBuf,
    /// Data set (`fashion-mnist`, an IDX, CIFAR or image-folder directory, or a .npy file); its
    /// training split is used
    #[arg(long, default_value = "fashion-mnist")]
    pub data: String,
    /// Calibration images taken from the training split
    #[arg(long = "calibration-images", value_name = "N", alias = "images", default_value_t = 2000)]
    pub images: usize,
    /// Input shape: one sample as `inspect` prints it (3x32x32) or with the batch (1x3x32x32)
    /// [default: the model's declared shape]
    #[arg(long, value_parser = super::parse_shape)]
    pub input_shape: Option<::std::vec::Vec<usize>>,
    /// Score every variant after a one-epoch distillation on N training images after the
    /// calibration images (at a quarter of the fine-tuning recipe's learning rate), not
    /// straight after the refit (0)
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub probe_images: usize,
    #[command(flatten)]
    pub reporting: super::output_flags::OutputFlags,
    #[command(flatten)]
    pub data_flags: super::data_flags::DataFlags,
}

pub fn run(args: &CriticalityArgs) -> Result<()> {
    let job = CriticalityJob {
        model: args.model.clone(),
        data: args.data.clone(),
        data_options: crate::driver::DataOptions::from(&args.data_flags),
        images: args.images,
        input_shape: args.input_shape.clone(),
        probe_images: args.probe_images,
        progress: args.reporting.progress(),
    };
    let c = crate::driver::criticality::run(&job)?;
    if args.reporting.json {
        println!("{}", serde_json::to_string_pretty(&c)?);
        return Ok(());
    }
    println!(
        "{}: criticality on {} training images (original {:.2}%, all stages linear {:.2}%)",
        args.model.display(),
        c.images,
        100.0 * c.accuracy_original,
        100.0 * c.accuracy_all_linear
    );
    if let Some(n) = &c.normalisation {
        println!("inputs {n}  ({})", n.source.describe());
    }
    let rows: Vec<Vec<String>> = c
        .stages
        .iter()
        .map(|s| {
            vec![
                s.stage.to_string(),
                thousands(s.relus),
                format!("{:.2}%", 100.0 * s.accuracy_only_this),
                format!("{:.2}%", 100.0 * s.accuracy_without_this),
                format!("{:.3}", s.score),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &["stage", "relus", "only this stage", "without this stage", "score (pts/1k ReLUs)"],
            &rows
        )
    );
    let order: Vec<String> = c.cull_order.iter().map(|s| s.to_string()).collect();
    println!("cull order (least critical first): {}", order.join(", "));
    Ok(())
}

//! `relucompile pareto`: flags into [`ParetoOptions`], the frontier search
//! ([`crate::driver::pareto`]), then the frontier printed.

use crate::driver::pareto::{pareto, Frontier, ParetoOptions};
use crate::report::{table, thousands};
use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct ParetoArgs {
    /// The ONNX model to reduce
    pub model: PathBuf,
    /// Output directory: one ONNX file per frontier point, frontier.json/.csv/.md/.svg/.png
    #[arg(short, long)]
    pub output: PathBuf,
    /// Data set (`fashion-mnist`, an IDX, CIFAR or image-folder directory, or a .npy file)
    #[arg(long, default_value = "fashion-mnist")]
    pub data: String,
    /// Calibration images drawn (by --seed) from the training split to choose candidates
    #[arg(long, default_value_t = 2000)]
    pub calibration_images: usize,
    /// Seed of the calibration draw; the same seed gives the same frontier
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Measure the frontier on the first N test images only (default: the whole test split)
    #[arg(long)]
    pub test_limit: Option<usize>,
    /// Input shape with batch, e.g. 1x3x32x32 (default: the model's declared shape)
    #[arg(long, value_parser = super::parse_shape)]
    pub input_shape: Option<::std::vec::Vec<usize>>,
    /// Score candidates without recalibrating them to the original's channel statistics
    #[arg(long)]
    pub no_recalibrate: bool,
    /// Which stage sets are culled: every subset (small networks) or only prefixes of the
    /// criticality order (least critical first; much faster)
    #[arg(long, value_enum, default_value_t = CullSearch::Subsets)]
    pub cull_search: CullSearch,
    /// Leave the half-resolution and half-width candidates (`resolution(0.5)`, `width(0.5)`)
    /// out of the search
    #[arg(long)]
    pub no_dimensions: bool,
    /// No progress bars
    #[arg(long)]
    pub no_progress: bool,
    #[command(flatten)]
    pub data_flags: super::data_flags::DataFlags,
    #[command(flatten)]
    pub finetune: super::finetune::FinetuneFlags,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CullSearch {
    Subsets,
    Prefixes,
}

impl From<&ParetoArgs> for ParetoOptions {
    fn from(a: &ParetoArgs) -> Self {
        ParetoOptions {
            model: a.model.clone(),
            output: a.output.clone(),
            data: a.data.clone(),
            calibration_images: a.calibration_images,
            seed: a.seed,
            test_limit: a.test_limit,
            input_shape: a.input_shape.clone(),
            recalibrate: !a.no_recalibrate,
            dimensions: !a.no_dimensions,
            exhaustive_culls: a.cull_search == CullSearch::Subsets,
            progress: !a.no_progress,
            data_options: (&a.data_flags).into(),
            finetune: a.finetune.training(),
        }
    }
}

pub fn run(args: &ParetoArgs) -> Result<()> {
    let started = std::time::Instant::now();
    let frontier = pareto(&args.into())?;
    print_frontier(&frontier);
    println!(
        "search took {:.1}s; wrote {}",
        started.elapsed().as_secs_f64(),
        args.output.display()
    );
    Ok(())
}

fn print_frontier(f: &Frontier) {
    println!(
        "{}: {} candidates scored on {} calibration images; cull order {:?}",
        f.model, f.candidates, f.calibration_images, f.cull_order
    );
    let mut rows = vec![vec![
        "original".to_string(),
        thousands(f.original.relus),
        format!("{:.2}%", 100.0 * f.original.accuracy),
        String::new(),
    ]];
    rows.extend(f.points.iter().map(|p| {
        vec![
            p.config.clone(),
            thousands(p.relus),
            format!("{:.2}%", 100.0 * p.accuracy),
            p.file.clone(),
        ]
    }));
    print!("{}", table(&["configuration", "relus", "test accuracy", "file"], &rows));
}

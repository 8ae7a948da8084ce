//! `relucompile linearize in.onnx -o out.onnx --relu-budget 10%`: per-channel (or per-pixel)
//! ReLU masks learned jointly with the weights under distillation, made binary within the
//! budget, then distilled again (see `crate::train::masks`).

use super::finetune::TrainFlags;
use crate::data;
use crate::driver::linearize::{linearize, LinearizeJob, LinearizeReport};
use crate::report::{table, thousands};
use crate::train::masks::{Granularity, MaskMethod, DEFAULT_MASK_LR};

/// `--granularity`'s words; `pareto --learned-granularity` takes all but `auto`
/// ([`GRANULARITIES`]).
const GRANULARITY_CHOICES: &[(&str, &str)] = &[
    (
        "auto",
        "Pixel masks at budgets over 3.5% and up to 7.5% of the model's ReLUs, channel masks \
         elsewhere (the better of the two measured at 2%, 5% and 10%); pixel with \
         --mask-method prune, channel with penalty",
    ),
    (
        "channel",
        "One mask per channel: the kept channels' ReLUs run on a dense `[N, K, H, W]` slice",
    ),
    (
        "pixel",
        "One mask per element of an image's activation (SNL's pixel masks): the kept positions \
         run as one dense `[N, K]` ReLU",
    ),
];
pub(crate) const GRANULARITIES: &[(&str, &str)] = GRANULARITY_CHOICES.split_at(1).1;
/// `--mask-method`'s words.
const MASK_METHODS: &[(&str, &str)] = &[
    ("auto", "prune for pixel masks, penalty for channel masks (the better measured of each)"),
    (
        "penalty",
        "SNL's soft masks under a ReLU penalty whose weight a controller walks to the budget; \
         binarised by mask value at the end",
    ),
    (
        "prune",
        "Hard masks pruned on a schedule from the full count to the budget, the units whose \
         removal costs least per ReLU (Taylor estimate from the mask gradients) first",
    ),
];
use anyhow::Result;
use std::path::PathBuf;

/// A flag's value or `auto` (`None`: the library chooses).
#[derive(Debug, Clone, Copy)]
pub struct Auto<T>(pub Option<T>);

impl<T: std::str::FromStr<Err = String>> std::str::FromStr for Auto<T> {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Auto(None)),
            _ => s.parse().map(|t| Auto(Some(t))),
        }
    }
}

/// Epochs of distillation after the mask epochs when `--epochs` is not given: on the shipped
/// ResNet 4 gained 1.03 points over 2 at 2% of the ReLUs and 0.34 at 5%, for 3.6 and 10.9 more
/// minutes on 2 cores (docs/learned-masks.md#longer-distillation).
const LINEARIZE_EPOCHS: usize = 4;

#[derive(clap::Args, Debug)]
#[command(after_help = super::EXIT_CODES_HELP)]
pub struct LinearizeArgs {
    /// The trained ONNX model
    pub model: PathBuf,
    /// Where to write the graph with ReLUs only on the kept channels (or positions)
    #[arg(short, long)]
    pub output: PathBuf,
    /// ReLUs to keep: a count (20000) or a share of the model's (10%)
    #[arg(long, value_name = "N|P%")]
    pub relu_budget: String,
    /// Epochs that learn the masks together with the weights, before they are made binary;
    /// --epochs then distils the binarised graph
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub mask_epochs: usize,
    /// At most K layers keep ReLUs, those whose masks hold the most ReLUs: a PI engine pays
    /// about the same rounds for every ReLU layer whatever its size (CrypTen: ~9)
    #[arg(long, value_name = "K", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_relu_layers: Option<u64>,
    /// A mask per channel (its ReLUs kept or dropped together) or per pixel (any element of an
    /// activation; the kept ones are gathered into one dense ReLU per layer)
    #[arg(long, default_value = "auto", value_parser = super::words::<Auto<Granularity>>(GRANULARITY_CHOICES))]
    pub granularity: Auto<Granularity>,
    /// How the mask epochs choose the units that keep their ReLU
    #[arg(long, default_value = "auto", value_parser = super::words::<Auto<MaskMethod>>(MASK_METHODS))]
    pub mask_method: Auto<MaskMethod>,
    /// Adam's learning rate for the masks (the penalty method)
    #[arg(long, default_value_t = DEFAULT_MASK_LR)]
    pub mask_lr: f64,
    /// Training data (its train split) and test data for the accuracies
    #[arg(long, default_value = data::FASHION_MNIST_SPEC)]
    pub data: String,
    #[command(flatten)]
    pub train: TrainFlags,
    /// Evaluate on the first N test images [default: all]
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Allow the output to overwrite the input model
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub reporting: super::output_flags::OutputFlags,
    #[command(flatten)]
    pub data_flags: super::data_flags::DataFlags,
}

impl From<&LinearizeArgs> for LinearizeJob {
    fn from(a: &LinearizeArgs) -> Self {
        LinearizeJob {
            mask_epochs: a.mask_epochs,
            max_relu_layers: a.max_relu_layers.map(|k| k as usize),
            granularity: a.granularity.0,
            mask_method: a.mask_method.0,
            mask_lr: a.mask_lr,
            data: a.data.clone(),
            data_options: (&a.data_flags).into(),
            training: a.train.options(LINEARIZE_EPOCHS),
            limit: a.limit,
            progress: a.reporting.progress(),
            force: a.force,
            ..LinearizeJob::new(&a.model, &a.output, &a.relu_budget)
        }
    }
}

pub fn run(args: &LinearizeArgs) -> Result<()> {
    let report = linearize(&args.into())?;
    if let Some(w) = &report.finetune.warning {
        eprintln!("warning: {w}");
    }
    if args.reporting.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
        println!("wrote {}", args.output.display());
    }
    Ok(())
}

fn print_report(r: &LinearizeReport) {
    let rows: Vec<Vec<String>> = r
        .layers
        .iter()
        .map(|l| {
            vec![
                l.relu.clone(),
                format!("{}/{}", l.kept.len(), l.units),
                format!("{:.3}", l.mean_mask),
                thousands(l.relus() as u64),
            ]
        })
        .collect();
    let kept = match r.granularity {
        Granularity::Channel => "channels kept",
        Granularity::Pixel => "positions kept",
    };
    print!("{}", table(&["relu", kept, "mean mask", "ReLUs"], &rows));
    println!(
        "ReLUs {} -> {} (budget {}; soft count {:.0} after the mask epochs)",
        thousands(r.relus_before),
        thousands(r.relus_after),
        thousands(r.relu_budget),
        r.soft_relus
    );
    println!("mask epochs:");
    for e in &r.mask_epochs {
        println!(
            "  {}: loss {:.4}, train acc {:.2}%, {:.0} img/s, {:.1} s",
            e.epoch,
            e.loss,
            100.0 * e.train_accuracy,
            e.images_per_second,
            e.seconds
        );
    }
    println!("distillation after binarisation:");
    super::finetune::print_report(&r.finetune);
    println!("{:.1} s in all", r.seconds);
}

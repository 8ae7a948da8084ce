//! `relucompile finetune reduced.onnx --teacher original.onnx -o tuned.onnx --epochs N`:
//! knowledge-distillation fine-tuning of a reduced graph (see `crate::train`).

use crate::data;
use crate::driver::finetune::{finetune, FinetuneJob, FinetuneReport};
use crate::driver::TrainOptions;
use crate::train::optim::{default_lr, OptimizerKind, ScheduleKind};
use crate::train::FinetuneOptions;
use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
#[command(after_help = super::EXIT_CODES_HELP)]
pub struct FinetuneArgs {
    /// The reduced ONNX graph to train (the student)
    pub model: PathBuf,
    /// The original graph, whose outputs the student learns from
    #[arg(long)]
    pub teacher: PathBuf,
    /// Where to write the tuned graph
    #[arg(short, long)]
    pub output: PathBuf,
    /// Training data (its train split) and test data for the before/after accuracy
    #[arg(long, default_value = data::FASHION_MNIST_SPEC)]
    pub data: String,
    #[command(flatten)]
    pub train: TrainFlags,
    /// Evaluate accuracy before and after on the first N test images [default: all]
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

/// The training flags, shared by `finetune`, `compile --finetune-epochs` and `pareto`.
#[derive(clap::Args, Debug, Clone)]
pub struct TrainFlags {
    /// Epochs over the training images [default: 1 for finetune; 4 for linearize, whose
    /// binarised networks keep gaining: at 2% of the shipped ResNet's ReLUs 89.41% after 2 and
    /// 90.44% after 4, at 5% 91.67% and 92.01% (docs/learned-masks.md)]
    #[arg(long, value_name = "N")]
    pub epochs: Option<usize>,
    /// Images per step
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Optimiser: SGD with Nesterov momentum 0.9, or AdamW
    #[arg(long, value_enum, default_value_t = OptimizerKind::Sgd)]
    pub optimizer: OptimizerKind,
    /// Learning-rate schedule over the whole run
    #[arg(long, value_enum, default_value_t = ScheduleKind::OneCycle)]
    pub schedule: ScheduleKind,
    /// Peak learning rate [default: 0.02 for sgd, 0.001 for adamw, scaled by steps / 938 for
    /// runs shorter than 938 steps, so that a short run does not wreck a refitted network; a
    /// rate given here is used as it is]
    #[arg(long)]
    pub lr: Option<f64>,
    /// Weight decay (L2 for SGD, decoupled for AdamW)
    #[arg(long, default_value_t = 5e-4)]
    pub weight_decay: f64,
    /// Train the graph as it is, without a BatchNorm re-inserted after every Conv
    #[arg(long)]
    pub no_batchnorm: bool,
    /// Do not recalibrate the student to the teacher's outputs before training
    #[arg(long)]
    pub no_recalibrate: bool,
    /// Distillation temperature
    #[arg(long, default_value_t = 4.0)]
    pub temperature: f64,
    /// Weight of the distillation loss; 1 - alpha weighs cross-entropy on the labels
    #[arg(long, default_value_t = 0.9)]
    pub alpha: f64,
    /// Seed of the shuffling and the augmentation
    #[arg(long = "train-seed", default_value_t = 0)]
    pub seed: u64,
    /// Train on the first N training images only [default: all]
    #[arg(long, value_name = "N")]
    pub train_limit: Option<usize>,
    /// Random crops after padding this many pixels (0: none, the default: distilling for an
    /// epoch or two on the images the teacher was trained on measures better, 92.47% against
    /// 91.59% with crops of 2 and flips on the README's main network)
    #[arg(long, default_value_t = 0)]
    pub crop_padding: usize,
    /// Random horizontal flips (off by default, as the crops)
    #[arg(long)]
    pub flip: bool,
    /// Write a checkpoint here after every epoch: the training state (weights, BatchNorms,
    /// optimiser), student.onnx and state.json
    #[arg(long, value_name = "DIR")]
    pub checkpoint_dir: Option<PathBuf>,
    /// Continue from the checkpoint in --checkpoint-dir, to the same bytes as a run never
    /// stopped (start afresh when there is none yet, so a retry reruns the same command)
    #[arg(long, requires = "checkpoint_dir")]
    pub resume: bool,
    /// Write the trained network even when it ends below the refitted one it started from
    /// (by default the better of the two is written, with a warning)
    #[arg(long)]
    pub keep_trained: bool,
}

/// `--finetune-epochs` and `--finetune-train-limit`, for `compile` and `pareto`; the rest of
/// the recipe is `finetune`'s defaults.
#[derive(clap::Args, Debug, Clone, Default)]
#[command(next_help_heading = "Fine-tuning (knowledge distillation from the input model)")]
pub struct FinetuneFlags {
    /// Fine-tune the reduced graph for N epochs with the original as teacher (0: none)
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub finetune_epochs: usize,
    /// Fine-tune on the first N training images only [default: all]
    #[arg(long = "train-limit", value_name = "N", alias = "finetune-train-limit")]
    pub finetune_train_limit: Option<usize>,
    /// Write the trained network even when it ends below the refitted one it started from
    /// (by default the better of the two is written, with a warning)
    #[arg(long, requires = "finetune_epochs")]
    pub keep_trained: bool,
}

impl FinetuneFlags {
    /// The fine-tuning `compile` and `pareto` run: none without `--finetune-epochs`.
    pub fn training(&self) -> Option<TrainOptions> {
        (self.finetune_epochs > 0).then(|| TrainOptions {
            train_limit: self.finetune_train_limit,
            keep_trained: self.keep_trained,
            ..TrainOptions::epochs(self.finetune_epochs)
        })
    }
}

/// `finetune`'s epochs when `--epochs` is not given.
pub const FINETUNE_EPOCHS: usize = 1;

impl TrainFlags {
    /// The options these flags give, with `default_epochs` where `--epochs` is not given.
    pub fn options(&self, default_epochs: usize) -> TrainOptions {
        TrainOptions {
            recipe: FinetuneOptions {
                epochs: self.epochs.unwrap_or(default_epochs),
                batch: self.batch,
                lr: self.lr.unwrap_or(default_lr(self.optimizer)),
                scale_lr_to_run: self.lr.is_none(),
                weight_decay: self.weight_decay,
                optimizer: self.optimizer,
                schedule: self.schedule,
                batchnorm: !self.no_batchnorm,
                recalibrate: !self.no_recalibrate,
                temperature: self.temperature,
                alpha: self.alpha,
                seed: self.seed,
                crop_padding: self.crop_padding,
                hflip: self.flip,
            },
            train_limit: self.train_limit,
            checkpoint_dir: self.checkpoint_dir.clone(),
            resume: self.resume,
            keep_trained: self.keep_trained,
        }
    }
}

impl From<&FinetuneArgs> for FinetuneJob {
    fn from(a: &FinetuneArgs) -> Self {
        FinetuneJob {
            model: a.model.clone(),
            teacher: a.teacher.clone(),
            output: a.output.clone(),
            data: a.data.clone(),
            data_options: (&a.data_flags).into(),
            training: a.train.options(FINETUNE_EPOCHS),
            limit: a.limit,
            progress: a.reporting.progress(),
            force: a.force,
        }
    }
}

pub fn run(args: &FinetuneArgs) -> Result<()> {
    let report = finetune(&args.into())?;
    if let Some(w) = &report.warning {
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

pub fn print_report(r: &FinetuneReport) {
    println!("epoch  loss    kd loss  train acc  img/s   seconds");
    for e in &r.epochs {
        println!(
            "{:>5}  {:.4}  {:.4}   {:>7.2}%  {:>6.0}  {:>7.1}",
            e.epoch,
            e.loss,
            e.kd_loss,
            100.0 * e.train_accuracy,
            e.images_per_second,
            e.seconds
        );
    }
    let input = match r.accuracy_input {
        Some(a) => format!("input {:.2}%, ", 100.0 * a),
        None => String::new(),
    };
    println!(
        "test accuracy on {} images: teacher {:.2}%, {input}start (after the refit) {:.2}%, \
         after {:.2}% ({:+.2} points); {} ReLUs",
        r.test_images,
        100.0 * r.teacher_accuracy,
        100.0 * r.accuracy_before,
        100.0 * r.accuracy_after,
        100.0 * (r.accuracy_after - r.accuracy_before),
        r.relus
    );
    let g = &r.guard;
    println!(
        "check on {} {}training images: start {:.2}%, trained {:.2}%; wrote the {} network",
        g.images,
        if g.held_out { "held-out " } else { "" },
        100.0 * g.accuracy_start,
        100.0 * g.accuracy_trained,
        g.kept
    );
    println!("inputs {}  ({})", r.normalisation, r.normalisation.source.describe());
}

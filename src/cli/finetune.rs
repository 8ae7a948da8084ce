//! `relucompile finetune reduced.onnx --teacher original.onnx -o tuned.onnx --epochs N`:
//! knowledge-distillation fine-tuning of a reduced graph (see `crate::train`).

use crate::analysis::{census::census, shapes::sample_shape};
use crate::eval::data::{self, Split};
use crate::eval::evaluator::{evaluate, DEFAULT_BATCH};
use crate::frontend::{load_model, write_model_atomic};
use crate::ir::Model;
use crate::train::optim::{default_lr, OptimizerKind, ScheduleKind};
use crate::train::{candle_logits, EpochRecord, FinetuneOptions, Finetuner};
use anyhow::{Context, Result};
use serde::Serialize;
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
    /// Print the report as JSON
    #[arg(long)]
    pub json: bool,
    /// No progress bars
    #[arg(long)]
    pub no_progress: bool,
    #[command(flatten)]
    pub data_flags: super::data_flags::DataFlags,
}

/// The training flags, shared by `finetune`, `compile --finetune-epochs` and `pareto`.
#[derive(clap::Args, Debug, Clone)]
pub struct TrainFlags {
    /// Epochs over the training images
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    /// Images per step
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Optimiser: SGD with Nesterov momentum 0.9, or AdamW
    #[arg(long, value_enum, default_value_t = OptimizerKind::Sgd)]
    pub optimizer: OptimizerKind,
    /// Learning-rate schedule over the whole run
    #[arg(long, value_enum, default_value_t = ScheduleKind::OneCycle)]
    pub schedule: ScheduleKind,
    /// Peak learning rate [default: 0.02 for sgd, 0.001 for adamw]
    #[arg(long)]
    pub lr: Option<f64>,
    /// Weight decay (L2 for SGD, decoupled for AdamW)
    #[arg(long, default_value_t = 5e-4)]
    pub weight_decay: f64,
    /// Train the graph as it is, without a BatchNorm re-inserted after every Conv
    #[arg(long)]
    pub no_batchnorm: bool,
    /// Do not recalibrate the student to the teacher's channel statistics before training
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
    /// Random-crop padding in pixels (0 turns cropping off)
    #[arg(long, default_value_t = 2)]
    pub crop_padding: usize,
    /// No horizontal flips
    #[arg(long)]
    pub no_flip: bool,
    /// Write a checkpoint (student.onnx, state.json) here after every epoch
    #[arg(long, value_name = "DIR")]
    pub checkpoint_dir: Option<PathBuf>,
    /// Continue from the checkpoint in --checkpoint-dir
    #[arg(long, requires = "checkpoint_dir")]
    pub resume: bool,
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
    #[arg(long, value_name = "N")]
    pub finetune_train_limit: Option<usize>,
}

impl FinetuneFlags {
    pub fn train_flags(&self) -> TrainFlags {
        let d = FinetuneOptions::default();
        TrainFlags {
            epochs: self.finetune_epochs,
            batch: d.batch,
            optimizer: d.optimizer,
            schedule: d.schedule,
            lr: None,
            weight_decay: d.weight_decay,
            no_batchnorm: !d.batchnorm,
            no_recalibrate: !d.recalibrate,
            temperature: d.temperature,
            alpha: d.alpha,
            seed: d.seed,
            train_limit: self.finetune_train_limit,
            crop_padding: d.crop_padding,
            no_flip: !d.hflip,
            checkpoint_dir: None,
            resume: false,
        }
    }
}

impl TrainFlags {
    pub fn options(&self, epochs: usize) -> FinetuneOptions {
        FinetuneOptions {
            epochs,
            batch: self.batch,
            lr: self.lr.unwrap_or(default_lr(self.optimizer)),
            weight_decay: self.weight_decay,
            optimizer: self.optimizer,
            schedule: self.schedule,
            batchnorm: !self.no_batchnorm,
            recalibrate: !self.no_recalibrate,
            temperature: self.temperature,
            alpha: self.alpha,
            seed: self.seed,
            crop_padding: self.crop_padding,
            hflip: !self.no_flip,
        }
    }
}

#[derive(Serialize)]
pub struct FinetuneReport {
    pub options: FinetuneOptions,
    pub train_images: usize,
    pub epochs: Vec<EpochRecord>,
    pub test_images: usize,
    pub teacher_accuracy: f64,
    pub accuracy_before: f64,
    pub accuracy_after: f64,
    /// Largest relative difference between the fine-tuner's forward pass and tract's run of
    /// the written graph: the weights were written back faithfully.
    pub written_graph_rel_diff: f64,
    pub relus: u64,
}

/// Fine-tune `student` against `teacher` and measure it; shared with compile and pareto.
pub fn finetune_model(
    student: &Model,
    teacher: &Model,
    (data_spec, data_flags): (&str, &super::data_flags::DataFlags),
    flags: &TrainFlags,
    epochs: usize,
    limit: Option<usize>,
    progress: bool,
) -> Result<(Model, FinetuneReport)> {
    let sample = sample_shape(student, None)?;
    let name = "the teacher";
    let train =
        data_flags.load(data_spec, Split::Train, flags.train_limit, teacher, &sample, name)?;
    let test = data_flags.load(data_spec, Split::Test, limit, teacher, &sample, name)?;
    let result = Finetuner {
        student,
        teacher,
        train: &train,
        options: flags.options(epochs),
        checkpoint_dir: flags.checkpoint_dir.clone(),
        resume: flags.resume,
        progress,
    }
    .run()?;
    let tuned = result.model;
    crate::ir::verify(&tuned).map_err(|e| anyhow::anyhow!("the tuned graph is invalid: {e}"))?;
    // The written weights must give under tract what the fine-tuner computed.
    let probe = &test.images[..test.sample_len() * test.len().min(16)];
    let ours = candle_logits(&tuned, probe, &sample)?;
    let runner = crate::eval::Runner::new(&tuned, &sample, 1)?;
    let mut theirs = vec![];
    for img in probe.chunks(test.sample_len()) {
        theirs.extend(runner.run(img)?.0);
    }
    let scale = theirs.iter().fold(1f32, |m, v| m.max(v.abs()));
    let rel = ours.iter().zip(&theirs).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max) / scale;
    anyhow::ensure!(
        rel <= 1e-3,
        "the tuned graph's outputs under tract differ from the fine-tuner's by {rel:.2e}"
    );
    let after =
        evaluate(&tuned, "tuned", Some((student, "before")), &test, DEFAULT_BATCH, progress)?;
    let teacher_eval = evaluate(teacher, "teacher", None, &test, DEFAULT_BATCH, progress)?;
    let before = after.reference.as_ref().context("no reference evaluation")?.accuracy;
    let relus = census(&tuned, &sample)?.total_relus;
    let report = FinetuneReport {
        options: flags.options(epochs),
        train_images: train.len(),
        epochs: result.history,
        test_images: test.len(),
        teacher_accuracy: teacher_eval.accuracy,
        accuracy_before: before,
        accuracy_after: after.accuracy,
        written_graph_rel_diff: rel as f64,
        relus,
    };
    Ok((tuned, report))
}

pub fn run(args: &FinetuneArgs) -> Result<()> {
    super::compile::check_output_path(&args.model, &args.output, false)?;
    let student = load_model(&args.model)?;
    let teacher = load_model(&args.teacher)?;
    let progress = !args.json && !args.no_progress;
    let (tuned, report) = finetune_model(
        &student,
        &teacher,
        (&args.data, &args.data_flags),
        &args.train,
        args.train.epochs,
        args.limit,
        progress,
    )
    .with_context(|| format!("fine-tuning {}", args.model.display()))?;
    write_model_atomic(&args.output, &tuned)?;
    if args.json {
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
    println!(
        "test accuracy on {} images: teacher {:.2}%, before {:.2}%, after {:.2}% ({:+.2} points); {} ReLUs",
        r.test_images,
        100.0 * r.teacher_accuracy,
        100.0 * r.accuracy_before,
        100.0 * r.accuracy_after,
        100.0 * (r.accuracy_after - r.accuracy_before),
        r.relus
    );
}

//! Knowledge-distillation fine-tuning of a reduced graph against the original (see
//! `crate::train`): [`finetune`] reads and writes files, [`finetune_model`] works on graphs in
//! memory (compile and pareto call it for `--finetune-epochs`).

use super::context::RunData;
use super::{check_output_path, DataOptions, TrainOptions, DEFAULT_DATA};
use crate::analysis::{census::census, shapes::sample_shape};
use crate::eval::evaluator::accuracy_of;
use crate::eval::evaluator::evaluate;
use crate::eval::RunSpec;
use crate::frontend::{load_model, write_model_atomic};
use crate::ir::Model;
use crate::train::{candle_logits, EpochRecord, FinetuneOptions, Finetuner};
use anyhow::{Context, Result};
use serde::Serialize;
use std::path::PathBuf;

/// A fine-tuning job on files: `relucompile finetune`.
#[derive(Debug, Clone)]
pub struct FinetuneJob {
    /// The reduced ONNX graph to train (the student).
    pub model: PathBuf,
    /// The original graph, whose outputs the student learns from.
    pub teacher: PathBuf,
    /// Where to write the tuned graph.
    pub output: PathBuf,
    /// Training data (its train split) and test data for the before/after accuracy.
    pub data: String,
    pub data_options: DataOptions,
    pub training: TrainOptions,
    /// Evaluate accuracy before and after on the first N test images (`None`: all).
    pub limit: Option<usize>,
    /// Show progress bars on stderr.
    pub progress: bool,
    /// Allow the output to overwrite the input.
    pub force: bool,
}

impl FinetuneJob {
    /// Train `model` against `teacher` with the default recipe (one epoch) on Fashion-MNIST.
    pub fn new(
        model: impl Into<PathBuf>,
        teacher: impl Into<PathBuf>,
        output: impl Into<PathBuf>,
    ) -> Self {
        FinetuneJob {
            model: model.into(),
            teacher: teacher.into(),
            output: output.into(),
            data: DEFAULT_DATA.into(),
            data_options: DataOptions::default(),
            training: TrainOptions::default(),
            limit: None,
            progress: false,
            force: false,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
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

/// Fine-tune `student` against the run's original on its training split (the first
/// `training.train_limit` images) and measure it on the run's test images; shared with
/// compile, pareto and linearize, whose runs read each split and evaluate the original once.
pub fn finetune_model(
    student: &Model,
    run: &RunData,
    training: &TrainOptions,
    progress: bool,
) -> Result<(Model, FinetuneReport)> {
    let sample = &run.sample;
    let teacher = &run.original;
    let train = run.train(training.train_limit)?;
    let test = run.test()?;
    let result = Finetuner {
        student,
        teacher,
        train: &train,
        options: training.recipe.clone(),
        checkpoint_dir: training.checkpoint_dir.clone(),
        resume: training.resume,
        progress,
    }
    .run()?;
    let tuned = result.model;
    crate::ir::verify(&tuned).map_err(|e| anyhow::anyhow!("the tuned graph is invalid: {e}"))?;
    // The written weights must give under tract what the fine-tuner computed.
    let probe = &test.images[..test.sample_len() * test.len().min(16)];
    let ours = candle_logits(&tuned, probe, sample)?;
    let runner = crate::exec::tract::Runner::new(&tuned, sample, 1)?;
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
        evaluate(&tuned, "tuned", Some((student, "before")), &test, RunSpec::default(), progress)?;
    let teacher_outputs = run.original_on_test(progress)?;
    let before = after.reference.as_ref().context("no reference evaluation")?.accuracy;
    let relus = census(&tuned, sample)?.total_relus;
    let report = FinetuneReport {
        options: training.recipe.clone(),
        train_images: train.len(),
        epochs: result.history,
        test_images: test.len(),
        teacher_accuracy: accuracy_of(&teacher_outputs, &test),
        accuracy_before: before,
        accuracy_after: after.accuracy,
        written_graph_rel_diff: rel as f64,
        relus,
    };
    Ok((tuned, report))
}

/// Load the student and the teacher, fine-tune, and write the tuned graph to `job.output`.
pub fn finetune(job: &FinetuneJob) -> Result<FinetuneReport> {
    check_output_path(&job.model, &job.output, job.force)?;
    let student = load_model(&job.model)?;
    let teacher = load_model(&job.teacher)?;
    let sample = sample_shape(&student, None)?;
    let run =
        RunData::new(teacher, sample, "the teacher", (&job.data, &job.data_options), job.limit);
    let (tuned, report) = finetune_model(&student, &run, &job.training, job.progress)
        .with_context(|| format!("fine-tuning {}", job.model.display()))?;
    write_model_atomic(&job.output, &tuned)?;
    Ok(report)
}

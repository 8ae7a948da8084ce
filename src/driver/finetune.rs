//! Knowledge-distillation fine-tuning of a reduced graph against the original (see
//! `crate::train`): [`finetune`] reads and writes files, [`finetune_model`] works on graphs in
//! memory (compile and pareto call it for `--finetune-epochs`).

use super::{check_output_path, DataOptions, TrainOptions, DEFAULT_DATA};
use crate::analysis::{census::census, shapes::sample_shape};
use crate::eval::data::Split;
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

/// Fine-tune `student` against `teacher` on the training split of `data` and measure it on
/// the first `limit` test images; shared with compile and pareto.
pub fn finetune_model(
    student: &Model,
    teacher: &Model,
    (data_spec, data_options): (&str, &DataOptions),
    training: &TrainOptions,
    limit: Option<usize>,
    progress: bool,
) -> Result<(Model, FinetuneReport)> {
    let sample = sample_shape(student, None)?;
    let name = "the teacher";
    let train =
        data_options.load(data_spec, Split::Train, training.train_limit, teacher, &sample, name)?;
    let test = data_options.load(data_spec, Split::Test, limit, teacher, &sample, name)?;
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
        evaluate(&tuned, "tuned", Some((student, "before")), &test, RunSpec::default(), progress)?;
    let teacher_eval = evaluate(teacher, "teacher", None, &test, RunSpec::default(), progress)?;
    let before = after.reference.as_ref().context("no reference evaluation")?.accuracy;
    let relus = census(&tuned, &sample)?.total_relus;
    let report = FinetuneReport {
        options: training.recipe.clone(),
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

/// Load the student and the teacher, fine-tune, and write the tuned graph to `job.output`.
pub fn finetune(job: &FinetuneJob) -> Result<FinetuneReport> {
    check_output_path(&job.model, &job.output, false)?;
    let student = load_model(&job.model)?;
    let teacher = load_model(&job.teacher)?;
    let (tuned, report) = finetune_model(
        &student,
        &teacher,
        (&job.data, &job.data_options),
        &job.training,
        job.limit,
        job.progress,
    )
    .with_context(|| format!("fine-tuning {}", job.model.display()))?;
    write_model_atomic(&job.output, &tuned)?;
    Ok(report)
}

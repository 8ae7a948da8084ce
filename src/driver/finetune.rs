//! Knowledge-distillation fine-tuning of a reduced graph against the original (see
//! `crate::train`): [`finetune`] reads and writes files, [`finetune_model`] works on graphs in
//! memory (compile and pareto call it for `--finetune-epochs`).

use super::context::RunData;
use super::{check_output_path, DataOptions, TrainOptions, DEFAULT_DATA};
use crate::analysis::{census::census, shapes::sample_shape};
use crate::data::Dataset;
use crate::eval::evaluator::accuracy_of;
use crate::eval::evaluator::evaluate;
use crate::eval::RunSpec;
use crate::frontend::{load_model, write_model_atomic};
use crate::ir::Model;
use crate::train::{candle_logits, EpochRecord, FinetuneOptions, Finetuner};
use anyhow::{Context, Result};
use serde::Serialize;
use std::path::PathBuf;
use std::sync::Arc;

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
    /// The student as given, before the refit (`finetune` measures it when the recipe refits;
    /// inside compile, pareto and linearize the student was never a file).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accuracy_input: Option<f64>,
    /// Where training started: the student after the refit.
    pub accuracy_before: f64,
    /// The network written: the trained student, or the start when training ended below it.
    pub accuracy_after: f64,
    /// The end-of-run comparison of the start and the trained student.
    pub guard: TrainingGuard,
    /// Set when training ended below its start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
    /// Largest relative difference between the fine-tuner's forward pass and tract's run of
    /// the written graph: the weights were written back faithfully.
    pub written_graph_rel_diff: f64,
    pub relus: u64,
    /// How pixels became the inputs, and what states it.
    pub normalisation: crate::data::Normalisation,
}

/// Training images the end-of-run check compares the start and the trained student on: as many
/// as the run trains on, within these bounds (at 2,048 one image is 0.05 points; a short test
/// run of 256 images checking on 2,048 took more than twice as long as without the check).
pub const GUARD_IMAGES: usize = 2048;
pub const GUARD_MIN_IMAGES: usize = 512;

/// Did training end above where it started? Measured on training images it did not see
/// (beyond `--train-limit`) or, when it saw the whole split, on its first images.
#[derive(Debug, Clone, Serialize)]
pub struct TrainingGuard {
    pub images: usize,
    /// Whether the images were held out of training.
    pub held_out: bool,
    pub accuracy_start: f64,
    pub accuracy_trained: f64,
    /// `trained` or `start`: the network written.
    pub kept: String,
}

/// Fine-tune `student` against the run's original on its training split (the first
/// `training.train_limit` images) and measure it on the run's test images; shared with
/// compile, pareto and linearize, whose runs read each split and evaluate the original once.
/// A run that ends below its start on the guard images returns the start instead (with a
/// warning in the report) unless `training.keep_trained`.
pub fn finetune_model(
    student: &Model,
    run: &RunData,
    training: &TrainOptions,
    progress: bool,
) -> Result<(Model, FinetuneReport)> {
    let sample = &run.sample;
    let teacher = &run.original;
    // Measured first: an unstated normalisation or a teacher near chance stops here (exit 8).
    let teacher_outputs = run.original_on_test(progress)?;
    let (train, guard_set, held_out) = training_and_guard_images(run, training.train_limit)?;
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
    let (tuned, start) = (result.model, result.start);
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
    let spec = RunSpec::default();
    let checked = evaluate(&tuned, "tuned", Some((&start, "start")), &guard_set, spec, false)?;
    let accuracy_start = checked.reference.as_ref().context("no reference evaluation")?.accuracy;
    let fell = checked.accuracy < accuracy_start;
    let keep_start = fell && !training.keep_trained;
    let guard = TrainingGuard {
        images: guard_set.len(),
        held_out,
        accuracy_start,
        accuracy_trained: checked.accuracy,
        kept: if keep_start { "start" } else { "trained" }.into(),
    };
    let warning = fell.then(|| {
        format!(
            "training ended below its start on {} {}training images ({:.2}% -> {:.2}%); {}",
            guard.images,
            if held_out { "held-out " } else { "" },
            100.0 * accuracy_start,
            100.0 * checked.accuracy,
            if keep_start {
                "the refitted network it started from is written instead (--keep-trained \
                 writes the trained one); train longer or on more images (--train-limit)"
            } else {
                "the trained network is written as --keep-trained asks"
            }
        )
    });
    let written = if keep_start { start.clone() } else { tuned };
    let after = evaluate(&written, "written", Some((&start, "start")), &test, spec, progress)?;
    let before = after.reference.as_ref().context("no reference evaluation")?.accuracy;
    let relus = census(&written, sample)?.total_relus;
    let report = FinetuneReport {
        options: training.recipe.clone(),
        train_images: train.len(),
        epochs: result.history,
        test_images: test.len(),
        teacher_accuracy: accuracy_of(&teacher_outputs, &test),
        accuracy_input: None,
        accuracy_before: before,
        accuracy_after: after.accuracy,
        guard,
        warning,
        written_graph_rel_diff: rel as f64,
        relus,
        normalisation: run.normalisation()?,
    };
    Ok((written, report))
}

/// The training images (the first `limit`) and the images the end-of-run check uses: as many
/// as the run trains on (within [`GUARD_MIN_IMAGES`]..[`GUARD_IMAGES`]) after them when the
/// split has them (held out), else its first images.
fn training_and_guard_images(
    run: &RunData,
    limit: Option<usize>,
) -> Result<(Arc<Dataset>, Dataset, bool)> {
    let guard_len = limit.map_or(GUARD_IMAGES, |l| l.clamp(GUARD_MIN_IMAGES, GUARD_IMAGES));
    if let Some(l) = limit {
        let wider = run.train(Some(l + guard_len))?;
        if wider.len() > l {
            return Ok((run.train(Some(l))?, wider.subset(l..wider.len()), true));
        }
    }
    let train = run.train(limit)?;
    let guard = train.subset(0..train.len().min(guard_len));
    Ok((train, guard, false))
}

/// Load the student and the teacher, fine-tune, and write the tuned graph to `job.output`.
pub fn finetune(job: &FinetuneJob) -> Result<FinetuneReport> {
    check_output_path(&job.model, &job.output, job.force)?;
    let student = load_model(&job.model)?;
    let teacher = load_model(&job.teacher)?;
    let sample = sample_shape(&student, None)?;
    let run =
        RunData::new(teacher, sample, "the teacher", (&job.data, &job.data_options), job.limit);
    let (mut tuned, mut report) = finetune_model(&student, &run, &job.training, job.progress)
        .with_context(|| format!("fine-tuning {}", job.model.display()))?;
    if job.training.recipe.recalibrate {
        let test = run.test()?;
        let input = evaluate(&student, "input", None, &test, RunSpec::default(), job.progress)?;
        report.accuracy_input = Some(input.accuracy);
    }
    run.record_normalisation(&mut tuned);
    write_model_atomic(&job.output, &tuned)?;
    Ok(report)
}

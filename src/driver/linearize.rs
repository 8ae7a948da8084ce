//! `relucompile linearize`: learned per-channel or per-pixel ReLU masks to a ReLU budget (see
//! `crate::train::masks`), then distillation of the binarised graph (`finetune_model`).

use super::context::RunData;
use super::finetune::{finetune_model, FinetuneReport};
use super::{check_output_path, DataOptions, TrainOptions, DEFAULT_DATA};
use crate::analysis::{census::census, shapes::sample_shape};
use crate::error::{CompileError, ExitCode};
use crate::frontend::{load_model, write_bytes_atomic, write_model_atomic};
use crate::ir::Model;
use crate::passes::{prepare, run_pipeline, PassContext, Pipeline, VerifyOptions};
use crate::search::objective::{Budget, Cost, Objective};
use crate::train::masks::{
    measured_choice, Granularity, LayerMask, MaskKey, MaskLearning, MaskMethod, MaskResult,
    DEFAULT_MASK_LR,
};
use crate::train::EpochRecord;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct LinearizeJob {
    pub model: PathBuf,
    pub output: PathBuf,
    /// ReLUs to keep: a count or a percentage of the model's (`10%`).
    pub relu_budget: String,
    /// Epochs that learn the masks (with the weights) before they are made binary.
    pub mask_epochs: usize,
    /// At most this many layers keep ReLUs (fewer PI rounds; `None`: any number).
    pub max_relu_layers: Option<usize>,
    /// A mask per channel or per pixel (`None`: as measured best at the budget, see
    /// [`measured_choice`]).
    pub granularity: Option<Granularity>,
    /// How the mask phase chooses the kept units (`None`: as measured best).
    pub mask_method: Option<MaskMethod>,
    pub mask_lr: f64,
    pub data: String,
    pub data_options: DataOptions,
    /// The recipe of both phases; `recipe.epochs` is the distillation after binarisation.
    pub training: TrainOptions,
    /// Evaluate on the first N test images (`None`: all).
    pub limit: Option<usize>,
    pub progress: bool,
    /// Allow the output to overwrite the input.
    pub force: bool,
}

impl LinearizeJob {
    pub fn new(
        model: impl Into<PathBuf>,
        output: impl Into<PathBuf>,
        relu_budget: impl Into<String>,
    ) -> Self {
        LinearizeJob {
            model: model.into(),
            output: output.into(),
            relu_budget: relu_budget.into(),
            mask_epochs: 1,
            max_relu_layers: None,
            granularity: None,
            mask_method: None,
            mask_lr: DEFAULT_MASK_LR,
            data: DEFAULT_DATA.into(),
            data_options: DataOptions::default(),
            training: TrainOptions::epochs(1),
            limit: None,
            progress: false,
            force: false,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct LinearizeReport {
    pub input: String,
    pub output: String,
    pub relus_before: u64,
    pub relu_budget: u64,
    /// `--max-relu-layers`, when set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_relu_layers: Option<usize>,
    pub granularity: Granularity,
    pub mask_method: MaskMethod,
    pub relus_after: u64,
    pub mask_epochs: Vec<EpochRecord>,
    /// The soft ReLU count (sum of mask values times ReLUs per channel) after the last step.
    pub soft_relus: f64,
    pub lambda: f64,
    pub layers: Vec<LayerMask>,
    pub finetune: FinetuneReport,
    pub seconds: f64,
}

pub fn linearize(job: &LinearizeJob) -> Result<LinearizeReport> {
    let started = Instant::now();
    check_output_path(&job.model, &job.output, job.force)?;
    let usage = |m: String| -> anyhow::Error { CompileError::new(ExitCode::Usage, m).into() };
    if job.mask_epochs == 0 || job.training.recipe.epochs == 0 {
        return Err(usage("linearize needs --mask-epochs and --epochs of at least 1".into()));
    }
    let original = load_model(&job.model)?;
    let sample = sample_shape(&original, None)?;
    let model = prepare(&original, &PassContext::new(sample.clone()))
        .with_context(|| format!("preparing {}", job.model.display()))?;
    let before = census(&model, &sample)?;
    // A ReLU budget reads the ReLU count alone; no cost model is needed.
    let cost = Cost { relus: before.total_relus, bytes: 0.0, seconds: 0.0 };
    let budget = Budget::parse(Objective::Relus, &job.relu_budget, &cost)
        .map_err(|e| usage(format!("--relu-budget: {e}")))?
        .limit as u64;
    let share = budget as f64 / before.total_relus.max(1) as f64;
    let (granularity, mask_method) = measured_choice(share, job.granularity, job.mask_method);
    let run = RunData::new(model, sample, "the model", (&job.data, &job.data_options), job.limit);
    let learned = LearnedMasks {
        run: &run,
        budget,
        max_layers: job.max_relu_layers,
        granularity,
        method: mask_method,
        mask_epochs: job.mask_epochs,
        mask_lr: job.mask_lr,
        training: &job.training,
        progress: job.progress,
    }
    .run()
    .with_context(|| format!("learning ReLU masks of {}", job.model.display()))?;
    let (mut tuned, masked, finetune) = (learned.model, learned.masks, learned.finetune);
    run.record_normalisation(&mut tuned);
    let relus_after = finetune.relus;
    write_model_atomic(&job.output, &tuned)?;
    Ok(LinearizeReport {
        input: job.model.display().to_string(),
        output: job.output.display().to_string(),
        relus_before: before.total_relus,
        relu_budget: budget,
        max_relu_layers: job.max_relu_layers,
        granularity,
        mask_method,
        relus_after,
        mask_epochs: masked.history,
        soft_relus: masked.soft_relus,
        lambda: masked.lambda,
        layers: masked.layers,
        finetune,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The learned-mask method on a graph in memory (`linearize`, and `pareto --learned`): masks
/// learned to `budget` with the weights, made binary, then distilled. With a checkpoint
/// directory in `training`, the mask phase and the distillation each resume from it.
pub struct LearnedMasks<'a> {
    /// The data of the run, whose original (prepared) is the graph whose ReLUs are masked,
    /// and the teacher.
    pub run: &'a RunData,
    /// ReLUs to keep, counted.
    pub budget: u64,
    /// At most this many layers keep ReLUs (see `choose_kept`).
    pub max_layers: Option<usize>,
    pub granularity: Granularity,
    pub method: MaskMethod,
    pub mask_epochs: usize,
    pub mask_lr: f64,
    /// The recipe of both phases; `recipe.epochs` is the distillation after binarisation.
    pub training: &'a TrainOptions,
    pub progress: bool,
}

pub struct Learned {
    /// The distilled graph, ReLUs on the kept units only.
    pub model: Model,
    /// The mask phase (its `model` is the binarised graph before distillation).
    pub masks: MaskResult,
    pub finetune: FinetuneReport,
}

impl LearnedMasks<'_> {
    pub fn run(&self) -> Result<Learned> {
        let model = &self.run.original;
        let sample = self.run.sample.clone();
        let train = self.run.train(self.training.train_limit)?;
        let checkpoint = self.training.checkpoint_dir.as_deref();
        let learning = MaskLearning {
            model,
            teacher: model,
            train: &train,
            options: crate::train::FinetuneOptions {
                epochs: self.mask_epochs,
                // The masks' recipe was measured at the full rate (docs/learned-masks.md).
                scale_lr_to_run: false,
                ..self.training.recipe.clone()
            },
            budget: self.budget,
            max_layers: self.max_layers,
            granularity: self.granularity,
            method: self.method,
            mask_lr: self.mask_lr,
            progress: self.progress,
            checkpoint_dir: checkpoint,
            resume: self.training.resume,
        };
        let resumed = match checkpoint.filter(|_| self.training.resume) {
            Some(dir) => read_mask_checkpoint(dir, &learning.key())?,
            None => None,
        };
        // Measured before any training: a model near chance on the data stops here (exit 8).
        self.run.original_on_test(self.progress)?;
        let masks = match resumed {
            Some(done) => done,
            None => {
                let masks = learning.run()?;
                if let Some(dir) = checkpoint {
                    write_mask_checkpoint(dir, &masks, &learning.key())?;
                }
                masks
            }
        };
        drop(train);
        // The distillation resumes from its own checkpoint, once it has written one.
        let mut training = self.training.clone();
        training.resume &= checkpoint.is_some_and(|d| d.join("state.json").exists());
        let mut reduced = masks.model.clone();
        run_pipeline(
            &mut reduced,
            &Pipeline::parse("dce")?,
            &PassContext::new(sample.clone()),
            &VerifyOptions::default(),
        )?;
        let (tuned, finetune) = finetune_model(&reduced, self.run, &training, self.progress)
            .context("distilling the masked graph")?;
        anyhow::ensure!(
            finetune.relus <= self.budget,
            "internal error: the distilled graph has {} ReLUs, over the budget of {}",
            finetune.relus,
            self.budget
        );
        Ok(Learned { model: tuned, masks, finetune })
    }
}

/// The mask phase's outcome in a checkpoint directory: `masked.onnx` (binary masks applied,
/// before distillation) and `masks.json`.
#[derive(Serialize, Deserialize)]
struct MaskCheckpoint {
    #[serde(flatten)]
    key: MaskKey,
    history: Vec<EpochRecord>,
    layers: Vec<LayerMask>,
    soft_relus: f64,
    lambda: f64,
}

fn write_mask_checkpoint(dir: &Path, m: &MaskResult, key: &MaskKey) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    write_model_atomic(&dir.join("masked.onnx"), &m.model)?;
    let state = MaskCheckpoint {
        key: *key,
        history: m.history.clone(),
        layers: m.layers.clone(),
        soft_relus: m.soft_relus,
        lambda: m.lambda,
    };
    write_bytes_atomic(&dir.join("masks.json"), serde_json::to_string_pretty(&state)?.as_bytes())
}

/// The mask phase from a checkpoint, if one was written (a run stopped during the mask epochs
/// has none and starts them again).
fn read_mask_checkpoint(dir: &Path, key: &MaskKey) -> Result<Option<MaskResult>> {
    let path = dir.join("masks.json");
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let state: MaskCheckpoint = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a mask checkpoint", path.display()))?;
    anyhow::ensure!(
        state.key == *key,
        "the checkpoint in {} was learned for {}, not {key}",
        dir.display(),
        state.key,
    );
    Ok(Some(MaskResult {
        model: load_model(&dir.join("masked.onnx"))?,
        history: state.history,
        layers: state.layers,
        soft_relus: state.soft_relus,
        lambda: state.lambda,
    }))
}

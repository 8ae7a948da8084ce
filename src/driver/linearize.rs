//! `relucompile linearize`: learned per-channel ReLU masks to a ReLU budget (see
//! `crate::train::masks`), then distillation of the binarised graph (`finetune_model`).

use super::finetune::{finetune_model, FinetuneReport};
use super::{check_output_path, DataOptions, TrainOptions, DEFAULT_DATA};
use crate::analysis::{census::census, shapes::sample_shape};
use crate::error::{CompileError, ExitCode};
use crate::eval::data::Split;
use crate::frontend::{load_model, write_model_atomic};
use crate::passes::{prepare, run_pipeline, PassContext, Pipeline, VerifyOptions};
use crate::search::objective::{Budget, Cost, Objective};
use crate::train::masks::{LayerMask, MaskLearning, DEFAULT_MASK_LR};
use crate::train::EpochRecord;
use anyhow::{Context, Result};
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct LinearizeJob {
    pub model: PathBuf,
    pub output: PathBuf,
    /// ReLUs to keep: a count or a percentage of the model's (`10%`).
    pub relu_budget: String,
    /// Epochs that learn the masks (with the weights) before they are made binary.
    pub mask_epochs: usize,
    pub mask_lr: f64,
    pub data: String,
    pub data_options: DataOptions,
    /// The recipe of both phases; `recipe.epochs` is the distillation after binarisation.
    pub training: TrainOptions,
    /// Evaluate on the first N test images (`None`: all).
    pub limit: Option<usize>,
    pub progress: bool,
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
            mask_lr: DEFAULT_MASK_LR,
            data: DEFAULT_DATA.into(),
            data_options: DataOptions::default(),
            training: TrainOptions::epochs(1),
            limit: None,
            progress: false,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct LinearizeReport {
    pub input: String,
    pub output: String,
    pub relus_before: u64,
    pub relu_budget: u64,
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
    check_output_path(&job.model, &job.output, false)?;
    let usage = |m: String| -> anyhow::Error { CompileError::new(ExitCode::Usage, m).into() };
    if job.mask_epochs == 0 || job.training.recipe.epochs == 0 {
        return Err(usage("linearize needs --mask-epochs and --epochs of at least 1".into()));
    }
    let original = load_model(&job.model)?;
    let sample = sample_shape(&original, None)?;
    let model = prepare(&original, &PassContext::new(sample.clone()))
        .with_context(|| format!("preparing {}", job.model.display()))?;
    let before = census(&model, &sample)?;
    let cost = Cost { relus: before.total_relus, bytes: 0.0, seconds: 0.0 };
    let budget = Budget::parse(Objective::Relus, &job.relu_budget, &cost)
        .map_err(|e| usage(format!("--relu-budget: {e}")))?
        .limit as u64;
    let name = "the model";
    let recipe = &job.training.recipe;
    let train = job.data_options.load(
        &job.data,
        Split::Train,
        job.training.train_limit,
        &model,
        &sample,
        name,
    )?;
    let masked = MaskLearning {
        model: &model,
        teacher: &model,
        train: &train,
        options: crate::train::FinetuneOptions { epochs: job.mask_epochs, ..recipe.clone() },
        budget,
        mask_lr: job.mask_lr,
        progress: job.progress,
    }
    .run()
    .with_context(|| format!("learning ReLU masks of {}", job.model.display()))?;
    let mut reduced = masked.model;
    run_pipeline(
        &mut reduced,
        &Pipeline::parse("dce")?,
        &PassContext::new(sample.clone()),
        &VerifyOptions::default(),
    )?;
    let (tuned, finetune) = finetune_model(
        &reduced,
        &model,
        (&job.data, &job.data_options),
        &job.training,
        job.limit,
        job.progress,
    )
    .context("distilling the masked graph")?;
    let relus_after = census(&tuned, &sample)?.total_relus;
    anyhow::ensure!(
        relus_after <= budget,
        "internal error: the written graph has {relus_after} ReLUs, over the budget of {budget}"
    );
    write_model_atomic(&job.output, &tuned)?;
    Ok(LinearizeReport {
        input: job.model.display().to_string(),
        output: job.output.display().to_string(),
        relus_before: before.total_relus,
        relu_budget: budget,
        relus_after,
        mask_epochs: masked.history,
        soft_relus: masked.soft_relus,
        lambda: masked.lambda,
        layers: masked.layers,
        finetune,
        seconds: started.elapsed().as_secs_f64(),
    })
}

//! `relucompile criticality`: DeepReDuce's per-stage ReLU criticality of a model file, on
//! calibration images from the training split (see `crate::search::criticality`).

use super::context::RunData;
use super::{DataOptions, DEFAULT_DATA};
use crate::analysis::shapes::sample_shape;
use crate::frontend::load_model;
use crate::passes::{prepare, PassContext};
use crate::search::criticality::{criticality, Criticality};
use crate::search::probe::{ensure_probe_images, Prober};
use anyhow::Result;
use std::path::PathBuf;

/// What to measure, on which data.
#[derive(Debug, Clone)]
pub struct CriticalityJob {
    pub model: PathBuf,
    pub data: String,
    pub data_options: DataOptions,
    /// Calibration images taken from the training split.
    pub images: usize,
    /// Per-sample input shape (`None`: the model's declared shape).
    pub input_shape: Option<Vec<usize>>,
    /// Score every variant after a one-epoch distillation on this many further training
    /// images (0: straight after the refit).
    pub probe_images: usize,
    pub progress: bool,
}

impl CriticalityJob {
    pub fn new(model: impl Into<PathBuf>) -> Self {
        CriticalityJob {
            model: model.into(),
            data: DEFAULT_DATA.into(),
            data_options: DataOptions::default(),
            images: 2000,
            input_shape: None,
            probe_images: 0,
            progress: false,
        }
    }
}

/// Per-stage criticality and the cull order of `job.model`.
pub fn run(job: &CriticalityJob) -> Result<Criticality> {
    let original = load_model(&job.model)?;
    let sample = sample_shape(&original, job.input_shape.as_deref())?;
    let model = prepare(&original, &PassContext::new(sample.clone()))?;
    let name = job.model.display().to_string();
    let run = RunData::new(model, sample.clone(), name, (&job.data, &job.data_options), None);
    let train = run.train(Some(job.images + job.probe_images))?;
    let set = train.subset(0..job.images.min(train.len()));
    let probes = train.subset(set.len()..train.len());
    drop(train);
    ensure_probe_images(&probes, job.probe_images, set.len(), &job.data)?;
    let model = &run.original;
    let (ctx, scoring) = PassContext::fitted_on(sample, &set, model);
    let prober = Prober {
        base: model,
        ctx: &ctx,
        train: &probes,
        score: &scoring,
        recipe: Default::default(),
        journal: None,
        progress: job.progress,
    };
    let mut found = criticality(model, &ctx, &scoring, (job.probe_images > 0).then_some(&prober))?;
    found.normalisation = Some(run.normalisation()?);
    Ok(found)
}

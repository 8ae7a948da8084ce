//! Top-1 accuracy and throughput of a model under tract, optionally against a reference model
//! (`relucompile eval`).

use super::context::near_chance;
use super::{DataOptions, DEFAULT_DATA};
use crate::analysis::shapes::sample_shape;
use crate::data::{self, Normalisation, Source, Split};
use crate::error::{CompileError, ExitCode};
use crate::eval::evaluator::{evaluate, EvalReport};
use crate::eval::{EngineChoice, RunSpec};
use crate::frontend::load_model;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// What to evaluate, on which data.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// The ONNX model to evaluate.
    pub model: PathBuf,
    /// The data: `fashion-mnist`, an IDX, CIFAR or image-folder directory, or a .npy file.
    pub data: String,
    /// Which split to read (`None`: the test split; refused for a set without splits).
    pub split: Option<Split>,
    /// Evaluate the first N images only.
    pub limit: Option<usize>,
    /// Also run this model and compare: its accuracy, arg-max agreement, largest difference.
    pub reference: Option<PathBuf>,
    /// Images per run (`None`: the engine's best).
    pub batch: Option<usize>,
    /// Which engine runs the models.
    pub engine: EngineChoice,
    /// The model's input shape with the batch (`None`: the model's own).
    pub input_shape: Option<Vec<usize>>,
    pub data_options: DataOptions,
    /// Show a progress bar on stderr.
    pub progress: bool,
}

impl EvalOptions {
    /// Evaluate `model` on the whole Fashion-MNIST test split with the fastest engine.
    pub fn new(model: impl Into<PathBuf>) -> Self {
        EvalOptions {
            model: model.into(),
            data: DEFAULT_DATA.into(),
            split: None,
            limit: None,
            reference: None,
            batch: None,
            engine: EngineChoice::Auto,
            input_shape: None,
            data_options: DataOptions::default(),
            progress: false,
        }
    }
}

/// An evaluation: the report (`eval --json` prints it) and the normalisation the inputs were
/// fed with.
#[derive(Debug, Clone)]
pub struct Evaluation {
    pub report: EvalReport,
    pub normalisation: Normalisation,
}

/// Evaluate `opts.model` (and `opts.reference`) on the data. A warning goes to stderr when the
/// reference declares another normalisation than the one both are fed.
pub fn eval(opts: &EvalOptions) -> Result<Evaluation> {
    let source = data::resolve_spec(&opts.data).context("--data")?;
    if let (false, Some(split)) = (source.has_splits(), opts.split) {
        return Err(CompileError::new(
            ExitCode::Usage,
            format!(
                "--split {split} selects a split, but --data {} is one set ({} without \
                 train/ and test/)",
                opts.data,
                source.format()
            ),
        )
        .into());
    }
    let split = opts.split.unwrap_or(Split::Test);

    let model_name = opts.model.display().to_string();
    let model = load_model(&opts.model)?;
    let sample = sample_shape(&model, opts.input_shape.as_deref())
        .with_context(|| format!("the input shape of {model_name}"))?;
    let norm = opts.data_options.stated_normalisation(&model, &model_name, &opts.data)?;
    let dataset =
        opts.data_options.load((&opts.data, split, opts.limit), &norm, &sample, &model_name)?;

    // The reference is loaded once, and not at all when it is the model's own file.
    let same_file = |p: &Path| match (p.canonicalize(), opts.model.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    let reference = match &opts.reference {
        Some(p) if same_file(p) => None,
        Some(p) => Some(load_model(p).context("--reference")?),
        None => None,
    };
    let reference_name = opts.reference.as_ref().map(|p| p.display().to_string());
    let reference_pair = match (&reference_name, &reference) {
        (Some(name), Some(m)) => Some((m, name.as_str())),
        (Some(name), None) => Some((&model, name.as_str())),
        _ => None,
    };
    if let (Some((m, name)), Some(path)) = (reference_pair, &opts.reference) {
        let ref_norm = opts
            .data_options
            .normalisation(m)
            .with_context(|| format!("reading the normalisation of {}", path.display()))?;
        let differs =
            (ref_norm.scale, &ref_norm.mean, &ref_norm.std) != (norm.scale, &norm.mean, &norm.std);
        if !ref_norm.explicit()
            && ref_norm.source.is_known()
            && differs
            && !data::stores_normalised_floats(&opts.data)?
        {
            eprintln!(
                "warning: the reference {name} declares the normalisation {ref_norm}, but both \
                 models are fed {norm}"
            );
        }
    }

    let mut report = evaluate(
        &model,
        &model_name,
        reference_pair,
        &dataset,
        RunSpec { batch: opts.batch, engine: opts.engine },
        opts.progress,
    )?;
    report.normalisation = Some(norm.clone());
    report.warning = near_chance_warning(&report);
    report.split = match source {
        Source::Npy(_) => "npy".to_string(),
        s if !s.has_splits() => "all".to_string(),
        _ => split.name().to_string(),
    };
    Ok(Evaluation { report, normalisation: norm })
}

/// `eval` measures what it is asked to, but says when the result looks like wrong inputs
/// rather than a weak model (the commands that reduce a model refuse such an original).
fn near_chance_warning(report: &EvalReport) -> Option<String> {
    (report.accuracy < near_chance(report.classes)).then(|| {
        format!(
            "{:.2}% is near chance for {} classes (chance {:.0}%): check the normalisation \
             (--scale/--mean/--std, --raw-pixels) and --data",
            100.0 * report.accuracy,
            report.classes,
            100.0 / report.classes.max(1) as f64
        )
    })
}

//! The build steps as a library: compile, eval, pareto, finetune, linearize and criticality,
//! each a function taking a plain option struct (no command-line types) and returning a typed
//! report, the same one the command line prints as JSON. Each runs in named phases around one
//! [`context::RunData`], which reads every data split once and runs the original on it once.
//! The drivers never print tables; `crate::cli` parses flags into these options, calls the
//! driver and prints or writes its report.
//!
//! ```no_run
//! use relucompile::driver::compile::{compile, CompileOptions, ThinMode};
//!
//! let options = CompileOptions {
//!     cull: vec![1, 2],
//!     thin: Some(ThinMode::Bottom),
//!     limit: Some(500),
//!     ..CompileOptions::new("models/resnet18w16.onnx", "resnet18w16.opt.onnx")
//! };
//! let compiled = compile(&options)?;
//! println!("{} -> {} ReLUs", compiled.report.before.total_relus, compiled.report.after.total_relus);
//! compiled.write()?; // refuses (exit codes 5 and 7) when a check or the accuracy gate failed
//! # Ok::<(), anyhow::Error>(())
//! ```
//!
//! Errors carry their exit code as a [`crate::error::CompileError`] in the chain
//! ([`crate::error::exit_code_of`]).

pub mod compile;
pub mod context;
pub mod criticality;
pub mod eval;
pub mod finetune;
pub mod linearize;
pub mod pareto;
pub mod shard;

use crate::analysis::input_normalisation::in_graph_normalisation;
use crate::data::{self, CropSize, Dataset, Fit, Normalisation, NormalisationSource, Split};
use crate::error::{CompileError, ExitCode};
use crate::ir::Model;
use crate::train::optim::{default_lr, OptimizerKind};
pub use crate::train::FinetuneOptions;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// The data set a driver reads when none is named: Debian's Fashion-MNIST.
pub const DEFAULT_DATA: &str = data::FASHION_MNIST_SPEC;

/// How images of a data set become a model's inputs: resizing and cropping, CIFAR-100's label
/// set, and the normalisation (each `None` falls back to the model's metadata, then the
/// default). The command line's `--resize`, `--center-crop`, `--coarse-labels`, `--scale`,
/// `--mean` and `--std`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DataOptions {
    /// Scale every image so that its shorter side has this many pixels (bilinear).
    pub resize: Option<usize>,
    /// Keep the central pixels of every image, after `resize`.
    pub center_crop: Option<CropSize>,
    /// CIFAR-100: score against the 20 coarse labels instead of the 100 fine ones.
    pub coarse_labels: bool,
    /// Pixel scale in `x = (pixel * scale - mean) / std`.
    pub scale: Option<f32>,
    /// Mean subtracted after scaling: one value, or one per channel.
    pub mean: Option<Vec<f32>>,
    /// Standard deviation divided by: one value, or one per channel.
    pub std: Option<Vec<f32>>,
    /// The user states the model takes pixels scaled to [0, 1] (scale 1/255, mean 0, std 1).
    pub raw_pixels: bool,
}

impl DataOptions {
    /// The normalisation for `model`, and what states it: these options first (`raw_pixels`,
    /// then the values), then its metadata, then normalisation found in its graph; else the
    /// default, stated by nothing ([`NormalisationSource::Unknown`]).
    pub fn normalisation(&self, model: &Model) -> Result<Normalisation> {
        if let Some(std) = &self.std {
            if std.contains(&0.0) {
                return Err(CompileError::new(
                    ExitCode::Usage,
                    format!("--std {std:?}: a standard deviation of 0 divides by zero"),
                )
                .into());
            }
        }
        if self.raw_pixels {
            return Ok(Normalisation::default().stated_by(NormalisationSource::RawPixels));
        }
        let norm = data::try_normalisation_for(
            model,
            self.scale,
            self.mean.as_deref(),
            self.std.as_deref(),
        )?;
        if norm.source == NormalisationSource::Unknown
            && in_graph_normalisation(&model.graph).is_some()
        {
            return Ok(norm.stated_by(NormalisationSource::InGraph));
        }
        Ok(norm)
    }

    /// The normalisation `model` (named `model_name`) is fed the images of `spec` with, to
    /// measure accuracy or train: float `.npy` images go as stored unless the user gave
    /// values. Nothing stating it is an error ([`ExitCode::Normalisation`]) naming the flags.
    pub fn stated_normalisation(
        &self,
        model: &Model,
        model_name: &str,
        spec: &str,
    ) -> Result<Normalisation> {
        let norm = self
            .normalisation(model)
            .with_context(|| format!("reading the normalisation of {model_name}"))?;
        if !norm.explicit() && data::stores_normalised_floats(spec)? {
            return Ok(Normalisation::identity());
        }
        if !norm.source.is_known() {
            return Err(CompileError::new(
                ExitCode::Normalisation,
                format!(
                    "{model_name} does not say how its pixels were normalised (no \
                     relucompile.scale/mean/std metadata, no Sub/Div or Mul/Add on its input \
                     before the first Conv), so its accuracy on {spec} would be measured on a \
                     guess.\n  Give the normalisation it was trained with: --mean A[,B,C] \
                     --std A[,B,C] (and --scale F unless pixels were divided by 255), or \
                     --raw-pixels if it takes pixels scaled to [0, 1]. Nothing was written."
                ),
            )
            .into());
        }
        Ok(norm)
    }

    /// How images become inputs of a model taking `sample` (`[C, H, W]`), named `model_name`.
    pub fn fit(&self, sample: &[usize], model_name: &str) -> Fit {
        Fit {
            shape: Some(sample.to_vec()),
            model: Some(model_name.to_string()),
            resize: self.resize,
            center_crop: self.center_crop,
            coarse_labels: self.coarse_labels,
        }
    }

    /// The options given, as command-line text for keys and reports (empty when none).
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(s) = self.resize {
            parts.push(format!("--resize {s}"));
        }
        if let Some(c) = self.center_crop {
            parts.push(format!("--center-crop {c}"));
        }
        if self.coarse_labels {
            parts.push("--coarse-labels".into());
        }
        let list = |v: &[f32]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",");
        if let Some(s) = self.scale {
            parts.push(format!("--scale {s}"));
        }
        if let Some(m) = &self.mean {
            parts.push(format!("--mean {}", list(m)));
        }
        if let Some(s) = &self.std {
            parts.push(format!("--std {}", list(s)));
        }
        if self.raw_pixels {
            parts.push("--raw-pixels".into());
        }
        parts.join(" ")
    }

    /// `split` of `spec` for a model taking `sample` (named `model_name` in messages),
    /// normalised with `norm`, fitted and checked against the model's input; notes on
    /// conversions go to stderr.
    pub fn load(
        &self,
        (spec, split, limit): (&str, Split, Option<usize>),
        norm: &Normalisation,
        sample: &[usize],
        model_name: &str,
    ) -> Result<Dataset> {
        let (set, notes) =
            data::load_fitted(spec, split, limit, norm, &self.fit(sample, model_name))?;
        data::check_fits_named(&set, sample, model_name)?;
        for note in notes {
            eprintln!("note: {note}");
        }
        Ok(set)
    }
}

/// How to fine-tune a reduced graph: the training recipe ([`FinetuneOptions`], its `epochs`
/// included) and where the training images and checkpoints come from.
#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    pub recipe: FinetuneOptions,
    /// Train on the first N training images only (`None`: all).
    pub train_limit: Option<usize>,
    /// Write a checkpoint (`student.onnx`, `state.json`) here after every epoch.
    pub checkpoint_dir: Option<PathBuf>,
    /// Continue from the checkpoint in `checkpoint_dir`.
    pub resume: bool,
    /// Write the trained network even when it ends below its start.
    pub keep_trained: bool,
}

impl TrainOptions {
    /// The default recipe for `epochs` epochs (what `--finetune-epochs N` runs).
    pub fn epochs(epochs: usize) -> Self {
        TrainOptions {
            recipe: FinetuneOptions { epochs, ..Default::default() },
            ..Default::default()
        }
    }

    /// Switch the optimiser, with its default peak learning rate.
    pub fn with_optimizer(mut self, optimizer: OptimizerKind) -> Self {
        self.recipe.optimizer = optimizer;
        self.recipe.lr = default_lr(optimizer);
        self
    }
}

/// Refuse, before any work, to overwrite the input (unless forced), to write into a directory,
/// or to write where the output's directory does not exist.
pub fn check_output_path(input: &Path, output: &Path, force: bool) -> Result<()> {
    let dir = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(CompileError::new(
            ExitCode::Usage,
            format!(
                "cannot write {}: the directory {} does not exist",
                output.display(),
                dir.display()
            ),
        )
        .into());
    }
    if output.is_dir() {
        return Err(CompileError::new(
            ExitCode::Usage,
            format!("output path {} is a directory; give a file name", output.display()),
        )
        .into());
    }
    let same = match (input.canonicalize(), output.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same && !force {
        return Err(CompileError::new(
            ExitCode::Usage,
            format!("refusing to overwrite the input {} (use --force)", input.display()),
        )
        .into());
    }
    Ok(())
}

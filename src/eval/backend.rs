//! What runs a graph for the evaluator and the search: the native engine ([`Engine`]) when it
//! takes the graph, tract otherwise or when asked.

use crate::exec::engine::Engine;
use crate::exec::tract::Runner;
use crate::ir::Model;
use anyhow::Result;
use serde::Serialize;

/// Images per native-engine run (one run per thread at a time). Measured on the shipped
/// ResNet, Fashion-MNIST test set, two cores (scripts/bench_eval.py): 16, 32, 64 and 128
/// images per run gave 2,321, 2,370, 2,231 and 2,344 images/s before ReLU fusion; 32 is also
/// small enough that ten thousand images still split into many tasks.
pub const NATIVE_BATCH: usize = 32;

/// Images per tract run: one, because tract runs a batch of N as N times the work on N times
/// the memory, so larger batches only lose cache. Measured with the release build on the
/// shipped models (1,024 test images, one thread): ResNet-18 w16 at about 700 images/s at
/// batch 1, 520 at 4, 490 at 8 and 365 at 64; the VGG at 960, 760, 590 and 530.
pub const TRACT_BATCH: usize = 1;

/// Which engine runs the graphs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum EngineChoice {
    /// The native engine when it takes the graph, else tract.
    #[default]
    Auto,
    /// The native engine; a graph it does not take is an error.
    Native,
    /// tract, the independent ONNX runtime.
    Tract,
}

/// How graphs are run: engine and images per run (`None`: the engine's best).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunSpec {
    pub batch: Option<usize>,
    pub engine: EngineChoice,
}

/// A graph prepared to run on batches of samples, shared by every thread.
pub enum Backend {
    Native { engine: Engine, batch: usize },
    Tract(Runner),
}

impl Backend {
    /// Prepare `model` for samples of shape `sample` as `spec` asks.
    pub fn new(model: &Model, sample: &[usize], spec: RunSpec) -> Result<Self> {
        let native = |model| -> Result<Self> {
            let engine = Engine::new(model, sample)?;
            Ok(Backend::Native { engine, batch: spec.batch.unwrap_or(NATIVE_BATCH) })
        };
        let tract = |model| -> Result<Self> {
            Ok(Backend::Tract(Runner::new(model, sample, spec.batch.unwrap_or(TRACT_BATCH))?))
        };
        match spec.engine {
            EngineChoice::Native => native(model),
            EngineChoice::Tract => tract(model),
            EngineChoice::Auto => native(model).or_else(|_| tract(model)),
        }
    }

    /// `native` or `tract`.
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Native { .. } => "native",
            Backend::Tract(_) => "tract",
        }
    }

    /// Samples per run.
    pub fn batch(&self) -> usize {
        match self {
            Backend::Native { batch, .. } => *batch,
            Backend::Tract(r) => r.batch(),
        }
    }

    pub fn sample_len(&self) -> usize {
        match self {
            Backend::Native { engine, .. } => engine.sample_len(),
            Backend::Tract(r) => r.sample_len(),
        }
    }

    /// The first output for up to [`Backend::batch`] samples and its length per sample.
    pub fn run(&self, input: &[f32]) -> Result<(Vec<f32>, usize)> {
        match self {
            Backend::Native { engine, .. } => engine.run(input),
            Backend::Tract(r) => r.run(input),
        }
    }
}

//! The teacher's forward pass during fine-tuning: the original graph evaluated on the same
//! augmented batch as the student, forward only.
//!
//! It runs through the evaluator's inference engine ([`Engine`]: the direct and im2col/gemm
//! convolutions, each ReLU fused into its producer), in sub-batches of
//! [`ENGINE_BATCH`] images on all cores, forward only. Through the fine-tuner's own graph
//! interpreter instead, whose residual adds and copies run on one core, the teacher took 20%
//! of an augmented distillation step (the training-engine benchmark, batch 64: 414 against
//! 517 images/s with the teacher's logits read back). Graphs the engine cannot take go to the
//! interpreter ([`TrainGraph`]), and graphs neither takes to tract, one image per task.
//!
//! Without augmentation the teacher sees every training image exactly as it is, epoch after
//! epoch and student after student, so its logits are computed once ([`dataset_logits`]) and
//! read back instead of recomputed: measured on the main network (2 epochs over 8,192 images,
//! release build) an epoch took 27.0 s with the teacher run every step and 22.3 s with its
//! logits read back, so the teacher was about a sixth of a distillation step.

use crate::data::Dataset;
use crate::exec::engine::Engine;
use crate::exec::graph::TrainGraph;
use crate::exec::tract::Runner;
use crate::ir::Model;
use anyhow::{Context, Result};
use candle_core::Tensor;
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

pub enum Teacher {
    Engine(Engine),
    Graph(Box<TrainGraph>),
    Tract(Runner),
}

impl Teacher {
    /// The teacher for inputs of shape `[N] + sample`.
    pub fn new(model: &Model, sample: &[usize]) -> Result<Self> {
        if let Ok(engine) = Engine::new(model, sample) {
            return Ok(Teacher::Engine(engine));
        }
        match TrainGraph::new(model) {
            Ok(graph) => Ok(Teacher::Graph(Box::new(graph))),
            Err(_) => {
                Ok(Teacher::Tract(Runner::new(model, sample, 1).context("preparing the teacher")?))
            }
        }
    }

    /// Logits `[N, classes]` for the batch `x` (`[N] + sample`), cut from any autodiff graph.
    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Teacher::Engine(engine) => {
                let n = x.dim(0)?;
                let data: Vec<f32> = x.flatten_all()?.to_vec1()?;
                let per = data.len() / n.max(1);
                let parts: Vec<Vec<f32>> = data
                    .par_chunks((ENGINE_BATCH * per).max(1))
                    .map(|batch| engine.run(batch).map(|(y, _)| y))
                    .collect::<Result<_>>()?;
                let all = parts.concat();
                let classes = all.len() / n.max(1);
                Ok(Tensor::from_vec(all, (n, classes), x.device())?)
            }
            Teacher::Graph(graph) => Ok(graph.forward(x)?.detach()),
            Teacher::Tract(runner) => {
                let n = x.dim(0)?;
                let data: Vec<f32> = x.flatten_all()?.to_vec1()?;
                let per = data.len() / n.max(1);
                let rows: Vec<Vec<f32>> = data
                    .par_chunks(per.max(1))
                    .map(|img| runner.run(img).map(|(y, _)| y))
                    .collect::<Result<_>>()?;
                let classes = rows.first().map_or(0, |r| r.len());
                Ok(Tensor::from_vec(rows.concat(), (n, classes), x.device())?)
            }
        }
    }
}

/// Images per call of the engine: the evaluator's batch, so that a training batch of 64 or
/// more keeps both cores busy with whole sub-batches.
const ENGINE_BATCH: usize = 32;

/// Images per teacher batch when the whole training set's logits are computed: the batch is
/// fixed so that the logits (and every run that reads them) do not depend on who asked first.
const LOGITS_BATCH: usize = 256;

/// The last training set's teacher logits, by [`logits_key`]: a frontier trains many students
/// from one teacher on one data set in one process.
static LOGITS: Mutex<Option<(u64, Arc<Vec<f32>>)>> = Mutex::new(None);

/// A digest of the teacher graph's bytes and the training images and labels.
fn logits_key(model: &Model, train: &Dataset) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut mix = |v: u64| {
        h = (h ^ v).wrapping_mul(0x0000_0100_0000_01b3);
        h ^= h >> 29;
    };
    for chunk in crate::frontend::to_bytes(model).chunks(8) {
        let mut b = [0u8; 8];
        b[..chunk.len()].copy_from_slice(chunk);
        mix(u64::from_le_bytes(b));
    }
    mix(train.len() as u64);
    for pair in train.images.chunks(2) {
        mix(pair[0].to_bits() as u64 | (pair.get(1).map_or(0, |v| v.to_bits() as u64) << 32));
    }
    for &l in &train.labels {
        mix(l as u64);
    }
    h
}

/// The teacher's logits on every image of `train`, unaugmented, `[N, classes]` in dataset
/// order; computed on the first call for this teacher and data set, shared afterwards.
pub fn dataset_logits(
    teacher: &Teacher,
    model: &Model,
    train: &Dataset,
    progress: bool,
) -> Result<Arc<Vec<f32>>> {
    let key = logits_key(model, train);
    if let Some((k, logits)) = LOGITS.lock().expect("logits cache").as_ref() {
        if *k == key {
            return Ok(logits.clone());
        }
    }
    let (n, per) = (train.len(), train.sample_len());
    let bar = crate::eval::evaluator::counted_progress_bar(n, "teacher logits", "images", progress);
    let mut all = Vec::new();
    for first in (0..n).step_by(LOGITS_BATCH) {
        let count = LOGITS_BATCH.min(n - first);
        let mut shape = vec![count];
        shape.extend_from_slice(&train.sample_shape);
        let images = train.images[first * per..(first + count) * per].to_vec();
        let x = Tensor::from_vec(images, shape, &candle_core::Device::Cpu)?;
        all.extend(teacher.logits(&x)?.flatten_all()?.to_vec1::<f32>()?);
        bar.inc(count as u64);
    }
    bar.finish_and_clear();
    let logits = Arc::new(all);
    *LOGITS.lock().expect("logits cache") = Some((key, logits.clone()));
    Ok(logits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frontend::load_model;
    use std::path::Path;

    /// The engine (the default teacher) and the interpreter (its fallback) give the same logits,
    /// whatever the batch's split into engine sub-batches.
    #[test]
    fn engine_teacher_matches_the_interpreter() {
        let root = env!("CARGO_MANIFEST_DIR");
        let model = load_model(Path::new(&format!("{root}/models/resnet18w16.onnx"))).unwrap();
        let sample = [1, 28, 28];
        let engine = Teacher::new(&model, &sample).unwrap();
        assert!(matches!(engine, Teacher::Engine(_)));
        let graph = Teacher::Graph(Box::new(TrainGraph::new(&model).unwrap()));
        let n = ENGINE_BATCH + 5;
        let xs = crate::kernels::conv::tests::rand_vec(n * 28 * 28, 3);
        let x = Tensor::from_vec(xs, (n, 1, 28, 28), &candle_core::Device::Cpu).unwrap();
        let flat = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (a, b) = (flat(engine.logits(&x).unwrap()), flat(graph.logits(&x).unwrap()));
        assert_eq!(a.len(), n * 10);
        for (i, (u, v)) in a.iter().zip(&b).enumerate() {
            assert!((u - v).abs() <= 1e-4 * (1.0 + v.abs()), "logit {i}: {u} vs {v}");
        }
    }
}

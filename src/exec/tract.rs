//! A compiled tract plan for one graph at a fixed batch size.

use crate::error::CompileError;
use crate::frontend::to_proto;
use crate::ir::Model;
use anyhow::{Context, Result};
use std::sync::Arc;
use tract_onnx::prelude::*;

/// A runnable graph. Plans are immutable and shared, so one `Runner` serves every thread.
#[derive(Clone)]
pub struct Runner {
    plan: Arc<TypedSimplePlan>,
    batch: usize,
    sample: Vec<usize>,
}

impl Runner {
    /// Optimise `model` for inputs of shape `[batch] + sample`. Exporters often bake a batch
    /// of one into shape constants (a Reshape to `[1, 512]`), so when tract refuses `batch` the
    /// graph is prepared for single samples instead; [`Runner::batch`] says which it got.
    pub fn new(model: &Model, sample: &[usize], batch: usize) -> Result<Self> {
        let proto = to_proto(model);
        Self::prepare(&proto, sample, batch).or_else(|e| {
            if batch > 1 {
                Self::prepare(&proto, sample, 1)
            } else {
                Err(e)
            }
        })
    }

    fn prepare(proto: &tract_onnx::pb::ModelProto, sample: &[usize], batch: usize) -> Result<Self> {
        let mut full = vec![batch];
        full.extend_from_slice(sample);
        let plan = crate::error::catch_tract(|| {
            tract_onnx::onnx()
                .parse(proto, None)?
                .model
                .with_input_fact(0, f32::fact(&full).into())?
                .into_optimized()?
                .into_runnable()
        })
        .map_err(|e| {
            CompileError::invalid_model(format!(
                "tract cannot prepare the graph for {full:?}: {e:#}"
            ))
        })?;
        Ok(Runner { plan, batch, sample: sample.to_vec() })
    }

    pub fn batch(&self) -> usize {
        self.batch
    }

    pub fn sample_len(&self) -> usize {
        self.sample.iter().product()
    }

    /// Run up to `batch` samples and return every output, each row-major with the padding's
    /// rows dropped.
    pub fn run_all(&self, input: &[f32]) -> Result<Vec<Vec<f32>>> {
        let per = self.sample_len();
        let n = input.len() / per;
        anyhow::ensure!(n * per == input.len() && n <= self.batch, "bad batch of {n} samples");
        let mut data = input.to_vec();
        data.resize(self.batch * per, 0.0);
        let mut shape = vec![self.batch];
        shape.extend_from_slice(&self.sample);
        let tensor = tract_ndarray::ArrayD::from_shape_vec(shape, data)?.into_tensor();
        let outputs = crate::error::catch_tract(|| self.plan.run(tvec!(tensor.into_tvalue())))
            .map_err(|e| anyhow::anyhow!("tract failed running the graph: {e:#}"))?;
        outputs
            .iter()
            .map(|out| {
                let out = out.cast_to::<f32>()?;
                let all = out.to_plain_array_view::<f32>()?;
                let width = all.len() / self.batch;
                Ok(all.iter().take(n * width).copied().collect())
            })
            .collect()
    }

    /// Run up to `batch` samples and return the first output and its per-sample length.
    pub fn run(&self, input: &[f32]) -> Result<(Vec<f32>, usize)> {
        let n = input.len() / self.sample_len();
        let first = self.run_all(input)?.into_iter().next().context("the graph has no output")?;
        let width = first.len().checked_div(n).unwrap_or(0);
        Ok((first, width))
    }
}

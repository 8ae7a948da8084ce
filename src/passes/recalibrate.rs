//! Training-free recalibration after lossy passes.
//!
//! Culling or thinning a stage removes the rectification its convolutions were trained with,
//! so every later layer sees inputs of the wrong mean and scale; a culled ResNet's logits grow
//! to ~1e3 and accuracy falls to chance. This pass walks the reduced graph in order and, at
//! every Conv and Gemm whose output also exists in the original (prepared) graph, maps each
//! output channel by an affine `a * y + b` so that its mean and standard deviation on the
//! calibration images equal the original's at the same node. Each map is applied before the
//! next layer's statistics are taken (so later layers see already-corrected inputs) and then
//! folded into the node's weight and bias: no node is added.
//!
//! Measured on the shipped ResNet with stages 1,2 culled and bottom-thinned (README): mean and
//! scale matched is the default; matching the mean only is available as `recalibrate(mean)`.

use super::fold_bn::apply_channel_affine;
use super::{Pass, PassContext};
use crate::error::{CompileError, ExitCode};
use crate::ir::{Model, Node};
use crate::train::graph::TrainGraph;
use anyhow::Result;
use candle_core::Tensor;
use rayon::prelude::*;
use std::collections::HashMap;

/// Which statistics are matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Matched {
    MeanAndScale,
    Mean,
    /// Mean and scale; where the ReLU after a layer was removed, those of the rectified value.
    Rectified,
}

pub struct Recalibrate {
    pub matched: Matched,
}

impl Default for Recalibrate {
    fn default() -> Self {
        Recalibrate { matched: Matched::MeanAndScale }
    }
}

impl Recalibrate {
    pub fn from_args(args: &[String]) -> Result<Box<dyn Pass>> {
        let matched = match args {
            [] => Matched::MeanAndScale,
            [a] if a == "mean" => Matched::Mean,
            [a] if a == "scale" => Matched::MeanAndScale,
            [a] if a == "rectified" => Matched::Rectified,
            _ => {
                return Err(CompileError::new(
                    ExitCode::Usage,
                    format!(
                        "recalibrate takes no argument, `mean` or `scale`, got ({})",
                        args.join(",")
                    ),
                )
                .into())
            }
        };
        Ok(Box::new(Recalibrate { matched }))
    }
}

/// Calibration images used at most: the statistics of 1,024 images move by well under 1% of a
/// channel's standard deviation when more are added, and memory grows with the count.
pub const MAX_RECALIBRATION_IMAGES: usize = 1024;

/// A channel whose standard deviation is below this (in the reduced graph) is only shifted:
/// scaling a constant channel up would amplify rounding noise.
const MIN_STD: f64 = 1e-6;

/// Per-channel mean and standard deviation of one value.
#[derive(Debug, Clone)]
pub struct Moments {
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
}

/// Whether a node's output gets matched: the linear layers whose weights can absorb the map.
fn is_matched(node: &Node) -> bool {
    matches!(node.op_type.as_str(), "Conv" | "Gemm")
}

/// Per-channel (axis 1) moments of a `[N, C, ...]` tensor, in a fixed summation order.
pub fn channel_moments(t: &Tensor) -> Result<Moments> {
    let dims = t.dims().to_vec();
    anyhow::ensure!(dims.len() >= 2, "value of rank {} has no channel axis", dims.len());
    let (n, c) = (dims[0], dims[1]);
    let spatial: usize = dims[2..].iter().product();
    let data: Vec<f32> = t.flatten_all()?.to_vec1()?;
    let count = (n * spatial) as f64;
    let (mean, std) = (0..c)
        .into_par_iter()
        .map(|ch| {
            let values = (0..n).flat_map(|i| {
                let start = (i * c + ch) * spatial;
                data[start..start + spatial].iter()
            });
            let (mut sum, mut sq) = (0.0f64, 0.0f64);
            for &v in values {
                sum += v as f64;
                sq += (v as f64) * (v as f64);
            }
            let mean = sum / count;
            (mean, (sq / count - mean * mean).max(0.0).sqrt())
        })
        .unzip();
    Ok(Moments { mean, std })
}

/// Moments of every Conv/Gemm output of `model` on `images` (`[N] + sample`).
pub fn reference_moments(
    model: &Model,
    sample: &[usize],
    images: &[f32],
) -> Result<HashMap<String, Moments>> {
    let graph = TrainGraph::new(model)?;
    let x = batch_tensor(images, sample)?;
    let mut out = HashMap::new();
    graph.forward_observed(&x, |node, y| {
        if is_matched(node) {
            out.insert(node.outputs[0].clone(), channel_moments(y)?);
        } else if node.op_type == "Relu" && y.rank() >= 2 {
            out.insert(rectified_key(&node.inputs[0]), channel_moments(y)?);
        }
        Ok(None)
    })?;
    Ok(out)
}

/// The key under which [`reference_moments`] keeps the moments of `relu(value)`.
fn rectified_key(value: &str) -> String {
    format!("relu({value})")
}

fn batch_tensor(images: &[f32], sample: &[usize]) -> Result<Tensor> {
    let per: usize = sample.iter().product();
    let n = (images.len() / per).min(MAX_RECALIBRATION_IMAGES);
    let mut shape = vec![n];
    shape.extend_from_slice(sample);
    Ok(Tensor::from_vec(images[..n * per].to_vec(), shape, &candle_core::Device::Cpu)?)
}

/// The per-channel map `a * y + b` that gives `current` the moments of `target`.
fn channel_map(current: &Moments, target: &Moments, matched: Matched) -> (Vec<f32>, Vec<f32>) {
    current
        .mean
        .iter()
        .zip(&current.std)
        .zip(target.mean.iter().zip(&target.std))
        .map(|((&m, &s), (&mt, &st))| {
            let a = match matched {
                Matched::MeanAndScale | Matched::Rectified if s > MIN_STD => st / s,
                _ => 1.0,
            };
            (a as f32, (mt - a * m) as f32)
        })
        .unzip()
}

impl Pass for Recalibrate {
    fn name(&self) -> &'static str {
        "recalibrate"
    }
    fn lossless(&self) -> bool {
        false
    }
    fn run(&self, model: &mut Model, ctx: &PassContext) -> Result<usize> {
        let missing = |what: &str| {
            CompileError::new(
                ExitCode::Usage,
                format!(
                    "recalibrate needs {what}; give --data with a training split, or \
                     --no-recalibrate"
                ),
            )
        };
        let images = ctx.calibration.as_deref().ok_or_else(|| missing("calibration images"))?;
        let reference = ctx.reference.as_deref().ok_or_else(|| missing("the original graph"))?;
        let targets = reference.moments(&ctx.sample, images)?;
        let targets = targets.as_ref();
        let graph = TrainGraph::new(model)?;
        let x = batch_tensor(images, &ctx.sample)?;
        // A linear layer whose ReLU was removed feeds its readers directly: they were trained
        // on the rectified value, so that is the one whose moments it takes on.
        let rectified_here: std::collections::HashSet<&str> = model
            .graph
            .nodes
            .iter()
            .filter(|n| n.op_type == "Relu")
            .filter_map(|n| n.input(0))
            .collect();
        let target_of = |value: &str| {
            let culled = !rectified_here.contains(value);
            match targets.get(&rectified_key(value)) {
                Some(t) if culled && self.matched == Matched::Rectified => Some(t),
                _ => targets.get(value),
            }
        };
        let mut maps: Vec<(String, Vec<f32>, Vec<f32>)> = Vec::new();
        graph.forward_observed(&x, |node, y| {
            let Some(target) =
                Some(node).filter(|n| is_matched(n)).and_then(|n| target_of(&n.outputs[0]))
            else {
                return Ok(None);
            };
            let (scale, shift) = channel_map(&channel_moments(y)?, target, self.matched);
            if scale.iter().all(|&a| a == 1.0) && shift.iter().all(|&b| b == 0.0) {
                return Ok(None);
            }
            let mut shape = vec![1; y.rank()];
            shape[1] = scale.len();
            let a = Tensor::from_vec(scale.clone(), shape.clone(), y.device())?;
            let b = Tensor::from_vec(shift.clone(), shape, y.device())?;
            maps.push((node.name.clone(), scale, shift));
            Ok(Some(y.broadcast_mul(&a)?.broadcast_add(&b)?))
        })?;
        let mut rewrites = 0;
        for (name, scale, shift) in maps {
            let Some(l) = model.graph.nodes.iter().position(|n| n.name == name) else { continue };
            if apply_channel_affine(&mut model.graph, l, &scale, &shift, "rc").is_some() {
                rewrites += 1;
            }
        }
        model.graph.remove_unused_initializers();
        Ok(rewrites)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moments_are_per_channel() {
        // Two images, two channels of two pixels: channel 0 holds 1,3,5,7; channel 1 holds 2.
        let t = Tensor::from_vec(
            vec![1f32, 3., 2., 2., 5., 7., 2., 2.],
            (2, 2, 2),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let m = channel_moments(&t).unwrap();
        assert_eq!(m.mean, vec![4.0, 2.0]);
        assert!((m.std[0] - 5f64.sqrt()).abs() < 1e-12);
        assert_eq!(m.std[1], 0.0);
    }

    #[test]
    fn the_map_matches_the_target_moments() {
        let current = Moments { mean: vec![4.0, 2.0], std: vec![2.0, 0.0] };
        let target = Moments { mean: vec![1.0, -1.0], std: vec![0.5, 3.0] };
        let (a, b) = channel_map(&current, &target, Matched::MeanAndScale);
        // Channel 0: 0.25 * y + (1 - 0.25 * 4); channel 1 is constant, so only shifted.
        assert_eq!(a, vec![0.25, 1.0]);
        assert_eq!(b, vec![0.0, -3.0]);
        let (a, b) = channel_map(&current, &target, Matched::Mean);
        assert_eq!(a, vec![1.0, 1.0]);
        assert_eq!(b, vec![-3.0, -3.0]);
    }
}

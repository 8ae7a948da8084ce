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
//! Which statistics are matched was chosen by measurement, on the shipped ResNet with stages 1,2
//! culled and bottom-thinned (93.30% before; 512 calibration images; test accuracy without
//! training): nothing 10.0%, mean and scale of every conv output (`recalibrate(scale)`) 33.0%,
//! mean only (`recalibrate(mean)`) 37.1%, and `recalibrate(rectified)` 37.7%: mean and scale,
//! where a layer's ReLU was removed those of the value its readers were trained on, the
//! rectified one.
//!
//! Matching two moments per channel leaves most of the damage in place. The default,
//! `recalibrate(refit)`, refits every Conv and Gemm's whole weight and bias by ridge least
//! squares so that, given the reduced graph's own input at that node, its output is closest to
//! the original's output there (the rectified output where the ReLU after it was removed, so
//! the linear layer learns the best linear stand-in for the missing ReLU). Same configuration,
//! a PyTorch prototype of both: moments 37.3%, a least-squares per-channel affine 56.5%, the
//! whole-weight refit 88.6%, still with no training, in seconds. Layers it cannot refit
//! (grouped convolutions, shapes that differ from the original's) fall back to `rectified`.
//! A search scores its candidates on calibration images the refit did not see
//! ([`super::fitting_images`]).

use super::{Pass, PassContext};
use crate::error::{CompileError, ExitCode};
use crate::exec::graph::TrainGraph;
use crate::exec::op::conv_params;
use crate::ir::channel_affine::{apply_channel_affine, replace_linear_params};
use crate::ir::{Graph, Model, Node};
use crate::kernels::candle::with_f32;
use crate::kernels::conv::{self, Conv2dParams, ConvGeometry};
use crate::kernels::least_squares::{conv_normal_equations, ridge_solve};
use crate::kernels::stats::{channel_moments, Moments};
use anyhow::Result;
use candle_core::{DType, Tensor};
use half::f16;
use std::collections::{HashMap, HashSet};

/// Which statistics are matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Matched {
    MeanAndScale,
    Mean,
    /// Mean and scale; where the ReLU after a layer was removed, those of the rectified value.
    Rectified,
    /// The whole weight and bias refitted by least squares to the original's output (the
    /// rectified output where the ReLU was removed); `Rectified` where a layer cannot be.
    Refit,
}

pub struct Recalibrate {
    pub matched: Matched,
}

impl Default for Recalibrate {
    fn default() -> Self {
        Recalibrate { matched: Matched::Refit }
    }
}

impl Recalibrate {
    pub fn from_args(args: &[String]) -> Result<Box<dyn Pass>> {
        let matched = match args {
            [] => Matched::Refit,
            [a] if a == "refit" => Matched::Refit,
            [a] if a == "mean" => Matched::Mean,
            [a] if a == "scale" => Matched::MeanAndScale,
            [a] if a == "rectified" => Matched::Rectified,
            _ => {
                return Err(CompileError::new(
                    ExitCode::Usage,
                    format!(
                        "recalibrate takes no argument, `refit`, `rectified`, `scale` or `mean`, \
                         got ({})",
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

/// Calibration images the refit uses at most: it keeps the original's output at every refitted
/// layer for each of them (0.48 MB an image for the shipped ResNet, 0.33 MB for the VGG, by
/// ONNX shape inference). The prototype measured
/// 88.6% with 1,024 images and 87.7% with 512.
pub const MAX_REFIT_IMAGES: usize = 512;

/// Ridge strength of the refit, relative to the mean diagonal of its normal equations; it pulls
/// the weights towards their trained values where the calibration data says little. Measured
/// in the prototype: 1e-3 88.3%, 1e-2 88.1%.
const REFIT_RIDGE: f64 = 1e-3;

/// A channel whose standard deviation is below this (in the reduced graph) is only shifted:
/// scaling a constant channel up would amplify rounding noise.
const MIN_STD: f64 = 1e-6;

/// Whether a node's output gets matched: the linear layers whose weights can absorb the map.
fn is_matched(node: &Node) -> bool {
    matches!(node.op_type.as_str(), "Conv" | "Gemm")
}

/// Moments of every Conv/Gemm output of `model` on `images` (`[N] + sample`).
pub fn reference_moments(
    model: &Model,
    sample: &[usize],
    images: &[f32],
) -> Result<HashMap<String, Moments>> {
    let graph = TrainGraph::new(model)?;
    let x = batch_tensor(images, sample, MAX_RECALIBRATION_IMAGES)?;
    let mut out = HashMap::new();
    graph.forward_observed(&x, |node, _, y| {
        if is_matched(node) {
            out.insert(node.outputs[0].clone(), channel_moments(y)?);
        } else if node.op_type == "Relu" && y.rank() >= 2 {
            out.insert(rectified_key(&node.inputs[0]), channel_moments(y)?);
        }
        Ok(None)
    })?;
    Ok(out)
}

/// The original graph's outputs at every Conv/Gemm on the refit's images, and which of those
/// values a ReLU reads. Outputs are kept in half precision ([`stored`]): they are most of a
/// full-width refit's memory (983 MB in f32 for the ResNet-18 at base width 64 on 512 images).
pub struct Activations {
    pub outputs: HashMap<String, Tensor>,
    pub rectified: HashSet<String>,
}

/// [`Activations`] of `model` on at most [`MAX_REFIT_IMAGES`] of `images`.
pub fn reference_activations(
    model: &Model,
    sample: &[usize],
    images: &[f32],
) -> Result<Activations> {
    let graph = TrainGraph::new(model)?;
    let x = batch_tensor(images, sample, MAX_REFIT_IMAGES)?;
    let mut outputs = HashMap::new();
    graph.forward_observed(&x, |node, _, y| {
        if is_matched(node) {
            outputs.insert(node.outputs[0].clone(), stored(y)?);
        }
        Ok(None)
    })?;
    let rectified = model
        .graph
        .nodes
        .iter()
        .filter(|n| n.op_type == "Relu")
        .filter_map(|n| n.input(0).map(str::to_string))
        .collect();
    Ok(Activations { outputs, rectified })
}

/// Largest magnitude a reference output may have to be kept in half precision (f16 holds up
/// to 65,504); larger or non-finite outputs stay f32.
const MAX_HALF: f32 = 60_000.0;

/// `y` as the refit keeps it: f16 when every value fits. Rounding to f16 moves each target by
/// at most 2^-11 of itself, far below what the least-squares fit leaves (on the shipped ResNet,
/// cull 1,2 + thin bottom: the refit's accuracy with f16 targets is within one test image of
/// f32's; see `tests/integration/lossy.rs`' goldens).
fn stored(y: &Tensor) -> Result<Tensor> {
    let fits = with_f32(y, |v| v.iter().all(|x| x.abs() <= MAX_HALF))?;
    Ok(if fits { y.to_dtype(DType::F16)? } else { y.clone() })
}

/// A reference output as f32 (the refit's normal equations read f32).
fn as_f32(t: &Tensor) -> Result<Tensor> {
    Ok(if t.dtype() == DType::F32 { t.clone() } else { t.to_dtype(DType::F32)? })
}

/// The key under which [`reference_moments`] keeps the moments of `relu(value)`.
fn rectified_key(value: &str) -> String {
    format!("relu({value})")
}

fn batch_tensor(images: &[f32], sample: &[usize], max: usize) -> Result<Tensor> {
    let per: usize = sample.iter().product();
    let n = (images.len() / per).min(max);
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
                Matched::MeanAndScale | Matched::Rectified | Matched::Refit if s > MIN_STD => {
                    st / s
                }
                _ => 1.0,
            };
            (a as f32, (mt - a * m) as f32)
        })
        .unzip()
}

impl Pass for Recalibrate {
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
        // The moments are the refit's fallback only: taken when a layer first needs them.
        let moments = std::cell::OnceCell::new();
        let refit_targets = match self.matched {
            Matched::Refit => Some(reference.activations(&ctx.sample, images)?),
            _ => None,
        };
        let graph = TrainGraph::new(model)?;
        let max_images = match self.matched {
            Matched::Refit => MAX_REFIT_IMAGES,
            _ => MAX_RECALIBRATION_IMAGES,
        };
        let x = batch_tensor(images, &ctx.sample, max_images)?;
        // A linear layer whose ReLU was removed feeds its readers directly: they were trained
        // on the rectified value, so that is the one whose moments it takes on.
        let rectified_here: HashSet<&str> = model
            .graph
            .nodes
            .iter()
            .filter(|n| n.op_type == "Relu")
            .filter_map(|n| n.input(0))
            .collect();
        let target_of = |value: &str| -> Result<Option<Moments>> {
            let targets = match moments.get() {
                Some(t) => t,
                None => {
                    let _ = moments.set(reference.moments(&ctx.sample, images)?);
                    moments.get().expect("just set")
                }
            };
            let culled = !rectified_here.contains(value);
            let rectified = matches!(self.matched, Matched::Rectified | Matched::Refit);
            Ok(match targets.get(&rectified_key(value)) {
                Some(t) if culled && rectified => Some(t.clone()),
                _ => targets.get(value).cloned(),
            })
        };
        let mut rewrites: Vec<(String, Rewrite)> = Vec::new();
        graph.forward_observed(&x, |node, input, y| {
            if !is_matched(node) {
                return Ok(None);
            }
            let value = node.outputs[0].as_str();
            if let (Some(acts), Some(input)) = (refit_targets.as_deref(), input) {
                if let Some(original) = acts.outputs.get(value) {
                    // The target is relu(original) where this graph lost the ReLU after it.
                    let culled = acts.rectified.contains(value) && !rectified_here.contains(value);
                    if original.dims() == y.dims() {
                        if same_values(original, culled, y)? {
                            return Ok(None); // untouched so far: nothing to refit
                        }
                        let original = as_f32(original)?;
                        let fitted = refit(&model.graph, node, input, &original, culled)?;
                        if let Some((w, b, refitted)) = fitted {
                            rewrites.push((node.name.clone(), Rewrite::Weights(w, b)));
                            return Ok(Some(refitted));
                        }
                    }
                }
            }
            let Some(target) = target_of(value)? else { return Ok(None) };
            let (scale, shift) = channel_map(&channel_moments(y)?, &target, self.matched);
            if scale.iter().all(|&a| a == 1.0) && shift.iter().all(|&b| b == 0.0) {
                return Ok(None);
            }
            let mut shape = vec![1; y.rank()];
            shape[1] = scale.len();
            let a = Tensor::from_vec(scale.clone(), shape.clone(), y.device())?;
            let b = Tensor::from_vec(shift.clone(), shape, y.device())?;
            rewrites.push((node.name.clone(), Rewrite::Affine(scale, shift)));
            Ok(Some(y.broadcast_mul(&a)?.broadcast_add(&b)?))
        })?;
        let mut count = 0;
        for (name, rewrite) in rewrites {
            let Some(l) = model.graph.nodes.iter().position(|n| n.name == name) else { continue };
            let done = match rewrite {
                Rewrite::Affine(scale, shift) => {
                    apply_channel_affine(&mut model.graph, l, &scale, &shift, "rc")
                }
                Rewrite::Weights(w, b) => replace_linear_params(&mut model.graph, l, &w, &b, "rf"),
            };
            count += done.is_some() as usize;
        }
        model.graph.remove_unused_initializers();
        Ok(count)
    }
}

/// What recalibration does to one layer.
enum Rewrite {
    /// `a * y + b` per output channel.
    Affine(Vec<f32>, Vec<f32>),
    /// A new weight (in the node's layout) and bias.
    Weights(Vec<f32>, Vec<f32>),
}

/// A refitted node's weight (in its own layout), bias and output on the fitting images.
type Refitted = (Vec<f32>, Vec<f32>, Tensor);

/// Refit the Conv or Gemm `node` of `graph` by ridge least squares so that its output on `x` is
/// closest to `target` (`relu(target)` when `rectify`): its new weight (in the node's own
/// layout), bias and output. `None` where the node's form is not handled (grouped
/// convolutions, a transposed or scaled Gemm input, a weight that is not a constant) or the
/// system is degenerate.
fn refit(
    graph: &Graph,
    node: &Node,
    x: &Tensor,
    target: &Tensor,
    rectify: bool,
) -> Result<Option<Refitted>> {
    let Some(weight) = node.input(1).and_then(|w| graph.constant(w)) else { return Ok(None) };
    let w = weight.to_f32();
    let bias = match node.input(2).filter(|b| !b.is_empty()) {
        Some(b) => match graph.constant(b) {
            Some(t) => Some(t.to_f32()),
            None => return Ok(None),
        },
        None => None,
    };
    let n = x.dims()[0];
    let weight_in_by_out = node.attr_int("transB").unwrap_or(0) == 0;
    // Both layers as a convolution with weight `[O, K]` (a Gemm is a 1x1 convolution).
    let (g, w_ok, bias_factor) = match node.op_type.as_str() {
        "Conv" => {
            let p = conv_params(node)?;
            if p.groups != 1 || x.rank() != 4 || weight.dims.len() != 4 {
                return Ok(None);
            }
            let g = ConvGeometry::new(x.dims(), &weight.dims, p).map_err(anyhow::Error::msg)?;
            (g, w.clone(), 1.0)
        }
        "Gemm" => {
            if node.attr_int("transA").unwrap_or(0) != 0
                || node.attr_float("alpha").unwrap_or(1.0) != 1.0
                || weight.dims.len() != 2
                || x.rank() != 2
            {
                return Ok(None);
            }
            let (rows, cols) = (weight.dims[0], weight.dims[1]);
            let (o, k) = if weight_in_by_out { (cols, rows) } else { (rows, cols) };
            let w_ok = if weight_in_by_out { transpose(&w, rows, cols) } else { w.clone() };
            let g = ConvGeometry::new(&[n, k, 1, 1], &[o, k, 1, 1], Conv2dParams::default())
                .map_err(anyhow::Error::msg)?;
            (g, w_ok, node.attr_float("beta").unwrap_or(1.0))
        }
        _ => return Ok(None),
    };
    let (o, k) = (g.o, g.k());
    let bias: Vec<f32> = match bias {
        Some(b) if b.len() == o => b.iter().map(|v| v * bias_factor).collect(),
        Some(b) if b.len() == 1 => vec![b[0] * bias_factor; o],
        Some(_) => return Ok(None),
        None => vec![0.0; o],
    };
    let eq = with_f32(x, |xs| with_f32(target, |ts| conv_normal_equations(xs, ts, &g, rectify)))??;
    let mut w0 = vec![0f64; (k + 1) * o];
    for c in 0..o {
        for j in 0..k {
            w0[j * o + c] = w_ok[c * k + j] as f64;
        }
        w0[k * o + c] = bias[c] as f64;
    }
    let Some(fit) = ridge_solve(eq, &w0, REFIT_RIDGE) else { return Ok(None) };
    let mut w_new = vec![0f32; o * k];
    for c in 0..o {
        for j in 0..k {
            w_new[c * k + j] = fit[j * o + c] as f32;
        }
    }
    let b_new: Vec<f32> = (0..o).map(|c| fit[k * o + c] as f32).collect();
    let y = with_f32(x, |xs| conv::forward(xs, &w_new, Some(&b_new), &g))?;
    let y = Tensor::from_vec(y, target.dims(), target.device())?;
    let w_layout = match node.op_type.as_str() {
        "Gemm" if weight_in_by_out => transpose(&w_new, o, k),
        _ => w_new,
    };
    Ok(Some((w_layout, b_new, y)))
}

/// Whether `b` equals `a` (`relu(a)` when `rectify`), element for element, at `a`'s precision
/// (`b` rounded to f16 where `a` was [`stored`] so).
fn same_values(a: &Tensor, rectify: bool, b: &Tensor) -> Result<bool> {
    if a.dims() != b.dims() {
        return Ok(false);
    }
    let same = |x: f32, y: f32| (if rectify { x.max(0.0) } else { x }) == y;
    if a.dtype() == DType::F16 {
        let (a, b) = (a.flatten_all()?.to_vec1::<f16>()?, b.flatten_all()?);
        return Ok(with_f32(&b, |b| {
            a.iter().zip(b).all(|(x, y)| same(x.to_f32(), f16::from_f32(*y).to_f32()))
        })?);
    }
    Ok(with_f32(a, |a| with_f32(b, |b| a.iter().zip(b).all(|(&x, &y)| same(x, y))))??)
}

/// The transpose of a row-major `rows x cols` matrix.
fn transpose(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    (0..cols).flat_map(|c| (0..rows).map(move |r| m[r * cols + c])).collect()
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

    #[test]
    fn targets_are_kept_in_half_precision_where_they_fit() {
        let cpu = &candle_core::Device::Cpu;
        let y = Tensor::from_vec(vec![1.0f32, -2.5, 0.1, 3.0e4], (1, 4), cpu).unwrap();
        let kept = stored(&y).unwrap();
        assert_eq!(kept.dtype(), DType::F16);
        // Within f16's rounding of each value.
        let back = as_f32(&kept).unwrap().to_vec2::<f32>().unwrap();
        for (b, v) in back[0].iter().zip([1.0f32, -2.5, 0.1, 3.0e4]) {
            assert!((b - v).abs() <= v.abs() / 2048.0, "{b} vs {v}");
        }
        // The unchanged output counts as the same, rectified or not; a change above f16's
        // rounding does not.
        assert!(same_values(&kept, false, &y).unwrap());
        let relu_y = y.relu().unwrap();
        assert!(same_values(&kept, true, &relu_y).unwrap());
        assert!(!same_values(&kept, false, &relu_y).unwrap());
        let moved = Tensor::from_vec(vec![1.0f32, -2.5, 0.1, 3.01e4], (1, 4), cpu).unwrap();
        assert!(!same_values(&kept, false, &moved).unwrap());
        // Too large for f16: kept as it is.
        let big = Tensor::from_vec(vec![1.0f32, 7.0e4], (1, 2), cpu).unwrap();
        assert_eq!(stored(&big).unwrap().dtype(), DType::F32);
        let inf = Tensor::from_vec(vec![f32::INFINITY, 0.0], (1, 2), cpu).unwrap();
        assert_eq!(stored(&inf).unwrap().dtype(), DType::F32);
    }
}

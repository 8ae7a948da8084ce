//! ReLU masks as graph values: which ReLUs one mask unit decides, and the masked ReLU itself
//! (`a * relu(x) + (1 - a) * x`), which the differentiable graph runs in place of a Relu
//! that carries a mask. Learning the masks is `train::masks`.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

/// What one mask value decides: a channel's ReLUs or a single ReLU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Granularity {
    /// One mask per channel: the kept channels' ReLUs run on a dense `[N, K, H, W]` slice.
    #[default]
    Channel,
    /// One mask per element of an image's activation (SNL's pixel masks): the kept positions
    /// run as one dense `[N, K]` ReLU.
    Pixel,
}

impl Granularity {
    pub const ALL: [Granularity; 2] = [Granularity::Channel, Granularity::Pixel];

    /// The word a user writes (`--granularity pixel`) and reports print.
    pub fn word(self) -> &'static str {
        match self {
            Granularity::Channel => "channel",
            Granularity::Pixel => "pixel",
        }
    }
}

impl std::fmt::Display for Granularity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.word())
    }
}

impl std::str::FromStr for Granularity {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Granularity::ALL
            .into_iter()
            .find(|g| g.word() == s)
            .ok_or_else(|| format!("granularity '{s}' is not one of: channel, pixel"))
    }
}

/// A Relu that carries a mask: its node, its input value (`dims`: one image's, `[C, ...]`),
/// and how its ReLUs are grouped into mask units.
#[derive(Debug, Clone)]
pub struct MaskSite {
    pub relu: String,
    pub input: String,
    pub dims: Vec<usize>,
    pub granularity: Granularity,
}

impl MaskSite {
    pub fn new(relu: &str, input: &str, dims: &[usize], granularity: Granularity) -> Self {
        MaskSite { relu: relu.into(), input: input.into(), dims: dims.to_vec(), granularity }
    }

    /// Mask units: channels, or elements of one image's activation.
    pub fn units(&self) -> usize {
        self.mask_dims().iter().product()
    }

    /// The ReLUs one unit decides per image.
    pub fn relus_per_unit(&self) -> usize {
        self.dims.iter().product::<usize>() / self.units().max(1)
    }

    /// The shape of the mask variable: `[C]`, or one image's `[C, H, W]`.
    pub fn mask_dims(&self) -> Vec<usize> {
        match self.granularity {
            Granularity::Channel => vec![self.dims[0]],
            Granularity::Pixel => self.dims.clone(),
        }
    }
}

/// `a * relu(x) + (1 - a) * x`, written `x + a * relu(-x)`, with `a` of shape `[C]` (per
/// channel, axis 1 of `x`) or of one image's shape (per element).
pub fn masked_relu(x: &Tensor, a: &Tensor) -> candle_core::Result<Tensor> {
    let mut shape = vec![1; x.rank()];
    shape[1..=a.rank()].copy_from_slice(a.dims());
    x + x.neg()?.relu()?.broadcast_mul(&a.reshape(shape)?)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    #[test]
    fn masked_relu_interpolates_between_identity_and_relu() {
        let dev = candle_core::Device::Cpu;
        let x = Tensor::new(&[[[[-2.0f32, 3.0]], [[-1.0, 0.5]]]], &dev).unwrap(); // [1,2,1,2]
        let a = Tensor::new(&[1.0f32, 0.25], &dev).unwrap();
        let y: Vec<f32> = masked_relu(&x, &a).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        // Channel 0 is a ReLU; channel 1 is 0.25 * relu(x) + 0.75 * x.
        assert_eq!(y, vec![0.0, 3.0, -0.75, 0.5]);
        // A mask per element, of one image's shape [2, 1, 2].
        let a = Tensor::new(&[[[0.0f32, 1.0]], [[1.0, 0.5]]], &dev).unwrap();
        let y: Vec<f32> = masked_relu(&x, &a).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(y, vec![-2.0, 3.0, 0.0, 0.5]);
    }

    #[test]
    fn mask_and_input_gradients_match_finite_differences() {
        let dev = candle_core::Device::Cpu;
        // Values away from 0, where relu is differentiable; a weighted sum as the loss.
        let xs: Vec<f32> = (0..12)
            .map(|i| [-1.3f32, 0.7, -0.4, 2.1, 0.9, -2.2][i % 6] * (1.0 + i as f32 / 10.0))
            .collect();
        let r: Vec<f32> = (0..12).map(|i| 0.3 + 0.1 * i as f32).collect();
        let a0 = [0.8f32, 0.3, 0.55];
        let loss = |x: &[f32], a: &[f32]| -> f64 {
            let x = Tensor::from_slice(x, (1, 3, 2, 2), &dev).unwrap();
            let a = Tensor::from_slice(a, 3, &dev).unwrap();
            let y: Vec<f32> =
                masked_relu(&x, &a).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            y.iter().zip(&r).map(|(y, r)| (y * r) as f64).sum()
        };
        let x = Var::from_slice(&xs, (1, 3, 2, 2), &dev).unwrap();
        let a = Var::from_slice(&a0, 3, &dev).unwrap();
        let rt = Tensor::from_slice(&r, (1, 3, 2, 2), &dev).unwrap();
        let l =
            (masked_relu(x.as_tensor(), a.as_tensor()).unwrap() * rt).unwrap().sum_all().unwrap();
        let g = l.backward().unwrap();
        let ga: Vec<f32> = g.get(&a).unwrap().to_vec1().unwrap();
        let gx: Vec<f32> = g.get(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        // Central differences of `loss` along each coordinate of `at`, against `grad`.
        let check = |what: &str, at: &[f32], grad: &[f32], loss: &dyn Fn(&[f32]) -> f64| {
            let h = 1e-3f32;
            for i in 0..at.len() {
                let (mut up, mut down) = (at.to_vec(), at.to_vec());
                up[i] += h;
                down[i] -= h;
                let fd = (loss(&up) - loss(&down)) / (2.0 * h as f64);
                let g = grad[i] as f64;
                assert!((fd - g).abs() < 1e-3 * (1.0 + fd.abs()), "{what}[{i}]: {fd} vs {g}");
            }
        };
        check("a", &a0, &ga, &|a| loss(&xs, a));
        check("x", &xs, &gx, &|x| loss(x, &a0));
    }
}

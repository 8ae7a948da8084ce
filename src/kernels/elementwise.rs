//! Element-wise kernels of the inference engine and the fused conv epilogue, compiled for AVX2
//! where the CPU has it ([`built_for`]).

use super::candle::cpu_slice;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

built_for! {
    ["avx2"]
    /// `v = max(v, 0)`; NaN stays NaN, as ONNX's Relu has it.
    pub fn relu_in_place(v: &mut [f32]) {
        for x in v.iter_mut() {
            *x = if *x < 0.0 { 0.0 } else { *x };
        }
    }
}

built_for! {
    ["avx2"]
    /// `dst += src`, then a ReLU when `relu`.
    pub fn add_in_place(dst: &mut [f32], src: &[f32], relu: bool) {
        assert_eq!(dst.len(), src.len(), "add of unequal lengths");
        if relu {
            for (x, y) in dst.iter_mut().zip(src) {
                let s = *x + *y;
                *x = if s < 0.0 { 0.0 } else { s };
            }
        } else {
            for (x, y) in dst.iter_mut().zip(src) {
                *x += *y;
            }
        }
    }
}

built_for! {
    ["avx2"]
    /// `v = v * scale + shift`, then a ReLU when `relu`.
    pub fn affine_in_place(v: &mut [f32], scale: f32, shift: f32, relu: bool) {
        for x in v.iter_mut() {
            let s = *x * scale + shift;
            *x = if relu && s < 0.0 { 0.0 } else { s };
        }
    }
}

/// Floats one parallel task of [`relu`] takes: about 64 KiB, far above rayon's per-task cost.
const TASK_FLOATS: usize = 1 << 14;

/// ReLU as a candle op, differentiable, on all cores. candle's own ran serially and its
/// backward took five passes over the tensor (a zero tensor, a comparison, a conversion, a
/// product, and the product added to another zero tensor); this one takes one each way.
pub fn relu(x: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(ReluOp)
}

struct ReluOp;

impl CustomOp1 for ReluOp {
    fn name(&self) -> &'static str {
        "relu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let mut y = cpu_slice(s, l)?.to_vec();
        y.par_chunks_mut(TASK_FLOATS).for_each(relu_in_place);
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    /// `dx = dy` where the output is positive (where the input was), else 0.
    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let dy = dy.contiguous()?;
        let dx = {
            let (ys, yl) = y.storage_and_layout();
            let (gs, gl) = dy.storage_and_layout();
            let (Storage::Cpu(ys), Storage::Cpu(gs)) = (&*ys, &*gs) else {
                candle_core::bail!("relu: only the CPU is supported");
            };
            let (ys, gs) = (cpu_slice(ys, yl)?, cpu_slice(gs, gl)?);
            let mut dx = gs.to_vec();
            dx.par_chunks_mut(TASK_FLOATS).zip(ys.par_chunks(TASK_FLOATS)).for_each(|(d, y)| {
                relu_mask(d, y);
            });
            dx
        };
        Ok(Some(Tensor::from_vec(dx, y.shape(), y.device())?))
    }
}

built_for! {
    ["avx2"]
    /// `d = 0` where `y <= 0`.
    fn relu_mask(d: &mut [f32], y: &[f32]) {
        for (d, y) in d.iter_mut().zip(y) {
            *d = if *y > 0.0 { *d } else { 0.0 };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relu_op_matches_candle_forward_and_backward_away_from_zero() {
        let dev = candle_core::Device::Cpu;
        // Large enough for several parallel tasks; no exact zeros, where the two differ
        // (candle passes the gradient at 0, this op and PyTorch do not).
        let xs: Vec<f32> =
            (0..40_001).map(|i| ((i * 7919) % 2001) as f32 / 100.0 - 10.005).collect();
        let r: Vec<f32> = (0..xs.len()).map(|i| (i % 13) as f32 - 6.0).collect();
        let rt = Tensor::from_slice(&r, (1, xs.len()), &dev).unwrap();
        let run = |ours: bool| {
            let x = candle_core::Var::from_slice(&xs, (1, xs.len()), &dev).unwrap();
            let y = if ours { relu(x.as_tensor()) } else { x.as_tensor().relu() }.unwrap();
            let g = (&y * &rt).unwrap().sum_all().unwrap().backward().unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (flat(&y), flat(g.get(&x).unwrap()))
        };
        let (ours, theirs) = (run(true), run(false));
        assert_eq!(ours, theirs);
        assert!(ours.1.contains(&0.0) && ours.1.iter().any(|&g| g != 0.0));
    }

    #[test]
    fn kernels_match_scalar_reference() {
        let x: Vec<f32> =
            (0..1037).map(|i| ((i * 7919) % 201) as f32 / 10.0 - 10.0).chain([f32::NAN]).collect();
        let y: Vec<f32> = x.iter().rev().map(|v| v * 0.5 + 1.0).collect();
        let mut r = x.clone();
        relu_in_place(&mut r);
        for (a, b) in r.iter().zip(&x) {
            let want = if *b < 0.0 { 0.0 } else { *b };
            assert!(a == &want || (a.is_nan() && b.is_nan()));
        }
        for relu in [false, true] {
            let mut s = x.clone();
            add_in_place(&mut s, &y, relu);
            let mut t = x.clone();
            affine_in_place(&mut t, 1.5, -0.25, relu);
            for i in 0..x.len() {
                let (sum, aff) = (x[i] + y[i], x[i] * 1.5 - 0.25);
                let want = |v: f32| if relu && v < 0.0 { 0.0 } else { v };
                assert!(s[i] == want(sum) || (s[i].is_nan() && sum.is_nan()));
                assert!(t[i] == want(aff) || (t[i].is_nan() && aff.is_nan()));
            }
        }
    }
}

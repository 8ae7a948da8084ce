//! Element-wise kernels of the inference engine and the fused conv epilogue, compiled for AVX2
//! where the CPU has it: the release build targets baseline x86-64, whose SSE2 loops left the
//! engine's ReLU and Add at a quarter of the time of its gemms (perf, shipped ResNet).

/// Run `$body` (safe code) compiled with AVX2 enabled when the CPU has it, else as is.
macro_rules! with_avx2 {
    ($name:ident ( $($arg:ident : $ty:ty),* ) $body:block) => {{
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            #[target_feature(enable = "avx2")]
            unsafe fn $name($($arg: $ty),*) $body
            // SAFETY: the CPU supports AVX2, as just checked; the body is safe code.
            return unsafe { $name($($arg),*) };
        }
        $body
    }};
}

/// `v = max(v, 0)`; NaN stays NaN, as ONNX's Relu has it.
pub fn relu_in_place(v: &mut [f32]) {
    with_avx2!(relu(v: &mut [f32]) {
        for x in v.iter_mut() {
            *x = if *x < 0.0 { 0.0 } else { *x };
        }
    })
}

/// `dst += src`, then a ReLU when `relu`.
pub fn add_in_place(dst: &mut [f32], src: &[f32], relu: bool) {
    assert_eq!(dst.len(), src.len(), "add of unequal lengths");
    with_avx2!(add(dst: &mut [f32], src: &[f32], relu: bool) {
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
    })
}

/// `v = v * scale + shift`, then a ReLU when `relu`.
pub fn affine_in_place(v: &mut [f32], scale: f32, shift: f32, relu: bool) {
    with_avx2!(affine(v: &mut [f32], scale: f32, shift: f32, relu: bool) {
        for x in v.iter_mut() {
            let s = *x * scale + shift;
            *x = if relu && s < 0.0 { 0.0 } else { s };
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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

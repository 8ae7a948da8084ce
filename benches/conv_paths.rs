//! Per-layer forward timings of the three convolution paths (Winograd F(2x2, 3x3), the direct
//! AVX-512 kernel, im2col + gemm) on the 3x3 stride-1 layers of the ResNet-18 at base widths
//! 16, 32 and 64, 32 images each: the measurement behind the Winograd channel thresholds
//! (`MIN_CHANNELS`, `MIN_GEMM_CHANNELS`) in `src/kernels/conv/winograd.rs`. One core gives
//! steadier figures:
//! `RAYON_NUM_THREADS=1 cargo bench --bench conv_paths`.

use relucompile::data::random_inputs;
use relucompile::kernels::conv::{forward_via, Conv2dParams, ConvGeometry, ConvPath};
use std::time::Instant;

const IMAGES: usize = 32;
const REPS: usize = 20;

fn main() {
    println!("layer (C x O @ side)  path       us/batch  GFLOP/s (direct-equivalent)");
    let widths = [16, 32, 64];
    let layers = widths.iter().flat_map(|&w| [(w, 28), (2 * w, 14), (4 * w, 7), (8 * w, 4)]);
    let mut seen = vec![];
    for (c, side) in layers {
        if seen.contains(&(c, side)) {
            continue;
        }
        seen.push((c, side));
        let o = c;
        let p = Conv2dParams { pads: [1; 4], ..Conv2dParams::default() };
        let g = ConvGeometry::new(&[IMAGES, c, side, side], &[o, c, 3, 3], p).expect("geometry");
        let x = random_inputs(IMAGES * c * side * side, 1);
        let w = random_inputs(o * c * 9, 2);
        for path in [ConvPath::Winograd, ConvPath::Direct, ConvPath::Im2col] {
            if forward_via(path, &x, &w, None, &g, true).is_none() {
                println!("{c:>4} x {o:<4} @ {side:<3}      {path:?}: not available on this CPU");
                continue;
            }
            let t = Instant::now();
            for _ in 0..REPS {
                std::hint::black_box(forward_via(path, &x, &w, None, &g, true));
            }
            let s = t.elapsed().as_secs_f64() / REPS as f64;
            let flops = 2.0 * (IMAGES * o * c * 9 * g.oh * g.ow) as f64;
            println!(
                "{c:>4} x {o:<4} @ {side:<3}      {:<9} {:>9.1} {:>8.1}",
                format!("{path:?}"),
                s * 1e6,
                flops / s / 1e9
            );
        }
    }
}

//! The fine-tuner's convolution (`train::conv`, im2col + gemm): the forward against a naive
//! direct convolution, and the input, weight and bias gradients against finite differences and
//! against candle's own `conv2d` autodiff, over strides, paddings, kernels, dilations, groups
//! and bias; the weight gradient's bytes do not depend on the thread count.

use candle_core::{Device, Tensor, Var};
use relucompile::kernels::conv::{
    backward, conv2d, forward, Conv2dParams, ConvGeometry, ConvGrads,
};

/// A deterministic pseudo-random vector in [-1, 1).
fn rand_vec(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

struct Case {
    x_dims: [usize; 4],
    w_dims: [usize; 4],
    p: Conv2dParams,
    bias: bool,
}

impl Case {
    fn geometry(&self) -> ConvGeometry {
        ConvGeometry::new(&self.x_dims, &self.w_dims, self.p).unwrap()
    }
}

/// Every combination of stride 1/2, padding 0/1, 1x1 and 3x3 kernels, dilation 1/2, groups
/// 1/2/depthwise (and 3 groups of one input channel each), with and without bias, on two 7x6
/// images.
fn cases() -> Vec<Case> {
    cases_on(2, 7, 6)
}

/// The same on a batch of 11 small images, which the convolution puts several to a gemm (side
/// by side in its columns) and several to a chunk.
fn batched_cases() -> Vec<Case> {
    cases_on(11, 5, 5).into_iter().filter(|c| c.bias == (c.p.stride.0 == 1)).collect()
}

/// Planes wide enough for the direct kernel (forward and stride-1 input gradient, on CPUs
/// with AVX-512), 1 and 2 groups.
fn wide_cases() -> Vec<Case> {
    cases_on(2, 12, 13)
        .into_iter()
        .filter(|c| c.p.groups <= 2 && c.bias == (c.p.dilation.0 == 1))
        .collect()
}

/// 3x3 stride-1 convolutions that run Winograd F(2x2, 3x3) forward and for both gradients (32
/// or more channels; 16 or more with AVX-512), and 16 channels on AVX2, for the weight
/// gradient alone: odd and even planes, several small images to a product, pads 0 and 1.
/// Square planes, for candle's reference.
fn winograd_cases() -> Vec<Case> {
    let mut out = vec![];
    for (n, hw) in [(3, 9), (9, 4)] {
        // (16, 12): everything with AVX-512, else the weight gradient alone (8 or more
        // channels each way).
        for (c, o) in [(32, 40), (48, 32), (16, 12)] {
            for pad in [0, 1] {
                let p = Conv2dParams { pads: [pad; 4], ..Conv2dParams::default() };
                let bias = pad == 1;
                out.push(Case { x_dims: [n, c, hw, hw], w_dims: [o, c, 3, 3], p, bias });
            }
        }
    }
    out
}

fn cases_on(n: usize, h: usize, w: usize) -> Vec<Case> {
    let mut out = vec![];
    for stride in [1, 2] {
        for pad in [0, 1] {
            for k in [1, 3] {
                for dilation in [1, 2] {
                    for (c, o, groups) in [(4, 6, 1), (4, 6, 2), (4, 4, 4), (3, 6, 3)] {
                        for bias in [false, true] {
                            let p = Conv2dParams {
                                stride: (stride, stride),
                                dilation: (dilation, dilation),
                                pads: [pad; 4],
                                groups,
                            };
                            out.push(Case {
                                x_dims: [n, c, h, w],
                                w_dims: [o, c / groups, k, k],
                                p,
                                bias,
                            });
                        }
                    }
                }
            }
        }
    }
    out
}

/// Asymmetric pads and unequal strides and dilations, which candle's conv2d cannot express.
fn onnx_only_cases() -> Vec<Case> {
    let mut out = vec![];
    for (pads, stride, dilation) in [
        ([0, 1, 1, 0], (1, 1), (1, 1)),
        ([2, 0, 1, 3], (2, 1), (1, 2)),
        ([1, 2, 0, 1], (1, 2), (2, 1)),
    ] {
        for (c, o, groups) in [(4, 6, 1), (4, 4, 4)] {
            let p = Conv2dParams { stride, dilation, pads, groups };
            out.push(Case { x_dims: [3, c, 6, 7], w_dims: [o, c / groups, 3, 2], p, bias: true });
        }
    }
    out
}

/// Direct convolution in f64, straight from the definition.
fn naive(x: &[f32], w: &[f32], b: Option<&[f32]>, g: &ConvGeometry) -> Vec<f64> {
    let (cg, og) = (g.cg(), g.og());
    let mut y = vec![0f64; g.n * g.o * g.oh * g.ow];
    for n in 0..g.n {
        for o in 0..g.o {
            let grp = o / og;
            for oy in 0..g.oh {
                for ox in 0..g.ow {
                    let mut acc = b.map_or(0.0, |b| b[o] as f64);
                    for c in 0..cg {
                        for ki in 0..g.kh {
                            for kj in 0..g.kw {
                                let iy = (oy * g.p.stride.0 + ki * g.p.dilation.0) as isize
                                    - g.p.pads[0] as isize;
                                let ix = (ox * g.p.stride.1 + kj * g.p.dilation.1) as isize
                                    - g.p.pads[1] as isize;
                                if iy < 0 || ix < 0 || iy >= g.h as isize || ix >= g.w as isize {
                                    continue;
                                }
                                let xv = x[((n * g.c + grp * cg + c) * g.h + iy as usize) * g.w
                                    + ix as usize];
                                let wv = w[((o * cg + c) * g.kh + ki) * g.kw + kj];
                                acc += xv as f64 * wv as f64;
                            }
                        }
                    }
                    y[((n * g.o + o) * g.oh + oy) * g.ow + ox] = acc;
                }
            }
        }
    }
    y
}

fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!((g as f64 - w).abs() <= tol * (1.0 + w.abs()), "{what}[{i}]: {g} vs {w}");
    }
}

struct Inputs {
    x: Vec<f32>,
    w: Vec<f32>,
    b: Option<Vec<f32>>,
    /// The loss is `sum(y * r)`, so `r` is the output gradient.
    r: Vec<f32>,
}

fn inputs(case: &Case, seed: u64) -> Inputs {
    let g = case.geometry();
    Inputs {
        x: rand_vec(case.x_dims.iter().product(), seed),
        w: rand_vec(case.w_dims.iter().product(), seed + 1),
        b: case.bias.then(|| rand_vec(g.o, seed + 2)),
        r: rand_vec(g.n * g.o * g.oh * g.ow, seed + 3),
    }
}

#[test]
fn forward_matches_a_direct_convolution() {
    let all = [cases(), onnx_only_cases(), batched_cases(), wide_cases(), winograd_cases()];
    for case in all.iter().flatten() {
        let g = case.geometry();
        let i = inputs(case, 11);
        let y = forward(&i.x, &i.w, i.b.as_deref(), &g);
        assert_close(&format!("{g:?} y"), &y, &naive(&i.x, &i.w, i.b.as_deref(), &g), 1e-5);
    }
}

/// Central differences of `sum(forward(...) * r)` in operand `which` (0: x, 1: w, 2: b) at
/// coordinates `at`, the loss in f64. The convolution is linear in each operand, so a wide step
/// is exact but for rounding.
fn finite_differences_at(
    i: &Inputs,
    g: &ConvGeometry,
    which: usize,
    at: impl IntoIterator<Item = usize>,
) -> Vec<f64> {
    let loss = |x: &[f32], w: &[f32], b: Option<&[f32]>| -> f64 {
        forward(x, w, b, g).iter().zip(&i.r).map(|(&y, &r)| y as f64 * r as f64).sum()
    };
    let eps = 0.25f32;
    let base: Vec<f32> = match which {
        0 => i.x.clone(),
        1 => i.w.clone(),
        _ => i.b.clone().unwrap(),
    };
    at.into_iter()
        .map(|k| {
            let at = |d: f32| {
                let mut v = base.clone();
                v[k] += d;
                match which {
                    0 => loss(&v, &i.w, i.b.as_deref()),
                    1 => loss(&i.x, &v, i.b.as_deref()),
                    _ => loss(&i.x, &i.w, Some(&v)),
                }
            };
            (at(eps) - at(-eps)) / (2.0 * eps as f64)
        })
        .collect()
}

/// Operands up to this many floats are checked against central differences at every
/// coordinate; longer ones (the Winograd cases' 11,520-float weights) at [`SAMPLED`] spread
/// over them, which they also are in full against candle's autodiff: every coordinate of those
/// took 119 s of the suite's time, two forwards each.
const FULL_CHECK_MAX: usize = 1024;
/// Coordinates checked of an operand longer than [`FULL_CHECK_MAX`].
const SAMPLED: usize = 96;

/// `grads` (`backward` of `i`) against central differences of `sum(y * r)`: at every
/// coordinate of an operand no longer than `full_max`, else at `samples` spread over it.
fn assert_matches_finite_differences(
    what: &str,
    i: &Inputs,
    g: &ConvGeometry,
    grads: &ConvGrads,
    full_max: usize,
    samples: usize,
) {
    let mut operands: Vec<(&str, &[f32])> =
        vec![("dx", grads.dx.as_ref().expect("dx")), ("dw", &grads.dw)];
    match &grads.db {
        Some(db) => operands.push(("db", db)),
        None => assert!(i.b.is_none(), "{what}: no db"),
    }
    for (which, (name, got)) in operands.into_iter().enumerate() {
        let len = got.len();
        let at = if len <= full_max { (0..len).collect() } else { sampled(len, samples) };
        let want = finite_differences_at(i, g, which, at.iter().copied());
        for (&k, want) in at.iter().zip(want) {
            assert!(
                (got[k] as f64 - want).abs() <= 1e-3 * (1.0 + want.abs()),
                "{what} {name}[{k}]: {} vs {want}",
                got[k]
            );
        }
    }
}

#[test]
fn gradients_match_finite_differences() {
    let all = [cases(), onnx_only_cases(), batched_cases(), wide_cases(), winograd_cases()];
    for case in all.iter().flatten() {
        let g = case.geometry();
        let i = inputs(case, 21);
        let what = format!("{g:?} bias {}", case.bias);
        let grads = backward(&i.x, &i.w, &i.r, &g, true, case.bias);
        assert_matches_finite_differences(&what, &i, &g, &grads, FULL_CHECK_MAX, SAMPLED);
    }
}

/// candle's own conv2d, one call per group (its backward handles one group only), bias added
/// by broadcasting: the reference autodiff.
fn candle_reference(x: &Tensor, w: &Tensor, b: Option<&Tensor>, p: Conv2dParams) -> Tensor {
    let (c, o) = (x.dim(1).unwrap(), w.dim(0).unwrap());
    let (cg, og) = (c / p.groups, o / p.groups);
    let parts: Vec<Tensor> = (0..p.groups)
        .map(|grp| {
            x.narrow(1, grp * cg, cg)
                .unwrap()
                .conv2d(&w.narrow(0, grp * og, og).unwrap(), p.pads[0], p.stride.0, p.dilation.0, 1)
                .unwrap()
        })
        .collect();
    let y = Tensor::cat(&parts, 1).unwrap();
    match b {
        Some(b) => y.broadcast_add(&b.reshape((1, o, 1, 1)).unwrap()).unwrap(),
        None => y,
    }
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn gradients_match_candle_autodiff() {
    let dev = Device::Cpu;
    for mut case in cases().into_iter().chain(batched_cases()).chain(winograd_cases()) {
        // candle's conv2d backward takes the output padding of both axes from the height, so
        // its input gradient is wrong for non-square inputs at stride 2: square ones here.
        case.x_dims[3] = case.x_dims[2];
        let g = case.geometry();
        let i = inputs(&case, 31);
        let x = Var::from_vec(i.x.clone(), case.x_dims.to_vec(), &dev).unwrap();
        let w = Var::from_vec(i.w.clone(), case.w_dims.to_vec(), &dev).unwrap();
        let b = i.b.as_ref().map(|b| Var::from_vec(b.clone(), b.len(), &dev).unwrap());
        let r = Tensor::from_vec(i.r.clone(), g.out_dims().to_vec(), &dev).unwrap();
        let ours = conv2d(&x, &w, b.as_ref().map(|b| b.as_tensor()), case.p).unwrap();
        let theirs = candle_reference(&x, &w, b.as_ref().map(|b| b.as_tensor()), case.p);
        assert_eq!(ours.dims(), theirs.dims());
        let want_y: Vec<f64> = flat(&theirs).iter().map(|&v| v as f64).collect();
        let what = format!("{g:?} bias {}", case.bias);
        assert_close(&format!("{what} y"), &flat(&ours), &want_y, 1e-5);
        let go = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gt = (theirs * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let mut vars = vec![("dx", &x), ("dw", &w)];
        if let Some(b) = &b {
            vars.push(("db", b));
        }
        for (name, v) in vars {
            let want: Vec<f64> = flat(gt.get(v).unwrap()).iter().map(|&v| v as f64).collect();
            assert_close(&format!("{what} {name}"), &flat(go.get(v).unwrap()), &want, 1e-4);
        }
    }
}

/// Every convolution shape of the full-width ResNet-18 (64 base channels, 28x28 inputs; issue
/// 27): the stem, the 3x3 stride-1 convolutions of each stage at its plane size, and the
/// stride-2 3x3 and 1x1 downsampling ones into 128, 256 and 512 channels, on two images. Each
/// runs the kernel the model's layer is routed to on this CPU (Winograd, direct or im2col).
fn full_width_cases() -> Vec<Case> {
    let s1 = Conv2dParams { pads: [1; 4], ..Conv2dParams::default() };
    let s2 = Conv2dParams { stride: (2, 2), pads: [1; 4], ..Conv2dParams::default() };
    let down = Conv2dParams { stride: (2, 2), ..Conv2dParams::default() };
    let case = |c: usize, o: usize, hw: usize, k: usize, p: Conv2dParams, bias: bool| Case {
        x_dims: [2, c, hw, hw],
        w_dims: [o, c, k, k],
        p,
        bias,
    };
    vec![
        case(1, 64, 28, 3, s1, true),
        case(64, 64, 28, 3, s1, true),
        case(64, 128, 28, 3, s2, true),
        case(64, 128, 28, 1, down, false),
        case(128, 128, 14, 3, s1, true),
        case(128, 256, 14, 3, s2, false),
        case(128, 256, 14, 1, down, true),
        case(256, 256, 7, 3, s1, true),
        case(256, 512, 7, 3, s2, true),
        case(256, 512, 7, 1, down, true),
        case(512, 512, 4, 3, s1, true),
    ]
}

/// `count` coordinates of a `len`-long operand, spread over it (first and last included).
fn sampled(len: usize, count: usize) -> Vec<usize> {
    let mut at: Vec<usize> = (0..count).map(|i| i * (len - 1) / (count - 1).max(1)).collect();
    at.dedup();
    at
}

/// The full-width shapes: the forward against the direct definition, and the three gradients
/// against central differences at 24 coordinates of each operand spread over it (all of them
/// would be 4.7 million forwards for the 512-channel weight), and in full against candle's
/// autodiff. Unaffected outputs compute the same bits in both runs of a difference, so the
/// loss difference is exact but for the perturbed outputs' rounding.
#[test]
fn full_width_gradients_match_finite_differences() {
    let dev = Device::Cpu;
    for case in full_width_cases() {
        let g = case.geometry();
        let i = inputs(&case, 71);
        let what = format!("{g:?} bias {}", case.bias);
        let y = forward(&i.x, &i.w, i.b.as_deref(), &g);
        assert_close(&format!("{what} y"), &y, &naive(&i.x, &i.w, i.b.as_deref(), &g), 1e-4);
        let grads = backward(&i.x, &i.w, &i.r, &g, true, case.bias);
        assert_matches_finite_differences(&what, &i, &g, &grads, 0, 24);
        let x = Var::from_vec(i.x.clone(), case.x_dims.to_vec(), &dev).unwrap();
        let w = Var::from_vec(i.w.clone(), case.w_dims.to_vec(), &dev).unwrap();
        let b = i.b.as_ref().map(|b| Var::from_vec(b.clone(), b.len(), &dev).unwrap());
        let r = Tensor::from_vec(i.r.clone(), g.out_dims().to_vec(), &dev).unwrap();
        let theirs = candle_reference(&x, &w, b.as_ref().map(|b| b.as_tensor()), case.p);
        let gt = (theirs * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let mut ours = vec![("dx", &x, grads.dx.clone().unwrap()), ("dw", &w, grads.dw.clone())];
        if let (Some(b), Some(db)) = (&b, &grads.db) {
            ours.push(("db", b, db.clone()));
        }
        for (name, v, got) in ours {
            let want: Vec<f64> = flat(gt.get(v).unwrap()).iter().map(|&v| v as f64).collect();
            assert_close(&format!("{what} {name} (candle)"), &got, &want, 1e-4);
        }
    }
}

#[test]
fn data_input_gets_no_gradient_and_weights_still_do() {
    let dev = Device::Cpu;
    let case = &cases()[40];
    let i = inputs(case, 41);
    let x = Tensor::from_vec(i.x.clone(), case.x_dims.to_vec(), &dev).unwrap();
    let w = Var::from_vec(i.w.clone(), case.w_dims.to_vec(), &dev).unwrap();
    let y = conv2d(&x, &w, None, case.p).unwrap();
    let r = Tensor::from_vec(i.r.clone(), y.dims(), &dev).unwrap();
    let grads = (y * r).unwrap().sum_all().unwrap().backward().unwrap();
    assert!(grads.get(&x).is_none(), "the data input needs no gradient");
    let want = backward(&i.x, &i.w, &i.r, &case.geometry(), false, false).dw;
    assert_eq!(flat(grads.get(&w).unwrap()), want);
}

#[test]
fn weight_gradient_bytes_do_not_depend_on_the_thread_count() {
    // A batch that does not divide into the chunks evenly, big enough to take every chunk.
    let case = Case {
        x_dims: [37, 8, 9, 9],
        w_dims: [16, 8, 3, 3],
        p: Conv2dParams { pads: [1; 4], ..Default::default() },
        bias: true,
    };
    let g = case.geometry();
    let i = inputs(&case, 51);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let y = forward(&i.x, &i.w, i.b.as_deref(), &g);
            let r = backward(&i.x, &i.w, &i.r, &g, true, true);
            (y, r.dx.unwrap(), r.dw, r.db.unwrap())
        })
    };
    let one = run(1);
    for threads in [2, 3, 8] {
        assert!(run(threads) == one, "{threads} threads gave different bits");
    }
}

// ---- The other trainable operators, through the graph interpreter (`TrainGraph`) ----

mod graph_ops {
    use super::{assert_close, flat, rand_vec};
    use candle_core::{Tensor, Var};
    use relucompile::exec::graph::TrainGraph;
    use relucompile::ir::{Graph, Model, Node, Tensor as IrTensor};
    use tract_onnx::pb;

    fn ints(name: &str, v: &[i64]) -> pb::AttributeProto {
        pb::AttributeProto {
            name: name.into(),
            r#type: pb::attribute_proto::AttributeType::Ints as i32,
            ints: v.to_vec(),
            ..Default::default()
        }
    }
    fn int(name: &str, i: i64) -> pb::AttributeProto {
        pb::AttributeProto {
            name: name.into(),
            r#type: pb::attribute_proto::AttributeType::Int as i32,
            i,
            ..Default::default()
        }
    }
    fn float(name: &str, f: f32) -> pb::AttributeProto {
        pb::AttributeProto {
            name: name.into(),
            r#type: pb::attribute_proto::AttributeType::Float as i32,
            f,
            ..Default::default()
        }
    }

    /// A one-node model `y = op(x, weights...)`, weights given as (name, dims).
    fn model(
        op: &str,
        weights: &[(&str, Vec<usize>)],
        attributes: Vec<pb::AttributeProto>,
    ) -> Model {
        let mut inputs = vec!["x".to_string()];
        let mut initializers = std::collections::BTreeMap::new();
        for (i, (name, dims)) in weights.iter().enumerate() {
            inputs.push(name.to_string());
            let len = dims.iter().product();
            let mut v = rand_vec(len, 60 + i as u64);
            if *name == "var" {
                v.iter_mut().for_each(|x| *x = x.abs() + 0.5);
            }
            initializers.insert(name.to_string(), IrTensor::from_f32(dims.clone(), &v));
        }
        let mut node = Node::new("n", op, inputs, vec!["y".into()]);
        node.attributes = attributes;
        let value = |name: &str| pb::ValueInfoProto { name: name.into(), ..Default::default() };
        Model {
            ir_version: 8,
            opset_imports: vec![],
            producer_name: String::new(),
            producer_version: String::new(),
            domain: String::new(),
            model_version: 0,
            doc_string: String::new(),
            metadata_props: vec![],
            graph: Graph {
                name: "g".into(),
                inputs: vec![value("x")],
                outputs: vec![value("y")],
                initializers,
                nodes: vec![node],
            },
        }
    }

    /// Autodiff gradients of `sum(y * r)` for `x` and every trainable weight against central
    /// differences (in f64 over the f32 forward).
    fn check(what: &str, m: &Model, x_dims: &[usize]) {
        check_with(what, m, x_dims, 1e-2, 2e-3)
    }

    /// [`check`] with step `eps` and tolerance `tol`: max pools need a step small enough not
    /// to move a window's maximum.
    fn check_with(what: &str, m: &Model, x_dims: &[usize], eps: f32, tol: f64) {
        let dev = candle_core::Device::Cpu;
        let g = TrainGraph::new(m).unwrap();
        let x0 = rand_vec(x_dims.iter().product(), 70);
        let x = Var::from_vec(x0.clone(), x_dims.to_vec(), &dev).unwrap();
        let y = g.forward(x.as_tensor()).unwrap();
        let r = Tensor::from_vec(rand_vec(y.elem_count(), 71), y.dims(), &dev).unwrap();
        let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let r = flat(&r);
        let loss = |g: &TrainGraph, xv: &[f32]| -> f64 {
            let xt = Tensor::from_vec(xv.to_vec(), x_dims.to_vec(), &dev).unwrap();
            flat(&g.forward(&xt).unwrap()).iter().zip(&r).map(|(&a, &b)| a as f64 * b as f64).sum()
        };
        // The input.
        let fd: Vec<f64> = (0..x0.len())
            .map(|i| {
                let at = |d: f32| {
                    let mut v = x0.clone();
                    v[i] += d;
                    loss(&g, &v)
                };
                (at(eps) - at(-eps)) / (2.0 * eps as f64)
            })
            .collect();
        assert_close(&format!("{what} dx"), &flat(grads.get(&x).unwrap()), &fd, tol);
        // Each trainable weight.
        assert!(!g.params.is_empty(), "{what}: nothing trainable");
        for (name, var) in &g.params {
            let w0 = flat(var.as_tensor());
            let fd: Vec<f64> = (0..w0.len())
                .map(|i| {
                    let at = |d: f32| {
                        let mut v = w0.clone();
                        v[i] += d;
                        var.set(&Tensor::from_vec(v, var.dims(), &dev).unwrap()).unwrap();
                        loss(&g, &x0)
                    };
                    let diff = (at(eps) - at(-eps)) / (2.0 * eps as f64);
                    var.set(&Tensor::from_vec(w0.clone(), var.dims(), &dev).unwrap()).unwrap();
                    diff
                })
                .collect();
            let got = flat(grads.get(var.as_tensor()).unwrap());
            assert_close(&format!("{what} d{name}"), &got, &fd, tol);
        }
    }

    #[test]
    fn gemm_gradients_match_finite_differences() {
        let m = model(
            "Gemm",
            &[("w", vec![5, 7]), ("b", vec![5])],
            vec![int("transB", 1), float("alpha", 0.7), float("beta", 1.3)],
        );
        check("Gemm", &m, &[3, 7]);
        check("Gemm no-trans", &model("Gemm", &[("w", vec![7, 4])], vec![]), &[3, 7]);
    }

    #[test]
    fn batchnorm_gradients_match_finite_differences() {
        let m = model(
            "BatchNormalization",
            &[("gamma", vec![3]), ("beta", vec![3]), ("mean", vec![3]), ("var", vec![3])],
            vec![float("epsilon", 1e-3)],
        );
        check("BatchNormalization", &m, &[2, 3, 4, 5]);
    }

    #[test]
    fn conv_through_the_graph_matches_finite_differences() {
        // Asymmetric pads, unequal strides, two groups, bias: the graph's conv wiring.
        let m = model(
            "Conv",
            &[("w", vec![4, 2, 3, 2]), ("b", vec![4])],
            vec![ints("pads", &[1, 0, 2, 1]), ints("strides", &[2, 1]), int("group", 2)],
        );
        check("Conv", &m, &[2, 4, 6, 5]);
    }

    /// Pools have no weights of their own: a 1x1 conv after them gives the graph one (and
    /// perturbing it never moves a window's maximum); the input gradient goes through the pool.
    fn with_conv_after(pool: Node) -> Model {
        let mut m = model("Conv", &[("w", vec![3, 3, 1, 1])], vec![]);
        m.graph.nodes[0].inputs[0] = "p".into();
        let mut pool = pool;
        pool.inputs = vec!["x".into()];
        pool.outputs = vec!["p".into()];
        m.graph.nodes.insert(0, pool);
        m
    }

    fn pool(op: &str, attrs: Vec<pb::AttributeProto>) -> Node {
        let mut n = Node::new("p", op, vec![], vec![]);
        n.attributes = attrs;
        n
    }

    #[test]
    fn global_and_average_pool_gradients_match_finite_differences() {
        let cases = [
            ("GlobalAveragePool", pool("GlobalAveragePool", vec![])),
            ("GlobalMaxPool", pool("GlobalMaxPool", vec![])),
            (
                "AveragePool 2/2",
                pool("AveragePool", vec![ints("kernel_shape", &[2, 2]), ints("strides", &[2, 2])]),
            ),
        ];
        for (what, node) in cases {
            check(what, &with_conv_after(node), &[2, 3, 4, 6]);
        }
    }

    /// Strided and padded pools (candle 0.9's own pooling backward failed these: max-pool
    /// gradients scaled by (maxima in the window) / (window size), no backward for kernels
    /// other than the stride, gradients misplaced at odd sizes; graph.rs now pools with
    /// `train::pool`).
    #[test]
    fn strided_pool_gradients_match_finite_differences() {
        let p1 = || ints("pads", &[1, 1, 1, 1]);
        let cases = [
            (
                "MaxPool 2/2",
                pool("MaxPool", vec![ints("kernel_shape", &[2, 2]), ints("strides", &[2, 2])]),
            ),
            (
                "MaxPool 3/2 pad 1",
                pool(
                    "MaxPool",
                    vec![ints("kernel_shape", &[3, 3]), ints("strides", &[2, 2]), p1()],
                ),
            ),
            (
                "AveragePool 3/2 pad 1 exclusive",
                pool(
                    "AveragePool",
                    vec![ints("kernel_shape", &[3, 3]), ints("strides", &[2, 2]), p1()],
                ),
            ),
            (
                "AveragePool 2/1 inclusive",
                pool(
                    "AveragePool",
                    vec![
                        ints("kernel_shape", &[2, 2]),
                        ints("pads", &[0, 0, 1, 1]),
                        int("count_include_pad", 1),
                    ],
                ),
            ),
        ];
        for (what, node) in cases {
            for dims in [[2, 3, 4, 6], [2, 3, 5, 7]] {
                check_with(what, &with_conv_after(node.clone()), &dims, 1e-3, 5e-3);
            }
        }
    }
}

//! The input, weight and bias gradients in one pass over the batch.

use super::*;

/// Gradients of a convolution's inputs given the gradient `dy` of its output.
#[derive(Debug, Clone)]
pub struct ConvGrads {
    /// `[N, C, H, W]`, when asked for.
    pub dx: Option<Vec<f32>>,
    /// `[O, C/groups, KH, KW]`.
    pub dw: Vec<f32>,
    /// `[O]`, when asked for.
    pub db: Option<Vec<f32>>,
}

/// How the input gradient is computed.
pub(super) enum InputGrad {
    /// Not asked for.
    Skip,
    /// `W^T @ dY`, a 1x1 kernel at stride 1 without padding.
    Pointwise,
    /// A stride-1 convolution of `dY` ([`ConvGeometry::input_grad_geometry`]) with the
    /// flipped kernel.
    Flipped(ConvGeometry, Vec<f32>),
    /// That convolution through the direct kernel, image by image.
    Direct(DirectConv),
    /// That convolution through Winograd, a few images at a time.
    #[cfg(target_arch = "x86_64")]
    Winograd(winograd::Winograd),
    /// `col2im(W^T @ dY)`.
    Col2im,
}

/// The input gradient (if `need_dx`), the weight gradient and the bias gradient (if
/// `need_db`) of [`forward`] at `x`, `w` for output gradient `dy`, in one pass over the batch.
pub fn backward(
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    g: &ConvGeometry,
    need_dx: bool,
    need_db: bool,
) -> ConvGrads {
    let (cg, og, k, hw, ohw) = (g.cg(), g.og(), g.k(), g.h * g.w, g.oh * g.ow);
    let (chw, ohw_all) = (g.c * hw, g.o * ohw);
    assert_eq!(x.len(), g.n * chw, "conv input length");
    assert_eq!(w.len(), g.o * k, "conv weight length");
    assert_eq!(dy.len(), g.n * ohw_all, "conv output gradient length");
    let sp = Split::of(g);
    let (par, pg) = (sp.gemm_par(), sp.per_gemm);
    let plan = match g.input_grad_geometry() {
        _ if !need_dx => InputGrad::Skip,
        _ if g.pointwise() => InputGrad::Pointwise,
        Some(gt) => {
            let wf = flip_kernel(w, g);
            match ConvPlan::new(&wf, None, &gt) {
                #[cfg(target_arch = "x86_64")]
                ConvPlan::Winograd(wg) => InputGrad::Winograd(wg),
                ConvPlan::Direct(d) => InputGrad::Direct(d),
                ConvPlan::Im2col => InputGrad::Flipped(gt, wf),
            }
        }
        None => InputGrad::Col2im,
    };
    // The weight gradient through Winograd wherever the forward runs it.
    #[cfg(target_arch = "x86_64")]
    let wgrad = winograd::Winograd::for_weight_grad(g);
    #[cfg(target_arch = "x86_64")]
    let fast_dw = wgrad.is_some();
    #[cfg(not(target_arch = "x86_64"))]
    let fast_dw = false;
    let pd = Padded::of(g);
    let many = |len: usize| if pg > 1 { len * pg } else { 0 };
    // The im2col of `x` serves only the gemm weight gradient.
    let scratch = if fast_dw { 0 } else { Unroll::len(g, pg) }
        + many(og * ohw)
        + match &plan {
            InputGrad::Skip => 0,
            InputGrad::Direct(d) => d.scratch_len(),
            #[cfg(target_arch = "x86_64")]
            InputGrad::Winograd(wg) => wg.scratch_len(),
            InputGrad::Pointwise => many(cg * ohw),
            InputGrad::Flipped(gt, _) => Unroll::len(gt, pg) + many(cg * hw),
            InputGrad::Col2im => k * pg * ohw + pd.len(g),
        };
    #[cfg(target_arch = "x86_64")]
    let scratch = scratch + wgrad.as_ref().map_or(0, |w| w.scratch_len());
    #[cfg(target_arch = "x86_64")]
    let dw_len = wgrad.as_ref().map_or(g.o * k, |w| w.kernel_grad_len());
    #[cfg(not(target_arch = "x86_64"))]
    let dw_len = g.o * k;
    let mut dx = if need_dx { zeroed(g.n * chw) } else { Vec::new() };
    let dx_parts: Vec<Option<&mut [f32]>> = if need_dx && chw > 0 {
        dx.chunks_mut(sp.per_chunk * chw).map(Some).collect()
    } else {
        (0..sp.chunks).map(|_| None).collect()
    };
    // Each chunk's partial weight and bias gradients, in chunk order.
    let partials: Vec<(Vec<f32>, Vec<f32>)> = dx_parts
        .into_par_iter()
        .enumerate()
        .map(|(ci, mut dxc)| {
            let first = ci * sp.per_chunk;
            let images = sp.per_chunk.min(g.n - first);
            let (xc, dyc) = (&x[first * chw..], &dy[first * ohw_all..]);
            // With Winograd, the chunk's transformed-kernel gradient, finished once below.
            let mut dw = vec![0f32; dw_len];
            let mut db = vec![0f32; if need_db { g.o } else { 0 }];
            with_scratch(scratch, |mut buf| {
                let mut ux = (!fast_dw).then(|| Unroll::new(g, pg, &mut buf));
                let dybuf = take(&mut buf, many(og * ohw));
                let mut udy = match &plan {
                    InputGrad::Flipped(gt, _) => Some(Unroll::new(gt, pg, &mut buf)),
                    _ => None,
                };
                let dcol =
                    take(&mut buf, if let InputGrad::Col2im = plan { k * pg * ohw } else { 0 });
                let dxpad =
                    take(&mut buf, if let InputGrad::Col2im = plan { pd.len(g) } else { 0 });
                let mut direct = match &plan {
                    InputGrad::Direct(d) => {
                        let dbuf = take(&mut buf, d.scratch_len());
                        d.clear(dbuf);
                        Some((d, dbuf))
                    }
                    _ => None,
                };
                #[cfg(target_arch = "x86_64")]
                let mut winograd = match &plan {
                    InputGrad::Winograd(wg) => {
                        let wbuf = take(&mut buf, wg.scratch_len());
                        wg.clear(wbuf);
                        Some((wg, wbuf))
                    }
                    _ => None,
                };
                #[cfg(target_arch = "x86_64")]
                let mut wgrad = wgrad.as_ref().map(|wg| {
                    let wbuf = take(&mut buf, wg.scratch_len());
                    wg.clear(wbuf);
                    (wg, wbuf)
                });
                let tmp = buf;
                for (s, nb) in sp.gemms(images) {
                    let ld = nb * ohw;
                    if let (Some((d, dbuf)), Some(dxc)) = (&mut direct, dxc.as_deref_mut()) {
                        for b in s..s + nb {
                            let dyb = &dyc[b * ohw_all..][..ohw_all];
                            d.image(dyb, &mut dxc[b * chw..][..chw], false, dbuf);
                        }
                    }
                    #[cfg(target_arch = "x86_64")]
                    if let (Some((wg, wbuf)), Some(dxc)) = (&mut winograd, dxc.as_deref_mut()) {
                        let per = wg.images_per_run();
                        for r in (s..s + nb).step_by(per) {
                            let e = (r + per).min(s + nb);
                            let dx_run = &mut dxc[r * chw..e * chw];
                            wg.run(&dyc[r * ohw_all..e * ohw_all], dx_run, false, wbuf);
                        }
                    }
                    for grp in 0..g.p.groups {
                        let dyg = if ux.is_none() {
                            // Neither the Winograd weight gradient nor a stride-1 input
                            // gradient reads it.
                            MatRef::new(&[], 0, 0)
                        } else if nb == 1 {
                            MatRef::new(&dyc[s * ohw_all + grp * og * ohw..][..og * ohw], og, ohw)
                        } else {
                            let d = &mut dybuf[..og * ld];
                            gather(&dyc[s * ohw_all..], ohw_all, grp * og * ohw, og, ohw, d);
                            MatRef::new(d, og, ld)
                        };
                        if let Some(ux) = ux.as_mut() {
                            // dW_g += dY_g @ col^T
                            let xb = |b: usize| &xc[(s + b) * chw + grp * cg * hw..][..cg * hw];
                            let cols = ux.cols(nb, xb);
                            let dwg = &mut dw[grp * og * k..][..og * k];
                            matmul(dwg, dyg, MatRef::new(cols, k, ld).t(), true, par);
                        }
                        if need_db {
                            for b in s..s + nb {
                                let dyb = &dyc[b * ohw_all + grp * og * ohw..][..og * ohw];
                                let dbg = &mut db[grp * og..][..og];
                                for (acc, row) in dbg.iter_mut().zip(dyb.chunks(ohw)) {
                                    *acc += sum(row);
                                }
                            }
                        }
                        let Some(dxc) = dxc.as_deref_mut() else { continue };
                        let wt = MatRef::new(&w[grp * og * k..][..og * k], og, k).t();
                        let (dxs, off) = (&mut dxc[s * chw..], grp * cg * hw);
                        match &plan {
                            InputGrad::Skip | InputGrad::Direct(_) => {}
                            #[cfg(target_arch = "x86_64")]
                            InputGrad::Winograd(_) => {}
                            InputGrad::Pointwise => {
                                matmul_into_images(wt, dyg, nb, None, dxs, chw, off, tmp, par)
                            }
                            InputGrad::Flipped(gt, wf) => {
                                let kt = gt.k();
                                let wf = MatRef::new(&wf[grp * cg * kt..][..cg * kt], cg, kt);
                                let udy = udy.as_mut().unwrap();
                                let dyb = |b: usize| {
                                    &dyc[(s + b) * ohw_all + grp * og * ohw..][..og * ohw]
                                };
                                let cols = MatRef::new(udy.cols(nb, dyb), kt, nb * hw);
                                matmul_into_images(wf, cols, nb, None, dxs, chw, off, tmp, par);
                            }
                            InputGrad::Col2im => {
                                let dcol = &mut dcol[..k * ld];
                                matmul(dcol, wt, dyg, false, par);
                                for b in 0..nb {
                                    dxpad.fill(0.0);
                                    col2im_padded(&dcol[b * ohw..], g, dxpad, ld);
                                    unpad_add(dxpad, g, &mut dxs[b * chw + off..][..cg * hw]);
                                }
                            }
                        }
                    }
                }
                #[cfg(target_arch = "x86_64")]
                if let Some((wg, wbuf)) = wgrad.as_mut() {
                    let per = wg.images_per_run();
                    for r in (0..images).step_by(per) {
                        let e = (r + per).min(images);
                        let (xr, dyr) = (&xc[r * chw..e * chw], &dyc[r * ohw_all..e * ohw_all]);
                        wg.weight_grad_run(xr, dyr, &mut dw, wbuf);
                    }
                }
            });
            (dw, db)
        })
        .collect();
    let (dw, db) = reduce_in_order(partials, dw_len, if need_db { g.o } else { 0 });
    #[cfg(target_arch = "x86_64")]
    let dw = match &wgrad {
        Some(wg) => {
            let mut out = vec![0f32; g.o * k];
            wg.weight_grad_finish(&dw, &mut out);
            out
        }
        None => dw,
    };
    ConvGrads { dx: need_dx.then_some(dx), dw, db: need_db.then_some(db) }
}

/// Element-wise sums of the partials, each element summed in the partials' order (zeros of
/// the given lengths when there are none).
pub(super) fn reduce_in_order(
    mut partials: Vec<(Vec<f32>, Vec<f32>)>,
    dw_len: usize,
    db_len: usize,
) -> (Vec<f32>, Vec<f32>) {
    if partials.is_empty() {
        return (vec![0f32; dw_len], vec![0f32; db_len]);
    }
    let rest = partials.split_off(1);
    let (mut dw, mut db) = partials.pop().unwrap();
    const BLOCK: usize = 1 << 14;
    dw.par_chunks_mut(BLOCK).enumerate().for_each(|(bi, out)| {
        for (p, _) in &rest {
            for (o, v) in out.iter_mut().zip(&p[bi * BLOCK..]) {
                *o += *v;
            }
        }
    });
    for (_, p) in &rest {
        for (o, v) in db.iter_mut().zip(p) {
            *o += *v;
        }
    }
    (dw, db)
}

impl ConvGeometry {
    /// At stride 1 the input gradient is itself a convolution, of the output gradient with
    /// the kernel flipped and its in/out channels swapped, padded by the kernel's span less
    /// the forward padding: its geometry, when the padding is no wider than the span.
    pub(super) fn input_grad_geometry(&self) -> Option<ConvGeometry> {
        if self.p.stride != (1, 1) {
            return None;
        }
        let (sh, sw) = (self.p.dilation.0 * (self.kh - 1), self.p.dilation.1 * (self.kw - 1));
        let [t, l, b, r] = self.p.pads;
        let pads = [sh.checked_sub(t)?, sw.checked_sub(l)?, sh.checked_sub(b)?, sw.checked_sub(r)?];
        let p = Conv2dParams { pads, ..self.p };
        let gt = ConvGeometry::new(
            &[self.n, self.o, self.oh, self.ow],
            &[self.c, self.og(), self.kh, self.kw],
            p,
        )
        .ok()?;
        (gt.oh == self.h && gt.ow == self.w).then_some(gt)
    }
}

/// `w` (`[O, C/groups, KH, KW]`) as the kernel of the input-gradient convolution,
/// `[C, O/groups, KH, KW]`: channels swapped within each group, taps reversed.
pub(super) fn flip_kernel(w: &[f32], g: &ConvGeometry) -> Vec<f32> {
    let (cg, og, taps) = (g.cg(), g.og(), g.kh * g.kw);
    let mut out = vec![0f32; w.len()];
    // On all cores: once per training step per layer, 0.6% of the step on one core.
    out.par_chunks_mut(og * taps).enumerate().for_each(|(row, dst)| {
        let (grp, ci) = (row / cg, row % cg);
        for (oj, dst) in dst.chunks_exact_mut(taps).enumerate() {
            let src = &w[((grp * og + oj) * cg + ci) * taps..][..taps];
            for (d, s) in dst.iter_mut().zip(src.iter().rev()) {
                *d = *s;
            }
        }
    });
    out
}

//! The forward and backward as a candle custom op, so autodiff runs these kernels.

use super::*;
use crate::kernels::candle::cpu_slice;

/// [`forward`] and [`backward`] as a candle op over `(x, w)` or `(x, w, bias)`.
#[derive(Clone, Copy, Debug)]
pub(super) struct ConvOp(pub(super) Conv2dParams);

impl ConvOp {
    pub(super) fn geometry(&self, x: &[usize], w: &[usize]) -> candle_core::Result<ConvGeometry> {
        ConvGeometry::new(x, w, self.0).map_err(candle_core::Error::Msg)
    }

    pub(super) fn fwd(
        &self,
        (x, lx): (&CpuStorage, &Layout),
        (w, lw): (&CpuStorage, &Layout),
        bias: Option<(&CpuStorage, &Layout)>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.geometry(lx.dims(), lw.dims())?;
        let bias = bias.map(|(b, lb)| cpu_slice(b, lb)).transpose()?;
        if bias.is_some_and(|b| b.len() != g.o) {
            candle_core::bail!("conv: bias does not hold {} values", g.o);
        }
        let y = forward(cpu_slice(x, lx)?, cpu_slice(w, lw)?, bias, &g);
        Ok((CpuStorage::F32(y), Shape::from(g.out_dims().to_vec())))
    }

    #[allow(clippy::type_complexity)]
    pub(super) fn grads(
        &self,
        x: &Tensor,
        w: &Tensor,
        with_bias: bool,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Tensor, Option<Tensor>)> {
        let g = self.geometry(x.dims(), w.dims())?;
        let grad = grad.contiguous()?;
        // The data fed to the network needs no gradient: skip the input gradient when nothing
        // upstream is trainable.
        let need_dx = x.track_op();
        let r = {
            let (xs, xl) = x.storage_and_layout();
            let (ws, wl) = w.storage_and_layout();
            let (gs, gl) = grad.storage_and_layout();
            let (Storage::Cpu(xs), Storage::Cpu(ws), Storage::Cpu(gs)) = (&*xs, &*ws, &*gs) else {
                candle_core::bail!("conv: only the CPU is supported");
            };
            backward(
                cpu_slice(xs, xl)?,
                cpu_slice(ws, wl)?,
                cpu_slice(gs, gl)?,
                &g,
                need_dx,
                with_bias,
            )
        };
        let dx = r.dx.map(|d| Tensor::from_vec(d, x.shape(), x.device())).transpose()?;
        let dw = Tensor::from_vec(r.dw, w.shape(), w.device())?;
        let db = r.db.map(|d| Tensor::from_vec(d, g.o, w.device())).transpose()?;
        Ok((dx, dw, db))
    }
}

impl CustomOp2 for ConvOp {
    fn name(&self) -> &'static str {
        "im2col-conv2d"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.fwd((x, lx), (w, lw), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = self.grads(x, w, false, grad)?;
        Ok((dx, Some(dw)))
    }
}

impl CustomOp3 for ConvOp {
    fn name(&self) -> &'static str {
        "im2col-conv2d-bias"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
        b: &CpuStorage,
        lb: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.fwd((x, lx), (w, lw), Some((b, lb)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = self.grads(x, w, true, grad)?;
        Ok((dx, Some(dw), db))
    }
}

/// The 2-D convolution of `x` (`[N, C, H, W]`, f32, CPU) with `w` plus `b`, differentiable
/// in candle: its backward is [`backward`].
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    p: Conv2dParams,
) -> candle_core::Result<Tensor> {
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    match b {
        Some(b) => x.apply_op3(&w, &b.flatten_all()?.contiguous()?, ConvOp(p)),
        None => x.apply_op2(&w, ConvOp(p)),
    }
}

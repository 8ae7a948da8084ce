//! DeepReDuce's input-resolution knob: the network runs on its input downsampled by an integer
//! factor (`resolution(0.5)`: every spatial side halved), so every ReLU and MAC after it falls
//! by the factor squared. The downsampling is an AveragePool on the graph input, linear and so
//! nearly free in a PI engine; distillation recovers the accuracy it costs. Only graphs whose
//! shapes follow the input size (global pooling before the classifier) can take it.

use super::{Pass, PassContext};
use crate::analysis::shapes::infer_shapes;
use crate::error::{CompileError, ExitCode};
use crate::ir::{Model, Node};
use anyhow::Result;

pub struct Resolution {
    /// Each spatial side is divided by this.
    pub divisor: usize,
}

impl Resolution {
    pub fn from_args(args: &[String]) -> Result<Box<dyn Pass>> {
        let factor = super::one_number_arg(args, "resolution", "resolution(0.5)")?;
        let divisor = (1.0 / factor).round();
        if !(factor > 0.0 && factor < 1.0) || ((1.0 / factor) - divisor).abs() > 1e-6 {
            return Err(super::usage(format!(
                "resolution factor {factor} must be 1/k for an integer k >= 2 (0.5, 0.25, ...)"
            )));
        }
        Ok(Box::new(Resolution { divisor: divisor as usize }))
    }
}

impl Pass for Resolution {
    fn run(&self, model: &mut Model, ctx: &PassContext) -> Result<usize> {
        let refuse = |m: String| -> anyhow::Error {
            CompileError::new(ExitCode::Usage, format!("resolution: {m}")).into()
        };
        if ctx.sample.len() != 3 {
            return Err(refuse(format!("the input {:?} is not [C, H, W]", ctx.sample)));
        }
        let k = self.divisor;
        if ctx.sample[1] < 2 * k || ctx.sample[2] < 2 * k {
            return Err(refuse(format!(
                "the input {:?} is too small to divide by {k}",
                ctx.sample
            )));
        }
        let graph = &mut model.graph;
        let input = graph
            .inputs
            .first()
            .map(|v| v.name.clone())
            .ok_or_else(|| refuse("the graph has no input".into()))?;
        let pooled = graph.fresh_name(&format!("{input}_resolution_{k}"));
        graph.replace_uses(&input, &pooled);
        let mut pool = Node::new(
            graph.fresh_name("resolution_pool"),
            "AveragePool",
            vec![input],
            vec![pooled],
        );
        pool.set_attr_ints("kernel_shape", vec![k as i64, k as i64]);
        pool.set_attr_ints("strides", vec![k as i64, k as i64]);
        graph.nodes.insert(0, pool);
        infer_shapes(model, &ctx.sample, 1).map_err(|e| {
            refuse(format!(
                "the graph's shapes do not follow its input size (a classifier over a fixed \
                 feature count?): {e:#}"
            ))
        })?;
        Ok(1)
    }
}

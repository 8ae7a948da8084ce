//! Learned ReLU masks applied to a graph (`relu-masks(masks.json)`): the mask file that
//! `linearize` writes into its checkpoint directory (and `pareto --learned` keeps for each
//! learned point) names, for each Relu, the units (channels, or positions of one image's
//! activation) that keep their ReLU; every other unit becomes linear, written as `linearize`
//! writes it. Only the ReLU layout is replayed: the weights stay as they are, where a learned
//! point's own file holds the weights trained with its masks.

use super::channel_thin::{keep_relu_channels, keep_relu_positions};
use super::{usage, Pass, PassContext};
use crate::analysis::shapes::infer_shapes;
use crate::exec::relu_mask::Granularity;
use crate::ir::Model;
use anyhow::Result;
use serde::Deserialize;
use std::path::PathBuf;

/// The parts of a mask file this pass reads.
#[derive(Deserialize)]
struct MaskFile {
    /// Files written before pixel masks existed hold channel masks.
    #[serde(default)]
    granularity: Granularity,
    layers: Vec<MaskedRelu>,
}

#[derive(Deserialize)]
struct MaskedRelu {
    /// The Relu node's name.
    relu: String,
    #[serde(alias = "channels")]
    units: usize,
    kept: Vec<usize>,
}

pub struct ReluMasks {
    path: PathBuf,
}

impl ReluMasks {
    pub fn from_args(args: &[String]) -> Result<Box<dyn Pass>> {
        match args {
            [path] if !path.is_empty() => Ok(Box::new(ReluMasks { path: path.into() })),
            _ => Err(usage(
                "relu-masks takes the path of a mask file, e.g. relu-masks(masks.json)".into(),
            )),
        }
    }

    fn read(&self) -> Result<MaskFile> {
        let shown = self.path.display();
        let text = std::fs::read_to_string(&self.path)
            .map_err(|e| usage(format!("relu-masks: cannot read {shown}: {e}")))?;
        serde_json::from_str(&text).map_err(|e| {
            usage(format!("relu-masks: {shown} is not a mask file (linearize's masks.json): {e}"))
        })
    }
}

impl Pass for ReluMasks {
    fn run(&self, model: &mut Model, ctx: &PassContext) -> Result<usize> {
        let file = self.read()?;
        let shown = self.path.display();
        let shapes = infer_shapes(model, &ctx.sample, 1)?;
        // Every layer is checked before the graph changes.
        let mut sites = Vec::new();
        for layer in &file.layers {
            let node =
                model.graph.nodes.iter().find(|n| n.name == layer.relu && n.op_type == "Relu");
            let Some(node) = node else {
                return Err(usage(format!(
                    "relu-masks: {shown} masks {}, which is not a Relu of this graph",
                    layer.relu
                )));
            };
            let input = node.inputs[0].clone();
            let dims: Vec<usize> = shapes.get(&input).map(|s| s[1..].to_vec()).unwrap_or_default();
            let units = match file.granularity {
                Granularity::Channel => dims.first().copied().unwrap_or(0),
                Granularity::Pixel => dims.iter().product(),
            };
            if dims.is_empty() || units != layer.units || layer.kept.iter().any(|&u| u >= units) {
                return Err(usage(format!(
                    "relu-masks: {shown} masks {} units of {}, whose input here is {dims:?} \
                     ({units} {} units)",
                    layer.units, layer.relu, file.granularity
                )));
            }
            sites.push((layer, input, dims));
        }
        let keep = match file.granularity {
            Granularity::Channel => keep_relu_channels,
            Granularity::Pixel => keep_relu_positions,
        };
        let mut rewrites = 0;
        for (layer, input, dims) in sites {
            if layer.kept.len() < layer.units {
                keep(model, &layer.relu, &input, &dims, &layer.kept);
                rewrites += 1;
            }
        }
        Ok(rewrites)
    }
}

//! Estimated private-inference cost of a graph: bytes sent, communication rounds and latency,
//! per layer and in total, from the census and a linear model whose coefficients are
//! calibrated on a real engine (`scripts/calibrate_cost_model.py` measures CrypTen and writes
//! `crypten.json` beside this file).
//!
//! The model: a ReLU and a max-pool comparison each cost a fixed number of bytes, a linear
//! layer's bytes grow with the elements it opens (input + weights), every ReLU, pool and
//! linear layer adds its rounds, and latency is a weighted sum of bytes, rounds and MACs.

use super::census::Census;
use crate::error::{CompileError, ExitCode};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// CrypTen 0.4.1, two parties on loopback, measured on this project's 2-core machines.
const CRYPTEN: &str = include_str!("crypten.json");

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CostModel {
    pub engine: String,
    pub bytes_per_relu: f64,
    pub bytes_per_comparison: f64,
    pub bytes_per_linear_operand: f64,
    pub bytes_fixed: f64,
    pub rounds_per_relu_layer: f64,
    pub rounds_per_pool_layer: f64,
    pub rounds_per_linear_layer: f64,
    pub rounds_fixed: f64,
    pub seconds_per_byte: f64,
    pub seconds_per_round: f64,
    pub seconds_per_mac: f64,
    pub seconds_fixed: f64,
    /// Elementwise secret products (the channel masks) and per-operator dispatch.
    #[serde(default)]
    pub bytes_per_mul: f64,
    #[serde(default)]
    pub rounds_per_mul_layer: f64,
    #[serde(default)]
    pub seconds_per_operator: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LayerCost {
    pub name: String,
    pub op: String,
    pub bytes: f64,
    pub rounds: f64,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct CostEstimate {
    pub engine: String,
    pub bytes: f64,
    pub rounds: f64,
    pub seconds: f64,
    pub layers: Vec<LayerCost>,
    /// Set when the graph holds nonlinearities the model has no price for: the estimate
    /// leaves them out, so the true cost is higher.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

impl CostModel {
    /// `crypten` (built in) or a JSON file with the same fields.
    pub fn load(spec: &str) -> Result<Self> {
        let text = match spec {
            "crypten" => CRYPTEN.to_string(),
            path => std::fs::read_to_string(Path::new(path)).map_err(|e| {
                CompileError::new(
                    ExitCode::Usage,
                    format!("--cost-model '{path}': not 'crypten' and not a readable file ({e})"),
                )
            })?,
        };
        serde_json::from_str(&text)
            .with_context(|| format!("--cost-model '{spec}' is not a cost model JSON"))
    }

    fn layer(&self, name: &str, op: &str, bytes: f64, rounds: f64, macs: f64) -> LayerCost {
        LayerCost {
            name: name.to_string(),
            op: op.to_string(),
            bytes,
            rounds,
            seconds: self.seconds_per_byte * bytes
                + self.seconds_per_round * rounds
                + self.seconds_per_mac * macs,
        }
    }

    pub fn estimate(&self, census: &Census) -> CostEstimate {
        let mut layers = Vec::new();
        for n in census.nodes.iter() {
            layers.push(self.layer(
                &n.name,
                &n.op,
                self.bytes_per_relu * n.relus as f64,
                self.rounds_per_relu_layer,
                0.0,
            ));
        }
        for p in &census.pools {
            let bytes = self.bytes_per_comparison * p.comparisons as f64;
            layers.push(self.layer(&p.name, "MaxPool", bytes, self.rounds_per_pool_layer, 0.0));
        }
        for m in &census.muls {
            let bytes = self.bytes_per_mul * m.comparisons as f64;
            layers.push(self.layer(&m.name, "Mul", bytes, self.rounds_per_mul_layer, 0.0));
        }
        for l in &census.linear {
            let bytes = self.bytes_per_linear_operand * l.operands as f64;
            layers.push(self.layer(
                &l.name,
                &l.op,
                bytes,
                self.rounds_per_linear_layer,
                l.macs as f64,
            ));
        }
        let bytes = self.bytes_fixed + layers.iter().map(|l| l.bytes).sum::<f64>();
        let rounds = self.rounds_fixed + layers.iter().map(|l| l.rounds).sum::<f64>();
        // The fixed bytes and rounds (input sharing, output opening) take time too.
        let seconds = self.seconds_fixed
            + self.seconds_per_byte * self.bytes_fixed
            + self.seconds_per_round * self.rounds_fixed
            + self.seconds_per_operator * census.operators as f64
            + layers.iter().map(|l| l.seconds).sum::<f64>();
        let warning = unpriced_warning(census);
        CostEstimate { engine: self.engine.clone(), bytes, rounds, seconds, layers, warning }
    }
}

/// The warning for nonlinearities the cost model does not price, naming each operator with
/// its node count and elements per image.
fn unpriced_warning(census: &Census) -> Option<String> {
    if census.unpriced.is_empty() {
        return None;
    }
    let mut ops: Vec<(&str, usize, u64)> = Vec::new();
    for n in &census.unpriced {
        match ops.iter_mut().find(|(op, _, _)| *op == n.op) {
            Some(entry) => {
                entry.1 += 1;
                entry.2 += n.elements;
            }
            None => ops.push((&n.op, 1, n.elements)),
        }
    }
    let list: Vec<String> = ops
        .iter()
        .map(|(op, nodes, elements)| {
            format!(
                "{op} ({nodes} node{}, {elements} elements)",
                if *nodes == 1 { "" } else { "s" }
            )
        })
        .collect();
    Some(format!(
        "the cost model has no price for {}: the estimate counts them as free, so the real \
         PI cost is higher",
        list.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::census::UnpricedNode;

    #[test]
    fn unpriced_nonlinearities_are_named_not_counted_free() {
        let model = CostModel::load("crypten").unwrap();
        let mut census = crate::analysis::census::census(
            &crate::frontend::load_model(std::path::Path::new(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/models/vgg.onnx"
            )))
            .unwrap(),
            &[1, 28, 28],
        )
        .unwrap();
        assert_eq!(model.estimate(&census).warning, None);
        let node = |op: &str, elements| UnpricedNode { name: op.into(), op: op.into(), elements };
        census.unpriced = vec![node("Sigmoid", 10), node("Sigmoid", 5), node("Softmax", 10)];
        let warning = model.estimate(&census).warning.unwrap();
        assert!(
            warning.contains("Sigmoid (2 nodes, 15 elements), Softmax (1 node, 10 elements)"),
            "{warning}"
        );
    }
}

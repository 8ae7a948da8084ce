//! The one enumerator of lossy candidates that budget searches and frontiers both draw from:
//! cull subsets x thinning modes x DeepReDuce's dimension knobs (and max-pool replacement when
//! PI bytes or latency are the cost), and the channel thresholds tried on top of them.

use super::build_candidate;
use crate::ir::Model;
use crate::passes::PassContext;

/// Channel thresholds tried for channel-level reduction on structural configurations.
pub const CHANNEL_THRESHOLDS: &[f64] = &[0.99, 0.95, 0.9];

/// Which cull subsets a search tries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CullSubsets {
    /// Every subset of the stages.
    All,
    /// Prefixes of the cull order (least critical first).
    Prefixes,
}

/// The knobs `base` takes: the dimension knobs (when `dimensions`) that build on it, and
/// max-pool replacement when `pooling` and it has a MaxPool.
pub fn knobs_for(
    base: &Model,
    sample: &[usize],
    dimensions: bool,
    pooling: bool,
) -> Vec<&'static str> {
    let structure_only = PassContext::new(sample.to_vec());
    let mut knobs: Vec<&'static str> = if dimensions {
        DIMENSION_KNOBS
            .iter()
            .copied()
            .filter(|k| build_candidate(base, k, &structure_only).is_ok())
            .collect()
    } else {
        Vec::new()
    };
    if pooling && base.graph.nodes.iter().any(|n| n.op_type == "MaxPool") {
        knobs.push(POOLING_KNOB);
    }
    knobs
}

/// Up to this many stages with ReLUs, every subset of them is tried for culling (32 subsets
/// for a ResNet-18's five) unless only prefixes are asked for; beyond it, prefixes of the
/// criticality order only.
pub const MAX_EXHAUSTIVE_STAGES: usize = 5;

/// Dimension knobs (DeepReDuce's resolution and width) each structural configuration is also
/// tried with, where the graph takes them.
pub const DIMENSION_KNOBS: &[&str] = &["resolution(0.5)", "width(0.5)"];

/// Max-pool replacement, tried with every structural configuration when the search minimises
/// PI bytes or latency (it leaves the ReLU count as it is).
pub const POOLING_KNOB: &str = "maxpool-to-avgpool";

/// Structural configurations: every cull subset (or, for deep networks, prefixes of the cull
/// order), each with every thinning mode, and each of those again with every knob of `knobs`.
pub fn structural_configs(
    cull_order: &[usize],
    residual: bool,
    knobs: &[&str],
    subsets: CullSubsets,
) -> Vec<String> {
    let thins: &[&str] =
        if residual { &["", "thin(bottom)", "thin(top)"] } else { &["", "thin(alternate)"] };
    let subsets: Vec<Vec<usize>> = if subsets == CullSubsets::All {
        let mut stages = cull_order.to_vec();
        stages.sort();
        (0u32..1 << stages.len())
            .map(|mask| {
                (0..stages.len()).filter(|i| mask & (1 << i) != 0).map(|i| stages[i]).collect()
            })
            .collect()
    } else {
        (0..=cull_order.len())
            .map(|k| {
                let mut culled = cull_order[..k].to_vec();
                culled.sort();
                culled
            })
            .collect()
    };
    let mut out = Vec::new();
    for culled in subsets {
        for thin in thins {
            if culled.len() == cull_order.len() && !thin.is_empty() {
                continue; // nothing left to thin
            }
            let mut parts = Vec::new();
            if !culled.is_empty() {
                let list: Vec<String> = culled.iter().map(|s| s.to_string()).collect();
                parts.push(format!("cull({})", list.join(",")));
            }
            if !thin.is_empty() {
                parts.push(thin.to_string());
            }
            out.push(parts.join(","));
        }
    }
    let plain = out.clone();
    for knob in knobs {
        out.extend(plain.iter().map(|c| join(c, knob)));
    }
    out
}

pub(super) fn join(a: &str, b: &str) -> String {
    [a, b].iter().filter(|s| !s.is_empty()).copied().collect::<Vec<_>>().join(",")
}

//! Stages: DeepReDuce's unit of ReLU criticality.
//!
//! For a residual network, stage 0 is the stem (everything the first residual block's fork
//! depends on) and a new stage starts at each spatial resolution after it, so a CIFAR
//! ResNet-18 has stem + 4 stages. A plain network is cut at each resolution change. Values
//! without spatial dims (the classifier head) stay in the stage of what feeds them.

use super::shapes::Shapes;
use crate::ir::Graph;
use serde::Serialize;
use std::collections::{HashMap, HashSet};

#[derive(Debug, Clone, Serialize)]
pub struct Stages {
    /// Stage of each node, by index in `graph.nodes`.
    pub of_node: Vec<usize>,
    /// Spatial resolution (H, W) of each stage; the stem's is its output resolution.
    pub resolution: Vec<(usize, usize)>,
    /// Whether residual additions were found (and stage 0 is a stem).
    pub residual: bool,
}

impl Stages {
    pub fn count(&self) -> usize {
        self.resolution.len()
    }
}

/// The (H, W) of a 4-D value.
fn spatial(shapes: &Shapes, value: &str) -> Option<(usize, usize)> {
    shapes.get(value).filter(|s| s.len() == 4).map(|s| (s[2], s[3]))
}

/// Residual additions: Add/Sum of two or more computed (non-constant) 4-D values of one shape.
pub fn residual_adds(graph: &Graph, shapes: &Shapes) -> Vec<usize> {
    let constants: HashSet<&str> = graph
        .nodes
        .iter()
        .filter(|n| n.op_type == "Constant")
        .flat_map(|n| n.outputs.iter().map(|s| s.as_str()))
        .chain(graph.initializers.keys().map(|s| s.as_str()))
        .collect();
    graph
        .nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| n.op_type == "Add" || n.op_type == "Sum")
        .filter(|(_, n)| {
            let computed: Vec<&String> = n
                .inputs
                .iter()
                .filter(|i| !i.is_empty() && !constants.contains(i.as_str()))
                .collect();
            computed.len() >= 2
                && computed.iter().all(|i| shapes.get(*i).map(|s| s.len()) == Some(4))
                && computed.windows(2).all(|w| shapes.get(w[0]) == shapes.get(w[1]))
        })
        .map(|(ix, _)| ix)
        .collect()
}

/// Values `value` depends on, itself included.
fn ancestors<'g>(
    graph: &'g Graph,
    producers: &HashMap<&str, usize>,
    value: &'g str,
) -> HashSet<&'g str> {
    let mut seen = HashSet::new();
    let mut stack = vec![value];
    while let Some(v) = stack.pop() {
        if !seen.insert(v) {
            continue;
        }
        if let Some(&p) = producers.get(v) {
            stack
                .extend(graph.nodes[p].inputs.iter().filter(|i| !i.is_empty()).map(|s| s.as_str()));
        }
    }
    seen
}

pub fn find_stages(graph: &Graph, shapes: &Shapes) -> Stages {
    let producers = graph.producers();
    let adds = residual_adds(graph, shapes);
    // The stem: the fork value of the first residual block and everything it depends on.
    let mut stem_nodes: HashSet<usize> = HashSet::new();
    if let Some(&first) = adds.first() {
        let node = &graph.nodes[first];
        let branches: Vec<HashSet<&str>> = node
            .inputs
            .iter()
            .filter(|i| shapes.get(*i).map(|s| s.len()) == Some(4))
            .map(|i| ancestors(graph, &producers, i))
            .collect();
        let common: HashSet<&str> = branches
            .iter()
            .skip(1)
            .fold(branches[0].clone(), |acc, b| acc.intersection(b).copied().collect());
        let fork = common
            .iter()
            .filter(|v| spatial(shapes, v).is_some())
            .filter_map(|v| producers.get(v).map(|&p| (p, *v)))
            .max();
        if let Some((_, fork)) = fork {
            for v in ancestors(graph, &producers, fork) {
                if let Some(&p) = producers.get(v) {
                    stem_nodes.insert(p);
                }
            }
        }
    }
    let residual = !adds.is_empty();
    let input_res = graph.inputs.first().and_then(|i| spatial(shapes, &i.name));

    let mut resolution: Vec<(usize, usize)> = Vec::new();
    let stem_res = stem_nodes
        .iter()
        .max()
        .and_then(|&p| graph.nodes[p].outputs.first())
        .and_then(|o| spatial(shapes, o))
        .or(input_res);
    if residual {
        resolution.push(stem_res.unwrap_or((0, 0)));
    }
    let first_body_stage = resolution.len();
    // Only the data path has stages: weight subgraphs (a 4-D kernel computed by nodes) must
    // not count as a resolution.
    let mut dynamic: HashSet<&str> = graph.inputs.iter().map(|i| i.name.as_str()).collect();
    let mut of_node = vec![0usize; graph.nodes.len()];
    for (ix, node) in graph.nodes.iter().enumerate() {
        if !node.inputs.iter().any(|i| dynamic.contains(i.as_str())) {
            continue;
        }
        dynamic.extend(node.outputs.iter().map(|s| s.as_str()));
        if stem_nodes.contains(&ix) {
            of_node[ix] = 0;
            continue;
        }
        let res = node.outputs.first().and_then(|o| spatial(shapes, o));
        of_node[ix] = match res {
            Some(r) => match resolution[first_body_stage..].iter().position(|&x| x == r) {
                Some(pos) => first_body_stage + pos,
                None => {
                    resolution.push(r);
                    resolution.len() - 1
                }
            },
            // No spatial dims: the stage of the latest computed input.
            None => node
                .inputs
                .iter()
                .filter_map(|i| producers.get(i.as_str()))
                .map(|&p| of_node[p])
                .max()
                .unwrap_or(first_body_stage.min(resolution.len().saturating_sub(1))),
        };
    }
    if resolution.is_empty() {
        resolution.push(input_res.unwrap_or((0, 0)));
    }
    // Trailing stages without ReLUs (global pooling to 1x1, the classifier) are part of the
    // last stage that has some: there is nothing in them to cull.
    let last_with_relus = (0..graph.nodes.len())
        .filter(|&ix| super::relu_kind(graph, &graph.nodes[ix]).is_some())
        .map(|ix| of_node[ix])
        .max();
    if let Some(last) = last_with_relus {
        of_node.iter_mut().for_each(|s| *s = (*s).min(last));
        resolution.truncate(last + 1);
    }
    Stages { of_node, resolution, residual }
}

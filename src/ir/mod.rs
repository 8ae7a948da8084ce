//! The intermediate representation every pass reads and writes.
//!
//! It stays close to ONNX (nodes name their input and output values by string) so that the
//! front end is a thin translation and emitted graphs keep the names users know, but it
//! owns decoded tensors and keeps nodes topologically sorted, which passes rely on.

pub mod channel_affine;
mod tensor;
mod verify;

pub use tensor::{DataType, Tensor};
pub use verify::{verify, VerifyError};

use std::collections::{BTreeMap, HashMap, HashSet};
use tract_onnx::pb;

/// A whole model: the graph plus the metadata that is written back unchanged.
#[derive(Debug, Clone)]
pub struct Model {
    pub ir_version: i64,
    pub opset_imports: Vec<pb::OperatorSetIdProto>,
    pub producer_name: String,
    pub producer_version: String,
    pub domain: String,
    pub model_version: i64,
    pub doc_string: String,
    pub metadata_props: Vec<pb::StringStringEntryProto>,
    pub graph: Graph,
}

/// One ONNX operator application.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub name: String,
    pub op_type: String,
    pub domain: String,
    /// Input value names; an empty string is an omitted optional input, as in ONNX.
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    pub attributes: Vec<pb::AttributeProto>,
}

/// A graph in topological order with its weights decoded.
#[derive(Debug, Clone, Default)]
pub struct Graph {
    pub name: String,
    /// Runtime inputs only: initializers are never listed here.
    pub inputs: Vec<pb::ValueInfoProto>,
    pub outputs: Vec<pb::ValueInfoProto>,
    /// Weights by value name; ordered so that emitted files are deterministic.
    pub initializers: BTreeMap<String, Tensor>,
    pub nodes: Vec<Node>,
}

impl Node {
    pub fn new(
        name: impl Into<String>,
        op_type: impl Into<String>,
        inputs: Vec<String>,
        outputs: Vec<String>,
    ) -> Self {
        Node {
            name: name.into(),
            op_type: op_type.into(),
            domain: String::new(),
            inputs,
            outputs,
            attributes: vec![],
        }
    }

    pub fn attr(&self, name: &str) -> Option<&pb::AttributeProto> {
        self.attributes.iter().find(|a| a.name == name)
    }
    pub fn attr_int(&self, name: &str) -> Option<i64> {
        self.attr(name).map(|a| a.i)
    }
    pub fn attr_float(&self, name: &str) -> Option<f32> {
        self.attr(name).map(|a| a.f)
    }
    pub fn attr_ints(&self, name: &str) -> Option<&[i64]> {
        self.attr(name).map(|a| a.ints.as_slice())
    }
    pub fn attr_string(&self, name: &str) -> Option<String> {
        self.attr(name).map(|a| String::from_utf8_lossy(&a.s).into_owned())
    }
    pub fn set_attr_ints(&mut self, name: &str, ints: Vec<i64>) {
        self.attributes.retain(|a| a.name != name);
        self.attributes.push(pb::AttributeProto {
            name: name.to_string(),
            r#type: pb::attribute_proto::AttributeType::Ints as i32,
            ints,
            ..Default::default()
        });
    }
    pub fn set_attr_float(&mut self, name: &str, f: f32) {
        self.attributes.retain(|a| a.name != name);
        self.attributes.push(pb::AttributeProto {
            name: name.to_string(),
            r#type: pb::attribute_proto::AttributeType::Float as i32,
            f,
            ..Default::default()
        });
    }
    pub fn set_attr_int(&mut self, name: &str, i: i64) {
        self.attributes.retain(|a| a.name != name);
        self.attributes.push(pb::AttributeProto {
            name: name.to_string(),
            r#type: pb::attribute_proto::AttributeType::Int as i32,
            i,
            ..Default::default()
        });
    }
    /// Input `ix`, or `None` when absent or omitted.
    pub fn input(&self, ix: usize) -> Option<&str> {
        self.inputs.get(ix).map(|s| s.as_str()).filter(|s| !s.is_empty())
    }
    /// A short label for messages: `'name' (Op)`.
    pub fn label(&self) -> String {
        format!("'{}' ({})", self.name, self.op_type)
    }
}

impl Graph {
    /// Index of the node producing each value.
    pub fn producers(&self) -> HashMap<&str, usize> {
        let mut map = HashMap::new();
        for (ix, node) in self.nodes.iter().enumerate() {
            for out in node.outputs.iter().filter(|o| !o.is_empty()) {
                map.insert(out.as_str(), ix);
            }
        }
        map
    }

    /// Indices of the nodes consuming each value (a node reading a value twice is listed twice).
    pub fn consumers(&self) -> HashMap<&str, Vec<usize>> {
        let mut map: HashMap<&str, Vec<usize>> = HashMap::new();
        for (ix, node) in self.nodes.iter().enumerate() {
            for inp in node.inputs.iter().filter(|i| !i.is_empty()) {
                map.entry(inp.as_str()).or_default().push(ix);
            }
        }
        map
    }

    pub fn is_graph_output(&self, value: &str) -> bool {
        self.outputs.iter().any(|o| o.name == value)
    }

    pub fn is_graph_input(&self, value: &str) -> bool {
        self.inputs.iter().any(|o| o.name == value)
    }

    /// A constant value: an initializer or the output of a `Constant` node with a tensor.
    pub fn constant(&self, value: &str) -> Option<Tensor> {
        if let Some(t) = self.initializers.get(value) {
            return Some(t.clone());
        }
        let node = self.nodes.iter().find(|n| n.outputs.iter().any(|o| o == value))?;
        if node.op_type != "Constant" {
            return None;
        }
        let attr = node.attr("value")?;
        Tensor::from_proto(attr.t.as_ref()?, None).ok()
    }

    /// Every value name in use: inputs, initializers, node outputs.
    pub fn value_names(&self) -> HashSet<String> {
        let mut names: HashSet<String> = self.inputs.iter().map(|i| i.name.clone()).collect();
        names.extend(self.initializers.keys().cloned());
        for node in &self.nodes {
            names.extend(node.outputs.iter().filter(|o| !o.is_empty()).cloned());
        }
        names
    }

    /// A name starting with `base` that no value or node uses yet.
    pub fn fresh_name(&self, base: &str) -> String {
        let values = self.value_names();
        let nodes: HashSet<&str> = self.nodes.iter().map(|n| n.name.as_str()).collect();
        if !values.contains(base) && !nodes.contains(base) {
            return base.to_string();
        }
        (1..)
            .map(|i| format!("{base}_{i}"))
            .find(|n| !values.contains(n) && !nodes.contains(n.as_str()))
            .expect("an unbounded range always yields a free name")
    }

    /// Replace every use of `old` (node inputs) by `new`. Graph outputs are not touched.
    pub fn replace_uses(&mut self, old: &str, new: &str) {
        for node in &mut self.nodes {
            for inp in node.inputs.iter_mut() {
                if inp == old {
                    *inp = new.to_string();
                }
            }
        }
    }

    /// Sort nodes topologically, keeping the original order among independent nodes so that
    /// output is deterministic. Fails on a cycle, naming a node on it.
    pub fn topo_sort(&mut self) -> Result<(), String> {
        let mut defined: HashSet<String> = self.inputs.iter().map(|i| i.name.clone()).collect();
        defined.extend(self.initializers.keys().cloned());
        let produced: HashSet<String> =
            self.nodes.iter().flat_map(|n| n.outputs.iter().cloned()).collect();
        let mut remaining: Vec<Option<Node>> = self.nodes.drain(..).map(Some).collect();
        let mut sorted = Vec::with_capacity(remaining.len());
        loop {
            let mut progressed = false;
            for slot in remaining.iter_mut() {
                let ready = match slot {
                    Some(node) => node
                        .inputs
                        .iter()
                        .all(|i| i.is_empty() || defined.contains(i) || !produced.contains(i)),
                    None => false,
                };
                if ready {
                    let node = slot.take().expect("checked above");
                    defined.extend(node.outputs.iter().cloned());
                    sorted.push(node);
                    progressed = true;
                }
            }
            if !progressed {
                break;
            }
        }
        let stuck: Vec<Node> = remaining.into_iter().flatten().collect();
        if let Some(node) = stuck.first() {
            let msg = format!("the graph has a cycle through node {}", node.label());
            sorted.extend(stuck);
            self.nodes = sorted;
            return Err(msg);
        }
        self.nodes = sorted;
        Ok(())
    }

    /// Remove nodes whose outputs no graph output depends on, and unused initializers.
    /// Returns how many nodes and initializers went.
    pub fn remove_dead(&mut self) -> (usize, usize) {
        let mut live: HashSet<String> = self.outputs.iter().map(|o| o.name.clone()).collect();
        let mut keep = vec![false; self.nodes.len()];
        for (ix, node) in self.nodes.iter().enumerate().rev() {
            if node.outputs.iter().any(|o| live.contains(o)) {
                keep[ix] = true;
                live.extend(node.inputs.iter().filter(|i| !i.is_empty()).cloned());
            }
        }
        let before_nodes = self.nodes.len();
        let mut it = keep.iter();
        self.nodes.retain(|_| *it.next().expect("same length"));
        let before_inits = self.initializers.len();
        self.initializers.retain(|name, _| live.contains(name));
        (before_nodes - self.nodes.len(), before_inits - self.initializers.len())
    }
}

impl Model {
    /// The default-domain opset the model imports.
    pub fn opset(&self) -> i64 {
        self.opset_imports
            .iter()
            .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
            .map(|o| o.version)
            .unwrap_or(1)
    }
}

impl Graph {
    /// Make every reader of `old` read `new` instead, so the node producing `old` can go.
    /// When `old` is a graph output, `new` takes over its name instead (the model's interface
    /// keeps its names); that needs `new` to be computed by a node and not be an output itself.
    /// Returns false, changing nothing, when that is impossible.
    pub fn forward_value(&mut self, old: &str, new: &str) -> bool {
        if !self.is_graph_output(old) {
            self.replace_uses(old, new);
            return true;
        }
        let produced_by_node = self.nodes.iter().any(|n| n.outputs.iter().any(|o| o == new));
        if !produced_by_node || self.is_graph_output(new) {
            return false;
        }
        for node in &mut self.nodes {
            for o in node.outputs.iter_mut().filter(|o| *o == new) {
                *o = format!("{old}\u{0}pending");
            }
        }
        self.replace_uses(new, old);
        // The node that produced `old` is about to be removed by the caller; until then the
        // renamed producer carries a placeholder so no value is defined twice.
        for node in &mut self.nodes {
            for o in node.outputs.iter_mut() {
                if *o == format!("{old}\u{0}pending") {
                    *o = old.to_string();
                } else if o == old {
                    *o = format!("{old}\u{0}removed");
                }
            }
        }
        true
    }

    /// Drop weights that no node reads and no output names; returns how many went.
    pub fn remove_unused_initializers(&mut self) -> usize {
        let used: HashSet<String> = self
            .nodes
            .iter()
            .flat_map(|n| n.inputs.iter().cloned())
            .chain(self.outputs.iter().map(|o| o.name.clone()))
            .collect();
        let before = self.initializers.len();
        self.initializers.retain(|name, _| used.contains(name));
        before - self.initializers.len()
    }

    /// Remove a one-input node that computes the identity on its data input `input_ix`.
    pub fn bypass_node(&mut self, ix: usize, input_ix: usize) -> bool {
        let node = &self.nodes[ix];
        let (Some(input), Some(output)) = (node.input(input_ix), node.outputs.first()) else {
            return false;
        };
        let (input, output) = (input.to_string(), output.clone());
        let name = node.name.clone();
        if !self.forward_value(&output, &input) {
            return false;
        }
        self.nodes.retain(|n| n.name != name);
        true
    }
}

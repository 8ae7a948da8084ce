//! The bytes of an emitted model. ONNX's schema is proto2, where a scalar field is either
//! present or absent; prost's generated types (used for reading) drop scalars equal to zero,
//! so an attribute `ceil_mode = 0` would lose its value and importers that test for presence
//! (CrypTen's ONNX converter does) refuse the node. These mirror types keep an attribute's
//! `f` and `i` present whenever the attribute's type says they carry its value. Field tags are
//! those of onnx.proto.

use tract_onnx::pb;

#[derive(Clone, PartialEq, prost::Message)]
pub struct Attribute {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(float, optional, tag = "2")]
    pub f: Option<f32>,
    #[prost(int64, optional, tag = "3")]
    pub i: Option<i64>,
    #[prost(bytes = "vec", tag = "4")]
    pub s: Vec<u8>,
    #[prost(message, optional, tag = "5")]
    pub t: Option<pb::TensorProto>,
    #[prost(float, repeated, tag = "7")]
    pub floats: Vec<f32>,
    #[prost(int64, repeated, tag = "8")]
    pub ints: Vec<i64>,
    #[prost(bytes = "vec", repeated, tag = "9")]
    pub strings: Vec<Vec<u8>>,
    #[prost(message, repeated, tag = "10")]
    pub tensors: Vec<pb::TensorProto>,
    #[prost(string, tag = "13")]
    pub doc_string: String,
    #[prost(int32, tag = "20")]
    pub r#type: i32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Node {
    #[prost(string, repeated, tag = "1")]
    pub input: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    pub output: Vec<String>,
    #[prost(string, tag = "3")]
    pub name: String,
    #[prost(string, tag = "4")]
    pub op_type: String,
    #[prost(message, repeated, tag = "5")]
    pub attribute: Vec<Attribute>,
    #[prost(string, tag = "7")]
    pub domain: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Graph {
    #[prost(message, repeated, tag = "1")]
    pub node: Vec<Node>,
    #[prost(string, tag = "2")]
    pub name: String,
    #[prost(message, repeated, tag = "5")]
    pub initializer: Vec<pb::TensorProto>,
    #[prost(message, repeated, tag = "11")]
    pub input: Vec<pb::ValueInfoProto>,
    #[prost(message, repeated, tag = "12")]
    pub output: Vec<pb::ValueInfoProto>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Model {
    #[prost(int64, tag = "1")]
    pub ir_version: i64,
    #[prost(string, tag = "2")]
    pub producer_name: String,
    #[prost(string, tag = "3")]
    pub producer_version: String,
    #[prost(string, tag = "4")]
    pub domain: String,
    #[prost(int64, tag = "5")]
    pub model_version: i64,
    #[prost(string, tag = "6")]
    pub doc_string: String,
    #[prost(message, optional, tag = "7")]
    pub graph: Option<Graph>,
    #[prost(message, repeated, tag = "8")]
    pub opset_import: Vec<pb::OperatorSetIdProto>,
    #[prost(message, repeated, tag = "14")]
    pub metadata_props: Vec<pb::StringStringEntryProto>,
}

pub fn attribute(a: &pb::AttributeProto) -> Attribute {
    use pb::attribute_proto::AttributeType;
    let kind = a.r#type;
    Attribute {
        name: a.name.clone(),
        f: (kind == AttributeType::Float as i32).then_some(a.f),
        i: (kind == AttributeType::Int as i32).then_some(a.i),
        s: a.s.clone(),
        t: a.t.clone(),
        floats: a.floats.clone(),
        ints: a.ints.clone(),
        strings: a.strings.clone(),
        tensors: a.tensors.clone(),
        doc_string: a.doc_string.clone(),
        r#type: kind,
    }
}

/// The wire form of a decoded model (graph-valued attributes never reach here: the front end
/// refuses them).
pub fn model(p: &pb::ModelProto) -> Model {
    Model {
        ir_version: p.ir_version,
        producer_name: p.producer_name.clone(),
        producer_version: p.producer_version.clone(),
        domain: p.domain.clone(),
        model_version: p.model_version,
        doc_string: p.doc_string.clone(),
        graph: p.graph.as_ref().map(|g| Graph {
            node: g
                .node
                .iter()
                .map(|n| Node {
                    input: n.input.clone(),
                    output: n.output.clone(),
                    name: n.name.clone(),
                    op_type: n.op_type.clone(),
                    attribute: n.attribute.iter().map(attribute).collect(),
                    domain: n.domain.clone(),
                })
                .collect(),
            name: g.name.clone(),
            initializer: g.initializer.clone(),
            input: g.input.clone(),
            output: g.output.clone(),
        }),
        opset_import: p.opset_import.clone(),
        metadata_props: p.metadata_props.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn zero_valued_int_attributes_stay_present() {
        let a = pb::AttributeProto {
            name: "ceil_mode".into(),
            r#type: pb::attribute_proto::AttributeType::Int as i32,
            i: 0,
            ..Default::default()
        };
        let bytes = attribute(&a).encode_to_vec();
        // Field 3 (i), varint 0: tag byte 0x18 followed by 0x00.
        assert!(bytes.windows(2).any(|w| w == [0x18, 0x00]), "{bytes:?}");
        // And it still decodes as the same attribute.
        assert_eq!(pb::AttributeProto::decode(bytes.as_slice()).unwrap(), a);
    }
}

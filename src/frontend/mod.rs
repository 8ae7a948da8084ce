//! ONNX in and out: the only place that knows the protobuf layout.

mod emit;
mod load;
mod wire;

pub use emit::{to_bytes, to_proto, write_bytes_atomic, write_model_atomic};
pub use load::{load_model, model_from_bytes, model_from_proto};

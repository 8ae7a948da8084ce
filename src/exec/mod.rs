//! Executors: the interpreters relucompile runs IR graphs with.
//! - [`engine`]: the native forward-only inference engine (whole batches, fused ReLUs).
//! - [`graph`]: the differentiable candle graph that fine-tuning, mask learning and
//!   recalibration run (trainable weights, inserted BatchNorms, ReLU masks).
//! - [`tract`]: tract, the independent reference: any graph it takes, one sample at a time.
//!
//! The two native ones share one typed decoding of the ONNX operators they take ([`op::Op`]).

pub mod engine;
pub mod graph;
pub mod op;
pub mod relu_mask;
pub mod tract;

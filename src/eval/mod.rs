//! Measuring graphs: the accuracy evaluator over the native engine or tract, and differential
//! checks of two graphs on the same inputs.

pub mod backend;
pub mod compare;
pub mod evaluator;

pub use backend::{Backend, EngineChoice, RunSpec};

//! CPU kernels on plain `f32` slices, and the candle custom ops that wrap them for autodiff.
//! The inference engine, the differentiable graph and the passes all run on these; nothing
//! here knows about graphs, passes or training loops.

pub mod batchnorm;
pub mod candle;
pub mod conv;
pub mod elementwise;
pub mod least_squares;
pub mod malloc;
pub mod pool;
pub mod stats;

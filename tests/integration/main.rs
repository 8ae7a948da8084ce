//! The integration suites as one test binary: linked once instead of fifteen times, which
//! saves minutes of every fresh `cargo test` on 2 cores. `cargo test --test integration pareto`
//! runs one suite.

mod bad_input;
mod census;
mod common;
mod compile_cli;
mod conventions;
mod corpus;
mod data_formats;
mod dimensions;
mod eval_cli;
mod finetune;
mod library_api;
mod linearize;
mod lossless;
mod lossy;
mod malformed;
mod pareto;
mod scale_out;
mod train_grad;

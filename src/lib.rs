//! relucompile: a ReLU-reduction compiler for private inference.
//!
//! The crate is laid out as a compiler:
//! - [`frontend`]: ONNX in (decode, validate, external data) and out (emit, atomic write).
//! - [`ir`]: the one graph representation every pass reads and writes, and its verifier.
//! - [`analysis`]: shapes (from tract), stages, the ReLU census, value ranges.
//! - [`passes`]: one file per pass, a registry and a textual pipeline.
//! - [`eval`]: the tract evaluator, data sets, differential comparison of two graphs.
//! - [`search`]: choosing lossy configurations (ReLU budgets, frontiers) on calibration data.
//! - [`report`]: tables for people and JSON for machines.
//! - [`train`]: knowledge-distillation fine-tuning of reduced graphs (candle autodiff).
//! - [`driver`]: the build steps as a library: compile, eval, pareto and finetune, each an
//!   option struct in and a typed report out.
//! - [`cli`]: the command-line front end, a thin layer over [`driver`].

pub mod analysis;
pub mod cli;
pub mod data;
pub mod driver;
pub mod error;
pub mod eval;
pub mod exec;
pub mod frontend;
pub mod ir;
pub mod kernels;
pub mod passes;
pub mod report;
pub mod search;
pub mod train;

/// The unit tests' skip policy, the same as the integration tests' (`tests/integration/common`):
/// a test whose prerequisite (data, a CPU feature) is missing skips with a notice, or fails
/// when `.ci/run` has set `RELUCOMPILE_REQUIRE_PREREQUISITES`.
#[cfg(test)]
pub(crate) fn prerequisite(available: bool, what: &str) -> bool {
    const REQUIRE_VAR: &str = "RELUCOMPILE_REQUIRE_PREREQUISITES";
    if !available {
        assert!(
            std::env::var_os(REQUIRE_VAR).is_none(),
            "{what} is missing and {REQUIRE_VAR} is set"
        );
        eprintln!("SKIPPED: {what} is missing");
    }
    available
}

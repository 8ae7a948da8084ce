//! Typed errors for the cases a caller (or a build pipeline, through the exit code) branches on.

use std::fmt;

/// Process exit codes. They are part of the CLI contract and listed in `--help` and the README.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitCode {
    /// Success.
    Ok = 0,
    /// An internal error or an I/O failure not caused by the input model.
    Internal = 1,
    /// Bad command-line usage (clap's own code).
    Usage = 2,
    /// The input model cannot be read: not ONNX, truncated, inconsistent graph.
    InvalidModel = 3,
    /// The model is valid ONNX but uses a construct relucompile does not handle.
    Unsupported = 4,
    /// A lossless rewrite changed the outputs; nothing was written.
    OutputMismatch = 5,
    /// The data set cannot be read or does not fit the model.
    InvalidData = 6,
    /// The accuracy gate (`--max-drop`) failed; nothing was written.
    AccuracyGate = 7,
}

/// An error that carries its exit code; anything else exits with [`ExitCode::Internal`].
#[derive(Debug)]
pub struct CompileError {
    pub code: ExitCode,
    pub message: String,
}

impl CompileError {
    pub fn new(code: ExitCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }
    pub fn invalid_model(message: impl Into<String>) -> Self {
        Self::new(ExitCode::InvalidModel, message)
    }
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(ExitCode::Unsupported, message)
    }
    pub fn invalid_data(message: impl Into<String>) -> Self {
        Self::new(ExitCode::InvalidData, message)
    }
}

impl fmt::Display for CompileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CompileError {}

/// The exit code for an error chain: the first [`CompileError`] in it decides.
pub fn exit_code_of(err: &anyhow::Error) -> ExitCode {
    err.chain()
        .find_map(|e| e.downcast_ref::<CompileError>())
        .map(|e| e.code)
        .unwrap_or(ExitCode::Internal)
}

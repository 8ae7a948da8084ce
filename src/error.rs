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
    /// Accuracy would be measured on a guess: no flag, metadata or graph states the pixel
    /// normalisation, or the original scores near chance on the data as fed.
    Normalisation = 8,
    /// `pareto --merge` found points no shard has trained yet: run the missing shards (a
    /// scheduler may retry the merge once they are done).
    Incomplete = 9,
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

thread_local! {
    static INSIDE_TRACT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether this thread is inside [`catch_tract`]. A panic there comes from tract on a graph it
/// cannot handle and becomes an error, so a panic hook should stay quiet about it (the binary's
/// hook does; the fuzz targets' hook aborts only on panics outside tract).
pub fn inside_tract() -> bool {
    INSIDE_TRACT.with(|c| c.get())
}

/// Run a tract call, turning a panic inside tract into an error: a malformed graph must give
/// a message and an exit code, never a crash.
pub fn catch_tract<T>(f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    let outer = INSIDE_TRACT.with(|c| c.replace(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    INSIDE_TRACT.with(|c| c.set(outer));
    match result {
        Ok(result) => result,
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Err(anyhow::anyhow!("tract failed on this graph (internal error: {msg})"))
        }
    }
}

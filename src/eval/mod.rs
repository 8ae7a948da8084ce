//! Running graphs: the tract runner, data sets, the accuracy evaluator and differential checks.

pub mod compare;
pub mod data;
pub mod evaluator;
pub mod runner;

pub use runner::Runner;

/// Run a tract call, turning a panic inside tract into an error: a malformed graph must give
/// a message and an exit code, never a crash.
pub fn catch_tract<T>(f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(result) => result,
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Err(anyhow::anyhow!("tract panicked: {msg}"))
        }
    }
}

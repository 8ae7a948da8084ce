//! Running graphs: the native engine, the tract runner, data sets, the accuracy evaluator and differential checks.

pub mod backend;
pub mod compare;
pub mod data;
pub mod engine;
pub mod evaluator;
pub mod runner;

pub use backend::{Backend, EngineChoice, RunSpec};
pub use runner::Runner;

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

//! What both fuzz targets share.

/// Abort (report a crash) on any panic except tract's, which relucompile catches and reports
/// as an error: those are not crashes of the product.
pub fn abort_on_our_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            if !relucompile::error::inside_tract() {
                eprintln!("{info}");
                std::process::abort();
            }
        }))
    });
}

//! CPU kernels on plain `f32` slices, and the candle custom ops that wrap them for autodiff.
//! The inference engine, the differentiable graph and the passes all run on these; nothing
//! here knows about graphs, passes or training loops.

/// Define a function whose body (safe code) is also compiled with the listed target features
/// and run so where the CPU has them all: the release build targets baseline x86-64, whose
/// SSE2 loops left the engine's ReLU and Add at a quarter of the time of its gemms, and its
/// short row copies and Winograd transforms narrow (perf, shipped ResNet).
macro_rules! built_for {
    (
        [$($feature:tt),+]
        $(#[$meta:meta])*
        $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block
    ) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            if $(std::arch::is_x86_feature_detected!($feature))&&+ {
                $(#[target_feature(enable = $feature)])+
                #[allow(clippy::too_many_arguments)]
                unsafe fn built($($arg: $ty),*) $body
                // SAFETY: the CPU has these features, as just checked; the body is safe code.
                return unsafe { built($($arg),*) };
            }
            $body
        }
    };
}

pub mod batchnorm;
pub mod candle;
pub mod conv;
pub mod elementwise;
pub mod least_squares;
pub mod malloc;
pub mod pool;
pub mod stats;

//! What the candle custom ops over these kernels share.

use candle_core::{CpuStorage, Layout};

/// The f32 data of a contiguous candle operand (the custom ops here take no other).
pub fn cpu_slice<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("a custom op's operand is not contiguous"),
    }
}

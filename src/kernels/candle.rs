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

/// `f` of a tensor's f32 data: borrowed where it is a contiguous CPU tensor, else of a copy.
/// (The refit read its 100 MB inputs and targets by copying them: 0.2 GB of its 1.9 GB peak
/// at width 64, measured with heaptrack.)
pub fn with_f32<R>(t: &candle_core::Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    {
        let (storage, layout) = t.storage_and_layout();
        if let candle_core::Storage::Cpu(cpu) = &*storage {
            if let (Ok(data), Some((a, b))) = (cpu.as_slice::<f32>(), layout.contiguous_offsets()) {
                return Ok(f(&data[a..b]));
            }
        }
    }
    let copy: Vec<f32> = t.flatten_all()?.to_vec1()?;
    Ok(f(&copy))
}

//! Keep freed memory in the process. Training allocates and frees the same few-megabyte
//! tensors every step; glibc hands blocks that large straight back to the kernel (mmap and
//! munmap), so every step page-faults them in again, and with several threads faulting at
//! once that took a third of the wall time. Raising the mmap and trim thresholds makes
//! malloc reuse them instead.

/// Ask glibc's malloc to serve blocks up to 32 MiB from its heaps and to keep up to 1 GiB
/// of freed memory. Process-wide; returns whether the allocator took the settings (always
/// false off glibc, where it does nothing).
pub fn retain_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; any values are allowed and it
        // returns 0 for ones it rejects.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20) != 0
                && libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30) != 0
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn glibc_takes_the_thresholds() {
        let took = super::retain_freed_memory();
        assert_eq!(took, cfg!(all(target_os = "linux", target_env = "gnu")));
        // Allocation still works, above and below the new threshold.
        let big = vec![1u8; 40 << 20];
        let mid = vec![2u8; 8 << 20];
        assert_eq!(big[big.len() - 1] as usize + mid[0] as usize, 3);
    }
}

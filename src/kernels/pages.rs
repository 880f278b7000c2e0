//! Large buffers on 2 MB pages.
//!
//! The training step streams its parameters and both AdamW moments every step
//! (86 MB for the small model). On 4 KB pages that is a page-table walk every
//! 4 KB of every stream; on Linux's transparent huge pages it is one per 2 MB
//! (`docs/performance.md` has the before and after).

use std::mem::MaybeUninit;

/// `len` zeros in memory that asks the OS for 2 MB pages before it is first
/// touched (Linux: `madvise(MADV_HUGEPAGE)`). Where the OS grants none (other
/// systems, huge pages switched off, a buffer under 2 MB) the buffer is an
/// ordinary one: its values are the same either way.
pub fn zeroed(len: usize) -> Vec<f32> {
    let mut buffer = Vec::with_capacity(len);
    advise_huge_pages(buffer.spare_capacity_mut());
    buffer.resize(len, 0.0);
    buffer
}

/// Size of one huge page.
const HUGE_PAGE: usize = 2 << 20;

/// Asks for huge pages over the whole 4 KB pages inside `memory` (a hint: a
/// refusal changes nothing).
#[cfg(target_os = "linux")]
fn advise_huge_pages(memory: &mut [MaybeUninit<f32>]) {
    use nix::sys::mman::{MmapAdvise, madvise};
    const PAGE: usize = 4096;
    let first = memory.as_mut_ptr() as usize;
    let start = first.next_multiple_of(PAGE);
    let end = (first + std::mem::size_of_val(memory)) / PAGE * PAGE;
    if end < start + HUGE_PAGE {
        return;
    }
    let Some(addr) = std::ptr::NonNull::new(start as *mut std::ffi::c_void) else {
        return;
    };
    // SAFETY: [start, end) lies inside `memory`, which this function borrows
    // exclusively and which holds no values yet; MADV_HUGEPAGE changes only
    // how the kernel backs those pages, never their contents or validity.
    // A refusal (EINVAL when huge pages are off) is ignored: it is a hint.
    let _ = unsafe { madvise(addr, end - start, MmapAdvise::MADV_HUGEPAGE) };
}

#[cfg(not(target_os = "linux"))]
fn advise_huge_pages(_memory: &mut [MaybeUninit<f32>]) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_buffers_hold_zeros_of_the_asked_length() {
        for len in [0, 1, 1000, 3 << 20] {
            let buffer = zeroed(len);
            assert_eq!(buffer.len(), len);
            assert!(buffer.iter().all(|&v| v == 0.0));
        }
    }
}

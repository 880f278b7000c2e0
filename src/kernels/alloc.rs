//! A global allocator that counts what it hands out, for the benchmark's
//! `alloc_bytes` and the zero-allocation claims. The `moe` binary installs it:
//!
//! ```ignore
//! #[global_allocator]
//! static ALLOCATOR: rosetta_moe::kernels::CountingAllocator = rosetta_moe::kernels::CountingAllocator;
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

static BYTES: AtomicU64 = AtomicU64::new(0);
static COUNT: AtomicU64 = AtomicU64::new(0);

/// The system allocator, counting every allocation (and the size of every
/// reallocation) when installed as the global allocator.
#[derive(Debug, Default, Clone, Copy)]
pub struct CountingAllocator;

/// Bytes allocated so far (0 unless [`CountingAllocator`] is installed).
pub fn allocated_bytes() -> u64 {
    BYTES.load(Ordering::Relaxed)
}

/// Allocations made so far (0 unless [`CountingAllocator`] is installed).
pub fn allocation_count() -> u64 {
    COUNT.load(Ordering::Relaxed)
}

// SAFETY: every method forwards its arguments unchanged to the system
// allocator, whose contract is the same; the counters do not affect memory.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        COUNT.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract is GlobalAlloc::alloc's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        COUNT.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract is GlobalAlloc::alloc_zeroed's.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract is GlobalAlloc::dealloc's.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        BYTES.fetch_add(new_size as u64, Ordering::Relaxed);
        COUNT.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract is GlobalAlloc::realloc's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

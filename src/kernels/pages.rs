//! Where large buffers sit in memory.
//!
//! The training step streams its parameters and both AdamW moments every step
//! (86 MB for the small model). Two things about their addresses matter:
//! - Pages. On 4 KB pages every 4 KB of every stream costs a page-table walk;
//!   on Linux's transparent huge pages, one per 2 MB ([`zeroed`]).
//! - Offsets within a page. Large allocations all start at the same offset in
//!   a 4 KB page, so p[i], m[i] and v[i] share their low 12 address bits, and
//!   the CPU, which compares those bits to tell whether a load depends on an
//!   earlier store, stalls AdamW's loads behind its stores ("4K aliasing").
//!   A [`Buffer`] starts at a chosen quarter of a page instead.
//!
//! (`docs/performance.md` has the before and after of both.)

use std::ops::{Deref, DerefMut};

/// `len` zeros in memory that asks the OS for 2 MB pages before it is first
/// touched (Linux: `madvise(MADV_HUGEPAGE)`). Where the OS grants none (other
/// systems, huge pages switched off, a buffer under 2 MB) the buffer is an
/// ordinary one: its values are the same either way.
pub fn zeroed(len: usize) -> Vec<f32> {
    // A large zeroed allocation is fresh memory from the OS that nothing has
    // touched yet (so pages never written cost nothing): the advice comes
    // before any page exists.
    let mut buffer = vec![0.0; len];
    advise_huge_pages(&mut buffer);
    buffer
}

/// What a [`Buffer`] holds, which fixes the quarter of a 4 KB page its first
/// element sits in: the four streams AdamW reads together each get their
/// own, so p[i], m[i], v[i] and g[i] never share their low 12 address bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// The parameters p (the first quarter, where large allocations start).
    Params = 0,
    /// AdamW's first moment m.
    FirstMoment = 1,
    /// AdamW's second moment v.
    SecondMoment = 2,
    /// Gradients g (the trainer's buffer and the dW blocks formed in cache).
    Gradients = 3,
}

impl Stream {
    /// Quarter of a page (0 ..= 3) this stream starts in.
    fn quarter(self) -> usize {
        self as usize
    }
}

/// A zeroed `[f32]` (on 2 MB pages where the OS grants them, see [`zeroed`])
/// whose first element sits its [`Stream`]'s quarter of a 4 KB page in, so
/// that buffers of different streams never alias in their low 12 address
/// bits (see the module docs). Reads and writes as a slice.
#[derive(Debug)]
pub struct Buffer {
    /// The allocation: `len` floats from `start`, and up to 1023 before them.
    data: Vec<f32>,
    /// Index of the first element.
    start: usize,
    /// Elements.
    len: usize,
    /// What it holds (the quarter of a page its first element sits in).
    stream: Stream,
}

/// Floats in a 4 KB page.
const PAGE_FLOATS: usize = 1024;

impl Buffer {
    /// `len` zeros of `stream`, starting in its quarter of a page.
    pub fn zeroed(len: usize, stream: Stream) -> Self {
        let data = zeroed(len + PAGE_FLOATS);
        // First index whose address is the stream's quarter into a page.
        let base = data.as_ptr() as usize / 4 % PAGE_FLOATS;
        let start = (stream.quarter() * PAGE_FLOATS / 4 + PAGE_FLOATS - base) % PAGE_FLOATS;
        Buffer {
            data,
            start,
            len,
            stream,
        }
    }

    /// `values` as a buffer of `stream`: the vector itself when it already
    /// starts in the stream's quarter (as large allocations start in the
    /// first, the parameters'), else a copy.
    pub fn from_vec(values: Vec<f32>, stream: Stream) -> Self {
        if values.as_ptr() as usize % 4096 / 1024 != stream.quarter() {
            return Self::from_slice(&values, stream);
        }
        Buffer {
            len: values.len(),
            data: values,
            start: 0,
            stream,
        }
    }

    /// A copy of `values` as a buffer of `stream`.
    pub fn from_slice(values: &[f32], stream: Stream) -> Self {
        let mut buffer = Self::zeroed(values.len(), stream);
        buffer.copy_from_slice(values);
        buffer
    }
}

impl Deref for Buffer {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        &self.data[self.start..self.start + self.len]
    }
}

impl DerefMut for Buffer {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.data[self.start..self.start + self.len]
    }
}

impl Clone for Buffer {
    /// A copy in new memory, at the same quarter of a page.
    fn clone(&self) -> Self {
        Self::from_slice(self, self.stream)
    }
}

impl PartialEq for Buffer {
    /// Equal values (wherever they sit).
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

/// Size of one huge page.
const HUGE_PAGE: usize = 2 << 20;

/// Asks for huge pages over the whole 4 KB pages inside `memory` (a hint: a
/// refusal changes nothing).
#[cfg(target_os = "linux")]
fn advise_huge_pages(memory: &mut [f32]) {
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
    // exclusively; MADV_HUGEPAGE changes only how the kernel backs those
    // pages, never their contents or validity.
    // A refusal (EINVAL when huge pages are off) is ignored: it is a hint.
    let _ = unsafe { madvise(addr, end - start, MmapAdvise::MADV_HUGEPAGE) };
}

#[cfg(not(target_os = "linux"))]
fn advise_huge_pages(_memory: &mut [f32]) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_start_at_their_quarter_of_a_page_and_read_as_slices() {
        let streams = [
            Stream::Params,
            Stream::FirstMoment,
            Stream::SecondMoment,
            Stream::Gradients,
        ];
        for len in [0, 5, 3 << 20] {
            for (quarter, stream) in streams.into_iter().enumerate() {
                let mut buffer = Buffer::zeroed(len, stream);
                assert_eq!(buffer.len(), len);
                assert_eq!(buffer.as_ptr() as usize % 4096, quarter * 1024);
                assert!(buffer.iter().all(|&v| v == 0.0));
                buffer
                    .iter_mut()
                    .enumerate()
                    .for_each(|(i, v)| *v = i as f32);
                let copy = buffer.clone();
                assert_eq!(copy.as_ptr() as usize % 4096, quarter * 1024);
                assert!(copy == buffer && copy.iter().enumerate().all(|(i, &v)| v == i as f32));
                let adopted = Buffer::from_vec(buffer.to_vec(), stream);
                assert_eq!(adopted.as_ptr() as usize % 4096 / 1024, quarter);
                assert!(adopted == buffer);
            }
        }
    }

    #[test]
    fn zeroed_buffers_hold_zeros_of_the_asked_length() {
        for len in [0, 1, 1000, 3 << 20] {
            let buffer = zeroed(len);
            assert_eq!(buffer.len(), len);
            assert!(buffer.iter().all(|&v| v == 0.0));
        }
    }
}

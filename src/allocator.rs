//! The process's memory allocator: mimalloc (version 2), called the way its own API is meant
//! for the common case.
//!
//! The service allocates many small, short-lived buffers per call (about 190 a
//! RegisterPartner), which glibc's allocator serves markedly slower under concurrency. The
//! `mimalloc` crate's allocator passes every request to `mi_malloc_aligned`, whose fast path
//! checks the free block's alignment and whose fallback is slower still; most requests
//! (alignment at most 16, and not above the size) are ones mimalloc's plain `mi_malloc`
//! already satisfies, as it documents (`MI_MAX_ALIGN_SIZE`) and as its own
//! `mi_malloc_is_naturally_aligned` decides. Those go to `mi_malloc`, `mi_zalloc` and
//! `mi_realloc`; the rest to the aligned functions. The rule is the standard library's own for
//! `malloc` (`MIN_ALIGN` on x86-64 and aarch64 is 16).
//!
//! Version 2 (the `v2` feature): with version 3, the crate's default since 0.1.49, a
//! RegisterPartner cost about 9% more of the service's CPU (BENCHMARKS.md), most of it in the
//! allocation fast path, and the service's peak memory under SubmitClaim was 60-70 MiB
//! against 43 MiB.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// The largest alignment every block of `mi_malloc` has when its size is at least the
/// alignment (mimalloc's `MI_MAX_ALIGN_SIZE`).
const NATURAL_ALIGN: usize = 16;

/// A block for `layout` from `plain` when that satisfies its alignment ([`natural`]), else
/// from `aligned`.
///
/// # Safety
/// `plain` and `aligned` must be mimalloc's functions of one kind (`mi_malloc` and
/// `mi_malloc_aligned`, or `mi_zalloc` and `mi_zalloc_aligned`).
#[inline]
unsafe fn allocate(
    layout: Layout,
    plain: unsafe extern "C" fn(usize) -> *mut c_void,
    aligned: unsafe extern "C" fn(usize, usize) -> *mut c_void,
) -> *mut u8 {
    let (size, align) = (layout.size(), layout.align());
    // SAFETY: plain FFI calls; mimalloc returns null when out of memory.
    unsafe {
        if natural(size, align) {
            plain(size).cast()
        } else {
            aligned(size, align).cast()
        }
    }
}

/// mimalloc as the global allocator: `#[global_allocator] static A: MiMalloc = MiMalloc;`.
pub struct MiMalloc;

/// Whether a block of `size` bytes from the unaligned functions has `align`.
#[inline]
fn natural(size: usize, align: usize) -> bool {
    align <= NATURAL_ALIGN && align <= size
}

// SAFETY: every pointer returned comes from mimalloc with at least the layout's size and
// alignment: from the unaligned functions only where mimalloc guarantees that alignment
// (`natural`), from the aligned ones otherwise; every pointer freed or reallocated is one of
// them, which `mi_free` and `mi_realloc(_aligned)` take whichever function made it.
unsafe impl GlobalAlloc for MiMalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: both are mimalloc's allocation functions.
        unsafe { allocate(layout, mi::mi_malloc, mi::mi_malloc_aligned) }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: both are mimalloc's zeroing allocation functions.
        unsafe { allocate(layout, mi::mi_zalloc, mi::mi_zalloc_aligned) }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from this allocator (the caller's contract).
        unsafe { mi::mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let align = layout.align();
        // SAFETY: `ptr` came from this allocator with `layout` (the caller's contract); the
        // new block is chosen as in `alloc`, for the new size.
        unsafe {
            if natural(new_size, align) {
                mi::mi_realloc(ptr.cast::<c_void>(), new_size).cast()
            } else {
                mi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, align).cast()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Allocates `layout` from [`MiMalloc`], checks the block is aligned and holds its bytes
    /// through a reallocation to `grown`, and frees it.
    fn round_trip(layout: Layout, grown: usize, zeroed: bool) {
        let a = MiMalloc;
        // SAFETY: sizes are non-zero (the strategy's), each block is written within its
        // size, and freed once with the layout it has.
        unsafe {
            let p = if zeroed {
                a.alloc_zeroed(layout)
            } else {
                a.alloc(layout)
            };
            assert!(!p.is_null());
            assert_eq!(p as usize % layout.align(), 0, "{layout:?}");
            if zeroed {
                assert!(
                    std::slice::from_raw_parts(p, layout.size())
                        .iter()
                        .all(|&b| b == 0)
                );
            }
            for i in 0..layout.size() {
                *p.add(i) = i as u8;
            }
            let q = a.realloc(p, layout, grown);
            assert!(!q.is_null());
            assert_eq!(q as usize % layout.align(), 0, "{layout:?} to {grown}");
            for i in 0..layout.size().min(grown) {
                assert_eq!(*q.add(i), i as u8);
            }
            a.dealloc(q, Layout::from_size_align_unchecked(grown, layout.align()));
        }
    }

    #[test]
    fn every_alignment_is_honoured_at_the_edges_of_the_natural_rule() {
        for align_log in 0..=12 {
            let align = 1usize << align_log;
            for size in [1, 2, 3, 7, 8, 15, 16, 17, 24, 31, 32, 48, 100, 4096, 70_000] {
                let layout = Layout::from_size_align(size, align).unwrap();
                for grown in [1, size / 2 + 1, size + 1, size * 3] {
                    round_trip(layout, grown, false);
                    round_trip(layout, grown, true);
                }
            }
        }
    }

    proptest! {
        #[test]
        fn any_layout_gets_an_aligned_block_that_keeps_its_bytes(
            size in 1usize..20_000,
            align_log in 0u32..13,
            grown in 1usize..40_000,
            zeroed: bool,
        ) {
            let layout = Layout::from_size_align(size, 1 << align_log).unwrap();
            round_trip(layout, grown, zeroed);
        }
    }
}

//! The global allocator: mimalloc, asked for a plain block whenever one is aligned enough.
//!
//! The `mimalloc` crate passes every Rust allocation to `mi_malloc_aligned`, alignment 1 or 8
//! included. mimalloc 3 takes its fast path there only for a block of at most 1 KiB, and
//! takes a plain block without a copy of the alignment work only when the block's size is a
//! power of two: any other size (a 1.5 KiB boxed future, a 3 KiB buffer) goes through
//! `mi_theap_malloc_zero_aligned_at_generic`, which over-allocates by the alignment and
//! costs about 220 instructions where `mi_malloc` costs a few dozen. On the gateway, 24 of a
//! composite page's 123 allocations went that way; allocating took 9.8k of the page's 163.8k
//! instructions, and takes 7.1k asked plainly (161.1k in all; a proxied request 50.0k →
//! 49.5k; callgrind, README, "An allocator asked plainly").
//!
//! Every block `mi_malloc` returns is aligned to 16 bytes (`MI_MAX_ALIGN_SIZE`, as `malloc`
//! must be for `max_align_t`) or to its own size when smaller: mimalloc's size classes are
//! multiples of 8 bytes, of 16 above 16, and a page's first block starts 16-aligned. So a
//! layout whose alignment is at most 16 and divides its size gets a plain block, as Rust's
//! `System` allocator does with `malloc`; anything else keeps the aligned calls.
//! (The `mimalloc` crate has this change proposed, not merged: purpleprotocol/mimalloc_rust
//! pull request 170.)

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// The alignment every plain mimalloc block of 16 bytes or more has.
const PLAIN_ALIGN: usize = 16;

/// mimalloc as Rust's global allocator.
pub struct MiMalloc;

/// Whether a plain block is aligned enough for `layout`.
#[inline]
fn plain(layout: &Layout) -> bool {
    layout.align() <= PLAIN_ALIGN && layout.size().is_multiple_of(layout.align())
}

// SAFETY: each method hands mimalloc's own functions the size (and, unless a plain block is
// aligned enough, the alignment) of the layout; every block mimalloc gives, aligned or not,
// is released with `mi_free` and resized with `mi_realloc`(`_aligned`), as its API asks.
unsafe impl GlobalAlloc for MiMalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: mimalloc's allocation functions take any size and alignment.
        unsafe {
            if plain(&layout) {
                mi::mi_malloc(layout.size()).cast()
            } else {
                mi::mi_malloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        unsafe {
            if plain(&layout) {
                mi::mi_zalloc(layout.size()).cast()
            } else {
                mi::mi_zalloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from this allocator, hence from mimalloc.
        unsafe { mi::mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from mimalloc; the new block keeps the layout's alignment (a
        // plain one only when the alignment also divides the new size).
        unsafe {
            let new = Layout::from_size_align_unchecked(new_size, layout.align());
            if plain(&new) {
                mi::mi_realloc(ptr.cast::<c_void>(), new_size).cast()
            } else {
                mi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every layout up to 4 KiB, with each alignment up to 64 bytes, gets a block aligned as
    /// asked, writable over its whole size; zeroed blocks are zero; a resized block keeps its
    /// content and its alignment.
    #[test]
    fn blocks_are_aligned_as_asked_and_keep_their_content() {
        let a = MiMalloc;
        let mut kept = Vec::new();
        for align in [1usize, 2, 4, 8, 16, 32, 64] {
            for size in (1..=4096usize)
                .filter(|s| s.is_multiple_of(align) || *s < 64 || s.is_multiple_of(97))
            {
                let layout = Layout::from_size_align(size, align).unwrap();
                unsafe {
                    let p = a.alloc(layout);
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0, "size {size}, align {align}");
                    std::ptr::write_bytes(p, 0xA5, size);
                    let z = a.alloc_zeroed(layout);
                    assert_eq!(z as usize % align, 0, "zeroed: size {size}, align {align}");
                    assert!(std::slice::from_raw_parts(z, size).iter().all(|&b| b == 0));
                    let grown = a.realloc(p, layout, size * 3);
                    assert_eq!(
                        grown as usize % align,
                        0,
                        "grown: size {size}, align {align}"
                    );
                    assert!(
                        std::slice::from_raw_parts(grown, size)
                            .iter()
                            .all(|&b| b == 0xA5)
                    );
                    // Kept a while, so that later blocks come from partly used pages.
                    if size.is_multiple_of(7) {
                        kept.push((grown, Layout::from_size_align(size * 3, align).unwrap()));
                    } else {
                        a.dealloc(grown, Layout::from_size_align(size * 3, align).unwrap());
                    }
                    a.dealloc(z, layout);
                }
            }
        }
        for (p, layout) in kept {
            unsafe { a.dealloc(p, layout) };
        }
    }
}

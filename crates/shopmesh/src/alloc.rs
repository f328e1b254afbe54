//! The global allocator: mimalloc, asked for a plain block whenever one is aligned enough.
//!
//! The `mimalloc` crate passes every Rust allocation to `mi_malloc_aligned`, alignment 1 or 8
//! included. mimalloc 3 serves that from its fast path only for a block of at most 1 KiB
//! that happens to be aligned already. Anything larger goes through
//! `mi_theap_malloc_zero_aligned_at_generic` (about 220 instructions, where `mi_malloc`
//! costs a few dozen), which also over-allocates by the alignment unless the block's size
//! class is a power of two of at most 4 KiB (a 1.5 KiB boxed future, a 3 KiB buffer, any
//! block over 4 KiB). On the gateway, 24 of a composite page's 123 allocations went that way;
//! allocating took 9.8k of the page's 163.8k instructions, and takes 7.1k asked plainly
//! (161.1k in all; a proxied request 50.0k → 49.5k; callgrind, README, "An allocator asked
//! plainly").
//!
//! A plain block is aligned as `malloc` must align it: to 16 bytes (`max_align_t`,
//! mimalloc's `MI_MAX_ALIGN_SIZE`) when it is 16 bytes or more, and to at least the largest
//! power of two dividing its size when smaller. So a layout whose alignment is at most 16
//! and divides its size gets a plain block (Rust's `System` allocator makes the same choice
//! for `malloc` with a slightly different test); anything else keeps the aligned calls.
//! (The `mimalloc` crate has this change proposed, not merged: purpleprotocol/mimalloc_rust
//! pull request 170.)

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// The alignment every plain mimalloc block of 16 bytes or more has.
const PLAIN_ALIGN: usize = 16;

/// mimalloc as Rust's global allocator.
pub struct MiMalloc;

/// Whether a plain block of `size` bytes is aligned enough for `align`.
#[inline]
fn plain(size: usize, align: usize) -> bool {
    align <= PLAIN_ALIGN && size.is_multiple_of(align)
}

// SAFETY: each method hands mimalloc's own functions the size (and, unless a plain block is
// aligned enough, the alignment) of the layout; every block mimalloc gives, aligned or not,
// is released with `mi_free` and resized with `mi_realloc`(`_aligned`), as its API asks.
unsafe impl GlobalAlloc for MiMalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: mimalloc's allocation functions take any size and alignment.
        unsafe {
            if plain(layout.size(), layout.align()) {
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
            if plain(layout.size(), layout.align()) {
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
            if plain(new_size, layout.align()) {
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

    /// Layouts of every size up to 4 KiB at alignment 1, and at alignments 2 to 64 the sizes
    /// that are multiples of the alignment plus every size under 64 (the layouts whose
    /// alignment does not divide the size, which must take the aligned calls): each block is
    /// aligned as asked and writable over its whole size, a zeroed one is zero, and a block
    /// resized (grown by one byte, which moves it between the plain and the aligned calls
    /// whenever the alignment is above 1, then grown threefold, then shrunk to half) keeps
    /// its content and its alignment.
    #[test]
    fn blocks_are_aligned_as_asked_and_keep_their_content() {
        let a = MiMalloc;
        let mut kept = Vec::new();
        for align in [1usize, 2, 4, 8, 16, 32, 64] {
            for size in (1..=4096usize).filter(|s| s.is_multiple_of(align) || *s < 64) {
                let layout = Layout::from_size_align(size, align).unwrap();
                unsafe {
                    let mut p = a.alloc(layout);
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0, "size {size}, align {align}");
                    std::ptr::write_bytes(p, 0xA5, size);
                    let z = a.alloc_zeroed(layout);
                    assert!(!z.is_null());
                    assert_eq!(z as usize % align, 0, "zeroed: size {size}, align {align}");
                    assert!(std::slice::from_raw_parts(z, size).iter().all(|&b| b == 0));
                    a.dealloc(z, layout);
                    let mut current = layout;
                    for new_size in [size + 1, (size + 1) * 3, (size + 1) * 3 / 2] {
                        let q = a.realloc(p, current, new_size);
                        assert!(!q.is_null());
                        assert_eq!(
                            q as usize % align,
                            0,
                            "resized: {size} → {new_size}, align {align}"
                        );
                        let kept_bytes = current.size().min(new_size);
                        assert!(
                            std::slice::from_raw_parts(q, kept_bytes)
                                .iter()
                                .all(|&b| b == 0xA5),
                            "resized: {size} → {new_size}, align {align}: content lost"
                        );
                        std::ptr::write_bytes(q, 0xA5, new_size);
                        p = q;
                        current = Layout::from_size_align(new_size, align).unwrap();
                    }
                    // Kept a while, so that later blocks come from partly used pages.
                    if size.is_multiple_of(7) {
                        kept.push((p, current));
                    } else {
                        a.dealloc(p, current);
                    }
                }
            }
        }
        for (p, layout) in kept {
            unsafe { a.dealloc(p, layout) };
        }
    }
}

//! The simulator binary's allocator: mimalloc, asked for plain blocks where the layout allows.
//!
//! A run allocates and frees a few small objects per simulated event. The `mimalloc` crate's
//! allocator asks mimalloc for every block with an alignment (`mi_malloc_aligned`), whose fast
//! path goes through four calls and an alignment check before it takes a block; `mi_malloc`
//! takes one from the same free list directly. Every mimalloc block is aligned to at least
//! [`PLAIN_ALIGN`] (its size classes are whole machine words), so a layout asking for no more
//! gets a plain block; a larger alignment still goes to the aligned calls.

// An allocator is unsafe code by its nature: the calls into mimalloc, each with its reason.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// The alignment every mimalloc block has: a machine word.
pub const PLAIN_ALIGN: usize = std::mem::size_of::<usize>();

/// mimalloc, with plain calls for word-aligned layouts (see the module documentation).
#[derive(Debug, Default, Clone, Copy)]
pub struct SimAllocator;

// SAFETY: every method hands the layout's size to mimalloc, with its alignment when that is
// above what every mimalloc block has; blocks are freed and resized by mimalloc, which finds
// their size and alignment itself.
unsafe impl GlobalAlloc for SimAllocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: mimalloc's allocation functions accept any size and a power-of-two alignment.
        unsafe {
            match layout.align() <= PLAIN_ALIGN {
                true => mi::mi_malloc(layout.size()).cast(),
                false => mi::mi_malloc_aligned(layout.size(), layout.align()).cast(),
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        unsafe {
            match layout.align() <= PLAIN_ALIGN {
                true => mi::mi_zalloc(layout.size()).cast(),
                false => mi::mi_zalloc_aligned(layout.size(), layout.align()).cast(),
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from this allocator, so from mimalloc.
        unsafe { mi::mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from this allocator with `layout`'s alignment; the new block keeps
        // it.
        unsafe {
            match layout.align() <= PLAIN_ALIGN {
                true => mi::mi_realloc(ptr.cast::<c_void>(), new_size).cast(),
                false => {
                    mi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_have_the_alignment_their_layout_asks_for() {
        let allocator = SimAllocator;
        let mut blocks = Vec::new();
        // Sizes around mimalloc's word-sized classes (24 and 40 bytes are not 16-aligned
        // classes), each with every alignment from a byte to a page.
        for size in [1, 7, 8, 12, 16, 24, 40, 56, 100, 1000, 70_000] {
            for align in [1, 2, 4, 8, 16, 32, 64, 4096] {
                for zeroed in [false, true] {
                    let layout = Layout::from_size_align(size, align).unwrap();
                    // SAFETY: a layout of non-zero size; freed below with the same layout.
                    let ptr = unsafe {
                        match zeroed {
                            true => allocator.alloc_zeroed(layout),
                            false => allocator.alloc(layout),
                        }
                    };
                    assert!(!ptr.is_null());
                    assert_eq!(ptr as usize % align, 0, "size {size} align {align}");
                    if zeroed {
                        // SAFETY: `size` bytes were just allocated at `ptr`.
                        let bytes = unsafe { std::slice::from_raw_parts(ptr, size) };
                        assert!(bytes.iter().all(|&b| b == 0));
                    }
                    // SAFETY: as above; writes within the block.
                    unsafe { ptr.write_bytes(0xAB, size) };
                    blocks.push((ptr, layout));
                }
            }
        }
        for (ptr, layout) in blocks {
            let new_size = layout.size() * 3 + 5;
            // SAFETY: `ptr` was allocated with `layout` and not freed.
            let grown = unsafe { allocator.realloc(ptr, layout, new_size) };
            assert!(!grown.is_null());
            assert_eq!(grown as usize % layout.align(), 0, "{layout:?} grown");
            // SAFETY: the first `layout.size()` bytes were kept by the resize.
            let kept = unsafe { std::slice::from_raw_parts(grown, layout.size()) };
            assert!(kept.iter().all(|&b| b == 0xAB), "{layout:?} lost its bytes");
            let layout = Layout::from_size_align(new_size, layout.align()).unwrap();
            // SAFETY: `grown` holds `layout` now.
            unsafe { allocator.dealloc(grown, layout) };
        }
    }
}

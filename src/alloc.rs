//! The daemon's global allocator: mimalloc, asked for a plain block whenever the alignment allows.
//!
//! The `mimalloc` crate's allocator (used before) passes every request to `mi_malloc_aligned`, whose fast path
//! only serves blocks up to 1 KiB; anything larger (hyper's buffers, the boxed futures of a call)
//! took mimalloc's generic aligned path, and when the size was not a power of two its
//! over-allocating fallback. mimalloc's plain `mi_malloc` aligns every block to 16 bytes
//! (`MI_MAX_ALIGN_SIZE`), as the system allocator does, so that is what it is asked for when the
//! alignment is at most 16 and the size at least the alignment (the rule of std's `System`
//! allocator). Each plain block's alignment is still checked (two instructions): should a
//! differently built mimalloc ever pad its blocks, the aligned call takes over instead of a
//! misaligned pointer reaching the program. `bench/callgrind.sh`: about 2k instructions fewer per
//! proxied call (bench/HISTORY.md, step 27).
//!
//! This is the one module where `unsafe` is allowed (`unsafe_code = "deny"` elsewhere): a
//! `GlobalAlloc` is an `unsafe` trait.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// The alignment of every block mimalloc hands out (`MI_MAX_ALIGN_SIZE`).
const PLAIN_ALIGN: usize = 16;

/// mimalloc as the global allocator (`src/main.rs`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Allocator;

/// Whether a plain block can serve `align` for `size` bytes.
#[inline]
fn plain(align: usize, size: usize) -> bool {
    align <= PLAIN_ALIGN && align <= size
}

#[inline]
fn aligned(p: *mut c_void, align: usize) -> bool {
    (p as usize) & (align - 1) == 0
}

/// A new block for `layout` from `plain_call` (mimalloc's `mi_malloc` or `mi_zalloc`) when a plain block
/// serves the alignment, else from `aligned_call` (their `_aligned` twins).
///
/// # Safety
/// `plain_call` and `aligned_call` are mimalloc allocation functions of those shapes.
#[inline]
unsafe fn block(
    layout: Layout,
    plain_call: unsafe extern "C" fn(usize) -> *mut c_void,
    aligned_call: unsafe extern "C" fn(usize, usize) -> *mut c_void,
) -> *mut u8 {
    let (size, align) = (layout.size(), layout.align());
    // SAFETY: mimalloc's functions take any size and a power-of-two alignment (a `Layout`'s); a
    // plain block that fails the check is freed before the aligned call replaces it.
    unsafe {
        if plain(align, size) {
            let p = plain_call(size);
            if aligned(p, align) {
                return p.cast();
            }
            mi::mi_free(p);
        }
        aligned_call(size, align).cast()
    }
}

unsafe impl GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: `mi_malloc` and `mi_malloc_aligned` are what `block` takes.
        unsafe { block(layout, mi::mi_malloc, mi::mi_malloc_aligned) }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: `mi_zalloc` and `mi_zalloc_aligned` are what `block` takes.
        unsafe { block(layout, mi::mi_zalloc, mi::mi_zalloc_aligned) }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from this allocator, i.e. from mimalloc, which frees any of its blocks.
        unsafe { mi::mi_free(ptr.cast()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let align = layout.align();
        // SAFETY: `ptr` is a live block of this allocator holding `layout.size()` bytes (the
        // caller's contract). A plain reallocation whose result fails the check is moved once
        // more into an aligned block, copying the `min(old, new)` bytes it kept.
        unsafe {
            if plain(align, new_size) {
                let p = mi::mi_realloc(ptr.cast(), new_size);
                if p.is_null() || aligned(p, align) {
                    return p.cast();
                }
                let q = mi::mi_malloc_aligned(new_size, align);
                if !q.is_null() {
                    std::ptr::copy_nonoverlapping(
                        p.cast::<u8>(),
                        q.cast::<u8>(),
                        layout.size().min(new_size),
                    );
                }
                mi::mi_free(p);
                return q.cast();
            }
            mi::mi_realloc_aligned(ptr.cast(), new_size, align).cast()
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const SIZES: [usize; 16] = [
        1, 7, 8, 15, 16, 24, 40, 48, 100, 1000, 1024, 1025, 1500, 4097, 9000, 70_000,
    ];
    const ALIGNS: [usize; 7] = [1, 2, 8, 16, 32, 128, 4096];

    fn layouts() -> impl Iterator<Item = Layout> {
        SIZES.into_iter().flat_map(|size| {
            ALIGNS
                .into_iter()
                .map(move |align| Layout::from_size_align(size, align).unwrap())
        })
    }

    fn fill(p: *mut u8, len: usize, seed: u8) {
        for i in 0..len {
            // SAFETY: `p` holds at least `len` bytes.
            unsafe { p.add(i).write(seed.wrapping_add(i as u8)) }
        }
    }

    fn holds(p: *const u8, len: usize, seed: u8) -> bool {
        // SAFETY: `p` holds at least `len` initialized bytes.
        (0..len).all(|i| unsafe { p.add(i).read() } == seed.wrapping_add(i as u8))
    }

    #[test]
    fn every_block_has_its_alignment_and_its_whole_size() {
        let a = Allocator;
        for layout in layouts() {
            // Many at once, so blocks come from the middle of pages too, not only their starts.
            let blocks: Vec<*mut u8> = (0..64)
                .map(|k| {
                    // SAFETY: a non-zero-sized layout.
                    let p = unsafe { a.alloc(layout) };
                    assert!(!p.is_null(), "{layout:?}");
                    assert_eq!(p as usize % layout.align(), 0, "{layout:?}");
                    fill(p, layout.size(), k);
                    p
                })
                .collect();
            for (k, p) in blocks.into_iter().enumerate() {
                assert!(
                    holds(p, layout.size(), k as u8),
                    "{layout:?}: a block was overwritten"
                );
                // SAFETY: allocated above with `layout`.
                unsafe { a.dealloc(p, layout) };
            }
        }
    }

    #[test]
    fn zeroed_blocks_are_zero_and_aligned() {
        let a = Allocator;
        for layout in layouts() {
            // Dirty the allocator's free lists first, so zeroing is not an accident of fresh pages.
            // SAFETY: a non-zero-sized layout; freed right away.
            unsafe {
                let p = a.alloc(layout);
                fill(p, layout.size(), 0xA5);
                a.dealloc(p, layout);
            }
            // SAFETY: a non-zero-sized layout.
            let p = unsafe { a.alloc_zeroed(layout) };
            assert!(!p.is_null());
            assert_eq!(p as usize % layout.align(), 0, "{layout:?}");
            // SAFETY: `p` holds `layout.size()` bytes.
            assert!(
                (0..layout.size()).all(|i| unsafe { p.add(i).read() } == 0),
                "{layout:?}"
            );
            // SAFETY: allocated above with `layout`.
            unsafe { a.dealloc(p, layout) };
        }
    }

    #[test]
    fn realloc_keeps_the_contents_and_the_alignment_growing_and_shrinking() {
        let a = Allocator;
        for layout in layouts() {
            for new_size in SIZES {
                // SAFETY: a non-zero-sized layout; `new_size` is non-zero and, rounded up to the
                // alignment, does not overflow.
                unsafe {
                    let p = a.alloc(layout);
                    fill(p, layout.size(), 3);
                    let q = a.realloc(p, layout, new_size);
                    assert!(!q.is_null());
                    assert_eq!(q as usize % layout.align(), 0, "{layout:?} -> {new_size}");
                    assert!(
                        holds(q, layout.size().min(new_size), 3),
                        "{layout:?} -> {new_size}: contents lost"
                    );
                    a.dealloc(
                        q,
                        Layout::from_size_align(new_size, layout.align()).unwrap(),
                    );
                }
            }
        }
    }
}

//! The process's allocator: the C library's `malloc`, with small over-aligned blocks asked of
//! `malloc` itself rather than of `posix_memalign`.
//!
//! Why: tokio aligns its task cells and its I/O registrations to 128 bytes (each on cache
//! lines of its own). glibc (2.36 here) serves every such request the slow way: under the
//! arena's lock it asks its bins for the size plus the alignment, cuts the block out, and frees
//! the slack back into the bins; and the aligned block's `free` fills the per-thread cache,
//! which `posix_memalign` never draws from. A TLS passthrough connection made three such
//! blocks (its task and its two sockets' registrations): about 2k instructions of its ~27k
//! (docs/performance.md, "Over-aligned blocks from glibc's per-thread cache").
//!
//! What: a block aligned to more than `malloc`'s own 16 bytes and at most 128, whose size with
//! the alignment added is within glibc's per-thread cache (1,032 bytes), is taken from
//! `malloc` with the alignment added to its size and handed out at the first aligned address
//! past its start; the distance is kept in the byte before that address, for `free`. The
//! price is memory: up to the alignment (128 bytes) more per such block, where
//! `posix_memalign` gave the slack back. Every other request goes to [`System`] unchanged.
//!
//! The gain is glibc 2.36's (this project's hosts and its image's base, Debian 12): glibc 2.38
//! and later look in the per-thread cache for aligned requests themselves, and there the
//! padding would mostly cost memory. Measure on the C library the image ships.
//!
//! Why `unsafe`, and only here: a global allocator is an `unsafe` trait, and it computes
//! pointers. Every block handed out lies inside the block `malloc` returned, and the byte read
//! back at `free` is one this module wrote, outside the caller's block.

#![allow(
    unsafe_code,
    reason = "a global allocator: see the module's documentation"
)]

use std::alloc::{GlobalAlloc, Layout, System};

/// The allocator of the `wasmbed` binary, every role (see the module's documentation).
pub struct Allocator;

/// What `malloc` aligns every block to (glibc and musl on 64-bit targets; also what
/// [`System`] relies on there). Smaller alignments need nothing.
const MALLOC_ALIGN: usize = 16;

/// The largest alignment served by padding: the distance to the aligned address (1 to the
/// alignment) must fit the one byte kept before it.
const MAX_PADDED_ALIGN: usize = 128;

/// The largest request glibc's per-thread cache serves (`tcache_max_bytes`' default). Past it
/// a padded block would come from the bins too, with the padding's memory and no gain.
const TCACHE_MAX_BYTES: usize = 1032;

/// The size asked of `malloc` for `layout`, if it is served by padding.
fn padded(layout: Layout) -> Option<usize> {
    let align = layout.align();
    if align <= MALLOC_ALIGN || align > MAX_PADDED_ALIGN {
        return None;
    }
    let size = layout.size().checked_add(align)?;
    (size <= TCACHE_MAX_BYTES).then_some(size)
}

/// The layout of the block asked of `malloc` for a padded request of `size` bytes.
///
/// # Safety
/// `size` is what [`padded`] returned: at most [`TCACHE_MAX_BYTES`].
unsafe fn outer(size: usize) -> Layout {
    debug_assert!(size <= TCACHE_MAX_BYTES);
    // SAFETY: `size` is small (the caller's contract), and MALLOC_ALIGN a power of two.
    unsafe { Layout::from_size_align_unchecked(size, MALLOC_ALIGN) }
}

/// The first address aligned to `align` strictly past `raw`, with its distance from `raw`
/// kept in the byte before it. Null stays null.
///
/// # Safety
/// `raw` is null or the start of a block of the caller's size plus `align` bytes (what
/// [`padded`] returned), and `align` is a power of two of at most [`MAX_PADDED_ALIGN`].
unsafe fn shift(raw: *mut u8, align: usize) -> *mut u8 {
    if raw.is_null() {
        return raw;
    }
    #[cfg(test)]
    tests::PADDED.with(|n| n.set(n.get() + 1));
    // 1..=align: the byte before the aligned address is inside the block, and the caller's
    // `size` bytes after it end at most `align + size` bytes past `raw`.
    let offset = align - (raw as usize & (align - 1));
    // SAFETY: `offset <= align`, within the block (see above).
    let aligned = unsafe { raw.add(offset) };
    // SAFETY: `aligned - 1 >= raw`, inside the block; `offset <= 128` fits a byte.
    unsafe { aligned.sub(1).write(offset as u8) };
    aligned
}

/// The start of the `malloc` block a padded block `ptr` was handed out from.
///
/// # Safety
/// `ptr` was returned by [`shift`].
unsafe fn unshift(ptr: *mut u8) -> *mut u8 {
    // SAFETY: `shift` wrote the distance in the byte before `ptr`, inside the same block.
    let offset = usize::from(unsafe { ptr.sub(1).read() });
    // SAFETY: `ptr - offset` is the start of that block.
    unsafe { ptr.sub(offset) }
}

// SAFETY: every block comes from `System` (the C library's allocator); a padded block is
// aligned as asked and lies inside the block `System` returned (see `shift`), and is given
// back through the same `padded` decision, made on the same layout.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match padded(layout) {
            // SAFETY: the caller's contract, passed on.
            None => unsafe { System.alloc(layout) },
            // SAFETY: a block of `size` = the caller's size + the alignment.
            Some(size) => unsafe { shift(System.alloc(outer(size)), layout.align()) },
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        match padded(layout) {
            // SAFETY: the caller's contract, passed on.
            None => unsafe { System.alloc_zeroed(layout) },
            // SAFETY: as in `alloc`; the whole block is zeroed, the caller's part with it.
            Some(size) => unsafe { shift(System.alloc_zeroed(outer(size)), layout.align()) },
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        match padded(layout) {
            // SAFETY: the caller's contract, passed on.
            None => unsafe { System.dealloc(ptr, layout) },
            // SAFETY: `ptr` was allocated with this layout, so by `shift`, from a block of
            // `outer(size)`.
            Some(size) => unsafe { System.dealloc(unshift(ptr), outer(size)) },
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.align() <= MALLOC_ALIGN {
            // SAFETY: the caller's contract, passed on; such blocks are never padded.
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        // Over-aligned: a new block, the bytes copied, the old one freed (what `System` does
        // for these too), each through the padding's decision for its own size.
        let Ok(new_layout) = Layout::from_size_align(new_size, layout.align()) else {
            return std::ptr::null_mut();
        };
        // SAFETY: `new_layout` has a non-zero size (the caller's contract for `new_size`).
        let new = unsafe { self.alloc(new_layout) };
        if !new.is_null() {
            // SAFETY: both blocks hold at least the smaller size, and are distinct.
            unsafe {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
        }
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    thread_local! {
        /// Padded blocks handed out on this thread, by `alloc` or `alloc_zeroed` (a `const`
        /// cell: reading it allocates nothing, as an allocator needs).
        pub(super) static PADDED: Cell<usize> = const { Cell::new(0) };
    }

    /// Padded blocks allocated on this thread while `f` runs.
    fn padded_during(f: impl FnOnce()) -> usize {
        let before = PADDED.with(Cell::get);
        f();
        PADDED.with(Cell::get) - before
    }

    /// tokio's own blocks, as this build lays them out, take the padded path: the task cell
    /// of a future the size a passthrough session's may reach (656 bytes:
    /// `session::tests::session_tasks_stay_small`) and a socket's I/O registration. A
    /// terminated session's larger cell does not. Fails if tokio's layout moves a bound.
    #[test]
    fn tokios_blocks_take_the_padded_path() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap();
        let _entered = rt.enter();
        let session_sized = [1u8; 656];
        let spawned = padded_during(|| {
            drop(tokio::spawn(async move {
                std::hint::black_box(&session_sized);
            }))
        });
        assert_eq!(spawned, 1, "a passthrough-sized task's cell");
        let registered = padded_during(|| {
            let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            socket.set_nonblocking(true).unwrap();
            drop(tokio::net::TcpListener::from_std(socket).unwrap());
        });
        assert_eq!(registered, 1, "a socket's registration");
        let terminated_sized = [1u8; 872];
        let larger = padded_during(|| {
            drop(tokio::spawn(async move {
                std::hint::black_box(&terminated_sized);
            }))
        });
        assert_eq!(larger, 0, "a terminated-sized task's cell");
    }

    /// Every alignment and size around the padding's bounds: each block aligned as asked,
    /// writable to its last byte without touching its neighbours' bookkeeping, and given back.
    #[test]
    fn blocks_are_aligned_and_whole() {
        let mut held = Vec::new();
        for align in [8, 16, 32, 64, 128, 256, 4096] {
            for size in [1, 15, 16, 17, 100, 128, 200, 768, 904, 905, 1024, 4000] {
                let Ok(layout) = Layout::from_size_align(size, align) else {
                    continue;
                };
                for zeroed in [false, true] {
                    // SAFETY: non-zero size.
                    let p = unsafe {
                        if zeroed {
                            Allocator.alloc_zeroed(layout)
                        } else {
                            Allocator.alloc(layout)
                        }
                    };
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0, "size {size} align {align}");
                    // SAFETY: `p` holds `size` bytes.
                    let block = unsafe { std::slice::from_raw_parts_mut(p, size) };
                    if zeroed {
                        assert!(block.iter().all(|&b| b == 0), "size {size} align {align}");
                    }
                    block.fill(0xA5);
                    held.push((p, layout));
                }
            }
        }
        for (p, layout) in held {
            // SAFETY: allocated above with this layout.
            let block = unsafe { std::slice::from_raw_parts(p, layout.size()) };
            assert!(block.iter().all(|&b| b == 0xA5), "{layout:?} overwritten");
            // SAFETY: allocated above with this layout, freed once.
            unsafe { Allocator.dealloc(p, layout) };
        }
    }

    /// A padded block grown past the padding's bound and shrunk back keeps its bytes and its
    /// alignment.
    #[test]
    fn over_aligned_blocks_keep_their_bytes_when_resized() {
        let layout = Layout::from_size_align(100, 128).unwrap();
        assert!(padded(layout).is_some());
        // SAFETY: non-zero size; each pointer is used with the layout it was made with.
        unsafe {
            let p = Allocator.alloc(layout);
            assert!(!p.is_null());
            for i in 0..100 {
                p.add(i).write(i as u8);
            }
            let big = Allocator.realloc(p, layout, 3000);
            assert!(!big.is_null());
            assert_eq!(big as usize % 128, 0);
            let big_layout = Layout::from_size_align(3000, 128).unwrap();
            assert!(padded(big_layout).is_none());
            let small = Allocator.realloc(big, big_layout, 50);
            assert!(!small.is_null());
            assert_eq!(small as usize % 128, 0);
            for i in 0..50 {
                assert_eq!(small.add(i).read(), i as u8);
            }
            // Padded to padded, and a block aligned as `malloc`'s own (to `System`).
            let small_layout = Layout::from_size_align(50, 128).unwrap();
            let other = Allocator.realloc(small, small_layout, 300);
            assert!(!other.is_null());
            assert_eq!(other as usize % 128, 0);
            for i in 0..50 {
                assert_eq!(other.add(i).read(), i as u8);
            }
            Allocator.dealloc(other, Layout::from_size_align(300, 128).unwrap());
            let plain_layout = Layout::from_size_align(40, 8).unwrap();
            let plain = Allocator.alloc(plain_layout);
            assert!(!plain.is_null());
            plain.write(7);
            let plain = Allocator.realloc(plain, plain_layout, 4000);
            assert!(!plain.is_null());
            assert_eq!(plain.read(), 7);
            Allocator.dealloc(plain, Layout::from_size_align(4000, 8).unwrap());
        }
    }

    /// The padding's bounds: a passthrough session's task cell (768 bytes, held there by
    /// `session::tests::session_tasks_stay_small`) and an I/O registration's `Arc` (256) are
    /// padded; a terminated session's cell (1,024) would leave the per-thread cache padded,
    /// and is not; `malloc`'s own alignment needs nothing.
    #[test]
    fn the_padding_bounds() {
        assert_eq!(
            padded(Layout::from_size_align(768, 128).unwrap()),
            Some(896)
        );
        assert_eq!(
            padded(Layout::from_size_align(256, 128).unwrap()),
            Some(384)
        );
        assert_eq!(padded(Layout::from_size_align(1024, 128).unwrap()), None);
        assert_eq!(
            padded(Layout::from_size_align(1000, 32).unwrap()),
            Some(1032)
        );
        assert_eq!(padded(Layout::from_size_align(1001, 32).unwrap()), None);
        assert_eq!(padded(Layout::from_size_align(64, 256).unwrap()), None);
        assert_eq!(padded(Layout::from_size_align(64, 16).unwrap()), None);
    }

    /// The handed-out address is strictly past the block's start, also when the start is
    /// already aligned (the distance is then the whole alignment), and the distance read back
    /// is the one written.
    #[test]
    fn the_distance_is_kept_before_the_block() {
        #[repr(C, align(128))]
        struct Block([u8; 512]);
        let mut block = Block([0; 512]);
        let base = block.0.as_mut_ptr();
        for (start, align) in [(0, 128), (16, 128), (112, 128), (0, 32), (16, 32), (48, 64)] {
            // SAFETY: `start + align + 16` bytes from `base` are inside `block`.
            unsafe {
                let raw = base.add(start);
                let p = shift(raw, align);
                assert_eq!(p as usize % align, 0);
                assert!(
                    p > raw && p <= raw.add(align),
                    "start {start} align {align}"
                );
                assert_eq!(unshift(p), raw);
            }
        }
    }
}

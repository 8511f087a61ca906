//! Page-aligned memory of the transfer plane: [`AlignedBuf`] (an owned, 4096-aligned byte
//! buffer) and [`SendArena`] (the sender's immutable "KV arena" of block slots).
//!
//! The mocker has no device memory, so a sender sends every block from a slot of one arena:
//! block `j` of a transfer is slot `j % slots`. Every slot holds the same deterministic pattern
//! ([`pattern_byte`]: the byte at offset `o` of any block), written at construction, which also
//! touches every page so sends never read the shared zero page.
//!
//! Invariant: an arena is never written after [`SendArena::new`] returns, so it is shared by
//! concurrent transfers (`Arc`, `&[u8]` views) without locks or copies. An [`AlignedBuf`] has
//! one owner (`&mut` to write), like a `Vec<u8>`.

use std::alloc::{self, Layout};
use std::io::IoSlice;
use std::ptr::NonNull;

/// The alignment of every transfer buffer: one page.
pub const PAGE: usize = 4096;

/// A heap buffer of `len` bytes starting on a page boundary, zero-filled at allocation.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively (like Vec<u8>); shared access is read-only.
unsafe impl Send for AlignedBuf {}
// SAFETY: `&AlignedBuf` only hands out `&[u8]`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocates `len` zeroed bytes aligned to [`PAGE`]; `len` 0 allocates nothing.
    ///
    /// Panics (like `Vec`) only if the allocator fails or `len` overflows a `Layout`; callers
    /// size buffers from configuration, never from wire input.
    pub fn zeroed(len: usize) -> Self {
        if len == 0 {
            return Self { ptr: NonNull::<[u8; PAGE]>::dangling().cast(), len: 0 };
        }
        let layout = Self::layout(len);
        // SAFETY: layout has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else { alloc::handle_alloc_error(layout) };
        Self { ptr, len }
    }

    fn layout(len: usize) -> Layout {
        Layout::from_size_align(len, PAGE).expect("buffer size overflows a Layout")
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialized (zeroed) bytes, or dangling and aligned with len 0.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: allocated in `zeroed` with this very layout.
            unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len)) };
        }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf").field("len", &self.len).finish()
    }
}

/// The deterministic content of every block: the byte at offset `offset` of a block. Cheap to
/// compute so a receiver can verify what landed (`TransferConfig::verify_payload`).
pub fn pattern_byte(offset: u64) -> u8 {
    let word = (offset / 8).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x4b56_5458_4b56_5458;
    word.to_le_bytes()[(offset % 8) as usize]
}

/// Index of the first byte of `chunk` (which starts at block offset `offset`, and may span
/// several blocks of `bytes_per_block`) that differs from the pattern.
pub fn first_pattern_mismatch(chunk: &[u8], mut offset: u64, bytes_per_block: u64) -> Option<usize> {
    for (i, &b) in chunk.iter().enumerate() {
        if b != pattern_byte(offset) {
            return Some(i);
        }
        offset += 1;
        if offset == bytes_per_block {
            offset = 0;
        }
    }
    None
}

/// The sender's immutable arena: `slots` page-aligned block slots, `stride` bytes apart.
#[derive(Debug)]
pub struct SendArena {
    buf: AlignedBuf,
    bytes_per_block: usize,
    stride: usize,
    slots: usize,
}

impl SendArena {
    /// An arena for blocks of `bytes_per_block` with as many slots as fit in `target_bytes`,
    /// at least one, and no more than needed for a transfer of `max_transfer_bytes`.
    /// `bytes_per_block` 0 gives an empty arena (transfers are header and trailer only).
    pub fn new(bytes_per_block: usize, target_bytes: u64, max_transfer_bytes: u64) -> Self {
        if bytes_per_block == 0 {
            return Self { buf: AlignedBuf::zeroed(0), bytes_per_block, stride: 0, slots: 0 };
        }
        let stride = bytes_per_block.div_ceil(PAGE) * PAGE;
        let wanted = (target_bytes / stride as u64).min(max_transfer_bytes.div_ceil(bytes_per_block as u64));
        let slots = usize::try_from(wanted).unwrap_or(usize::MAX).max(1);
        let mut buf = AlignedBuf::zeroed(slots.checked_mul(stride).expect("arena size overflows usize"));
        let bytes = buf.as_mut_slice();
        let (first, rest) = bytes.split_at_mut(stride);
        for (o, b) in first[..bytes_per_block].iter_mut().enumerate() {
            *b = pattern_byte(o as u64);
        }
        for slot in rest.chunks_exact_mut(stride) {
            slot.copy_from_slice(first);
        }
        Self { buf, bytes_per_block, stride, slots }
    }

    pub fn slots(&self) -> usize {
        self.slots
    }

    pub fn bytes_per_block(&self) -> usize {
        self.bytes_per_block
    }

    /// The arena's bytes (slots and their page padding).
    pub fn bytes(&self) -> &[u8] {
        self.buf.as_slice()
    }

    /// Slices of the payload of a transfer of `blocks` blocks from payload byte `from`: at most
    /// `max_slices` slices and about `max_bytes` bytes, adjacent slots merged into one slice.
    /// Empty when `from` is at or past the end of the payload.
    pub fn payload_slices<'a>(
        &'a self,
        blocks: u64,
        from: u64,
        max_slices: usize,
        max_bytes: u64,
        out: &mut Vec<IoSlice<'a>>,
    ) {
        let bpb = self.bytes_per_block as u64;
        if bpb == 0 {
            return;
        }
        let end = blocks.saturating_mul(bpb);
        let mut x = from;
        let mut taken = 0u64;
        while x < end && out.len() < max_slices && taken < max_bytes {
            let (j, within) = (x / bpb, x % bpb);
            let slot = (j % self.slots as u64) as usize;
            // Slots are adjacent when the stride is the block size: run to the arena's end.
            let run_blocks =
                if self.stride == self.bytes_per_block { ((self.slots - slot) as u64).min(blocks - j) } else { 1 };
            let start = slot * self.stride + within as usize;
            let stop = slot * self.stride + (run_blocks * bpb) as usize;
            out.push(IoSlice::new(&self.bytes()[start..stop]));
            taken += (stop - start) as u64;
            x = (j + run_blocks) * bpb;
        }
    }
}

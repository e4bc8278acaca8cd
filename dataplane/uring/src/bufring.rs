//! The provided buffer ring: memory the kernel picks receive buffers from, so a connection
//! waiting for data holds no buffer of its own (multishot receive fills whichever is free).

use std::io;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;
use io_uring::IoUring;

pub(crate) struct BufRing {
    /// The ring of entries shared with the kernel (page-aligned, from mmap).
    entries: *mut BufRingEntry,
    entries_len: usize,
    /// The buffers themselves: `count * size` bytes, never moved or freed while registered.
    mem: Box<[u8]>,
    size: usize,
    count: u16,
    /// Our next tail (published to the kernel on every recycle).
    tail: u16,
    pub(crate) group: u16,
    /// Buffers the kernel handed us and we have not given back yet.
    held: usize,
}

impl BufRing {
    /// Maps and registers `count` buffers of `size` bytes as group `group` on `ring`.
    pub(crate) fn new(uring: &IoUring, group: u16, count: u16, size: usize) -> io::Result<BufRing> {
        if !count.is_power_of_two() || count == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "buffer count must be a power of two",
            ));
        }
        let entries_len = count as usize * std::mem::size_of::<BufRingEntry>();
        // SAFETY: an anonymous private mapping with no address hint; the result is checked
        // against MAP_FAILED before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                entries_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let mut buf = BufRing {
            entries: ptr.cast(),
            entries_len,
            mem: vec![0u8; count as usize * size].into_boxed_slice(),
            size,
            count,
            tail: 0,
            group,
            held: count as usize,
        };
        // SAFETY: `entries` is a page-aligned mapping of `count` entries that lives until
        // the driver unregisters it and drops this value; the kernel only reads entries we
        // published via the tail.
        unsafe {
            uring
                .submitter()
                .register_buf_ring_with_flags(buf.entries as u64, count, group, 0)?;
        }
        for bid in 0..count {
            buf.recycle(bid);
        }
        Ok(buf)
    }

    /// Gives buffer `bid` back to the kernel.
    pub(crate) fn recycle(&mut self, bid: u16) {
        debug_assert!(bid < self.count);
        let mask = self.count - 1;
        // SAFETY: the index is masked into the mapping; the kernel does not read an entry
        // until the tail below is published past it, so this write races with nothing.
        unsafe {
            let e = &mut *self.entries.add((self.tail & mask) as usize);
            e.set_addr(self.mem.as_ptr().add(bid as usize * self.size) as u64);
            e.set_len(self.size as u32);
            e.set_bid(bid);
        }
        self.tail = self.tail.wrapping_add(1);
        // SAFETY: the tail field lives in the first entry of the mapping, which is valid; the
        // kernel reads it with acquire semantics, so the release store publishes the entry.
        unsafe {
            let tail = BufRingEntry::tail(self.entries) as *const AtomicU16;
            (*tail).store(self.tail, Ordering::Release);
        }
        self.held -= 1;
    }

    /// Counts a buffer the kernel filled and handed us (a receive completion).
    pub(crate) fn taken(&mut self) {
        self.held += 1;
    }

    /// Buffers the kernel can still fill.
    pub(crate) fn available(&self) -> usize {
        self.count as usize - self.held
    }

    /// The first `len` bytes of buffer `bid`.
    pub(crate) fn data(&self, bid: u16, len: usize) -> &[u8] {
        let start = bid as usize * self.size;
        &self.mem[start..start + len.min(self.size)]
    }

    /// Stops the kernel from picking our buffers; after this the memory may go.
    pub(crate) fn unregister(&self, ring: &IoUring) {
        let _ = ring.submitter().unregister_buf_ring(self.group);
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`; the driver unregisters the ring first, so the
        // kernel holds no reference to it.
        unsafe {
            libc::munmap(self.entries.cast(), self.entries_len);
        }
    }
}

//! Anonymous memory for large weights, laid out for transparent huge pages.
//!
//! A decoded token streams every weight once, over a gigabyte at 2B-4T's shapes. In 4 KiB pages
//! that is a TLB miss per page, and the CPU's prefetchers stop at each page's end; in 2 MiB
//! pages it is neither. Linux gives an anonymous mapping huge pages where it is advised so
//! (`MADV_HUGEPAGE`, honoured when `/sys/kernel/mm/transparent_hugepage/enabled` is `always` or
//! `madvise`) and where a whole aligned 2 MiB range lies inside the mapping. [`HugeMap`] maps
//! exactly the bytes asked for, starting on a 2 MiB boundary, so every whole 2 MiB of a matrix
//! is one page and its last partial one stays in small pages: no byte is resident that the
//! matrix does not use. A page cache file mapping cannot be given huge pages this way, so a
//! memory-mapped matrix that is read per token is copied into one (see `SharedBytes::resident`).

use std::ptr::NonNull;

/// Bytes from which a buffer is worth a mapping of its own: a smaller one cannot hold a whole
/// huge page.
pub const HUGE_PAGE: usize = 2 << 20;

/// `len` bytes of zeroed anonymous memory starting on a [`HUGE_PAGE`] boundary, advised for
/// huge pages; unmapped when dropped.
pub struct HugeMap {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is owned memory like a `Vec<u8>`'s; `&HugeMap` hands out only shared
// slices and `&mut HugeMap` the mutable one.
unsafe impl Send for HugeMap {}
unsafe impl Sync for HugeMap {}

impl HugeMap {
    /// The mapping, or `None` where it cannot be made (not Linux, `len` below [`HUGE_PAGE`],
    /// `BITSVF_NO_HUGEPAGES` set, or the kernel refused): the caller then uses the heap.
    pub fn new(len: usize) -> Option<HugeMap> {
        if len < HUGE_PAGE || !cfg!(target_os = "linux") || opted_out() {
            return None;
        }
        Self::map_aligned(len)
    }

    #[cfg(target_os = "linux")]
    fn map_aligned(len: usize) -> Option<HugeMap> {
        let page = 4096;
        let len_pages = len.checked_add(page - 1)? / page * page;
        let span = len_pages.checked_add(HUGE_PAGE)?;
        // SAFETY: a fresh private anonymous mapping; the ranges unmapped below lie inside it,
        // and the kept range [start, start + len_pages) is page-aligned.
        unsafe {
            let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
            let prot = libc::PROT_READ | libc::PROT_WRITE;
            let base = libc::mmap(std::ptr::null_mut(), span, prot, flags, -1, 0);
            if base == libc::MAP_FAILED {
                return None;
            }
            let base = base as usize;
            let start = base.next_multiple_of(HUGE_PAGE);
            if start > base {
                libc::munmap(base as *mut libc::c_void, start - base);
            }
            let end = start + len_pages;
            if base + span > end {
                libc::munmap(end as *mut libc::c_void, base + span - end);
            }
            // Advice only: without it (THP off) the memory is ordinary small pages.
            libc::madvise(start as *mut libc::c_void, len_pages, libc::MADV_HUGEPAGE);
            Some(HugeMap {
                ptr: NonNull::new(start as *mut u8)?,
                len,
            })
        }
    }

    #[cfg(not(target_os = "linux"))]
    fn map_aligned(_len: usize) -> Option<HugeMap> {
        None
    }

    /// The bytes, to fill.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `len` mapped, writable bytes owned by `self`, borrowed mutably once.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

/// `BITSVF_NO_HUGEPAGES=1` in the environment: weights stay in ordinary heap memory.
fn opted_out() -> bool {
    static OUT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OUT.get_or_init(|| std::env::var_os("BITSVF_NO_HUGEPAGES").is_some())
}

impl std::ops::Deref for HugeMap {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `len` mapped bytes owned by `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for HugeMap {
    fn drop(&mut self) {
        #[cfg(target_os = "linux")]
        // SAFETY: the range `new` mapped (rounded up to whole pages by the kernel); nothing
        // borrows it any more.
        unsafe {
            libc::munmap(self.ptr.as_ptr() as *mut libc::c_void, self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_aligned_zeroed_writable_bytes() {
        assert!(
            HugeMap::new(HUGE_PAGE - 1).is_none(),
            "too small for a page"
        );
        let len = HUGE_PAGE + 12_345;
        let m = HugeMap::new(len);
        if !cfg!(target_os = "linux") || opted_out() {
            assert!(m.is_none());
            return;
        }
        let mut m = m.expect("Linux maps anonymous memory");
        assert_eq!(m.len(), len);
        assert_eq!(m.as_ptr() as usize % HUGE_PAGE, 0);
        assert!(m.iter().all(|&b| b == 0));
        m.as_mut_slice()[len - 1] = 7;
        assert_eq!(m[len - 1], 7);
    }
}

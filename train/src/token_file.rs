//! A corpus's token ids, held in memory or memory-mapped from the tokenizer's cache file
//! (`tokenizer.rs`: a 16-byte header, then every id as u32 LE), so that a large
//! tokenized corpus is neither read into memory nor copied: the kernel pages it in as
//! training windows touch it, and several runs on one corpus share the pages.

use std::ops::Deref;
use std::path::Path;

/// Token ids, read as a slice.
pub enum Tokens {
    Owned(Vec<i32>),
    Mapped(Mapping),
}

impl Deref for Tokens {
    type Target = [i32];

    fn deref(&self) -> &[i32] {
        match self {
            Tokens::Owned(v) => v,
            Tokens::Mapped(m) => m.ids(),
        }
    }
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let how = if matches!(self, Tokens::Mapped(_)) { "mapped" } else { "in memory" };
        write!(f, "{} tokens ({how})", self.len())
    }
}

/// A read-only private mapping of a whole file whose bytes from `offset` on are u32 LE
/// ids. They are not checked here (that would touch every page): an id outside the
/// vocabulary, a negative one included, is refused by the executor's index bounds check.
pub struct Mapping {
    base: *mut std::ffi::c_void,
    bytes: usize,
    offset: usize,
    count: usize,
}

// SAFETY: the mapping is read-only and owned by this value; reading it from several
// threads is reading immutable memory.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `path` if it holds `count` ids after `offset` bytes; `None` where it does not,
    /// on a big-endian or non-Unix machine, or when mapping fails (the caller reads the
    /// file instead).
    ///
    /// The file must not be truncated or rewritten in place while mapped (a read would
    /// fault, or the ids change underneath): tnc writes its caches to a temporary file and
    /// renames it, which leaves a mapped file as it was.
    #[cfg(unix)]
    pub fn open(path: &Path, offset: usize, count: usize) -> Option<Mapping> {
        if cfg!(target_endian = "big") || offset % 4 != 0 || count == 0 {
            return None;
        }
        let file = std::fs::File::open(path).ok()?;
        let bytes = usize::try_from(file.metadata().ok()?.len()).ok()?;
        if bytes != offset.checked_add(count.checked_mul(4)?)? {
            return None;
        }
        use std::os::fd::AsRawFd;
        // SAFETY: a fresh read-only private mapping of the whole open file, `bytes` long.
        let base =
            unsafe { libc::mmap(std::ptr::null_mut(), bytes, libc::PROT_READ, libc::MAP_PRIVATE, file.as_raw_fd(), 0) };
        (base != libc::MAP_FAILED).then_some(Mapping { base, bytes, offset, count })
    }

    #[cfg(not(unix))]
    pub fn open(_: &Path, _: usize, _: usize) -> Option<Mapping> {
        None
    }

    fn ids(&self) -> &[i32] {
        // SAFETY: `offset + 4·count == bytes` are mapped, the base is page-aligned and
        // `offset` a multiple of 4, the mapping lives as long as `self`, and the machine
        // is little-endian, so the u32 LE ids read as i32.
        unsafe { std::slice::from_raw_parts(self.base.cast::<u8>().add(self.offset).cast::<i32>(), self.count) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `open`, unmapped once.
        #[cfg(unix)]
        unsafe {
            libc::munmap(self.base, self.bytes)
        };
    }
}

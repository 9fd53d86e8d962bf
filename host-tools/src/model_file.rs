//! Model bytes held at the alignment the runtime needs to use them in place.

use std::path::Path;

use anyhow::{Context, Result};

/// Bytes in a buffer aligned to a 64-byte cache line (a model file or an arena): the sections
/// of a `.etm`, 64-byte aligned in the file, then start on cache lines too, as in a memory map
/// or in flash, and a kernel's 64-byte loads of a weight row never straddle two lines.
///
/// ```
/// use edgetune_cli::model_file::AlignedBytes;
/// let b = AlignedBytes::zeroed(100);
/// assert_eq!(b.as_bytes().len(), 100);
/// assert_eq!(b.as_bytes().as_ptr() as usize % 64, 0);
/// ```
#[derive(Clone)]
pub struct AlignedBytes {
    words: Vec<Line>,
    len: usize,
}

/// One cache line of bytes: the element that aligns the buffer.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

impl AlignedBytes {
    /// `len` zero bytes.
    pub fn zeroed(len: usize) -> AlignedBytes {
        AlignedBytes {
            words: vec![Line([0; 64]); len.div_ceil(64)],
            len,
        }
    }

    /// Reads a file.
    pub fn read(path: &Path) -> Result<AlignedBytes> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        Ok(AlignedBytes::from(&bytes[..]))
    }

    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: `words` owns at least `len` initialized bytes; `Line` has no padding.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr() as *const u8, self.len) }
    }

    /// The bytes, mutably.
    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, with unique access through `&mut self`.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr() as *mut u8, self.len) }
    }
}

impl From<&[u8]> for AlignedBytes {
    fn from(b: &[u8]) -> AlignedBytes {
        let mut a = AlignedBytes::zeroed(b.len());
        a.as_bytes_mut().copy_from_slice(b);
        a
    }
}

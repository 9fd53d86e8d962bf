//! Model bytes held at the alignment the runtime needs to use them in place.

use std::path::Path;

use anyhow::{Context, Result};

/// Bytes in an 16-byte aligned buffer (a model file or an arena).
///
/// ```
/// use edgetune_cli::model_file::AlignedBytes;
/// let b = AlignedBytes::zeroed(100);
/// assert_eq!(b.as_bytes().len(), 100);
/// assert_eq!(b.as_bytes().as_ptr() as usize % 16, 0);
/// ```
#[derive(Clone)]
pub struct AlignedBytes {
    words: Vec<u128>,
    len: usize,
}

impl AlignedBytes {
    /// `len` zero bytes.
    pub fn zeroed(len: usize) -> AlignedBytes {
        AlignedBytes {
            words: vec![0u128; len.div_ceil(16)],
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
        // SAFETY: `words` owns at least `len` initialized bytes; u128 has no padding.
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

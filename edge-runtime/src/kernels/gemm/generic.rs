//! The reference micro-kernel: plain Rust, one multiply and one add per term, in `k` order.

use super::{GemmF16Kernel, GemmKernel, Tile, NR};

/// Rows per tile of the reference kernel.
pub const MR: usize = 4;

/// The reference kernel.
pub const KERNEL: GemmKernel = GemmKernel {
    name: "generic",
    mr: MR,
    ukr: tile,
};

/// The reference kernel for f16 panels.
pub const KERNEL_F16: GemmF16Kernel = GemmF16Kernel {
    name: "generic",
    mr: MR,
    ukr: tile_f16,
};

/// A panel element: f32, or f16 bits widened exactly.
pub trait PanelElem: Copy {
    /// The value as f32.
    fn to_f32(self) -> f32;
}

impl PanelElem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

impl PanelElem for u16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        half::f16::from_bits(self).to_f32()
    }
}

/// Computes one tile (see [`Tile`]).
///
/// # Safety
/// The tile's pointers must be valid for its extents.
pub unsafe fn tile(t: &Tile) {
    // SAFETY: same contract.
    unsafe { tile_any(t) }
}

/// Computes one tile of an f16 panel (see [`Tile`]).
///
/// # Safety
/// The tile's pointers must be valid for its extents.
pub unsafe fn tile_f16(t: &Tile<u16>) {
    // SAFETY: same contract.
    unsafe { tile_any(t) }
}

/// Computes one tile of a panel of any element type (see [`Tile`]).
///
/// # Safety
/// The tile's pointers must be valid for its extents.
pub unsafe fn tile_any<B: PanelElem>(t: &Tile<B>) {
    let mut acc = [[0f32; NR]; MR];
    for kk in 0..t.k {
        // SAFETY: kk < k and the panel holds k rows of NR values.
        let b = unsafe { core::slice::from_raw_parts(t.b.add(kk * NR), NR) };
        for (i, row) in acc.iter_mut().enumerate().take(t.rows) {
            // SAFETY: i < rows and kk < k address A inside its extents.
            let a = unsafe { *t.a.add(i * t.a_rs + kk * t.a_cs) };
            for (r, &bv) in row.iter_mut().zip(b) {
                *r += a * bv.to_f32();
            }
        }
    }
    for (i, row) in acc.iter().enumerate().take(t.rows) {
        for (j, &v) in row.iter().enumerate().take(t.cols) {
            // SAFETY: bias, when present, holds `cols` values; C holds the tile.
            let bias = if t.bias.is_null() {
                0.0
            } else {
                unsafe { *t.bias.add(j) }
            };
            unsafe { *t.c.add(i * t.c_rs + j * t.c_cs) = v + bias };
        }
    }
}

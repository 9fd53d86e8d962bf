//! The reference micro-kernel: plain Rust, one multiply and one add per term, in `k` order.

use super::{GemmKernel, Tile, NR};

/// Rows per tile of the reference kernel.
pub const MR: usize = 4;

/// The reference kernel.
pub const KERNEL: GemmKernel = GemmKernel {
    name: "generic",
    mr: MR,
    ukr: tile,
};

/// Computes one tile (see [`Tile`]).
///
/// # Safety
/// The tile's pointers must be valid for its extents.
pub unsafe fn tile(t: &Tile) {
    let mut acc = [[0f32; NR]; MR];
    for kk in 0..t.k {
        // SAFETY: kk < k and the panel holds k rows of NR values.
        let b = unsafe { core::slice::from_raw_parts(t.b.add(kk * NR), NR) };
        for (i, row) in acc.iter_mut().enumerate().take(t.rows) {
            // SAFETY: i < rows and kk < k address A inside its extents.
            let a = unsafe { *t.a.add(i * t.a_rs + kk * t.a_cs) };
            for (r, &bv) in row.iter_mut().zip(b) {
                *r += a * bv;
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

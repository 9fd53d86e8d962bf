//! NEON micro-kernel: a tile of up to 6 rows × 16 columns held in 24 `float32x4` accumulators.
//!
//! Each step of `k` loads one row of the packed panel (four vectors), loads one value of `A` per
//! row broadcast to all lanes (`ld1r`) and issues four FMAs per row: 24 accumulators, 4 panel
//! vectors and one broadcast fit in the 32 vector registers. `A` is read through its strides,
//! so row-major, transposed and NCHW operands take the same path.
//!
//! Short tiles (GEMV, the last rows of a product) split `k` over several accumulator sets to
//! keep enough independent FMA chains, and add them at the end; that sums in a different order
//! than the reference, within rounding.
//!
//! NEON is part of the aarch64 baseline; on a target built without it (a soft-float target)
//! the tile function falls back to the reference.
//!
//! f16 panels ([`KERNEL_F16`]) run the same kernel, widening each panel row with `fcvtl` /
//! `fcvtl2` (exact; base AdvSIMD, no FP16 extension needed) as it is loaded.

use super::{GemmF16Kernel, GemmKernel, Tile, NR};

/// Rows per tile.
pub const MR: usize = 6;

/// The NEON kernel.
pub const KERNEL: GemmKernel = GemmKernel {
    name: "aarch64-neon",
    mr: MR,
    ukr: tile,
};

/// Eight f16 values (bits) widened to f32, exactly (shared with the compressed-weight kernels).
#[cfg(target_feature = "neon")]
pub(crate) use neon::widen_f16;

/// The NEON kernel for f16 panels.
pub const KERNEL_F16: GemmF16Kernel = GemmF16Kernel {
    name: "aarch64-neon",
    mr: MR,
    ukr: tile_f16,
};

/// Computes one tile (see [`Tile`]).
///
/// # Safety
/// The tile's pointers must be valid for its extents, and `rows ≤ MR`.
pub unsafe fn tile(t: &Tile) {
    // SAFETY: same contract.
    unsafe { tile_any(t) }
}

/// Computes one tile of an f16 panel (see [`Tile`]).
///
/// # Safety
/// The tile's pointers must be valid for its extents, and `rows ≤ MR`.
pub unsafe fn tile_f16(t: &Tile<u16>) {
    // SAFETY: same contract.
    unsafe { tile_any(t) }
}

/// Either panel element.
///
/// # Safety
/// As for [`tile`].
unsafe fn tile_any<P: PanelRow>(t: &Tile<P>) {
    debug_assert!(t.rows <= MR && t.cols <= NR);
    #[cfg(target_feature = "neon")]
    {
        // SAFETY: the target has NEON (cfg above); the caller guarantees the extents. The
        // second parameter (accumulator sets splitting `k`) keeps at least 16 FMA chains busy.
        unsafe {
            match t.rows {
                0 => {}
                1 => neon::tile_neon::<1, 4, P>(t),
                2 => neon::tile_neon::<2, 2, P>(t),
                3 => neon::tile_neon::<3, 2, P>(t),
                4 => neon::tile_neon::<4, 1, P>(t),
                5 => neon::tile_neon::<5, 1, P>(t),
                6 => neon::tile_neon::<6, 1, P>(t),
                // Taller than the contract allows: still correct, just slow.
                _ => super::reference_tile(t),
            }
        }
    }
    #[cfg(not(target_feature = "neon"))]
    {
        // SAFETY: same contract.
        unsafe { super::reference_tile(t) }
    }
}

/// A panel element the NEON kernel loads (f32, or f16 bits widened on load).
#[cfg(target_feature = "neon")]
trait PanelRow: super::generic::PanelElem {
    /// Loads one panel row (16 values) as four vectors of f32.
    ///
    /// # Safety
    /// `p` must point to 16 readable values.
    unsafe fn load(p: *const Self) -> [core::arch::aarch64::float32x4_t; 4];
}

#[cfg(not(target_feature = "neon"))]
trait PanelRow: super::generic::PanelElem {}

#[cfg(not(target_feature = "neon"))]
impl<T: super::generic::PanelElem> PanelRow for T {}

#[cfg(target_feature = "neon")]
impl PanelRow for f32 {
    #[inline(always)]
    unsafe fn load(p: *const f32) -> [core::arch::aarch64::float32x4_t; 4] {
        use core::arch::aarch64::vld1q_f32;
        // SAFETY: as the caller guarantees.
        unsafe {
            [
                vld1q_f32(p),
                vld1q_f32(p.add(4)),
                vld1q_f32(p.add(8)),
                vld1q_f32(p.add(12)),
            ]
        }
    }
}

#[cfg(target_feature = "neon")]
impl PanelRow for u16 {
    #[inline(always)]
    unsafe fn load(p: *const u16) -> [core::arch::aarch64::float32x4_t; 4] {
        use core::arch::aarch64::vld1q_u16;
        // SAFETY: as the caller guarantees; the widening is register-only.
        unsafe {
            let (a, b) = neon::widen_f16(vld1q_u16(p));
            let (c, d) = neon::widen_f16(vld1q_u16(p.add(8)));
            [a, b, c, d]
        }
    }
}

#[cfg(target_feature = "neon")]
mod neon {
    use core::arch::aarch64::*;

    use super::super::{Tile, NR};
    use super::PanelRow;

    /// Eight f16 values (bits) widened to two vectors of f32 (`fcvtl`, `fcvtl2`: exact, base
    /// AdvSIMD; the f16 vector types are not stable Rust yet, so through `asm!`).
    #[inline(always)]
    pub(crate) fn widen_f16(h: uint16x8_t) -> (float32x4_t, float32x4_t) {
        let lo: float32x4_t;
        let hi: float32x4_t;
        // SAFETY: register-only conversions; NEON is enabled for the target.
        unsafe {
            core::arch::asm!(
                "fcvtl {lo:v}.4s, {h:v}.4h",
                "fcvtl2 {hi:v}.4s, {h:v}.8h",
                h = in(vreg) h,
                lo = out(vreg) lo,
                hi = out(vreg) hi,
                options(pure, nomem, nostack, preserves_flags)
            );
        }
        (lo, hi)
    }

    /// A tile of exactly `R` rows, accumulating `k` steps round-robin into `U` accumulator sets.
    ///
    /// # Safety
    /// The tile's pointers must be valid for its extents, and `t.rows == R`.
    pub(super) unsafe fn tile_neon<const R: usize, const U: usize, P: PanelRow>(t: &Tile<P>) {
        // SAFETY (whole body): NEON is enabled for the target. Every read is A[i, kk] with
        // i < R = rows and kk < k, a row kk < k of the panel (NR values at panel + kk·NR), or
        // one of the `cols` bias values; every write is an element (i < rows, j < cols) of the
        // tile in C, or the local spill buffer. The caller vouches for those extents.
        unsafe {
            let zero = vdupq_n_f32(0.0);
            let mut acc = [[[zero; 4]; R]; U];
            let mut rows = [t.a; R];
            for (i, row) in rows.iter_mut().enumerate() {
                // Wrapping: with k = 0 the row pointers are never read.
                *row = t.a.wrapping_add(i * t.a_rs);
            }
            let mut b = t.b;
            let mut kk = 0;
            while kk + U <= t.k {
                for set in acc.iter_mut() {
                    step(set, &rows, kk * t.a_cs, b);
                    b = b.add(NR);
                    kk += 1;
                }
            }
            while kk < t.k {
                step(&mut acc[0], &rows, kk * t.a_cs, b);
                b = b.add(NR);
                kk += 1;
            }
            let mut sum = acc[0];
            for set in &acc[1..] {
                for (s, a) in sum.iter_mut().zip(set) {
                    for (x, y) in s.iter_mut().zip(a) {
                        *x = vaddq_f32(*x, *y);
                    }
                }
            }

            // Epilogue: `c = acc + bias`, with bias 0 when absent, as the reference does.
            if t.c_cs == 1 && t.cols == NR {
                let mut bias = [zero; 4];
                if !t.bias.is_null() {
                    for (h, v) in bias.iter_mut().enumerate() {
                        *v = vld1q_f32(t.bias.add(4 * h));
                    }
                }
                for (i, s) in sum.iter().enumerate() {
                    let c = t.c.add(i * t.c_rs);
                    for (h, (v, b)) in s.iter().zip(&bias).enumerate() {
                        vst1q_f32(c.add(4 * h), vaddq_f32(*v, *b));
                    }
                }
            } else {
                // Ragged panel or strided columns: spill, then store element by element,
                // column by column so that a column-major C (c_rs = 1) is written in order.
                let mut buf = [[0f32; NR]; R];
                for (out, s) in buf.iter_mut().zip(&sum) {
                    for (h, v) in s.iter().enumerate() {
                        vst1q_f32(out.as_mut_ptr().add(4 * h), *v);
                    }
                }
                for j in 0..t.cols {
                    let bias = if t.bias.is_null() {
                        0.0
                    } else {
                        *t.bias.add(j)
                    };
                    for (i, out) in buf.iter().enumerate() {
                        *t.c.add(i * t.c_rs + j * t.c_cs) = out[j] + bias;
                    }
                }
            }
        }
    }

    /// One step of `k`: `acc[i] += A[i, kk] · panel row` for each row, `off` = kk·a_cs.
    ///
    /// # Safety
    /// `rows[i] + off` must be readable for each row, and `b` must hold `NR` values.
    #[inline(always)]
    unsafe fn step<const R: usize, P: PanelRow>(
        acc: &mut [[float32x4_t; 4]; R],
        rows: &[*const f32; R],
        off: usize,
        b: *const P,
    ) {
        // SAFETY: as the caller guarantees.
        unsafe {
            let bv = P::load(b);
            for (acc_i, row) in acc.iter_mut().zip(rows) {
                let av = vld1q_dup_f32(row.add(off));
                for (x, b) in acc_i.iter_mut().zip(&bv) {
                    *x = vfmaq_f32(*x, *b, av);
                }
            }
        }
    }
}

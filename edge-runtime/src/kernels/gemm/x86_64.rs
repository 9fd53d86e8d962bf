//! AVX2 + FMA micro-kernel: a tile of up to 6 rows × 16 columns held in 12 `ymm` accumulators.
//!
//! Each step of `k` loads one row of the packed panel (two vectors of 8), broadcasts one value of
//! `A` per row from memory and issues two FMAs per row. `A` is read through its strides, so
//! row-major, transposed and NCHW operands take the same path (the broadcast is a load either
//! way).
//!
//! Short tiles (GEMV, the last rows of a product) have too few accumulators to hide the FMA
//! latency, so they split `k` over several accumulator sets and add them at the end. That sums in
//! a different order than the reference; the difference stays within rounding.
//!
//! f16 panels ([`KERNEL_F16`]) run the same kernel with F16C widening each panel row
//! (`vcvtph2ps`, exact) as it is loaded.

use core::arch::x86_64::*;

use super::{GemmF16Kernel, GemmKernel, Tile, NR};

/// Rows per tile.
pub const MR: usize = 6;

/// The AVX2 + FMA kernel. Select it through [`crate::kernels::Kernels::best`], which checks the
/// CPU; on a CPU without AVX2 and FMA its tile function falls back to the reference.
pub const KERNEL: GemmKernel = GemmKernel {
    name: "x86_64-avx2-fma",
    mr: MR,
    ukr: tile,
};

/// The AVX2 + FMA kernel for f16 panels (also needs F16C; without it the tile function falls
/// back to the reference).
pub const KERNEL_F16: GemmF16Kernel = GemmF16Kernel {
    name: "x86_64-avx2-fma-f16c",
    mr: MR,
    ukr: tile_f16,
};

/// Computes one tile of an f16 panel (see [`Tile`]).
///
/// # Safety
/// The tile's pointers must be valid for its extents, and `rows ≤ MR`.
pub unsafe fn tile_f16(t: &Tile<u16>) {
    debug_assert!(t.rows <= MR && t.cols <= NR);
    // Checked per tile as in `tile` (cached answers).
    if !(crate::kernels::x86_64_has_avx2_fma() && crate::kernels::x86_64_has_f16c()) {
        // SAFETY: same contract.
        return unsafe { super::reference_tile(t) };
    }
    // SAFETY: the CPU has AVX2, FMA and F16C (checked above); the caller guarantees the
    // extents.
    unsafe {
        match t.rows {
            0 => {}
            1 => tile_avx2_f16::<1, 4>(t),
            2 => tile_avx2_f16::<2, 2>(t),
            3 => tile_avx2_f16::<3, 2>(t),
            4 => tile_avx2_f16::<4, 1>(t),
            5 => tile_avx2_f16::<5, 1>(t),
            6 => tile_avx2_f16::<6, 1>(t),
            _ => super::reference_tile(t),
        }
    }
}

/// Loads one panel row (16 values) as two vectors of f32.
trait PanelRow: Copy {
    /// # Safety
    /// `p` must point to 16 readable values; the enclosing function must enable the features
    /// the load needs (AVX; F16C for f16).
    unsafe fn load(p: *const Self) -> (__m256, __m256);
}

impl PanelRow for f32 {
    #[inline(always)]
    unsafe fn load(p: *const f32) -> (__m256, __m256) {
        // SAFETY: as the caller guarantees.
        unsafe { (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))) }
    }
}

impl PanelRow for u16 {
    #[inline(always)]
    unsafe fn load(p: *const u16) -> (__m256, __m256) {
        // SAFETY: as the caller guarantees (16 f16 values, F16C enabled by the caller).
        unsafe {
            (
                _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
                _mm256_cvtph_ps(_mm_loadu_si128(p.add(8) as *const __m128i)),
            )
        }
    }
}

/// [`tile_avx2`] for f16 panels.
///
/// # Safety
/// AVX2, FMA and F16C must be available; the tile's pointers valid for its extents,
/// `t.rows == R`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_avx2_f16<const R: usize, const U: usize>(t: &Tile<u16>) {
    // SAFETY: same contract.
    unsafe { tile_body::<R, U, u16>(t) }
}

/// Computes one tile (see [`Tile`]).
///
/// # Safety
/// The tile's pointers must be valid for its extents, and `rows ≤ MR`.
pub unsafe fn tile(t: &Tile) {
    debug_assert!(t.rows <= MR && t.cols <= NR);
    // `KERNEL` is public and `gemm` is safe, so check the CPU here too rather than trust every
    // caller; the answer is cached, so this is one load and a branch per tile.
    if !crate::kernels::x86_64_has_avx2_fma() {
        // SAFETY: same contract.
        return unsafe { super::reference_tile(t) };
    }
    // SAFETY: the CPU has AVX2 and FMA (checked above); the caller guarantees the extents.
    // The second parameter (accumulator sets splitting `k`) keeps at least 8 FMA chains busy.
    unsafe {
        match t.rows {
            0 => {}
            1 => tile_avx2::<1, 4>(t),
            2 => tile_avx2::<2, 2>(t),
            3 => tile_avx2::<3, 2>(t),
            4 => tile_avx2::<4, 1>(t),
            5 => tile_avx2::<5, 1>(t),
            6 => tile_avx2::<6, 1>(t),
            // Taller than the contract allows: still correct, just slow.
            _ => super::reference_tile(t),
        }
    }
}

/// A tile of exactly `R` rows, accumulating `k` steps round-robin into `U` accumulator sets.
///
/// # Safety
/// AVX2 and FMA must be available; the tile's pointers valid for its extents, `t.rows == R`.
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2<const R: usize, const U: usize>(t: &Tile) {
    // SAFETY: same contract.
    unsafe { tile_body::<R, U, f32>(t) }
}

/// The body of [`tile_avx2`] for either panel element, inlined into a function that enables
/// the features its loads need.
///
/// # Safety
/// As for [`tile_avx2`] (and F16C for f16 panels).
#[inline(always)]
unsafe fn tile_body<const R: usize, const U: usize, P: PanelRow>(t: &Tile<P>) {
    let mut acc = [[[_mm256_setzero_ps(); 2]; R]; U];
    let mut rows = [t.a; R];
    for (i, row) in rows.iter_mut().enumerate() {
        // Wrapping: with k = 0 the row pointers are never read.
        *row = t.a.wrapping_add(i * t.a_rs);
    }
    let mut b = t.b;
    let mut kk = 0;
    // SAFETY: every read is A[i, kk] with i < R = rows and kk < k, or row kk < k of the
    // panel (NR values at b = panel + kk·NR), all inside the extents the caller vouches for.
    unsafe {
        while kk + U <= t.k {
            for set in acc.iter_mut() {
                let (b0, b1) = P::load(b);
                let off = kk * t.a_cs;
                for (acc_i, row) in set.iter_mut().zip(&rows) {
                    let av = _mm256_broadcast_ss(&*row.add(off));
                    acc_i[0] = _mm256_fmadd_ps(av, b0, acc_i[0]);
                    acc_i[1] = _mm256_fmadd_ps(av, b1, acc_i[1]);
                }
                b = b.add(NR);
                kk += 1;
            }
        }
        while kk < t.k {
            let (b0, b1) = P::load(b);
            let off = kk * t.a_cs;
            for (acc_i, row) in acc[0].iter_mut().zip(&rows) {
                let av = _mm256_broadcast_ss(&*row.add(off));
                acc_i[0] = _mm256_fmadd_ps(av, b0, acc_i[0]);
                acc_i[1] = _mm256_fmadd_ps(av, b1, acc_i[1]);
            }
            b = b.add(NR);
            kk += 1;
        }
    }
    let mut sum = acc[0];
    for set in &acc[1..] {
        for (s, a) in sum.iter_mut().zip(set) {
            s[0] = _mm256_add_ps(s[0], a[0]);
            s[1] = _mm256_add_ps(s[1], a[1]);
        }
    }

    // Epilogue: `c = acc + bias`, with bias 0 when absent, as the reference does (so -0.0
    // becomes +0.0 there too).
    let cols = t.cols;
    if t.c_cs == 1 {
        // Rows of the tile are contiguous: vector stores, masked on a ragged last panel.
        let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let m0 = _mm256_cmpgt_epi32(_mm256_set1_epi32(cols as i32), lane);
        let m1 = _mm256_cmpgt_epi32(_mm256_set1_epi32(cols as i32 - 8), lane);
        let (bias0, bias1) = if t.bias.is_null() {
            (_mm256_setzero_ps(), _mm256_setzero_ps())
        } else if cols == NR {
            // SAFETY: bias holds `cols` = 16 values.
            unsafe { (_mm256_loadu_ps(t.bias), _mm256_loadu_ps(t.bias.add(8))) }
        } else {
            // SAFETY: masked loads read only the first `cols` values of bias and do not fault
            // on the masked-out lanes.
            unsafe {
                (
                    _mm256_maskload_ps(t.bias, m0),
                    _mm256_maskload_ps(t.bias.add(8), m1),
                )
            }
        };
        for (i, s) in sum.iter().enumerate() {
            let v0 = _mm256_add_ps(s[0], bias0);
            let v1 = _mm256_add_ps(s[1], bias1);
            // SAFETY: row i < rows of the tile holds `cols` consecutive elements of C; the
            // masked stores touch only those.
            unsafe {
                let c = t.c.add(i * t.c_rs);
                if cols == NR {
                    _mm256_storeu_ps(c, v0);
                    _mm256_storeu_ps(c.add(8), v1);
                } else {
                    _mm256_maskstore_ps(c, m0, v0);
                    _mm256_maskstore_ps(c.add(8), m1, v1);
                }
            }
        }
    } else {
        // Strided columns (e.g. NCHW output): spill, then store element by element, column by
        // column so that a column-major C (c_rs = 1) is written sequentially.
        let mut buf = [[0f32; NR]; R];
        for (out, s) in buf.iter_mut().zip(&sum) {
            // SAFETY: `out` holds 16 floats.
            unsafe {
                _mm256_storeu_ps(out.as_mut_ptr(), s[0]);
                _mm256_storeu_ps(out.as_mut_ptr().add(8), s[1]);
            }
        }
        for j in 0..cols {
            // SAFETY: j < cols and bias, when present, holds `cols` values.
            let bias = if t.bias.is_null() {
                0.0
            } else {
                unsafe { *t.bias.add(j) }
            };
            for (i, out) in buf.iter().enumerate() {
                // SAFETY: (i, j) is inside the tile.
                unsafe { *t.c.add(i * t.c_rs + j * t.c_cs) = out[j] + bias };
            }
        }
    }
}

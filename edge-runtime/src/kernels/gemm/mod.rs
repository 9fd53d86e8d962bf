//! f32 matrix multiply `C = act(A·B + bias)` — the contract and the dispatch.
//!
//! `B` is always packed in panels of [`NR`] columns (the `.etm` `PanelF32` weight layout, or a
//! panel packed on the fly from an activation by [`pack_b`]). `A` and `C` are read and written
//! through arbitrary row and column strides, so NCHW convolutions, transposed operands and
//! channel-major outputs need no copies.
//!
//! A micro-kernel computes one tile of at most `mr` rows by one panel; [`gemm`] walks the tiles.
//! The generic kernel defines the result; each architecture's kernel is tested against it.
//!
//! [`gemm_f16_with_threads`] is the same product with `B` panels of f16 (the `.etm` `PanelF16`
//! weight layout): its micro-kernels widen each panel row to f32 as they load it.

use edgetune_core::{Activation, PANEL};

#[cfg(target_arch = "aarch64")]
pub mod aarch64;
pub mod generic;
#[cfg(target_arch = "x86_64")]
pub mod x86_64;

/// Columns per packed panel of `B`.
pub const NR: usize = PANEL;

/// One micro-kernel call: a `rows × cols` tile of `C` (rows ≤ the kernel's `mr`, cols ≤ [`NR`]).
///
/// `acc[i][j] = Σ_{kk < k} a[i·a_rs + kk·a_cs] · b[kk·NR + j]`, then
/// `c[i·c_rs + j·c_cs] = acc[i][j] + bias[j]` (bias read only when non-null). `B` is the panel's
/// element: f32, or f16 bits (`u16`) widened to f32 exactly.
#[derive(Debug, Clone, Copy)]
pub struct Tile<B = f32> {
    /// Inner dimension.
    pub k: usize,
    /// First element of the tile's rows of `A`.
    pub a: *const f32,
    /// Distance between rows of `A`, in elements.
    pub a_rs: usize,
    /// Distance between columns of `A`, in elements.
    pub a_cs: usize,
    /// Rows in this tile.
    pub rows: usize,
    /// The packed panel: `k` rows of [`NR`] values.
    pub b: *const B,
    /// First element of the tile in `C`.
    pub c: *mut f32,
    /// Distance between rows of `C`.
    pub c_rs: usize,
    /// Distance between columns of `C`.
    pub c_cs: usize,
    /// Valid columns in this panel.
    pub cols: usize,
    /// Bias for the panel's first column, or null.
    pub bias: *const f32,
}

/// A micro-kernel. Safety: every pointer of the [`Tile`] must be valid for the extents it
/// describes.
pub type MicroKernel = unsafe fn(&Tile);

/// A micro-kernel for f16 panels. Safety: as for [`MicroKernel`].
pub type MicroKernelF16 = unsafe fn(&Tile<u16>);

/// A micro-kernel and its tile height.
#[derive(Debug, Clone, Copy)]
pub struct GemmKernel {
    /// Name shown in benchmarks.
    pub name: &'static str,
    /// Rows per tile.
    pub mr: usize,
    /// The tile function.
    pub ukr: MicroKernel,
}

/// An f16-panel micro-kernel and its tile height.
#[derive(Debug, Clone, Copy)]
pub struct GemmF16Kernel {
    /// Name shown in benchmarks.
    pub name: &'static str,
    /// Rows per tile.
    pub mr: usize,
    /// The tile function.
    pub ukr: MicroKernelF16,
}

/// Operands of one product. `C[i, j] = act(Σ_k A[i, k] · B[k, j] + bias[j])`.
#[derive(Debug)]
pub struct Gemm<'a> {
    /// Rows of `A` and `C`.
    pub m: usize,
    /// Columns of `B` and `C`.
    pub n: usize,
    /// Inner dimension.
    pub k: usize,
    /// `A`, addressed `a[i·a_rs + k·a_cs]`.
    pub a: &'a [f32],
    /// Row stride of `A`.
    pub a_rs: usize,
    /// Column stride of `A`.
    pub a_cs: usize,
    /// `B` packed in `⌈n/NR⌉` panels of `k × NR`.
    pub b: &'a [f32],
    /// `C`, addressed `c[i·c_rs + j·c_cs]`.
    pub c: &'a mut [f32],
    /// Row stride of `C`.
    pub c_rs: usize,
    /// Column stride of `C`.
    pub c_cs: usize,
    /// Optional per-column bias (length `n`).
    pub bias: Option<&'a [f32]>,
    /// Activation applied to every output.
    pub act: Activation,
}

/// Operands of one product with f16 panels: as [`Gemm`], with `b` holding f16 bits.
#[derive(Debug)]
pub struct GemmF16<'a> {
    /// Rows of `A` and `C`.
    pub m: usize,
    /// Columns of `B` and `C`.
    pub n: usize,
    /// Inner dimension.
    pub k: usize,
    /// `A`, addressed `a[i·a_rs + k·a_cs]`.
    pub a: &'a [f32],
    /// Row stride of `A`.
    pub a_rs: usize,
    /// Column stride of `A`.
    pub a_cs: usize,
    /// `B` packed in `⌈n/NR⌉` panels of `k × NR` f16 values (bits).
    pub b: &'a [u16],
    /// `C`, addressed `c[i·c_rs + j·c_cs]`.
    pub c: &'a mut [f32],
    /// Row stride of `C`.
    pub c_rs: usize,
    /// Column stride of `C`.
    pub c_cs: usize,
    /// Optional per-column bias (length `n`).
    pub bias: Option<&'a [f32]>,
    /// Activation applied to every output.
    pub act: Activation,
}

/// Number of f32 a packed `k × n` operand occupies.
pub fn packed_len(k: usize, n: usize) -> usize {
    n.div_ceil(NR) * k * NR
}

/// Packs `B[kk, j] = b[kk·b_rs + j·b_cs]` (`k × n`) into panels; `out` holds [`packed_len`].
pub fn pack_b(k: usize, n: usize, b: &[f32], b_rs: usize, b_cs: usize, out: &mut [f32]) {
    let out = &mut out[..packed_len(k, n)];
    for (p, panel) in out.chunks_exact_mut(k * NR).enumerate() {
        let j0 = p * NR;
        let cols = NR.min(n - j0);
        for (kk, row) in panel.chunks_exact_mut(NR).enumerate() {
            let base = kk * b_rs + j0 * b_cs;
            for (j, v) in row.iter_mut().enumerate() {
                *v = if j < cols { b[base + j * b_cs] } else { 0.0 };
            }
        }
    }
}

/// The reference kernel on a tile of any height, in slices of its [`generic::MR`] rows: the
/// fallback of architecture kernels (taller tiles) on a CPU or target without their features.
///
/// # Safety
/// As for [`MicroKernel`].
#[allow(dead_code)] // unused on architectures without a fast kernel
pub(crate) unsafe fn reference_tile<B: generic::PanelElem>(t: &Tile<B>) {
    let mut i = 0;
    while i < t.rows {
        let rows = generic::MR.min(t.rows - i);
        let part = Tile {
            rows,
            // Wrapping: with k = 0, A is never read.
            a: t.a.wrapping_add(i * t.a_rs),
            // SAFETY: row i < rows of the tile is inside C.
            c: unsafe { t.c.add(i * t.c_rs) },
            ..*t
        };
        // SAFETY: `part` lies within `t`.
        unsafe { generic::tile_any(&part) };
        i += rows;
    }
}

/// Rows of `A` kept hot in cache while all panels pass over them (rounded down to a multiple of
/// the kernel's `mr`, so blocks never cut a tile short).
const MC: usize = 96;

/// Products with fewer multiply-adds than this stay on the calling thread: below it, waking
/// rayon workers costs more than it saves.
#[cfg(feature = "std")]
const PAR_MIN_MACS: usize = 1 << 20;

/// Runs a product with the given micro-kernel.
///
/// With the `std` feature, large products are split across the current rayon pool's threads
/// (by row blocks or by panels, whichever gives more pieces). The tiling is the same as on one
/// thread, so the result is bit-identical.
///
/// Panics if an operand slice is shorter than its extents say (callers derive them from a
/// validated model, so this is a bug, not bad input).
pub fn gemm(ker: &GemmKernel, g: Gemm<'_>) {
    #[cfg(feature = "std")]
    let threads = rayon::current_num_threads();
    #[cfg(not(feature = "std"))]
    let threads = 1;
    gemm_with_threads(ker, threads, g)
}

/// [`gemm`] with an explicit thread budget: 1 keeps the product on the calling thread; more
/// lets large products split across the current rayon pool (with the `std` feature).
pub fn gemm_with_threads(ker: &GemmKernel, threads: usize, g: Gemm<'_>) {
    let Gemm {
        m,
        n,
        k,
        a,
        a_rs,
        a_cs,
        b,
        c,
        c_rs,
        c_cs,
        bias,
        act,
    } = g;
    drive(
        ker.mr,
        ker.ukr,
        threads,
        (m, n, k),
        (a, a_rs, a_cs),
        b,
        (c, c_rs, c_cs),
        bias,
        act,
    )
}

/// [`gemm_with_threads`] with f16 panels (`PanelF16` weights): the same tiling, threading and
/// epilogue, with a micro-kernel that widens the panel rows to f32 as it loads them.
pub fn gemm_f16_with_threads(ker: &GemmF16Kernel, threads: usize, g: GemmF16<'_>) {
    let GemmF16 {
        m,
        n,
        k,
        a,
        a_rs,
        a_cs,
        b,
        c,
        c_rs,
        c_cs,
        bias,
        act,
    } = g;
    drive(
        ker.mr,
        ker.ukr,
        threads,
        (m, n, k),
        (a, a_rs, a_cs),
        b,
        (c, c_rs, c_cs),
        bias,
        act,
    )
}

/// Checks the operands and runs the product (threaded when large, with `std`).
#[allow(clippy::too_many_arguments)]
fn drive<B: Copy + Sync>(
    mr: usize,
    ukr: unsafe fn(&Tile<B>),
    threads: usize,
    (m, n, k): (usize, usize, usize),
    (a, a_rs, a_cs): (&[f32], usize, usize),
    b: &[B],
    (c, c_rs, c_cs): (&mut [f32], usize, usize),
    bias: Option<&[f32]>,
    act: Activation,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(mr > 0, "gemm: kernel with mr = 0");
    assert!(
        k == 0 || (m - 1) * a_rs + (k - 1) * a_cs < a.len(),
        "gemm: A too short"
    );
    assert!(b.len() >= packed_len(k, n), "gemm: packed B too short");
    assert!(
        (m - 1) * c_rs + (n - 1) * c_cs < c.len(),
        "gemm: C too short"
    );
    assert!(bias.is_none_or(|b| b.len() >= n), "gemm: bias too short");
    let job = Job {
        mr,
        ukr,
        k,
        a: a.as_ptr(),
        a_rs,
        a_cs,
        b: b.as_ptr(),
        c: c.as_mut_ptr(),
        c_rs,
        c_cs,
        n,
        bias: bias.map_or(core::ptr::null(), |b| b.as_ptr()),
        act,
    };
    let panels = n.div_ceil(NR);
    #[cfg(feature = "std")]
    {
        if threads > 1 && run_parallel(&job, m, panels, threads) {
            return;
        }
    }
    #[cfg(not(feature = "std"))]
    let _ = threads;
    // SAFETY: the whole product lies within the slices checked above, and `c` is borrowed
    // mutably for this call, so nothing else writes it.
    unsafe { job.run(0, m, 0, panels) };
}

/// One product's operands as raw pointers, so that threads can share them.
#[derive(Clone, Copy)]
struct Job<B> {
    mr: usize,
    ukr: unsafe fn(&Tile<B>),
    k: usize,
    a: *const f32,
    a_rs: usize,
    a_cs: usize,
    b: *const B,
    c: *mut f32,
    c_rs: usize,
    c_cs: usize,
    n: usize,
    bias: *const f32,
    act: Activation,
}

// SAFETY: `Job` only lives inside `gemm`, while the slices its pointers come from are borrowed
// (A, B and bias shared, C exclusively). A, B and bias are only read. Threads write C only
// through `run` on disjoint row or panel ranges, and `run_parallel` checks that distinct
// (row, column) pairs address distinct elements of C, so no element is written by two threads.
unsafe impl<B: Sync> Send for Job<B> {}
// SAFETY: as for `Send`.
unsafe impl<B: Sync> Sync for Job<B> {}

impl<B: Copy> Job<B> {
    /// Computes rows `i0..i1` of `C` in panels `p0..p1`, activation included.
    ///
    /// # Safety
    /// `i0` must be a multiple of `mr` (so tiles sit where a one-thread run puts them),
    /// `i1 ≤ m`, `p1 ≤ ⌈n/NR⌉`, the pointers valid for the extents checked in [`gemm`], and no
    /// other thread may access those elements of `C` meanwhile.
    unsafe fn run(&self, i0: usize, i1: usize, p0: usize, p1: usize) {
        let mr = self.mr;
        let mc = (MC / mr).max(1) * mr;
        let mut m0 = i0;
        while m0 < i1 {
            let m1 = (m0 + mc).min(i1);
            for p in p0..p1 {
                let j0 = p * NR;
                let cols = NR.min(self.n - j0);
                let mut i = m0;
                while i < m1 {
                    let rows = mr.min(m1 - i);
                    let tile = Tile {
                        k: self.k,
                        // Wrapping: with k = 0, A may be empty and is never read.
                        a: self.a.wrapping_add(i * self.a_rs),
                        a_rs: self.a_rs,
                        a_cs: self.a_cs,
                        rows,
                        // SAFETY: panel p starts inside packed B (length checked in `gemm`).
                        b: unsafe { self.b.add(p * self.k * NR) },
                        // SAFETY: (i, j0) is an element of C, checked in `gemm`.
                        c: unsafe { self.c.add(i * self.c_rs + j0 * self.c_cs) },
                        c_rs: self.c_rs,
                        c_cs: self.c_cs,
                        cols,
                        bias: if self.bias.is_null() {
                            self.bias
                        } else {
                            // SAFETY: j0 < n and bias holds n values.
                            unsafe { self.bias.add(j0) }
                        },
                    };
                    // SAFETY: the tile lies within A, the packed B and C; the caller owns
                    // these elements of C.
                    unsafe {
                        (self.ukr)(&tile);
                        activate(&self.act, &tile);
                    }
                    i += rows;
                }
            }
            m0 = m1;
        }
    }
}

/// Applies `act` to a tile just written, while it is still in L1. Contiguous rows (or columns)
/// go through [`crate::math::apply_slice`], whose Relu and Clip loops vectorize; its results are
/// those of [`crate::math::apply`].
///
/// # Safety
/// The tile's `C` extents must be valid and not accessed by anyone else meanwhile.
unsafe fn activate<B>(act: &Activation, t: &Tile<B>) {
    if act.is_identity() {
        return;
    }
    if t.c_cs == 1 {
        for i in 0..t.rows {
            // SAFETY: row i of the tile is `cols` consecutive elements of C.
            let row = unsafe { core::slice::from_raw_parts_mut(t.c.add(i * t.c_rs), t.cols) };
            crate::math::apply_slice(act, row);
        }
    } else if t.c_rs == 1 {
        for j in 0..t.cols {
            // SAFETY: column j of the tile is `rows` consecutive elements of C.
            let col = unsafe { core::slice::from_raw_parts_mut(t.c.add(j * t.c_cs), t.rows) };
            crate::math::apply_slice(act, col);
        }
    } else {
        for i in 0..t.rows {
            for j in 0..t.cols {
                // SAFETY: (i, j) is inside the tile.
                let v = unsafe { &mut *t.c.add(i * t.c_rs + j * t.c_cs) };
                *v = crate::math::apply(act, *v);
            }
        }
    }
}

/// True when distinct `(i, j)` of an `m × n` matrix address distinct elements: one stride steps
/// over the whole span of the other. Threads may only split a product whose `C` passes this.
#[cfg(feature = "std")]
fn is_injective(m: usize, n: usize, rs: usize, cs: usize) -> bool {
    let rows_outer = (n == 1 || cs >= 1) && (m == 1 || rs > (n - 1) * cs);
    let cols_outer = (m == 1 || rs >= 1) && (n == 1 || cs > (m - 1) * rs);
    rows_outer || cols_outer
}

/// Splits a large product across the current rayon pool; returns false (and does nothing) when
/// it should run on this thread instead.
#[cfg(feature = "std")]
fn run_parallel<B: Copy + Sync>(job: &Job<B>, m: usize, panels: usize, threads: usize) -> bool {
    use rayon::prelude::*;

    let macs = m.saturating_mul(job.n).saturating_mul(job.k);
    if threads <= 1 || macs < PAR_MIN_MACS || !is_injective(m, job.n, job.c_rs, job.c_cs) {
        return false;
    }
    let mr = job.mr;
    let row_tiles = m.div_ceil(mr);
    let by_rows = row_tiles >= panels;
    let units = if by_rows { row_tiles } else { panels };
    if units < 2 {
        return false;
    }
    // A few pieces per thread evens out uneven progress without many tiny tasks.
    let tasks = units.min(threads * 4);
    (0..tasks).into_par_iter().for_each(|t| {
        let (u0, u1) = (units * t / tasks, units * (t + 1) / tasks);
        // SAFETY: the pieces cover disjoint row-tile (or panel) ranges, row ranges start on a
        // multiple of mr, and C is injective (checked above), so the pieces write disjoint
        // elements of C; everything else is read-only (see `impl Send for Job`).
        unsafe {
            if by_rows {
                job.run(u0 * mr, (u1 * mr).min(m), 0, panels);
            } else {
                job.run(0, m, u0, u1);
            }
        }
    });
    true
}

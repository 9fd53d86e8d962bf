//! NEON kernels for compressed weights.
//!
//! NEON's 16-byte registers hold half a block of 32 codes in natural order, so every width
//! unpacks straight from its bit planes with shifts and masks (4 bits: `x & 15` and `x >> 4`).
//!
//! # int8 activations ([`qgemm_q8`], [`qgemm_q8_dot`])
//!
//! Codes become int8 weights through `tbl` lookups of the int8 table (`vqtbl1q` for b ≤ 4;
//! `vqtbl2q`/`vqtbl4q` over 32 or 64 entries and their sums for b ≥ 5), or `c ^ 0x80` for the
//! int8-per-row table. Products are exact i32 sums: `sdot` (4 signed byte products per lane)
//! where the CPU has the dot-product extension ([`qgemm_q8_dot`], chosen by
//! [`qgemm_q8_best`]), else `smull`/`smlal2` pairs widened with `sadalp`. Each block's sums
//! are converted once and accumulated with `d · scale`.
//!
//! Tiles: 4 weight rows × 1 activation row for GEMV, 4 × 4 otherwise (32 vector registers hold
//! 16 accumulators, the decoded rows and one activation row).
//!
//! # f32 activations ([`qgemm_f32`])
//!
//! Two `tbl` look up the low and high bytes of the f16 table entries, `zip` interleaves them and
//! `fcvtl`/`fcvtl2` widen them: eight vectors of 4 f32 per block, used by every activation row of
//! the tile (b ≥ 5: the table converted to f32 once per tile, looked up element by element).
//!
//! # N:M sparse ([`sparse_gemm`])
//!
//! 2:4: each byte of positions (four values in two groups of four inputs) selects, from a
//! 256-entry table built at compile time, the 16 byte indices that gather the four inputs from
//! the two groups with one `vqtbl2q`. Other patterns use the reference.
//!
//! On a target built without NEON (soft-float) everything falls back to the reference.

// Tiles walk several per-row (or per-activation-row) arrays with the same index.
#![allow(clippy::needless_range_loop)]

use edgetune_core::Activation;

use super::{generic, QGemm, QGemmQ8Fn, QWeights, SparseWeights};

/// True when the CPU has the dot-product instructions (`sdot`).
pub fn has_dotprod() -> bool {
    #[cfg(feature = "std")]
    {
        std::arch::is_aarch64_feature_detected!("dotprod")
    }
    #[cfg(not(feature = "std"))]
    {
        cfg!(target_feature = "dotprod")
    }
}

/// Name of the kernels [`Kernels::best`](crate::kernels::Kernels::best) picks on this CPU.
pub fn name() -> &'static str {
    if !cfg!(target_feature = "neon") {
        "generic"
    } else if has_dotprod() {
        "aarch64-neon-dotprod"
    } else {
        "aarch64-neon"
    }
}

/// The int8-activation kernel for this CPU: with `sdot` when it has it.
pub fn qgemm_q8_best() -> QGemmQ8Fn {
    if has_dotprod() {
        qgemm_q8_dot
    } else {
        qgemm_q8
    }
}

/// Every NEON kernel set this CPU runs (without and, when present, with `sdot`), for tests.
pub fn variants() -> [Option<crate::kernels::Kernels>; 2] {
    let base = crate::kernels::Kernels::best();
    let plain = crate::kernels::Kernels {
        qgemm_q8: qgemm_q8,
        qgemm_name: "aarch64-neon",
        ..base
    };
    let dot = has_dotprod().then_some(crate::kernels::Kernels {
        qgemm_q8: qgemm_q8_dot,
        qgemm_name: "aarch64-neon-dotprod",
        ..base
    });
    [Some(plain), dot]
}

/// Block-quantized weights × int8-quantized activation rows, widening multiplies (see
/// [`super::QGemmQ8Fn`]).
#[allow(clippy::too_many_arguments)]
pub fn qgemm_q8(
    w: &QWeights<'_>,
    rows: &[u8],
    m: usize,
    c: &mut [f32],
    c_rs: usize,
    c_cs: usize,
    bias: Option<&[f32]>,
    act: Activation,
) {
    #[cfg(target_feature = "neon")]
    {
        neon::q8::<false>(w, rows, m, c, c_rs, c_cs, bias, act)
    }
    #[cfg(not(target_feature = "neon"))]
    generic::qgemm_q8(w, rows, m, c, c_rs, c_cs, bias, act)
}

/// [`qgemm_q8`] with `sdot`; the same as [`qgemm_q8`] on a CPU without it.
#[allow(clippy::too_many_arguments)]
pub fn qgemm_q8_dot(
    w: &QWeights<'_>,
    rows: &[u8],
    m: usize,
    c: &mut [f32],
    c_rs: usize,
    c_cs: usize,
    bias: Option<&[f32]>,
    act: Activation,
) {
    #[cfg(target_feature = "neon")]
    {
        if has_dotprod() {
            neon::q8::<true>(w, rows, m, c, c_rs, c_cs, bias, act)
        } else {
            neon::q8::<false>(w, rows, m, c, c_rs, c_cs, bias, act)
        }
    }
    #[cfg(not(target_feature = "neon"))]
    generic::qgemm_q8(w, rows, m, c, c_rs, c_cs, bias, act)
}

/// Block-quantized weights × f32 activations (see [`super::QGemmF32Fn`]).
pub fn qgemm_f32(w: &QWeights<'_>, g: QGemm<'_>) {
    #[cfg(target_feature = "neon")]
    {
        neon::f32(w, g)
    }
    #[cfg(not(target_feature = "neon"))]
    generic::qgemm_f32(w, g)
}

/// N:M sparse weights × f32 activations (see [`super::SparseGemmFn`]).
pub fn sparse_gemm(w: &SparseWeights<'_>, g: QGemm<'_>) {
    #[cfg(target_feature = "neon")]
    {
        if w.layout.keep == 2 && w.layout.m == 4 {
            return neon::sparse24(w, g);
        }
    }
    generic::sparse_gemm(w, g)
}

#[cfg(target_feature = "neon")]
mod neon {
    use core::arch::aarch64::*;

    use edgetune_core::layout::{QBlockLayout, BLOCK, ROW_TILE};
    use edgetune_core::Activation;

    use super::super::{
        q8_row_bytes, tiled_offsets, QGemm, QWeights, SparseWeights, TILED_GROUPS, TILE_BLOCK,
        TILE_BLOCK4,
    };
    use crate::math;

    // -----------------------------------------------------------------------------------------
    // Shared helpers
    // -----------------------------------------------------------------------------------------

    /// Where outputs go: `c[i·c_rs + j·c_cs] = act(v + bias[j])`.
    #[derive(Clone, Copy)]
    struct Out {
        c: *mut f32,
        c_rs: usize,
        c_cs: usize,
        bias: *const f32,
        act: Activation,
        identity: bool,
    }

    impl Out {
        fn new(
            c: &mut [f32],
            c_rs: usize,
            c_cs: usize,
            bias: Option<&[f32]>,
            act: Activation,
        ) -> Out {
            let bias = bias.map_or(core::ptr::null(), |b| b.as_ptr());
            Out {
                c: c.as_mut_ptr(),
                c_rs,
                c_cs,
                bias,
                act,
                identity: act.is_identity(),
            }
        }

        /// Writes output `(i, j)`.
        ///
        /// # Safety
        /// `(i, j)` must be inside the `C` and bias extents the caller checked.
        #[inline(always)]
        unsafe fn put(&self, i: usize, j: usize, v: f32) {
            // SAFETY: as the caller guarantees.
            unsafe {
                let b = if self.bias.is_null() {
                    0.0
                } else {
                    *self.bias.add(j)
                };
                let y = if self.identity {
                    v + b
                } else {
                    math::apply(&self.act, v + b)
                };
                *self.c.add(i * self.c_rs + j * self.c_cs) = y;
            }
        }
    }

    fn check_out(m: usize, n: usize, c: &[f32], c_rs: usize, c_cs: usize, bias: Option<&[f32]>) {
        assert!(
            (m - 1) * c_rs + (n - 1) * c_cs < c.len(),
            "qgemm: C too short"
        );
        assert!(bias.is_none_or(|b| b.len() >= n), "qgemm: bias too short");
    }

    /// Checks that every part of a block-quantized weight lies inside its bytes (the int8 tables
    /// only for the int8 path: they exist only with the int8 flag).
    fn check_q(w: &QWeights<'_>, int8: bool) {
        let l = w.layout;
        let e = l.entries();
        let ends = [
            l.stored_rows() * l.row_bytes(),
            l.lut_off + l.tables * e * 2,
            if int8 { l.lut_i8_off + l.tables * e } else { 0 },
            if int8 {
                l.lut_scale_off + l.tables * 4
            } else {
                0
            },
            l.scales_off + l.stored_rows() * l.groups_per_row() * 2,
        ];
        assert!(
            ends.iter().all(|&end| end <= w.bytes.len()),
            "qgemm: weight bytes too short"
        );
        assert!(
            l.tables * l.rows_per_table >= l.n && l.kp.is_multiple_of(l.group),
            "qgemm: inconsistent layout"
        );
    }

    /// The table of weight row `row` without a division in the common cases.
    #[inline(always)]
    fn table_of(row: usize, rpt: usize, n: usize) -> usize {
        if rpt == 1 {
            row
        } else if rpt >= n {
            0
        } else {
            row / rpt
        }
    }

    /// An f16 value (bits) as f32 (scalar `fcvt`).
    #[inline(always)]
    fn f16_to_f32(bits: u16) -> f32 {
        // SAFETY: register-only NEON operations (NEON is enabled for the target).
        unsafe {
            vgetq_lane_f32::<0>(crate::kernels::gemm::aarch64::widen_f16(vdupq_n_u16(bits)).0)
        }
    }

    /// Reads a little-endian f16 at byte `o` of `p`.
    #[inline(always)]
    unsafe fn f16_at(p: *const u8, o: usize) -> f32 {
        // SAFETY: the caller guarantees two readable bytes at `p + o`.
        unsafe { f16_to_f32(u16::from_le_bytes([*p.add(o), *p.add(o + 1)])) }
    }

    /// Reads a little-endian f32 at `p` (any alignment).
    #[inline(always)]
    unsafe fn f32_at(p: *const u8) -> f32 {
        // SAFETY: the caller guarantees four readable bytes.
        unsafe { f32::from_le_bytes(core::ptr::read_unaligned(p as *const [u8; 4])) }
    }

    /// 16 signed shift counts (negative: right) from a table.
    #[inline(always)]
    unsafe fn shifts(v: &[i8; 16]) -> int8x16_t {
        // SAFETY: 16 bytes.
        unsafe { vld1q_s8(v.as_ptr()) }
    }

    /// One plane of a block, unpacked to one byte per element: elements 0–15 and 16–31.
    #[inline(always)]
    unsafe fn plane<const P: usize>(p: *const u8) -> (uint8x16_t, uint8x16_t) {
        // SAFETY: the caller guarantees the plane's 4·P bytes at `p`.
        unsafe {
            match P {
                8 => (vld1q_u8(p), vld1q_u8(p.add(16))),
                4 => {
                    let x = vld1q_u8(p);
                    (vandq_u8(x, vdupq_n_u8(15)), vshrq_n_u8::<4>(x))
                }
                2 => {
                    // Element e: byte e % 8, bits 2·(e / 8).
                    let x = vreinterpretq_u8_u64(vdupq_n_u64(core::ptr::read_unaligned(
                        p as *const u64,
                    )));
                    let m = vdupq_n_u8(3);
                    let lo = vshlq_u8(
                        x,
                        shifts(&[0, 0, 0, 0, 0, 0, 0, 0, -2, -2, -2, -2, -2, -2, -2, -2]),
                    );
                    let hi = vshlq_u8(
                        x,
                        shifts(&[
                            -4, -4, -4, -4, -4, -4, -4, -4, -6, -6, -6, -6, -6, -6, -6, -6,
                        ]),
                    );
                    (vandq_u8(lo, m), vandq_u8(hi, m))
                }
                _ => {
                    // Element e: byte e % 4, bit e / 4.
                    let x = vreinterpretq_u8_u32(vdupq_n_u32(core::ptr::read_unaligned(
                        p as *const u32,
                    )));
                    let m = vdupq_n_u8(1);
                    let lo = vshlq_u8(
                        x,
                        shifts(&[0, 0, 0, 0, -1, -1, -1, -1, -2, -2, -2, -2, -3, -3, -3, -3]),
                    );
                    let hi = vshlq_u8(
                        x,
                        shifts(&[
                            -4, -4, -4, -4, -5, -5, -5, -5, -6, -6, -6, -6, -7, -7, -7, -7,
                        ]),
                    );
                    (vandq_u8(lo, m), vandq_u8(hi, m))
                }
            }
        }
    }

    /// The 32 codes of one block in natural order (elements 0–15, 16–31).
    #[inline(always)]
    unsafe fn codes<const B: usize>(p: *const u8) -> (uint8x16_t, uint8x16_t) {
        // SAFETY: the caller guarantees the block's 4·B bytes at `p`.
        unsafe {
            // Planes largest first, each adding the next bits of the code.
            let mut at = 0;
            let mut shift = 0;
            let mut lo = vdupq_n_u8(0);
            let mut hi = vdupq_n_u8(0);
            let mut add = |(l, h): (uint8x16_t, uint8x16_t), shift: i8| {
                let s = vdupq_n_s8(shift);
                lo = vorrq_u8(lo, vshlq_u8(l, s));
                hi = vorrq_u8(hi, vshlq_u8(h, s));
            };
            if B & 8 != 0 {
                add(plane::<8>(p), 0);
                at += 32;
                shift += 8;
            }
            if B & 4 != 0 {
                add(plane::<4>(p.add(at)), shift);
                at += 16;
                shift += 4;
            }
            if B & 2 != 0 {
                add(plane::<2>(p.add(at)), shift);
                at += 8;
                shift += 2;
            }
            if B & 1 != 0 {
                add(plane::<1>(p.add(at)), shift);
            }
            (lo, hi)
        }
    }

    /// The tables of one weight row, ready for `tbl`: up to 256 bytes (16 registers).
    struct Tbl {
        t: [uint8x16_t; 16],
    }

    /// Loads a table of `1 << B` bytes at `p` (b < 4: zero-padded to 16).
    #[inline(always)]
    unsafe fn load_table<const B: usize>(p: *const u8) -> Tbl {
        // SAFETY: the caller guarantees the table's bytes.
        unsafe {
            let mut t = [vdupq_n_u8(0); 16];
            if B < 4 {
                let mut pad = [0u8; 16];
                core::ptr::copy_nonoverlapping(p, pad.as_mut_ptr(), 1 << B);
                t[0] = vld1q_u8(pad.as_ptr());
            } else {
                for (q, v) in t.iter_mut().enumerate().take((1 << B) / 16) {
                    *v = vld1q_u8(p.add(16 * q));
                }
            }
            Tbl { t }
        }
    }

    /// Looks codes up in a table of `1 << B` entries (bytes).
    #[inline(always)]
    unsafe fn lookup<const B: usize>(t: &Tbl, c: uint8x16_t) -> uint8x16_t {
        // SAFETY: register-only NEON operations.
        unsafe {
            match B {
                1..=4 => vqtbl1q_u8(t.t[0], c),
                5 => vqtbl2q_u8(uint8x16x2_t(t.t[0], t.t[1]), c),
                _ => {
                    // 64 entries per `tbl4`; out-of-range indices give 0, so the parts add up.
                    let mut r = vqtbl4q_u8(uint8x16x4_t(t.t[0], t.t[1], t.t[2], t.t[3]), c);
                    for q in 1..(1usize << B) / 64 {
                        let idx = vsubq_u8(c, vdupq_n_u8((64 * q) as u8));
                        let part = vqtbl4q_u8(
                            uint8x16x4_t(
                                t.t[4 * q],
                                t.t[4 * q + 1],
                                t.t[4 * q + 2],
                                t.t[4 * q + 3],
                            ),
                            idx,
                        );
                        r = vorrq_u8(r, part);
                    }
                    r
                }
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // int8 activations
    // -----------------------------------------------------------------------------------------

    /// `acc + Σ a·b` over 16 byte pairs into 4 lanes (`sdot`). Always inlined: a
    /// `#[target_feature]` function could not be, so the assembler is told about the
    /// extension in the `asm!` itself.
    ///
    /// # Safety
    /// The CPU must have the dot-product extension.
    #[inline(always)]
    unsafe fn sdot(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
        let mut acc = acc;
        // SAFETY: register-only; the caller guarantees the extension.
        unsafe {
            core::arch::asm!(
                ".arch_extension dotprod",
                "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
                acc = inout(vreg) acc,
                a = in(vreg) a,
                b = in(vreg) b,
                options(pure, nomem, nostack, preserves_flags)
            );
        }
        acc
    }

    /// `Σ w·q` over one block (two halves), exact, in 4 lanes.
    #[inline(always)]
    unsafe fn dot32<const DOT: bool>(
        w: (int8x16_t, int8x16_t),
        q: (int8x16_t, int8x16_t),
    ) -> int32x4_t {
        // SAFETY: `DOT` only when the CPU has `sdot` (checked by the callers).
        unsafe {
            if DOT {
                sdot(sdot(vdupq_n_s32(0), w.0, q.0), w.1, q.1)
            } else {
                // Two products of |w| ≤ 128 and |q| ≤ 127 fit i16.
                let p0 = vmlal_high_s8(vmull_s8(vget_low_s8(w.0), vget_low_s8(q.0)), w.0, q.0);
                let p1 = vmlal_high_s8(vmull_s8(vget_low_s8(w.1), vget_low_s8(q.1)), w.1, q.1);
                vpadalq_s16(vpaddlq_s16(p0), p1)
            }
        }
    }

    const TABLE: u8 = 0;
    const LINEAR8: u8 = 1;

    /// One call's operands as raw pointers (extents checked in [`q8`]).
    struct Q8 {
        codes: *const u8,
        rb: usize,
        bb: usize,
        nb: usize,
        lut: *const u8,
        entries: usize,
        rpt: usize,
        n: usize,
        lut_scale: *const u8,
        scales: *const u8,
        gpr: usize,
        bpg: usize,
        acts: *const u8,
        arb: usize,
        kp: usize,
        floor: i8,
        out: Out,
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn q8<const DOT: bool>(
        w: &QWeights<'_>,
        rows: &[u8],
        m: usize,
        c: &mut [f32],
        c_rs: usize,
        c_cs: usize,
        bias: Option<&[f32]>,
        act: Activation,
    ) {
        let l = w.layout;
        if m == 0 || l.n == 0 {
            return;
        }
        check_q(w, true);
        check_out(m, l.n, c, c_rs, c_cs, bias);
        let arb = q8_row_bytes(l.k);
        assert!(rows.len() >= m * arb, "qgemm: quantized rows too short");
        if l.row_tiles() {
            if !tiled::<DOT>(w, rows, m, c, c_rs, c_cs, bias, act) {
                super::generic::qgemm_q8(w, rows, m, c, c_rs, c_cs, bias, act);
            }
            return;
        }
        let e = l.entries();
        let t0 = &w.bytes[l.lut_i8_off..l.lut_i8_off + e];
        let mut mode = TABLE;
        let mut floor = 0;
        if l.tables == 1 && l.bits == 8 {
            let f = t0[0] as i8;
            if (f == -128 || f == -127)
                && t0
                    .iter()
                    .enumerate()
                    .skip(1)
                    .all(|(c, &v)| v as i8 as i32 == c as i32 - 128)
            {
                (mode, floor) = (LINEAR8, f);
            }
        }
        let cx = Q8 {
            codes: w.bytes.as_ptr(),
            rb: l.row_bytes(),
            bb: l.block_bytes(),
            nb: l.kp / BLOCK,
            lut: w.bytes[l.lut_i8_off..].as_ptr(),
            entries: e,
            rpt: l.rows_per_table,
            n: l.n,
            lut_scale: w.bytes[l.lut_scale_off..].as_ptr(),
            scales: w.bytes[l.scales_off..].as_ptr(),
            gpr: l.groups_per_row(),
            bpg: l.group / BLOCK,
            acts: rows.as_ptr(),
            arb,
            kp: l.kp,
            floor,
            out: Out::new(c, c_rs, c_cs, bias, act),
        };
        macro_rules! go {
            ($b:literal) => {
                if mode == LINEAR8 {
                    q8_run::<$b, LINEAR8, DOT>(&cx, m, l.n)
                } else {
                    q8_run::<$b, TABLE, DOT>(&cx, m, l.n)
                }
            };
        }
        // SAFETY: every pointer in `cx` addresses the extents checked above; `DOT` only when
        // the CPU has `sdot` (the callers check); `c` is borrowed mutably for this call.
        unsafe {
            match l.bits {
                1 => go!(1),
                2 => go!(2),
                3 => go!(3),
                4 => go!(4),
                5 => go!(5),
                6 => go!(6),
                7 => go!(7),
                _ => go!(8),
            }
        }
    }

    /// All tiles: 4 weight rows × 1 activation row when `m < 4`, else 4 × 4 (ragged edges
    /// repeat the last row; its extra results are dropped).
    ///
    /// # Safety
    /// `cx` must describe valid extents for `m × n`; `DOT` needs `sdot`.
    unsafe fn q8_run<const B: usize, const MODE: u8, const DOT: bool>(cx: &Q8, m: usize, n: usize) {
        // SAFETY: every tile lies inside the m × n product (rows past the edges are clamped).
        unsafe {
            if m < 4 {
                for i in 0..m {
                    for j in (0..n).step_by(4) {
                        q8_tile::<B, MODE, DOT, 4, 1>(cx, j, n, i, m);
                    }
                }
            } else {
                for i in (0..m).step_by(4) {
                    for j in (0..n).step_by(4) {
                        q8_tile::<B, MODE, DOT, 4, 4>(cx, j, n, i, m);
                    }
                }
            }
        }
    }

    /// A tile of weight rows `j0..j0+NW` × activation rows `i0..i0+MA` (rows past `n` / `m`
    /// repeat the last one; their results are dropped). Every output accumulates block by
    /// block in one chain, whatever the tile.
    ///
    /// # Safety
    /// As for [`q8_run`], with `j0 < n` and `i0 < m`.
    #[inline(always)]
    unsafe fn q8_tile<
        const B: usize,
        const MODE: u8,
        const DOT: bool,
        const NW: usize,
        const MA: usize,
    >(
        cx: &Q8,
        j0: usize,
        n: usize,
        i0: usize,
        m: usize,
    ) {
        // SAFETY (whole body): every pointer below addresses row min(j0 + r, n − 1) of the
        // codes, tables and scales, or activation row min(i0 + i, m − 1) (Kp codes, then Kp/32
        // scales), all checked in `q8`.
        unsafe {
            let grouped = cx.gpr > 1;
            let row = |r: usize| (j0 + r).min(n - 1);
            let mut tabs: [Tbl; NW] = core::array::from_fn(|_| Tbl {
                t: [vdupq_n_u8(0); 16],
            });
            let mut cp = [core::ptr::null::<u8>(); NW];
            let mut srow = [core::ptr::null::<u8>(); NW];
            for r in 0..NW {
                if MODE == TABLE {
                    tabs[r] =
                        load_table::<B>(cx.lut.add(table_of(row(r), cx.rpt, cx.n) * cx.entries));
                }
                cp[r] = cx.codes.add(row(r) * cx.rb);
                srow[r] = cx.scales.add(row(r) * cx.gpr * 2);
            }
            let mut ap = [core::ptr::null::<u8>(); MA];
            for i in 0..MA {
                ap[i] = cx.acts.add((i0 + i).min(m - 1) * cx.arb);
            }
            let mut acc = [[vdupq_n_f32(0.0); MA]; NW];
            let mut s = [1f32; NW];
            for b in 0..cx.nb {
                if grouped && b.is_multiple_of(cx.bpg) {
                    for r in 0..NW {
                        s[r] = f16_at(srow[r], 2 * (b / cx.bpg));
                    }
                }
                let mut w = [(vdupq_n_s8(0), vdupq_n_s8(0)); NW];
                for r in 0..NW {
                    let (lo, hi) = codes::<B>(cp[r].add(b * cx.bb));
                    w[r] = if MODE == LINEAR8 {
                        let f = vdupq_n_s8(cx.floor);
                        let x = vdupq_n_u8(0x80);
                        (
                            vmaxq_s8(vreinterpretq_s8_u8(veorq_u8(lo, x)), f),
                            vmaxq_s8(vreinterpretq_s8_u8(veorq_u8(hi, x)), f),
                        )
                    } else {
                        (
                            vreinterpretq_s8_u8(lookup::<B>(&tabs[r], lo)),
                            vreinterpretq_s8_u8(lookup::<B>(&tabs[r], hi)),
                        )
                    };
                }
                for i in 0..MA {
                    let q = ap[i].add(b * BLOCK) as *const i8;
                    let qv = (vld1q_s8(q), vld1q_s8(q.add(16)));
                    let d = f32_at(ap[i].add(cx.kp + 4 * b));
                    for r in 0..NW {
                        let isum = dot32::<DOT>(w[r], qv);
                        let ds = if grouped { d * s[r] } else { d };
                        acc[r][i] = vfmaq_n_f32(acc[r][i], vcvtq_f32_s32(isum), ds);
                    }
                }
            }
            for r in 0..NW {
                let j = j0 + r;
                if j >= n {
                    break;
                }
                let mut f = f32_at(cx.lut_scale.add(4 * table_of(j, cx.rpt, cx.n)));
                if !grouped {
                    f *= f16_at(cx.scales, 2 * j);
                }
                for i in 0..MA {
                    if i0 + i < m {
                        cx.out.put(i0 + i, j, vaddvq_f32(acc[r][i]) * f);
                    }
                }
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Row-tiled 2-bit affine and 4-bit codes (int8 activations)
    // -----------------------------------------------------------------------------------------

    /// One row-tiled product's operands as raw pointers (extents checked in [`tiled`]).
    struct Tiled {
        codes: *const u8,
        nb: usize,
        bpg: usize,
        gpr: usize,
        scales: *const u8,
        acts: *const u8,
        arb: usize,
        kp: usize,
        alpha: f32,
        beta: f32,
        /// The int8 tables and their f32 scales; each tile's rows share one
        /// ([`QBlockLayout::tile_table`] of `layout`).
        lut: *const u8,
        lut_scales: *const u8,
        layout: QBlockLayout,
        n: usize,
        out: Out,
    }

    impl Tiled {
        /// The f32 scale of tile `tile`'s table.
        ///
        /// # Safety
        /// `tile` must be below `⌈n/16⌉`.
        unsafe fn lut_scale(&self, tile: usize) -> f32 {
            // SAFETY: the tile's table exists (`check_q` checked every table's scale).
            unsafe { f32_at(self.lut_scales.add(4 * self.layout.tile_table(tile))) }
        }

        /// The 16 f16 row scales of tile `tile`, group `g`, as f32.
        ///
        /// # Safety
        /// `tile` must be below `⌈n/16⌉` and `g` below the groups per row.
        unsafe fn scales16(&self, tile: usize, g: usize) -> [float32x4_t; 4] {
            // SAFETY: the scales of whole tiles were checked (`check_q`).
            unsafe {
                let s = self.scales.add((tile * self.gpr + g) * ROW_TILE * 2) as *const u16;
                let (s0, s1) = crate::kernels::gemm::aarch64::widen_f16(vld1q_u16(s));
                let (s2, s3) = crate::kernels::gemm::aarch64::widen_f16(vld1q_u16(s.add(8)));
                [s0, s1, s2, s3]
            }
        }

        /// Writes outputs `(i, j0..j0 + 16)` of tile `tile` from `acc` times its table's scale,
        /// those below `n`.
        ///
        /// # Safety
        /// As for [`Out::put`], for the outputs below `n`; `tile` below `⌈n/16⌉`.
        unsafe fn put16(&self, i: usize, tile: usize, acc: &[float32x4_t; 4]) {
            // SAFETY: as the caller guarantees.
            unsafe {
                let ls = self.lut_scale(tile);
                let mut y = [0f32; ROW_TILE];
                for j in 0..4 {
                    vst1q_f32(y.as_mut_ptr().add(4 * j), vmulq_n_f32(acc[j], ls));
                }
                let j0 = tile * ROW_TILE;
                for (r, v) in y
                    .iter()
                    .enumerate()
                    .take(self.n.saturating_sub(j0).min(ROW_TILE))
                {
                    self.out.put(i, j0 + r, *v);
                }
            }
        }
    }

    /// The row-tiled product of 2-bit codes whose one int8 table is affine
    /// (`lut_i8[c] = α·c + β`: ternary, int2), or of 4-bit codes whose tiles each take one
    /// table; false (nothing written) for any other row-tiled weight, which the caller hands to
    /// the reference.
    ///
    /// 2 bits: a tile block is eight registers of two rows (each row's 8 bytes two lanes).
    /// Plane `p` of a row's bytes `4h..4h + 4` holds inputs `8p + 4h ..`, so one 8-byte run of
    /// activations, doubled, serves every register: `sdot` (or `smull`/`smlal` and pairwise
    /// adds) gives each lane's sum, converted and scaled by `d` per block; per group the lane
    /// pairs are added, `α`, `β·Σd·Σq` and the 16 row scales applied.
    ///
    /// 4 bits: a register is one 4-byte word of 4 rows (one lane each: low nibbles inputs
    /// `4w..4w + 4`, high ones `16 + 4w..`); `tbl` looks both up in the tile's table and
    /// [`dot_words`] multiplies them with the block's activation words, broadcast.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn tiled<const DOT: bool>(
        w: &QWeights<'_>,
        rows: &[u8],
        m: usize,
        c: &mut [f32],
        c_rs: usize,
        c_cs: usize,
        bias: Option<&[f32]>,
        act: Activation,
    ) -> bool {
        let l = w.layout;
        let (alpha, beta) = match (l.bits, w.affine_i8()) {
            (2, Some(ab)) => ab,
            (4, _) if l.one_table_per_tile() => (1, 0),
            _ => return false,
        };
        if l.groups_per_row() > TILED_GROUPS {
            return false;
        }
        let t = Tiled {
            codes: w.bytes.as_ptr(),
            nb: l.kp / BLOCK,
            bpg: l.group / BLOCK,
            gpr: l.groups_per_row(),
            scales: w.bytes[l.scales_off..].as_ptr(),
            acts: rows.as_ptr(),
            arb: q8_row_bytes(l.k),
            kp: l.kp,
            alpha: alpha as f32,
            beta: beta as f32,
            lut: w.bytes[l.lut_i8_off..].as_ptr(),
            lut_scales: w.bytes[l.lut_scale_off..].as_ptr(),
            layout: l,
            n: l.n,
            out: Out::new(c, c_rs, c_cs, bias, act),
        };
        if l.bits == 4 {
            for i in 0..m {
                // SAFETY: the caller checked whole tiles of codes and scales and every table
                // (`check_q`), `m` activation rows and the outputs; `DOT` only with `sdot`.
                unsafe { tiled4_row::<DOT>(&t, i) };
            }
            return true;
        }
        let mut kg = [0f32; TILED_GROUPS];
        for i in 0..m {
            let row = &rows[i * t.arb..(i + 1) * t.arb];
            tiled_offsets(row, t.kp, t.bpg, t.beta, &mut kg[..t.gpr]);
            // SAFETY: the caller checked whole tiles of codes and scales (`check_q`), `m`
            // activation rows and the outputs; `DOT` only with `sdot` (the callers check).
            unsafe { tiled_row::<DOT>(&t, i, &kg) };
        }
        true
    }

    /// [`tiled`] for activation row `i`.
    ///
    /// # Safety
    /// As [`tiled`] checks; `DOT` needs `sdot`.
    unsafe fn tiled_row<const DOT: bool>(t: &Tiled, i: usize, kg: &[f32; TILED_GROUPS]) {
        // SAFETY: reads inside the extents the caller checked; outputs through `Out::put`.
        unsafe {
            let three = vdupq_n_u8(3);
            let alpha = vdupq_n_f32(t.alpha);
            let row = t.acts.add(i * t.arb);
            for tile in 0..t.n.div_ceil(ROW_TILE) {
                let base = t.codes.add(tile * t.nb * TILE_BLOCK);
                let mut acc = [vdupq_n_f32(0.0); 4];
                for g in 0..t.gpr {
                    let mut f = [vdupq_n_f32(0.0); 8];
                    for b in g * t.bpg..(g + 1) * t.bpg {
                        let p = base.add(b * TILE_BLOCK);
                        let q = row.add(b * BLOCK);
                        let qv: [int8x16_t; 4] = core::array::from_fn(|k| {
                            let h = vld1_s8(q.add(8 * k) as *const i8);
                            vcombine_s8(h, h)
                        });
                        let d = vdupq_n_f32(f32_at(row.add(t.kp + 4 * b)));
                        for (h, fh) in f.iter_mut().enumerate() {
                            let x = vld1q_u8(p.add(16 * h));
                            let pl = [
                                vandq_u8(x, three),
                                vandq_u8(vshrq_n_u8::<2>(x), three),
                                vandq_u8(vshrq_n_u8::<4>(x), three),
                                vshrq_n_u8::<6>(x),
                            ]
                            .map(|v| vreinterpretq_s8_u8(v));
                            let isum = if DOT {
                                let mut s = vdupq_n_s32(0);
                                for k in 0..4 {
                                    s = sdot(s, pl[k], qv[k]);
                                }
                                s
                            } else {
                                // Products ≤ 3·127, four planes: i16 holds them.
                                let mut lo = vmull_s8(vget_low_s8(pl[0]), vget_low_s8(qv[0]));
                                let mut hi = vmull_high_s8(pl[0], qv[0]);
                                for k in 1..4 {
                                    lo = vmlal_s8(lo, vget_low_s8(pl[k]), vget_low_s8(qv[k]));
                                    hi = vmlal_high_s8(hi, pl[k], qv[k]);
                                }
                                vpaddq_s32(vpaddlq_s16(lo), vpaddlq_s16(hi))
                            };
                            *fh = vfmaq_f32(*fh, vcvtq_f32_s32(isum), d);
                        }
                    }
                    let sc = t.scales16(tile, g);
                    let off = vdupq_n_f32(kg[g]);
                    for j in 0..4 {
                        let v = vpaddq_f32(f[2 * j], f[2 * j + 1]);
                        let v = vfmaq_f32(off, v, alpha);
                        acc[j] = vfmaq_f32(acc[j], v, sc[j]);
                    }
                }
                t.put16(i, tile, &acc);
            }
        }
    }

    /// [`tiled`] for activation row `i` of 4-bit codes.
    ///
    /// # Safety
    /// As [`tiled`] checks; `DOT` needs `sdot`.
    unsafe fn tiled4_row<const DOT: bool>(t: &Tiled, i: usize) {
        // SAFETY: reads inside the extents the caller checked; outputs through `Out::put`.
        unsafe {
            let nib = vdupq_n_u8(0x0F);
            let row = t.acts.add(i * t.arb);
            for tile in 0..t.n.div_ceil(ROW_TILE) {
                let tab = vld1q_s8(t.lut.add(16 * t.layout.tile_table(tile)) as *const i8);
                let base = t.codes.add(tile * t.nb * TILE_BLOCK4);
                let mut acc = [vdupq_n_f32(0.0); 4];
                for g in 0..t.gpr {
                    let mut f = [vdupq_n_f32(0.0); 4];
                    for b in g * t.bpg..(g + 1) * t.bpg {
                        let p = base.add(b * TILE_BLOCK4);
                        let q = row.add(b * BLOCK);
                        let mut s = [vdupq_n_s32(0); 4];
                        for w in 0..4 {
                            let word = |o: usize| {
                                let v = core::ptr::read_unaligned(q.add(o) as *const i32);
                                vreinterpretq_s8_s32(vdupq_n_s32(v))
                            };
                            let qv = (word(4 * w), word(16 + 4 * w));
                            for (j, sj) in s.iter_mut().enumerate() {
                                // Word w of rows 4j..4j + 4, one lane each.
                                let x = vld1q_u8(p.add(64 * w + 16 * j));
                                let lo = vqtbl1q_s8(tab, vandq_u8(x, nib));
                                let hi = vqtbl1q_s8(tab, vshrq_n_u8::<4>(x));
                                *sj = dot_words::<DOT>(*sj, (lo, hi), qv);
                            }
                        }
                        let d = vdupq_n_f32(f32_at(row.add(t.kp + 4 * b)));
                        for j in 0..4 {
                            f[j] = vfmaq_f32(f[j], vcvtq_f32_s32(s[j]), d);
                        }
                    }
                    let sc = t.scales16(tile, g);
                    for j in 0..4 {
                        acc[j] = vfmaq_f32(acc[j], f[j], sc[j]);
                    }
                }
                t.put16(i, tile, &acc);
            }
        }
    }

    /// `acc + Σ w·q` per 4-byte word (lane), over both halves, exact.
    #[inline(always)]
    unsafe fn dot_words<const DOT: bool>(
        acc: int32x4_t,
        w: (int8x16_t, int8x16_t),
        q: (int8x16_t, int8x16_t),
    ) -> int32x4_t {
        // SAFETY: `DOT` only when the CPU has `sdot` (checked by the callers).
        unsafe {
            if DOT {
                sdot(sdot(acc, w.0, q.0), w.1, q.1)
            } else {
                // Two products of |w| ≤ 128 and |q| ≤ 127 fit i16; pairwise adds keep words apart.
                let lo = vmlal_s8(
                    vmull_s8(vget_low_s8(w.0), vget_low_s8(q.0)),
                    vget_low_s8(w.1),
                    vget_low_s8(q.1),
                );
                let hi = vmlal_high_s8(vmull_high_s8(w.0, q.0), w.1, q.1);
                vaddq_s32(acc, vpaddq_s32(vpaddlq_s16(lo), vpaddlq_s16(hi)))
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // f32 activations
    // -----------------------------------------------------------------------------------------

    /// One call's operands as raw pointers (extents checked in [`f32`]).
    struct F32 {
        codes: *const u8,
        rb: usize,
        bb: usize,
        nb: usize,
        lut: *const u8,
        entries: usize,
        rpt: usize,
        n: usize,
        scales: *const u8,
        gpr: usize,
        bpg: usize,
        a: *const f32,
        a_rs: usize,
        k: usize,
        out: Out,
    }

    pub(super) fn f32(w: &QWeights<'_>, g: QGemm<'_>) {
        let l = w.layout;
        if g.m == 0 || l.n == 0 {
            return;
        }
        if l.row_tiles() {
            return super::generic::qgemm_f32(w, g);
        }
        check_q(w, false);
        check_out(g.m, l.n, g.c, g.c_rs, g.c_cs, g.bias);
        assert!((g.m - 1) * g.a_rs + l.k <= g.a.len(), "qgemm: A too short");
        let cx = F32 {
            codes: w.bytes.as_ptr(),
            rb: l.row_bytes(),
            bb: l.block_bytes(),
            nb: l.kp / BLOCK,
            lut: w.bytes[l.lut_off..].as_ptr(),
            entries: l.entries(),
            rpt: l.rows_per_table,
            n: l.n,
            scales: w.bytes[l.scales_off..].as_ptr(),
            gpr: l.groups_per_row(),
            bpg: l.group / BLOCK,
            a: g.a.as_ptr(),
            a_rs: g.a_rs,
            k: l.k,
            out: Out::new(g.c, g.c_rs, g.c_cs, g.bias, g.act),
        };
        // SAFETY: every pointer in `cx` addresses the extents checked above; `c` is borrowed
        // mutably for this call.
        unsafe {
            match l.bits {
                1 => f32_run::<1>(&cx, g.m, l.n),
                2 => f32_run::<2>(&cx, g.m, l.n),
                3 => f32_run::<3>(&cx, g.m, l.n),
                4 => f32_run::<4>(&cx, g.m, l.n),
                5 => f32_run::<5>(&cx, g.m, l.n),
                6 => f32_run::<6>(&cx, g.m, l.n),
                7 => f32_run::<7>(&cx, g.m, l.n),
                _ => f32_run::<8>(&cx, g.m, l.n),
            }
        }
    }

    /// All tiles: 4 weight rows × 1 activation row when `m < 4`, else 2 × 4.
    ///
    /// # Safety
    /// `cx` must describe valid extents for `m × n`.
    unsafe fn f32_run<const B: usize>(cx: &F32, m: usize, n: usize) {
        // SAFETY: every tile lies inside the m × n product (rows past the edges are clamped).
        unsafe {
            if m < 4 {
                for i in 0..m {
                    for j in (0..n).step_by(4) {
                        f32_tile::<B, 4, 1>(cx, j, n, i, m);
                    }
                }
            } else {
                for i in (0..m).step_by(4) {
                    for j in (0..n).step_by(2) {
                        f32_tile::<B, 2, 4>(cx, j, n, i, m);
                    }
                }
            }
        }
    }

    /// A row's f16 table, ready for lookups: low and high bytes of the entries (b ≤ 4), or the
    /// entries as f32 (b ≥ 5; only the first 2^b are written).
    struct F16Tbl {
        lo: uint8x16_t,
        hi: uint8x16_t,
        f32s: core::mem::MaybeUninit<[f32; 256]>,
    }

    #[inline(always)]
    unsafe fn f16_table<const B: usize>(p: *const u8) -> F16Tbl {
        // SAFETY: the caller guarantees the 2^B entries (2^(B+1) bytes) at `p`.
        unsafe {
            let mut t = F16Tbl {
                lo: vdupq_n_u8(0),
                hi: vdupq_n_u8(0),
                f32s: core::mem::MaybeUninit::uninit(),
            };
            if B <= 4 {
                let mut raw = [0u8; 32];
                core::ptr::copy_nonoverlapping(p, raw.as_mut_ptr(), 2 << B);
                let v = vld2q_u8(raw.as_ptr());
                t.lo = v.0;
                t.hi = v.1;
            } else {
                let out = t.f32s.as_mut_ptr() as *mut f32;
                for q in 0..(1usize << B) / 8 {
                    let (a, b) = crate::kernels::gemm::aarch64::widen_f16(vld1q_u16(
                        p.add(16 * q) as *const u16
                    ));
                    vst1q_f32(out.add(8 * q), a);
                    vst1q_f32(out.add(8 * q + 4), b);
                }
            }
            t
        }
    }

    /// The 32 weights of one block as eight vectors of 4 f32, in order.
    #[inline(always)]
    unsafe fn f32_weights<const B: usize>(cp: *const u8, t: &F16Tbl) -> [float32x4_t; 8] {
        // SAFETY: the caller guarantees the block's codes at `cp`.
        unsafe {
            let (lo, hi) = codes::<B>(cp);
            if B <= 4 {
                let half = |c: uint8x16_t| {
                    let l = vqtbl1q_u8(t.lo, c);
                    let h = vqtbl1q_u8(t.hi, c);
                    let (a, b) = crate::kernels::gemm::aarch64::widen_f16(vreinterpretq_u16_u8(
                        vzip1q_u8(l, h),
                    ));
                    let (c2, d) = crate::kernels::gemm::aarch64::widen_f16(vreinterpretq_u16_u8(
                        vzip2q_u8(l, h),
                    ));
                    [a, b, c2, d]
                };
                let (x, y) = (half(lo), half(hi));
                [x[0], x[1], x[2], x[3], y[0], y[1], y[2], y[3]]
            } else {
                let mut idx = [0u8; 32];
                vst1q_u8(idx.as_mut_ptr(), lo);
                vst1q_u8(idx.as_mut_ptr().add(16), hi);
                let tab = t.f32s.as_ptr() as *const f32;
                let mut vals = [0f32; 32];
                for (v, &c) in vals.iter_mut().zip(&idx) {
                    // Codes are below 2^B: only written entries are read.
                    *v = *tab.add(c as usize);
                }
                core::array::from_fn(|q| vld1q_f32(vals.as_ptr().add(4 * q)))
            }
        }
    }

    /// A tile of weight rows `j0..j0+NW` × activation rows `i0..i0+MA` (rows past `n` / `m`
    /// repeat the last one; their results are dropped). Every output accumulates in two
    /// chains (even and odd vectors), whatever the tile.
    ///
    /// # Safety
    /// As for [`f32_run`], with `j0 < n` and `i0 < m`.
    #[inline(always)]
    unsafe fn f32_tile<const B: usize, const NW: usize, const MA: usize>(
        cx: &F32,
        j0: usize,
        n: usize,
        i0: usize,
        m: usize,
    ) {
        // SAFETY (whole body): every pointer below addresses row min(j0 + r, n − 1) of the
        // codes, tables and scales, or activation row min(i0 + i, m − 1) (k values); the last,
        // partial block reads activations from a zero-padded local copy.
        unsafe {
            let grouped = cx.gpr > 1;
            let row = |r: usize| (j0 + r).min(n - 1);
            let mut tabs: [F16Tbl; NW] = core::array::from_fn(|_| F16Tbl {
                lo: vdupq_n_u8(0),
                hi: vdupq_n_u8(0),
                f32s: core::mem::MaybeUninit::uninit(),
            });
            let mut cp = [core::ptr::null::<u8>(); NW];
            let mut srow = [core::ptr::null::<u8>(); NW];
            for r in 0..NW {
                tabs[r] =
                    f16_table::<B>(cx.lut.add(table_of(row(r), cx.rpt, cx.n) * cx.entries * 2));
                cp[r] = cx.codes.add(row(r) * cx.rb);
                srow[r] = cx.scales.add(row(r) * cx.gpr * 2);
            }
            let mut ap = [core::ptr::null::<f32>(); MA];
            for i in 0..MA {
                ap[i] = cx.a.add((i0 + i).min(m - 1) * cx.a_rs);
            }
            let mut acc = [[[vdupq_n_f32(0.0); 2]; MA]; NW];
            let full = cx.k / BLOCK;
            let mut xbuf = [[0f32; BLOCK]; MA];
            for b in 0..cx.nb {
                let mut xp = [core::ptr::null::<f32>(); MA];
                for i in 0..MA {
                    xp[i] = ap[i].add(b * BLOCK);
                }
                let valid = if b < full { BLOCK } else { cx.k - full * BLOCK };
                if valid < BLOCK {
                    for i in 0..MA {
                        core::ptr::copy_nonoverlapping(xp[i], xbuf[i].as_mut_ptr(), valid);
                        xp[i] = xbuf[i].as_ptr();
                    }
                }
                for r in 0..NW {
                    let mut wv = f32_weights::<B>(cp[r].add(b * cx.bb), &tabs[r]);
                    let s = if grouped {
                        f16_at(srow[r], 2 * (b / cx.bpg))
                    } else {
                        1.0
                    };
                    for (q, v) in wv.iter_mut().enumerate() {
                        if grouped {
                            *v = vmulq_n_f32(*v, s);
                        }
                        if 4 * q >= valid {
                            // Past k: padding codes, whatever their table value.
                            *v = vdupq_n_f32(0.0);
                        } else if 4 * q + 4 > valid {
                            let keep = [0u32, 1, 2, 3].map(|l| {
                                if 4 * q + (l as usize) < valid {
                                    u32::MAX
                                } else {
                                    0
                                }
                            });
                            *v = vreinterpretq_f32_u32(vandq_u32(
                                vreinterpretq_u32_f32(*v),
                                vld1q_u32(keep.as_ptr()),
                            ));
                        }
                    }
                    for i in 0..MA {
                        for (q, v) in wv.iter().enumerate() {
                            acc[r][i][q % 2] =
                                vfmaq_f32(acc[r][i][q % 2], *v, vld1q_f32(xp[i].add(4 * q)));
                        }
                    }
                }
            }
            for r in 0..NW {
                let j = j0 + r;
                if j >= n {
                    break;
                }
                let f = if grouped { 1.0 } else { f16_at(srow[r], 0) };
                for i in 0..MA {
                    if i0 + i < m {
                        cx.out.put(
                            i0 + i,
                            j,
                            vaddvq_f32(vaddq_f32(acc[r][i][0], acc[r][i][1])) * f,
                        );
                    }
                }
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // 2:4 sparse
    // -----------------------------------------------------------------------------------------

    /// For each byte of positions (four 2-bit positions: values 0, 1 in one group of four
    /// inputs, values 2, 3 in the next), the 16 byte indices that gather the four inputs from
    /// the 32 bytes of the two groups.
    static GATHER24: [[u8; 16]; 256] = {
        let mut t = [[0u8; 16]; 256];
        let mut b = 0;
        while b < 256 {
            let mut v = 0;
            while v < 4 {
                let pos = (b >> (2 * v)) & 3;
                let base = 16 * (v / 2) + 4 * pos;
                let mut byte = 0;
                while byte < 4 {
                    t[b][4 * v + byte] = (base + byte) as u8;
                    byte += 1;
                }
                v += 1;
            }
            b += 1;
        }
        t
    };

    pub(super) fn sparse24(w: &SparseWeights<'_>, g: QGemm<'_>) {
        let l = w.layout;
        if g.m == 0 || l.n == 0 {
            return;
        }
        let per_row = l.per_row();
        assert!(
            l.n * per_row * 2 <= l.pos_off && l.pos_off + l.n * l.pos_row_bytes <= w.bytes.len(),
            "sparse: weight bytes too short"
        );
        assert!(
            l.pos_bits == 2 && l.pos_row_bytes * 4 >= per_row,
            "sparse: inconsistent layout"
        );
        check_out(g.m, l.n, g.c, g.c_rs, g.c_cs, g.bias);
        assert!((g.m - 1) * g.a_rs + l.k <= g.a.len(), "sparse: A too short");
        let out = Out::new(g.c, g.c_rs, g.c_cs, g.bias, g.act);
        // Four values (one byte of positions, 8 inputs) at a time.
        let quads = per_row / 4;
        for i in 0..g.m {
            let x = &g.a[i * g.a_rs..i * g.a_rs + l.k];
            for j in 0..l.n {
                let vals = &w.bytes[j * per_row * 2..(j + 1) * per_row * 2];
                let pos = &w.bytes
                    [l.pos_off + j * l.pos_row_bytes..l.pos_off + (j + 1) * l.pos_row_bytes];
                // SAFETY: quad q reads values 4q..4q+4 (8 bytes), position byte q and inputs
                // 8q..8q+8, all inside the slices above (per_row = k / 2, k a multiple of 4).
                let mut v = unsafe {
                    let mut acc = [vdupq_n_f32(0.0); 2];
                    for q in 0..quads {
                        let xs = vld1q_u8_x2(x.as_ptr().add(8 * q) as *const u8);
                        let idx = vld1q_u8(GATHER24[pos[q] as usize].as_ptr());
                        let gx = vreinterpretq_f32_u8(vqtbl2q_u8(xs, idx));
                        let h = vcombine_u16(
                            vld1_u16(vals.as_ptr().add(8 * q) as *const u16),
                            vdup_n_u16(0),
                        );
                        let (wv, _) = crate::kernels::gemm::aarch64::widen_f16(h);
                        acc[q % 2] = vfmaq_f32(acc[q % 2], wv, gx);
                    }
                    vaddvq_f32(vaddq_f32(acc[0], acc[1]))
                };
                for vi in quads * 4..per_row {
                    let col = vi / 2 * 4 + l.position(pos, vi);
                    v += x[col] * f16_to_f32(u16::from_le_bytes([vals[2 * vi], vals[2 * vi + 1]]));
                }
                // SAFETY: (i, j) is inside C (checked above).
                unsafe { out.put(i, j, v) };
            }
        }
    }
}

/// [`super::quantize_q8`] with NEON: the same bytes (`frinta` rounds half away from zero like
/// `roundf`; `fcvtzs` turns NaN into 0 and saturates like `as i32`).
pub fn quantize_q8(x: &[f32], out: &mut [u8]) {
    #[cfg(target_feature = "neon")]
    {
        neon_quantize::quantize(x, out)
    }
    #[cfg(not(target_feature = "neon"))]
    super::quantize_q8(x, out)
}

#[cfg(target_feature = "neon")]
mod neon_quantize {
    use core::arch::aarch64::*;

    use edgetune_core::layout::BLOCK;

    pub(super) fn quantize(x: &[f32], out: &mut [u8]) {
        let k = x.len();
        let nb = k.div_ceil(BLOCK);
        assert!(
            out.len() >= nb * BLOCK + nb * 4,
            "quantize_q8: output too short"
        );
        let (codes, scales) = out.split_at_mut(nb * BLOCK);
        let mut pad = [0f32; BLOCK];
        for j in 0..nb {
            let block = &x[j * BLOCK..((j + 1) * BLOCK).min(k)];
            let p = if block.len() == BLOCK {
                block.as_ptr()
            } else {
                pad.fill(0.0);
                pad[..block.len()].copy_from_slice(block);
                pad.as_ptr()
            };
            // SAFETY: `p` points to 32 values (the block or its zero-padded copy); the stores
            // write block j's 32 codes, inside `codes`. NEON is enabled for the target.
            let d = unsafe {
                let v: [float32x4_t; 8] = core::array::from_fn(|q| vld1q_f32(p.add(4 * q)));
                // max|x| skipping NaN, as `f32::max` does (`fmaxnm`).
                let mut m = vdupq_n_f32(0.0);
                for &vq in &v {
                    m = vmaxnmq_f32(m, vabsq_f32(vq));
                }
                let amax = vmaxnmvq_f32(m);
                let d = amax / 127.0;
                let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
                let lim = vdupq_n_s32(127);
                let q: [int32x4_t; 8] = core::array::from_fn(|i| {
                    let r = vcvtq_s32_f32(vrndaq_f32(vmulq_n_f32(v[i], inv)));
                    vmaxq_s32(vminq_s32(r, lim), vnegq_s32(lim))
                });
                for h in 0..4 {
                    let s16 = vcombine_s16(vmovn_s32(q[2 * h]), vmovn_s32(q[2 * h + 1]));
                    vst1_s8(
                        codes.as_mut_ptr().add(j * BLOCK + 8 * h) as *mut i8,
                        vmovn_s16(s16),
                    );
                }
                d
            };
            scales[4 * j..4 * j + 4].copy_from_slice(&d.to_le_bytes());
        }
    }
}

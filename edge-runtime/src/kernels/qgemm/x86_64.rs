//! AVX2 kernels for compressed weights (with FMA and F16C; each entry point checks the CPU and
//! falls back to [`super::generic`] without them), and AVX-VNNI / AVX512-VNNI versions of the
//! int8-activation products.
//!
//! # int8 activations ([`qgemm_q8`], and [`qgemm_q8_best`] with `vpdpbusd`)
//!
//! Codes are unpacked to one byte per weight and multiplied with the int8 activations in
//! `maddubs` (u8 × i8 pairs → i16) and `madd` (→ i32) — the integer sums are exactly the
//! reference's. How a byte becomes a weight depends on the table, checked once per call:
//! - *affine* (one table with `lut_i8[c] = α·c + β`, b ≤ 7: int2..7 group quantization,
//!   ternary, binary):
//!   `Σ w·q = α·Σ c·q + β·Σ q`, with the codes themselves as the unsigned `maddubs` operand and
//!   `Σ q` shared by all rows;
//! - *linear int8* (b = 8, `lut_i8[c] = max(c − 128, lut_i8[0])`, int8 per row): `c ^ 0x80`;
//! - *table* (codebooks, anything else): `pshufb` looks the i8 table up (b ≤ 4, one
//!   16-entry table; b = 5..8, `2^(b−4)` sub-tables selected by the high nibble), then the sign
//!   trick `maddubs(|q|, sign(w, q))` (or `maddubs(|w|, sign(q, w))` when a table holds −128).
//!
//! For 1, 2 and 4 bits a *superblock* of 4, 4 and 2 blocks is unpacked with a handful of shifts
//! and masks straight from the bit planes (for 2 bits: one 32-byte load, `srli` by 0, 2, 4, 6,
//! mask), which leaves the weights in a permuted order; the activations, shared by every weight
//! row, are permuted to match (a 4×4 transpose of 8- or 4-byte pieces, or a lane swap). Other
//! widths unpack one block in natural order. Per superblock and output the i32 sums are
//! converted once and accumulated with `d·scale` per lane (one lane group per block).
//!
//! With `vpdpbusd` (AVX-VNNI, AVX512-VNNI) the unsigned operand is always the weight side:
//! the codes (affine) or `w + 128` (`pshufb` on the table with its sign bit flipped; int8:
//! `max(c, floor + 128)`), and `−128·Σq` per lane, prepared with the activations, is the
//! accumulator's start — no sign trick, no i16 intermediate.
//!
//! Tiles: 4 weight rows × 1 activation row for GEMV (8 with `vpdpbusd`), 2 × 4 otherwise.
//! With AVX512-VNNI (and VBMI), GEMVs of 1-, 2- and 4-bit codes hold two consecutive
//! superblocks of one weight row in a 512-bit register (one 64-byte load for 2 and 4 bits), in
//! tiles of 8 rows with tables (each row's table stays in a register) and 16 without. Every
//! row is addressed from the tile's first, the codes are multiplied in one `vpdpbusd` chain
//! per row (affine 1- and 2-bit codes as 2·code and 4·code, their planes picked by `vpermb`
//! or masked in place, the activation scales halved or quartered to match), and each lane's
//! group index is prepared with the activations, so that the f16 group scales need no
//! division. A row with an odd number of superblocks ends with a *tail*: the last superblock of
//! two rows in one register; a partial superblock is read with masked loads. The last tile of a
//! product ends at its last row (its first rows computed again), so every row takes the same
//! arithmetic; only products with fewer rows than a tile repeat their last row.
//!
//! The activation side of a superblock (permuted codes, `|q|` or `β·Σq`, per-lane `d`) is
//! prepared once per activation tile in a bounded stack buffer and shared by every weight row
//! (rows too long for it prepare it per tile). Each output's arithmetic is the same whatever tile computes it, so threaded and
//! single-threaded runs agree bit for bit. Rows are padded with zeros to whole blocks, so only
//! the last superblock of a row can be partial; it is read from zero-padded copies.
//!
//! *Row-tiled* weights (`QFLAG_ROW_TILES`, what the compressor writes for ternary) with 2-bit
//! affine codes take their own kernels: a tile's blocks `b` of 16 rows are 128 contiguous
//! bytes, so each bit plane (a shift and a mask) of one 64-byte register is 8 rows × 8 inputs,
//! multiplied in `vpdpbusd` with the 8 activations broadcast to every row: 16 outputs per
//! step, no per-row horizontal sums, and up to 4 activation rows per unpacked block (256-bit
//! registers: 4 rows a register, `maddubs` or AVX-VNNI, one activation row). 4-bit codes whose
//! tiles each take one table (one per tensor, or per a multiple of 16 rows: the compressor's
//! codebooks) have theirs too: a register is one 4-byte word of 16 rows (8 inputs each, one
//! lane per row), looked up with one `vpermb` per nibble ([`tiled4_avx512`]). Other row-tiled
//! weights run the reference.
//!
//! [`quantize_q8`] is the exact AVX2 version of [`super::quantize_q8`].
//!
//! # f32 activations ([`qgemm_f32`])
//!
//! A block of 32 codes is unpacked in natural order; for b ≤ 4 two `pshufb` look up the low and
//! high bytes of the f16 table entries, `unpack` interleaves them and `cvtph2ps` widens them to
//! four vectors of 8 f32 (b ≥ 5: gathers from the table converted to f32). The decoded block is
//! used by every activation row of the tile: 2 weight rows × 4 activation rows, 4 × 1 for GEMV.
//! Group scales multiply the decoded weights; a row's single scale multiplies its sum. From
//! [`panel::MIN_ROWS`] activation rows on, 16 weight rows are decoded per 256 inputs (times their
//! scales, transposed 8 × 8 in registers) into a [`panel`] for the f32 GEMM micro-kernel.
//!
//! # N:M sparse ([`sparse_gemm`])
//!
//! 2:4 takes 8 values (16 inputs) at a time: positions become `vpermilps` indices into the two
//! halves of the 16 inputs, a blend merges them. Other patterns with `N` in {1, 2, 4, 8} gather
//! the inputs (`vgatherdps`); the rest, and ragged ends, run scalar. From [`panel::MIN_ROWS`]
//! activation rows on, 2:4 rows are decoded into dense [`panel`]s for the f32 micro-kernel.

// Tiles walk several per-row (or per-activation-row) arrays with the same index.
#![allow(clippy::needless_range_loop)]

use core::arch::x86_64::*;

use edgetune_core::layout::{QBlockLayout, BLOCK, ROW_TILE};
use edgetune_core::Activation;

use super::{
    generic, panel, q8_row_bytes, tiled_offsets, QGemm, QWeights, SparseWeights, TILED_GROUPS,
    TILE_BLOCK, TILE_BLOCK4,
};
use crate::kernels::gemm;
use crate::math;

/// True when this CPU can run these kernels.
fn available() -> bool {
    crate::kernels::x86_64_has_avx2_fma() && crate::kernels::x86_64_has_f16c()
}

/// Name shown for these kernels.
pub const NAME: &str = "x86_64-avx2";

/// Name shown for these kernels with AVX-VNNI for int8 activations.
pub const NAME_AVX_VNNI: &str = "x86_64-avx-vnni";

/// Name shown for these kernels with AVX512-VNNI for int8 activations.
pub const NAME_AVX512: &str = "x86_64-avx512-vnni";

// ---------------------------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------------------------

/// Where outputs go: `c[i·c_rs + j·c_cs] = act(v + bias[j])`.
#[derive(Clone, Copy)]
struct Out {
    c: *mut f32,
    c_rs: usize,
    c_cs: usize,
    bias: *const f32,
    act: Activation,
    /// `act` is the identity (checked once: `math::apply` is a call per element).
    identity: bool,
}

impl Out {
    fn new(c: &mut [f32], c_rs: usize, c_cs: usize, bias: Option<&[f32]>, act: Activation) -> Out {
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

impl Out {
    /// Writes outputs `(i, j0..j0 + 4)` from `v`, those below `n`.
    ///
    /// # Safety
    /// The outputs below `n` must be inside the `C` and bias extents the caller checked.
    #[inline(always)]
    unsafe fn put4(&self, i: usize, j0: usize, n: usize, v: __m128) {
        // SAFETY: as the caller guarantees; the vector paths touch only columns j0..j0+4 < n.
        unsafe {
            if j0 + 4 <= n && self.c_cs == 1 && self.identity {
                let b = if self.bias.is_null() {
                    _mm_setzero_ps()
                } else {
                    _mm_loadu_ps(self.bias.add(j0))
                };
                _mm_storeu_ps(self.c.add(i * self.c_rs + j0), _mm_add_ps(v, b));
            } else {
                let mut out = [0f32; 4];
                _mm_storeu_ps(out.as_mut_ptr(), v);
                for (r, x) in out.iter().enumerate().take(n.saturating_sub(j0).min(4)) {
                    self.put(i, j0 + r, *x);
                }
            }
        }
    }
}

/// Asserts that `C` and the bias hold an `m × n` product (the raw-pointer kernels rely on it).
fn check_out(m: usize, n: usize, c: &[f32], c_rs: usize, c_cs: usize, bias: Option<&[f32]>) {
    assert!(
        (m - 1) * c_rs + (n - 1) * c_cs < c.len(),
        "qgemm: C too short"
    );
    assert!(bias.is_none_or(|b| b.len() >= n), "qgemm: bias too short");
}

/// Sum of the 8 lanes, in a fixed order.
#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    // SAFETY: register-only AVX operations; the caller runs with AVX2 enabled.
    unsafe {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }
}

/// The lane sums of four vectors, in a fixed order.
#[inline(always)]
unsafe fn hsum4(v: [__m256; 4]) -> __m128 {
    // SAFETY: register-only AVX operations; the caller runs with AVX2 enabled.
    unsafe {
        let t0 = _mm256_hadd_ps(v[0], v[1]);
        let t1 = _mm256_hadd_ps(v[2], v[3]);
        let t2 = _mm256_hadd_ps(t0, t1);
        _mm_add_ps(_mm256_castps256_ps128(t2), _mm256_extractf128_ps::<1>(t2))
    }
}

/// An f16 value (bits) as f32.
#[inline(always)]
unsafe fn f16_to_f32(bits: u16) -> f32 {
    // SAFETY: register-only F16C operation; the caller runs with F16C enabled.
    unsafe { _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32))) }
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

/// How far ahead a GEMV prefetches the weight codes: 4 KiB, in whole tiles of `tile_bytes`
/// (about the DRAM latency's worth of decoding, so rows streamed from memory arrive in time).
#[inline(always)]
fn gemv_ahead(tile_bytes: usize) -> usize {
    4096usize.div_ceil(tile_bytes.max(1))
}

/// Prefetches `len` bytes at `base + tile + at` (a later tile's bytes, in the order a tile
/// reads them), one line per 64 bytes. Addresses past the weight are harmless: a prefetch
/// never faults.
#[inline(always)]
fn prefetch_ahead(base: *const u8, tile: usize, at: usize, len: usize) {
    let p = base.wrapping_add(tile + at);
    for o in (0..len).step_by(64) {
        // SAFETY: a prefetch is a hint: it reads no memory the program can observe and never
        // faults, whatever the address (SSE is part of the x86_64 baseline).
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(o) as *const i8) };
    }
}

/// The smallest and largest of `bytes` as i8 (and at most 0, at least 0).
#[target_feature(enable = "avx2")]
unsafe fn i8_range(bytes: &[u8]) -> (i8, i8) {
    let mut chunks = bytes.chunks_exact(32);
    let (mut lo, mut hi) = (_mm256_setzero_si256(), _mm256_setzero_si256());
    for c in &mut chunks {
        // SAFETY: `c` holds 32 bytes.
        let v = unsafe { _mm256_loadu_si256(c.as_ptr() as *const __m256i) };
        lo = _mm256_min_epi8(lo, v);
        hi = _mm256_max_epi8(hi, v);
    }
    let mut l = [0i8; 32];
    let mut h = [0i8; 32];
    // SAFETY: the arrays hold 32 bytes.
    unsafe {
        _mm256_storeu_si256(l.as_mut_ptr() as *mut __m256i, lo);
        _mm256_storeu_si256(h.as_mut_ptr() as *mut __m256i, hi);
    }
    let (mut lo, mut hi) = (
        l.iter().fold(0i8, |a, &b| a.min(b)),
        h.iter().fold(0i8, |a, &b| a.max(b)),
    );
    for &v in chunks.remainder() {
        lo = lo.min(v as i8);
        hi = hi.max(v as i8);
    }
    (lo, hi)
}

/// The table of weight row `row` (`rpt` rows per table) without a division in the common
/// cases (one table per row, one for the tensor).
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

/// Blocks per superblock for `bits`-bit codes (see the module documentation).
#[inline(always)]
const fn sb_blocks(bits: usize) -> usize {
    match bits {
        1 | 2 => 4,
        4 => 2,
        _ => 1,
    }
}

/// For each i32 lane of a superblock's sums, the block it belongs to.
#[inline(always)]
unsafe fn lane_blocks<const B: usize>() -> __m256i {
    // SAFETY: register-only AVX operations.
    unsafe {
        match B {
            1 => _mm256_setr_epi32(0, 1, 2, 3, 0, 1, 2, 3),
            2 => _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3),
            4 => _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1),
            _ => _mm256_setzero_si256(),
        }
    }
}

/// Loads `S` f32 (per-block values) and spreads them over the lanes of their blocks.
#[inline(always)]
unsafe fn per_lane<const B: usize>(p: *const f32) -> __m256 {
    // SAFETY: the caller guarantees `sb_blocks(B)` readable f32 at `p`.
    unsafe {
        match sb_blocks(B) {
            4 => _mm256_permutevar8x32_ps(
                _mm256_castps128_ps256(_mm_loadu_ps(p)),
                lane_blocks::<B>(),
            ),
            2 => {
                let v = _mm_castpd_ps(_mm_load_sd(p as *const f64));
                _mm256_permutevar8x32_ps(_mm256_castps128_ps256(v), lane_blocks::<B>())
            }
            _ => _mm256_broadcast_ss(&*p),
        }
    }
}

/// The codes of one block in natural order (byte `e` = code of element `e`), for any width.
#[inline(always)]
unsafe fn natural_codes<const B: usize>(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees the block's 4·B bytes at `p`; AVX2 is enabled.
    unsafe {
        // Planes largest first; each adds the next bits of the code. A plane below 8 bits
        // never shifts bits out of its byte (shift + width ≤ 8), so 16-bit shifts are exact.
        let mut code = _mm256_setzero_si256();
        let mut at = 0;
        let mut shift = 0i64;
        let mut add = |v: __m256i, shift: i64| {
            let v = if shift == 0 {
                v
            } else {
                _mm256_sll_epi16(v, _mm_cvtsi64_si128(shift))
            };
            code = _mm256_or_si256(code, v);
        };
        if B & 8 != 0 {
            add(_mm256_loadu_si256(p as *const __m256i), 0);
            at += 32;
            shift += 8;
        }
        if B & 4 != 0 {
            let x = _mm256_broadcastsi128_si256(_mm_loadu_si128(p.add(at) as *const __m128i));
            add(
                _mm256_and_si256(
                    _mm256_srlv_epi64(x, _mm256_setr_epi64x(0, 0, 4, 4)),
                    _mm256_set1_epi8(0x0F),
                ),
                shift,
            );
            at += 16;
            shift += 4;
        }
        if B & 2 != 0 {
            let x = _mm256_set1_epi64x(core::ptr::read_unaligned(p.add(at) as *const i64));
            add(
                _mm256_and_si256(
                    _mm256_srlv_epi64(x, _mm256_setr_epi64x(0, 2, 4, 6)),
                    _mm256_set1_epi8(3),
                ),
                shift,
            );
            at += 8;
            shift += 2;
        }
        if B & 1 != 0 {
            let x = _mm256_set1_epi32(core::ptr::read_unaligned(p.add(at) as *const i32));
            add(
                _mm256_and_si256(
                    _mm256_srlv_epi32(x, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)),
                    _mm256_set1_epi8(1),
                ),
                shift,
            );
        }
        code
    }
}

/// One superblock's codes (`sb_blocks(B)` blocks from `p`), one byte per weight, in the
/// superblock order of the module documentation.
#[inline(always)]
unsafe fn superblock_codes<const B: usize>(p: *const u8) -> [__m256i; 4] {
    // SAFETY: the caller guarantees the superblock's bytes at `p`; AVX2 is enabled.
    unsafe {
        let z = _mm256_setzero_si256();
        match B {
            4 => {
                let x = _mm256_loadu_si256(p as *const __m256i);
                let m = _mm256_set1_epi8(0x0F);
                [
                    _mm256_and_si256(x, m),
                    _mm256_and_si256(_mm256_srli_epi16::<4>(x), m),
                    z,
                    z,
                ]
            }
            2 => {
                let x = _mm256_loadu_si256(p as *const __m256i);
                let m = _mm256_set1_epi8(3);
                [
                    _mm256_and_si256(x, m),
                    _mm256_and_si256(_mm256_srli_epi16::<2>(x), m),
                    _mm256_and_si256(_mm256_srli_epi16::<4>(x), m),
                    _mm256_and_si256(_mm256_srli_epi16::<6>(x), m),
                ]
            }
            1 => {
                let x = _mm256_broadcastsi128_si256(_mm_loadu_si128(p as *const __m128i));
                let m = _mm256_set1_epi8(1);
                let sh = |s: i32| {
                    _mm256_and_si256(
                        _mm256_srlv_epi32(
                            x,
                            _mm256_setr_epi32(s, s, s, s, s + 4, s + 4, s + 4, s + 4),
                        ),
                        m,
                    )
                };
                [sh(0), sh(1), sh(2), sh(3)]
            }
            _ => [natural_codes::<B>(p), z, z, z],
        }
    }
}

/// One superblock of int8 activations (`sb_blocks(B)` blocks of 32 from `q`), arranged to meet
/// [`superblock_codes`].
#[inline(always)]
unsafe fn superblock_acts<const B: usize>(q: *const u8) -> [__m256i; 4] {
    // SAFETY: the caller guarantees `32·sb_blocks(B)` readable bytes at `q`; AVX2 is enabled.
    unsafe {
        let z = _mm256_setzero_si256();
        let ld = |j: usize| _mm256_loadu_si256(q.add(32 * j) as *const __m256i);
        match B {
            4 => {
                let (a0, a1) = (ld(0), ld(1));
                [
                    _mm256_permute2x128_si256::<0x20>(a0, a1),
                    _mm256_permute2x128_si256::<0x31>(a0, a1),
                    z,
                    z,
                ]
            }
            2 => {
                // 4×4 transpose of 8-byte pieces: t_s holds piece s of each block.
                let (a0, a1, a2, a3) = (ld(0), ld(1), ld(2), ld(3));
                let u0 = _mm256_unpacklo_epi64(a0, a1);
                let u1 = _mm256_unpackhi_epi64(a0, a1);
                let u2 = _mm256_unpacklo_epi64(a2, a3);
                let u3 = _mm256_unpackhi_epi64(a2, a3);
                [
                    _mm256_permute2x128_si256::<0x20>(u0, u2),
                    _mm256_permute2x128_si256::<0x20>(u1, u3),
                    _mm256_permute2x128_si256::<0x31>(u0, u2),
                    _mm256_permute2x128_si256::<0x31>(u1, u3),
                ]
            }
            1 => {
                // 4×4 transpose of 4-byte pieces within each 128-bit lane.
                let (a0, a1, a2, a3) = (ld(0), ld(1), ld(2), ld(3));
                let u0 = _mm256_unpacklo_epi32(a0, a1);
                let u1 = _mm256_unpackhi_epi32(a0, a1);
                let u2 = _mm256_unpacklo_epi32(a2, a3);
                let u3 = _mm256_unpackhi_epi32(a2, a3);
                [
                    _mm256_unpacklo_epi64(u0, u2),
                    _mm256_unpackhi_epi64(u0, u2),
                    _mm256_unpacklo_epi64(u1, u3),
                    _mm256_unpackhi_epi64(u1, u3),
                ]
            }
            _ => [ld(0), z, z, z],
        }
    }
}

// ---------------------------------------------------------------------------------------------
// int8 activations
// ---------------------------------------------------------------------------------------------

/// How codes become int8 weights (see the module documentation).
const AFFINE: u8 = 0;
const LINEAR8: u8 = 1;
const TABLE: u8 = 2;

/// Which instruction multiplies the bytes: `maddubs` + `madd` (AVX2), or `vpdpbusd` from
/// AVX-VNNI or AVX512-VNNI (256-bit).
const MADDUBS: u8 = 0;
const AVX_VNNI: u8 = 1;
const AVX512_VNNI: u8 = 2;

/// One call's operands as raw pointers (extents checked in [`qgemm_q8`]).
struct Q8 {
    codes: *const u8,
    /// Code bytes per row and per block.
    rb: usize,
    bb: usize,
    /// Blocks per row.
    nb: usize,
    lut: *const u8,
    entries: usize,
    rpt: usize,
    /// Weight rows (for [`table_of`]).
    n: usize,
    /// Tables below this index can be read 16 bytes at a time in place.
    direct_tables: usize,
    lut_scale: *const u8,
    scales: *const u8,
    gpr: usize,
    /// Blocks per group.
    bpg: usize,
    acts: *const u8,
    arb: usize,
    kp: usize,
    alpha: i16,
    beta: i16,
    floor: i8,
    out: Out,
}

/// Block-quantized weights × int8-quantized activation rows, `maddubs` (see
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
    q8_with(MADDUBS, w, rows, m, c, c_rs, c_cs, bias, act)
}

/// [`qgemm_q8`] with the `vpdpbusd` of `DOT` (AVX-VNNI, or AVX512-VNNI: 256-bit registers, and
/// GEMVs of 1-, 2- and 4-bit codes on 512-bit ones); on a CPU without it, [`qgemm_q8`] itself.
#[allow(clippy::too_many_arguments)]
fn qgemm_q8_dot<const DOT: u8>(
    w: &QWeights<'_>,
    rows: &[u8],
    m: usize,
    c: &mut [f32],
    c_rs: usize,
    c_cs: usize,
    bias: Option<&[f32]>,
    act: Activation,
) {
    let dot = if has_dot(DOT) { DOT } else { MADDUBS };
    q8_with(dot, w, rows, m, c, c_rs, c_cs, bias, act)
}

/// True when this CPU has the multiply instructions of `dot`.
fn has_dot(dot: u8) -> bool {
    match dot {
        AVX_VNNI => crate::kernels::x86_64_has_avx_vnni(),
        AVX512_VNNI => crate::kernels::x86_64_has_avx512_vnni(),
        _ => true,
    }
}

/// The int8-activation kernels, their names and whether this CPU runs them, fastest first.
fn q8_kernels() -> [(super::QGemmQ8Fn, &'static str, bool); 3] {
    [
        (
            qgemm_q8_dot::<AVX512_VNNI>,
            NAME_AVX512,
            has_dot(AVX512_VNNI),
        ),
        (qgemm_q8_dot::<AVX_VNNI>, NAME_AVX_VNNI, has_dot(AVX_VNNI)),
        (qgemm_q8, NAME, true),
    ]
}

/// The int8-activation kernel for this CPU: the first of AVX512-VNNI, AVX-VNNI and AVX2 it has.
pub fn qgemm_q8_best() -> super::QGemmQ8Fn {
    q8_kernels()
        .into_iter()
        .find(|k| k.2)
        .map_or(qgemm_q8, |k| k.0)
}

/// Name of the kernels [`Kernels::best`](crate::kernels::Kernels::best) picks on this CPU.
pub fn name() -> &'static str {
    q8_kernels().into_iter().find(|k| k.2).map_or(NAME, |k| k.1)
}

/// Every kernel set this CPU runs (AVX2 and, where present, AVX-VNNI and AVX512-VNNI for int8
/// activations), for tests.
pub fn variants() -> [Option<crate::kernels::Kernels>; 3] {
    let base = crate::kernels::Kernels::best();
    q8_kernels().map(|(f, name, has)| {
        (available() && has).then_some(crate::kernels::Kernels {
            qgemm_q8: f,
            qgemm_name: name,
            ..base
        })
    })
}

/// [`qgemm_q8`] with the multiply instruction `dot` (one the CPU has).
#[allow(clippy::too_many_arguments)]
fn q8_with(
    dot: u8,
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
    if !available() {
        return generic::qgemm_q8(w, rows, m, c, c_rs, c_cs, bias, act);
    }
    check_q(w, true);
    check_out(m, l.n, c, c_rs, c_cs, bias);
    let arb = q8_row_bytes(l.k);
    assert!(rows.len() >= m * arb, "qgemm: quantized rows too short");

    // The tables decide the mode.
    let e = l.entries();
    let luts = &w.bytes[l.lut_i8_off..l.lut_i8_off + l.tables * e];
    // The range of the table values matters to `maddubs` only (a scan of every table: with
    // one table per row, a tenth of a 4-bit weight's bytes).
    let (lo, hi) = if dot == MADDUBS {
        // SAFETY: the CPU has AVX2 (checked above).
        unsafe { i8_range(luts) }
    } else {
        (0, 0)
    };
    let maxabs = (lo as i32).abs().max(hi as i32);
    let t0: &[u8] = &luts[..e];
    let (mut mode, mut alpha, mut beta, mut floor) = (TABLE, 0i16, 0i16, 0i8);
    if let Some((a, b)) = w.affine_i8().filter(|_| l.bits <= 7) {
        (mode, alpha, beta) = (AFFINE, a as i16, b as i16);
    }
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
    if l.row_tiles() {
        // 2-bit affine codes unpack by planes; 4-bit codes are looked up in their tile's one
        // table (`maddubs` multiplies signed weights: no −128).
        let nibbles = l.bits == 4 && l.one_table_per_tile() && (dot != MADDUBS || lo > -128);
        if !(l.bits == 2 && mode == AFFINE || nibbles) || l.groups_per_row() > TILED_GROUPS {
            return generic::qgemm_q8(w, rows, m, c, c_rs, c_cs, bias, act);
        }
        if nibbles {
            // Σ w·q = Σ (w + 128)·q − 128·Σq with the unsigned `vpdpbusd` operand w + 128;
            // `maddubs` takes the signs of q instead (no offset).
            (alpha, beta) = (1, if dot == MADDUBS { 0 } else { -128 });
        }
        let t = Tiled {
            codes: w.bytes.as_ptr(),
            nb: l.kp / BLOCK,
            bpg: l.group / BLOCK,
            gpr: l.groups_per_row(),
            scales: w.bytes[l.scales_off..].as_ptr(),
            acts: rows.as_ptr(),
            arb,
            kp: l.kp,
            alpha: alpha as f32,
            beta: beta as f32,
            lut: luts.as_ptr(),
            lut_scales: w.bytes[l.lut_scale_off..].as_ptr(),
            layout: l,
            n: l.n,
            out: Out::new(c, c_rs, c_cs, bias, act),
        };
        // SAFETY: the CPU has AVX2, FMA and F16C (checked above) and the `dot` instructions
        // (the callers check); `check_q` checked whole tiles of codes and scales and every
        // table, the rows' length is checked above, and `c` is borrowed mutably for this call.
        unsafe { tiled_run(dot, l.bits, &t, m) };
        return;
    }
    // |w| = 128 breaks `sign(w, q)`: multiply |w| with sign(q, w) instead.
    let abs_w = lo == -128;
    let s = sb_blocks(l.bits);
    // Table weights small enough that the `maddubs` results of a superblock add up in i16.
    let sum16 = s > 1 && (s * 2 * 127) as i32 * maxabs <= i16::MAX as i32;

    let cx = Q8 {
        codes: w.bytes.as_ptr(),
        rb: l.row_bytes(),
        bb: l.block_bytes(),
        nb: l.kp / BLOCK,
        lut: w.bytes[l.lut_i8_off..].as_ptr(),
        entries: e,
        rpt: l.rows_per_table,
        n: l.n,
        direct_tables: (w.bytes.len().saturating_sub(l.lut_i8_off + 16) / e + 1).min(l.tables),
        lut_scale: w.bytes[l.lut_scale_off..].as_ptr(),
        scales: w.bytes[l.scales_off..].as_ptr(),
        gpr: l.groups_per_row(),
        bpg: l.group / BLOCK,
        acts: rows.as_ptr(),
        arb,
        kp: l.kp,
        alpha,
        beta,
        floor,
        out: Out::new(c, c_rs, c_cs, bias, act),
    };
    macro_rules! go {
        ($b:literal) => {
            match (dot, mode, abs_w, sum16) {
                (AVX_VNNI, AFFINE, _, _) => q8_run_avx_vnni::<$b, AFFINE>(&cx, m, l.n),
                (AVX_VNNI, LINEAR8, _, _) => q8_run_avx_vnni::<$b, LINEAR8>(&cx, m, l.n),
                (AVX_VNNI, _, _, _) => q8_run_avx_vnni::<$b, TABLE>(&cx, m, l.n),
                (AVX512_VNNI, AFFINE, _, _) => q8_run_avx512_vnni::<$b, AFFINE>(&cx, m, l.n),
                (AVX512_VNNI, LINEAR8, _, _) => q8_run_avx512_vnni::<$b, LINEAR8>(&cx, m, l.n),
                (AVX512_VNNI, _, _, _) => q8_run_avx512_vnni::<$b, TABLE>(&cx, m, l.n),
                (_, AFFINE, _, _) => q8_run_avx2::<$b, AFFINE, false, true>(&cx, m, l.n),
                (_, LINEAR8, false, _) => q8_run_avx2::<$b, LINEAR8, false, false>(&cx, m, l.n),
                (_, LINEAR8, true, _) => q8_run_avx2::<$b, LINEAR8, true, false>(&cx, m, l.n),
                (_, _, false, true) => q8_run_avx2::<$b, TABLE, false, true>(&cx, m, l.n),
                (_, _, false, false) => q8_run_avx2::<$b, TABLE, false, false>(&cx, m, l.n),
                (_, _, true, _) => q8_run_avx2::<$b, TABLE, true, false>(&cx, m, l.n),
            }
        };
    }
    // SAFETY: the CPU has AVX2, FMA and F16C (checked above) and the `dot` instructions (the
    // callers check); every pointer in `cx` addresses the extents checked
    // above (`check_q`, `check_out`, the rows' length), and `c` is borrowed mutably for this
    // call.
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

/// [`q8_run`] with `maddubs`.
///
/// # Safety
/// AVX2, FMA and F16C must be available; `cx` must describe valid extents for `m × n`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_run_avx2<const B: usize, const MODE: u8, const ABS_W: bool, const SUM16: bool>(
    cx: &Q8,
    m: usize,
    n: usize,
) {
    // SAFETY: as the caller guarantees.
    unsafe { q8_run::<B, MODE, ABS_W, SUM16, MADDUBS>(cx, m, n) }
}

/// [`q8_run`] with AVX-VNNI's `vpdpbusd`.
///
/// # Safety
/// As for [`q8_run_avx2`], and AVX-VNNI must be available.
#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
unsafe fn q8_run_avx_vnni<const B: usize, const MODE: u8>(cx: &Q8, m: usize, n: usize) {
    // SAFETY: as the caller guarantees.
    unsafe { q8_run::<B, MODE, false, false, AVX_VNNI>(cx, m, n) }
}

/// [`q8_run`] with AVX512-VNNI's `vpdpbusd` on 256-bit registers.
///
/// # Safety
/// As for [`q8_run_avx2`], and AVX512-VNNI with AVX512-VL must be available.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")]
unsafe fn q8_run_avx512_vnni<const B: usize, const MODE: u8>(cx: &Q8, m: usize, n: usize) {
    // SAFETY: as the caller guarantees.
    unsafe { q8_run::<B, MODE, false, false, AVX512_VNNI>(cx, m, n) }
}

/// All tiles of one call: 4 weight rows × 1 activation row when `m < 4` (GEMV), else 2 × 4.
/// Ragged edges repeat the last row (its extra results are dropped), so every output comes
/// out of the same arithmetic.
///
/// # Safety
/// AVX2, FMA and F16C must be available; `cx` must describe valid extents for `m × n`.
#[inline(always)]
unsafe fn q8_run<
    const B: usize,
    const MODE: u8,
    const ABS_W: bool,
    const SUM16: bool,
    const DOT: u8,
>(
    cx: &Q8,
    m: usize,
    n: usize,
) {
    // SAFETY: every tile lies inside the m × n product (rows past the edges are clamped).
    unsafe {
        if cx.gpr > 1 {
            q8_tiles::<B, MODE, ABS_W, SUM16, DOT, true>(cx, m, n)
        } else {
            q8_tiles::<B, MODE, ABS_W, SUM16, DOT, false>(cx, m, n)
        }
    }
}

/// [`q8_run`] for rows with one scale (`G` false) or several.
///
/// # Safety
/// As for [`q8_run`].
#[inline(always)]
unsafe fn q8_tiles<
    const B: usize,
    const MODE: u8,
    const ABS_W: bool,
    const SUM16: bool,
    const DOT: u8,
    const G: bool,
>(
    cx: &Q8,
    m: usize,
    n: usize,
) {
    // SAFETY: every tile lies inside the m × n product (rows past the edges are clamped); the
    // prepared activations cover the tile's rows and every superblock.
    unsafe {
        let nsb = cx.nb.div_ceil(sb_blocks(B));
        let mut buf = [const { core::mem::MaybeUninit::<Acts>::uninit() }; ACTS_CAP];
        // AVX-512 GEMV: two superblocks of a weight row per zmm register (1, 2 and 4 bits, byte
        // tables or affine codes).
        // Tiles of 8 rows with tables (a register each), else 16.
        let nw = if MODE == TABLE {
            ZMM_ROWS
        } else {
            2 * ZMM_ROWS
        };
        let zmm = DOT == AVX512_VNNI && matches!(B, 1 | 2 | 4) && MODE != LINEAR8;
        let mut dup = [const { core::mem::MaybeUninit::<Acts2>::uninit() }; ACTS_CAP];
        if m < 4 {
            for i in 0..m {
                let pre = (nsb <= ACTS_CAP)
                    .then(|| q8_prepare::<B, MODE, ABS_W, DOT>(cx, i, 1, m, &mut buf));
                if let (true, Some(pre)) = (zmm, pre) {
                    let acts = q8_chunks::<B, MODE>(cx, pre, nsb, &mut dup);
                    // Prefetch distance in tiles and the steps of a row, worked out once
                    // (divisions).
                    let ahead = gemv_ahead(nw * cx.rb);
                    let cb = 2 * sb_blocks(B) * cx.bb;
                    let (nfull, rest) = (cx.rb / cb, cx.rb % cb);
                    let z = ZTile {
                        acts,
                        ahead,
                        nfull,
                        rest,
                    };
                    // Whole tiles (the last one ends at n, its first rows computed again by the
                    // same arithmetic), or one tile repeating the last row when n is smaller.
                    const W: usize = 2 * ZMM_ROWS;
                    for j in (0..n).step_by(nw) {
                        let j = j.min(n.saturating_sub(nw));
                        match (MODE == TABLE, n >= nw) {
                            (true, true) => zmm_tile::<B, MODE, G, ZMM_ROWS, false>(cx, j, i, z),
                            (true, false) => zmm_tile::<B, MODE, G, ZMM_ROWS, true>(cx, j, i, z),
                            (false, true) => zmm_tile::<B, MODE, G, W, false>(cx, j, i, z),
                            (false, false) => zmm_tile::<B, MODE, G, W, true>(cx, j, i, z),
                        }
                    }
                } else if DOT == MADDUBS {
                    for j in (0..n).step_by(4) {
                        q8_tile::<B, MODE, ABS_W, SUM16, DOT, G, 4, 1>(cx, j, n, i, m, pre);
                    }
                } else {
                    for j in (0..n).step_by(8) {
                        q8_tile::<B, MODE, ABS_W, SUM16, DOT, G, 8, 1>(cx, j, n, i, m, pre);
                    }
                }
            }
        } else {
            for i in (0..m).step_by(4) {
                let pre = (4 * nsb <= ACTS_CAP)
                    .then(|| q8_prepare::<B, MODE, ABS_W, DOT>(cx, i, 4, m, &mut buf));
                for j in (0..n).step_by(2) {
                    q8_tile::<B, MODE, ABS_W, SUM16, DOT, G, 2, 4>(cx, j, n, i, m, pre);
                }
            }
        }
    }
}

/// Activation superblocks prepared once per activation tile (in a stack buffer of
/// `ACTS_CAP · 320` bytes) and shared by every weight row; longer rows prepare them per tile.
const ACTS_CAP: usize = 64;

/// Tiles whose rows have at most this many group scales in all convert them to f32 up front.
const SCALES_CAP: usize = 256;

/// Prepares the superblocks of activation rows `i0..i0 + ma` (clamped to `m`) into `buf`, row
/// after row, and returns their start.
///
/// # Safety
/// `cx` must describe valid activation rows; `buf` must hold `ma · nsb` entries.
#[inline(always)]
unsafe fn q8_prepare<const B: usize, const MODE: u8, const ABS_W: bool, const DOT: u8>(
    cx: &Q8,
    i0: usize,
    ma: usize,
    m: usize,
    buf: &mut [core::mem::MaybeUninit<Acts>; ACTS_CAP],
) -> *const Acts {
    // SAFETY: rows min(i0 + i, m − 1) < m hold Kp codes then Kp/32 scales; the last, partial
    // superblock is read from zero-padded copies; entries stay below ma · nsb ≤ ACTS_CAP.
    unsafe {
        let s = sb_blocks(B);
        let nsb = cx.nb.div_ceil(s);
        for i in 0..ma {
            let row = cx.acts.add((i0 + i).min(m - 1) * cx.arb);
            for sb in 0..nsb {
                let b0 = sb * s;
                let valid = (cx.nb - b0).min(s);
                let (mut ap, mut dp) = (row.add(b0 * BLOCK), row.add(cx.kp + 4 * b0) as *const f32);
                let mut abuf = [0u8; 128];
                let mut dbuf = [0f32; 4];
                if valid < s {
                    core::ptr::copy_nonoverlapping(ap, abuf.as_mut_ptr(), valid * BLOCK);
                    core::ptr::copy_nonoverlapping(dp, dbuf.as_mut_ptr(), valid);
                    (ap, dp) = (abuf.as_ptr(), dbuf.as_ptr());
                }
                buf[i * nsb + sb].write(q8_acts::<B, MODE, ABS_W, DOT>(cx, ap, dp));
            }
        }
        buf.as_ptr() as *const Acts
    }
}

/// Looks 32 codes up in an i8 table of 2^B entries at `tp` (for B ≤ 4: 16 bytes, zero-padded).
#[inline(always)]
unsafe fn lookup_i8<const B: usize>(c: __m256i, tp: *const u8) -> __m256i {
    // SAFETY: the caller guarantees the table bytes at `tp` (16 for B ≤ 4, 2^B otherwise).
    unsafe {
        if B <= 4 {
            let t = _mm256_broadcastsi128_si256(_mm_loadu_si128(tp as *const __m128i));
            return _mm256_shuffle_epi8(t, c);
        }
        let m = _mm256_set1_epi8(0x0F);
        let lo = _mm256_and_si256(c, m);
        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(c), m);
        let mut r = _mm256_setzero_si256();
        for j in 0..1usize << (B - 4) {
            let t = _mm256_broadcastsi128_si256(_mm_loadu_si128(tp.add(16 * j) as *const __m128i));
            let sel = _mm256_cmpeq_epi8(hi, _mm256_set1_epi8(j as i8));
            r = _mm256_blendv_epi8(r, _mm256_shuffle_epi8(t, lo), sel);
        }
        r
    }
}

/// Int8 weights of one superblock of codes.
#[inline(always)]
unsafe fn q8_weights<const B: usize, const MODE: u8, const DOT: u8>(
    cx: &Q8,
    cp: *const u8,
    tp: *const u8,
) -> [__m256i; 4] {
    // SAFETY: the caller guarantees the superblock's codes at `cp` and the table at `tp`.
    unsafe {
        let mut c = superblock_codes::<B>(cp);
        for v in c.iter_mut().take(sb_blocks(B)) {
            *v = match MODE {
                AFFINE => *v,
                // w + 128 = max(c, floor + 128) as unsigned bytes.
                LINEAR8 if DOT != MADDUBS => _mm256_max_epu8(*v, _mm256_set1_epi8(cx.floor ^ -128)),
                LINEAR8 => _mm256_max_epi8(
                    _mm256_xor_si256(*v, _mm256_set1_epi8(-128)),
                    _mm256_set1_epi8(cx.floor),
                ),
                _ if DOT != MADDUBS => {
                    _mm256_xor_si256(lookup_i8::<B>(*v, tp), _mm256_set1_epi8(-128))
                }
                _ => lookup_i8::<B>(*v, tp),
            };
        }
        c
    }
}

/// One activation row's superblock, ready to multiply.
#[derive(Clone, Copy)]
struct Acts {
    t: [__m256i; 4],
    /// |t| (table and linear modes, `!ABS_W`).
    aq: [__m256i; 4],
    /// β·Σq per lane (affine mode), −128·Σq with `vpdpbusd` in the other modes.
    bsq: __m256i,
    /// Activation scale per lane.
    dv: __m256,
}

#[inline(always)]
unsafe fn q8_acts<const B: usize, const MODE: u8, const ABS_W: bool, const DOT: u8>(
    cx: &Q8,
    ap: *const u8,
    dp: *const f32,
) -> Acts {
    // SAFETY: the caller guarantees the superblock's activations at `ap` and scales at `dp`.
    unsafe {
        let s = sb_blocks(B);
        let t = superblock_acts::<B>(ap);
        let mut a = Acts {
            t,
            aq: t,
            bsq: _mm256_setzero_si256(),
            dv: per_lane::<B>(dp),
        };
        if MODE == AFFINE || DOT != MADDUBS {
            let ones8 = _mm256_set1_epi8(1);
            let mut p = _mm256_maddubs_epi16(ones8, t[0]);
            for v in t.iter().take(s).skip(1) {
                p = _mm256_add_epi16(p, _mm256_maddubs_epi16(ones8, *v));
            }
            let beta = if MODE == AFFINE { cx.beta } else { -128 };
            a.bsq = _mm256_madd_epi16(p, _mm256_set1_epi16(beta));
        }
        if MODE != AFFINE && !ABS_W && DOT == MADDUBS {
            for k in 0..s {
                a.aq[k] = _mm256_abs_epi8(t[k]);
            }
        }
        a
    }
}

/// `Σ w·q` per lane of one superblock (i32, exact).
#[inline(always)]
unsafe fn q8_dot<
    const B: usize,
    const MODE: u8,
    const ABS_W: bool,
    const SUM16: bool,
    const DOT: u8,
>(
    cx: &Q8,
    w: &[__m256i; 4],
    a: &Acts,
) -> __m256i {
    // SAFETY: register-only AVX2 operations (and `vpdpbusd`, enabled by the caller with DOT).
    unsafe {
        let s = sb_blocks(B);
        if DOT != MADDUBS {
            // Unsigned weights (the codes, or w + 128) × signed activations, 4 per i32 lane.
            let dp = |acc, k: usize| match DOT {
                AVX_VNNI => _mm256_dpbusd_avx_epi32(acc, w[k], a.t[k]),
                _ => _mm256_dpbusd_epi32(acc, w[k], a.t[k]),
            };
            // Two chains of `vpdpbusd` (even and odd blocks): one chain of four waits on its
            // latency in batch tiles.
            let plain = MODE != AFFINE || cx.alpha == 1;
            let z = _mm256_setzero_si256();
            let (mut v0, mut v1) = (if plain { a.bsq } else { z }, z);
            for k in 0..s {
                if k % 2 == 0 {
                    v0 = dp(v0, k);
                } else {
                    v1 = dp(v1, k);
                }
            }
            let mut v = if s > 1 { _mm256_add_epi32(v0, v1) } else { v0 };
            if !plain {
                v = if cx.alpha > 0 && cx.alpha.count_ones() == 1 {
                    let by = _mm_cvtsi32_si128(cx.alpha.trailing_zeros() as i32);
                    _mm256_sll_epi32(v, by)
                } else {
                    _mm256_mullo_epi32(v, _mm256_set1_epi32(cx.alpha as i32))
                };
                v = _mm256_add_epi32(v, a.bsq);
            }
            return v;
        }
        let prod = |k: usize| -> __m256i {
            match MODE {
                AFFINE => _mm256_maddubs_epi16(w[k], a.t[k]),
                _ if ABS_W => {
                    _mm256_maddubs_epi16(_mm256_abs_epi8(w[k]), _mm256_sign_epi8(a.t[k], w[k]))
                }
                _ => _mm256_maddubs_epi16(a.aq[k], _mm256_sign_epi8(w[k], a.t[k])),
            }
        };
        let ones16 = _mm256_set1_epi16(1);
        let affine = MODE == AFFINE;
        if affine || SUM16 {
            let mut p = prod(0);
            for k in 1..s {
                p = _mm256_add_epi16(p, prod(k));
            }
            if affine {
                _mm256_add_epi32(_mm256_madd_epi16(p, _mm256_set1_epi16(cx.alpha)), a.bsq)
            } else {
                _mm256_madd_epi16(p, ones16)
            }
        } else {
            let mut v = _mm256_madd_epi16(prod(0), ones16);
            for k in 1..s {
                v = _mm256_add_epi32(v, _mm256_madd_epi16(prod(k), ones16));
            }
            v
        }
    }
}

/// One superblock of a tile: `acc[r][i] += Σ w·q · d · scale` per lane.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn q8_step<
    const B: usize,
    const MODE: u8,
    const ABS_W: bool,
    const SUM16: bool,
    const DOT: u8,
    const G: bool,
    const NW: usize,
    const MA: usize,
>(
    cx: &Q8,
    cp: &[*const u8; NW],
    tp: &[*const u8; NW],
    ap: &[*const u8; MA],
    dp: &[*const f32; MA],
    pre: Option<&[*const Acts; MA]>,
    sv: &[__m256; NW],
    acc: &mut [[__m256; MA]; NW],
) {
    // SAFETY: the caller guarantees every pointer's superblock (the prepared one when `pre`).
    unsafe {
        // Prepared activations are used in place (their fields become memory operands).
        if MA == 1 {
            // GEMV: one activation superblock, then each row decoded and used at once.
            let local;
            let a: &Acts = match pre {
                Some(p) => &*p[0],
                None => {
                    local = q8_acts::<B, MODE, ABS_W, DOT>(cx, ap[0], dp[0]);
                    &local
                }
            };
            for r in 0..NW {
                let w = q8_weights::<B, MODE, DOT>(cx, cp[r], tp[r]);
                let isum = q8_dot::<B, MODE, ABS_W, SUM16, DOT>(cx, &w, a);
                let ds = if G { _mm256_mul_ps(a.dv, sv[r]) } else { a.dv };
                acc[r][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), ds, acc[r][0]);
            }
        } else {
            let mut w = [[_mm256_setzero_si256(); 4]; NW];
            for r in 0..NW {
                w[r] = q8_weights::<B, MODE, DOT>(cx, cp[r], tp[r]);
            }
            for i in 0..MA {
                let local;
                let a: &Acts = match pre {
                    Some(p) => &*p[i],
                    None => {
                        local = q8_acts::<B, MODE, ABS_W, DOT>(cx, ap[i], dp[i]);
                        &local
                    }
                };
                for r in 0..NW {
                    let isum = q8_dot::<B, MODE, ABS_W, SUM16, DOT>(cx, &w[r], a);
                    let ds = if G { _mm256_mul_ps(a.dv, sv[r]) } else { a.dv };
                    acc[r][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), ds, acc[r][i]);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// int8 activations, AVX-512 GEMV: two superblocks of one weight row per zmm register
// ---------------------------------------------------------------------------------------------

/// Weight rows per AVX-512 GEMV tile with tables: each row's table and accumulator stay in
/// registers. Without tables a tile holds twice as many rows (fewer tile ends per row: on
/// Zen 4 ternary GEMVs ran ~10% faster).
const ZMM_ROWS: usize = 8;

/// One zmm step of an activation row, ready to multiply: a *chunk* (superblocks 2c and 2c + 1,
/// in the low and high 256 bits, met by one weight row), or the *tail* (a row's last superblock
/// when their number is odd, in both halves, met by two weight rows at once).
#[derive(Clone, Copy)]
struct Acts2 {
    t: [__m512i; 4],
    /// As [`Acts::bsq`] (`vpdpbusd` modes).
    bsq: __m512i,
    dv: __m512,
    /// The step's first group; for each lane the index of its group's scale among the row's
    /// 8 scales from `g0` on (a chunk), or among those of the low half's row (0..8) and of the
    /// high half's (16..24) (the tail); and which of the 8 exist (a row's last groups).
    g0: usize,
    gidx: __m256i,
    gmask: u8,
}

/// Arranges one activation row's prepared superblocks (`nsb` from `pre`) into zmm steps in
/// `buf`: `nsb / 2` chunks, then the tail when `nsb` is odd.
///
/// # Safety
/// AVX512F must be available; `pre` must hold `nsb ≤ ACTS_CAP` prepared superblocks.
#[inline(always)]
unsafe fn q8_chunks<const B: usize, const MODE: u8>(
    cx: &Q8,
    pre: *const Acts,
    nsb: usize,
    buf: &mut [core::mem::MaybeUninit<Acts2>; ACTS_CAP],
) -> *const Acts2 {
    // SAFETY: entries sb < nsb ≤ ACTS_CAP of `pre` are prepared; at most nsb entries written.
    unsafe {
        let join = |a: __m256i, b: __m256i| _mm512_inserti64x4::<1>(_mm512_castsi256_si512(a), b);
        let s = sb_blocks(B);
        let mut lanes = [0i32; 8];
        _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, lane_blocks::<B>());
        // Blocks past the row (a partial superblock) take the last block's group: their
        // products are zero, their scales must merely be finite.
        let group = |blk: usize| blk.min(cx.nb - 1) / cx.bpg;
        for c in 0..nsb.div_ceil(2) {
            let tail = 2 * c + 1 == nsb;
            let sbs = [2 * c, if tail { 2 * c } else { 2 * c + 1 }];
            let mut g0 = 0;
            let mut gidx = [0u16; 16];
            if cx.gpr > 1 {
                g0 = group(sbs[0] * s);
                for (l, g) in gidx.iter_mut().enumerate() {
                    let half = l / 8;
                    // A chunk spans 2s ≤ 8 blocks, so at most 8 groups.
                    let own = group(sbs[half] * s + lanes[l % 8] as usize) - g0;
                    *g = (own + if tail { 16 * half } else { 0 }) as u16;
                }
            }
            let gmask = ((1u32 << (cx.gpr - g0).min(8)) - 1) as u8;
            let (a0, a1) = (&*pre.add(sbs[0]), &*pre.add(sbs[1]));
            // Affine 1- and 2-bit codes come as 2·code and 4·code (`zmm_codes`): sums twice or
            // four times as large, exactly, met by β·Σq as large and d as small.
            let (bsq, dv) = (join(a0.bsq, a1.bsq), join_ps(a0.dv, a1.dv));
            let (bsq, dv) = match (MODE, B) {
                (AFFINE, 2) => (
                    _mm512_slli_epi32::<2>(bsq),
                    _mm512_mul_ps(dv, _mm512_set1_ps(0.25)),
                ),
                (AFFINE, 1) => (
                    _mm512_slli_epi32::<1>(bsq),
                    _mm512_mul_ps(dv, _mm512_set1_ps(0.5)),
                ),
                _ => (bsq, dv),
            };
            buf[c].write(Acts2 {
                t: core::array::from_fn(|k| join(a0.t[k], a1.t[k])),
                bsq,
                dv,
                g0,
                gidx: _mm256_loadu_si256(gidx.as_ptr() as *const __m256i),
                gmask,
            });
        }
        buf.as_ptr() as *const Acts2
    }
}

/// `a` in the low 256 bits, `b` in the high.
#[inline(always)]
unsafe fn join_ps(a: __m256, b: __m256) -> __m512 {
    // SAFETY: register-only AVX512F operations; the caller runs with AVX512F enabled.
    unsafe {
        _mm512_castpd_ps(_mm512_insertf64x4::<1>(
            _mm512_castpd256_pd512(_mm256_castps_pd(a)),
            _mm256_castps_pd(b),
        ))
    }
}

/// Loads one weight row's chunk at `p` (`len` bytes with `PART`, the rest zero): 64 bytes for
/// 2- and 4-bit codes; for 1-bit codes its two 16-byte superblocks as 128-bit lanes
/// `[s0, s0, s1, s1]`.
#[inline(always)]
unsafe fn chunk_bytes<const B: usize, const PART: bool>(p: *const u8, len: usize) -> __m512i {
    // SAFETY: the caller guarantees the chunk's bytes (`len` with `PART`) at `p`; the masked
    // loads read no more; AVX512F/BW/VL are enabled.
    unsafe {
        if B == 1 {
            let (l0, l1) = if PART {
                (len.min(16), len.saturating_sub(16))
            } else {
                (16, 16)
            };
            return pair_bytes::<B, PART>(p, l0, p.add(16), l1);
        }
        if PART {
            _mm512_maskz_loadu_epi8((1u64 << len) - 1, p as *const i8)
        } else {
            _mm512_loadu_si512(p as *const __m512i)
        }
    }
}

/// Loads one superblock from each of two places (`len0` and `len1` bytes with `PART`), `p0`'s
/// in the low 256 bits and `p1`'s in the high (for 1-bit codes: 128-bit lanes
/// `[p0, p0, p1, p1]`).
#[inline(always)]
unsafe fn pair_bytes<const B: usize, const PART: bool>(
    p0: *const u8,
    len0: usize,
    p1: *const u8,
    len1: usize,
) -> __m512i {
    // SAFETY: the caller guarantees a superblock's bytes (`len0`, `len1` with `PART`) at `p0`
    // and `p1`; the masked loads read no more; AVX512F/BW/VL are enabled.
    unsafe {
        let join = |a: __m256i, b: __m256i| _mm512_inserti64x4::<1>(_mm512_castsi256_si512(a), b);
        if B == 1 {
            let load = |p: *const u8, len: usize| {
                let x = if PART {
                    _mm_maskz_loadu_epi8(((1u32 << len) - 1) as u16, p as *const i8)
                } else {
                    _mm_loadu_si128(p as *const __m128i)
                };
                _mm256_broadcastsi128_si256(x)
            };
            return join(load(p0, len0), load(p1, len1));
        }
        let load = |p: *const u8, len: usize| {
            if PART {
                _mm256_maskz_loadu_epi8(((1u64 << len) - 1) as u32, p as *const i8)
            } else {
                _mm256_loadu_si256(p as *const __m256i)
            }
        };
        join(load(p0, len0), load(p1, len1))
    }
}

/// `vpermb` tables giving 4·code of the 2-bit code at bits 0..2 and at bits 4..6 of an index.
const PLANE_X4: [[i8; 64]; 2] = {
    let mut t = [[0i8; 64]; 2];
    let mut i = 0;
    while i < 64 {
        t[0][i] = 4 * (i & 3) as i8;
        t[1][i] = 4 * ((i >> 4) & 3) as i8;
        i += 1;
    }
    t
};

/// The codes of a zmm step loaded by [`chunk_bytes`] or [`pair_bytes`], one byte per weight in
/// the order of [`superblock_codes`] in each half, as the multiply wants them. For 1- and
/// 2-bit codes every plane is masked where it lies or one shift away: tables get the odd planes
/// as 2·code or 4·code (their tables repeat entries to match), affine codes get every plane as
/// 2·code or 4·code, so one `vpdpbusd` chain sums them (and [`q8_chunks`] scales the
/// activation side to match).
#[inline(always)]
unsafe fn zmm_codes<const B: usize, const MODE: u8>(x: __m512i) -> [__m512i; 4] {
    // SAFETY: register-only AVX512F/BW operations; the caller runs with them enabled.
    unsafe {
        let z = _mm512_setzero_si512();
        let and = _mm512_and_si512;
        let affine = MODE == AFFINE;
        match B {
            4 => {
                let m = _mm512_set1_epi8(0x0F);
                [and(x, m), and(_mm512_srli_epi16::<4>(x), m), z, z]
            }
            2 => {
                let (m0, m1) = (_mm512_set1_epi8(3), _mm512_set1_epi8(0x0C));
                if affine {
                    // Planes 0 and 2 by `vpermb` on the bytes as they are (6 bits of each
                    // index: planes 0..3), planes 1 and 3 masked in place.
                    let t0 = _mm512_loadu_si512(PLANE_X4[0].as_ptr() as *const __m512i);
                    let t2 = _mm512_loadu_si512(PLANE_X4[1].as_ptr() as *const __m512i);
                    [
                        _mm512_permutexvar_epi8(x, t0),
                        and(x, m1),
                        _mm512_permutexvar_epi8(x, t2),
                        and(_mm512_srli_epi16::<4>(x), m1),
                    ]
                } else {
                    let y = _mm512_srli_epi16::<4>(x);
                    [and(x, m0), and(x, m1), and(y, m0), and(y, m1)]
                }
            }
            _ => {
                // 128-bit lanes [s0, s0, s1, s1], shifted by s and s + 4.
                let by = _mm512_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4, 0, 0, 0, 0, 4, 4, 4, 4);
                let y = _mm512_srlv_epi32(x, by);
                let (m0, m1) = (_mm512_set1_epi8(1), _mm512_set1_epi8(2));
                if affine {
                    [
                        and(_mm512_slli_epi32::<1>(y), m1),
                        and(y, m1),
                        and(_mm512_srli_epi32::<1>(y), m1),
                        and(_mm512_srli_epi32::<2>(y), m1),
                    ]
                } else {
                    let y2 = _mm512_srli_epi32::<2>(y);
                    [and(y, m0), and(y, m1), and(y2, m0), and(y2, m1)]
                }
            }
        }
    }
}

/// `Σ w·q` per lane of one zmm step (i32, exact): `w` from [`zmm_codes`] (looked up in the
/// table, for tables), `a` the activations. `PLAIN`: no affine step to apply (α = 1).
#[inline(always)]
unsafe fn zmm_isum<const B: usize, const MODE: u8, const PLAIN: bool>(
    cx: &Q8,
    w: &[__m512i; 4],
    a: &Acts2,
) -> __m512i {
    // SAFETY: register-only AVX-512 operations; the caller runs with AVX512-VNNI enabled.
    unsafe {
        let s = sb_blocks(B);
        // One chain: the tile's other rows in flight hide its latency.
        let mut v = if PLAIN { a.bsq } else { _mm512_setzero_si512() };
        for k in 0..s {
            v = _mm512_dpbusd_epi32(v, w[k], a.t[k]);
        }
        if !PLAIN {
            v = if cx.alpha > 0 && cx.alpha.count_ones() == 1 {
                _mm512_sll_epi32(v, _mm_cvtsi32_si128(cx.alpha.trailing_zeros() as i32))
            } else {
                _mm512_mullo_epi32(v, _mm512_set1_epi32(cx.alpha as i32))
            };
            v = _mm512_add_epi32(v, a.bsq);
        }
        v
    }
}

/// Looks the codes of a zmm step up in `tz` (tables: the `w + 128` bytes of each half's table
/// in every 128-bit lane of that half).
#[inline(always)]
unsafe fn zmm_lookup<const B: usize, const MODE: u8>(w: &mut [__m512i; 4], tz: __m512i) {
    // SAFETY: register-only AVX512BW operations; the caller runs with them enabled.
    unsafe {
        if MODE == TABLE {
            for v in w.iter_mut().take(sb_blocks(B)) {
                *v = _mm512_shuffle_epi8(tz, *v);
            }
        }
    }
}

/// The weights of one row's chunk `x` ([`chunk_bytes`]), looked up in `tz` for tables: for
/// 4-bit codes `vpermb` takes the code bytes as they are (it reads 6 bits of each index, and
/// the table repeats in all four 16-byte lanes), saving the masks of [`zmm_codes`].
#[inline(always)]
unsafe fn chunk_weights<const B: usize, const MODE: u8>(x: __m512i, tz: __m512i) -> [__m512i; 4] {
    // SAFETY: register-only AVX-512 operations; the caller runs with AVX512BW and VBMI enabled.
    unsafe {
        if MODE == TABLE && B == 4 {
            let z = _mm512_setzero_si512();
            let hi = _mm512_srli_epi16::<4>(x);
            return [
                _mm512_permutexvar_epi8(x, tz),
                _mm512_permutexvar_epi8(hi, tz),
                z,
                z,
            ];
        }
        let mut w = zmm_codes::<B, MODE>(x);
        zmm_lookup::<B, MODE>(&mut w, tz);
        w
    }
}

/// The f16 group scales at `p` (a row's, from step `a`'s first group on): the 8 a step can
/// span, those past the row's last group zero.
#[inline(always)]
unsafe fn group_scales(p: *const u8, a: &Acts2) -> __m256i {
    // SAFETY: the caller points at a row's group g0; the masked load reads only its groups
    // g0..gpr (checked in `qgemm_q8`).
    unsafe { _mm256_castsi128_si256(_mm_maskz_loadu_epi16(a.gmask, p as *const i16)) }
}

/// An AVX-512 GEMV tile: weight rows `j0..j0 + NW` times activation row `i0`; with `CLAMP`
/// the rows past n repeat the last one (their results are dropped).
///
/// # Safety
/// AVX512F/BW/VL, AVX512-VNNI and VBMI must be available; `cx` must describe valid extents,
/// with `j0 + NW ≤ n` (`j0 < n` with `CLAMP`) and `i0 < m`; `z` as [`q8_tiles`] prepares it.
#[inline(always)]
unsafe fn zmm_tile<
    const B: usize,
    const MODE: u8,
    const G: bool,
    const NW: usize,
    const CLAMP: bool,
>(
    cx: &Q8,
    j0: usize,
    i0: usize,
    z: ZTile,
) {
    // SAFETY: the rows read (below n) and their tables exist (checked in `qgemm_q8`); the
    // masked table loads read 2^b bytes.
    unsafe {
        // Tables: the 2^b bytes; entry 4c (2 bits) or 2c (1 bit) repeats entry c, for the odd
        // planes; the sign bit flipped (w + 128). Rows step through the tables without a
        // division per row.
        let mut tz = [_mm512_setzero_si512(); NW];
        let mut t = table_of(j0, cx.rpt, cx.n);
        let t0 = t;
        if MODE == TABLE {
            let spread = match B {
                2 => _mm_setr_epi8(0, 1, 2, 3, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
                _ => _mm_setr_epi8(0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1),
            };
            let emask = ((1u32 << (1 << B)) - 1) as u16;
            // Rows of table t still to come, this row included.
            let mut left = if cx.rpt >= cx.n {
                usize::MAX
            } else {
                (t + 1) * cx.rpt - j0
            };
            for (r, tv) in tz.iter_mut().enumerate() {
                if j0 + r < cx.n {
                    if left == 0 {
                        (t, left) = (t + 1, cx.rpt);
                    }
                    left -= 1;
                }
                let p = cx.lut.add(t * cx.entries);
                let mut v = _mm_maskz_loadu_epi8(emask, p as *const i8);
                if B < 4 {
                    v = _mm_shuffle_epi8(v, spread);
                }
                *tv = _mm512_xor_si512(_mm512_broadcast_i32x4(v), _mm512_set1_epi8(-128));
            }
        }
        // All the tile's rows use table t0 (their factors are one value).
        let table = (cx.rpt > 1 && (MODE != TABLE || t == t0)).then_some(t0);
        let p0 = cx.codes.add(j0 * cx.rb);
        if MODE != AFFINE || cx.alpha == 1 {
            zmm_rows::<B, MODE, G, true, NW, CLAMP>(cx, j0, i0, p0, &tz, z, table);
        } else {
            zmm_rows::<B, MODE, G, false, NW, CLAMP>(cx, j0, i0, p0, &tz, z, table);
        }
    }
}

/// The steps of an AVX-512 GEMV tile (its first row's codes at `p0`, tables from
/// [`zmm_tile`]): the rows' last, partial chunk or their tails two rows at a time, then each
/// row's whole chunks, then the outputs.
///
/// # Safety
/// As for [`zmm_tile`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn zmm_rows<
    const B: usize,
    const MODE: u8,
    const G: bool,
    const PLAIN: bool,
    const NW: usize,
    const CLAMP: bool,
>(
    cx: &Q8,
    j0: usize,
    i0: usize,
    p0: *const u8,
    tz: &[__m512i; NW],
    z: ZTile,
    table: Option<usize>,
) {
    // SAFETY: chunk c of row r is the bytes from p0 + r·rb + c·cb on, cb of them but for a
    // last, partial chunk (`rest` bytes, masked); the tail's `rest` bytes follow the whole
    // chunks; every row lies below n.
    unsafe {
        let sbb = sb_blocks(B) * cx.bb;
        let cb = 2 * sbb;
        let (nfull, rest, rb) = (z.nfull, z.rest, cx.rb);
        // Row j0's group scales, and the bytes from one row's to the next's.
        let (s0, srb) = (cx.scales.add(2 * j0 * cx.gpr), 2 * cx.gpr);
        let mut acc = [_mm512_setzero_ps(); NW];
        let ahead = (j0 + NW * z.ahead) * rb;
        // Row r of the tile (rows past n repeat the last one when the tile is clamped).
        let last = cx.n - 1 - j0;
        let row = |r: usize| if CLAMP { r.min(last) } else { r };
        // One step of every row, unrolled by hand: a loop keeps the arrays in memory. Rows are
        // addressed from one pointer, so the compiler needs no register per row.
        macro_rules! chunk {
            ($part:literal, $c:expr, $len:expr, $($r:literal)*) => {{
                let (a, p, len) = (&*z.acts.add($c), p0.add($c * cb), $len);
                let sp = s0.add(2 * a.g0);
                $(if $r < NW {
                    let w = chunk_weights::<B, MODE>(
                        chunk_bytes::<B, $part>(p.add(row($r) * rb), len),
                        tz[$r],
                    );
                    let v = zmm_isum::<B, MODE, PLAIN>(cx, &w, a);
                    let ds = if G {
                        let g = group_scales(sp.add(row($r) * srb), a);
                        let g = _mm512_cvtph_ps(_mm256_permutexvar_epi16(a.gidx, g));
                        _mm512_mul_ps(a.dv, g)
                    } else {
                        a.dv
                    };
                    acc[$r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), ds, acc[$r]);
                })*
            }};
        }
        if rest > sbb {
            chunk!(true, nfull, rest, 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15);
        } else if rest > 0 {
            // The tail: rows 2q and 2q + 1 share a register; their lanes are added to the
            // rows' own (the same additions whichever half a row is in). First, so that its
            // chain of latencies runs under the chunks.
            let (a, p) = (&*z.acts.add(nfull), p0.add(nfull * cb));
            let sp = s0.add(2 * a.g0);
            macro_rules! tail {
                ($part:literal, $($q:literal)*) => {{
                    $(if $q < NW / 2 {
                        let (r0, r1) = (2 * $q, 2 * $q + 1);
                        let (p_0, p_1) = (p.add(row(r0) * rb), p.add(row(r1) * rb));
                        let x = pair_bytes::<B, $part>(p_0, rest, p_1, rest);
                        let mut w = zmm_codes::<B, MODE>(x);
                        let t = _mm512_inserti64x4::<1>(tz[r0], _mm512_castsi512_si256(tz[r1]));
                        zmm_lookup::<B, MODE>(&mut w, t);
                        let v = zmm_isum::<B, MODE, PLAIN>(cx, &w, a);
                        let ds = if G {
                            let (lo, hi) = (
                                group_scales(sp.add(row(r0) * srb), a),
                                group_scales(sp.add(row(r1) * srb), a),
                            );
                            let g = _mm256_permutex2var_epi16(lo, a.gidx, hi);
                            _mm512_mul_ps(a.dv, _mm512_cvtph_ps(g))
                        } else {
                            a.dv
                        };
                        let v = _mm512_mul_ps(_mm512_cvtepi32_ps(v), ds);
                        acc[r0] = _mm512_add_ps(acc[r0], _mm512_maskz_mov_ps(0x00FF, v));
                        let high = _mm512_maskz_shuffle_f32x4::<0b00_00_11_10>(0x00FF, v, v);
                        acc[r1] = _mm512_add_ps(acc[r1], high);
                    })*
                }};
            }
            prefetch_ahead(cx.codes, ahead, nfull * NW * cb, NW * rest);
            if rest == sbb {
                tail!(false, 0 1 2 3 4 5 6 7);
            } else {
                tail!(true, 0 1 2 3 4 5 6 7);
            }
        }
        for c in 0..nfull {
            prefetch_ahead(cx.codes, ahead, c * NW * cb, NW * cb);
            chunk!(false, c, cb, 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15);
        }
        for h in 0..NW / ZMM_ROWS {
            let a: &[__m512; ZMM_ROWS] = (&acc[h * ZMM_ROWS..][..ZMM_ROWS]).try_into().unwrap();
            zmm_out::<G>(cx, i0, j0 + h * ZMM_ROWS, a, table);
        }
    }
}

/// Writes the outputs of an AVX-512 GEMV tile: rows `j0..j0 + 8` (those below n), row r's lane
/// sums in `acc[r]`, times their factors (`table`: the one table of all the tile's rows).
///
/// # Safety
/// As for [`zmm_rows`].
#[inline(always)]
unsafe fn zmm_out<const G: bool>(
    cx: &Q8,
    i0: usize,
    j0: usize,
    acc: &[__m512; ZMM_ROWS],
    table: Option<usize>,
) {
    // SAFETY: register-only AVX-512 operations; a whole tile (j0 + 8 ≤ n) reads the table
    // scales, row scales (one per row without groups) and bias of rows j0..j0 + 8 and writes
    // C's row i0 there, all checked in `qgemm_q8`; else `put4` of outputs below n.
    unsafe {
        // Adjacent elements added: [a0+a1, a2+a3, b0+b1, b2+b3] per 128-bit lane.
        let fold = |a: __m512, b: __m512| {
            let even = _mm512_shuffle_ps::<0b10_00_10_00>(a, b);
            let odd = _mm512_shuffle_ps::<0b11_01_11_01>(a, b);
            _mm512_add_ps(even, odd)
        };
        let f1: [__m512; 4] = core::array::from_fn(|q| fold(acc[2 * q], acc[2 * q + 1]));
        // Per 128-bit lane L, the sums of lane L of rows 0..4 (`lo`) and 4..8 (`hi`); then the
        // four lanes added, (L0 + L2) + (L1 + L3) for every row.
        let (lo, hi) = (fold(f1[0], f1[1]), fold(f1[2], f1[3]));
        let u = _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b01_00_01_00>(lo, hi),
            _mm512_shuffle_f32x4::<0b11_10_11_10>(lo, hi),
        );
        let u = _mm512_add_ps(u, _mm512_shuffle_f32x4::<0b10_11_00_01>(u, u));
        let sums = _mm512_castps512_ps256(_mm512_shuffle_f32x4::<0b00_00_10_00>(u, u));
        let o = &cx.out;
        let whole = j0 + ZMM_ROWS <= cx.n;
        if whole && o.c_cs == 1 && o.identity && (cx.rpt == 1 || table.is_some()) {
            // A whole tile: its 8 factors, bias and outputs at once (as `factors4`, `put4`).
            let ls = match table {
                Some(t) => _mm256_set1_ps(f32_at(cx.lut_scale.add(4 * t))),
                None => _mm256_loadu_ps(cx.lut_scale.add(4 * j0) as *const f32),
            };
            let f = if G {
                ls
            } else {
                let s = _mm_loadu_si128(cx.scales.add(2 * j0) as *const __m128i);
                _mm256_mul_ps(ls, _mm256_cvtph_ps(s))
            };
            let mut v = _mm256_mul_ps(sums, f);
            if !o.bias.is_null() {
                v = _mm256_add_ps(v, _mm256_loadu_ps(o.bias.add(j0)));
            }
            _mm256_storeu_ps(o.c.add(i0 * o.c_rs + j0), v);
            return;
        }
        // Strided outputs, activations, rows of several tables, rows past n: four at a time.
        let put = |q: usize, v: __m128| {
            let j = j0 + 4 * q;
            if j < cx.n {
                o.put4(i0, j, cx.n, _mm_mul_ps(v, factors4::<G>(cx, j)));
            }
        };
        put(0, _mm256_castps256_ps128(sums));
        put(1, _mm256_extractf128_ps::<1>(sums));
    }
}

/// What every AVX-512 GEMV tile of one activation row shares.
#[derive(Clone, Copy)]
struct ZTile {
    /// The activation row's steps ([`q8_chunks`]).
    acts: *const Acts2,
    /// How many tiles ahead to prefetch the codes ([`gemv_ahead`]).
    ahead: usize,
    /// Whole chunks per row, and the bytes after them (a partial chunk, or the tail).
    nfull: usize,
    rest: usize,
}

/// The group scales of one row (`srow`, or `sf` when converted up front) for the superblock
/// starting at block `b0`: one value when the superblock lies in one group (`whole`), else one
/// per block, spread over its lanes.
#[inline(always)]
unsafe fn q8_scales<const B: usize>(
    cx: &Q8,
    srow: *const u8,
    sf: Option<*const f32>,
    b0: usize,
    whole: bool,
) -> __m256 {
    // SAFETY: the caller guarantees the row's scales at `srow` (and at `sf`, for superblocks
    // inside the row); blocks past the row's end use the last block's group.
    unsafe {
        if let Some(sf) = sf {
            if whole {
                return _mm256_broadcast_ss(&*sf.add(b0 / cx.bpg));
            }
            if cx.bpg == 1 {
                return per_lane::<B>(sf.add(b0));
            }
        }
        if whole {
            return _mm256_set1_ps(f16_at(srow, 2 * (b0 / cx.bpg)));
        }
        let mut blk = [0f32; 4];
        for (jb, v) in blk.iter_mut().enumerate().take(sb_blocks(B)) {
            *v = f16_at(srow, 2 * ((b0 + jb).min(cx.nb - 1) / cx.bpg));
        }
        per_lane::<B>(blk.as_ptr())
    }
}

/// The factor of output `j`: its table's scale, times the row's scale when it has one (`!G`).
#[inline(always)]
unsafe fn factor<const G: bool>(cx: &Q8, j: usize) -> f32 {
    // SAFETY: the caller guarantees j < n; tables and scales were checked in `qgemm_q8`.
    unsafe {
        let mut f = f32_at(cx.lut_scale.add(4 * table_of(j, cx.rpt, cx.n)));
        if !G {
            f *= f16_at(cx.scales, 2 * j);
        }
        f
    }
}

/// [`factor`] of outputs `j..j + 4` (rows past `n` repeat the last).
#[inline(always)]
unsafe fn factors4<const G: bool>(cx: &Q8, j: usize) -> __m128 {
    // SAFETY: the vector loads read rows j..j + 4 ≤ n only; the rest as in `factor`.
    unsafe {
        if j + 4 <= cx.n && (cx.rpt == 1 || cx.rpt >= cx.n) {
            let ls = if cx.rpt == 1 {
                _mm_loadu_ps(cx.lut_scale.add(4 * j) as *const f32)
            } else {
                _mm_set1_ps(f32_at(cx.lut_scale))
            };
            if G {
                return ls;
            }
            let s = _mm_cvtph_ps(_mm_loadl_epi64(cx.scales.add(2 * j) as *const __m128i));
            return _mm_mul_ps(ls, s);
        }
        let f = |r: usize| factor::<G>(cx, (j + r).min(cx.n - 1));
        _mm_setr_ps(f(0), f(1), f(2), f(3))
    }
}

/// A tile of weight rows `j0..j0+NW` × activation rows `i0..i0+MA`; rows at or past `n` / `m`
/// repeat the last one and their results are dropped.
///
/// # Safety
/// As for [`q8_run`], with `j0 < n` and `i0 < m`.
#[inline(always)]
unsafe fn q8_tile<
    const B: usize,
    const MODE: u8,
    const ABS_W: bool,
    const SUM16: bool,
    const DOT: u8,
    const G: bool,
    const NW: usize,
    const MA: usize,
>(
    cx: &Q8,
    j0: usize,
    n: usize,
    i0: usize,
    m: usize,
    pre: Option<*const Acts>,
) {
    // SAFETY (whole body): every pointer below addresses row min(j0 + r, n − 1) of the codes,
    // tables and scales, or activation row min(i0 + i, m − 1) (its Kp codes then Kp/32
    // scales), all checked in `qgemm_q8`; the last, partial superblock is read from
    // zero-padded local copies.
    unsafe {
        let s = sb_blocks(B);
        let sbb = s * cx.bb;
        let grouped = G;
        let row = |r: usize| (j0 + r).min(n - 1);
        let arow = |i: usize| (i0 + i).min(m - 1);
        // Tables: b ≤ 4 reads 16 bytes (entries past 2^b are never looked up); near the end of
        // the bytes, from a zero-padded copy.
        let mut tcopy = [[0u8; 16]; NW];
        let mut tp = [core::ptr::null::<u8>(); NW];
        for r in 0..NW {
            let t = table_of(row(r), cx.rpt, cx.n);
            tp[r] = cx.lut.add(t * cx.entries);
            if B < 4 && t >= cx.direct_tables {
                core::ptr::copy_nonoverlapping(tp[r], tcopy[r].as_mut_ptr(), 1 << B);
                tp[r] = tcopy[r].as_ptr();
            }
        }
        let mut cp = [core::ptr::null::<u8>(); NW];
        for r in 0..NW {
            cp[r] = cx.codes.add(row(r) * cx.rb);
        }
        let mut ap = [core::ptr::null::<u8>(); MA];
        let mut dp = [core::ptr::null::<f32>(); MA];
        for i in 0..MA {
            ap[i] = cx.acts.add(arow(i) * cx.arb);
            dp[i] = ap[i].add(cx.kp) as *const f32;
        }
        let mut acc = [[_mm256_setzero_ps(); MA]; NW];
        let mut sv = [_mm256_set1_ps(1.0); NW];
        let nfull = cx.nb / s;
        // Superblocks per group when groups hold whole superblocks, else 0 (per-lane scales).
        let sbpg = if cx.bpg.is_multiple_of(s) {
            cx.bpg / s
        } else {
            0
        };
        let mut srow = [core::ptr::null::<u8>(); NW];
        for r in 0..NW {
            srow[r] = cx.scales.add(row(r) * cx.gpr * 2);
        }
        // Group scales of the tile's rows (contiguous when no row repeats) as f32, converted 8
        // at a time once per tile when they are few and the whole vectors lie inside the scales.
        let mut sf = core::mem::MaybeUninit::<[f32; SCALES_CAP + 8]>::uninit();
        let count = NW * cx.gpr;
        let vecs = count.div_ceil(8);
        let sf_ok = grouped
            && count <= SCALES_CAP
            && j0 + NW <= n
            && (j0 * cx.gpr + 8 * vecs) <= n * cx.gpr;
        if sf_ok {
            let dst = sf.as_mut_ptr() as *mut f32;
            for q in 0..vecs {
                _mm256_storeu_ps(
                    dst.add(8 * q),
                    _mm256_cvtph_ps(_mm_loadu_si128(srow[0].add(16 * q) as *const __m128i)),
                );
            }
        }
        // Row r's scales start at entry r · gpr (full superblocks only read inside the row).
        let sfp = |r: usize| sf_ok.then(|| (sf.as_ptr() as *const f32).wrapping_add(r * cx.gpr));
        // Prepared activations: row i's superblocks start at entry i · nsb.
        let nsb = cx.nb.div_ceil(s);
        let mut pp = [core::ptr::null::<Acts>(); MA];
        if let Some(p) = pre {
            for i in 0..MA {
                pp[i] = p.add(i * nsb);
            }
        }
        for sb in 0..nfull {
            if grouped && (sbpg == 0 || sb.is_multiple_of(sbpg)) {
                for r in 0..NW {
                    sv[r] = q8_scales::<B>(cx, srow[r], sfp(r), sb * s, sbpg > 0);
                }
            }
            if MA == 1 {
                prefetch_ahead(
                    cx.codes,
                    (j0 + NW * gemv_ahead(NW * cx.rb)) * cx.rb,
                    sb * NW * sbb,
                    NW * sbb,
                );
            }
            let prep = pre.map(|_| &pp);
            q8_step::<B, MODE, ABS_W, SUM16, DOT, G, NW, MA>(
                cx, &cp, &tp, &ap, &dp, prep, &sv, &mut acc,
            );
            for p in cp.iter_mut() {
                *p = p.add(sbb);
            }
            for i in 0..MA {
                ap[i] = ap[i].add(s * BLOCK);
                dp[i] = dp[i].add(s);
                pp[i] = pp[i].wrapping_add(1);
            }
        }
        let valid = cx.nb - nfull * s;
        if valid > 0 {
            let mut cbuf = [[0u8; 32]; NW];
            let mut abuf = [[0u8; 128]; MA];
            let mut dbuf = [[0f32; 4]; MA];
            for r in 0..NW {
                core::ptr::copy_nonoverlapping(cp[r], cbuf[r].as_mut_ptr(), valid * cx.bb);
                cp[r] = cbuf[r].as_ptr();
            }
            if pre.is_none() {
                for i in 0..MA {
                    core::ptr::copy_nonoverlapping(ap[i], abuf[i].as_mut_ptr(), valid * BLOCK);
                    core::ptr::copy_nonoverlapping(dp[i], dbuf[i].as_mut_ptr(), valid);
                    ap[i] = abuf[i].as_ptr();
                    dp[i] = dbuf[i].as_ptr();
                }
            }
            if grouped {
                for r in 0..NW {
                    sv[r] = q8_scales::<B>(cx, srow[r], None, nfull * s, sbpg > 0);
                }
            }
            let prep = pre.map(|_| &pp);
            q8_step::<B, MODE, ABS_W, SUM16, DOT, G, NW, MA>(
                cx, &cp, &tp, &ap, &dp, prep, &sv, &mut acc,
            );
        }
        // Per output: (Σ lanes) · lut_scale · (the row's scale when it has one).
        if NW.is_multiple_of(4) && MA == 1 {
            // GEMV tiles: four outputs at once.
            for q in (0..NW).step_by(4) {
                let j = j0 + q;
                if j >= n {
                    break;
                }
                let sums = hsum4([acc[q][0], acc[q + 1][0], acc[q + 2][0], acc[q + 3][0]]);
                cx.out
                    .put4(i0, j, n, _mm_mul_ps(sums, factors4::<G>(cx, j)));
            }
        } else {
            for r in 0..NW {
                let j = j0 + r;
                if j >= n {
                    break;
                }
                let f = factor::<G>(cx, j);
                for i in 0..MA {
                    if i0 + i < m {
                        cx.out.put(i0 + i, j, hsum(acc[r][i]) * f);
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Row-tiled 2-bit affine codes (int8 activations)
// ---------------------------------------------------------------------------------------------

/// Activation rows the AVX-512 row-tiled kernel multiplies with each unpacked tile block.
const TILED_MR: usize = 4;

/// One row-tiled product's operands as raw pointers (extents checked in [`q8_with`]).
struct Tiled {
    codes: *const u8,
    /// Blocks per row and per group, groups per row.
    nb: usize,
    bpg: usize,
    gpr: usize,
    /// The f16 scales: per tile and group, 16 rows.
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

    /// [`tiled_offsets`] of activation row `i`.
    ///
    /// # Safety
    /// Activation row `i` must be inside the rows checked in [`q8_with`].
    unsafe fn offsets(&self, i: usize, kg: &mut [f32; TILED_GROUPS]) {
        // SAFETY: row `i` holds `kp` codes then `kp / 32` f32 scales.
        let row = unsafe { core::slice::from_raw_parts(self.acts.add(i * self.arb), self.arb) };
        tiled_offsets(row, self.kp, self.bpg, self.beta, &mut kg[..self.gpr]);
    }

    /// Writes outputs `(i, j0..j0 + 16)` of tile `tile` from `v` times its table's scale, those
    /// below `n`.
    ///
    /// # Safety
    /// As for [`Out::put`], for the outputs below `n`; `tile` below `⌈n/16⌉`.
    #[inline(always)]
    unsafe fn put16(&self, i: usize, tile: usize, v: &[f32; ROW_TILE]) {
        let j0 = tile * ROW_TILE;
        // SAFETY: as the caller guarantees.
        let ls = unsafe { self.lut_scale(tile) };
        for (r, x) in v
            .iter()
            .enumerate()
            .take(self.n.saturating_sub(j0).min(ROW_TILE))
        {
            // SAFETY: as the caller guarantees.
            unsafe { self.out.put(i, j0 + r, x * ls) };
        }
    }
}

/// The row-tiled product of 2-bit affine or 4-bit codes: the AVX-512 kernels with `dot` =
/// AVX512-VNNI, else the 256-bit ones (`maddubs` or AVX-VNNI).
///
/// # Safety
/// AVX2, FMA and F16C must be available, and the instructions of `dot`; `t` must describe
/// valid extents for `m` activation rows of `bits`-bit codes (2 or 4).
unsafe fn tiled_run(dot: u8, bits: usize, t: &Tiled, m: usize) {
    let mut kg = [[0f32; TILED_GROUPS]; TILED_MR];
    let mut i0 = 0;
    while i0 < m {
        let rows = if dot == AVX512_VNNI {
            TILED_MR.min(m - i0)
        } else {
            1
        };
        for r in 0..rows {
            // SAFETY: row i0 + r < m.
            unsafe { t.offsets(i0 + r, &mut kg[r]) };
        }
        // SAFETY: as the caller guarantees; rows i0..i0 + rows are below m.
        unsafe {
            match (bits, dot, rows) {
                (2, AVX512_VNNI, 1) => tiled_avx512::<1>(t, i0, &kg),
                (2, AVX512_VNNI, 2) => tiled_avx512::<2>(t, i0, &kg),
                (2, AVX512_VNNI, 3) => tiled_avx512::<3>(t, i0, &kg),
                (2, AVX512_VNNI, _) => tiled_avx512::<4>(t, i0, &kg),
                (2, AVX_VNNI, _) => tiled_avx_vnni(t, i0, &kg[0]),
                (2, _, _) => tiled_avx2(t, i0, &kg[0]),
                (_, AVX512_VNNI, 1) => tiled4_avx512::<1>(t, i0, &kg),
                (_, AVX512_VNNI, 2) => tiled4_avx512::<2>(t, i0, &kg),
                (_, AVX512_VNNI, 3) => tiled4_avx512::<3>(t, i0, &kg),
                (_, AVX512_VNNI, _) => tiled4_avx512::<4>(t, i0, &kg),
                (_, AVX_VNNI, _) => tiled4_avx_vnni(t, i0, &kg[0]),
                _ => tiled4_avx2(t, i0, &kg[0]),
            }
        }
        i0 += rows;
    }
}

/// Row-tiled 2-bit GEMV/GEMM for `MR` activation rows from `i0` on (AVX512-VNNI).
///
/// A tile block is two registers: rows 0–7 and 8–15, each row's 8 bytes one pair of lanes.
/// Each bit plane is a shift and a mask away (measured faster on Zen 4 than one `gf2p8affineqb`
/// per plane); plane `p` of a row's bytes `4h..4h + 4` holds inputs `8p + 4h ..`, so one
/// broadcast 8-byte run of activations serves every row. Per block the lanes' i32 sums are
/// converted and scaled by `d`; per group the lane pairs are added (16 rows in one register),
/// `α`, `β·Σd·Σq` and the row scales applied.
///
/// # Safety
/// As for [`tiled_run`] with AVX512-VNNI; rows `i0..i0 + MR` must be below `m`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn tiled_avx512<const MR: usize>(
    t: &Tiled,
    i0: usize,
    kg: &[[f32; TILED_GROUPS]; TILED_MR],
) {
    // SAFETY: tile blocks, scales and activations are read inside the extents `q8_with` checked
    // (codes and scales of ⌈n/16⌉ whole tiles, `kp` codes and `kp/32` scales per activation
    // row); outputs go through `put16`.
    unsafe {
        let three = _mm512_set1_epi8(3);
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
        let alpha = _mm512_set1_ps(t.alpha);
        let tiles = t.n.div_ceil(ROW_TILE);
        for tile in 0..tiles {
            let base = t.codes.add(tile * t.nb * TILE_BLOCK);
            let mut acc = [_mm512_setzero_ps(); MR];
            for g in 0..t.gpr {
                let (mut fa, mut fb) = ([_mm512_setzero_ps(); MR], [_mm512_setzero_ps(); MR]);
                for b in g * t.bpg..(g + 1) * t.bpg {
                    let p = base.add(b * TILE_BLOCK);
                    prefetch_ahead(p, 4096, 0, TILE_BLOCK);
                    let (xa, xb) = (
                        _mm512_loadu_si512(p as *const _),
                        _mm512_loadu_si512(p.add(64) as *const _),
                    );
                    let pa = [
                        _mm512_and_si512(xa, three),
                        _mm512_and_si512(_mm512_srli_epi16::<2>(xa), three),
                        _mm512_and_si512(_mm512_srli_epi16::<4>(xa), three),
                        _mm512_and_si512(_mm512_srli_epi16::<6>(xa), three),
                    ];
                    let pb = [
                        _mm512_and_si512(xb, three),
                        _mm512_and_si512(_mm512_srli_epi16::<2>(xb), three),
                        _mm512_and_si512(_mm512_srli_epi16::<4>(xb), three),
                        _mm512_and_si512(_mm512_srli_epi16::<6>(xb), three),
                    ];
                    for r in 0..MR {
                        let row = t.acts.add((i0 + r) * t.arb);
                        let q = row.add(b * BLOCK);
                        let (mut ia, mut ib) = (_mm512_setzero_si512(), _mm512_setzero_si512());
                        for k in 0..4 {
                            let qv = _mm512_set1_epi64(core::ptr::read_unaligned(
                                q.add(8 * k) as *const i64
                            ));
                            ia = _mm512_dpbusd_epi32(ia, pa[k], qv);
                            ib = _mm512_dpbusd_epi32(ib, pb[k], qv);
                        }
                        let d = _mm512_set1_ps(f32_at(row.add(t.kp + 4 * b)));
                        fa[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia), d, fa[r]);
                        fb[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ib), d, fb[r]);
                    }
                }
                let s = _mm512_cvtph_ps(_mm256_loadu_si256(
                    t.scales.add((tile * t.gpr + g) * ROW_TILE * 2) as *const __m256i,
                ));
                for r in 0..MR {
                    let v = _mm512_add_ps(
                        _mm512_permutex2var_ps(fa[r], even, fb[r]),
                        _mm512_permutex2var_ps(fa[r], odd, fb[r]),
                    );
                    let v = _mm512_fmadd_ps(v, alpha, _mm512_set1_ps(kg[r][g]));
                    acc[r] = _mm512_fmadd_ps(v, s, acc[r]);
                }
            }
            for r in 0..MR {
                let mut y = [0f32; ROW_TILE];
                _mm512_storeu_ps(y.as_mut_ptr(), acc[r]);
                t.put16(i0 + r, tile, &y);
            }
        }
    }
}

/// [`tiled_ymm`] with `maddubs`.
///
/// # Safety
/// As for [`tiled_run`]; row `i` must be below `m`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tiled_avx2(t: &Tiled, i: usize, kg: &[f32; TILED_GROUPS]) {
    // SAFETY: as the caller guarantees.
    unsafe { tiled_ymm::<MADDUBS>(t, i, kg) }
}

/// [`tiled_ymm`] with AVX-VNNI's `vpdpbusd`.
///
/// # Safety
/// As for [`tiled_avx2`], and AVX-VNNI must be available.
#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
unsafe fn tiled_avx_vnni(t: &Tiled, i: usize, kg: &[f32; TILED_GROUPS]) {
    // SAFETY: as the caller guarantees.
    unsafe { tiled_ymm::<AVX_VNNI>(t, i, kg) }
}

/// Row-tiled 2-bit GEMV of activation row `i` on 256-bit registers: a tile block is four
/// registers of 4 rows, planes unpacked with shifts and masks, multiplied with `maddubs` (the
/// four planes' i16 pairs added before `madd`: at most 4·2·3·127) or AVX-VNNI's `vpdpbusd`;
/// otherwise as [`tiled_avx512`].
///
/// # Safety
/// As for [`tiled_avx2`].
#[inline(always)]
unsafe fn tiled_ymm<const DOT: u8>(t: &Tiled, i: usize, kg: &[f32; TILED_GROUPS]) {
    // SAFETY: as in `tiled_avx512`.
    unsafe {
        let three = _mm256_set1_epi8(3);
        let ones = _mm256_set1_epi16(1);
        // `hadd` of two 4-row registers gives rows 0, 1, 4, 5, 2, 3, 6, 7; this undoes it.
        let order = _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7);
        let row = t.acts.add(i * t.arb);
        let tiles = t.n.div_ceil(ROW_TILE);
        for tile in 0..tiles {
            let base = t.codes.add(tile * t.nb * TILE_BLOCK);
            let mut acc = [_mm256_setzero_ps(); 2];
            for g in 0..t.gpr {
                let mut f = [_mm256_setzero_ps(); 4];
                for b in g * t.bpg..(g + 1) * t.bpg {
                    let p = base.add(b * TILE_BLOCK);
                    prefetch_ahead(p, 4096, 0, TILE_BLOCK);
                    let q = row.add(b * BLOCK);
                    let qv: [__m256i; 4] = core::array::from_fn(|k| {
                        _mm256_set1_epi64x(core::ptr::read_unaligned(q.add(8 * k) as *const i64))
                    });
                    let d = _mm256_set1_ps(f32_at(row.add(t.kp + 4 * b)));
                    for (h, fh) in f.iter_mut().enumerate() {
                        let x = _mm256_loadu_si256(p.add(32 * h) as *const __m256i);
                        let pl = [
                            _mm256_and_si256(x, three),
                            _mm256_and_si256(_mm256_srli_epi16::<2>(x), three),
                            _mm256_and_si256(_mm256_srli_epi16::<4>(x), three),
                            _mm256_and_si256(_mm256_srli_epi16::<6>(x), three),
                        ];
                        let isum = if DOT == AVX_VNNI {
                            let mut s = _mm256_setzero_si256();
                            for k in 0..4 {
                                s = _mm256_dpbusd_avx_epi32(s, pl[k], qv[k]);
                            }
                            s
                        } else {
                            let s01 = _mm256_add_epi16(
                                _mm256_maddubs_epi16(pl[0], qv[0]),
                                _mm256_maddubs_epi16(pl[1], qv[1]),
                            );
                            let s23 = _mm256_add_epi16(
                                _mm256_maddubs_epi16(pl[2], qv[2]),
                                _mm256_maddubs_epi16(pl[3], qv[3]),
                            );
                            _mm256_madd_epi16(_mm256_add_epi16(s01, s23), ones)
                        };
                        *fh = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), d, *fh);
                    }
                }
                let s = t.scales.add((tile * t.gpr + g) * ROW_TILE * 2);
                let alpha = _mm256_set1_ps(t.alpha);
                let off = _mm256_set1_ps(kg[g]);
                for (h, a) in acc.iter_mut().enumerate() {
                    let v = _mm256_hadd_ps(f[2 * h], f[2 * h + 1]);
                    let v = _mm256_permutevar8x32_ps(v, order);
                    let v = _mm256_fmadd_ps(v, alpha, off);
                    let sc = _mm256_cvtph_ps(_mm_loadu_si128(s.add(16 * h) as *const __m128i));
                    *a = _mm256_fmadd_ps(v, sc, *a);
                }
            }
            let mut y = [0f32; ROW_TILE];
            for (h, a) in acc.iter().enumerate() {
                _mm256_storeu_ps(y.as_mut_ptr().add(8 * h), *a);
            }
            t.put16(i, tile, &y);
        }
    }
}

/// Row-tiled 4-bit GEMV/GEMM for `MR` activation rows from `i0` on (AVX512-VNNI).
///
/// A tile block is four registers, word `w` of the 16 rows each (one lane per row): low
/// nibbles are inputs `4w..4w + 4`, high ones `16 + 4w..`, so one broadcast word of activations
/// serves every row. `vpermb` looks the nibbles up in the tile's table (`w + 128`, repeated in
/// the four 128-bit lanes: its 6-bit index needs no mask, and the high nibbles need one 16-bit
/// shift), eight `vpdpbusd` sum the block per row; per block the sums are converted and scaled
/// by `d`, per group `−128·Σd·Σq` is added and the row scales applied.
///
/// # Safety
/// As for [`tiled_run`] with AVX512-VNNI; rows `i0..i0 + MR` must be below `m`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")]
unsafe fn tiled4_avx512<const MR: usize>(
    t: &Tiled,
    i0: usize,
    kg: &[[f32; TILED_GROUPS]; TILED_MR],
) {
    // SAFETY: tile blocks, tables, scales and activations are read inside the extents
    // `q8_with` checked (codes and scales of ⌈n/16⌉ whole tiles, every table, `kp` codes and
    // `kp/32` scales per activation row); outputs go through `put16`.
    unsafe {
        let rows: [*const u8; MR] = core::array::from_fn(|r| t.acts.add((i0 + r) * t.arb));
        for tile in 0..t.n.div_ceil(ROW_TILE) {
            let tab = _mm_loadu_si128(t.lut.add(16 * t.layout.tile_table(tile)) as *const __m128i);
            let tz = _mm512_xor_si512(_mm512_broadcast_i32x4(tab), _mm512_set1_epi8(-128));
            let base = t.codes.add(tile * t.nb * TILE_BLOCK4);
            let mut acc = [_mm512_setzero_ps(); MR];
            for g in 0..t.gpr {
                let mut f = [_mm512_setzero_ps(); MR];
                for b in g * t.bpg..(g + 1) * t.bpg {
                    let p = base.add(b * TILE_BLOCK4);
                    prefetch_ahead(p, 4096, 0, TILE_BLOCK4);
                    // Two chains of four `vpdpbusd` per activation row.
                    let mut s = [[_mm512_setzero_si512(); 2]; MR];
                    for w in 0..4 {
                        let x = _mm512_loadu_si512(p.add(64 * w) as *const __m512i);
                        let lo = _mm512_permutexvar_epi8(x, tz);
                        let hi = _mm512_permutexvar_epi8(_mm512_srli_epi16::<4>(x), tz);
                        for r in 0..MR {
                            let q = rows[r].add(b * BLOCK + 4 * w);
                            let word = |o: usize| {
                                _mm512_set1_epi32(core::ptr::read_unaligned(q.add(o) as *const i32))
                            };
                            let c = &mut s[r][w / 2];
                            *c = _mm512_dpbusd_epi32(*c, lo, word(0));
                            *c = _mm512_dpbusd_epi32(*c, hi, word(16));
                        }
                    }
                    for r in 0..MR {
                        let d = _mm512_set1_ps(f32_at(rows[r].add(t.kp + 4 * b)));
                        let v = _mm512_cvtepi32_ps(_mm512_add_epi32(s[r][0], s[r][1]));
                        f[r] = _mm512_fmadd_ps(v, d, f[r]);
                    }
                }
                let sc = _mm512_cvtph_ps(_mm256_loadu_si256(
                    t.scales.add((tile * t.gpr + g) * ROW_TILE * 2) as *const __m256i,
                ));
                for r in 0..MR {
                    let v = _mm512_add_ps(f[r], _mm512_set1_ps(kg[r][g]));
                    acc[r] = _mm512_fmadd_ps(v, sc, acc[r]);
                }
            }
            for r in 0..MR {
                let mut y = [0f32; ROW_TILE];
                _mm512_storeu_ps(y.as_mut_ptr(), acc[r]);
                t.put16(i0 + r, tile, &y);
            }
        }
    }
}

/// [`tiled4_ymm`] with `maddubs`.
///
/// # Safety
/// As for [`tiled_run`]; row `i` must be below `m`; no table holds −128.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tiled4_avx2(t: &Tiled, i: usize, kg: &[f32; TILED_GROUPS]) {
    // SAFETY: as the caller guarantees.
    unsafe { tiled4_ymm::<MADDUBS>(t, i, kg) }
}

/// [`tiled4_ymm`] with AVX-VNNI's `vpdpbusd`.
///
/// # Safety
/// As for [`tiled_run`] with AVX-VNNI; row `i` must be below `m`.
#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
unsafe fn tiled4_avx_vnni(t: &Tiled, i: usize, kg: &[f32; TILED_GROUPS]) {
    // SAFETY: as the caller guarantees.
    unsafe { tiled4_ymm::<AVX_VNNI>(t, i, kg) }
}

/// Row-tiled 4-bit GEMV of activation row `i` on 256-bit registers: a tile block is eight
/// registers, word `w` of 8 rows each, nibbles masked and looked up with `pshufb`, multiplied
/// with AVX-VNNI's `vpdpbusd` (`w + 128`, as [`tiled4_avx512`]) or `maddubs(|q|, sign(w, q))`;
/// otherwise as [`tiled4_avx512`].
///
/// # Safety
/// As for [`tiled4_avx2`].
#[inline(always)]
unsafe fn tiled4_ymm<const DOT: u8>(t: &Tiled, i: usize, kg: &[f32; TILED_GROUPS]) {
    // SAFETY: as in `tiled4_avx512`.
    unsafe {
        let nib = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let row = t.acts.add(i * t.arb);
        for tile in 0..t.n.div_ceil(ROW_TILE) {
            let tab = _mm_loadu_si128(t.lut.add(16 * t.layout.tile_table(tile)) as *const __m128i);
            let mut tz = _mm256_broadcastsi128_si256(tab);
            if DOT == AVX_VNNI {
                tz = _mm256_xor_si256(tz, _mm256_set1_epi8(-128));
            }
            let base = t.codes.add(tile * t.nb * TILE_BLOCK4);
            let mut acc = [_mm256_setzero_ps(); 2];
            for g in 0..t.gpr {
                let mut f = [_mm256_setzero_ps(); 2];
                for b in g * t.bpg..(g + 1) * t.bpg {
                    let p = base.add(b * TILE_BLOCK4);
                    prefetch_ahead(p, 4096, 0, TILE_BLOCK4);
                    let q = row.add(b * BLOCK);
                    let mut s = [_mm256_setzero_si256(); 2];
                    for w in 0..4 {
                        let word = |o: usize| {
                            _mm256_set1_epi32(core::ptr::read_unaligned(q.add(o) as *const i32))
                        };
                        let qv = [word(4 * w), word(16 + 4 * w)];
                        for (h, sh) in s.iter_mut().enumerate() {
                            let x = _mm256_loadu_si256(p.add(64 * w + 32 * h) as *const __m256i);
                            let wv = [
                                _mm256_shuffle_epi8(tz, _mm256_and_si256(x, nib)),
                                _mm256_shuffle_epi8(
                                    tz,
                                    _mm256_and_si256(_mm256_srli_epi16::<4>(x), nib),
                                ),
                            ];
                            for k in 0..2 {
                                *sh = if DOT == AVX_VNNI {
                                    _mm256_dpbusd_avx_epi32(*sh, wv[k], qv[k])
                                } else {
                                    // A `maddubs` pair is at most 2·127·127: widened at once.
                                    let qa = _mm256_abs_epi8(qv[k]);
                                    let pr =
                                        _mm256_maddubs_epi16(qa, _mm256_sign_epi8(wv[k], qv[k]));
                                    _mm256_add_epi32(*sh, _mm256_madd_epi16(pr, ones))
                                };
                            }
                        }
                    }
                    let d = _mm256_set1_ps(f32_at(row.add(t.kp + 4 * b)));
                    for h in 0..2 {
                        f[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[h]), d, f[h]);
                    }
                }
                let sp = t.scales.add((tile * t.gpr + g) * ROW_TILE * 2);
                let off = _mm256_set1_ps(kg[g]);
                for (h, a) in acc.iter_mut().enumerate() {
                    let sc = _mm256_cvtph_ps(_mm_loadu_si128(sp.add(16 * h) as *const __m128i));
                    *a = _mm256_fmadd_ps(_mm256_add_ps(f[h], off), sc, *a);
                }
            }
            let mut y = [0f32; ROW_TILE];
            for (h, a) in acc.iter().enumerate() {
                _mm256_storeu_ps(y.as_mut_ptr().add(8 * h), *a);
            }
            t.put16(i, tile, &y);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// f32 activations
// ---------------------------------------------------------------------------------------------

/// One call's operands as raw pointers (extents checked in [`qgemm_f32`]).
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

/// Block-quantized weights × f32 activations (see [`super::QGemmF32Fn`]).
pub fn qgemm_f32(w: &QWeights<'_>, g: QGemm<'_>) {
    let l = w.layout;
    if g.m == 0 || l.n == 0 {
        return;
    }
    if !available() || l.row_tiles() {
        return generic::qgemm_f32(w, g);
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
    if g.m >= panel::MIN_ROWS {
        let decode: unsafe fn(&F32, usize, usize, usize, &mut panel::Panel) = match l.bits {
            1 => decode_panel::<1>,
            2 => decode_panel::<2>,
            3 => decode_panel::<3>,
            4 => decode_panel::<4>,
            5 => decode_panel::<5>,
            6 => decode_panel::<6>,
            7 => decode_panel::<7>,
            _ => decode_panel::<8>,
        };
        // SAFETY: the CPU has AVX2, FMA and F16C (checked above); the frame asks for inputs
        // k0..k0 + kc ≤ k of rows it clamps below n, inside the extents `check_q` checked.
        let decode = |j0, k0, kc, p: &mut panel::Panel| unsafe { decode(&cx, j0, k0, kc, p) };
        return panel::qgemm_f32(&gemm::x86_64::KERNEL, (l.n, l.k), decode, g);
    }
    // SAFETY: the CPU has AVX2, FMA and F16C (checked above); every pointer in `cx` addresses
    // the extents checked above, and `c` is borrowed mutably for this call.
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

/// All tiles: 4 weight rows × 1 activation row when `m < 4`, else 1 × 8 (ragged edges repeat
/// the last row, whose extra results are dropped).
///
/// # Safety
/// AVX2, FMA and F16C must be available; `cx` must describe valid extents for `m × n`.
#[target_feature(enable = "avx2,fma,f16c")]
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
            // Activation rows outer: their 8 rows stay in L1 while the weight rows stream by.
            for i in (0..m).step_by(4) {
                for j in (0..n).step_by(2) {
                    f32_tile::<B, 2, 4>(cx, j, n, i, m);
                }
            }
        }
    }
}

/// Decodes weight rows `j0..j0 + 16` (clamped to the last row), inputs `k0..k0 + kc`, into a
/// panel (see [`panel`]): each row's blocks as in [`f32_weights`], times their group scale, then
/// 8 rows × 8 inputs at a time transposed in registers into the panel's rows.
///
/// # Safety
/// AVX2, FMA and F16C must be available; `cx` must describe valid weight extents; `k0` must be
/// a multiple of the block and `k0 + kc ≤ k`, `kc ≤ KC`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn decode_panel<const B: usize>(
    cx: &F32,
    j0: usize,
    k0: usize,
    kc: usize,
    p: &mut panel::Panel,
) {
    // SAFETY: rows are clamped below n and blocks k0/32 .. ⌈(k0 + kc)/32⌉ lie inside each row
    // (k0 + kc ≤ k ≤ Kp); tables and scales of those rows were checked by `check_q`; the
    // stores reach panel row ⌈kc/32⌉·32 − 1 < KC, column 15.
    unsafe {
        let b0 = k0 / BLOCK;
        let out = p.as_mut_ptr();
        for h in 0..gemm::NR / 8 {
            if j0 + 8 * h >= cx.n {
                break;
            }
            let mut tabs: [F16Table; 8] = core::array::from_fn(|_| F16Table {
                lo: _mm256_setzero_si256(),
                hi: _mm256_setzero_si256(),
                f32s: core::mem::MaybeUninit::uninit(),
            });
            let mut cp = [core::ptr::null::<u8>(); 8];
            let mut srow = [core::ptr::null::<u8>(); 8];
            for r in 0..8 {
                let row = (j0 + 8 * h + r).min(cx.n - 1);
                f16_table::<B>(
                    cx.lut.add(table_of(row, cx.rpt, cx.n) * cx.entries * 2),
                    &mut tabs[r],
                );
                cp[r] = cx.codes.add(row * cx.rb + b0 * cx.bb);
                srow[r] = cx.scales.add(row * cx.gpr * 2);
            }
            for b in 0..kc.div_ceil(BLOCK) {
                let mut v = [[_mm256_setzero_ps(); 4]; 8];
                for r in 0..8 {
                    let s = _mm256_set1_ps(f16_at(srow[r], 2 * ((b0 + b) / cx.bpg)));
                    let w = f32_weights::<B>(cp[r].add(b * cx.bb), &tabs[r]);
                    for q in 0..4 {
                        v[r][q] = _mm256_mul_ps(w[q], s);
                    }
                }
                for q in 0..4 {
                    let t = transpose8(core::array::from_fn(|r| v[r][q]));
                    for (e, row) in t.iter().enumerate() {
                        _mm256_storeu_ps(out.add((b * BLOCK + 8 * q + e) * gemm::NR + 8 * h), *row);
                    }
                }
            }
        }
    }
}

/// Transposes 8 vectors of 8: lane `r` of result `e` is lane `e` of input `r`.
#[inline(always)]
unsafe fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
    // SAFETY: register-only AVX operations.
    unsafe {
        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
        let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        [
            _mm256_permute2f128_ps::<0x20>(u0, u4),
            _mm256_permute2f128_ps::<0x20>(u1, u5),
            _mm256_permute2f128_ps::<0x20>(u2, u6),
            _mm256_permute2f128_ps::<0x20>(u3, u7),
            _mm256_permute2f128_ps::<0x31>(u0, u4),
            _mm256_permute2f128_ps::<0x31>(u1, u5),
            _mm256_permute2f128_ps::<0x31>(u2, u6),
            _mm256_permute2f128_ps::<0x31>(u3, u7),
        ]
    }
}

/// A table of f16 values, ready for lookups: for b ≤ 4 its low and high bytes (16 entries,
/// zero-padded) in both lanes; for b ≥ 5 the values as f32.
struct F16Table {
    lo: __m256i,
    hi: __m256i,
    /// The first 2^b entries are written (left uninitialized for b ≤ 4: it is not used).
    f32s: core::mem::MaybeUninit<[f32; 256]>,
}

#[inline(always)]
unsafe fn f16_table<const B: usize>(p: *const u8, t: &mut F16Table) {
    // SAFETY: the caller guarantees the 2^B f16 entries (2^(B+1) bytes) at `p`.
    unsafe {
        let e = 1usize << B;
        if B <= 4 {
            let mut raw = [0u8; 32];
            core::ptr::copy_nonoverlapping(p, raw.as_mut_ptr(), 2 * e);
            let even = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, -1, -1, -1, -1, -1, -1, -1, -1);
            let odd = _mm_setr_epi8(1, 3, 5, 7, 9, 11, 13, 15, -1, -1, -1, -1, -1, -1, -1, -1);
            let v0 = _mm_loadu_si128(raw.as_ptr() as *const __m128i);
            let v1 = _mm_loadu_si128(raw.as_ptr().add(16) as *const __m128i);
            let lo = _mm_unpacklo_epi64(_mm_shuffle_epi8(v0, even), _mm_shuffle_epi8(v1, even));
            let hi = _mm_unpacklo_epi64(_mm_shuffle_epi8(v0, odd), _mm_shuffle_epi8(v1, odd));
            t.lo = _mm256_broadcastsi128_si256(lo);
            t.hi = _mm256_broadcastsi128_si256(hi);
        } else {
            for q in 0..e / 8 {
                let h = _mm_loadu_si128(p.add(16 * q) as *const __m128i);
                _mm256_storeu_ps(
                    (t.f32s.as_mut_ptr() as *mut f32).add(8 * q),
                    _mm256_cvtph_ps(h),
                );
            }
        }
    }
}

/// The 32 weights of one block as four vectors of 8 f32 (elements 0–7, 8–15, 16–23, 24–31).
#[inline(always)]
unsafe fn f32_weights<const B: usize>(cp: *const u8, t: &F16Table) -> [__m256; 4] {
    // SAFETY: the caller guarantees the block's codes at `cp`.
    unsafe {
        let c = natural_codes::<B>(cp);
        if B <= 4 {
            let l = _mm256_shuffle_epi8(t.lo, c);
            let h = _mm256_shuffle_epi8(t.hi, c);
            // Lane 0: elements 0–7 | lane 1: 16–23 (u0); 8–15 | 24–31 (u1).
            let u0 = _mm256_unpacklo_epi8(l, h);
            let u1 = _mm256_unpackhi_epi8(l, h);
            [
                _mm256_cvtph_ps(_mm256_castsi256_si128(u0)),
                _mm256_cvtph_ps(_mm256_castsi256_si128(u1)),
                _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(u0)),
                _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(u1)),
            ]
        } else {
            let mut bytes = [0u8; 32];
            _mm256_storeu_si256(bytes.as_mut_ptr() as *mut __m256i, c);
            let g = |q: usize| {
                let idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64(
                    bytes.as_ptr().add(8 * q) as *const __m128i
                ));
                // Codes are below 2^B: the gather reads only written entries.
                _mm256_i32gather_ps::<4>(t.f32s.as_ptr() as *const f32, idx)
            };
            [g(0), g(1), g(2), g(3)]
        }
    }
}

/// One block of a tile: decode each row's 32 weights (scaled when `scaled`) and multiply
/// them with each activation row (`xp`: the block's 32 activations per row).
#[inline(always)]
unsafe fn f32_step<const B: usize, const NW: usize, const MA: usize>(
    cp: &[*const u8; NW],
    tabs: &[F16Table; NW],
    sv: &[__m256; NW],
    scaled: bool,
    keep: Option<__m256i>,
    xp: &[*const f32; MA],
    acc: &mut [[__m256; MA]; NW],
) {
    // SAFETY: the caller guarantees each row's block codes at `cp` and 32 values at each `xp`.
    unsafe {
        let mut ws = [[_mm256_setzero_ps(); 4]; NW];
        for r in 0..NW {
            let mut w = f32_weights::<B>(cp[r], &tabs[r]);
            for (q, v) in w.iter_mut().enumerate() {
                if scaled {
                    *v = _mm256_mul_ps(*v, sv[r]);
                }
                if let Some(keep) = keep {
                    let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
                    let live = _mm256_cmpgt_epi32(
                        keep,
                        _mm256_add_epi32(lane, _mm256_set1_epi32(8 * q as i32)),
                    );
                    *v = _mm256_and_ps(*v, _mm256_castsi256_ps(live));
                }
            }
            ws[r] = w;
        }
        for i in 0..MA {
            for q in 0..4 {
                let x = _mm256_loadu_ps(xp[i].add(8 * q));
                for r in 0..NW {
                    acc[r][i] = _mm256_fmadd_ps(ws[r][q], x, acc[r][i]);
                }
            }
        }
    }
}

/// A tile of weight rows `j0..j0+NW` × activation rows `i0..i0+MA` (rows at or past `n` / `m`
/// repeat the last one; their results are dropped). Each output sums in one chain, in `k`
/// order of 8-wide vectors, whatever the tile.
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
    // SAFETY (whole body): every pointer below addresses row min(j0 + r, n − 1) of the codes,
    // tables and scales, or activation row min(i0 + i, m − 1) (k values), all checked in
    // `qgemm_f32`; the last, partial block reads activations from a zero-padded local copy.
    unsafe {
        let grouped = cx.gpr > 1;
        let row = |r: usize| (j0 + r).min(n - 1);
        let mut tabs: [F16Table; NW] = core::array::from_fn(|_| F16Table {
            lo: _mm256_setzero_si256(),
            hi: _mm256_setzero_si256(),
            f32s: core::mem::MaybeUninit::uninit(),
        });
        let mut cp = [core::ptr::null::<u8>(); NW];
        let mut srow = [core::ptr::null::<u8>(); NW];
        for r in 0..NW {
            f16_table::<B>(
                cx.lut.add(table_of(row(r), cx.rpt, cx.n) * cx.entries * 2),
                &mut tabs[r],
            );
            cp[r] = cx.codes.add(row(r) * cx.rb);
            srow[r] = cx.scales.add(row(r) * cx.gpr * 2);
        }
        let mut xp = [core::ptr::null::<f32>(); MA];
        for i in 0..MA {
            xp[i] = cx.a.add((i0 + i).min(m - 1) * cx.a_rs);
        }
        let mut acc = [[_mm256_setzero_ps(); MA]; NW];
        let mut sv = [_mm256_set1_ps(1.0); NW];
        let full = cx.k / BLOCK;
        let mut b = 0;
        while b < full {
            // One group (or what is left of the full blocks) at a time.
            let end = if grouped {
                for r in 0..NW {
                    sv[r] = _mm256_set1_ps(f16_at(srow[r], 2 * (b / cx.bpg)));
                }
                ((b / cx.bpg + 1) * cx.bpg).min(full)
            } else {
                full
            };
            while b < end {
                if MA == 1 {
                    prefetch_ahead(
                        cx.codes,
                        (j0 + NW * gemv_ahead(NW * cx.rb)) * cx.rb,
                        b * NW * cx.bb,
                        NW * cx.bb,
                    );
                }
                f32_step::<B, NW, MA>(&cp, &tabs, &sv, grouped, None, &xp, &mut acc);
                for p in cp.iter_mut() {
                    *p = p.add(cx.bb);
                }
                for p in xp.iter_mut() {
                    *p = p.add(BLOCK);
                }
                b += 1;
            }
        }
        if full < cx.nb {
            // The last, partial block: activations from a zero-padded copy, weights past k
            // zeroed (their codes are padding).
            let valid = cx.k - full * BLOCK;
            let mut xbuf = [[0f32; BLOCK]; MA];
            for i in 0..MA {
                core::ptr::copy_nonoverlapping(xp[i], xbuf[i].as_mut_ptr(), valid);
                xp[i] = xbuf[i].as_ptr();
            }
            if grouped {
                for r in 0..NW {
                    sv[r] = _mm256_set1_ps(f16_at(srow[r], 2 * (full / cx.bpg)));
                }
            }
            let keep = Some(_mm256_set1_epi32(valid as i32));
            f32_step::<B, NW, MA>(&cp, &tabs, &sv, grouped, keep, &xp, &mut acc);
        }
        for r in 0..NW {
            let j = j0 + r;
            if j >= n {
                break;
            }
            let f = if grouped { 1.0 } else { f16_at(srow[r], 0) };
            for i in 0..MA {
                if i0 + i < m {
                    cx.out.put(i0 + i, j, hsum(acc[r][i]) * f);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// N:M sparse
// ---------------------------------------------------------------------------------------------

/// One call's operands as raw pointers (extents checked in [`sparse_gemm`]).
struct Sp {
    vals: *const u8,
    pos: *const u8,
    per_row: usize,
    pos_row_bytes: usize,
    keep: usize,
    m: usize,
    pos_bits: usize,
    a: *const f32,
    a_rs: usize,
    out: Out,
}

/// N:M sparse weights × f32 activations (see [`super::SparseGemmFn`]).
pub fn sparse_gemm(w: &SparseWeights<'_>, g: QGemm<'_>) {
    let l = w.layout;
    let fast = matches!(l.keep, 1 | 2 | 4 | 8);
    if g.m == 0 || l.n == 0 {
        return;
    }
    if !available() || !fast {
        return generic::sparse_gemm(w, g);
    }
    let per_row = l.per_row();
    assert!(
        l.n * per_row * 2 <= l.pos_off && l.pos_off + l.n * l.pos_row_bytes <= w.bytes.len(),
        "sparse: weight bytes too short"
    );
    assert!(
        l.pos_row_bytes * 8 >= per_row * l.pos_bits && l.k == l.k / l.m * l.m,
        "sparse: inconsistent layout"
    );
    check_out(g.m, l.n, g.c, g.c_rs, g.c_cs, g.bias);
    assert!((g.m - 1) * g.a_rs + l.k <= g.a.len(), "sparse: A too short");
    let cx = Sp {
        vals: w.bytes.as_ptr(),
        pos: w.bytes[l.pos_off..].as_ptr(),
        per_row,
        pos_row_bytes: l.pos_row_bytes,
        keep: l.keep,
        m: l.m,
        pos_bits: l.pos_bits,
        a: g.a.as_ptr(),
        a_rs: g.a_rs,
        out: Out::new(g.c, g.c_rs, g.c_cs, g.bias, g.act),
    };
    if l.keep == 2 && l.m == 4 && g.m >= panel::MIN_ROWS {
        // SAFETY: the CPU has AVX2, FMA and F16C (checked above); the frame asks for inputs
        // k0..k0 + kc ≤ k of rows it clamps below n, inside the extents checked above.
        let decode =
            |j0, k0, kc, p: &mut panel::Panel| unsafe { decode_panel_2_4(&cx, l.n, j0, k0, kc, p) };
        return panel::qgemm_f32(&gemm::x86_64::KERNEL, (l.n, l.k), decode, g);
    }
    // SAFETY: the CPU has AVX2, FMA and F16C (checked above); every pointer in `cx` addresses
    // the extents checked above, and `c` is borrowed mutably for this call.
    unsafe {
        if l.keep == 2 && l.m == 4 {
            sparse_run::<true>(&cx, g.m, l.n)
        } else {
            sparse_run::<false>(&cx, g.m, l.n)
        }
    }
}

/// Decodes 2:4 weight rows `j0..j0 + 16` (clamped to the last row), inputs `k0..k0 + kc`,
/// into a panel: per row, 8 values and their 16 position bits become 16 dense inputs (each
/// value moved to its position with `vpermps`, masked by a compare), transposed 8 × 8 into the
/// panel; a ragged end of fewer than 16 inputs is placed one value at a time.
///
/// # Safety
/// AVX2, FMA and F16C must be available; `cx` must describe a valid 2:4 weight of `n` rows;
/// `k0` must be a multiple of 16, `k0 + kc ≤ k`, `kc ≤ KC`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn decode_panel_2_4(
    cx: &Sp,
    n: usize,
    j0: usize,
    k0: usize,
    kc: usize,
    p: &mut panel::Panel,
) {
    // SAFETY: rows are clamped below n; inputs k0..k0 + kc < k are values k0/2.. and position
    // bytes k0/8.. of each row, inside the extents `sparse_gemm` checked; the stores reach panel
    // row kc − 1 < KC, column 15.
    unsafe {
        let out = p.as_mut_ptr();
        let shifts = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
        let three = _mm256_set1_epi32(3);
        let in_group = _mm256_setr_epi32(0, 1, 2, 3, 0, 1, 2, 3);
        // Dense inputs 8q..8q + 8 hold groups 2q and 2q + 1: each lane may take the first or the
        // second value of its group (values 4q + {0, 1} and 4q + {2, 3}).
        let picks = [
            (
                _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2),
                _mm256_setr_epi32(1, 1, 1, 1, 3, 3, 3, 3),
            ),
            (
                _mm256_setr_epi32(4, 4, 4, 4, 6, 6, 6, 6),
                _mm256_setr_epi32(5, 5, 5, 5, 7, 7, 7, 7),
            ),
        ];
        for h in 0..gemm::NR / 8 {
            if j0 + 8 * h >= n {
                break;
            }
            let mut vp = [core::ptr::null::<u8>(); 8];
            let mut pp = [core::ptr::null::<u8>(); 8];
            for r in 0..8 {
                let row = (j0 + 8 * h + r).min(n - 1);
                vp[r] = cx.vals.add(row * cx.per_row * 2 + k0);
                pp[r] = cx.pos.add(row * cx.pos_row_bytes + k0 / 8);
            }
            let full = kc / 16;
            for c in 0..full {
                let mut d = [[_mm256_setzero_ps(); 8]; 2];
                for r in 0..8 {
                    let vals =
                        _mm256_cvtph_ps(_mm_loadu_si128(vp[r].add(16 * c) as *const __m128i));
                    let bits = u16::from_le_bytes([*pp[r].add(2 * c), *pp[r].add(2 * c + 1)]);
                    let pos = _mm256_and_si256(
                        _mm256_srlv_epi32(_mm256_set1_epi32(bits as i32), shifts),
                        three,
                    );
                    for (q, &(ia, ib)) in picks.iter().enumerate() {
                        let at = |i: __m256i| {
                            let hit =
                                _mm256_cmpeq_epi32(_mm256_permutevar8x32_epi32(pos, i), in_group);
                            _mm256_and_ps(
                                _mm256_permutevar8x32_ps(vals, i),
                                _mm256_castsi256_ps(hit),
                            )
                        };
                        // Added, so that two values at one position sum as in the reference.
                        d[q][r] = _mm256_add_ps(at(ia), at(ib));
                    }
                }
                for (q, rows) in d.iter().enumerate() {
                    for (e, v) in transpose8(*rows).iter().enumerate() {
                        _mm256_storeu_ps(out.add((16 * c + 8 * q + e) * gemm::NR + 8 * h), *v);
                    }
                }
            }
            for kk in 16 * full..kc {
                for r in 0..8 {
                    let (g, at) = ((kk / 4) * 2, kk % 4);
                    let mut v = 0.0;
                    for i in g..g + 2 {
                        if (*pp[r].add(i / 4) >> (2 * (i % 4))) & 3 == at as u8 {
                            v += f16_at(vp[r], 2 * i);
                        }
                    }
                    *out.add(kk * gemm::NR + 8 * h + r) = v;
                }
            }
        }
    }
}

/// All tiles: 2 weight rows × 1 activation row when `m < 4`, else 1 × 4.
///
/// # Safety
/// AVX2, FMA and F16C must be available; `cx` must describe valid extents for `m × n`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn sparse_run<const TWO_FOUR: bool>(cx: &Sp, m: usize, n: usize) {
    // SAFETY: every tile lies inside the m × n product (rows past the edges are clamped).
    unsafe {
        if m < 4 {
            for i in 0..m {
                for j in (0..n).step_by(2) {
                    sparse_tile::<TWO_FOUR, 2, 1>(cx, j, n, i, m);
                }
            }
        } else {
            for i in (0..m).step_by(4) {
                for j in 0..n {
                    sparse_tile::<TWO_FOUR, 1, 4>(cx, j, n, i, m);
                }
            }
        }
    }
}

/// A tile of weight rows `j0..j0+NW` × activation rows `i0..i0+MA` (rows past `n` / `m`
/// repeat the last one; their results are dropped). Every output sums 8 values at a time in
/// one chain, then the ragged end in storage order.
///
/// # Safety
/// As for [`sparse_run`], with `j0 < n` and `i0 < m`.
#[inline(always)]
unsafe fn sparse_tile<const TWO_FOUR: bool, const NW: usize, const MA: usize>(
    cx: &Sp,
    j0: usize,
    n: usize,
    i0: usize,
    m: usize,
) {
    // SAFETY (whole body): values, positions and activations are read for rows
    // min(j0 + r, n − 1) and min(i0 + i, m − 1) only, at chunk c < per_row / 8 (8 values,
    // 16 bits of positions per 8·pos_bits bits, inputs below the chunk's last group), or value
    // v < per_row in the scalar tail; all inside the extents checked in `sparse_gemm`.
    unsafe {
        let row = |r: usize| (j0 + r).min(n - 1);
        let mut vp = [core::ptr::null::<u8>(); NW];
        let mut pp = [core::ptr::null::<u8>(); NW];
        for r in 0..NW {
            vp[r] = cx.vals.add(row(r) * cx.per_row * 2);
            pp[r] = cx.pos.add(row(r) * cx.pos_row_bytes);
        }
        let mut xp = [core::ptr::null::<f32>(); MA];
        for i in 0..MA {
            xp[i] = cx.a.add((i0 + i).min(m - 1) * cx.a_rs);
        }
        let mut acc = [[_mm256_setzero_ps(); MA]; NW];
        let chunks = cx.per_row / 8;
        // Inputs per chunk of 8 values, and each lane's group offset.
        let span = 8 / cx.keep * cx.m;
        let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let group_of = _mm256_mullo_epi32(
            _mm256_srlv_epi32(lane, _mm256_set1_epi32(cx.keep.trailing_zeros() as i32)),
            _mm256_set1_epi32(cx.m as i32),
        );
        let pb = cx.pos_bits;
        let shifts = _mm256_mullo_epi32(lane, _mm256_set1_epi32(pb as i32));
        let mask = _mm256_set1_epi32((1 << pb) - 1);
        for c in 0..chunks {
            let mut vals = [_mm256_setzero_ps(); NW];
            let mut idx = [_mm256_setzero_si256(); NW];
            for r in 0..NW {
                vals[r] = _mm256_cvtph_ps(_mm_loadu_si128(vp[r].add(16 * c) as *const __m128i));
                let bits = if TWO_FOUR {
                    u16::from_le_bytes([*pp[r].add(2 * c), *pp[r].add(2 * c + 1)]) as i32
                } else {
                    let mut b = [0u8; 4];
                    core::ptr::copy_nonoverlapping(pp[r].add(pb * c), b.as_mut_ptr(), pb);
                    i32::from_le_bytes(b)
                };
                // 2:4 needs no mask: `vpermilps` reads the low two bits of each index.
                idx[r] = _mm256_srlv_epi32(_mm256_set1_epi32(bits), shifts);
                if !TWO_FOUR {
                    idx[r] = _mm256_add_epi32(_mm256_and_si256(idx[r], mask), group_of);
                }
            }
            for i in 0..MA {
                let x = xp[i].add(c * span);
                if TWO_FOUR {
                    let (x0, x1) = (_mm256_loadu_ps(x), _mm256_loadu_ps(x.add(8)));
                    let xa = _mm256_permute2f128_ps::<0x20>(x0, x1); // groups 0 | 2
                    let xb = _mm256_permute2f128_ps::<0x31>(x0, x1); // groups 1 | 3
                    for r in 0..NW {
                        let ga = _mm256_permutevar_ps(xa, idx[r]);
                        let gb = _mm256_permutevar_ps(xb, idx[r]);
                        let g = _mm256_blend_ps::<0b1100_1100>(ga, gb);
                        acc[r][i] = _mm256_fmadd_ps(vals[r], g, acc[r][i]);
                    }
                } else {
                    for r in 0..NW {
                        let g = _mm256_i32gather_ps::<4>(x, idx[r]);
                        acc[r][i] = _mm256_fmadd_ps(vals[r], g, acc[r][i]);
                    }
                }
            }
        }
        for r in 0..NW {
            let j = j0 + r;
            if j >= n {
                break;
            }
            for i in 0..MA {
                if i0 + i >= m {
                    continue;
                }
                let mut v = hsum(acc[r][i]);
                for k in chunks * 8..cx.per_row {
                    let bit = k * pb;
                    let word = *pp[r].add(bit / 8) as u32
                        | if (bit + pb).div_ceil(8) > bit / 8 + 1 {
                            (*pp[r].add(bit / 8 + 1) as u32) << 8
                        } else {
                            0
                        };
                    let p = (word >> (bit % 8)) as usize & ((1 << pb) - 1);
                    let col = k / cx.keep * cx.m + p;
                    v += *xp[i].add(col) * f16_at(vp[r], 2 * k);
                }
                cx.out.put(i0 + i, j, v);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Activation quantization
// ---------------------------------------------------------------------------------------------

/// [`super::quantize_q8`] with AVX2: the same bytes (round half away from zero, NaN to 0,
/// clamp to ±127), 32 values at a time.
pub fn quantize_q8(x: &[f32], out: &mut [u8]) {
    if !available() {
        return super::quantize_q8(x, out);
    }
    let k = x.len();
    let nb = k.div_ceil(BLOCK);
    assert!(
        out.len() >= nb * BLOCK + nb * 4,
        "quantize_q8: output too short"
    );
    // SAFETY: the CPU has AVX2 and FMA (checked above); `out` holds the codes and scales.
    unsafe { quantize_avx2(x, out) }
}

/// # Safety
/// AVX2 must be available; `out` must hold `Kp + Kp/32·4` bytes for `x.len()` values.
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_avx2(x: &[f32], out: &mut [u8]) {
    let k = x.len();
    let nb = k.div_ceil(BLOCK);
    let (codes, scales) = out.split_at_mut(nb * BLOCK);
    let sign = _mm256_set1_ps(-0.0);
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
        // SAFETY: `p` points to 32 values (the block or its zero-padded copy); the store writes
        // block j's 32 codes, inside `codes`.
        let d = unsafe {
            let v: [__m256; 4] = core::array::from_fn(|q| _mm256_loadu_ps(p.add(8 * q)));
            // max|x|, skipping NaN as `f32::max` does (`maxps` returns its second operand
            // when either is NaN).
            let mut m = _mm256_setzero_ps();
            for &vq in &v {
                m = _mm256_max_ps(_mm256_andnot_ps(sign, vq), m);
            }
            let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
            let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            let amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_movehdup_ps(m2)));
            let d = amax / 127.0;
            let inv = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
            let q: [__m256i; 4] = core::array::from_fn(|i| {
                let y = _mm256_mul_ps(v[i], inv);
                // Round half away from zero: truncate, then step away from zero when the
                // (exact) remainder is at least one half.
                let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(y);
                let far = _mm256_cmp_ps::<_CMP_GE_OQ>(
                    _mm256_andnot_ps(sign, _mm256_sub_ps(y, t)),
                    _mm256_set1_ps(0.5),
                );
                let step = _mm256_and_ps(
                    far,
                    _mm256_or_ps(_mm256_and_ps(y, sign), _mm256_set1_ps(1.0)),
                );
                let r = _mm256_add_ps(t, step);
                // NaN becomes 0 (as `as i32` does), then the clamp.
                let r = _mm256_and_ps(r, _mm256_cmp_ps::<_CMP_ORD_Q>(y, y));
                let r = _mm256_min_ps(
                    _mm256_max_ps(r, _mm256_set1_ps(-127.0)),
                    _mm256_set1_ps(127.0),
                );
                _mm256_cvttps_epi32(r)
            });
            let ab = _mm256_packs_epi32(q[0], q[1]);
            let cd = _mm256_packs_epi32(q[2], q[3]);
            let bytes = _mm256_permutevar8x32_epi32(
                _mm256_packs_epi16(ab, cd),
                _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7),
            );
            _mm256_storeu_si256(codes.as_mut_ptr().add(j * BLOCK) as *mut __m256i, bytes);
            d
        };
        scales[4 * j..4 * j + 4].copy_from_slice(&d.to_le_bytes());
    }
}

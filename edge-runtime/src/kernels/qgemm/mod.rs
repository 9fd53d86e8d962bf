//! Products with compressed weights: `C = act(A · Wᵀ + bias)` where `W` (`[N, K]`) stays in its
//! block-quantized or N:M sparse bytes — no f32 copy of a weight is ever made.
//!
//! Activations `A` are rows contiguous in K (dense inputs, or an im2col tile); `C` is addressed
//! through row and column strides like the f32 GEMM's. Two block-quantized paths:
//! - f32 activations: codes are looked up in the f16 table and multiplied in f32;
//! - int8 activations (the weight's flag): each activation row is quantized per block of 32
//!   ([`quantize_q8`]) and multiplied with the int8 table in integer arithmetic.
//!
//! [`generic`] defines the results; fast paths are chosen in [`crate::kernels::Kernels`]. With
//! the `std` feature and a thread budget above 1, large products are split over the current
//! rayon pool (bit-identical to one thread).

use edgetune_core::layout::{QBlockLayout, SparseLayout, BLOCK};
use edgetune_core::Activation;

#[cfg(target_arch = "aarch64")]
pub mod aarch64;
pub mod generic;
pub mod panel;
#[cfg(feature = "std")]
mod par;
#[cfg(target_arch = "x86_64")]
pub mod x86_64;

/// A block-quantized weight: its layout and bytes.
#[derive(Debug, Clone, Copy)]
pub struct QWeights<'a> {
    /// Layout.
    pub layout: QBlockLayout,
    /// The encoded bytes.
    pub bytes: &'a [u8],
}

impl QWeights<'_> {
    /// Code bytes of block `b` of row `n` (the first `block_bytes()`).
    pub fn block(&self, n: usize, b: usize) -> [u8; 32] {
        self.layout.read_block(self.bytes, n, b)
    }

    /// f16 table entry `code` of table `t`, as bits.
    pub fn lut_f16(&self, t: usize, code: usize) -> u16 {
        let o = self.layout.lut_off + (t * self.layout.entries() + code) * 2;
        u16::from_le_bytes([self.bytes[o], self.bytes[o + 1]])
    }

    /// The int8 table `t`.
    pub fn lut_i8(&self, t: usize) -> &[u8] {
        let e = self.layout.entries();
        &self.bytes[self.layout.lut_i8_off + t * e..self.layout.lut_i8_off + (t + 1) * e]
    }

    /// Scale of the int8 table `t`.
    pub fn lut_scale(&self, t: usize) -> f32 {
        let o = self.layout.lut_scale_off + t * 4;
        f32::from_le_bytes([
            self.bytes[o],
            self.bytes[o + 1],
            self.bytes[o + 2],
            self.bytes[o + 3],
        ])
    }

    /// `(α, β)` when the weight has one int8 table and it is affine, `lut_i8[c] = α·c + β`
    /// (int4, int2 and ternary tables): kernels then need no table lookups.
    pub fn affine_i8(&self) -> Option<(i32, i32)> {
        let t0 = self.lut_i8(0);
        if self.layout.tables != 1 || t0.len() < 2 {
            return None;
        }
        let (a, b) = (t0[1] as i8 as i32 - t0[0] as i8 as i32, t0[0] as i8 as i32);
        t0.iter()
            .enumerate()
            .all(|(c, &v)| v as i8 as i32 == a * c as i32 + b)
            .then_some((a, b))
    }

    /// Group scale of row `n`, group `g`, as f16 bits.
    pub fn scale_f16(&self, n: usize, g: usize) -> u16 {
        let o = self.layout.scale_offset(n, g);
        u16::from_le_bytes([self.bytes[o], self.bytes[o + 1]])
    }
}

/// Decodes row `n` (`out.len()` = K values): how a gather reads one row of a block-quantized
/// embedding table without expanding the rest.
pub fn decode_row(w: &QWeights<'_>, n: usize, out: &mut [f32]) {
    let l = w.layout;
    let t = n / l.rows_per_table;
    let mut lut = [0f32; 256];
    for (c, v) in lut.iter_mut().enumerate().take(l.entries()) {
        *v = half::f16::from_bits(w.lut_f16(t, c)).to_f32();
    }
    for (kk, o) in out.iter_mut().enumerate().take(l.k) {
        let (b, e) = (kk / BLOCK, kk % BLOCK);
        let code = edgetune_core::layout::block_code(&w.block(n, b), l.bits, e);
        *o = lut[code as usize] * half::f16::from_bits(w.scale_f16(n, kk / l.group)).to_f32();
    }
}

/// An N:M sparse weight: its layout and bytes.
#[derive(Debug, Clone, Copy)]
pub struct SparseWeights<'a> {
    /// Layout.
    pub layout: SparseLayout,
    /// The encoded bytes.
    pub bytes: &'a [u8],
}

/// Operands of one product with compressed weights.
#[derive(Debug)]
pub struct QGemm<'a> {
    /// Activation rows.
    pub m: usize,
    /// `A`: row `i` is `a[i·a_rs .. i·a_rs + k]`.
    pub a: &'a [f32],
    /// Row stride of `A`.
    pub a_rs: usize,
    /// `C`, addressed `c[i·c_rs + j·c_cs]`.
    pub c: &'a mut [f32],
    /// Row stride of `C`.
    pub c_rs: usize,
    /// Column stride of `C`.
    pub c_cs: usize,
    /// Optional per-output bias.
    pub bias: Option<&'a [f32]>,
    /// Activation applied to every output.
    pub act: Activation,
}

/// Bytes of one int8-quantized activation row of `k` inputs (`Kp` i8 then `Kp/32` f32 scales).
pub fn q8_row_bytes(k: usize) -> usize {
    edgetune_core::ops::q8_row_bytes(k as u64) as usize
}

/// Groups per row whose activation offsets ([`tiled_offsets`]) the row-tiled kernels keep on
/// the stack; weights with longer rows run the reference.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const TILED_GROUPS: usize = 512;

/// Bytes of one block of a row tile of 2-bit codes: 16 rows × 8 bytes.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const TILE_BLOCK: usize = edgetune_core::layout::ROW_TILE * 8;

/// Bytes of one block of a row tile of 4-bit codes: 16 rows × 16 bytes.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const TILE_BLOCK4: usize = edgetune_core::layout::ROW_TILE * 16;

/// `β · Σ_{b ∈ g} d_b · Σ q_b` for every group of `bpg` blocks of one int8 activation row
/// (`kp` codes, then `kp / 32` f32 scales): the part of each output of an affine table
/// (`lut_i8[c] = α·c + β`) that depends on the activations only.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn tiled_offsets(row: &[u8], kp: usize, bpg: usize, beta: f32, kg: &mut [f32]) {
    let (q, ds) = row.split_at(kp);
    for (g, o) in kg.iter_mut().enumerate() {
        let mut s = 0.0f32;
        for b in g * bpg..(g + 1) * bpg {
            let qs: i32 = q[b * BLOCK..(b + 1) * BLOCK]
                .iter()
                .map(|&v| v as i8 as i32)
                .sum();
            s += f32::from_le_bytes(ds[4 * b..4 * b + 4].try_into().unwrap()) * qs as f32;
        }
        *o = beta * s;
    }
}

/// Quantizes one activation row to int8 per block of 32: `d = max|x| / 127`,
/// `q = round(x / d)`; the tail past `k` is zero.
pub fn quantize_q8(x: &[f32], out: &mut [u8]) {
    let k = x.len();
    let kp = k.div_ceil(BLOCK) * BLOCK;
    let (codes, scales) = out.split_at_mut(kp);
    for (j, d_out) in scales.chunks_exact_mut(4).take(kp / BLOCK).enumerate() {
        let block = &x[j * BLOCK..((j + 1) * BLOCK).min(k)];
        let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        for e in 0..BLOCK {
            let v = block.get(e).copied().unwrap_or(0.0);
            codes[j * BLOCK + e] = (libm::roundf(v * inv) as i32).clamp(-127, 127) as i8 as u8;
        }
        d_out.copy_from_slice(&d.to_le_bytes());
    }
}

/// Checks the operand extents (callers derive them from a validated model: a failure is a bug).
fn check(g: &QGemm<'_>, n: usize, k: usize) {
    if g.m == 0 {
        return;
    }
    assert!((g.m - 1) * g.a_rs + k <= g.a.len(), "qgemm: A too short");
    assert!(
        (g.m - 1) * g.c_rs + (n - 1) * g.c_cs < g.c.len(),
        "qgemm: C too short"
    );
    assert!(g.bias.is_none_or(|b| b.len() >= n), "qgemm: bias too short");
}

/// `C = act(A · Wᵀ + bias)` for a block-quantized `W` with f32 activations.
pub fn qgemm_f32(kernels: &crate::kernels::Kernels, w: &QWeights<'_>, g: QGemm<'_>) {
    check(&g, w.layout.n, w.layout.k);
    #[cfg(feature = "std")]
    let Some(g) = par::qgemm_f32(
        kernels,
        (
            w.layout.n,
            w.layout.k,
            w.layout.rows_per_table,
            w.column_pieces(),
        ),
        w,
        par::q_view,
        |w, g| (kernels.qgemm_f32)(w, g),
        g,
    ) else {
        return;
    };
    (kernels.qgemm_f32)(w, g)
}

/// `C = act(A · Wᵀ + bias)` for a block-quantized `W` with int8 activations; `scratch` holds
/// `min(m, Q8_CHUNK_ROWS)` quantized rows.
pub fn qgemm_q8(
    kernels: &crate::kernels::Kernels,
    w: &QWeights<'_>,
    g: QGemm<'_>,
    scratch: &mut [u8],
) {
    check(&g, w.layout.n, w.layout.k);
    let QGemm {
        m,
        a,
        a_rs,
        c,
        c_rs,
        c_cs,
        bias,
        act,
    } = g;
    let k = w.layout.k;
    let rb = q8_row_bytes(k);
    let chunk = (scratch.len() / rb).min(m).max(1);
    assert!(scratch.len() >= chunk * rb, "qgemm: scratch too small");
    let mut i0 = 0;
    while i0 < m {
        let rows = chunk.min(m - i0);
        for r in 0..rows {
            let x = &a[(i0 + r) * a_rs..(i0 + r) * a_rs + k];
            (kernels.quantize_q8)(x, &mut scratch[r * rb..(r + 1) * rb]);
        }
        #[cfg(feature = "std")]
        let threaded = par::qgemm_q8(
            kernels,
            w,
            &scratch[..rows * rb],
            rows,
            &mut c[i0 * c_rs..],
            c_rs,
            c_cs,
            bias,
            act,
        );
        #[cfg(not(feature = "std"))]
        let threaded = false;
        if !threaded {
            (kernels.qgemm_q8)(
                w,
                &scratch[..rows * rb],
                rows,
                &mut c[i0 * c_rs..],
                c_rs,
                c_cs,
                bias,
                act,
            );
        }
        i0 += rows;
    }
}

/// `C = act(A · Wᵀ + bias)` for an N:M sparse `W`.
pub fn sparse_gemm(kernels: &crate::kernels::Kernels, w: &SparseWeights<'_>, g: QGemm<'_>) {
    check(&g, w.layout.n, w.layout.k);
    #[cfg(feature = "std")]
    let Some(g) = par::qgemm_f32(
        kernels,
        (w.layout.n, w.layout.k, 1, true),
        w,
        par::sparse_view,
        |w, g| (kernels.sparse_gemm)(w, g),
        g,
    ) else {
        return;
    };
    (kernels.sparse_gemm)(w, g)
}

/// Signature of an f32-activation block-quantized kernel.
pub type QGemmF32Fn = fn(&QWeights<'_>, QGemm<'_>);
/// Signature of an int8-activation block-quantized kernel: weights, quantized rows, row count,
/// `C` (from the first row), its strides, bias, activation.
pub type QGemmQ8Fn =
    fn(&QWeights<'_>, &[u8], usize, &mut [f32], usize, usize, Option<&[f32]>, Activation);
/// Signature of a sparse kernel.
pub type SparseGemmFn = fn(&SparseWeights<'_>, QGemm<'_>);

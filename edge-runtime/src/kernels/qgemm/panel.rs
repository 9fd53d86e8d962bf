//! Products with many activation rows and f32 activations: a panel of [`NR`] weight rows ×
//! [`KC`] inputs is decoded once into a stack buffer in the f32 GEMM's packed layout, and the
//! f32 micro-kernel runs every activation row over it.
//!
//! Decoding costs about as much as a handful of multiply-adds per weight, which a GEMV cannot
//! amortize (the per-tile kernels decode straight into registers there) but a product with
//! [`MIN_ROWS`] or more rows can: the work per weight becomes the f32 GEMM's. The decoded panel
//! is 16 KiB of f32, a tile of the weight, never the matrix.
//!
//! Row tiles are the micro-kernel's `mr` rows from the start of the product, so a product cut
//! into row pieces of a multiple of 12 rows (the threaded frame) tiles its rows exactly as the
//! whole product does and gives the same bits.

use super::QGemm;
use crate::kernels::gemm::{GemmKernel, Tile, NR};
use crate::math;

/// Activation rows from which the fast kernels decode panels instead of tiles.
pub const MIN_ROWS: usize = 8;

/// Inputs per decoded panel (a whole number of 32-input blocks).
pub const KC: usize = 256;

/// A decoded panel: `KC` rows of [`NR`] weights, `panel[kk·NR + j]` = weight row `j0 + j`,
/// input `k0 + kk`.
pub type Panel = [f32; KC * NR];

/// Tallest micro-kernel tile the frame supports.
const MAX_MR: usize = 8;

/// Activation rows whose panels are decoded once (they stay in cache while the panels pass; a
/// multiple of the kernels' 4- and 6-row tiles).
const MC: usize = 96;

/// `C = act(A · Wᵀ + bias)` for an `n × k` weight read through `decode(j0, k0, kc, panel)`,
/// which writes weight rows `j0..j0 + NR` (rows at or past `n` may hold anything) and inputs
/// `k0..k0 + kc` (`k0` a multiple of [`KC`]) into `panel`.
///
/// The first panel of inputs is written straight into `C` (with the bias), later ones go
/// through a tile buffer and are added; the activation is applied after the last.
///
/// Panics if the operands are shorter than their extents (a bug in the caller).
pub fn qgemm_f32(
    gemm: &GemmKernel,
    (n, k): (usize, usize),
    mut decode: impl FnMut(usize, usize, usize, &mut Panel),
    g: QGemm<'_>,
) {
    if g.m == 0 || n == 0 {
        return;
    }
    super::check(&g, n, k);
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
    let mr = gemm.mr;
    assert!(
        (1..=MAX_MR).contains(&mr),
        "qgemm: micro-kernel tile height"
    );
    let mut panel: Panel = [0.0; KC * NR];
    let mut tile = [0f32; MAX_MR * NR];
    let identity = act.is_identity();
    for i0 in (0..m).step_by(MC) {
        let mc = MC.min(m - i0);
        for k0 in (0..k).step_by(KC) {
            let kc = KC.min(k - k0);
            let (first, last) = (k0 == 0, k0 + kc == k);
            for j0 in (0..n).step_by(NR) {
                let cols = NR.min(n - j0);
                decode(j0, k0, kc, &mut panel);
                for t0 in (0..mc).step_by(mr) {
                    let i = i0 + t0;
                    let rows = mr.min(mc - t0);
                    let out = i * c_rs + j0 * c_cs;
                    let t = Tile {
                        k: kc,
                        a: a[i * a_rs + k0..].as_ptr(),
                        a_rs,
                        a_cs: 1,
                        rows,
                        b: panel.as_ptr(),
                        // The first inputs go straight to C, the rest through the tile buffer.
                        c: if first {
                            c.as_mut_ptr().wrapping_add(out)
                        } else {
                            tile.as_mut_ptr()
                        },
                        c_rs: if first { c_rs } else { NR },
                        c_cs: if first { c_cs } else { 1 },
                        cols,
                        bias: match bias {
                            Some(b) if first => b[j0..].as_ptr(),
                            _ => core::ptr::null(),
                        },
                    };
                    // SAFETY: rows i..i + rows of A hold inputs k0..k0 + kc (checked above:
                    // (m − 1)·a_rs + k ≤ a.len()); the panel holds KC ≥ kc rows of NR; outputs
                    // (i + r, j0 + j) for r < rows, j < cols lie in C (checked above), and the
                    // tile buffer holds rows ≤ MAX_MR rows of NR; the bias holds j0 + cols ≤ n.
                    unsafe { (gemm.ukr)(&t) };
                    if !first {
                        for r in 0..rows {
                            let sum = &tile[r * NR..r * NR + cols];
                            let o = out + r * c_rs;
                            if c_cs == 1 {
                                for (y, v) in c[o..o + cols].iter_mut().zip(sum) {
                                    *y += v;
                                }
                            } else {
                                for (j, v) in sum.iter().enumerate() {
                                    c[o + j * c_cs] += v;
                                }
                            }
                        }
                    }
                    if last && !identity {
                        for r in 0..rows {
                            for j in 0..cols {
                                let y = &mut c[out + r * c_rs + j * c_cs];
                                *y = math::apply(&act, *y);
                            }
                        }
                    }
                }
            }
        }
    }
}

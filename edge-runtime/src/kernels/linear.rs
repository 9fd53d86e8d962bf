//! Fully-connected layers and batched products of activations, on the GEMM frame.

use edgetune_core::ops::MatMul;
use edgetune_core::{Activation, Shape, MAX_RANK};

use super::gemm::{gemm_f16_with_threads, gemm_with_threads, pack_b, Gemm, GemmF16};
use super::qgemm::{self, QGemm, QWeights, SparseWeights};
use super::Kernels;
use crate::math;

/// A `[N, K]` weight as stored, in any of the weight encodings.
#[derive(Debug, Clone, Copy)]
pub enum Weights<'a> {
    /// f32 in GEMM panels.
    Panel(&'a [f32]),
    /// f16 in GEMM panels (bits).
    PanelF16(&'a [u16]),
    /// Row-major f32.
    Plain(&'a [f32]),
    /// Block-quantized codes.
    Quantized(QWeights<'a>),
    /// N:M sparse.
    Sparse(SparseWeights<'a>),
    /// Block-quantized codes with an adapter's tables or scales (training).
    Adapted(crate::adapter::AdaptedQ<'a>),
}

/// One product `C = act(A · Wᵀ + bias)` with `A` `[m, k]` (`a[i·a_rs + kk·a_cs]`) and `C`
/// `[m, n]` (`c[i·c_rs + j·c_cs]`). Compressed weights need `a_cs = 1`; int8-activation weights
/// use `scratch` for quantized rows.
#[allow(clippy::too_many_arguments)]
pub fn linear(
    ker: &Kernels,
    w: &Weights<'_>,
    (m, k, n): (usize, usize, usize),
    (a, a_rs, a_cs): (&[f32], usize, usize),
    (c, c_rs, c_cs): (&mut [f32], usize, usize),
    bias: Option<&[f32]>,
    act: Activation,
    scratch: &mut [u8],
) {
    match *w {
        Weights::Panel(b) => gemm_with_threads(
            &ker.gemm,
            ker.threads,
            Gemm {
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
            },
        ),
        Weights::PanelF16(b) => gemm_f16_with_threads(
            &ker.gemm_f16,
            ker.threads,
            GemmF16 {
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
            },
        ),
        Weights::Plain(w) => {
            for i in 0..m {
                for j in 0..n {
                    let acc: f32 =
                        (0..k).fold(0.0, |s, kk| s + a[i * a_rs + kk * a_cs] * w[j * k + kk]);
                    c[i * c_rs + j * c_cs] = math::apply(&act, acc + bias.map_or(0.0, |b| b[j]));
                }
            }
        }
        Weights::Quantized(q) => {
            assert_eq!(
                a_cs, 1,
                "compressed weights read contiguous activation rows"
            );
            let g = QGemm {
                m,
                a,
                a_rs,
                c,
                c_rs,
                c_cs,
                bias,
                act,
            };
            if q.layout.int8_activations() {
                qgemm::qgemm_q8(ker, &q, g, scratch)
            } else {
                qgemm::qgemm_f32(ker, &q, g)
            }
        }
        Weights::Adapted(q) => {
            assert_eq!(
                a_cs, 1,
                "compressed weights read contiguous activation rows"
            );
            q.gemm(QGemm {
                m,
                a,
                a_rs,
                c,
                c_rs,
                c_cs,
                bias,
                act,
            })
        }
        Weights::Sparse(s) => {
            assert_eq!(
                a_cs, 1,
                "compressed weights read contiguous activation rows"
            );
            qgemm::sparse_gemm(
                ker,
                &s,
                QGemm {
                    m,
                    a,
                    a_rs,
                    c,
                    c_rs,
                    c_cs,
                    bias,
                    act,
                },
            )
        }
    }
}

/// `y[m, n] = act(Σ_k x[m, k] · w[n, k] + bias[n])`.
#[allow(clippy::too_many_arguments)]
pub fn dense(
    ker: &Kernels,
    x: &[f32],
    m: usize,
    k: usize,
    w: Weights<'_>,
    n: usize,
    bias: Option<&[f32]>,
    act: Activation,
    y: &mut [f32],
    scratch: &mut [u8],
) {
    linear(ker, &w, (m, k, n), (x, k, 1), (y, n, 1), bias, act, scratch)
}

/// Batched product of activations with per-operand axis roles (see [`MatMul`]); `scratch`
/// holds one packed `b` matrix.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    ker: &Kernels,
    mm: &MatMul,
    a: &[f32],
    a_shape: &Shape,
    b: &[f32],
    b_shape: &Shape,
    y: &mut [f32],
    y_shape: &Shape,
    scratch: &mut [f32],
) {
    let r = y_shape.rank();
    let (ast, bst, yst) = (a_shape.strides(), b_shape.strides(), y_shape.strides());
    let (m, n, k) = (
        y_shape.dim(mm.y_m as usize),
        y_shape.dim(mm.y_n as usize),
        a_shape.dim(mm.a_k as usize),
    );
    let (ab, nb) = MatMul::batch_axes(r, mm.a_m, mm.a_k);
    let (bb, _) = MatMul::batch_axes(r, mm.b_k, mm.b_n);
    let (yb, _) = MatMul::batch_axes(r, mm.y_m, mm.y_n);
    // Per batch axis: extent and the step each operand takes (0 when broadcast).
    let mut dims = [1usize; MAX_RANK];
    let mut steps = [[0usize; 3]; MAX_RANK];
    for i in 0..nb {
        dims[i] = y_shape.dim(yb[i]);
        let sa = if a_shape.dim(ab[i]) == 1 {
            0
        } else {
            ast[ab[i]]
        };
        let sb = if b_shape.dim(bb[i]) == 1 {
            0
        } else {
            bst[bb[i]]
        };
        steps[i] = [sa, sb, yst[yb[i]]];
    }
    let batches: usize = dims[..nb].iter().product();
    let mut idx = [0usize; MAX_RANK];
    let mut off = [0usize; 3];
    let mut packed_at = usize::MAX;
    for _ in 0..batches {
        if off[1] != packed_at {
            pack_b(
                k,
                n,
                &b[off[1]..],
                bst[mm.b_k as usize],
                bst[mm.b_n as usize],
                scratch,
            );
            packed_at = off[1];
        }
        gemm_with_threads(
            &ker.gemm,
            ker.threads,
            Gemm {
                m,
                n,
                k,
                a: &a[off[0]..],
                a_rs: ast[mm.a_m as usize],
                a_cs: ast[mm.a_k as usize],
                b: scratch,
                c: &mut y[off[2]..],
                c_rs: yst[mm.y_m as usize],
                c_cs: yst[mm.y_n as usize],
                bias: None,
                act: Activation::NONE,
            },
        );
        let mut d = nb;
        while d > 0 {
            d -= 1;
            idx[d] += 1;
            for (o, s) in off.iter_mut().zip(steps[d]) {
                *o += s;
            }
            if idx[d] < dims[d] {
                break;
            }
            for (o, s) in off.iter_mut().zip(steps[d]) {
                *o -= s * dims[d];
            }
            idx[d] = 0;
        }
    }
}

//! Fully-connected layers and batched products of activations, on the GEMM frame.

use edgetune_core::ops::MatMul;
use edgetune_core::{Activation, Shape, MAX_RANK};

use super::gemm::{gemm_with_threads, pack_b, Gemm};
use super::Kernels;
use crate::math;

/// A dense layer's weights as stored (`[N, K]`).
#[derive(Debug, Clone, Copy)]
pub enum DenseWeights<'a> {
    /// Packed in GEMM panels.
    Panel(&'a [f32]),
    /// Row-major.
    Plain(&'a [f32]),
}

/// `y[m, n] = act(Σ_k x[m, k] · w[n, k] + bias[n])`.
#[allow(clippy::too_many_arguments)]
pub fn dense(
    ker: &Kernels,
    x: &[f32],
    m: usize,
    k: usize,
    w: DenseWeights<'_>,
    n: usize,
    bias: Option<&[f32]>,
    act: Activation,
    y: &mut [f32],
) {
    match w {
        DenseWeights::Panel(w) => gemm_with_threads(
            &ker.gemm,
            ker.threads,
            Gemm {
                m,
                n,
                k,
                a: x,
                a_rs: k,
                a_cs: 1,
                b: w,
                c: y,
                c_rs: n,
                c_cs: 1,
                bias,
                act,
            },
        ),
        DenseWeights::Plain(w) => {
            for (xr, yr) in x.chunks_exact(k).zip(y.chunks_exact_mut(n)) {
                for (j, out) in yr.iter_mut().enumerate() {
                    let acc: f32 = xr
                        .iter()
                        .zip(&w[j * k..(j + 1) * k])
                        .fold(0.0, |s, (a, b)| s + a * b);
                    *out = math::apply(&act, acc + bias.map_or(0.0, |b| b[j]));
                }
            }
        }
    }
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

//! Softmax, layer/RMS normalisation and reductions.

use edgetune_core::{ReduceKind, Shape, MAX_RANK};

use super::elementwise::Num;

/// Softmax along an axis of length `n`, for `outer` blocks, elements `inner` apart.
pub fn softmax(x: &[f32], out: &mut [f32], outer: usize, n: usize, inner: usize) {
    for o in 0..outer {
        for i in 0..inner {
            let base = o * n * inner + i;
            let mut max = f32::NEG_INFINITY;
            for j in 0..n {
                max = max.max(x[base + j * inner]);
            }
            let mut sum = 0.0f32;
            for j in 0..n {
                let e = libm::expf(x[base + j * inner] - max);
                out[base + j * inner] = e;
                sum += e;
            }
            let inv = 1.0 / sum;
            for j in 0..n {
                out[base + j * inner] *= inv;
            }
        }
    }
}

/// Normalises each row of `inner` values: `(x − mean)/√(var + eps)` (or `x/√(mean x² + eps)`
/// when `rms`), then scales by `gamma` and shifts by `beta`.
pub fn layer_norm(
    x: &[f32],
    out: &mut [f32],
    inner: usize,
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    eps: f32,
    rms: bool,
) {
    let n = inner as f32;
    for (xr, yr) in x.chunks_exact(inner).zip(out.chunks_exact_mut(inner)) {
        let mean = if rms { 0.0 } else { xr.iter().sum::<f32>() / n };
        let var = xr.iter().map(|&v| (v - mean) * (v - mean)).sum::<f32>() / n;
        let inv = 1.0 / libm::sqrtf(var + eps);
        for (j, (y, &v)) in yr.iter_mut().zip(xr).enumerate() {
            let mut r = (v - mean) * inv;
            if let Some(g) = gamma {
                r *= g[j];
            }
            if let Some(b) = beta {
                r += b[j];
            }
            *y = r;
        }
    }
}

/// Numbers reductions work on.
pub trait Reducible: Num {
    /// Lowest value.
    const MIN: Self;
    /// Highest value.
    const MAX: Self;
    /// One.
    const ONE: Self;
    /// Division by an element count (mean).
    fn div_count(self, n: usize) -> Self;
}
impl Reducible for f32 {
    const MIN: f32 = f32::NEG_INFINITY;
    const MAX: f32 = f32::INFINITY;
    const ONE: f32 = 1.0;
    fn div_count(self, n: usize) -> f32 {
        self / n as f32
    }
}
impl Reducible for i64 {
    const MIN: i64 = i64::MIN;
    const MAX: i64 = i64::MAX;
    const ONE: i64 = 1;
    fn div_count(self, n: usize) -> i64 {
        self / n as i64
    }
}
impl Reducible for i32 {
    const MIN: i32 = i32::MIN;
    const MAX: i32 = i32::MAX;
    const ONE: i32 = 1;
    fn div_count(self, n: usize) -> i32 {
        self / n as i32
    }
}

/// Reduces `x` (shape `xs`) over the axes whose bits are set in `axes`.
pub fn reduce<T: Reducible>(kind: ReduceKind, x: &[T], xs: &Shape, axes: u32, out: &mut [T]) {
    let init = match kind {
        ReduceKind::Sum | ReduceKind::Mean | ReduceKind::SumSquare => T::default(),
        ReduceKind::Max => T::MIN,
        ReduceKind::Min => T::MAX,
        ReduceKind::Prod => T::ONE,
    };
    out.iter_mut().for_each(|v| *v = init);
    let r = xs.rank();
    // Fast path: the reduced axes form one contiguous block, so x is [outer, red, inner].
    let first = axes.trailing_zeros() as usize;
    let count_axes = axes.count_ones() as usize;
    if axes >> first == (1u32 << count_axes) - 1 {
        let (outer, red, inner) = (
            xs.prod(0, first),
            xs.prod(first, first + count_axes),
            xs.prod(first + count_axes, r),
        );
        for o in 0..outer {
            let acc = &mut out[o * inner..(o + 1) * inner];
            for j in 0..red {
                let row = &x[(o * red + j) * inner..(o * red + j + 1) * inner];
                for (a, &v) in acc.iter_mut().zip(row) {
                    *a = step(kind, *a, v);
                }
            }
        }
    } else {
        general_reduce(kind, x, xs, axes, out);
    }
    if kind == ReduceKind::Mean {
        let count: usize = (0..r)
            .filter(|i| axes & (1 << i) != 0)
            .map(|i| xs.dim(i))
            .product();
        out.iter_mut().for_each(|v| *v = v.div_count(count));
    }
}

#[inline]
fn step<T: Reducible>(kind: ReduceKind, acc: T, v: T) -> T {
    match kind {
        ReduceKind::Sum | ReduceKind::Mean => T::add(acc, v),
        ReduceKind::SumSquare => T::add(acc, T::mul(v, v)),
        ReduceKind::Max => {
            if v > acc || v.partial_cmp(&v).is_none() {
                v
            } else {
                acc
            }
        }
        ReduceKind::Min => {
            if v < acc || v.partial_cmp(&v).is_none() {
                v
            } else {
                acc
            }
        }
        ReduceKind::Prod => T::mul(acc, v),
    }
}

/// Any set of axes: walks the input once, accumulating into the output element it maps to.
fn general_reduce<T: Reducible>(kind: ReduceKind, x: &[T], xs: &Shape, axes: u32, out: &mut [T]) {
    // Output strides in input coordinates: 0 along reduced axes.
    let r = xs.rank();
    let mut ostride = [0usize; MAX_RANK];
    let mut acc = 1usize;
    for i in (0..r).rev() {
        if axes & (1 << i) == 0 {
            ostride[i] = acc;
            acc *= xs.dim(i);
        }
    }
    let mut idx = [0usize; MAX_RANK];
    let mut o = 0usize;
    for &v in x {
        out[o] = step(kind, out[o], v);
        let mut d = r;
        while d > 0 {
            d -= 1;
            idx[d] += 1;
            o += ostride[d];
            if idx[d] < xs.dim(d) {
                break;
            }
            o -= ostride[d] * xs.dim(d);
            idx[d] = 0;
        }
    }
}

//! Data movement: transpose, slice, concat, gather. Generic over the element, so one code path
//! serves every dtype of the same size.

use edgetune_core::{Shape, MAX_RANK};

/// `out = x` with axes permuted: output axis `i` is input axis `perm[i]`.
pub fn transpose<T: Copy>(x: &[T], xs: &Shape, perm: &[u8], out: &mut [T]) {
    let r = xs.rank();
    let xst = xs.strides();
    let mut dims = [1usize; MAX_RANK];
    let mut st = [0usize; MAX_RANK];
    for i in 0..r {
        dims[i] = xs.dim(perm[i] as usize);
        st[i] = xst[perm[i] as usize];
    }
    strided_copy(x, 0, &dims[..r], &st[..r], out);
}

/// Copies the strided window `x[base + Σ idx_i · st_i]` over `dims` into `out` in order.
pub fn strided_copy<T: Copy>(x: &[T], base: usize, dims: &[usize], st: &[usize], out: &mut [T]) {
    let r = dims.len();
    if r == 0 {
        out[0] = x[base];
        return;
    }
    let (run, step) = (dims[r - 1], st[r - 1]);
    let mut idx = [0usize; MAX_RANK];
    let mut off = base;
    for chunk in out.chunks_exact_mut(run) {
        if step == 1 {
            chunk.copy_from_slice(&x[off..off + run]);
        } else {
            for (j, y) in chunk.iter_mut().enumerate() {
                *y = x[off + j * step];
            }
        }
        let mut d = r - 1;
        while d > 0 {
            d -= 1;
            idx[d] += 1;
            off += st[d];
            if idx[d] < dims[d] {
                break;
            }
            off -= st[d] * dims[d];
            idx[d] = 0;
        }
    }
}

/// Strided slice: per axis a start and a (possibly negative) step; `ys` gives the counts.
pub fn slice<T: Copy>(
    x: &[T],
    xs: &Shape,
    starts: &[i32],
    steps: &[i32],
    ys: &Shape,
    out: &mut [T],
) {
    let r = xs.rank();
    let xst = xs.strides();
    let mut base = 0isize;
    let mut dims = [1usize; MAX_RANK];
    let mut st = [0isize; MAX_RANK];
    for i in 0..r {
        base += starts[i] as isize * xst[i] as isize;
        dims[i] = ys.dim(i);
        st[i] = steps[i] as isize * xst[i] as isize;
    }
    // Negative steps: walk with signed offsets (validation keeps every index in range).
    let run = dims[r - 1];
    let mut idx = [0usize; MAX_RANK];
    let mut off = base;
    for chunk in out.chunks_exact_mut(run) {
        for (j, y) in chunk.iter_mut().enumerate() {
            *y = x[(off + j as isize * st[r - 1]) as usize];
        }
        let mut d = r - 1;
        while d > 0 {
            d -= 1;
            idx[d] += 1;
            off += st[d];
            if idx[d] < dims[d] {
                break;
            }
            off -= st[d] * dims[d] as isize;
            idx[d] = 0;
        }
    }
}

/// Appends each input's block along the concat axis: `outer` blocks, each input contributing
/// `block` elements per outer index (its axis length times the inner size).
pub fn concat_part<T: Copy>(
    x: &[T],
    outer: usize,
    block: usize,
    out_block: usize,
    offset: usize,
    out: &mut [T],
) {
    for o in 0..outer {
        out[o * out_block + offset..o * out_block + offset + block]
            .copy_from_slice(&x[o * block..(o + 1) * block]);
    }
}

/// Gathers along an axis: `data` viewed as `[outer, dim, inner]`, `out` as
/// `[outer, indices.len(), inner]`. Negative indices count from the end. Returns the first
/// index out of range, if any (and leaves `out` partly written).
pub fn gather<T: Copy>(
    data: &[T],
    outer: usize,
    dim: usize,
    inner: usize,
    indices: impl Iterator<Item = i64> + Clone,
    out: &mut [T],
) -> Result<(), i64> {
    let n_idx = indices.clone().count();
    for o in 0..outer {
        for (j, raw) in indices.clone().enumerate() {
            let i = if raw < 0 { raw + dim as i64 } else { raw };
            if i < 0 || i >= dim as i64 {
                return Err(raw);
            }
            let src = (o * dim + i as usize) * inner;
            let dst = (o * n_idx + j) * inner;
            out[dst..dst + inner].copy_from_slice(&data[src..src + inner]);
        }
    }
    Ok(())
}

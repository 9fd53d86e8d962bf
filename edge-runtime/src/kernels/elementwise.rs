//! Element-wise ops with NumPy broadcasting: binary arithmetic and comparisons, `Where`,
//! `Expand`, casts and NaN tests.
//!
//! Broadcasting walks the output in contiguous runs: dimensions that are contiguous for every
//! operand are merged first, so a same-shape add is one run and a bias add is one run per row.

use edgetune_core::{BinaryKind, Shape, MAX_RANK};

/// Element strides of an operand broadcast to `out` (0 along broadcast dimensions).
pub fn broadcast_strides(out: &Shape, input: &Shape) -> [usize; MAX_RANK] {
    let mut st = [0usize; MAX_RANK];
    let off = out.rank() - input.rank();
    let own = input.strides();
    for i in 0..input.rank() {
        if input.dim(i) != 1 {
            st[off + i] = own[i];
        }
    }
    st
}

/// A broadcast iteration over `out`, with dimensions merged where every operand allows.
#[derive(Debug, Clone, Copy)]
pub struct Runs<const N: usize> {
    rank: usize,
    dims: [usize; MAX_RANK],
    strides: [[usize; MAX_RANK]; N],
}

impl<const N: usize> Runs<N> {
    /// Plans the walk of `out` for operands with the given broadcast strides.
    pub fn new(out: &Shape, strides: [[usize; MAX_RANK]; N]) -> Runs<N> {
        let mut dims = [1usize; MAX_RANK];
        let mut st = [[0usize; MAX_RANK]; N];
        let mut rank = 0;
        // Merge from the innermost dimension outwards.
        for i in (0..out.rank()).rev() {
            let d = out.dim(i);
            if d == 1 {
                continue;
            }
            if rank > 0 {
                let inner = rank - 1;
                let mergeable = (0..N).all(|k| strides[k][i] == st[k][inner] * dims[inner]);
                if mergeable {
                    dims[inner] *= d;
                    continue;
                }
            }
            dims[rank] = d;
            for k in 0..N {
                st[k][rank] = strides[k][i];
            }
            rank += 1;
        }
        if rank == 0 {
            rank = 1;
            dims[0] = 1;
        }
        // Stored innermost-first; flip to outermost-first.
        dims[..rank].reverse();
        for s in st.iter_mut() {
            s[..rank].reverse();
        }
        Runs {
            rank,
            dims,
            strides: st,
        }
    }

    /// Calls `f(out_offset, operand_offsets, run_len, operand_steps)` for each innermost run.
    pub fn for_each(&self, mut f: impl FnMut(usize, [usize; N], usize, [usize; N])) {
        let r = self.rank;
        let run = self.dims[r - 1];
        let steps: [usize; N] = core::array::from_fn(|k| self.strides[k][r - 1]);
        let outer: usize = self.dims[..r - 1].iter().product();
        let mut idx = [0usize; MAX_RANK];
        let mut offs = [0usize; N];
        for o in 0..outer {
            f(o * run, offs, run, steps);
            // Odometer over the outer dimensions.
            let mut d = r - 1;
            while d > 0 {
                d -= 1;
                idx[d] += 1;
                for k in 0..N {
                    offs[k] += self.strides[k][d];
                }
                if idx[d] < self.dims[d] {
                    break;
                }
                for k in 0..N {
                    offs[k] -= self.strides[k][d] * self.dims[d];
                }
                idx[d] = 0;
            }
        }
    }
}

/// Numbers binary arithmetic works on.
pub trait Num: Copy + PartialOrd + Default {
    /// `a + b` (wrapping for integers).
    fn add(a: Self, b: Self) -> Self;
    /// `a - b`.
    fn sub(a: Self, b: Self) -> Self;
    /// `a · b`.
    fn mul(a: Self, b: Self) -> Self;
    /// `a / b` (integers: truncating, 0 when dividing by 0).
    fn div(a: Self, b: Self) -> Self;
    /// `a ^ b`.
    fn pow(a: Self, b: Self) -> Self;
}

impl Num for f32 {
    fn add(a: f32, b: f32) -> f32 {
        a + b
    }
    fn sub(a: f32, b: f32) -> f32 {
        a - b
    }
    fn mul(a: f32, b: f32) -> f32 {
        a * b
    }
    fn div(a: f32, b: f32) -> f32 {
        a / b
    }
    fn pow(a: f32, b: f32) -> f32 {
        libm::powf(a, b)
    }
}

macro_rules! int_num {
    ($t:ty) => {
        impl Num for $t {
            fn add(a: $t, b: $t) -> $t {
                a.wrapping_add(b)
            }
            fn sub(a: $t, b: $t) -> $t {
                a.wrapping_sub(b)
            }
            fn mul(a: $t, b: $t) -> $t {
                a.wrapping_mul(b)
            }
            fn div(a: $t, b: $t) -> $t {
                if b == 0 {
                    0
                } else {
                    a.wrapping_div(b)
                }
            }
            fn pow(a: $t, b: $t) -> $t {
                if b < 0 {
                    0
                } else {
                    a.wrapping_pow(b.min(u32::MAX as $t) as u32)
                }
            }
        }
    };
}
int_num!(i64);
int_num!(i32);

fn zip_runs<T: Copy, U: Copy>(
    a: &[T],
    b: &[T],
    out: &mut [U],
    runs: &Runs<2>,
    f: impl Fn(T, T) -> U,
) {
    runs.for_each(|o, [ia, ib], n, [sa, sb]| {
        let out = &mut out[o..o + n];
        match (sa, sb) {
            (1, 1) => {
                for ((y, &x), &z) in out.iter_mut().zip(&a[ia..ia + n]).zip(&b[ib..ib + n]) {
                    *y = f(x, z);
                }
            }
            (1, 0) => {
                let z = b[ib];
                for (y, &x) in out.iter_mut().zip(&a[ia..ia + n]) {
                    *y = f(x, z);
                }
            }
            (0, 1) => {
                let x = a[ia];
                for (y, &z) in out.iter_mut().zip(&b[ib..ib + n]) {
                    *y = f(x, z);
                }
            }
            _ => {
                for (j, y) in out.iter_mut().enumerate() {
                    *y = f(a[ia + j * sa], b[ib + j * sb]);
                }
            }
        }
    });
}

/// True for NaN (the one value not comparable with itself).
fn unordered<T: PartialOrd>(a: &T) -> bool {
    a.partial_cmp(a).is_none()
}

fn max_nan<T: PartialOrd>(a: T, b: T) -> T {
    // NaN-propagating like ONNX Max.
    if unordered(&a) || a >= b {
        a
    } else {
        b
    }
}

fn min_nan<T: PartialOrd>(a: T, b: T) -> T {
    if unordered(&a) || a <= b {
        a
    } else {
        b
    }
}

/// Arithmetic `out = a ∘ b` with broadcasting (not comparisons or logic).
pub fn arith<T: Num>(kind: BinaryKind, a: &[T], b: &[T], out: &mut [T], runs: &Runs<2>) {
    match kind {
        BinaryKind::Add => zip_runs(a, b, out, runs, T::add),
        BinaryKind::Sub => zip_runs(a, b, out, runs, T::sub),
        BinaryKind::Mul => zip_runs(a, b, out, runs, T::mul),
        BinaryKind::Div => zip_runs(a, b, out, runs, T::div),
        BinaryKind::Pow => zip_runs(a, b, out, runs, T::pow),
        BinaryKind::Min => zip_runs(a, b, out, runs, min_nan),
        BinaryKind::Max => zip_runs(a, b, out, runs, max_nan),
        _ => unreachable!("comparisons and logic go through `compare`/`logic`"),
    }
}

/// Comparison `out = a ∘ b` as 0/1 bytes.
pub fn compare<T: Num>(kind: BinaryKind, a: &[T], b: &[T], out: &mut [u8], runs: &Runs<2>) {
    match kind {
        BinaryKind::Equal => zip_runs(a, b, out, runs, |x, y| (x == y) as u8),
        BinaryKind::Less => zip_runs(a, b, out, runs, |x, y| (x < y) as u8),
        BinaryKind::Greater => zip_runs(a, b, out, runs, |x, y| (x > y) as u8),
        BinaryKind::LessEq => zip_runs(a, b, out, runs, |x, y| (x <= y) as u8),
        BinaryKind::GreaterEq => zip_runs(a, b, out, runs, |x, y| (x >= y) as u8),
        _ => unreachable!("not a comparison"),
    }
}

/// Logical ops on 0/1 bytes (bool tensors); equality of bools is allowed too.
pub fn logic(kind: BinaryKind, a: &[u8], b: &[u8], out: &mut [u8], runs: &Runs<2>) {
    match kind {
        BinaryKind::And => zip_runs(a, b, out, runs, |x, y| (x != 0 && y != 0) as u8),
        BinaryKind::Or => zip_runs(a, b, out, runs, |x, y| (x != 0 || y != 0) as u8),
        _ => zip_runs(a, b, out, runs, |x, y| ((x != 0) == (y != 0)) as u8),
    }
}

/// `out = cond ? a : b` with broadcasting of all three.
pub fn select<T: Copy>(cond: &[u8], a: &[T], b: &[T], out: &mut [T], runs: &Runs<3>) {
    runs.for_each(|o, [ic, ia, ib], n, [sc, sa, sb]| {
        for (j, y) in out[o..o + n].iter_mut().enumerate() {
            *y = if cond[ic + j * sc] != 0 {
                a[ia + j * sa]
            } else {
                b[ib + j * sb]
            };
        }
    });
}

/// Broadcast copy of `x` to the output shape.
pub fn expand<T: Copy>(x: &[T], out: &mut [T], runs: &Runs<1>) {
    runs.for_each(|o, [ix], n, [sx]| {
        for (j, y) in out[o..o + n].iter_mut().enumerate() {
            *y = x[ix + j * sx];
        }
    });
}

/// True (1) where `x` is NaN.
pub fn is_nan(x: &[f32], out: &mut [u8]) {
    for (y, v) in out.iter_mut().zip(x) {
        *y = v.is_nan() as u8;
    }
}

//! Runs one op: finds its tensors in the model file and the arena, and calls its kernel.

use edgetune_core::ops::{MatMul, Op};
use edgetune_core::{DType, Encoding, Model, OpInfo, Shape, Storage};

use crate::adapter::{AdaptedQ, AdapterParts, AdapterValues};
use crate::error::RunError;
use crate::kernels::conv::{conv2d, direct_conv, ConvShape};
use crate::kernels::elementwise::{self as ew, broadcast_strides, Runs};
use crate::kernels::linear::{dense, matmul, Weights};
use crate::kernels::movement;
use crate::kernels::norm;
use crate::kernels::pool::pool2d;
use crate::kernels::qgemm::{decode_row, QWeights, SparseWeights};
use crate::kernels::Kernels;
use crate::math;
use edgetune_core::adapter::EntryKind;
use edgetune_core::layout::{QBlockLayout, SparseLayout};
use edgetune_core::ops::Conv;
use edgetune_core::Activation;

/// View of an arena tensor.
///
/// # Safety
/// `base` must be the session's arena (at least `model.arena_bytes()` bytes, 16-byte aligned),
/// `id` an arena tensor whose elements are `T`-sized, and no `&mut` view of overlapping bytes
/// may be alive.
pub(crate) unsafe fn arena_slice<'x, T>(model: &Model<'_>, base: *const u8, id: u32) -> &'x [T] {
    let t = model.tensor(id);
    // SAFETY: validation placed the tensor inside the arena at a 16-byte aligned offset, with
    // `len` = numel · size_of::<T>(); the caller guarantees no overlapping mutable view.
    unsafe {
        core::slice::from_raw_parts(
            base.add(t.offset as usize) as *const T,
            t.len as usize / core::mem::size_of::<T>(),
        )
    }
}

/// Mutable view of an arena tensor.
///
/// # Safety
/// As [`arena_slice`], and no other view of overlapping bytes may be alive.
pub(crate) unsafe fn arena_slice_mut<'x, T>(
    model: &Model<'_>,
    base: *mut u8,
    id: u32,
) -> &'x mut [T] {
    let t = model.tensor(id);
    // SAFETY: as in `arena_slice`; exclusivity is the caller's promise, which holds because
    // validation forbids an op's outputs to share bytes with anything live at that op.
    unsafe {
        core::slice::from_raw_parts_mut(
            base.add(t.offset as usize) as *mut T,
            t.len as usize / core::mem::size_of::<T>(),
        )
    }
}

/// View of a constant tensor's plain data.
pub(crate) fn const_slice<'m, T>(model: &Model<'m>, id: u32) -> &'m [T] {
    let bytes = model.const_bytes(id);
    // SAFETY: validation checked the buffer is 8-byte aligned and the blob 64-byte aligned inside
    // it, so the pointer is aligned for T (size ≤ 8); the length is a whole number of elements and
    // every bit pattern is a valid T for the numeric types used here.
    unsafe {
        core::slice::from_raw_parts(
            bytes.as_ptr() as *const T,
            bytes.len() / core::mem::size_of::<T>(),
        )
    }
}

struct Ctx<'m, 'k> {
    model: &'m Model<'m>,
    base: *mut u8,
    kernels: &'k Kernels,
}

impl<'m> Ctx<'m, '_> {
    fn shape(&self, id: u32) -> Shape {
        self.model.tensor(id).meta.shape
    }

    fn input<T>(&self, id: u32) -> &'m [T] {
        match self.model.tensor(id).meta.storage {
            Storage::Const => const_slice(self.model, id),
            // SAFETY: inputs never overlap the op's outputs (validated live ranges).
            Storage::Arena => unsafe { arena_slice(self.model, self.base, id) },
        }
    }

    fn output<T>(&self, id: u32) -> &'m mut [T] {
        // SAFETY: the output is written by this op only and overlaps nothing live.
        unsafe { arena_slice_mut(self.model, self.base, id) }
    }
}

impl<'m> Ctx<'m, '_> {
    /// A weight tensor in whatever encoding it is stored.
    fn weights(&self, id: u32) -> Weights<'m> {
        let t = self.model.tensor(id);
        let (n, k) = (t.meta.shape.dim(0), t.meta.shape.dim(1));
        match t.meta.encoding {
            Encoding::PanelF32 => Weights::Panel(self.input(id)),
            Encoding::PanelF16 => Weights::PanelF16(const_slice(self.model, id)),
            Encoding::QBlock => Weights::Quantized(QWeights {
                layout: QBlockLayout::new(n, k, t.params).expect("validated"),
                bytes: self.model.const_bytes(id),
            }),
            Encoding::SparseNM => Weights::Sparse(SparseWeights {
                layout: SparseLayout::new(n, k, t.params).expect("validated"),
                bytes: self.model.const_bytes(id),
            }),
            Encoding::Plain => Weights::Plain(self.input(id)),
        }
    }

    /// The weight view of a constant if it uses a weight encoding, else `Plain` of nothing.
    fn weights_if_encoded(&self, id: u32) -> Weights<'m> {
        let t = self.model.tensor(id);
        if t.meta.encoding.is_weight_layout() && t.meta.shape.rank() == 2 {
            self.weights(id)
        } else {
            Weights::Plain(&[])
        }
    }

    fn scratch(&self, op: &OpInfo<'_>) -> &'m mut [u8] {
        match op.scratch {
            Some(id) => self.output(id),
            None => &mut [],
        }
    }
}

macro_rules! by_size {
    ($dt:expr, $f:ident ( $($arg:expr),* )) => {
        match $dt.size() {
            1 => $f::<u8>($($arg),*),
            2 => $f::<u16>($($arg),*),
            4 => $f::<u32>($($arg),*),
            _ => $f::<u64>($($arg),*),
        }
    };
}

/// Executes one op of a validated model.
pub(crate) fn run_op(
    model: &Model<'_>,
    base: *mut u8,
    kernels: &Kernels,
    op: &OpInfo<'_>,
    adapter: Option<&mut AdapterParts<'_>>,
) -> Result<(), RunError> {
    let cx = Ctx {
        model,
        base,
        kernels,
    };
    let (adapter, work) = match adapter {
        Some(p) => {
            let (v, w) = p.split();
            (Some(v), Some(w))
        }
        None => (None, None),
    };
    let y_id = op.output(0);
    let ys = cx.shape(y_id);
    let y_dt = model.tensor(y_id).meta.dtype;
    match &op.op {
        Op::Conv(c) => {
            let xs = cx.shape(op.input(0));
            let s = ConvShape {
                n: xs.dim(0),
                cin: xs.dim(1),
                h: xs.dim(2),
                w: xs.dim(3),
                cout: ys.dim(1),
                ho: ys.dim(2),
                wo: ys.dim(3),
            };
            let p = linear_params(&cx, op, adapter);
            let post = p.lora.is_some() || p.row_scales.is_some();
            let act = if post { Activation::NONE } else { c.act };
            let kbias = if p.row_scales.is_some() { None } else { p.bias };
            let (x, y) = (cx.input::<f32>(op.input(0)), cx.output::<f32>(y_id));
            conv2d(
                kernels,
                &Conv { act, ..*c },
                &s,
                x,
                p.weights,
                kbias,
                y,
                cx.scratch(op),
            );
            let pixels = s.ho * s.wo;
            if let Some(ls) = p.row_scales {
                scale_outputs(y, pixels, s.cout, ls, p.bias);
            }
            if let (Some(l), Some(work)) = (&p.lora, work) {
                lora_conv(c, &s, x, l, work, y);
            }
            if post {
                math::apply_slice(&c.act, y);
            }
        }
        Op::Dense(d) => {
            let xs = cx.shape(op.input(0));
            let k = xs.back(1);
            let n = ys.back(1);
            let m = xs.numel() / k;
            let p = linear_params(&cx, op, adapter);
            let post = p.lora.is_some() || p.row_scales.is_some();
            let act = if post { Activation::NONE } else { d.act };
            let kbias = if p.row_scales.is_some() { None } else { p.bias };
            let (x, y) = (cx.input::<f32>(op.input(0)), cx.output::<f32>(y_id));
            dense(
                kernels,
                x,
                m,
                k,
                p.weights,
                n,
                kbias,
                act,
                y,
                cx.scratch(op),
            );
            if let Some(ls) = p.row_scales {
                scale_outputs(y, 1, n, ls, p.bias);
            }
            if let (Some(l), Some(work)) = (&p.lora, work) {
                lora_dense(x, (m, k, n), l, work, y);
            }
            if post {
                math::apply_slice(&d.act, y);
            }
        }
        Op::MatMul(mm) => run_matmul(&cx, mm, op),
        Op::Binary(kind) => {
            let (a, b) = (op.input(0), op.input(1));
            let runs = Runs::new(
                &ys,
                [
                    broadcast_strides(&ys, &cx.shape(a)),
                    broadcast_strides(&ys, &cx.shape(b)),
                ],
            );
            let in_dt = model.tensor(a).meta.dtype;
            if kind.is_logical() || in_dt == DType::Bool {
                ew::logic(*kind, cx.input(a), cx.input(b), cx.output(y_id), &runs);
            } else if kind.is_comparison() {
                match in_dt {
                    DType::F32 => {
                        ew::compare::<f32>(*kind, cx.input(a), cx.input(b), cx.output(y_id), &runs)
                    }
                    DType::I64 => {
                        ew::compare::<i64>(*kind, cx.input(a), cx.input(b), cx.output(y_id), &runs)
                    }
                    _ => {
                        ew::compare::<i32>(*kind, cx.input(a), cx.input(b), cx.output(y_id), &runs)
                    }
                }
            } else {
                match in_dt {
                    DType::F32 => {
                        ew::arith::<f32>(*kind, cx.input(a), cx.input(b), cx.output(y_id), &runs)
                    }
                    DType::I64 => {
                        ew::arith::<i64>(*kind, cx.input(a), cx.input(b), cx.output(y_id), &runs)
                    }
                    _ => ew::arith::<i32>(*kind, cx.input(a), cx.input(b), cx.output(y_id), &runs),
                }
            }
        }
        Op::Unary(act) => {
            let (x, y) = (cx.input::<f32>(op.input(0)), cx.output::<f32>(y_id));
            for (o, &v) in y.iter_mut().zip(x) {
                *o = math::apply(act, v);
            }
        }
        Op::Softmax { axis } => {
            let ax = *axis as usize;
            norm::softmax(
                cx.input(op.input(0)),
                cx.output(y_id),
                ys.prod(0, ax),
                ys.dim(ax),
                ys.prod(ax + 1, ys.rank()),
            );
        }
        Op::LayerNorm { axis, eps, rms } => {
            let inner = ys.prod(*axis as usize, ys.rank());
            let mut gamma = (op.n_inputs() > 1).then(|| cx.input::<f32>(op.input(1)));
            let mut beta = (op.n_inputs() > 2).then(|| cx.input::<f32>(op.input(2)));
            if let Some(ad) = adapter {
                gamma = ad
                    .find(op.index, EntryKind::NormGain)
                    .map(|e| e.1)
                    .or(gamma);
                beta = ad.find(op.index, EntryKind::NormBias).map(|e| e.1).or(beta);
            }
            norm::layer_norm(
                cx.input(op.input(0)),
                cx.output(y_id),
                inner,
                gamma,
                beta,
                *eps,
                *rms,
            );
        }
        Op::Reduce { kind, axes, .. } => {
            let xs = cx.shape(op.input(0));
            match y_dt {
                DType::F32 => {
                    norm::reduce::<f32>(*kind, cx.input(op.input(0)), &xs, *axes, cx.output(y_id))
                }
                DType::I64 => {
                    norm::reduce::<i64>(*kind, cx.input(op.input(0)), &xs, *axes, cx.output(y_id))
                }
                _ => norm::reduce::<i32>(*kind, cx.input(op.input(0)), &xs, *axes, cx.output(y_id)),
            }
        }
        Op::Pool(p) => {
            let xs = cx.shape(op.input(0));
            let planes = xs.dim(0) * xs.dim(1);
            pool2d(
                p,
                cx.input(op.input(0)),
                planes,
                xs.dim(2),
                xs.dim(3),
                cx.output(y_id),
                ys.dim(2),
                ys.dim(3),
            );
        }
        Op::Reshape => {
            fn copy<T: Copy>(cx: &Ctx<'_, '_>, x: u32, y: u32) {
                cx.output::<T>(y).copy_from_slice(cx.input::<T>(x));
            }
            by_size!(y_dt, copy(&cx, op.input(0), y_id));
        }
        Op::Transpose { perm } => {
            fn tr<T: Copy>(cx: &Ctx<'_, '_>, x: u32, y: u32, perm: &[u8]) {
                movement::transpose(cx.input::<T>(x), &cx.shape(x), perm, cx.output::<T>(y));
            }
            by_size!(y_dt, tr(&cx, op.input(0), y_id, &perm[..]));
        }
        Op::Concat { axis } => {
            fn cat<T: Copy>(cx: &Ctx<'_, '_>, op: &OpInfo<'_>, axis: usize, y: u32) {
                let ys = cx.shape(y);
                let outer = ys.prod(0, axis);
                let inner = ys.prod(axis + 1, ys.rank());
                let out = cx.output::<T>(y);
                let mut offset = 0;
                for x in op.inputs() {
                    let block = cx.shape(x).dim(axis) * inner;
                    movement::concat_part(
                        cx.input::<T>(x),
                        outer,
                        block,
                        ys.dim(axis) * inner,
                        offset,
                        out,
                    );
                    offset += block;
                }
            }
            by_size!(y_dt, cat(&cx, op, *axis as usize, y_id));
        }
        Op::Slice { starts, steps } => {
            fn sl<T: Copy>(cx: &Ctx<'_, '_>, x: u32, y: u32, starts: &[i32], steps: &[i32]) {
                movement::slice(
                    cx.input::<T>(x),
                    &cx.shape(x),
                    starts,
                    steps,
                    &cx.shape(y),
                    cx.output::<T>(y),
                );
            }
            by_size!(y_dt, sl(&cx, op.input(0), y_id, &starts[..], &steps[..]));
        }
        Op::Gather { axis } => run_gather(&cx, op, *axis as usize)?,
        Op::Where => {
            fn sel<T: Copy>(cx: &Ctx<'_, '_>, op: &OpInfo<'_>, y: u32) {
                let ys = cx.shape(y);
                let st = [0, 1, 2].map(|i| broadcast_strides(&ys, &cx.shape(op.input(i))));
                let runs = Runs::new(&ys, st);
                ew::select(
                    cx.input::<u8>(op.input(0)),
                    cx.input::<T>(op.input(1)),
                    cx.input::<T>(op.input(2)),
                    cx.output::<T>(y),
                    &runs,
                );
            }
            by_size!(y_dt, sel(&cx, op, y_id));
        }
        Op::Expand => {
            fn ex<T: Copy>(cx: &Ctx<'_, '_>, x: u32, y: u32) {
                let ys = cx.shape(y);
                let runs = Runs::new(&ys, [broadcast_strides(&ys, &cx.shape(x))]);
                ew::expand(cx.input::<T>(x), cx.output::<T>(y), &runs);
            }
            by_size!(y_dt, ex(&cx, op.input(0), y_id));
        }
        Op::Cast => run_cast(&cx, op.input(0), y_id),
        Op::IsNan => ew::is_nan(cx.input(op.input(0)), cx.output(y_id)),
    }
    Ok(())
}

/// A LoRA pair of one op: `A` `[r, K]`, `B` `[N, r]`, rank, α.
struct Lora<'a> {
    a: &'a [f32],
    b: &'a [f32],
    rank: usize,
    alpha: f32,
}

/// What a dense layer or convolution runs with once an adapter's overrides are applied.
struct LinearParams<'a> {
    weights: Weights<'a>,
    bias: Option<&'a [f32]>,
    lora: Option<Lora<'a>>,
    /// Log-multipliers of a weight with one scale per row: the fast kernel runs on the frozen
    /// weight, then output `j` is multiplied by `exp(ls[j])` — exact, as a row's scale
    /// multiplies its whole sum.
    row_scales: Option<&'a [f32]>,
}

/// Weights, bias and LoRA of a dense layer or convolution, with the adapter's overrides.
fn linear_params<'x>(
    cx: &Ctx<'x, '_>,
    op: &OpInfo<'_>,
    ad: Option<AdapterValues<'x>>,
) -> LinearParams<'x> {
    let mut p = LinearParams {
        weights: cx.weights(op.input(1)),
        bias: (op.n_inputs() > 2).then(|| cx.input::<f32>(op.input(2))),
        lora: None,
        row_scales: None,
    };
    if let Some(ad) = ad {
        let i = op.index;
        p.bias = ad.find(i, EntryKind::Bias).map(|e| e.1).or(p.bias);
        if let Some((_, h)) = ad.find(i, EntryKind::Head) {
            p.weights = Weights::Plain(h);
        }
        let centroids = ad.find(i, EntryKind::Centroids).map(|e| e.1);
        let log_scales = ad.find(i, EntryKind::LogScale).map(|e| e.1);
        if let Weights::Quantized(q) = p.weights {
            if centroids.is_none() && q.layout.groups_per_row() == 1 {
                p.row_scales = log_scales;
            } else if centroids.is_some() || log_scales.is_some() {
                p.weights = Weights::Adapted(AdaptedQ {
                    q,
                    centroids,
                    log_scales,
                });
            }
        }
        if let (Some((ea, a)), Some((_, b))) =
            (ad.find(i, EntryKind::LoraA), ad.find(i, EntryKind::LoraB))
        {
            p.lora = Some(Lora {
                a,
                b,
                rank: ea.rank as usize,
                alpha: ea.alpha,
            });
        }
    }
    p
}

/// `y[b, j, p] = y[b, j, p] · exp(ls[j]) + bias[j]` over `y` laid out `[batch, n, pixels]`.
fn scale_outputs(y: &mut [f32], pixels: usize, n: usize, ls: &[f32], bias: Option<&[f32]>) {
    let rows = y.len() / (n * pixels);
    for j in 0..n {
        // One exponential per output channel, whatever the batch.
        let (s, b) = (libm::expf(ls[j]), bias.map_or(0.0, |b| b[j]));
        for r in 0..rows {
            for v in &mut y[(r * n + j) * pixels..(r * n + j + 1) * pixels] {
                *v = *v * s + b;
            }
        }
    }
}

/// `y[m, n] += α/r · Σ_j B[n, j] · (Σ_k A[j, k] · x[m, k])`, the intermediate in `work`.
fn lora_dense(
    x: &[f32],
    (m, k, n): (usize, usize, usize),
    l: &Lora<'_>,
    work: &mut [f32],
    y: &mut [f32],
) {
    let r = l.rank;
    let t = &mut work[..m * r];
    for i in 0..m {
        for j in 0..r {
            t[i * r + j] = x[i * k..(i + 1) * k]
                .iter()
                .zip(&l.a[j * k..(j + 1) * k])
                .fold(0.0, |s, (a, b)| s + a * b);
        }
    }
    let s = l.alpha / r as f32;
    for i in 0..m {
        for o in 0..n {
            let d: f32 = (0..r).fold(0.0, |acc, j| acc + l.b[o * r + j] * t[i * r + j]);
            y[i * n + o] += s * d;
        }
    }
}

/// LoRA of a convolution: `A` is a convolution with `r` outputs and the op's geometry, `B` a
/// pointwise one (the caller applies the fused activation after).
fn lora_conv(c: &Conv, s: &ConvShape, x: &[f32], l: &Lora<'_>, work: &mut [f32], y: &mut [f32]) {
    let r = l.rank;
    let p = s.ho * s.wo;
    let t = &mut work[..s.n * r * p];
    direct_conv(
        &Conv {
            act: Activation::NONE,
            groups: 1,
            ..*c
        },
        &ConvShape { cout: r, ..*s },
        x,
        l.a,
        None,
        t,
    );
    let sc = l.alpha / r as f32;
    for b in 0..s.n {
        for co in 0..s.cout {
            let out = &mut y[(b * s.cout + co) * p..(b * s.cout + co + 1) * p];
            for j in 0..r {
                let w = sc * l.b[co * r + j];
                for (o, &v) in out.iter_mut().zip(&t[(b * r + j) * p..(b * r + j + 1) * p]) {
                    *o += w * v;
                }
            }
        }
    }
}

fn run_matmul(cx: &Ctx<'_, '_>, mm: &MatMul, op: &OpInfo<'_>) {
    let (a, b, y) = (op.input(0), op.input(1), op.output(0));
    let scratch = cx.output::<f32>(op.scratch.expect("validated: matmul has scratch"));
    matmul(
        cx.kernels,
        mm,
        cx.input(a),
        &cx.shape(a),
        cx.input(b),
        &cx.shape(b),
        cx.output(y),
        &cx.shape(y),
        scratch,
    );
}

fn run_gather(cx: &Ctx<'_, '_>, op: &OpInfo<'_>, axis: usize) -> Result<(), RunError> {
    let (d, i, y) = (op.input(0), op.input(1), op.output(0));
    let ds = cx.shape(d);
    if let Weights::Quantized(q) = cx.weights_if_encoded(d) {
        // A compressed embedding table: decode only the gathered rows.
        let (rows, dim) = (ds.dim(0), ds.dim(1));
        let out = cx.output::<f32>(y);
        let idx: &mut dyn Iterator<Item = i64> = match cx.model.tensor(i).meta.dtype {
            DType::I64 => &mut cx.input::<i64>(i).iter().copied(),
            _ => &mut cx.input::<i32>(i).iter().map(|&v| v as i64),
        };
        for (j, raw) in idx.enumerate() {
            let r = if raw < 0 { raw + rows as i64 } else { raw };
            if r < 0 || r >= rows as i64 {
                return Err(RunError::IndexOutOfRange {
                    op: op.index,
                    index: raw,
                    dim: rows,
                });
            }
            decode_row(&q, r as usize, &mut out[j * dim..(j + 1) * dim]);
        }
        return Ok(());
    }
    let (outer, dim, inner) = (ds.prod(0, axis), ds.dim(axis), ds.prod(axis + 1, ds.rank()));
    fn go<T: Copy>(
        cx: &Ctx<'_, '_>,
        d: u32,
        i: u32,
        y: u32,
        g: (usize, usize, usize),
    ) -> Result<(), i64> {
        let data = cx.input::<T>(d);
        let out = cx.output::<T>(y);
        match cx.model.tensor(i).meta.dtype {
            DType::I64 => {
                movement::gather(data, g.0, g.1, g.2, cx.input::<i64>(i).iter().copied(), out)
            }
            _ => movement::gather(
                data,
                g.0,
                g.1,
                g.2,
                cx.input::<i32>(i).iter().map(|&v| v as i64),
                out,
            ),
        }
    }
    let dt = cx.model.tensor(d).meta.dtype;
    by_size!(dt, go(cx, d, i, y, (outer, dim, inner))).map_err(|index| RunError::IndexOutOfRange {
        op: op.index,
        index,
        dim,
    })
}

fn run_cast(cx: &Ctx<'_, '_>, x: u32, y: u32) {
    let (from, to) = (cx.model.tensor(x).meta.dtype, cx.model.tensor(y).meta.dtype);
    // Read every source as f64 or i64 exactly, then narrow.
    fn read(cx: &Ctx<'_, '_>, x: u32, dt: DType, i: usize) -> (f64, i64) {
        match dt {
            DType::F32 => {
                let v = cx.input::<f32>(x)[i];
                (v as f64, v as i64)
            }
            DType::I64 => {
                let v = cx.input::<i64>(x)[i];
                (v as f64, v)
            }
            DType::I32 => {
                let v = cx.input::<i32>(x)[i];
                (v as f64, v as i64)
            }
            DType::I8 => {
                let v = cx.input::<i8>(x)[i];
                (v as f64, v as i64)
            }
            DType::U8 | DType::Bool => {
                let v = cx.input::<u8>(x)[i];
                (v as f64, v as i64)
            }
            DType::F16 => (0.0, 0), // rejected by validation
        }
    }
    let n = cx.shape(y).numel();
    for i in 0..n {
        let (f, int) = read(cx, x, from, i);
        let is_float = from == DType::F32;
        match to {
            DType::F32 => cx.output::<f32>(y)[i] = f as f32,
            DType::I64 => cx.output::<i64>(y)[i] = if is_float { f as i64 } else { int },
            DType::I32 => cx.output::<i32>(y)[i] = if is_float { f as i32 } else { int as i32 },
            DType::I8 => cx.output::<i8>(y)[i] = if is_float { f as i8 } else { int as i8 },
            DType::U8 => cx.output::<u8>(y)[i] = if is_float { f as u8 } else { int as u8 },
            DType::Bool => {
                cx.output::<u8>(y)[i] = (if is_float { f != 0.0 } else { int != 0 }) as u8
            }
            DType::F16 => {}
        }
    }
}

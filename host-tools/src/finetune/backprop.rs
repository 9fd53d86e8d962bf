//! A first-order (backpropagation) baseline for adapter fine-tuning, host only.
//!
//! Devices train adapters with zeroth-order steps (forward passes only, `edgetune_runtime::train`).
//! To know what that costs in accuracy, this module trains the *same* trainable set with exact
//! gradients: [`Backprop`] runs a validated `.etm` model in plain f32 with an adapter's values
//! applied, keeps the activations the backward pass needs, and differentiates the mean
//! cross-entropy of output 0 with respect to every adapter value; [`train_first_order`] runs
//! Adam or SGD on minibatches.
//!
//! # What the forward computes
//!
//! Each op is re-implemented here in straightforward f32 (products go through the runtime's
//! GEMM micro-kernel, everything else is a plain loop), with weights decoded from their
//! encodings once, at construction. Adapter entries act as on the device:
//!
//! | entry | effect on op `op` |
//! |---|---|
//! | `Bias` `[N]` | replaces the bias of a dense layer or convolution (absent bias = zeros) |
//! | `NormGain`, `NormBias` `[inner]` | replace a layer norm's gamma / beta |
//! | `LogScale` `[N, groups]` | group scales of a block-quantized weight become `s · e^θ` |
//! | `Centroids` `[tables, 2^bits]` | replace the lookup tables of a block-quantized weight |
//! | `LoraA` `[r, K]`, `LoraB` `[N, r]`, α | `z += α/r · B·(A·x)` before bias and activation; for a convolution `A` reads the same im2col patches |
//! | `Head` `[N, K]` | replaces a dense layer's weight |
//!
//! Block-quantized weights that ask for int8 activations are computed here with f32
//! activations (the exact function the adapter parameterises), so outputs differ from the
//! runtime's by that quantization.
//!
//! # Supported ops
//!
//! With gradients (any op at or after the first adapted op): dense and convolution (any weight
//! encoding, any grouping, dilation and padding), unary activations (all kinds), max and average
//! pooling, reshape and aliases, binary add/sub/mul/div/min/max with broadcasting, layer and RMS
//! norm, softmax, transpose, concat, and sum/mean reductions. Ops before the first adapted op
//! only run forward, with the same set. Anything else is a [`BackpropError::UnsupportedOp`]
//! naming the op.

use std::fmt;

use edgetune_core::adapter::{expected_shape, Entry, EntryKind};
use edgetune_core::layout::{block_code, QBlockLayout};
use edgetune_core::ops::{Conv, Pool};
use edgetune_core::{
    ActKind, Activation, BinaryKind, DType, Encoding, Model, Op, ReduceKind, Shape, Storage, PANEL,
};
use edgetune_runtime::kernels::gemm::{gemm_with_threads, pack_b, packed_len, Gemm};
use edgetune_runtime::kernels::Kernels;
use edgetune_runtime::math;

/// Why a model, adapter or batch cannot be trained here.
#[derive(Debug, Clone, PartialEq)]
pub enum BackpropError {
    /// An op this module cannot run (or differentiate, when `backward`).
    UnsupportedOp {
        /// Op index in execution order.
        op: u32,
        /// Op kind (`matmul`, `gather`, ...).
        kind: &'static str,
        /// Source node name.
        name: String,
        /// True when only the backward pass is missing (the op is in the adapted tail).
        backward: bool,
        /// What is missing.
        why: &'static str,
    },
    /// An adapter entry that does not fit the model.
    BadEntry {
        /// Entry index.
        entry: usize,
        /// Why.
        why: &'static str,
    },
    /// Inputs, labels or values whose sizes do not fit the model or adapter.
    Mismatch(String),
}

impl fmt::Display for BackpropError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackpropError::UnsupportedOp {
                op,
                kind,
                name,
                backward,
                why,
            } => {
                let pass = if *backward {
                    "backward pass"
                } else {
                    "forward pass"
                };
                write!(f, "op #{op} {kind} ({name:?}): no {pass}: {why}")
            }
            BackpropError::BadEntry { entry, why } => write!(f, "adapter entry {entry}: {why}"),
            BackpropError::Mismatch(s) => write!(f, "{s}"),
        }
    }
}

impl std::error::Error for BackpropError {}

type Result<T> = std::result::Result<T, BackpropError>;

fn mismatch<T>(s: String) -> Result<T> {
    Err(BackpropError::Mismatch(s))
}

// ---------------------------------------------------------------------------------------------
// Weights.

/// Parts of a block-quantized weight (`w[n][k] = scale[n][k/G] · lut[n/R][code[n][k]]`).
struct QParts {
    layout: QBlockLayout,
    /// `n × k` codes (padding columns dropped).
    codes: Vec<u8>,
    /// `tables × 2^bits`.
    lut: Vec<f32>,
    /// `n × groups`.
    scales: Vec<f32>,
}

/// A dense or convolution weight decoded to row-major `[n, k]` f32.
struct LinearW {
    n: usize,
    k: usize,
    base: Vec<f32>,
    q: Option<QParts>,
}

fn f16_to_f32(h: u16) -> f32 {
    let sign = (h >> 15) as u32;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    if exp == 0 {
        // Zero or subnormal: man · 2^-24.
        let v = man as f32 * (1.0 / 16_777_216.0);
        return if sign != 0 { -v } else { v };
    }
    let bits = if exp == 31 {
        0x7f80_0000 | (man << 13)
    } else {
        ((exp + 112) << 23) | (man << 13)
    };
    f32::from_bits(sign << 31 | bits)
}

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([bytes[at], bytes[at + 1]]))
}

fn f32_vec(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn decode_weight(model: &Model<'_>, id: u32) -> std::result::Result<LinearW, &'static str> {
    let t = model.tensor(id);
    let s = t.meta.shape;
    if t.meta.dtype != DType::F32 || s.rank() != 2 {
        return Err("weight is not an f32 matrix");
    }
    if t.meta.storage != Storage::Const {
        return Err("weight computed at run time");
    }
    let (n, k) = (s.dim(0), s.dim(1));
    let bytes = model.const_bytes(id);
    let mut q = None;
    let base = match t.meta.encoding {
        Encoding::Plain => f32_vec(bytes),
        Encoding::PanelF32 => {
            let p = f32_vec(bytes);
            let mut w = vec![0.0; n * k];
            for r in 0..n {
                for c in 0..k {
                    w[r * k + c] = p[((r / PANEL) * k + c) * PANEL + r % PANEL];
                }
            }
            w
        }
        Encoding::QBlock => {
            let l = QBlockLayout::new(n, k, t.params).ok_or("bad block-quantized layout")?;
            let mut codes = vec![0u8; n * k];
            for r in 0..n {
                for c in 0..k {
                    let block = l.read_block(bytes, r, c / 32);
                    codes[r * k + c] = block_code(&block, l.bits, c % 32);
                }
            }
            let lut: Vec<f32> = (0..l.tables * l.entries())
                .map(|i| f16_at(bytes, l.lut_off + 2 * i))
                .collect();
            let gpr = l.groups_per_row();
            let scales: Vec<f32> = (0..n * gpr)
                .map(|i| f16_at(bytes, l.scale_offset(i / gpr, i % gpr)))
                .collect();
            let parts = QParts {
                layout: l,
                codes,
                lut,
                scales,
            };
            let mut w = vec![0.0; n * k];
            parts.build(None, None, &mut w);
            q = Some(parts);
            w
        }
        Encoding::PanelF16 | Encoding::SparseNM => {
            let e = edgetune_quant::encode::Encoded {
                encoding: t.meta.encoding,
                bytes: bytes.to_vec(),
                params: t.params,
            };
            edgetune_quant::encode::decode(&e, n, k).map_err(|_| "cannot decode the weight")?
        }
    };
    Ok(LinearW { n, k, base, q })
}

impl QParts {
    /// The weight with optional log-scale and centroid overrides.
    fn build(&self, log_scales: Option<&[f32]>, centroids: Option<&[f32]>, out: &mut [f32]) {
        let l = &self.layout;
        let (k, gpr, e) = (l.k, l.groups_per_row(), l.entries());
        let lut = centroids.unwrap_or(&self.lut);
        for r in 0..l.n {
            let t = r / l.rows_per_table;
            let table = &lut[t * e..(t + 1) * e];
            for g in 0..gpr {
                let c0 = g * l.group;
                if c0 >= k {
                    break;
                }
                let mut s = self.scales[r * gpr + g];
                if let Some(th) = log_scales {
                    s *= th[r * gpr + g].exp();
                }
                let c1 = (c0 + l.group).min(k);
                let row = &mut out[r * k + c0..r * k + c1];
                let codes = &self.codes[r * k + c0..r * k + c1];
                for (o, &c) in row.iter_mut().zip(codes) {
                    *o = s * table[c as usize];
                }
            }
        }
    }

    /// Gradients of the log-scales and centroids from the gradient `dw` of the weight.
    fn backward(
        &self,
        log_scales: Option<&[f32]>,
        centroids: Option<&[f32]>,
        dw: &[f32],
        g_ls: Option<&mut [f32]>,
        g_c: Option<&mut [f32]>,
    ) {
        let l = &self.layout;
        let (k, gpr, e) = (l.k, l.groups_per_row(), l.entries());
        let lut = centroids.unwrap_or(&self.lut);
        let (mut g_ls, mut g_c) = (g_ls, g_c);
        for r in 0..l.n {
            let t = r / l.rows_per_table;
            for g in 0..gpr {
                let c0 = g * l.group;
                if c0 >= k {
                    break;
                }
                let mut s = self.scales[r * gpr + g];
                if let Some(th) = log_scales {
                    s *= th[r * gpr + g].exp();
                }
                let c1 = (c0 + l.group).min(k);
                let codes = &self.codes[r * k + c0..r * k + c1];
                let d = &dw[r * k + c0..r * k + c1];
                if let Some(gl) = g_ls.as_deref_mut() {
                    // w = s·e^θ·lut: ∂w/∂θ = w.
                    let acc: f64 = codes
                        .iter()
                        .zip(d)
                        .map(|(&c, &dv)| dv as f64 * lut[t * e + c as usize] as f64)
                        .sum();
                    gl[r * gpr + g] += (acc * s as f64) as f32;
                }
                if let Some(gc) = g_c.as_deref_mut() {
                    for (&c, &dv) in codes.iter().zip(d) {
                        gc[t * e + c as usize] += dv * s;
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Products.

/// `C[i, j] (+)= Σ_kk A[i, kk] · B[kk, j]` with strided operands, on the runtime's GEMM kernel.
#[allow(clippy::too_many_arguments)]
fn mm(
    ker: &Kernels,
    pack: &mut Vec<f32>,
    (m, n, k): (usize, usize, usize),
    (a, a_rs, a_cs): (&[f32], usize, usize),
    (b, b_rs, b_cs): (&[f32], usize, usize),
    (c, c_rs, c_cs): (&mut [f32], usize, usize),
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    c[i * c_rs + j * c_cs] = 0.0;
                }
            }
        }
        return;
    }
    let len = packed_len(k, n);
    if pack.len() < len {
        pack.resize(len, 0.0);
    }
    pack_b(k, n, b, b_rs, b_cs, pack);
    if accumulate {
        let mut tmp = vec![0.0f32; m * n];
        gemm_with_threads(
            &ker.gemm,
            1,
            Gemm {
                m,
                n,
                k,
                a,
                a_rs,
                a_cs,
                b: pack,
                c: &mut tmp,
                c_rs: n,
                c_cs: 1,
                bias: None,
                act: Activation::NONE,
            },
        );
        for i in 0..m {
            for j in 0..n {
                c[i * c_rs + j * c_cs] += tmp[i * n + j];
            }
        }
    } else {
        gemm_with_threads(
            &ker.gemm,
            1,
            Gemm {
                m,
                n,
                k,
                a,
                a_rs,
                a_cs,
                b: pack,
                c,
                c_rs,
                c_cs,
                bias: None,
                act: Activation::NONE,
            },
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Element functions.

fn erf(x: f32) -> f32 {
    math::apply(&Activation::plain(ActKind::Erf), x)
}

/// `d act(z) / dz`, given `z` and `y = act(z)` (0 for the step functions).
fn act_grad(act: &Activation, z: f32, y: f32) -> f32 {
    match act.kind {
        ActKind::Identity => 1.0,
        ActKind::Relu => (z > 0.0) as u8 as f32,
        ActKind::Clip => (z >= act.a && z <= act.b) as u8 as f32,
        ActKind::Sigmoid => y * (1.0 - y),
        ActKind::HardSigmoid => {
            let t = act.a * z + act.b;
            if t > 0.0 && t < 1.0 {
                act.a
            } else {
                0.0
            }
        }
        ActKind::HardSwish => {
            let t = act.a * z + act.b;
            let h = t.clamp(0.0, 1.0);
            h + if t > 0.0 && t < 1.0 { z * act.a } else { 0.0 }
        }
        ActKind::Tanh => 1.0 - y * y,
        ActKind::Erf => core::f32::consts::FRAC_2_SQRT_PI * (-z * z).exp(),
        ActKind::Gelu => {
            let cdf = 0.5 * (1.0 + erf(z * core::f32::consts::FRAC_1_SQRT_2));
            let pdf = (-0.5 * z * z).exp()
                * (0.5 * core::f32::consts::FRAC_2_SQRT_PI * core::f32::consts::FRAC_1_SQRT_2);
            cdf + z * pdf
        }
        ActKind::Sqrt => 0.5 / y,
        ActKind::Rsqrt => -0.5 * y / z,
        ActKind::Exp => y,
        ActKind::Log => 1.0 / z,
        ActKind::Neg => -1.0,
        ActKind::Abs => {
            if z > 0.0 {
                1.0
            } else if z < 0.0 {
                -1.0
            } else {
                0.0
            }
        }
        ActKind::Recip => -y * y,
        ActKind::Square => 2.0 * z,
        ActKind::LeakyRelu => {
            if z >= 0.0 {
                1.0
            } else {
                act.a
            }
        }
        ActKind::Floor | ActKind::Ceil | ActKind::Round => 0.0,
        ActKind::Sin => z.cos(),
        ActKind::Cos => -z.sin(),
    }
}

/// Right-aligned broadcast strides of `s` inside `out` (0 along broadcast axes).
fn bcast_strides(out: &Shape, s: &Shape) -> Vec<usize> {
    let r = out.rank();
    let st = s.strides();
    let off = r - s.rank();
    (0..r)
        .map(|i| {
            if i < off || s.dim(i - off) == 1 {
                0
            } else {
                st[i - off]
            }
        })
        .collect()
}

/// Calls `f(out_index, a_index, b_index)` for every element of `out`.
fn for_each_bcast(out: &Shape, sa: &[usize], sb: &[usize], mut f: impl FnMut(usize, usize, usize)) {
    let r = out.rank();
    let n = out.numel();
    let mut idx = vec![0usize; r];
    let (mut ia, mut ib) = (0usize, 0usize);
    for o in 0..n {
        f(o, ia, ib);
        let mut d = r;
        while d > 0 {
            d -= 1;
            idx[d] += 1;
            ia += sa[d];
            ib += sb[d];
            if idx[d] < out.dim(d) {
                break;
            }
            ia -= sa[d] * out.dim(d);
            ib -= sb[d] * out.dim(d);
            idx[d] = 0;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Convolution helpers.

#[derive(Clone, Copy)]
struct ConvGeom {
    n: usize,
    cin: usize,
    h: usize,
    w: usize,
    cout: usize,
    ho: usize,
    wo: usize,
    groups: usize,
    kh: usize,
    kw: usize,
}

impl ConvGeom {
    fn cin_g(&self) -> usize {
        self.cin / self.groups
    }
    fn cout_g(&self) -> usize {
        self.cout / self.groups
    }
    fn kg(&self) -> usize {
        self.cin_g() * self.kh * self.kw
    }
    fn p(&self) -> usize {
        self.ho * self.wo
    }
}

/// Patches of group `gi` of one image: `cols[p · Kg + (ci·kh + ky)·kw + kx]`.
fn im2col(c: &Conv, g: &ConvGeom, xb: &[f32], gi: usize, cols: &mut [f32]) {
    let kg = g.kg();
    let plane = g.h * g.w;
    for p in 0..g.p() {
        let (oy, ox) = (p / g.wo, p % g.wo);
        let y0 = (oy * c.stride[0] as usize) as isize - c.pads[0] as isize;
        let x0 = (ox * c.stride[1] as usize) as isize - c.pads[1] as isize;
        let row = &mut cols[p * kg..(p + 1) * kg];
        let mut j = 0;
        for ci in 0..g.cin_g() {
            let xp = &xb[(gi * g.cin_g() + ci) * plane..][..plane];
            for ky in 0..g.kh {
                let iy = y0 + (ky * c.dilation[0] as usize) as isize;
                for kx in 0..g.kw {
                    let ix = x0 + (kx * c.dilation[1] as usize) as isize;
                    row[j] = if iy >= 0 && iy < g.h as isize && ix >= 0 && ix < g.w as isize {
                        xp[iy as usize * g.w + ix as usize]
                    } else {
                        0.0
                    };
                    j += 1;
                }
            }
        }
    }
}

/// Adds patch gradients back onto the image gradient (the transpose of [`im2col`]).
fn col2im(c: &Conv, g: &ConvGeom, dcols: &[f32], gi: usize, dxb: &mut [f32]) {
    let kg = g.kg();
    let plane = g.h * g.w;
    for p in 0..g.p() {
        let (oy, ox) = (p / g.wo, p % g.wo);
        let y0 = (oy * c.stride[0] as usize) as isize - c.pads[0] as isize;
        let x0 = (ox * c.stride[1] as usize) as isize - c.pads[1] as isize;
        let row = &dcols[p * kg..(p + 1) * kg];
        let mut j = 0;
        for ci in 0..g.cin_g() {
            let base = (gi * g.cin_g() + ci) * plane;
            for ky in 0..g.kh {
                let iy = y0 + (ky * c.dilation[0] as usize) as isize;
                for kx in 0..g.kw {
                    let ix = x0 + (kx * c.dilation[1] as usize) as isize;
                    if iy >= 0 && iy < g.h as isize && ix >= 0 && ix < g.w as isize {
                        dxb[base + iy as usize * g.w + ix as usize] += row[j];
                    }
                    j += 1;
                }
            }
        }
    }
}

/// Visits each pooling window: `f(out_index, input_indices_in_order, divisor)`.
fn for_each_window(
    p: &Pool,
    planes: usize,
    h: usize,
    w: usize,
    ho: usize,
    wo: usize,
    mut f: impl FnMut(usize, &[usize], f32),
) {
    let (kh, kw) = (p.kernel[0] as usize, p.kernel[1] as usize);
    let (sh, sw) = (p.stride[0] as usize, p.stride[1] as usize);
    let (pt, pl) = (p.pads[0] as isize, p.pads[1] as isize);
    let mut idx = Vec::with_capacity(kh * kw);
    for c in 0..planes {
        for oy in 0..ho {
            let y0 = (oy * sh) as isize - pt;
            for ox in 0..wo {
                let x0 = (ox * sw) as isize - pl;
                idx.clear();
                for ky in 0..kh as isize {
                    let iy = y0 + ky;
                    if iy < 0 || iy >= h as isize {
                        continue;
                    }
                    for kx in 0..kw as isize {
                        let ix = x0 + kx;
                        if ix < 0 || ix >= w as isize {
                            continue;
                        }
                        idx.push(c * h * w + iy as usize * w + ix as usize);
                    }
                }
                let div = if p.count_include_pad {
                    // The window clipped to the padded input, as the runtime counts it.
                    let ey =
                        ((y0 + kh as isize).min(h as isize + p.pads[2] as isize) - y0) as usize;
                    let ex =
                        ((x0 + kw as isize).min(w as isize + p.pads[3] as isize) - x0) as usize;
                    (ey * ex) as f32
                } else {
                    idx.len().max(1) as f32
                };
                f(c * ho * wo + oy * wo + ox, &idx, div);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The engine.

/// Indices (into the entry list) of the entries on one op.
#[derive(Debug, Clone, Copy, Default)]
struct OpEntries {
    bias: Option<usize>,
    gain: Option<usize>,
    shift: Option<usize>,
    log_scale: Option<usize>,
    centroids: Option<usize>,
    lora_a: Option<usize>,
    lora_b: Option<usize>,
    head: Option<usize>,
}

impl OpEntries {
    fn slot(&mut self, kind: EntryKind) -> &mut Option<usize> {
        match kind {
            EntryKind::Bias => &mut self.bias,
            EntryKind::NormGain => &mut self.gain,
            EntryKind::NormBias => &mut self.shift,
            EntryKind::LogScale => &mut self.log_scale,
            EntryKind::Centroids => &mut self.centroids,
            EntryKind::LoraA => &mut self.lora_a,
            EntryKind::LoraB => &mut self.lora_b,
            EntryKind::Head => &mut self.head,
        }
    }
    /// True when the weight itself is rebuilt from adapter values.
    fn rebuilds_weight(&self) -> bool {
        self.head.is_none() && (self.log_scale.is_some() || self.centroids.is_some())
    }
    /// True when the backward pass needs the weight gradient.
    fn needs_dw(&self) -> bool {
        self.head.is_some() || self.log_scale.is_some() || self.centroids.is_some()
    }
}

/// What the forward pass keeps per op for the backward pass.
#[derive(Default)]
struct Saved {
    /// Pre-activation outputs of dense layers and convolutions.
    z: Vec<f32>,
    /// LoRA intermediates `A·x` (unscaled): dense `[m, r]`, convolution `[batch, r, P]`.
    u: Vec<f32>,
    /// The weight rebuilt from log-scales or centroids.
    w: Option<Vec<f32>>,
}

/// Forward and backward passes of a validated model in host f32, with an adapter applied.
///
/// ```no_run
/// # fn demo(model: edgetune_core::Model<'_>, entries: &[edgetune_core::adapter::Entry],
/// #         values: &[f32], x: &[f32], labels: &[i64]) -> Result<(), Box<dyn std::error::Error>> {
/// use edgetune_cli::finetune::backprop::Backprop;
/// let mut bp = Backprop::new(model, entries)?;
/// let mut grad = vec![0.0; values.len()];
/// let loss = bp.loss_and_grad(x, labels, values, &mut grad)?;
/// println!("loss {loss}, |g| {}", grad.iter().map(|g| g * g).sum::<f32>().sqrt());
/// # Ok(()) }
/// ```
pub struct Backprop<'m> {
    model: Model<'m>,
    entries: Vec<Entry>,
    per_op: Vec<OpEntries>,
    /// First op an entry applies to (`op_count` when there is none).
    first: u32,
    /// Tensor whose bytes each tensor uses (itself unless an alias).
    root: Vec<u32>,
    /// Op writing each (root) tensor.
    producer: Vec<Option<u32>>,
    /// Plain f32 constants, decoded.
    consts: Vec<Option<Vec<f32>>>,
    /// Decoded weights of dense layers and convolutions.
    linear: Vec<Option<LinearW>>,
    input: u32,
    output: u32,
    batch: usize,
    sample_len: usize,
    classes: usize,
    values_needed: usize,
    kernels: Kernels,
    vals: Vec<Option<Vec<f32>>>,
    grads: Vec<Option<Vec<f32>>>,
    saved: Vec<Saved>,
    pack: Vec<f32>,
}

impl<'m> Backprop<'m> {
    /// Prepares a model and an adapter's entries (as built by
    /// `edgetune_runtime::adapter::Adapter::add` or read from a `.eta` file): checks each entry
    /// against its op, that every op can run forward, and that every op from the first adapted
    /// one on can run backward; decodes the weights once.
    pub fn new(model: Model<'m>, entries: &[Entry]) -> Result<Backprop<'m>> {
        let n_ops = model.op_count();
        let n_t = model.tensor_count() as usize;
        let mut per_op = vec![OpEntries::default(); n_ops as usize];
        let mut values_needed = 0usize;
        for (i, e) in entries.iter().enumerate() {
            let bad = |why| BackpropError::BadEntry { entry: i, why };
            let (rows, cols) = expected_shape(&model, e.kind, e.op, e.rank).map_err(bad)?;
            if e.rows != rows || e.cols != cols || e.len != rows * cols {
                return Err(bad("shape does not fit its op"));
            }
            if matches!(e.kind, EntryKind::LoraA | EntryKind::LoraB) && e.rank == 0 {
                return Err(bad("LoRA rank is zero"));
            }
            let slot = per_op[e.op as usize].slot(e.kind);
            if slot.is_some() {
                return Err(bad("two entries of one kind on one op"));
            }
            *slot = Some(i);
            values_needed = values_needed.max(e.range().end);
        }
        for pe in &per_op {
            match (pe.lora_a, pe.lora_b) {
                (Some(a), Some(b)) if entries[a].rank != entries[b].rank => {
                    return Err(BackpropError::BadEntry {
                        entry: b,
                        why: "LoRA A and B ranks differ",
                    })
                }
                (Some(a), None) => {
                    return Err(BackpropError::BadEntry {
                        entry: a,
                        why: "LoRA A without B",
                    })
                }
                (None, Some(b)) => {
                    return Err(BackpropError::BadEntry {
                        entry: b,
                        why: "LoRA B without A",
                    })
                }
                _ => {}
            }
        }
        let first = entries.iter().map(|e| e.op).min().unwrap_or(n_ops);

        let mut root = vec![0u32; n_t];
        for (id, r) in root.iter_mut().enumerate() {
            *r = model.tensor(id as u32).alias_of.unwrap_or(id as u32);
        }
        let mut producer = vec![None; n_t];
        let mut consts: Vec<Option<Vec<f32>>> = vec![None; n_t];
        let mut linear: Vec<Option<LinearW>> = (0..n_ops).map(|_| None).collect();
        for info in model.ops() {
            let i = info.index;
            let unsupported = |backward: bool, why: &'static str| BackpropError::UnsupportedOp {
                op: i,
                kind: info.op.name(),
                name: info.name.to_string(),
                backward,
                why,
            };
            for out in info.outputs() {
                producer[root[out as usize] as usize] = Some(i);
            }
            let in_tail = i >= first;
            let f32_only = || -> Result<()> {
                for t in info.inputs().chain(info.outputs()) {
                    let ti = model.tensor(t);
                    let weight = matches!(info.op, Op::Dense(_) | Op::Conv(_))
                        && Some(t) == (info.n_inputs() > 1).then(|| info.input(1));
                    if ti.meta.dtype != DType::F32
                        || (ti.meta.encoding != Encoding::Plain && !weight)
                    {
                        return Err(unsupported(false, "only f32 tensors are supported"));
                    }
                }
                Ok(())
            };
            match info.op {
                Op::Dense(_) | Op::Conv(_) => {
                    f32_only()?;
                    let w = decode_weight(&model, info.input(1))
                        .map_err(|why| unsupported(false, why))?;
                    linear[i as usize] = Some(w);
                }
                Op::Unary(_)
                | Op::Pool(_)
                | Op::Softmax { .. }
                | Op::Reshape
                | Op::Transpose { .. }
                | Op::Concat { .. } => f32_only()?,
                Op::Binary(k) => {
                    f32_only()?;
                    if !matches!(
                        k,
                        BinaryKind::Add
                            | BinaryKind::Sub
                            | BinaryKind::Mul
                            | BinaryKind::Div
                            | BinaryKind::Min
                            | BinaryKind::Max
                    ) {
                        return Err(unsupported(false, "only add, sub, mul, div, min and max"));
                    }
                }
                Op::LayerNorm { .. } => {
                    f32_only()?;
                    if in_tail {
                        for j in 1..info.n_inputs() {
                            if model.tensor(info.input(j)).meta.storage != Storage::Const {
                                return Err(unsupported(
                                    true,
                                    "gain or shift computed at run time",
                                ));
                            }
                        }
                    }
                }
                Op::Reduce { kind, .. } => {
                    f32_only()?;
                    if !matches!(kind, ReduceKind::Sum | ReduceKind::Mean) {
                        return Err(unsupported(false, "only sum and mean reductions"));
                    }
                }
                _ => return Err(unsupported(false, "op not implemented in the host trainer")),
            }
            for t in info.inputs() {
                let ti = model.tensor(t);
                if ti.meta.storage == Storage::Const
                    && ti.meta.encoding == Encoding::Plain
                    && ti.meta.dtype == DType::F32
                    && consts[t as usize].is_none()
                {
                    consts[t as usize] = Some(f32_vec(model.const_bytes(t)));
                }
            }
        }
        let input = model
            .input(0)
            .ok_or_else(|| BackpropError::Mismatch("model has no input".into()))?
            .tensor;
        if model.inputs().count() != 1 {
            return mismatch("only models with one input are supported".into());
        }
        let it = model.tensor(input);
        if it.meta.dtype != DType::F32 || it.meta.shape.rank() == 0 {
            return mismatch("input 0 must be an f32 tensor with a batch axis".into());
        }
        let output = model
            .output(0)
            .expect("validated models have an output")
            .tensor;
        let os = model.tensor(output).meta.shape;
        if model.tensor(output).meta.dtype != DType::F32 || os.rank() == 0 {
            return mismatch("output 0 must be f32 logits [batch, classes]".into());
        }
        let batch = it.meta.shape.dim(0);
        let classes = os.back(1);
        if os.numel() / classes != batch {
            return mismatch(format!("output 0 {os} is not [batch = {batch}, classes]"));
        }
        Ok(Backprop {
            model,
            entries: entries.to_vec(),
            per_op,
            first,
            sample_len: it.meta.shape.numel() / batch,
            input: root[input as usize],
            output: root[output as usize],
            root,
            producer,
            consts,
            linear,
            batch,
            classes,
            values_needed,
            kernels: Kernels::best().with_threads(1),
            vals: vec![None; n_t],
            grads: vec![None; n_t],
            saved: (0..n_ops).map(|_| Saved::default()).collect(),
            pack: Vec::new(),
        })
    }

    /// The model.
    pub fn model(&self) -> &Model<'m> {
        &self.model
    }

    /// The adapter entries.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Samples per forward pass (dimension 0 of input 0).
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// f32 values of one sample of input 0.
    pub fn sample_len(&self) -> usize {
        self.sample_len
    }

    /// Classes (last dimension of output 0).
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// The first op an entry applies to: where the backward pass stops.
    pub fn first_adapted_op(&self) -> Option<u32> {
        (self.first < self.model.op_count()).then_some(self.first)
    }

    /// Adapter values the entries index (the length `values` must have at least).
    pub fn values_len(&self) -> usize {
        self.values_needed
    }

    fn val(&self, id: u32) -> &[f32] {
        if let Some(c) = &self.consts[id as usize] {
            return c;
        }
        self.vals[self.root[id as usize] as usize]
            .as_deref()
            .expect("tensor computed before use")
    }

    fn shape(&self, id: u32) -> Shape {
        self.model.tensor(id).meta.shape
    }

    /// True when the backward pass must produce the gradient of tensor `id`.
    fn needs_grad(&self, id: u32) -> bool {
        let r = self.root[id as usize] as usize;
        self.consts[id as usize].is_none() && self.producer[r].is_some_and(|p| p >= self.first)
    }

    fn add_grad(&mut self, id: u32, g: Vec<f32>) {
        let r = self.root[id as usize] as usize;
        match &mut self.grads[r] {
            Some(acc) => acc.iter_mut().zip(&g).for_each(|(a, b)| *a += b),
            slot => *slot = Some(g),
        }
    }

    fn entry_vals<'v>(&self, values: &'v [f32], e: Option<usize>) -> Option<&'v [f32]> {
        e.map(|i| &values[self.entries[i].range()])
    }

    /// Runs the model on one batch (`x` holds `batch · sample_len` values) with the adapter
    /// `values` applied, and returns output 0 (`[batch, classes]` logits).
    pub fn forward(&mut self, x: &[f32], values: &[f32]) -> Result<&[f32]> {
        self.run_forward(x, values)?;
        Ok(self.val(self.output))
    }

    /// Any tensor computed by the last [`Backprop::forward`] (activations, by tensor id).
    pub fn tensor(&self, id: u32) -> Option<&[f32]> {
        if let Some(c) = self.consts.get(id as usize)?.as_deref() {
            return Some(c);
        }
        self.vals[*self.root.get(id as usize)? as usize].as_deref()
    }

    fn check_values(&self, values: &[f32]) -> Result<()> {
        if values.len() < self.values_needed {
            return mismatch(format!(
                "adapter needs {} values, got {}",
                self.values_needed,
                values.len()
            ));
        }
        Ok(())
    }

    fn run_forward(&mut self, x: &[f32], values: &[f32]) -> Result<()> {
        self.check_values(values)?;
        if x.len() != self.batch * self.sample_len {
            return mismatch(format!(
                "input has {} values, the model takes {}",
                x.len(),
                self.batch * self.sample_len
            ));
        }
        self.vals.iter_mut().for_each(|v| *v = None);
        self.vals[self.input as usize] = Some(x.to_vec());
        for i in 0..self.model.op_count() {
            self.forward_op(i, values);
        }
        Ok(())
    }

    fn forward_op(&mut self, i: u32, values: &[f32]) {
        let info = self.model.op(i);
        let out = info.output(0);
        let ys = self.shape(out);
        let keep = i >= self.first;
        let y: Vec<f32> = match info.op {
            Op::Dense(d) => self.dense_forward(i, values, d.act, keep),
            Op::Conv(c) => self.conv_forward(i, values, &c, keep),
            Op::Unary(act) => self
                .val(info.input(0))
                .iter()
                .map(|&v| math::apply(&act, v))
                .collect(),
            Op::Pool(p) => {
                let (xs, x) = (self.shape(info.input(0)), self.val(info.input(0)));
                let mut y = vec![0.0; ys.numel()];
                for_each_window(
                    &p,
                    xs.dim(0) * xs.dim(1),
                    xs.dim(2),
                    xs.dim(3),
                    ys.dim(2),
                    ys.dim(3),
                    |o, idx, div| {
                        y[o] = if p.max {
                            let mut acc = f32::NEG_INFINITY;
                            for &j in idx {
                                if x[j] > acc || x[j].is_nan() {
                                    acc = x[j];
                                }
                            }
                            acc
                        } else {
                            idx.iter().map(|&j| x[j]).sum::<f32>() / div
                        };
                    },
                );
                y
            }
            Op::Reshape => self.val(info.input(0)).to_vec(),
            Op::Binary(kind) => {
                let (a, b) = (info.input(0), info.input(1));
                let (sa, sb) = (
                    bcast_strides(&ys, &self.shape(a)),
                    bcast_strides(&ys, &self.shape(b)),
                );
                let (av, bv) = (self.val(a), self.val(b));
                let mut y = vec![0.0; ys.numel()];
                for_each_bcast(&ys, &sa, &sb, |o, ia, ib| {
                    let (p, q) = (av[ia], bv[ib]);
                    y[o] = match kind {
                        BinaryKind::Add => p + q,
                        BinaryKind::Sub => p - q,
                        BinaryKind::Mul => p * q,
                        BinaryKind::Div => p / q,
                        BinaryKind::Min => p.min(q),
                        BinaryKind::Max => p.max(q),
                        _ => unreachable!("checked at construction"),
                    };
                });
                y
            }
            Op::Softmax { axis } => {
                let ax = axis as usize;
                let (outer, n, inner) = (ys.prod(0, ax), ys.dim(ax), ys.prod(ax + 1, ys.rank()));
                let x = self.val(info.input(0));
                let mut y = vec![0.0; ys.numel()];
                edgetune_runtime::kernels::norm::softmax(x, &mut y, outer, n, inner);
                y
            }
            Op::LayerNorm { axis, eps, rms } => {
                let inner = ys.prod(axis as usize, ys.rank());
                let pe = self.per_op[i as usize];
                let gamma = self
                    .entry_vals(values, pe.gain)
                    .or_else(|| (info.n_inputs() > 1).then(|| self.val(info.input(1))));
                let beta = self
                    .entry_vals(values, pe.shift)
                    .or_else(|| (info.n_inputs() > 2).then(|| self.val(info.input(2))));
                let mut y = vec![0.0; ys.numel()];
                edgetune_runtime::kernels::norm::layer_norm(
                    self.val(info.input(0)),
                    &mut y,
                    inner,
                    gamma,
                    beta,
                    eps,
                    rms,
                );
                y
            }
            Op::Transpose { perm } => {
                let (xs, x) = (self.shape(info.input(0)), self.val(info.input(0)));
                let xst = xs.strides();
                let st: Vec<usize> = (0..ys.rank()).map(|d| xst[perm[d] as usize]).collect();
                let mut y = vec![0.0; ys.numel()];
                for_each_bcast(&ys, &st, &st, |o, ix, _| y[o] = x[ix]);
                y
            }
            Op::Concat { axis } => {
                let ax = axis as usize;
                let (outer, inner) = (ys.prod(0, ax), ys.prod(ax + 1, ys.rank()));
                let row = ys.dim(ax) * inner;
                let mut y = vec![0.0; ys.numel()];
                let mut off = 0;
                for t in info.inputs() {
                    let block = self.shape(t).dim(ax) * inner;
                    let x = self.val(t);
                    for o in 0..outer {
                        y[o * row + off..o * row + off + block]
                            .copy_from_slice(&x[o * block..(o + 1) * block]);
                    }
                    off += block;
                }
                y
            }
            Op::Reduce { kind, axes, .. } => {
                let (xs, x) = (self.shape(info.input(0)), self.val(info.input(0)));
                let (ost, count) = reduce_map(&xs, axes);
                let mut y = vec![0.0; ys.numel()];
                for_each_bcast(&xs, &ost, &ost, |ix, o, _| y[o] += x[ix]);
                if kind == ReduceKind::Mean {
                    y.iter_mut().for_each(|v| *v /= count as f32);
                }
                y
            }
            _ => unreachable!("checked at construction"),
        };
        self.vals[out as usize] = Some(y);
    }

    /// Effective weight of a dense layer or convolution.
    fn weight<'a>(&'a self, i: u32, values: &'a [f32]) -> &'a [f32] {
        let pe = &self.per_op[i as usize];
        if let Some(h) = self.entry_vals(values, pe.head) {
            return h;
        }
        if let Some(w) = &self.saved[i as usize].w {
            return w;
        }
        &self.linear[i as usize].as_ref().expect("linear op").base
    }

    fn bias<'a>(&'a self, i: u32, values: &'a [f32]) -> Option<&'a [f32]> {
        let info = self.model.op(i);
        self.entry_vals(values, self.per_op[i as usize].bias)
            .or_else(|| (info.n_inputs() > 2).then(|| self.val(info.input(2))))
    }

    fn rebuild_weight(&mut self, i: u32, values: &[f32]) {
        let pe = self.per_op[i as usize];
        if !pe.rebuilds_weight() {
            self.saved[i as usize].w = None;
            return;
        }
        let lw = self.linear[i as usize].as_ref().expect("linear op");
        let q =
            lw.q.as_ref()
                .expect("log-scales and centroids apply to block-quantized weights");
        let mut w = self.saved[i as usize].w.take().unwrap_or_default();
        w.resize(lw.n * lw.k, 0.0);
        q.build(
            self.entry_vals(values, pe.log_scale),
            self.entry_vals(values, pe.centroids),
            &mut w,
        );
        self.saved[i as usize].w = Some(w);
    }

    fn lora<'a>(&self, i: u32, values: &'a [f32]) -> Option<(&'a [f32], &'a [f32], usize, f32)> {
        let pe = &self.per_op[i as usize];
        let (a, b) = (pe.lora_a?, pe.lora_b?);
        let e = &self.entries[a];
        let r = e.rank as usize;
        Some((
            &values[e.range()],
            &values[self.entries[b].range()],
            r,
            e.alpha / r as f32,
        ))
    }

    fn dense_forward(&mut self, i: u32, values: &[f32], act: Activation, keep: bool) -> Vec<f32> {
        self.rebuild_weight(i, values);
        let mut pack = std::mem::take(&mut self.pack);
        let info = self.model.op(i);
        let (n, k) = {
            let l = self.linear[i as usize].as_ref().unwrap();
            (l.n, l.k)
        };
        let x = self.val(info.input(0));
        let m = x.len() / k;
        let mut z = vec![0.0f32; m * n];
        let w = self.weight(i, values);
        mm(
            &self.kernels,
            &mut pack,
            (m, n, k),
            (x, k, 1),
            (w, 1, k),
            (&mut z, n, 1),
            false,
        );
        let mut u = Vec::new();
        if let Some((a, b, r, s)) = self.lora(i, values) {
            u = vec![0.0f32; m * r];
            mm(
                &self.kernels,
                &mut pack,
                (m, r, k),
                (x, k, 1),
                (a, 1, k),
                (&mut u, r, 1),
                false,
            );
            let us: Vec<f32> = u.iter().map(|v| v * s).collect();
            mm(
                &self.kernels,
                &mut pack,
                (m, n, r),
                (&us, r, 1),
                (b, 1, r),
                (&mut z, n, 1),
                true,
            );
        }
        if let Some(bias) = self.bias(i, values) {
            for row in z.chunks_exact_mut(n) {
                row.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
            }
        }
        let y = z.iter().map(|&v| math::apply(&act, v)).collect();
        self.pack = pack;
        if keep {
            let s = &mut self.saved[i as usize];
            s.z = z;
            s.u = u;
        }
        y
    }

    fn conv_geom(&self, i: u32, c: &Conv) -> ConvGeom {
        let info = self.model.op(i);
        let (xs, ys) = (self.shape(info.input(0)), self.shape(info.output(0)));
        ConvGeom {
            n: xs.dim(0),
            cin: xs.dim(1),
            h: xs.dim(2),
            w: xs.dim(3),
            cout: ys.dim(1),
            ho: ys.dim(2),
            wo: ys.dim(3),
            groups: c.groups as usize,
            kh: c.kernel[0] as usize,
            kw: c.kernel[1] as usize,
        }
    }

    fn conv_forward(&mut self, i: u32, values: &[f32], c: &Conv, keep: bool) -> Vec<f32> {
        self.rebuild_weight(i, values);
        let mut pack = std::mem::take(&mut self.pack);
        let info = self.model.op(i);
        let g = self.conv_geom(i, c);
        let (kg, p, cout_g) = (g.kg(), g.p(), g.cout_g());
        let x = self.val(info.input(0));
        let w = self.weight(i, values);
        let lora = self.lora(i, values);
        let mut z = vec![0.0f32; g.n * g.cout * p];
        let mut u = match lora {
            Some((_, _, r, _)) => vec![0.0f32; g.n * r * p],
            None => Vec::new(),
        };
        let mut cols = vec![0.0f32; p * kg];
        let plane = g.cin * g.h * g.w;
        for b in 0..g.n {
            let xb = &x[b * plane..(b + 1) * plane];
            for gi in 0..g.groups {
                im2col(c, &g, xb, gi, &mut cols);
                let zb = &mut z[(b * g.cout + gi * cout_g) * p..];
                mm(
                    &self.kernels,
                    &mut pack,
                    (p, cout_g, kg),
                    (&cols, kg, 1),
                    (&w[gi * cout_g * kg..], 1, kg),
                    (zb, 1, p),
                    false,
                );
            }
            if let Some((a, bm, r, s)) = lora {
                let ub = &mut u[b * r * p..(b + 1) * r * p];
                mm(
                    &self.kernels,
                    &mut pack,
                    (p, r, kg),
                    (&cols, kg, 1),
                    (a, 1, kg),
                    (ub, 1, p),
                    false,
                );
                let us: Vec<f32> = ub.iter().map(|v| v * s).collect();
                let zb = &mut z[b * g.cout * p..(b + 1) * g.cout * p];
                mm(
                    &self.kernels,
                    &mut pack,
                    (p, g.cout, r),
                    (&us, 1, p),
                    (bm, 1, r),
                    (zb, 1, p),
                    true,
                );
            }
        }
        if let Some(bias) = self.bias(i, values) {
            for (j, plane) in z.chunks_exact_mut(p).enumerate() {
                let bv = bias[j % g.cout];
                plane.iter_mut().for_each(|v| *v += bv);
            }
        }
        let y = z.iter().map(|&v| math::apply(&c.act, v)).collect();
        self.pack = pack;
        if keep {
            let s = &mut self.saved[i as usize];
            s.z = z;
            s.u = u;
        }
        y
    }

    /// Mean cross-entropy of output 0 against `labels` (one per sample) after a forward pass, in
    /// f64; the same function as `edgetune_runtime::train::cross_entropy` (labels past the last
    /// class count as the last class).
    pub fn loss(&mut self, x: &[f32], labels: &[i64], values: &[f32]) -> Result<f64> {
        self.check_labels(labels)?;
        self.run_forward(x, values)?;
        Ok(cross_entropy_f64(
            self.val(self.output),
            self.classes,
            labels,
            None,
        ))
    }

    fn check_labels(&self, labels: &[i64]) -> Result<()> {
        if labels.len() != self.batch {
            return mismatch(format!(
                "{} labels for a batch of {}",
                labels.len(),
                self.batch
            ));
        }
        Ok(())
    }

    /// Loss (as [`Backprop::loss`]) and its gradient with respect to every adapter value, added
    /// into `grad` (same indexing as `values`; zero it first for a plain gradient).
    pub fn loss_and_grad(
        &mut self,
        x: &[f32],
        labels: &[i64],
        values: &[f32],
        grad: &mut [f32],
    ) -> Result<f64> {
        self.check_labels(labels)?;
        if grad.len() < self.values_needed {
            return mismatch(format!(
                "gradient buffer needs {} values, got {}",
                self.values_needed,
                grad.len()
            ));
        }
        self.run_forward(x, values)?;
        let mut dlogits = vec![0.0f32; self.batch * self.classes];
        let loss = cross_entropy_f64(
            self.val(self.output),
            self.classes,
            labels,
            Some(&mut dlogits),
        );
        self.grads.iter_mut().for_each(|g| *g = None);
        if self.first >= self.model.op_count() {
            return Ok(loss);
        }
        self.grads[self.output as usize] = Some(dlogits);
        for i in (self.first..self.model.op_count()).rev() {
            self.backward_op(i, values, grad);
        }
        Ok(loss)
    }

    fn backward_op(&mut self, i: u32, values: &[f32], grad: &mut [f32]) {
        let info = self.model.op(i);
        let out = info.output(0);
        let Some(dy) = self.grads[out as usize].take() else {
            return; // not on a path to output 0
        };
        let ys = self.shape(out);
        match info.op {
            Op::Dense(d) => self.dense_backward(i, values, &d.act, dy, grad),
            Op::Conv(c) => self.conv_backward(i, values, &c, dy, grad),
            Op::Unary(act) => {
                let x = info.input(0);
                if self.needs_grad(x) {
                    let (xv, yv) = (self.val(x), self.val(out));
                    let dx = dy
                        .iter()
                        .zip(xv)
                        .zip(yv)
                        .map(|((&g, &z), &y)| g * act_grad(&act, z, y))
                        .collect();
                    self.add_grad(x, dx);
                }
            }
            Op::Pool(p) => {
                let x = info.input(0);
                if self.needs_grad(x) {
                    let xs = self.shape(x);
                    let xv = self.val(x);
                    let mut dx = vec![0.0f32; xs.numel()];
                    for_each_window(
                        &p,
                        xs.dim(0) * xs.dim(1),
                        xs.dim(2),
                        xs.dim(3),
                        ys.dim(2),
                        ys.dim(3),
                        |o, idx, div| {
                            if p.max {
                                let mut best: Option<usize> = None;
                                let mut acc = f32::NEG_INFINITY;
                                for &j in idx {
                                    if xv[j] > acc || xv[j].is_nan() {
                                        acc = xv[j];
                                        best = Some(j);
                                    }
                                }
                                if let Some(j) = best {
                                    dx[j] += dy[o];
                                }
                            } else {
                                for &j in idx {
                                    dx[j] += dy[o] / div;
                                }
                            }
                        },
                    );
                    self.add_grad(x, dx);
                }
            }
            Op::Reshape => {
                let x = info.input(0);
                if self.needs_grad(x) {
                    self.add_grad(x, dy);
                }
            }
            Op::Binary(kind) => {
                let (a, b) = (info.input(0), info.input(1));
                let (as_, bs) = (self.shape(a), self.shape(b));
                let (sa, sb) = (bcast_strides(&ys, &as_), bcast_strides(&ys, &bs));
                let (na, nb) = (self.needs_grad(a), self.needs_grad(b));
                let (av, bv) = (self.val(a), self.val(b));
                let mut da = vec![0.0f32; if na { as_.numel() } else { 0 }];
                let mut db = vec![0.0f32; if nb { bs.numel() } else { 0 }];
                for_each_bcast(&ys, &sa, &sb, |o, ia, ib| {
                    let (g, p, q) = (dy[o], av[ia], bv[ib]);
                    let (ga, gb) = match kind {
                        BinaryKind::Add => (g, g),
                        BinaryKind::Sub => (g, -g),
                        BinaryKind::Mul => (g * q, g * p),
                        BinaryKind::Div => (g / q, -g * p / (q * q)),
                        // Ties go to `a`, as `f32::min`/`max` return it.
                        BinaryKind::Min => {
                            if p <= q || q.is_nan() {
                                (g, 0.0)
                            } else {
                                (0.0, g)
                            }
                        }
                        BinaryKind::Max => {
                            if p >= q || q.is_nan() {
                                (g, 0.0)
                            } else {
                                (0.0, g)
                            }
                        }
                        _ => unreachable!("checked at construction"),
                    };
                    if na {
                        da[ia] += ga;
                    }
                    if nb {
                        db[ib] += gb;
                    }
                });
                if na {
                    self.add_grad(a, da);
                }
                if nb {
                    self.add_grad(b, db);
                }
            }
            Op::Softmax { axis } => {
                let x = info.input(0);
                if self.needs_grad(x) {
                    let ax = axis as usize;
                    let (outer, n, inner) =
                        (ys.prod(0, ax), ys.dim(ax), ys.prod(ax + 1, ys.rank()));
                    let y = self.val(out);
                    let mut dx = vec![0.0f32; ys.numel()];
                    for o in 0..outer {
                        for j in 0..inner {
                            let base = o * n * inner + j;
                            let dot: f32 = (0..n)
                                .map(|t| dy[base + t * inner] * y[base + t * inner])
                                .sum();
                            for t in 0..n {
                                let at = base + t * inner;
                                dx[at] = y[at] * (dy[at] - dot);
                            }
                        }
                    }
                    self.add_grad(x, dx);
                }
            }
            Op::LayerNorm { axis, eps, rms } => {
                let x = info.input(0);
                let inner = ys.prod(axis as usize, ys.rank());
                let pe = self.per_op[i as usize];
                let gamma = self
                    .entry_vals(values, pe.gain)
                    .or_else(|| (info.n_inputs() > 1).then(|| self.val(info.input(1))));
                let xv = self.val(x);
                let need_x = self.needs_grad(x);
                let mut dx = vec![0.0f32; if need_x { xv.len() } else { 0 }];
                let (mut dg, mut dbeta) = (vec![0.0f32; inner], vec![0.0f32; inner]);
                let nf = inner as f32;
                let mut xhat = vec![0.0f32; inner];
                let mut dxh = vec![0.0f32; inner];
                for (r, (xr, dyr)) in xv
                    .chunks_exact(inner)
                    .zip(dy.chunks_exact(inner))
                    .enumerate()
                {
                    let mean = if rms {
                        0.0
                    } else {
                        xr.iter().sum::<f32>() / nf
                    };
                    let var = xr.iter().map(|&v| (v - mean) * (v - mean)).sum::<f32>() / nf;
                    let inv = 1.0 / (var + eps).sqrt();
                    for j in 0..inner {
                        xhat[j] = (xr[j] - mean) * inv;
                        dxh[j] = dyr[j] * gamma.map_or(1.0, |g| g[j]);
                        dg[j] += dyr[j] * xhat[j];
                        dbeta[j] += dyr[j];
                    }
                    if need_x {
                        let m1 = if rms {
                            0.0
                        } else {
                            dxh.iter().sum::<f32>() / nf
                        };
                        let m2 = dxh.iter().zip(&xhat).map(|(a, b)| a * b).sum::<f32>() / nf;
                        for j in 0..inner {
                            dx[r * inner + j] = inv * (dxh[j] - m1 - xhat[j] * m2);
                        }
                    }
                }
                if let Some(e) = pe.gain {
                    grad[self.entries[e].range()]
                        .iter_mut()
                        .zip(&dg)
                        .for_each(|(a, b)| *a += b);
                }
                if let Some(e) = pe.shift {
                    grad[self.entries[e].range()]
                        .iter_mut()
                        .zip(&dbeta)
                        .for_each(|(a, b)| *a += b);
                }
                if need_x {
                    self.add_grad(x, dx);
                }
            }
            Op::Transpose { perm } => {
                let x = info.input(0);
                if self.needs_grad(x) {
                    let xs = self.shape(x);
                    let xst = xs.strides();
                    let st: Vec<usize> = (0..ys.rank()).map(|d| xst[perm[d] as usize]).collect();
                    let mut dx = vec![0.0f32; xs.numel()];
                    for_each_bcast(&ys, &st, &st, |o, ix, _| dx[ix] += dy[o]);
                    self.add_grad(x, dx);
                }
            }
            Op::Concat { axis } => {
                let ax = axis as usize;
                let (outer, inner) = (ys.prod(0, ax), ys.prod(ax + 1, ys.rank()));
                let row = ys.dim(ax) * inner;
                let mut off = 0;
                for t in info.inputs().collect::<Vec<_>>() {
                    let block = self.shape(t).dim(ax) * inner;
                    if self.needs_grad(t) {
                        let mut dx = vec![0.0f32; outer * block];
                        for o in 0..outer {
                            dx[o * block..(o + 1) * block]
                                .copy_from_slice(&dy[o * row + off..o * row + off + block]);
                        }
                        self.add_grad(t, dx);
                    }
                    off += block;
                }
            }
            Op::Reduce { kind, axes, .. } => {
                let x = info.input(0);
                if self.needs_grad(x) {
                    let xs = self.shape(x);
                    let (ost, count) = reduce_map(&xs, axes);
                    let scale = if kind == ReduceKind::Mean {
                        1.0 / count as f32
                    } else {
                        1.0
                    };
                    let mut dx = vec![0.0f32; xs.numel()];
                    for_each_bcast(&xs, &ost, &ost, |ix, o, _| dx[ix] = dy[o] * scale);
                    self.add_grad(x, dx);
                }
            }
            _ => unreachable!("checked at construction"),
        }
    }

    /// Parameter gradients shared by dense layers and convolutions, from the weight gradient.
    fn weight_param_grads(&self, i: u32, values: &[f32], dw: &[f32], grad: &mut [f32]) {
        let pe = self.per_op[i as usize];
        if let Some(h) = pe.head {
            grad[self.entries[h].range()]
                .iter_mut()
                .zip(dw)
                .for_each(|(a, b)| *a += b);
            return; // log-scales and centroids have no effect under a head
        }
        if pe.log_scale.is_none() && pe.centroids.is_none() {
            return;
        }
        let q = self.linear[i as usize]
            .as_ref()
            .and_then(|l| l.q.as_ref())
            .expect("block-quantized weight");
        let (ls, cs) = (
            self.entry_vals(values, pe.log_scale),
            self.entry_vals(values, pe.centroids),
        );
        let mut g_ls = pe
            .log_scale
            .map(|e| vec![0.0f32; self.entries[e].len as usize]);
        let mut g_c = pe
            .centroids
            .map(|e| vec![0.0f32; self.entries[e].len as usize]);
        q.backward(ls, cs, dw, g_ls.as_deref_mut(), g_c.as_deref_mut());
        for (e, g) in [(pe.log_scale, g_ls), (pe.centroids, g_c)] {
            if let (Some(e), Some(g)) = (e, g) {
                grad[self.entries[e].range()]
                    .iter_mut()
                    .zip(&g)
                    .for_each(|(a, b)| *a += b);
            }
        }
    }

    fn dense_backward(
        &mut self,
        i: u32,
        values: &[f32],
        act: &Activation,
        dy: Vec<f32>,
        grad: &mut [f32],
    ) {
        let mut pack = std::mem::take(&mut self.pack);
        let info = self.model.op(i);
        let x_id = info.input(0);
        let pe = self.per_op[i as usize];
        let (n, k) = {
            let l = self.linear[i as usize].as_ref().expect("linear op");
            (l.n, l.k)
        };
        let saved = &self.saved[i as usize];
        let mut dz = dy;
        if !act.is_identity() {
            let y = self.val(info.output(0));
            dz.iter_mut()
                .zip(&saved.z)
                .zip(y)
                .for_each(|((g, &z), &yv)| *g *= act_grad(act, z, yv));
        }
        let x = self.val(x_id);
        let m = x.len() / k;
        if let Some(e) = pe.bias {
            let gb = &mut grad[self.entries[e].range()];
            for row in dz.chunks_exact(n) {
                gb.iter_mut().zip(row).for_each(|(a, b)| *a += b);
            }
        }
        if pe.needs_dw() {
            let mut dw = vec![0.0f32; n * k];
            mm(
                &self.kernels,
                &mut pack,
                (n, k, m),
                (&dz, 1, n),
                (x, k, 1),
                (&mut dw, k, 1),
                false,
            );
            self.weight_param_grads(i, values, &dw, grad);
        }
        let lora = self.lora(i, values);
        let mut du = Vec::new();
        if let Some((_, b, r, s)) = lora {
            let us: Vec<f32> = saved.u.iter().map(|v| v * s).collect();
            let gb = &mut grad[self.entries[pe.lora_b.expect("paired")].range()];
            mm(
                &self.kernels,
                &mut pack,
                (n, r, m),
                (&dz, 1, n),
                (&us, r, 1),
                (gb, r, 1),
                true,
            );
            du = vec![0.0f32; m * r];
            mm(
                &self.kernels,
                &mut pack,
                (m, r, n),
                (&dz, n, 1),
                (b, r, 1),
                (&mut du, r, 1),
                false,
            );
            du.iter_mut().for_each(|v| *v *= s);
            let ga = &mut grad[self.entries[pe.lora_a.expect("paired")].range()];
            mm(
                &self.kernels,
                &mut pack,
                (r, k, m),
                (&du, 1, r),
                (x, k, 1),
                (ga, k, 1),
                true,
            );
        }
        let dx = self.needs_grad(x_id).then(|| {
            let w = self.weight(i, values);
            let mut dx = vec![0.0f32; m * k];
            mm(
                &self.kernels,
                &mut pack,
                (m, k, n),
                (&dz, n, 1),
                (w, k, 1),
                (&mut dx, k, 1),
                false,
            );
            if let Some((a, _, r, _)) = lora {
                mm(
                    &self.kernels,
                    &mut pack,
                    (m, k, r),
                    (&du, r, 1),
                    (a, k, 1),
                    (&mut dx, k, 1),
                    true,
                );
            }
            dx
        });
        self.pack = pack;
        if let Some(dx) = dx {
            self.add_grad(x_id, dx);
        }
    }

    fn conv_backward(&mut self, i: u32, values: &[f32], c: &Conv, dy: Vec<f32>, grad: &mut [f32]) {
        let mut pack = std::mem::take(&mut self.pack);
        let info = self.model.op(i);
        let x_id = info.input(0);
        let pe = self.per_op[i as usize];
        let g = self.conv_geom(i, c);
        let (kg, p, cout_g) = (g.kg(), g.p(), g.cout_g());
        let saved = &self.saved[i as usize];
        let mut dz = dy;
        if !c.act.is_identity() {
            let y = self.val(info.output(0));
            dz.iter_mut()
                .zip(&saved.z)
                .zip(y)
                .for_each(|((gv, &z), &yv)| *gv *= act_grad(&c.act, z, yv));
        }
        let need_x = self.needs_grad(x_id);
        let need_dw = pe.needs_dw();
        let x = self.val(x_id);
        let w = self.weight(i, values);
        let lora = self.lora(i, values);
        let mut dw = vec![0.0f32; if need_dw { g.cout * kg } else { 0 }];
        let mut dx = vec![0.0f32; if need_x { x.len() } else { 0 }];
        let (mut ga, mut gbm) = match lora {
            Some((a, b, _, _)) => (vec![0.0f32; a.len()], vec![0.0f32; b.len()]),
            None => (Vec::new(), Vec::new()),
        };
        let mut cols = vec![0.0f32; p * kg];
        let mut dcols = vec![0.0f32; p * kg];
        let plane = g.cin * g.h * g.w;
        let mut gbias = vec![0.0f32; g.cout];
        for b in 0..g.n {
            let xb = &x[b * plane..(b + 1) * plane];
            let dzb = &dz[b * g.cout * p..(b + 1) * g.cout * p];
            for (co, gb) in gbias.iter_mut().enumerate() {
                *gb += dzb[co * p..(co + 1) * p].iter().sum::<f32>();
            }
            for gi in 0..g.groups {
                im2col(c, &g, xb, gi, &mut cols);
                let dzg = &dzb[gi * cout_g * p..(gi + 1) * cout_g * p];
                if need_dw {
                    mm(
                        &self.kernels,
                        &mut pack,
                        (cout_g, kg, p),
                        (dzg, p, 1),
                        (&cols, kg, 1),
                        (&mut dw[gi * cout_g * kg..], kg, 1),
                        true,
                    );
                }
                // LoRA needs groups = 1, so this runs once per image.
                let mut du = Vec::new();
                if let Some((_, bm, r, s)) = lora {
                    let us: Vec<f32> = saved.u[b * r * p..(b + 1) * r * p]
                        .iter()
                        .map(|v| v * s)
                        .collect();
                    mm(
                        &self.kernels,
                        &mut pack,
                        (g.cout, r, p),
                        (dzb, p, 1),
                        (&us, 1, p),
                        (&mut gbm, r, 1),
                        true,
                    );
                    du = vec![0.0f32; r * p];
                    mm(
                        &self.kernels,
                        &mut pack,
                        (r, p, g.cout),
                        (bm, 1, r),
                        (dzb, p, 1),
                        (&mut du, p, 1),
                        false,
                    );
                    du.iter_mut().for_each(|v| *v *= s);
                    mm(
                        &self.kernels,
                        &mut pack,
                        (r, kg, p),
                        (&du, p, 1),
                        (&cols, kg, 1),
                        (&mut ga, kg, 1),
                        true,
                    );
                }
                if need_x {
                    mm(
                        &self.kernels,
                        &mut pack,
                        (p, kg, cout_g),
                        (dzg, 1, p),
                        (&w[gi * cout_g * kg..], kg, 1),
                        (&mut dcols, kg, 1),
                        false,
                    );
                    if let Some((a, _, r, _)) = lora {
                        mm(
                            &self.kernels,
                            &mut pack,
                            (p, kg, r),
                            (&du, 1, p),
                            (a, kg, 1),
                            (&mut dcols, kg, 1),
                            true,
                        );
                    }
                    col2im(c, &g, &dcols, gi, &mut dx[b * plane..(b + 1) * plane]);
                }
            }
        }
        if let Some(e) = pe.bias {
            grad[self.entries[e].range()]
                .iter_mut()
                .zip(&gbias)
                .for_each(|(a, b)| *a += b);
        }
        if lora.is_some() {
            grad[self.entries[pe.lora_a.expect("paired")].range()]
                .iter_mut()
                .zip(&ga)
                .for_each(|(a, b)| *a += b);
            grad[self.entries[pe.lora_b.expect("paired")].range()]
                .iter_mut()
                .zip(&gbm)
                .for_each(|(a, b)| *a += b);
        }
        if need_dw {
            self.weight_param_grads(i, values, &dw, grad);
        }
        self.pack = pack;
        if need_x {
            self.add_grad(x_id, dx);
        }
    }

    /// Mean loss and accuracy over a whole data set, in batches (the last one padded by
    /// repeating its first sample; padding is not counted).
    pub fn evaluate(&mut self, data: &[f32], labels: &[i64], values: &[f32]) -> Result<(f64, f64)> {
        let count = self.check_data(data, labels)?;
        let (b, sl, cl) = (self.batch, self.sample_len, self.classes);
        let (mut loss, mut correct) = (0.0f64, 0usize);
        let mut x = vec![0.0f32; b * sl];
        let mut start = 0;
        while start < count {
            let real = b.min(count - start);
            for j in 0..b {
                let s = start + if j < real { j } else { 0 };
                x[j * sl..(j + 1) * sl].copy_from_slice(&data[s * sl..(s + 1) * sl]);
            }
            let logits = self.forward(&x, values)?.to_vec();
            for j in 0..real {
                let row = &logits[j * cl..(j + 1) * cl];
                let label = labels[start + j];
                loss += cross_entropy_f64(row, cl, &[label], None);
                let mut best = 0;
                for (t, &v) in row.iter().enumerate() {
                    if v > row[best] {
                        best = t;
                    }
                }
                correct += (best as i64 == label) as usize;
            }
            start += real;
        }
        Ok((loss / count as f64, correct as f64 / count as f64))
    }

    fn check_data(&self, data: &[f32], labels: &[i64]) -> Result<usize> {
        let count = labels.len();
        if count == 0 || data.len() != count * self.sample_len {
            return mismatch(format!(
                "{} values for {count} samples of {} values",
                data.len(),
                self.sample_len
            ));
        }
        Ok(count)
    }

    /// First-order training on `(data, labels)`: see [`train_first_order`].
    pub fn train(
        &mut self,
        values: &mut [f32],
        data: &[f32],
        labels: &[i64],
        cfg: &FirstOrderConfig,
    ) -> Result<Vec<(u32, f32)>> {
        let count = self.check_data(data, labels)?;
        self.check_values(values)?;
        let (b, sl) = (self.batch, self.sample_len);
        let n = self.values_needed;
        let mut opt = OptimizerState::new(cfg.optimizer, n);
        let mut order: Vec<usize> = (0..count).collect();
        let mut rng = cfg.seed;
        let mut at = count; // forces a shuffle before the first batch
        let mut x = vec![0.0f32; b * sl];
        let mut y = vec![0i64; b];
        let mut grad = vec![0.0f32; n];
        let decay: Vec<bool> = {
            let mut d = vec![false; n];
            for e in &self.entries {
                if matches!(e.kind, EntryKind::LoraA | EntryKind::LoraB) {
                    d[e.range()].iter_mut().for_each(|v| *v = true);
                }
            }
            d
        };
        let mut log = Vec::with_capacity(cfg.steps as usize);
        for step in 0..cfg.steps {
            for j in 0..b {
                if at == count {
                    shuffle(&mut order, &mut rng);
                    at = 0;
                }
                let s = order[at];
                at += 1;
                x[j * sl..(j + 1) * sl].copy_from_slice(&data[s * sl..(s + 1) * sl]);
                y[j] = labels[s];
            }
            grad.iter_mut().for_each(|g| *g = 0.0);
            let loss = self.loss_and_grad(&x, &y, &values[..n], &mut grad)?;
            log.push((step, loss as f32));
            if !loss.is_finite() || grad.iter().any(|g| !g.is_finite()) {
                continue; // as the zeroth-order step: skip, keep the values
            }
            opt.step(&mut values[..n], &grad);
            if cfg.weight_decay != 0.0 {
                let lr = cfg.optimizer.lr();
                for (v, &d) in values[..n].iter_mut().zip(&decay) {
                    if d {
                        *v -= lr * cfg.weight_decay * *v;
                    }
                }
            }
        }
        Ok(log)
    }
}

/// Output strides of a reduction in input coordinates (0 along reduced axes) and the number of
/// elements each output sums.
fn reduce_map(xs: &Shape, axes: u32) -> (Vec<usize>, usize) {
    let r = xs.rank();
    let mut ost = vec![0usize; r];
    let (mut acc, mut count) = (1usize, 1usize);
    for i in (0..r).rev() {
        if axes & (1 << i) == 0 {
            ost[i] = acc;
            acc *= xs.dim(i);
        } else {
            count *= xs.dim(i);
        }
    }
    (ost, count)
}

/// Mean cross-entropy in f64 (labels clamped to the last class as the runtime does); writes the
/// gradient with respect to the logits when asked.
fn cross_entropy_f64(
    logits: &[f32],
    classes: usize,
    labels: &[i64],
    mut d: Option<&mut [f32]>,
) -> f64 {
    let rows = labels.len();
    let mut total = 0.0f64;
    for (r, (row, &label)) in logits.chunks_exact(classes).zip(labels).enumerate() {
        let label = (label.max(0) as usize).min(classes - 1);
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
        let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
        let lse = max + sum.ln();
        total += lse - row[label] as f64;
        if let Some(d) = d.as_deref_mut() {
            for (t, &v) in row.iter().enumerate() {
                let p = (v as f64 - lse).exp();
                d[r * classes + t] = ((p - (t == label) as u8 as f64) / rows as f64) as f32;
            }
        }
    }
    total / rows.max(1) as f64
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut x = *state;
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn shuffle(v: &mut [usize], rng: &mut u64) {
    for i in (1..v.len()).rev() {
        let j = (splitmix(rng) % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}

// ---------------------------------------------------------------------------------------------
// Optimizers and the training loop.

/// The update rule of a first-order run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Optimizer {
    /// `θ −= lr · g`.
    Sgd {
        /// Learning rate.
        lr: f32,
    },
    /// Adam with bias correction, β1 = 0.9, β2 = 0.999, ε = 1e-8.
    Adam {
        /// Learning rate.
        lr: f32,
    },
}

impl Optimizer {
    /// The learning rate.
    pub fn lr(&self) -> f32 {
        match *self {
            Optimizer::Sgd { lr } | Optimizer::Adam { lr } => lr,
        }
    }
}

/// Adam's first-moment decay.
pub const ADAM_BETA1: f32 = 0.9;
/// Adam's second-moment decay.
pub const ADAM_BETA2: f32 = 0.999;
/// Adam's denominator guard.
pub const ADAM_EPS: f32 = 1e-8;

/// An optimizer with its state (Adam's moments), over a flat value array.
#[derive(Debug, Clone)]
pub struct OptimizerState {
    rule: Optimizer,
    m: Vec<f32>,
    v: Vec<f32>,
    t: u32,
}

impl OptimizerState {
    /// Fresh state for `n` values.
    pub fn new(rule: Optimizer, n: usize) -> OptimizerState {
        let moments = matches!(rule, Optimizer::Adam { .. });
        OptimizerState {
            rule,
            m: vec![0.0; if moments { n } else { 0 }],
            v: vec![0.0; if moments { n } else { 0 }],
            t: 0,
        }
    }

    /// One update of `values` with the gradient `grad`.
    pub fn step(&mut self, values: &mut [f32], grad: &[f32]) {
        self.t += 1;
        match self.rule {
            Optimizer::Sgd { lr } => values.iter_mut().zip(grad).for_each(|(v, g)| *v -= lr * g),
            Optimizer::Adam { lr } => {
                let c1 = 1.0 - ADAM_BETA1.powi(self.t as i32);
                let c2 = 1.0 - ADAM_BETA2.powi(self.t as i32);
                for (((v, &g), m), s) in values
                    .iter_mut()
                    .zip(grad)
                    .zip(&mut self.m)
                    .zip(&mut self.v)
                {
                    *m = ADAM_BETA1 * *m + (1.0 - ADAM_BETA1) * g;
                    *s = ADAM_BETA2 * *s + (1.0 - ADAM_BETA2) * g * g;
                    *v -= lr * (*m / c1) / ((*s / c2).sqrt() + ADAM_EPS);
                }
            }
        }
    }
}

/// Settings of [`train_first_order`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FirstOrderConfig {
    /// Update rule and learning rate.
    pub optimizer: Optimizer,
    /// Steps (one minibatch of the model's batch size each).
    pub steps: u32,
    /// Seed of the minibatch order (samples are drawn without replacement, reshuffled each
    /// epoch).
    pub seed: u64,
    /// Decoupled weight decay on LoRA values only (as the zeroth-order step applies it).
    pub weight_decay: f32,
}

impl Default for FirstOrderConfig {
    fn default() -> FirstOrderConfig {
        FirstOrderConfig {
            optimizer: Optimizer::Adam { lr: 1e-2 },
            steps: 1000,
            seed: 0,
            weight_decay: 0.0,
        }
    }
}

/// Trains adapter `values` (laid out by `entries`) with exact gradients of the mean
/// cross-entropy: `cfg.steps` minibatches of the model's batch size drawn from `data` (samples
/// of input 0, concatenated) and `labels` (one class per sample). Returns `(step, loss)` for
/// every step, the loss measured on the step's minibatch before its update. Steps whose loss or
/// gradient is not finite leave the values unchanged.
pub fn train_first_order(
    model: &Model<'_>,
    entries: &[Entry],
    values: &mut [f32],
    data: &[f32],
    labels: &[i64],
    cfg: &FirstOrderConfig,
) -> Result<Vec<(u32, f32)>> {
    Backprop::new(*model, entries)?.train(values, data, labels, cfg)
}

/// Values for `entries` under which the adapted model computes exactly what the model alone
/// does: the model's biases, gains, shifts, tables and dense weights, zero log-scales, and LoRA
/// with `B = 0` and `A` uniform in `±1/√K` (seeded), so training can start from there.
pub fn identity_values(model: &Model<'_>, entries: &[Entry], seed: u64) -> Result<Vec<f32>> {
    let len = entries.iter().map(|e| e.range().end).max().unwrap_or(0);
    let mut v = vec![0.0f32; len];
    let mut rng = seed;
    for (i, e) in entries.iter().enumerate() {
        let bad = |why| BackpropError::BadEntry { entry: i, why };
        if e.op >= model.op_count() {
            return Err(bad("op index past the model's ops"));
        }
        let info = model.op(e.op);
        let out = &mut v[e.range()];
        let const_input = |j: usize| -> Option<Vec<f32>> {
            (info.n_inputs() > j && model.tensor(info.input(j)).meta.storage == Storage::Const)
                .then(|| f32_vec(model.const_bytes(info.input(j))))
        };
        match e.kind {
            EntryKind::Bias => {
                out.copy_from_slice(&const_input(2).unwrap_or_else(|| vec![0.0; out.len()]))
            }
            EntryKind::NormGain => {
                out.copy_from_slice(&const_input(1).unwrap_or_else(|| vec![1.0; out.len()]))
            }
            EntryKind::NormBias => {
                out.copy_from_slice(&const_input(2).unwrap_or_else(|| vec![0.0; out.len()]))
            }
            EntryKind::LogScale | EntryKind::LoraB => out.iter_mut().for_each(|x| *x = 0.0),
            EntryKind::Centroids => {
                let w = decode_weight(model, info.input(1)).map_err(bad)?;
                out.copy_from_slice(
                    &w.q.ok_or(bad("centroids need a block-quantized weight"))?
                        .lut,
                );
            }
            EntryKind::Head => {
                out.copy_from_slice(&decode_weight(model, info.input(1)).map_err(bad)?.base)
            }
            EntryKind::LoraA => {
                let bound = 1.0 / (e.cols as f32).sqrt();
                for x in out.iter_mut() {
                    let u = (splitmix(&mut rng) >> 40) as f32 / (1u64 << 24) as f32;
                    *x = (2.0 * u - 1.0) * bound;
                }
            }
        }
        if out.len() != e.len as usize {
            return Err(bad("entry length"));
        }
    }
    Ok(v)
}

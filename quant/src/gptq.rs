//! GPTQ: error-compensating quantization (Frantar et al., 2022).
//!
//! Minimises the layer-output error `‖(W − Ŵ)Xᵀ‖²` rather than `‖W − Ŵ‖²`. With the Hessian
//! `H = XᵀX / count` (from [`ActStats::hessian`](crate::stats::ActStats::hessian)):
//!
//! 1. Input columns never activated (`H_jj = 0`) are zeroed and given `H_jj = 1`.
//! 2. Damping: `H += damp · mean(diag H) · I` (`damp` = 0.01 by default).
//! 3. `U` = upper Cholesky factor of `H⁻¹` (`H⁻¹ = UᵀU`).
//! 4. Columns are quantized left to right, in blocks of `block_size` (128): column `j` is
//!    quantized by the caller's [`ColumnQuantizer`], its error `e = (w_j − q_j) / U_jj` is
//!    pushed onto the remaining columns of the block at once (`w_c −= e · U_jc`), and onto the
//!    columns after the block in one matrix product when the block is done.
//!
//! The quantizer is any per-column rule: a closure `FnMut(col_index, column, out)` for a fixed
//! grid, or one of the provided quantizers that also collect the codes for packing:
//! [`GroupQuantizer`] (int2..int8 groups along `k`, scales chosen per group from the
//! error-updated weights when the group starts), [`TernaryQuantizer`], [`BinaryQuantizer`] and
//! [`CodebookQuantizer`] (nearest entry of a fixed codebook, e.g. from
//! [`codebook_quantize`](crate::kmeans::codebook_quantize)).
//!
//! Grouped quantizers see each group's columns *after* the updates from all earlier columns:
//! the block size is rounded up to a multiple of the group length so that a group never
//! straddles two blocks.
//!
//! ```
//! use edgetune_quant::gptq::{gptq, GptqConfig};
//! // One output row, two inputs with correlation 0.5 (H = [[1, .5], [.5, 1]]), integer grid.
//! // Column 0 rounds 0.4 -> 0; its error moves column 1 to 0.35 + 0.5 * 0.4 = 0.55 -> 1.
//! let mut round = |_j: usize, col: &[f32], out: &mut [f32]| {
//!     for (o, &x) in out.iter_mut().zip(col) { *o = x.round(); }
//! };
//! let cfg = GptqConfig { damp: 0.0, ..GptqConfig::default() };
//! let r = gptq(&[0.4, 0.35], 1, 2, &[1.0, 0.5, 0.5, 1.0], &cfg, &mut round).unwrap();
//! assert_eq!(r.w_hat, vec![0.0, 1.0]);
//! ```

use faer::{Accum, Mat, Par, Side};

use crate::kmeans::{nearest_centroid, Codebook};
use crate::scalar::{quantize_group, round_to_f16, GroupQuant, ScaleSearch};
use crate::ternary::{
    binarize_group, ternarize_group, Binary, Ternary, TernaryChoice, TernaryMethod,
};
use crate::util::{check_fraction, check_group, check_importance, check_matrix, check_square};
use crate::{QuantError, Result};

/// GPTQ parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GptqConfig {
    /// Relative damping: `λ = damp · mean(diag H)` (`>= 0`; raised automatically if `H + λI`
    /// is still not positive definite).
    pub damp: f64,
    /// Columns per lazy-update block (`>= 1`; rounded up to a multiple of the quantizer's
    /// group length).
    pub block_size: usize,
}

impl Default for GptqConfig {
    fn default() -> Self {
        GptqConfig {
            damp: 0.01,
            block_size: 128,
        }
    }
}

/// A per-column quantization rule driven by [`gptq`].
///
/// Columns are `n` values (one per output row) of input column `j`, already updated with the
/// error of earlier columns.
pub trait ColumnQuantizer {
    /// Columns per parameter group (e.g. the int4 group size): [`ColumnQuantizer::begin_group`]
    /// is called at every column index that is a multiple of it. Default 1 (no groups).
    fn group_len(&self) -> usize {
        1
    }

    /// Called before quantizing columns `first_col .. first_col + cols.len() / n` with their
    /// current values, column-major: `cols[c * n + r]` is row `r` of column `first_col + c`.
    fn begin_group(&mut self, first_col: usize, n: usize, cols: &[f32]) -> Result<()> {
        let _ = (first_col, n, cols);
        Ok(())
    }

    /// Writes the quantized (dequantized) value of every entry of column `j` into `out`.
    fn quantize_column(&mut self, j: usize, col: &[f32], out: &mut [f32]) -> Result<()>;

    /// The `(n, k)` shape this quantizer was built for, if it has one; [`gptq`] refuses a
    /// matrix of another shape. Default `None` (any shape).
    fn shape(&self) -> Option<(usize, usize)> {
        None
    }
}

/// Any `FnMut(column_index, column, out)` is an ungrouped quantizer.
impl<F: FnMut(usize, &[f32], &mut [f32])> ColumnQuantizer for F {
    fn quantize_column(&mut self, j: usize, col: &[f32], out: &mut [f32]) -> Result<()> {
        self(j, col, out);
        Ok(())
    }
}

/// Result of [`gptq`].
#[derive(Debug, Clone, PartialEq)]
pub struct GptqOutput {
    /// The quantized matrix, row-major `n x k` (exactly the values the quantizer produced).
    pub w_hat: Vec<f32>,
    /// Damping `λ` actually added to the diagonal of `H`.
    pub lambda: f64,
    /// Number of input columns with `H_jj = 0` (zeroed).
    pub dead_columns: usize,
}

/// Runs GPTQ on the `n x k` matrix `w` with Hessian `hessian` (`XᵀX / count`, row-major
/// `k x k`; any positive multiple works the same up to the meaning of `damp`).
pub fn gptq<Q: ColumnQuantizer + ?Sized>(
    w: &[f32],
    n: usize,
    k: usize,
    hessian: &[f64],
    cfg: &GptqConfig,
    quantizer: &mut Q,
) -> Result<GptqOutput> {
    check_matrix(w, n, k, "weight matrix")?;
    check_square(hessian, k, "Hessian")?;
    check_fraction(cfg.damp, "GPTQ damping", 0.0, f64::MAX, "[0, inf)")?;
    if cfg.block_size == 0 {
        return Err(QuantError::OutOfRange {
            what: "GPTQ block size",
            value: 0.0,
            allowed: ">= 1",
        });
    }
    if let Some((qn, qk)) = quantizer.shape() {
        if (qn, qk) != (n, k) {
            return Err(QuantError::Incompatible {
                what: "quantizer was built for another matrix shape",
            });
        }
    }
    let glen = quantizer.group_len().max(1);
    let bs = cfg.block_size.div_ceil(glen) * glen;

    let mut h = hessian.to_vec();
    let mut wm = Mat::<f64>::from_fn(n, k, |i, j| w[i * k + j] as f64);
    let mut dead_columns = 0;
    for j in 0..k {
        if h[j * k + j] == 0.0 {
            h[j * k + j] = 1.0;
            dead_columns += 1;
            for r in 0..n {
                wm[(r, j)] = 0.0;
            }
        }
    }
    let (u, lambda) = inverse_upper_cholesky(&h, k, cfg.damp)?;

    let mut w_hat = vec![0f32; n * k];
    let mut col = vec![0f32; n];
    let mut out = vec![0f32; n];
    let mut group_buf = Vec::new();
    for i1 in (0..k).step_by(bs) {
        let i2 = (i1 + bs).min(k);
        let mut err = Mat::<f64>::zeros(n, i2 - i1);
        for j in i1..i2 {
            if j % glen == 0 {
                let end = (j + glen).min(k);
                group_buf.clear();
                for c in j..end {
                    group_buf.extend((0..n).map(|r| wm[(r, c)] as f32));
                }
                quantizer.begin_group(j, n, &group_buf)?;
            }
            for (r, v) in col.iter_mut().enumerate() {
                *v = wm[(r, j)] as f32;
            }
            out.fill(0.0);
            quantizer.quantize_column(j, &col, &mut out)?;
            let d = u[(j, j)];
            for r in 0..n {
                if !out[r].is_finite() {
                    return Err(QuantError::NonFinite {
                        what: "quantizer output",
                    });
                }
                err[(r, j - i1)] = (wm[(r, j)] - out[r] as f64) / d;
                w_hat[r * k + j] = out[r];
            }
            if j + 1 < i2 {
                // W[:, j+1..i2] -= e · U[j, j+1..i2]
                faer::linalg::matmul::matmul(
                    wm.as_mut().submatrix_mut(0, j + 1, n, i2 - j - 1),
                    Accum::Add,
                    err.as_ref().submatrix(0, j - i1, n, 1),
                    u.as_ref().submatrix(j, j + 1, 1, i2 - j - 1),
                    -1.0,
                    Par::Seq,
                );
            }
        }
        if i2 < k {
            // W[:, i2..] -= E · U[i1..i2, i2..]
            faer::linalg::matmul::matmul(
                wm.as_mut().submatrix_mut(0, i2, n, k - i2),
                Accum::Add,
                err.as_ref(),
                u.as_ref().submatrix(i1, i2, i2 - i1, k - i2),
                -1.0,
                Par::Seq,
            );
        }
    }
    Ok(GptqOutput {
        w_hat,
        lambda,
        dead_columns,
    })
}

/// Upper Cholesky factor `U` of `(H + λI)⁻¹` (so that `(H + λI)⁻¹ = UᵀU`), with escalating
/// damping when `H + λI` is not positive definite.
fn inverse_upper_cholesky(h: &[f64], k: usize, damp: f64) -> Result<(Mat<f64>, f64)> {
    let mean_diag = (0..k).map(|i| h[i * k + i]).sum::<f64>() / k as f64;
    if !(mean_diag > 0.0 && mean_diag.is_finite()) {
        return Err(QuantError::Linalg {
            what: "Hessian diagonal is not positive",
        });
    }
    let mut lambda = damp * mean_diag;
    for _ in 0..7 {
        let hm = Mat::from_fn(k, k, |i, j| {
            h[i * k + j] + if i == j { lambda } else { 0.0 }
        });
        if let Ok(llt) = hm.llt(Side::Lower) {
            let hinv = faer::linalg::solvers::DenseSolveCore::inverse(&llt);
            if let Ok(l2) = hinv.llt(Side::Lower) {
                let u = l2.L().transpose().to_owned();
                if (0..k).all(|j| u[(j, j)] > 0.0 && u[(j, j)].is_finite()) {
                    return Ok((u, lambda));
                }
            }
        }
        lambda = (lambda * 10.0).max(1e-6 * mean_diag);
    }
    Err(QuantError::Linalg {
        what: "Cholesky of the damped Hessian (or its inverse) failed",
    })
}

/// Gathers row `r` of the group from column-major `cols`.
fn gather_row(cols: &[f32], n: usize, r: usize, out: &mut Vec<f32>) {
    out.clear();
    out.extend(cols.iter().skip(r).step_by(n).copied());
}

/// GPTQ quantizer for signed `bits`-bit groups along `k` (same encoding as
/// [`quantize_groups`](crate::scalar::quantize_groups)). Each group's scales are searched on
/// the error-updated weights when the group starts; the codes of every column are then
/// re-rounded against those scales as GPTQ proceeds.
#[derive(Debug, Clone)]
pub struct GroupQuantizer {
    q: GroupQuant,
    importance: Option<Vec<f32>>,
    search: ScaleSearch,
    buf: Vec<f32>,
    codes_tmp: Vec<i8>,
}

impl GroupQuantizer {
    /// Checks parameters like [`quantize_groups`](crate::scalar::quantize_groups).
    pub fn new(
        n: usize,
        k: usize,
        bits: u32,
        group: usize,
        importance: Option<&[f32]>,
        search: ScaleSearch,
    ) -> Result<Self> {
        if n == 0 || k == 0 {
            return Err(QuantError::EmptyInput {
                what: "weight matrix",
            });
        }
        if !(2..=8).contains(&bits) {
            return Err(QuantError::BitsOutOfRange {
                bits,
                min: 2,
                max: 8,
            });
        }
        check_group(group, k)?;
        check_importance(importance, k)?;
        Ok(GroupQuantizer {
            q: GroupQuant {
                bits,
                n,
                k,
                group,
                codes: vec![0; n * k],
                scales: vec![0.0; n * (k / group)],
            },
            importance: importance.map(<[f32]>::to_vec),
            search,
            buf: Vec::new(),
            codes_tmp: vec![0; group],
        })
    }

    /// The codes and scales produced (call after [`gptq`]).
    pub fn into_group_quant(self) -> GroupQuant {
        self.q
    }
}

impl ColumnQuantizer for GroupQuantizer {
    fn group_len(&self) -> usize {
        self.q.group
    }

    fn shape(&self) -> Option<(usize, usize)> {
        Some((self.q.n, self.q.k))
    }

    fn begin_group(&mut self, first_col: usize, n: usize, cols: &[f32]) -> Result<()> {
        let gi = first_col / self.q.group;
        let gpr = self.q.k / self.q.group;
        for r in 0..n {
            gather_row(cols, n, r, &mut self.buf);
            let imp = self
                .importance
                .as_ref()
                .map(|i| &i[first_col..first_col + self.q.group]);
            self.q.scales[r * gpr + gi] = quantize_group(
                &self.buf,
                imp,
                self.q.bits,
                self.search,
                &mut self.codes_tmp,
            )?;
        }
        Ok(())
    }

    fn quantize_column(&mut self, j: usize, col: &[f32], out: &mut [f32]) -> Result<()> {
        let gpr = self.q.k / self.q.group;
        let qneg = -(1i32 << (self.q.bits - 1)) as f32;
        let qpos = ((1i32 << (self.q.bits - 1)) - 1) as f32;
        for (r, (&x, o)) in col.iter().zip(out.iter_mut()).enumerate() {
            let s = self.q.scales[r * gpr + j / self.q.group];
            let q = if s != 0.0 {
                (x / s).round().clamp(qneg, qpos)
            } else {
                0.0
            };
            self.q.codes[r * self.q.k + j] = q as i8;
            *o = s * q;
        }
        Ok(())
    }
}

/// GPTQ quantizer for ternary groups along `k` (same encoding as
/// [`quantize_ternary`](crate::ternary::quantize_ternary)): each group's scale and rule are
/// chosen on the error-updated weights when the group starts; each weight is then rounded to
/// the nearest of `{−s, 0, s}`.
#[derive(Debug, Clone)]
pub struct TernaryQuantizer {
    t: Ternary,
    importance: Option<Vec<f32>>,
    choice: TernaryChoice,
    buf: Vec<f32>,
    codes_tmp: Vec<i8>,
}

impl TernaryQuantizer {
    /// Checks parameters like [`quantize_ternary`](crate::ternary::quantize_ternary).
    pub fn new(
        n: usize,
        k: usize,
        group: usize,
        importance: Option<&[f32]>,
        choice: TernaryChoice,
    ) -> Result<Self> {
        if n == 0 || k == 0 {
            return Err(QuantError::EmptyInput {
                what: "weight matrix",
            });
        }
        check_group(group, k)?;
        check_importance(importance, k)?;
        Ok(TernaryQuantizer {
            t: Ternary {
                n,
                k,
                group,
                codes: vec![0; n * k],
                scales: vec![0.0; n * (k / group)],
                methods: vec![TernaryMethod::Twn; n * (k / group)],
            },
            importance: importance.map(<[f32]>::to_vec),
            choice,
            buf: Vec::new(),
            codes_tmp: vec![0; group],
        })
    }

    /// The codes, scales and rules produced (call after [`gptq`]).
    pub fn into_ternary(self) -> Ternary {
        self.t
    }
}

impl ColumnQuantizer for TernaryQuantizer {
    fn group_len(&self) -> usize {
        self.t.group
    }

    fn shape(&self) -> Option<(usize, usize)> {
        Some((self.t.n, self.t.k))
    }

    fn begin_group(&mut self, first_col: usize, n: usize, cols: &[f32]) -> Result<()> {
        let gi = first_col / self.t.group;
        let gpr = self.t.k / self.t.group;
        for r in 0..n {
            gather_row(cols, n, r, &mut self.buf);
            let imp = self
                .importance
                .as_ref()
                .map(|i| &i[first_col..first_col + self.t.group]);
            let (s, m) = ternarize_group(&self.buf, imp, self.choice, &mut self.codes_tmp)?;
            self.t.scales[r * gpr + gi] = s;
            self.t.methods[r * gpr + gi] = m;
        }
        Ok(())
    }

    fn quantize_column(&mut self, j: usize, col: &[f32], out: &mut [f32]) -> Result<()> {
        let gpr = self.t.k / self.t.group;
        for (r, (&x, o)) in col.iter().zip(out.iter_mut()).enumerate() {
            let s = self.t.scales[r * gpr + j / self.t.group];
            let q: i8 = if s > 0.0 && x.abs() > 0.5 * s {
                if x < 0.0 {
                    -1
                } else {
                    1
                }
            } else {
                0
            };
            self.t.codes[r * self.t.k + j] = q;
            *o = s * q as f32;
        }
        Ok(())
    }
}

/// GPTQ quantizer for binary groups along `k` (same encoding as
/// [`quantize_binary`](crate::ternary::quantize_binary)).
#[derive(Debug, Clone)]
pub struct BinaryQuantizer {
    b: Binary,
    importance: Option<Vec<f32>>,
    buf: Vec<f32>,
    codes_tmp: Vec<i8>,
}

impl BinaryQuantizer {
    /// Checks parameters like [`quantize_binary`](crate::ternary::quantize_binary).
    pub fn new(n: usize, k: usize, group: usize, importance: Option<&[f32]>) -> Result<Self> {
        if n == 0 || k == 0 {
            return Err(QuantError::EmptyInput {
                what: "weight matrix",
            });
        }
        check_group(group, k)?;
        check_importance(importance, k)?;
        Ok(BinaryQuantizer {
            b: Binary {
                n,
                k,
                group,
                signs: vec![1; n * k],
                scales: vec![0.0; n * (k / group)],
            },
            importance: importance.map(<[f32]>::to_vec),
            buf: Vec::new(),
            codes_tmp: vec![0; group],
        })
    }

    /// The signs and scales produced (call after [`gptq`]).
    pub fn into_binary(self) -> Binary {
        self.b
    }
}

impl ColumnQuantizer for BinaryQuantizer {
    fn group_len(&self) -> usize {
        self.b.group
    }

    fn shape(&self) -> Option<(usize, usize)> {
        Some((self.b.n, self.b.k))
    }

    fn begin_group(&mut self, first_col: usize, n: usize, cols: &[f32]) -> Result<()> {
        let gi = first_col / self.b.group;
        let gpr = self.b.k / self.b.group;
        for r in 0..n {
            gather_row(cols, n, r, &mut self.buf);
            let imp = self
                .importance
                .as_ref()
                .map(|i| &i[first_col..first_col + self.b.group]);
            self.b.scales[r * gpr + gi] = binarize_group(&self.buf, imp, &mut self.codes_tmp)?;
        }
        Ok(())
    }

    fn quantize_column(&mut self, j: usize, col: &[f32], out: &mut [f32]) -> Result<()> {
        let gpr = self.b.k / self.b.group;
        for (r, (&x, o)) in col.iter().zip(out.iter_mut()).enumerate() {
            let s = self.b.scales[r * gpr + j / self.b.group];
            let q: i8 = if x < 0.0 { -1 } else { 1 };
            self.b.signs[r * self.b.k + j] = q;
            *o = s * q as f32;
        }
        Ok(())
    }
}

/// GPTQ quantizer onto a fixed scalar codebook: each weight goes to the nearest entry of its
/// row's table (after dividing by the row scale, if the codebook has row scales). Typically the
/// codebook comes from [`codebook_quantize`](crate::kmeans::codebook_quantize) on the same
/// weights; only the indices change.
#[derive(Debug, Clone)]
pub struct CodebookQuantizer {
    cb: Codebook,
    /// Column `j` of the matrix GPTQ sees is column `columns[j]` of the codebook (act-order).
    columns: Option<Vec<usize>>,
}

impl CodebookQuantizer {
    /// Wraps a codebook (its tables and row scales are kept; its indices are overwritten).
    pub fn new(codebook: Codebook) -> Result<Self> {
        let cb = codebook;
        let expect = cb.num_tables() * cb.table_len();
        if cb.centroids.len() != expect {
            return Err(QuantError::ShapeMismatch {
                what: "codebook tables",
                expected: expect,
                got: cb.centroids.len(),
            });
        }
        if cb.indices.len() != cb.n * cb.k {
            return Err(QuantError::ShapeMismatch {
                what: "codebook indices",
                expected: cb.n * cb.k,
                got: cb.indices.len(),
            });
        }
        if let Some(s) = &cb.scales {
            if cb.scale_group == 0 || s.len() != cb.n * cb.groups_per_row() {
                return Err(QuantError::ShapeMismatch {
                    what: "codebook scales",
                    expected: cb.n * cb.groups_per_row().max(1),
                    got: s.len(),
                });
            }
        }
        Ok(CodebookQuantizer { cb, columns: None })
    }

    /// GPTQ will see the columns in this order (a permutation of `0..k`, e.g. by decreasing
    /// input energy): column `j` it quantizes is the codebook's column `order[j]`, and indices
    /// are written there.
    pub fn with_column_order(mut self, order: Vec<usize>) -> Result<Self> {
        let mut seen = vec![false; self.cb.k];
        if order.len() != self.cb.k
            || order
                .iter()
                .any(|&c| c >= self.cb.k || std::mem::replace(&mut seen[c], true))
        {
            return Err(QuantError::Incompatible {
                what: "column order is not a permutation of the columns",
            });
        }
        self.columns = Some(order);
        Ok(self)
    }

    /// The codebook with the GPTQ indices (call after [`gptq`]).
    pub fn into_codebook(self) -> Codebook {
        self.cb
    }
}

impl ColumnQuantizer for CodebookQuantizer {
    fn shape(&self) -> Option<(usize, usize)> {
        Some((self.cb.n, self.cb.k))
    }

    fn quantize_column(&mut self, j: usize, col: &[f32], out: &mut [f32]) -> Result<()> {
        let c = self.columns.as_ref().map_or(j, |o| o[j]);
        let cb = &mut self.cb;
        let tl = 1usize << cb.bits;
        for (r, (&x, o)) in col.iter().zip(out.iter_mut()).enumerate() {
            let t = r / cb.rows_per_table;
            let table = &cb.centroids[t * tl..(t + 1) * tl];
            let s = cb.scale(r, c);
            let idx = if s != 0.0 {
                nearest_centroid(table, x / s)
            } else {
                0
            };
            cb.indices[r * cb.k + c] = idx;
            *o = s * table[idx as usize];
        }
        Ok(())
    }
}

/// Refits a codebook to the layer-output error once its indices are fixed (after [`gptq`]).
///
/// With the indices held, `‖(W − Ŵ)Xᵀ‖²` is quadratic in each table's entries, and in each
/// row's group scales: the entries of every table, then the scales of every row, then the
/// entries again are set to the least-squares solution (the codebook update of GPTVQ, van
/// Baalen et al. 2024, in closed form instead of by gradient steps). Values are rounded to
/// f16 as the file stores them, and each table is sorted again with its indices remapped.
/// Each step is kept only if it lowers the error, so the result is never worse than the
/// input. Returns the relative activation error `‖(W − Ŵ)Xᵀ‖ / ‖WXᵀ‖` after.
///
/// `hessian` is `XᵀX` up to a positive factor (row-major `k x k`), as for [`gptq`].
///
/// ```
/// use edgetune_quant::gptq::refit_codebook;
/// use edgetune_quant::kmeans::{codebook_quantize, Granularity};
/// // Two inputs, the second one 4x as active: k-means on the weights alone does not know.
/// let w = [0.1, 0.9, 0.2, 1.1, 0.3, 1.0];
/// let h = [1.0, 0.0, 0.0, 16.0];
/// let mut cb = codebook_quantize(&w, 3, 2, 1, Granularity::PerTensor, None).unwrap();
/// let before = edgetune_quant::metrics::rel_activation_error(&w, &cb.dequantize(), 3, 2, &h).unwrap();
/// let after = refit_codebook(&mut cb, &w, &h).unwrap();
/// assert!(after <= before);
/// ```
pub fn refit_codebook(cb: &mut Codebook, w: &[f32], hessian: &[f64]) -> Result<f64> {
    let (n, k) = (cb.n, cb.k);
    check_matrix(w, n, k, "weight matrix")?;
    check_square(hessian, k, "Hessian")?;
    let error =
        |cb: &Codebook| crate::metrics::rel_activation_error(w, &cb.dequantize(), n, k, hessian);
    let mut best = error(cb)?;
    type Step = fn(&mut Codebook, &[f32], &[f64]);
    let steps: &[Step] = match cb.scales {
        Some(_) => &[refit_tables, refit_scales, refit_tables],
        None => &[refit_tables],
    };
    for step in steps {
        let mut next = cb.clone();
        step(&mut next, w, hessian);
        let e = error(&next)?;
        if e < best {
            best = e;
            *cb = next;
        }
    }
    Ok(best)
}

/// Least-squares table entries for fixed indices and scales: row `r`'s weights are
/// `s_rj · c[idx_rj]`, so each row adds its normal equations with `v = s_r`, `bin = idx_r`.
fn refit_tables(cb: &mut Codebook, w: &[f32], h: &[f64]) {
    let (k, tl) = (cb.k, cb.table_len());
    for t in 0..cb.num_tables() {
        let rows = t * cb.rows_per_table..((t + 1) * cb.rows_per_table).min(cb.n);
        let mut eq = NormalEquations::new(tl);
        for r in rows.clone() {
            let s: Vec<f64> = (0..k).map(|c| cb.scale(r, c) as f64).collect();
            let idx = &cb.indices[r * k..(r + 1) * k];
            eq.add_row(h, &w[r * k..(r + 1) * k], &s, |j| idx[j] as usize);
        }
        let old: Vec<f64> = cb.table(t).iter().map(|&c| c as f64).collect();
        let Some(c) = eq.solve(&old) else {
            continue;
        };
        // Round as stored, sort, and point the indices at the entries' new places.
        let mut order: Vec<usize> = (0..tl).collect();
        let c: Vec<f32> = c.iter().map(|&v| round_to_f16(v as f32)).collect();
        order.sort_by(|&x, &y| c[x].total_cmp(&c[y]));
        let mut place = vec![0u8; tl];
        for (new, &o) in order.iter().enumerate() {
            place[o] = new as u8;
            cb.centroids[t * tl + new] = c[o];
        }
        for r in rows {
            for i in &mut cb.indices[r * k..(r + 1) * k] {
                *i = place[*i as usize];
            }
        }
    }
}

/// Least-squares group scales of each row for fixed indices and tables: row `r`'s weights
/// are `u_rj · s[j / scale_group]` with `u_r` its table values (`v = u_r`, `bin = j / group`).
fn refit_scales(cb: &mut Codebook, w: &[f32], h: &[f64]) {
    let (k, sg, gr) = (cb.k, cb.scale_group, cb.groups_per_row());
    let mut scales = cb.scales.take().expect("refit_scales needs scales");
    for r in 0..cb.n {
        let table = cb.table(cb.table_of_row(r));
        let u: Vec<f64> = cb.indices[r * k..(r + 1) * k]
            .iter()
            .map(|&i| table[i as usize] as f64)
            .collect();
        let mut eq = NormalEquations::new(gr);
        eq.add_row(h, &w[r * k..(r + 1) * k], &u, |j| j / sg);
        let row = &mut scales[r * gr..(r + 1) * gr];
        let old: Vec<f64> = row.iter().map(|&s| s as f64).collect();
        if let Some(s) = eq.solve(&old) {
            for (o, v) in row.iter_mut().zip(s) {
                *o = round_to_f16(v as f32);
            }
        }
    }
    cb.scales = Some(scales);
}

/// Normal equations `M θ = b` of `min Σ_r (w_r − ŵ_r)ᵀ H (w_r − ŵ_r)` where a row's weights
/// are `ŵ_j = v_j · θ[bin(j)]`: `M[a][c] = Σ_{i: bin=a} Σ_{j: bin=c} v_i H_ij v_j` and
/// `b[a] = Σ_{i: bin=a} v_i (H w)_i`, summed over the rows added.
struct NormalEquations {
    m: Vec<f64>,
    b: Vec<f64>,
    /// Scratch: one row of `H · diag(v)`, binned.
    p: Vec<f64>,
}

impl NormalEquations {
    fn new(d: usize) -> Self {
        NormalEquations {
            m: vec![0.0; d * d],
            b: vec![0.0; d],
            p: vec![0.0; d],
        }
    }

    fn add_row(&mut self, h: &[f64], w: &[f32], v: &[f64], bin: impl Fn(usize) -> usize) {
        let (k, d) = (w.len(), self.b.len());
        for i in 0..k {
            if v[i] == 0.0 {
                continue;
            }
            self.p.fill(0.0);
            let mut hw = 0.0;
            for (j, &hij) in h[i * k..(i + 1) * k].iter().enumerate() {
                self.p[bin(j)] += hij * v[j];
                hw += hij * w[j] as f64;
            }
            let a = bin(i);
            for (mac, &pc) in self.m[a * d..(a + 1) * d].iter_mut().zip(&self.p) {
                *mac += v[i] * pc;
            }
            self.b[a] += v[i] * hw;
        }
    }

    /// Solves `(M + λI) θ = b + λ·old` (`λ` a millionth of the mean diagonal, which pins
    /// unused entries to their old values); `None` if it fails or gives a non-finite or
    /// f16-overflowing value.
    fn solve(&self, old: &[f64]) -> Option<Vec<f64>> {
        let (m, b, d) = (&self.m, &self.b, old.len());
        let lambda =
            ((0..d).map(|i| m[i * d + i]).sum::<f64>() / d as f64).max(f64::MIN_POSITIVE) * 1e-6;
        let a = Mat::from_fn(d, d, |i, j| {
            m[i * d + j] + if i == j { lambda } else { 0.0 }
        });
        let rhs = Mat::from_fn(d, 1, |i, _| b[i] + lambda * old[i]);
        let x = faer::linalg::solvers::Solve::solve(&a.llt(Side::Lower).ok()?, &rhs);
        let x: Vec<f64> = (0..d).map(|i| x[(i, 0)]).collect();
        x.iter()
            .all(|v| v.is_finite() && v.abs() < 65504.0)
            .then_some(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kmeans::{codebook_quantize, codebook_quantize_with, CodebookOptions, Granularity};
    use crate::metrics::rel_activation_error;
    use crate::rng::SplitMix64;
    use crate::scalar::quantize_groups;
    use crate::stats::ActStats;
    use crate::ternary::quantize_ternary;
    use crate::util::test_support::correlated_activations;

    struct Setup {
        n: usize,
        k: usize,
        w: Vec<f32>,
        h: Vec<f64>,
    }

    fn setup(n: usize, k: usize, seed: u64) -> Setup {
        let mut rng = SplitMix64::new(seed);
        let w = rng.gaussian_vec(n * k);
        let x = correlated_activations(k, 4 * k, seed + 100);
        let mut st = ActStats::new(k, true).unwrap();
        st.update(&x, k).unwrap();
        Setup {
            n,
            k,
            w,
            h: st.hessian().unwrap(),
        }
    }

    #[test]
    fn identity_hessian_equals_round_to_nearest() {
        // H = c I: U is diagonal, no error is propagated, GPTQ == RTN exactly.
        let (n, k) = (6, 64);
        let mut rng = SplitMix64::new(1);
        let w = rng.gaussian_vec(n * k);
        let mut h = vec![0.0; k * k];
        for i in 0..k {
            h[i * k + i] = 3.0;
        }
        let mut q = GroupQuantizer::new(n, k, 4, 32, None, ScaleSearch::Grid).unwrap();
        let out = gptq(&w, n, k, &h, &GptqConfig::default(), &mut q).unwrap();
        let gq = q.into_group_quant();
        let rtn = quantize_groups(&w, n, k, 4, 32, None, ScaleSearch::Grid).unwrap();
        assert_eq!(gq, rtn);
        assert_eq!(out.w_hat, rtn.dequantize());
        assert!((out.lambda - 0.03).abs() < 1e-12);
    }

    #[test]
    fn int4_gptq_beats_rtn_on_correlated_activations() {
        let s = setup(32, 128, 2);
        let (n, k) = (s.n, s.k);
        let rtn = quantize_groups(&s.w, n, k, 4, 32, None, ScaleSearch::Grid).unwrap();
        let e_rtn = rel_activation_error(&s.w, &rtn.dequantize(), n, k, &s.h).unwrap();
        let mut q = GroupQuantizer::new(n, k, 4, 32, None, ScaleSearch::Grid).unwrap();
        // Small blocks exercise the lazy inter-block update.
        let cfg = GptqConfig {
            block_size: 64,
            ..GptqConfig::default()
        };
        let out = gptq(&s.w, n, k, &s.h, &cfg, &mut q).unwrap();
        let gq = q.into_group_quant();
        assert_eq!(gq.dequantize(), out.w_hat); // codes + scales reproduce w_hat
        assert!(gq.scales.iter().all(|&x| x == round_to_f16(x)));
        assert!(gq.codes.iter().all(|&c| (-8..=7).contains(&c)));
        let e_gptq = rel_activation_error(&s.w, &out.w_hat, n, k, &s.h).unwrap();
        assert!(e_gptq < 0.8 * e_rtn, "gptq {e_gptq} rtn {e_rtn}");
    }

    #[test]
    fn block_size_does_not_change_the_result() {
        // Lazy batching is an exact reformulation: block 32 vs 128 give the same codes (up to
        // f64 rounding, which does not flip any code on this data).
        let s = setup(8, 128, 3);
        let run = |bs: usize| {
            let mut q = GroupQuantizer::new(s.n, s.k, 4, 32, None, ScaleSearch::Grid).unwrap();
            let cfg = GptqConfig {
                block_size: bs,
                ..GptqConfig::default()
            };
            gptq(&s.w, s.n, s.k, &s.h, &cfg, &mut q).unwrap();
            q.into_group_quant()
        };
        let (a, b) = (run(32), run(128));
        let same = a.codes.iter().zip(&b.codes).filter(|(x, y)| x == y).count();
        assert!(same as f64 >= 0.999 * a.codes.len() as f64);
    }

    #[test]
    fn ternary_binary_codebook_gptq_beat_rtn() {
        let s = setup(24, 96, 4);
        let (n, k) = (s.n, s.k);
        let cfg = GptqConfig::default();
        let err = |wh: &[f32]| rel_activation_error(&s.w, wh, n, k, &s.h).unwrap();

        let t_rtn = quantize_ternary(&s.w, n, k, 32, None).unwrap().dequantize();
        let mut tq = TernaryQuantizer::new(n, k, 32, None, TernaryChoice::Best).unwrap();
        let t_out = gptq(&s.w, n, k, &s.h, &cfg, &mut tq).unwrap();
        assert_eq!(tq.into_ternary().dequantize(), t_out.w_hat);
        assert!(
            err(&t_out.w_hat) < 0.9 * err(&t_rtn),
            "{} {}",
            err(&t_out.w_hat),
            err(&t_rtn)
        );

        let b_rtn = crate::ternary::quantize_binary(&s.w, n, k, 32, None)
            .unwrap()
            .dequantize();
        let mut bq = BinaryQuantizer::new(n, k, 32, None).unwrap();
        let b_out = gptq(&s.w, n, k, &s.h, &cfg, &mut bq).unwrap();
        assert_eq!(bq.into_binary().dequantize(), b_out.w_hat);
        assert!(
            err(&b_out.w_hat) < 0.95 * err(&b_rtn),
            "{} {}",
            err(&b_out.w_hat),
            err(&b_rtn)
        );

        let cb = codebook_quantize(&s.w, n, k, 3, Granularity::PerRow, None).unwrap();
        let c_rtn = cb.dequantize();
        let mut cq = CodebookQuantizer::new(cb.clone()).unwrap();
        let c_out = gptq(&s.w, n, k, &s.h, &cfg, &mut cq).unwrap();
        let cb2 = cq.into_codebook();
        assert_eq!(cb2.centroids, cb.centroids);
        assert_eq!(cb2.dequantize(), c_out.w_hat);
        assert!(
            err(&c_out.w_hat) < 0.8 * err(&c_rtn),
            "{} {}",
            err(&c_out.w_hat),
            err(&c_rtn)
        );
    }

    #[test]
    fn codebook_refit_with_a_diagonal_hessian_takes_weighted_means() {
        // Rows [0.1, 0.2] and [0.5, 0.6], the second input 16x as active. One-bit table: the
        // low entry holds 0.1 and 0.2, the high 0.5 and 0.6; the output-optimal entries are
        // the means weighted by H_jj: (0.1 + 16·0.2) / 17 and (0.5 + 16·0.6) / 17.
        let w = [0.1, 0.2, 0.5, 0.6];
        let h = [1.0, 0.0, 0.0, 16.0];
        let mut cb = codebook_quantize(&w, 2, 2, 1, Granularity::PerTensor, None).unwrap();
        assert_eq!(cb.indices, vec![0, 0, 1, 1]);
        let e = refit_codebook(&mut cb, &w, &h).unwrap();
        let want = [3.3 / 17.0, 10.1 / 17.0];
        for (c, want) in cb.centroids.iter().zip(want) {
            assert!((c - want).abs() < 5e-4, "{:?} vs {want}", cb.centroids);
        }
        assert_eq!(cb.indices, vec![0, 0, 1, 1]);
        let e_direct = rel_activation_error(&w, &cb.dequantize(), 2, 2, &h).unwrap();
        assert_eq!(e, e_direct);
    }

    #[test]
    fn codebook_refit_lowers_the_output_error_after_gptq() {
        let s = setup(48, 128, 5);
        let (n, k) = (s.n, s.k);
        let mut opts = CodebookOptions::new(4, Granularity::PerGroupOfRows(16), None);
        opts.scale_group = Some(32);
        let cb = codebook_quantize_with(&s.w, n, k, &opts).unwrap();
        let mut cq = CodebookQuantizer::new(cb).unwrap();
        gptq(&s.w, n, k, &s.h, &GptqConfig::default(), &mut cq).unwrap();
        let mut cb = cq.into_codebook();
        let before = rel_activation_error(&s.w, &cb.dequantize(), n, k, &s.h).unwrap();
        let after = refit_codebook(&mut cb, &s.w, &s.h).unwrap();
        assert!(after < 0.97 * before, "{after} vs {before}");
        assert_eq!(
            after,
            rel_activation_error(&s.w, &cb.dequantize(), n, k, &s.h).unwrap()
        );
        // Still a valid codebook as the encoder expects it: tables ascending, f16 values.
        for t in 0..cb.num_tables() {
            assert!(cb.table(t).windows(2).all(|p| p[0] <= p[1]), "table {t}");
        }
        let f16 = |v: &f32| *v == round_to_f16(*v);
        assert!(cb.centroids.iter().all(f16));
        assert!(cb.scales.as_ref().unwrap().iter().all(f16));
    }

    #[test]
    fn dead_columns_are_zeroed() {
        let (n, k) = (3, 4);
        let w = vec![1.0f32; n * k];
        // Column 2 never activated.
        let mut h = vec![0.0; k * k];
        for i in [0, 1, 3] {
            h[i * k + i] = 1.0;
        }
        let mut ident = |_j: usize, col: &[f32], out: &mut [f32]| out.copy_from_slice(col);
        let out = gptq(&w, n, k, &h, &GptqConfig::default(), &mut ident).unwrap();
        assert_eq!(out.dead_columns, 1);
        for r in 0..n {
            assert_eq!(out.w_hat[r * k + 2], 0.0);
            assert_eq!(out.w_hat[r * k], 1.0);
        }
    }

    #[test]
    fn errors() {
        let w = [1.0f32; 8];
        let mut ident = |_j: usize, col: &[f32], out: &mut [f32]| out.copy_from_slice(col);
        // All columns dead: everything zeroed, no error.
        let out = gptq(&w, 2, 4, &[0.0f64; 16], &GptqConfig::default(), &mut ident).unwrap();
        assert_eq!((out.dead_columns, out.w_hat), (4, vec![0.0; 8]));
        // Negative definite: no damping can fix it.
        let mut neg = [0.0f64; 16];
        for i in 0..4 {
            neg[i * 4 + i] = -1.0;
        }
        assert!(matches!(
            gptq(&w, 2, 4, &neg, &GptqConfig::default(), &mut ident),
            Err(QuantError::Linalg { .. })
        ));
        assert!(matches!(
            gptq(&w, 2, 4, &[1.0; 15], &GptqConfig::default(), &mut ident),
            Err(QuantError::ShapeMismatch { .. })
        ));
        let bad = GptqConfig {
            block_size: 0,
            ..GptqConfig::default()
        };
        assert!(matches!(
            gptq(&w, 2, 4, &[1.0; 16], &bad, &mut ident),
            Err(QuantError::OutOfRange { .. })
        ));
        assert!(matches!(
            GroupQuantizer::new(2, 4, 9, 4, None, ScaleSearch::Grid),
            Err(QuantError::BitsOutOfRange { .. })
        ));
        let mut wrong = GroupQuantizer::new(3, 4, 4, 4, None, ScaleSearch::Grid).unwrap();
        assert!(matches!(
            gptq(
                &w,
                2,
                4,
                &[1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0],
                &GptqConfig::default(),
                &mut wrong
            ),
            Err(QuantError::Incompatible { .. })
        ));
        assert!(matches!(
            TernaryQuantizer::new(2, 6, 4, None, TernaryChoice::Best),
            Err(QuantError::InvalidGroup { .. })
        ));
        let mut nan = |_j: usize, _c: &[f32], out: &mut [f32]| out.fill(f32::NAN);
        let mut h = [0.0f64; 16];
        for i in 0..4 {
            h[i * 4 + i] = 1.0;
        }
        assert!(matches!(
            gptq(&w, 2, 4, &h, &GptqConfig::default(), &mut nan),
            Err(QuantError::NonFinite { .. })
        ));
    }
}

//! Threads for large compressed-weight products (with the `std` feature).
//!
//! A product is cut along the outer dimension of `C` — output columns (weight rows) when the
//! column stride spans a whole column (GEMV, channel-major "NCHW" outputs), activation rows when
//! the row stride spans a whole row — so that each piece owns a contiguous, disjoint part of `C`
//! and runs the ordinary kernel on it (safe slices, no shared writes). A piece of weight rows is
//! a view of the same bytes whose layout offsets are shifted to it ([`QWeights::rows_view`]);
//! pieces never split a shared table in a way the view cannot describe.
//!
//! Every output comes out of the same arithmetic as on one thread (the kernels' per-output
//! arithmetic does not depend on the tile or piece it falls in, and row pieces hold at least
//! [`ROW_UNIT`] rows so that they pick the same tile shapes as the whole product), so threaded
//! results are bit-identical.

use edgetune_core::Activation;

use super::{QGemm, QWeights, SparseWeights};
use crate::kernels::Kernels;

/// Products with fewer multiply-adds than this stay on the calling thread: below it, waking
/// rayon workers costs more than it saves.
const PAR_MIN_MACS: usize = 1 << 20;

/// Row pieces are multiples of this many activation rows (the last one takes the rest): a
/// multiple of the 4-row tiles of the compressed kernels and the 6-row tiles of the f32
/// micro-kernels the panel path runs.
const ROW_UNIT: usize = 12;

/// Column pieces are multiples of this many outputs (a whole number of kernel tiles, and of
/// the row tiles of a tiled layout).
const COL_UNIT: usize = edgetune_core::layout::ROW_TILE;

/// How one product is cut: piece `p` covers `bounds[p]..bounds[p + 1]` of rows or columns.
enum Split {
    Rows(Vec<usize>),
    Cols(Vec<usize>),
}

/// Chooses a split, or `None` to stay on this thread. `rpt` is the weight's rows per table
/// (1 for weights without tables); `cols` false forbids column pieces.
#[allow(clippy::too_many_arguments)]
fn plan(
    threads: usize,
    m: usize,
    n: usize,
    k: usize,
    c_rs: usize,
    c_cs: usize,
    rpt: usize,
    cols: bool,
) -> Option<Split> {
    if threads <= 1 || m.saturating_mul(n).saturating_mul(k) < PAR_MIN_MACS {
        return None;
    }
    let cols_outer = m == 1 || c_cs > (m - 1) * c_rs;
    let rows_outer = n == 1 || c_rs > (n - 1) * c_cs;
    let row_units = m / ROW_UNIT;
    let col_units = n / COL_UNIT;
    if cols && cols_outer && col_units >= 2 && (!rows_outer || row_units < 2 * threads) {
        let tasks = col_units.min(threads * 4);
        let mut bounds = vec![0];
        let mut j = 0;
        for t in 1..=tasks {
            let target = if t == tasks {
                n
            } else {
                col_units * t / tasks * COL_UNIT
            };
            while j < target {
                j = next_cut(j, target, n, rpt);
                bounds.push(j);
            }
        }
        return Some(Split::Cols(bounds));
    }
    if rows_outer && row_units >= 2 {
        let tasks = row_units.min(threads * 4);
        let mut bounds: Vec<usize> = (0..tasks)
            .map(|t| row_units * t / tasks * ROW_UNIT)
            .collect();
        bounds.push(m);
        return Some(Split::Rows(bounds));
    }
    None
}

/// The end of the piece of weight rows starting at `j`, as close to `target` as the tables
/// allow: a piece either starts on a table boundary or stays inside one table.
fn next_cut(j: usize, target: usize, n: usize, rpt: usize) -> usize {
    let table_end = (j / rpt + 1) * rpt;
    if !j.is_multiple_of(rpt) || target <= table_end {
        target.min(table_end).min(n)
    } else if target >= n {
        n
    } else {
        target / rpt * rpt
    }
}

/// Runs `f(lo, hi, c_piece)` for every piece in parallel, where `c_piece` starts at element
/// `lo · stride` of `c`: the pieces of `C` are disjoint because `stride` spans each piece.
fn for_each_piece(
    bounds: &[usize],
    stride: usize,
    c: &mut [f32],
    f: &(dyn Fn(usize, usize, &mut [f32]) + Sync),
) {
    if bounds.len() == 2 {
        return f(bounds[0], bounds[1], c);
    }
    let mid = bounds.len() / 2;
    let (left, right) = c.split_at_mut((bounds[mid] - bounds[0]) * stride);
    rayon::join(
        || for_each_piece(&bounds[..=mid], stride, left, f),
        || for_each_piece(&bounds[mid..], stride, right, f),
    );
}

impl<'a> QWeights<'a> {
    /// Weight rows `j0..j1` as a weight of their own: the same bytes, offsets shifted. The rows
    /// must start on a table boundary or share one table.
    pub(crate) fn rows_view(&self, j0: usize, j1: usize) -> QWeights<'a> {
        let l = self.layout;
        let rpt = l.rows_per_table;
        let t0 = j0 / rpt;
        let one_table = (j1 - 1) / rpt == t0;
        assert!(
            one_table || j0.is_multiple_of(rpt),
            "qgemm: a row view must not split a table"
        );
        assert!(
            !l.row_tiles() || j0.is_multiple_of(edgetune_core::layout::ROW_TILE),
            "qgemm: a row view of a tiled layout must start on a tile"
        );
        // Tiles are whole rows' worth of bytes, so a view from a tile's first row starts here.
        let base = j0 * l.row_bytes();
        let e = l.entries();
        let layout = edgetune_core::layout::QBlockLayout {
            n: j1 - j0,
            rows_per_table: if one_table { j1 - j0 } else { rpt },
            tables: if one_table {
                1
            } else {
                (j1 - j0).div_ceil(rpt)
            },
            lut_off: l.lut_off + t0 * e * 2 - base,
            lut_i8_off: l.lut_i8_off + t0 * e - base,
            lut_scale_off: l.lut_scale_off + t0 * 4 - base,
            scales_off: l.scales_off + j0 * l.groups_per_row() * 2 - base,
            len: l.len - base,
            ..l
        };
        QWeights {
            layout,
            bytes: &self.bytes[base..],
        }
    }
}

impl<'a> SparseWeights<'a> {
    /// Weight rows `j0..j1` as a weight of their own: the same bytes, offsets shifted.
    pub(crate) fn rows_view(&self, j0: usize, j1: usize) -> SparseWeights<'a> {
        let l = self.layout;
        let base = j0 * l.per_row() * 2;
        let layout = edgetune_core::layout::SparseLayout {
            n: j1 - j0,
            pos_off: l.pos_off + j0 * l.pos_row_bytes - base,
            len: l.len - base,
            ..l
        };
        SparseWeights {
            layout,
            bytes: &self.bytes[base..],
        }
    }
}

/// A product with f32 activations split over threads; gives `g` back when it should run on
/// this thread instead. `view(j0, j1)` is the weight's rows `j0..j1`; `kernel` runs one piece.
pub(super) fn qgemm_f32<'g, W: Sync>(
    kernels: &Kernels,
    (n, k, rpt, cols): (usize, usize, usize, bool),
    w: &W,
    view: impl Fn(&W, usize, usize) -> W + Sync,
    kernel: impl Fn(&W, QGemm<'_>) + Sync,
    g: QGemm<'g>,
) -> Option<QGemm<'g>> {
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
    match plan(kernels.threads, m, n, k, c_rs, c_cs, rpt, cols) {
        None => Some(QGemm {
            m,
            a,
            a_rs,
            c,
            c_rs,
            c_cs,
            bias,
            act,
        }),
        Some(Split::Cols(bounds)) => {
            for_each_piece(&bounds, c_cs, c, &|j0, j1, c| {
                let bias = bias.map(|b| &b[j0..]);
                kernel(
                    &view(w, j0, j1),
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
                );
            });
            None
        }
        Some(Split::Rows(bounds)) => {
            for_each_piece(&bounds, c_rs, c, &|i0, i1, c| {
                let a = &a[i0 * a_rs..];
                kernel(
                    w,
                    QGemm {
                        m: i1 - i0,
                        a,
                        a_rs,
                        c,
                        c_rs,
                        c_cs,
                        bias,
                        act,
                    },
                );
            });
            None
        }
    }
}

/// One chunk of int8-activation rows split over threads; false when it should run on this
/// thread instead.
#[allow(clippy::too_many_arguments)]
pub(super) fn qgemm_q8(
    kernels: &Kernels,
    w: &QWeights<'_>,
    rows: &[u8],
    m: usize,
    c: &mut [f32],
    c_rs: usize,
    c_cs: usize,
    bias: Option<&[f32]>,
    act: Activation,
) -> bool {
    let l = w.layout;
    let rb = super::q8_row_bytes(l.k);
    match plan(
        kernels.threads,
        m,
        l.n,
        l.k,
        c_rs,
        c_cs,
        l.rows_per_table,
        w.column_pieces(),
    ) {
        None => false,
        Some(Split::Cols(bounds)) => {
            for_each_piece(&bounds, c_cs, c, &|j0, j1, c| {
                let bias = bias.map(|b| &b[j0..]);
                (kernels.qgemm_q8)(&w.rows_view(j0, j1), rows, m, c, c_rs, c_cs, bias, act);
            });
            true
        }
        Some(Split::Rows(bounds)) => {
            for_each_piece(&bounds, c_rs, c, &|i0, i1, c| {
                (kernels.qgemm_q8)(
                    w,
                    &rows[i0 * rb..i1 * rb],
                    i1 - i0,
                    c,
                    c_rs,
                    c_cs,
                    bias,
                    act,
                );
            });
            true
        }
    }
}

/// Views of a sparse weight's rows, for [`qgemm_f32`].
pub(super) fn sparse_view<'a>(w: &SparseWeights<'a>, j0: usize, j1: usize) -> SparseWeights<'a> {
    w.rows_view(j0, j1)
}

impl QWeights<'_> {
    /// True when every column piece [`plan`] cuts can be a [`QWeights::rows_view`]: cuts fall on
    /// table boundaries, and on tiles of a tiled layout only if those are table boundaries too.
    pub(super) fn column_pieces(&self) -> bool {
        let (rpt, tile) = (self.layout.rows_per_table, edgetune_core::layout::ROW_TILE);
        !self.layout.row_tiles()
            || self.layout.tables == 1
            || rpt.is_multiple_of(tile)
            || tile.is_multiple_of(rpt)
    }
}

/// Views of a block-quantized weight's rows, for [`qgemm_f32`].
pub(super) fn q_view<'a>(w: &QWeights<'a>, j0: usize, j1: usize) -> QWeights<'a> {
    w.rows_view(j0, j1)
}

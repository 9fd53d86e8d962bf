//! Weighted 1-D k-means and scalar codebooks ("palettization").
//!
//! [`kmeans_1d`] clusters scalars with per-point weights. Because the data are 1-D, clusters are
//! contiguous ranges of the sorted values, separated by the midpoints between consecutive
//! centroids. The values are sorted (and exact duplicates merged) once; prefix sums of `w`,
//! `w·x` and `w·x²` then make each Lloyd iteration `O(K log m)` (one binary search per centroid
//! midpoint, `m` = distinct values) instead of `O(m K)`.
//!
//! Initialisation: one run from weighted quantiles plus `restarts` runs from k-means++ seeding
//! (D² sampling with a seeded [`SplitMix64`]); the run with the lowest weighted inertia wins.
//! Empty (or zero-weight) clusters are re-seeded at the points with the largest weighted
//! squared error. If there are no more distinct values than clusters, every distinct value
//! becomes its own centroid (zero error) and fewer centroids are returned.
//!
//! [`codebook_quantize`] builds lookup tables of `2^bits` f32 entries for a weight matrix, one
//! per tensor, per row or per group of rows, and an index per weight. With an importance
//! vector (mean x² per input column, see [`crate::stats`]) each weight `w[r][c]` counts with
//! weight `importance[c]` — coremltools' "sensitive k-means" with the imatrix as sensitivity.
//!
//! ```
//! use edgetune_quant::kmeans::{codebook_quantize, Granularity};
//! let w = [0.0, 0.1, 1.0, 1.1, -2.0, -2.1];
//! let cb = codebook_quantize(&w, 2, 3, 2, Granularity::PerTensor, None).unwrap();
//! assert_eq!(cb.centroids.len(), 4); // one table of 2^2 entries
//! let back = cb.dequantize();
//! assert!(back.iter().zip(&w).all(|(a, b)| (a - b).abs() <= 0.05 + 1e-6));
//! ```

use crate::rng::SplitMix64;
use crate::scalar::round_to_f16;
use crate::util::{check_importance, check_matrix, check_weights};
use crate::{QuantError, Result};

/// Parameters of [`kmeans_1d`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KMeansConfig {
    /// Maximum Lloyd iterations per run (each is `O(K log m)`).
    pub max_iter: usize,
    /// Number of k-means++ seeded runs in addition to the quantile-initialised run.
    pub restarts: usize,
    /// Seed of the k-means++ sampling.
    pub seed: u64,
}

impl Default for KMeansConfig {
    fn default() -> Self {
        KMeansConfig {
            max_iter: 300,
            restarts: 2,
            seed: 0x5EED,
        }
    }
}

/// Result of [`kmeans_1d`].
#[derive(Debug, Clone, PartialEq)]
pub struct KMeans1d {
    /// Centroids, sorted ascending (non-strictly). At most the requested count; fewer when the
    /// data have fewer distinct values.
    pub centroids: Vec<f32>,
    /// For each input value, the index of its nearest centroid.
    pub assignments: Vec<u8>,
    /// Weighted sum of squared errors `Σ w_i (x_i − c_{a_i})²` with the f32 centroids.
    pub inertia: f64,
    /// Lloyd iterations of the winning run.
    pub iterations: usize,
}

/// Index of the centroid nearest to `x` in an ascending `centroids` slice (ties go to the lower
/// index). Returns 0 for an empty slice; only the first 256 centroids are addressable.
///
/// ```
/// use edgetune_quant::kmeans::nearest_centroid;
/// assert_eq!(nearest_centroid(&[-1.0, 0.0, 2.0], 0.9), 1);
/// assert_eq!(nearest_centroid(&[-1.0, 0.0, 2.0], 1.1), 2);
/// ```
pub fn nearest_centroid(centroids: &[f32], x: f32) -> u8 {
    if centroids.is_empty() {
        return 0;
    }
    // First centroid >= x; the answer is it or its predecessor.
    let i = centroids.partition_point(|&c| c < x);
    let idx = if i == 0 {
        0
    } else if i == centroids.len() {
        centroids.len() - 1
    } else if (x - centroids[i - 1]) <= (centroids[i] - x) {
        // For duplicated centroids, step back to the first copy.
        let mut j = i - 1;
        while j > 0 && centroids[j - 1] == centroids[j] {
            j -= 1;
        }
        j
    } else {
        i
    };
    idx.min(255) as u8
}

/// Weighted 1-D k-means.
///
/// * `values`: the points (finite).
/// * `weights`: optional per-point weights (finite, `>= 0`, same length). `None` means all 1.
///   If all weights are 0 the points are treated as equally weighted.
/// * `n_clusters`: `1..=256` (assignments are `u8`).
///
/// ```
/// use edgetune_quant::kmeans::{kmeans_1d, KMeansConfig};
/// let v = [1.0, 1.2, 5.0, 5.2, 5.4];
/// let r = kmeans_1d(&v, None, 2, &KMeansConfig::default()).unwrap();
/// assert!((r.centroids[0] - 1.1).abs() < 1e-6 && (r.centroids[1] - 5.2).abs() < 1e-6);
/// assert_eq!(r.assignments, vec![0, 0, 1, 1, 1]);
/// ```
pub fn kmeans_1d(
    values: &[f32],
    weights: Option<&[f32]>,
    n_clusters: usize,
    cfg: &KMeansConfig,
) -> Result<KMeans1d> {
    if values.is_empty() {
        return Err(QuantError::EmptyInput {
            what: "k-means values",
        });
    }
    if n_clusters == 0 || n_clusters > 256 {
        return Err(QuantError::OutOfRange {
            what: "number of clusters",
            value: n_clusters as f64,
            allowed: "1..=256",
        });
    }
    if values.len() > u32::MAX as usize {
        return Err(QuantError::OutOfRange {
            what: "k-means value count",
            value: values.len() as f64,
            allowed: "<= 2^32 - 1",
        });
    }
    crate::util::check_finite(values, "k-means values")?;
    if let Some(w) = weights {
        check_weights(w, values.len(), "k-means weights")?;
    }
    let all_zero = weights.is_some_and(|w| w.iter().all(|&x| x == 0.0));
    let weight_of = |i: usize| -> f64 {
        match weights {
            Some(w) if !all_zero => w[i] as f64,
            _ => 1.0,
        }
    };

    // Sort once, merge exact duplicates.
    let mut order: Vec<u32> = (0..values.len() as u32).collect();
    order.sort_unstable_by(|&a, &b| values[a as usize].total_cmp(&values[b as usize]));
    let mut xs: Vec<f64> = Vec::new();
    let mut ws: Vec<f64> = Vec::new();
    for &i in &order {
        let v = values[i as usize];
        let w = weight_of(i as usize);
        match xs.last() {
            Some(&last) if last as f32 == v => {
                if let Some(l) = ws.last_mut() {
                    *l += w;
                }
            }
            _ => {
                xs.push(v as f64);
                ws.push(w);
            }
        }
    }
    drop(order);
    let m = xs.len();

    let centroids_f64: Vec<f64>;
    let mut iterations = 0;
    if m <= n_clusters {
        centroids_f64 = xs.clone();
    } else {
        let data = Sorted1d::new(xs, ws);
        let mut best: Option<(f64, Vec<f64>, usize)> = None;
        let mut rng = SplitMix64::new(cfg.seed);
        for run in 0..=cfg.restarts {
            let init = if run == 0 {
                data.quantile_init(n_clusters)
            } else {
                data.kmeanspp_init(n_clusters, &mut rng)
            };
            let (c, it) = data.lloyd(init, cfg.max_iter);
            let inertia = data.inertia(&c);
            if best.as_ref().is_none_or(|(b, _, _)| inertia < *b) {
                best = Some((inertia, c, it));
            }
        }
        let (_, c, it) = best.unwrap_or((0.0, vec![0.0], 0));
        centroids_f64 = c;
        iterations = it;
    }

    let mut centroids: Vec<f32> = centroids_f64.iter().map(|&c| c as f32).collect();
    centroids.sort_by(f32::total_cmp);
    let mut assignments = Vec::with_capacity(values.len());
    let mut inertia = 0.0f64;
    for (i, &v) in values.iter().enumerate() {
        let a = nearest_centroid(&centroids, v);
        let d = v as f64 - centroids[a as usize] as f64;
        inertia += weight_of(i) * d * d;
        assignments.push(a);
    }
    Ok(KMeans1d {
        centroids,
        assignments,
        inertia,
        iterations,
    })
}

/// Sorted distinct values with weights and prefix sums.
struct Sorted1d {
    xs: Vec<f64>,
    ws: Vec<f64>,
    /// Prefix sums, length m + 1.
    pw: Vec<f64>,
    pwx: Vec<f64>,
}

impl Sorted1d {
    fn new(xs: Vec<f64>, ws: Vec<f64>) -> Self {
        let m = xs.len();
        let mut pw = Vec::with_capacity(m + 1);
        let mut pwx = Vec::with_capacity(m + 1);
        let (mut a, mut b) = (0.0, 0.0);
        pw.push(0.0);
        pwx.push(0.0);
        for (x, w) in xs.iter().zip(&ws) {
            a += w;
            b += w * x;
            pw.push(a);
            pwx.push(b);
        }
        Sorted1d { xs, ws, pw, pwx }
    }

    /// Centroids at the weighted quantiles (j + 0.5) / K.
    fn quantile_init(&self, k: usize) -> Vec<f64> {
        let total = *self.pw.last().unwrap_or(&0.0);
        let mut c: Vec<f64> = (0..k)
            .map(|j| {
                let target = total * (j as f64 + 0.5) / k as f64;
                let i = self.pw[1..].partition_point(|&p| p < target);
                self.xs[i.min(self.xs.len() - 1)]
            })
            .collect();
        c.dedup();
        // Fill duplicates with evenly spaced values over the range; Lloyd sorts it out.
        let (lo, hi) = (self.xs[0], self.xs[self.xs.len() - 1]);
        let mut j = 0;
        while c.len() < k {
            c.push(lo + (hi - lo) * (j as f64 + 0.5) / k as f64);
            j += 1;
        }
        c.sort_by(f64::total_cmp);
        c
    }

    /// k-means++: first centroid sampled by weight, then by weight · D².
    fn kmeanspp_init(&self, k: usize, rng: &mut SplitMix64) -> Vec<f64> {
        let m = self.xs.len();
        let mut c = Vec::with_capacity(k);
        let total_w = *self.pw.last().unwrap_or(&0.0);
        let first = if total_w > 0.0 {
            let t = rng.next_f64() * total_w;
            self.pw[1..].partition_point(|&p| p <= t).min(m - 1)
        } else {
            rng.below(m)
        };
        c.push(self.xs[first]);
        let mut d2: Vec<f64> = self
            .xs
            .iter()
            .map(|x| (x - self.xs[first]).powi(2))
            .collect();
        while c.len() < k {
            let total: f64 = d2.iter().zip(&self.ws).map(|(d, w)| d * w).sum();
            let pick = if total > 0.0 {
                let mut t = rng.next_f64() * total;
                let mut pick = m - 1;
                for (i, (d, w)) in d2.iter().zip(&self.ws).enumerate() {
                    t -= d * w;
                    if t < 0.0 {
                        pick = i;
                        break;
                    }
                }
                // Guard against rounding landing on a zero-probability point.
                if d2[pick] * self.ws[pick] == 0.0 {
                    argmax(d2.iter().zip(&self.ws).map(|(d, w)| d * w))
                } else {
                    pick
                }
            } else {
                // All weighted distance is zero: spread over unweighted distance.
                argmax(d2.iter().copied())
            };
            let cx = self.xs[pick];
            c.push(cx);
            for (d, x) in d2.iter_mut().zip(&self.xs) {
                let nd = (x - cx) * (x - cx);
                if nd < *d {
                    *d = nd;
                }
            }
        }
        c.sort_by(f64::total_cmp);
        c
    }

    /// Cluster boundaries: cluster j holds sorted points `b[j]..b[j+1]`.
    fn boundaries(&self, c: &[f64], b: &mut Vec<usize>) {
        b.clear();
        b.push(0);
        for j in 1..c.len() {
            let mid = 0.5 * (c[j - 1] + c[j]);
            let lo = b[j - 1];
            let i = lo + self.xs[lo..].partition_point(|&x| x <= mid);
            b.push(i);
        }
        b.push(self.xs.len());
    }

    /// Lloyd iterations from sorted `c`; returns sorted centroids and iteration count.
    fn lloyd(&self, mut c: Vec<f64>, max_iter: usize) -> (Vec<f64>, usize) {
        let k = c.len();
        let mut b = Vec::with_capacity(k + 1);
        let mut prev_b: Vec<usize> = Vec::new();
        let mut it = 0;
        while it < max_iter {
            it += 1;
            self.boundaries(&c, &mut b);
            if b == prev_b {
                break;
            }
            let mut empty = Vec::new();
            for j in 0..k {
                let (lo, hi) = (b[j], b[j + 1]);
                let w = self.pw[hi] - self.pw[lo];
                if w > 0.0 {
                    c[j] = (self.pwx[hi] - self.pwx[lo]) / w;
                } else {
                    empty.push(j);
                }
            }
            if !empty.is_empty() {
                self.reseed(&mut c, &b, &empty);
                c.sort_by(f64::total_cmp);
                prev_b.clear(); // centroids moved: do not stop on this boundary set
                continue;
            }
            std::mem::swap(&mut prev_b, &mut b);
        }
        (c, it)
    }

    /// Moves the centroids listed in `empty` onto the points with the largest weighted
    /// squared error (unweighted if that is all zero), one distinct point each.
    fn reseed(&self, c: &mut [f64], b: &[usize], empty: &[usize]) {
        let m = self.xs.len();
        let mut owner = vec![0usize; m];
        for j in 0..c.len() {
            for o in &mut owner[b[j]..b[j + 1]] {
                *o = j;
            }
        }
        // (Points of an empty cluster all have weight 0, so their stale centroid is harmless.)
        let mut err: Vec<(f64, usize)> = (0..m)
            .map(|i| {
                let d = self.xs[i] - c[owner[i]];
                (self.ws[i] * d * d, i)
            })
            .collect();
        if err.iter().all(|(e, _)| *e == 0.0) {
            err = (0..m)
                .map(|i| {
                    let d = self.xs[i] - c[owner[i]];
                    (d * d, i)
                })
                .collect();
        }
        err.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut taken = 0;
        for &j in empty {
            // Skip candidate points that already coincide with a centroid.
            while taken < m && c.contains(&self.xs[err[taken].1]) {
                taken += 1;
            }
            if taken < m {
                c[j] = self.xs[err[taken].1];
                taken += 1;
            }
        }
    }

    /// Weighted inertia of sorted centroids `c`.
    fn inertia(&self, c: &[f64]) -> f64 {
        let mut b = Vec::new();
        let mut sorted = c.to_vec();
        sorted.sort_by(f64::total_cmp);
        self.boundaries(&sorted, &mut b);
        let mut s = 0.0;
        for j in 0..sorted.len() {
            for i in b[j]..b[j + 1] {
                let d = self.xs[i] - sorted[j];
                s += self.ws[i] * d * d;
            }
        }
        s
    }
}

fn argmax(it: impl Iterator<Item = f64>) -> usize {
    let mut best = (f64::NEG_INFINITY, 0);
    for (i, v) in it.enumerate() {
        if v > best.0 {
            best = (v, i);
        }
    }
    best.1
}

/// Which rows share a lookup table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granularity {
    /// One table for the whole matrix.
    PerTensor,
    /// One table per output row.
    PerRow,
    /// One table per `g` consecutive output rows (the last table may cover fewer rows when `g`
    /// does not divide `n`). `g > 0`.
    PerGroupOfRows(usize),
}

/// Per-row scale normalisation before clustering.
///
/// With scaling on, row `r` is divided by `s_r = max_c |w[r][c]|` (rounded to f16), the
/// normalised rows are clustered, and the weight is reconstructed as `s_r · table[index]`. The
/// clustering weight of `w[r][c]` becomes `importance[c] · s_r²`, so the objective is still the
/// error in the original space. This helps shared tables (per tensor or per group of rows) when
/// rows differ a lot in magnitude, at the cost of one f16 scale per row; for per-row tables it
/// cannot help (a table already adapts to its row).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowScaling {
    /// No row scales.
    Off,
    /// Always use row scales.
    On,
    /// Cluster both ways and keep row scales only if they lower the (importance-weighted)
    /// error by more than 0.1%. Per-row tables never get scales.
    Auto,
}

/// Options of [`codebook_quantize_with`].
#[derive(Debug, Clone, Copy)]
pub struct CodebookOptions<'a> {
    /// Index width, `1..=8`: tables have `2^bits` entries.
    pub bits: u32,
    /// Which rows share a table.
    pub granularity: Granularity,
    /// Optional per-input-column importance (length `k`, `>= 0`), e.g. mean x².
    pub importance: Option<&'a [f32]>,
    /// Per-row scale normalisation.
    pub row_scaling: RowScaling,
    /// Scale every `g` consecutive inputs of a row by their own f16 absmax before clustering
    /// (as NF4 does with its fixed table): tables then hold the shape of the distribution and
    /// scales its local size. Overrides `row_scaling`. `g > 0`.
    pub scale_group: Option<usize>,
    /// k-means parameters.
    pub kmeans: KMeansConfig,
}

impl<'a> CodebookOptions<'a> {
    /// Options with default row scaling (off) and k-means parameters.
    pub fn new(bits: u32, granularity: Granularity, importance: Option<&'a [f32]>) -> Self {
        CodebookOptions {
            bits,
            granularity,
            importance,
            row_scaling: RowScaling::Off,
            scale_group: None,
            kmeans: KMeansConfig::default(),
        }
    }
}

/// A scalar-codebook encoded matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct Codebook {
    /// Index width; every table has `2^bits` entries.
    pub bits: u32,
    /// Output rows.
    pub n: usize,
    /// Input columns.
    pub k: usize,
    /// Rows per table (`n` per tensor, 1 per row, `g` per group of rows).
    pub rows_per_table: usize,
    /// `num_tables() x 2^bits` entries, each table sorted ascending. When the data had fewer
    /// distinct values than entries, the table is padded by repeating its largest value.
    pub centroids: Vec<f32>,
    /// One index per weight, row-major `n x k`, each `< 2^bits`.
    pub indices: Vec<u8>,
    /// Scales (already f16-representable) when scaling is used: the weight is
    /// `scales[r * groups_per_row + c / scale_group] * table[index]`.
    pub scales: Option<Vec<f32>>,
    /// Inputs per scale (`k` for one scale per row).
    pub scale_group: usize,
}

impl Codebook {
    /// Entries per table.
    pub fn table_len(&self) -> usize {
        1 << self.bits
    }

    /// Number of tables.
    pub fn num_tables(&self) -> usize {
        self.n.div_ceil(self.rows_per_table)
    }

    /// Table index used by row `r`.
    pub fn table_of_row(&self, r: usize) -> usize {
        r / self.rows_per_table
    }

    /// Entries of table `t` (ascending).
    ///
    /// # Panics
    /// If `t >= num_tables()` or the struct was built inconsistently by hand.
    pub fn table(&self, t: usize) -> &[f32] {
        let l = self.table_len();
        &self.centroids[t * l..(t + 1) * l]
    }

    /// Scales per row.
    pub fn groups_per_row(&self) -> usize {
        self.k.div_ceil(self.scale_group)
    }

    /// The scale of `w[r][c]` (1 without scales).
    pub fn scale(&self, r: usize, c: usize) -> f32 {
        match &self.scales {
            Some(s) => s[r * self.groups_per_row() + c / self.scale_group],
            None => 1.0,
        }
    }

    /// Reconstructed weight `w[r][c]`.
    ///
    /// # Panics
    /// If `r >= n` or `c >= k`.
    pub fn value(&self, r: usize, c: usize) -> f32 {
        self.scale(r, c) * self.table(self.table_of_row(r))[self.indices[r * self.k + c] as usize]
    }

    /// The reconstructed `n x k` matrix.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.n * self.k);
        for r in 0..self.n {
            for c in 0..self.k {
                out.push(self.value(r, c));
            }
        }
        out
    }
}

/// Scalar codebook quantization with default options (row scaling off, default k-means).
///
/// `bits` in `1..=8`; `importance` (length `k`) weights each weight `w[r][c]` by
/// `importance[c]`. See [`codebook_quantize_with`].
pub fn codebook_quantize(
    w: &[f32],
    n: usize,
    k: usize,
    bits: u32,
    granularity: Granularity,
    importance: Option<&[f32]>,
) -> Result<Codebook> {
    codebook_quantize_with(
        w,
        n,
        k,
        &CodebookOptions::new(bits, granularity, importance),
    )
}

/// Scalar codebook quantization of an `n x k` matrix: one k-means table per tensor / row /
/// group of rows, indices per weight, optional per-row scales (see [`RowScaling`]).
pub fn codebook_quantize_with(
    w: &[f32],
    n: usize,
    k: usize,
    opts: &CodebookOptions<'_>,
) -> Result<Codebook> {
    check_matrix(w, n, k, "weight matrix")?;
    if !(1..=8).contains(&opts.bits) {
        return Err(QuantError::BitsOutOfRange {
            bits: opts.bits,
            min: 1,
            max: 8,
        });
    }
    check_importance(opts.importance, k)?;
    let rows_per_table = match opts.granularity {
        Granularity::PerTensor => n,
        Granularity::PerRow => 1,
        Granularity::PerGroupOfRows(0) => {
            return Err(QuantError::InvalidGroup { group: 0, dim: n });
        }
        Granularity::PerGroupOfRows(g) => g.min(n),
    };
    if let Some(g) = opts.scale_group {
        if g == 0 {
            return Err(QuantError::InvalidGroup { group: 0, dim: k });
        }
        let g = g.min(k);
        return cluster(
            w,
            n,
            k,
            opts,
            rows_per_table,
            Some((g, absmax_f16(w, n, k, g)?)),
        );
    }
    match opts.row_scaling {
        RowScaling::Off => cluster(w, n, k, opts, rows_per_table, None),
        RowScaling::On => cluster(
            w,
            n,
            k,
            opts,
            rows_per_table,
            Some((k, absmax_f16(w, n, k, k)?)),
        ),
        // A per-row table already adapts to its row: scaling cannot help, skip the second run.
        RowScaling::Auto if rows_per_table == 1 => cluster(w, n, k, opts, rows_per_table, None),
        RowScaling::Auto => {
            let plain = cluster(w, n, k, opts, rows_per_table, None)?;
            let scaled = cluster(
                w,
                n,
                k,
                opts,
                rows_per_table,
                Some((k, absmax_f16(w, n, k, k)?)),
            )?;
            let e_plain = weighted_error(w, &plain.dequantize(), k, opts.importance);
            let e_scaled = weighted_error(w, &scaled.dequantize(), k, opts.importance);
            // Row scales cost storage: require a real (0.1%) gain, not rounding noise.
            Ok(if e_scaled < e_plain * (1.0 - 1e-3) {
                scaled
            } else {
                plain
            })
        }
    }
}

/// f16 absmax of every `g` consecutive inputs of each row (`n × ⌈k/g⌉`).
fn absmax_f16(w: &[f32], n: usize, k: usize, g: usize) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(n * k.div_ceil(g));
    for row in w.chunks_exact(k).take(n) {
        for part in row.chunks(g) {
            let m = part.iter().fold(0.0f32, |a, x| a.max(x.abs()));
            let s = round_to_f16(m);
            if !s.is_finite() {
                return Err(QuantError::ScaleOverflow { scale: m as f64 });
            }
            out.push(s);
        }
    }
    Ok(out)
}

/// Importance-weighted squared error `Σ imp[c] (w − ŵ)²` (plain SSE without importance).
pub(crate) fn weighted_error(w: &[f32], w_hat: &[f32], k: usize, imp: Option<&[f32]>) -> f64 {
    w.iter()
        .zip(w_hat)
        .enumerate()
        .map(|(i, (a, b))| {
            let d = (*a as f64) - (*b as f64);
            imp.map_or(1.0, |imp| imp[i % k] as f64) * d * d
        })
        .sum()
}

fn cluster(
    w: &[f32],
    n: usize,
    k: usize,
    opts: &CodebookOptions<'_>,
    rows_per_table: usize,
    scales: Option<(usize, Vec<f32>)>,
) -> Result<Codebook> {
    let gpr = scales.as_ref().map_or(1, |(g, _)| k.div_ceil(*g));
    let table_len = 1usize << opts.bits;
    let num_tables = n.div_ceil(rows_per_table);
    let mut centroids = Vec::with_capacity(num_tables * table_len);
    let mut indices = Vec::with_capacity(n * k);
    let mut vals = Vec::new();
    let mut wts = Vec::new();
    for t in 0..num_tables {
        let r0 = t * rows_per_table;
        let r1 = (r0 + rows_per_table).min(n);
        vals.clear();
        wts.clear();
        for r in r0..r1 {
            for c in 0..k {
                let s = scales.as_ref().map(|(g, s)| s[r * gpr + c / g]);
                let x = w[r * k + c];
                let imp = opts.importance.map_or(1.0, |imp| imp[c]);
                match s {
                    Some(s) if s > 0.0 => {
                        vals.push(x / s);
                        wts.push(imp * s * s);
                    }
                    Some(_) => {
                        // All-zero row: reconstructs to 0 whatever the index.
                        vals.push(0.0);
                        wts.push(0.0);
                    }
                    None => {
                        vals.push(x);
                        wts.push(imp);
                    }
                }
            }
        }
        let weighted = opts.importance.is_some() || scales.is_some();
        let km = kmeans_1d(&vals, weighted.then_some(&wts[..]), table_len, &opts.kmeans)?;
        let mut table = km.centroids;
        let last = *table.last().unwrap_or(&0.0);
        table.resize(table_len, last);
        centroids.extend_from_slice(&table);
        indices.extend_from_slice(&km.assignments);
    }
    Ok(Codebook {
        bits: opts.bits,
        n,
        k,
        rows_per_table,
        centroids,
        indices,
        scale_group: scales.as_ref().map_or(k, |(g, _)| *g),
        scales: scales.map(|(_, s)| s),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> KMeansConfig {
        KMeansConfig::default()
    }

    #[test]
    fn three_separated_clusters_hand_computed() {
        // Means by hand: {-5,-4,-3} -> -4, {0, 1} -> 0.5, {10, 11, 12, 13} -> 11.5
        let v = [10.0, -5.0, 0.0, 11.0, -4.0, 12.0, 1.0, -3.0, 13.0];
        let r = kmeans_1d(&v, None, 3, &cfg()).unwrap();
        assert_eq!(r.centroids, vec![-4.0, 0.5, 11.5]);
        assert_eq!(r.assignments, vec![2, 0, 1, 2, 0, 2, 1, 0, 2]);
        // inertia: 2*1 + 2*0.25 + 2*(2.25 + 0.25) = 2 + 0.5 + 5 = 7.5
        assert!((r.inertia - 7.5).abs() < 1e-9);
    }

    #[test]
    fn weights_pull_centroid() {
        // One cluster: weighted mean (1*0 + 3*4) / 4 = 3.
        let r = kmeans_1d(&[0.0, 4.0], Some(&[1.0, 3.0]), 1, &cfg()).unwrap();
        assert_eq!(r.centroids, vec![3.0]);
        assert!((r.inertia - (9.0 + 3.0)).abs() < 1e-9);
    }

    #[test]
    fn zero_weight_points_do_not_move_centroids() {
        // Points 100 and 200 have zero weight; two clusters must fit {0, 1} exactly... the
        // weighted optimum puts one centroid at 0 and one at 1 (inertia 0).
        let v = [0.0, 1.0, 100.0, 200.0];
        let r = kmeans_1d(&v, Some(&[1.0, 1.0, 0.0, 0.0]), 2, &cfg()).unwrap();
        assert_eq!(r.centroids, vec![0.0, 1.0]);
        assert_eq!(r.inertia, 0.0);
    }

    #[test]
    fn fewer_distinct_values_than_clusters() {
        let v = [2.0, 2.0, -1.0, 2.0, -1.0];
        let r = kmeans_1d(&v, None, 16, &cfg()).unwrap();
        assert_eq!(r.centroids, vec![-1.0, 2.0]);
        assert_eq!(r.assignments, vec![1, 1, 0, 1, 0]);
        assert_eq!(r.inertia, 0.0);
    }

    #[test]
    fn lloyd_fixed_point_and_optimality() {
        // On random data the result must be a Lloyd fixed point: each centroid is the weighted
        // mean of its points, and each point is assigned to its nearest centroid.
        let mut rng = SplitMix64::new(9);
        let v: Vec<f32> = (0..5000).map(|_| rng.next_gaussian() as f32).collect();
        let wts: Vec<f32> = (0..5000).map(|_| rng.next_f64() as f32).collect();
        let r = kmeans_1d(&v, Some(&wts), 8, &cfg()).unwrap();
        assert_eq!(r.centroids.len(), 8);
        for j in 0..8 {
            let (mut sw, mut swx) = (0.0f64, 0.0f64);
            for i in 0..v.len() {
                if r.assignments[i] as usize == j {
                    sw += wts[i] as f64;
                    swx += wts[i] as f64 * v[i] as f64;
                }
            }
            assert!(sw > 0.0, "cluster {j} empty");
            assert!(((swx / sw) as f32 - r.centroids[j]).abs() < 1e-5);
        }
        for (i, &x) in v.iter().enumerate() {
            let a = r.assignments[i] as usize;
            let da = (x - r.centroids[a]).abs();
            assert!(r.centroids.iter().all(|c| da <= (x - c).abs() + 1e-6));
        }
        // Lloyd-Max 3-bit quantizer of N(0,1) has MSE 0.03454; a good k-means should get
        // within a few percent of it on 5000 samples (weights are independent of values).
        let mse = r.inertia / wts.iter().map(|&w| w as f64).sum::<f64>();
        assert!(mse < 0.0345 * 1.1, "mse {mse}");
    }

    #[test]
    fn empty_clusters_are_reseeded() {
        // Start Lloyd from three identical centroids: two clusters are empty at first and must
        // be re-seeded, ending with three distinct, non-empty clusters at a fixed point.
        let data = Sorted1d::new(vec![0.0, 1.0, 10.0, 11.0, 20.0, 21.0], vec![1.0; 6]);
        let (c, _) = data.lloyd(vec![0.0, 0.0, 0.0], 100);
        assert!(c[0] < c[1] && c[1] < c[2], "{c:?}");
        let mut b = Vec::new();
        data.boundaries(&c, &mut b);
        for j in 0..3 {
            assert!(b[j + 1] > b[j], "cluster {j} empty: {b:?}");
            let mean = data.xs[b[j]..b[j + 1]].iter().sum::<f64>() / (b[j + 1] - b[j]) as f64;
            assert!((mean - c[j]).abs() < 1e-12);
        }
        // The full routine (quantile + k-means++ restarts) finds the optimum {0,1},{10,11},{20,21}.
        let v = [0.0, 1.0, 10.0, 11.0, 20.0, 21.0];
        let r = kmeans_1d(&v, None, 3, &cfg()).unwrap();
        assert_eq!(r.centroids, vec![0.5, 10.5, 20.5]);
        assert!((r.inertia - 1.5).abs() < 1e-12);
    }

    #[test]
    fn nearest_centroid_ties_and_edges() {
        let c = [-1.0, 1.0, 1.0, 3.0];
        assert_eq!(nearest_centroid(&c, 0.0), 0); // tie goes low
        assert_eq!(nearest_centroid(&c, 1.0), 1); // first of duplicates
        assert_eq!(nearest_centroid(&c, 1.5), 1);
        assert_eq!(nearest_centroid(&c, 100.0), 3);
        assert_eq!(nearest_centroid(&c, -100.0), 0);
    }

    #[test]
    fn errors() {
        assert!(matches!(
            kmeans_1d(&[], None, 2, &cfg()),
            Err(QuantError::EmptyInput { .. })
        ));
        assert!(matches!(
            kmeans_1d(&[1.0], None, 0, &cfg()),
            Err(QuantError::OutOfRange { .. })
        ));
        assert!(matches!(
            kmeans_1d(&[1.0], None, 257, &cfg()),
            Err(QuantError::OutOfRange { .. })
        ));
        assert!(matches!(
            kmeans_1d(&[1.0, 2.0], Some(&[1.0, -1.0]), 1, &cfg()),
            Err(QuantError::NonFinite { .. })
        ));
        assert!(matches!(
            kmeans_1d(&[1.0, f32::NAN], None, 1, &cfg()),
            Err(QuantError::NonFinite { .. })
        ));
        let w = [0.0f32; 8];
        assert!(matches!(
            codebook_quantize(&w, 2, 4, 9, Granularity::PerRow, None),
            Err(QuantError::BitsOutOfRange { bits: 9, .. })
        ));
        assert!(matches!(
            codebook_quantize(&w, 2, 4, 0, Granularity::PerRow, None),
            Err(QuantError::BitsOutOfRange { bits: 0, .. })
        ));
        assert!(matches!(
            codebook_quantize(&w, 2, 3, 4, Granularity::PerRow, None),
            Err(QuantError::ShapeMismatch { .. })
        ));
        assert!(matches!(
            codebook_quantize(&w, 2, 4, 4, Granularity::PerGroupOfRows(0), None),
            Err(QuantError::InvalidGroup { .. })
        ));
        assert!(matches!(
            codebook_quantize(&w, 2, 4, 4, Granularity::PerRow, Some(&[1.0; 3])),
            Err(QuantError::ShapeMismatch { .. })
        ));
        assert!(matches!(
            codebook_quantize(&[], 0, 4, 4, Granularity::PerRow, None),
            Err(QuantError::EmptyInput { .. })
        ));
    }

    #[test]
    fn codebook_tables_and_padding() {
        // 3 rows, groups of 2 rows -> 2 tables; row 2 alone in table 1.
        let w = [1.0, 2.0, 1.0, 2.0, 3.0, 3.0, 7.0, 7.0, 7.0];
        let cb = codebook_quantize(&w, 3, 3, 2, Granularity::PerGroupOfRows(2), None).unwrap();
        assert_eq!(cb.num_tables(), 2);
        assert_eq!(cb.table(0), &[1.0, 2.0, 3.0, 3.0]); // padded with the largest value
        assert_eq!(cb.table(1), &[7.0, 7.0, 7.0, 7.0]);
        assert_eq!(cb.dequantize(), w.to_vec()); // <= 4 distinct values per table: exact
        assert!(cb.indices.iter().all(|&i| i < 4));
    }

    #[test]
    fn importance_focuses_precision() {
        // Column 0 holds values spread in [0, 1], column 1 values spread in [10, 11]. With one
        // centroid per... 1 bit (2 entries) and all importance on column 0, column 0's error
        // must be lower than without importance.
        let mut rng = SplitMix64::new(4);
        let n = 200;
        let mut w = Vec::new();
        for _ in 0..n {
            w.push(rng.next_f64() as f32);
            w.push(10.0 + rng.next_f64() as f32);
        }
        let col0_err = |cb: &Codebook| {
            let d = cb.dequantize();
            (0..n)
                .map(|r| ((w[r * 2] - d[r * 2]) as f64).powi(2))
                .sum::<f64>()
        };
        let plain = codebook_quantize(&w, n, 2, 1, Granularity::PerTensor, None).unwrap();
        let imp = [1.0, 0.0];
        let sens = codebook_quantize(&w, n, 2, 1, Granularity::PerTensor, Some(&imp)).unwrap();
        // Plain: one centroid per column cluster, col-0 error ~ n * var(U(0,1)) = n / 12.
        // Sensitive: both centroids inside [0, 1]: error ~ n / 48 (two halves).
        assert!(col0_err(&plain) > n as f64 / 12.0 * 0.8);
        assert!(
            col0_err(&sens) < n as f64 / 48.0 * 1.3,
            "{}",
            col0_err(&sens)
        );
    }

    #[test]
    fn row_scaling_helps_on_mixed_magnitude_rows() {
        // Rows with magnitudes 1 and 100, shared table: without scaling, the small row collapses
        // onto few centroids. Auto must pick scaling and do better than Off.
        let mut rng = SplitMix64::new(8);
        let (n, k) = (8, 64);
        let w: Vec<f32> = (0..n * k)
            .map(|i| rng.next_gaussian() as f32 * if (i / k) % 2 == 0 { 1.0 } else { 100.0 })
            .collect();
        let mut o = CodebookOptions::new(3, Granularity::PerTensor, None);
        let off = codebook_quantize_with(&w, n, k, &o).unwrap();
        o.row_scaling = RowScaling::Auto;
        let auto = codebook_quantize_with(&w, n, k, &o).unwrap();
        let e_off = weighted_error(&w, &off.dequantize(), k, None);
        let e_auto = weighted_error(&w, &auto.dequantize(), k, None);
        assert!(auto.scales.is_some());
        assert!(e_auto < e_off, "{e_auto} vs {e_off}");
        for s in auto.scales.as_ref().unwrap() {
            assert_eq!(*s, round_to_f16(*s));
        }
    }

    #[test]
    fn per_row_error_bound() {
        // A 4-bit per-row table on uniform data must beat the uniform 16-level grid over the
        // row's range, whose MSE is (range/16)^2 / 12 (k-means with quantile init converges to
        // at least as good a solution on uniform data, within sampling noise).
        let mut rng = SplitMix64::new(2);
        let (n, k) = (4, 512);
        let w: Vec<f32> = (0..n * k)
            .map(|_| rng.next_f64() as f32 * 2.0 - 1.0)
            .collect();
        let cb = codebook_quantize(&w, n, k, 4, Granularity::PerRow, None).unwrap();
        let mse = weighted_error(&w, &cb.dequantize(), k, None) / (n * k) as f64;
        let bound = (2.0f64 / 16.0).powi(2) / 12.0;
        assert!(mse < bound * 1.15, "mse {mse} bound {bound}");
    }
}

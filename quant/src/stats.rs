//! Calibration statistics of a layer's input activations.
//!
//! One forward pass over calibration data feeds every encoder: per input channel `c` it keeps
//! `Σ x_c` (→ the mean, for bias correction), `Σ x_c²` (→ mean x², the "imatrix" importance
//! used by [`crate::scalar`], [`crate::kmeans`] and [`crate::ternary`]), `Σ |x_c|` (→ mean |x|, used by ASVD / AWQ-style scaling) and the sample
//! count, and optionally the full Gram matrix `XᵀX` (`k x k`, accumulated in f64) that
//! [`crate::gptq`] and SVD-LLM ([`crate::lowrank::lowrank_svdllm`]) need.
//!
//! Statistics from several batches, threads or files combine with [`ActStats::merge`]; the
//! result equals a single pass over the concatenated data (up to f64 summation order).
//!
//! ```
//! use edgetune_quant::stats::ActStats;
//! let mut s = ActStats::new(2, true).unwrap();
//! s.update(&[1.0, -2.0, 3.0, 0.0], 2).unwrap(); // two rows: [1,-2], [3,0]
//! assert_eq!(s.count(), 2);
//! assert_eq!(s.mean(), vec![2.0, -1.0]);
//! assert_eq!(s.mean_sq(), vec![5.0, 2.0]); // (1+9)/2, (4+0)/2
//! assert_eq!(s.mean_abs(), vec![2.0, 1.0]);
//! assert_eq!(s.gram().unwrap(), &[10.0, -2.0, -2.0, 4.0]);
//! ```

use faer::{Accum, MatMut, MatRef, Par};

use crate::util::check_finite;
use crate::{QuantError, Result};

/// Rows per internal chunk when accumulating the Gram matrix (bounds the f64 scratch size).
const GRAM_CHUNK_ROWS: usize = 256;

/// Running statistics of the `k` input channels of one layer.
#[derive(Debug, Clone, PartialEq)]
pub struct ActStats {
    k: usize,
    count: u64,
    sum: Vec<f64>,
    sum_sq: Vec<f64>,
    sum_abs: Vec<f64>,
    /// Row-major (= column-major, it is symmetric) `k x k` sum of `x xᵀ`.
    gram: Option<Vec<f64>>,
}

impl ActStats {
    /// Empty statistics for `k` input channels; `with_gram` also keeps `XᵀX` (`k²` f64s: 18 MiB
    /// at `k = 1536`).
    pub fn new(k: usize, with_gram: bool) -> Result<Self> {
        if k == 0 {
            return Err(QuantError::EmptyInput {
                what: "activation channels (k)",
            });
        }
        Ok(ActStats {
            k,
            count: 0,
            sum: vec![0.0; k],
            sum_sq: vec![0.0; k],
            sum_abs: vec![0.0; k],
            gram: with_gram.then(|| vec![0.0; k * k]),
        })
    }

    /// Adds a batch of activation rows (row-major `[rows.len() / k][k]`).
    ///
    /// Errors if `k` differs from the one given to [`ActStats::new`], if `rows` is empty or not
    /// a multiple of `k`, or if it holds NaN/inf (which would poison every statistic).
    pub fn update(&mut self, rows: &[f32], k: usize) -> Result<()> {
        if k != self.k {
            return Err(QuantError::Incompatible {
                what: "activation width differs from ActStats::k",
            });
        }
        if rows.is_empty() {
            return Err(QuantError::EmptyInput {
                what: "activation rows",
            });
        }
        if !rows.len().is_multiple_of(k) {
            return Err(QuantError::ShapeMismatch {
                what: "activation rows (length must be a multiple of k)",
                expected: (rows.len() / k + 1) * k,
                got: rows.len(),
            });
        }
        check_finite(rows, "activation rows")?;
        for row in rows.chunks_exact(k) {
            let sums = self.sum.iter_mut().zip(self.sum_sq.iter_mut());
            for (((s, sq), ab), &x) in sums.zip(self.sum_abs.iter_mut()).zip(row) {
                let x = x as f64;
                *s += x;
                *sq += x * x;
                *ab += x.abs();
            }
        }
        if let Some(gram) = self.gram.as_mut() {
            let mut scratch = Vec::with_capacity(GRAM_CHUNK_ROWS.min(rows.len() / k) * k);
            for chunk in rows.chunks(GRAM_CHUNK_ROWS * k) {
                let m = chunk.len() / k;
                scratch.clear();
                scratch.extend(chunk.iter().map(|&x| x as f64));
                let x = MatRef::from_row_major_slice(&scratch, m, k);
                let g = MatMut::from_column_major_slice_mut(gram, k, k);
                faer::linalg::matmul::matmul(g, Accum::Add, x.transpose(), x, 1.0, Par::Seq);
            }
        }
        self.count += (rows.len() / k) as u64;
        Ok(())
    }

    /// Adds the statistics of `other` (same `k`, both with or both without Gram matrix).
    pub fn merge(&mut self, other: &ActStats) -> Result<()> {
        if other.k != self.k {
            return Err(QuantError::Incompatible {
                what: "merging ActStats with different k",
            });
        }
        if other.gram.is_some() != self.gram.is_some() {
            return Err(QuantError::Incompatible {
                what: "merging ActStats where only one keeps a Gram matrix",
            });
        }
        self.count += other.count;
        for (a, b) in self.sum.iter_mut().zip(&other.sum) {
            *a += b;
        }
        for (a, b) in self.sum_sq.iter_mut().zip(&other.sum_sq) {
            *a += b;
        }
        for (a, b) in self.sum_abs.iter_mut().zip(&other.sum_abs) {
            *a += b;
        }
        if let (Some(a), Some(b)) = (self.gram.as_mut(), other.gram.as_ref()) {
            for (x, y) in a.iter_mut().zip(b) {
                *x += y;
            }
        }
        Ok(())
    }

    /// Number of input channels.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Number of activation rows seen.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Whether the Gram matrix is kept.
    pub fn has_gram(&self) -> bool {
        self.gram.is_some()
    }

    /// Raw per-channel `Σ x²`.
    pub fn sum_sq(&self) -> &[f64] {
        &self.sum_sq
    }

    /// Raw per-channel `Σ |x|`.
    pub fn sum_abs(&self) -> &[f64] {
        &self.sum_abs
    }

    /// Per-channel mean `x²`: the importance ("imatrix") of each input column. All zeros before
    /// any update.
    pub fn mean_sq(&self) -> Vec<f32> {
        let n = self.count.max(1) as f64;
        self.sum_sq.iter().map(|s| (s / n) as f32).collect()
    }

    /// Per-channel mean `|x|` (ASVD / AWQ activation scale). All zeros before any update.
    pub fn mean_abs(&self) -> Vec<f32> {
        let n = self.count.max(1) as f64;
        self.sum_abs.iter().map(|s| (s / n) as f32).collect()
    }

    /// Per-channel `‖X_c‖₂ = sqrt(Σ x_c²)` over all rows seen (Wanda's activation norm).
    pub fn col_l2_norms(&self) -> Vec<f32> {
        self.sum_sq.iter().map(|s| s.sqrt() as f32).collect()
    }

    /// The raw Gram matrix `XᵀX` (row-major `k x k`, symmetric), if kept.
    pub fn gram(&self) -> Option<&[f64]> {
        self.gram.as_deref()
    }

    /// Mean of each channel (zeros before any row).
    pub fn mean(&self) -> Vec<f64> {
        let n = self.count.max(1) as f64;
        self.sum.iter().map(|s| s / n).collect()
    }

    /// The covariance `XᵀX / count − μμᵀ` (row-major `k x k`), if the Gram matrix is kept: the
    /// Hessian of a layer whose bias absorbs the mean error `(W − Ŵ)μ`.
    pub fn covariance(&self) -> Option<Vec<f64>> {
        let mu = self.mean();
        let mut h = self.hessian()?;
        for (i, row) in h.chunks_exact_mut(self.k).enumerate() {
            for (x, m) in row.iter_mut().zip(&mu) {
                *x -= mu[i] * m;
            }
        }
        Some(h)
    }

    /// The GPTQ Hessian `H = XᵀX / count` (row-major `k x k`), if the Gram matrix is kept.
    /// (GPTQ's paper uses `2XᵀX`; a constant factor changes nothing in the algorithm.)
    pub fn hessian(&self) -> Option<Vec<f64>> {
        let n = self.count.max(1) as f64;
        self.gram
            .as_ref()
            .map(|g| g.iter().map(|x| x / n).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    #[test]
    fn hand_computed_three_rows() {
        let mut s = ActStats::new(3, true).unwrap();
        // rows: [1, 2, 0], [-1, 0, 3], [2, -2, 1]
        s.update(&[1.0, 2.0, 0.0, -1.0, 0.0, 3.0, 2.0, -2.0, 1.0], 3)
            .unwrap();
        assert_eq!(s.count(), 3);
        assert_eq!(s.sum_sq(), &[6.0, 8.0, 10.0]);
        assert_eq!(s.sum_abs(), &[4.0, 4.0, 4.0]);
        assert_eq!(s.mean_sq(), vec![2.0, 8.0 / 3.0, 10.0 / 3.0]);
        // XᵀX by hand: (0,1): 1*2 + -1*0 + 2*-2 = -2; (0,2): 0 - 3 + 2 = -1; (1,2): 0 + 0 - 2 = -2
        let g = s.gram().unwrap();
        assert_eq!(g, &[6.0, -2.0, -1.0, -2.0, 8.0, -2.0, -1.0, -2.0, 10.0]);
        let h = s.hessian().unwrap();
        assert_eq!(h[0], 2.0);
        // Means [2/3, 0, 4/3]; covariance (0,0): 2 − 4/9, (0,2): −1/3 − 8/9, (1,1): 8/3.
        assert_eq!(s.mean(), vec![2.0 / 3.0, 0.0, 4.0 / 3.0]);
        let c = s.covariance().unwrap();
        for (got, want) in [
            (c[0], 14.0 / 9.0),
            (c[2], -11.0 / 9.0),
            (c[6], -11.0 / 9.0),
            (c[4], 8.0 / 3.0),
        ] {
            assert!((got - want).abs() < 1e-12, "{c:?}");
        }
        assert!((s.col_l2_norms()[1] - 8f32.sqrt()).abs() < 1e-6);
    }

    #[test]
    fn merge_equals_single_pass() {
        let k = 7;
        let mut r = SplitMix64::new(5);
        let a = r.gaussian_vec(300 * k); // > GRAM_CHUNK_ROWS rows: exercises chunking
        let b = r.gaussian_vec(13 * k);
        let mut whole = ActStats::new(k, true).unwrap();
        let mut all = a.clone();
        all.extend_from_slice(&b);
        whole.update(&all, k).unwrap();
        let mut sa = ActStats::new(k, true).unwrap();
        sa.update(&a, k).unwrap();
        let mut sb = ActStats::new(k, true).unwrap();
        sb.update(&b, k).unwrap();
        sa.merge(&sb).unwrap();
        assert_eq!(sa.count(), whole.count());
        for (x, y) in sa.gram().unwrap().iter().zip(whole.gram().unwrap()) {
            assert!((x - y).abs() <= 1e-9 * (1.0 + y.abs()));
        }
        for (x, y) in sa.sum_sq().iter().zip(whole.sum_sq()) {
            assert!((x - y).abs() <= 1e-9 * (1.0 + y.abs()));
        }
        for (x, y) in sa.mean().iter().zip(whole.mean()) {
            assert!((x - y).abs() <= 1e-12 * (1.0 + y.abs()));
        }
        // Gram diagonal is Σx².
        for c in 0..k {
            let d = whole.gram().unwrap()[c * k + c];
            assert!((d - whole.sum_sq()[c]).abs() <= 1e-9 * d);
        }
    }

    #[test]
    fn errors() {
        assert!(matches!(
            ActStats::new(0, false),
            Err(QuantError::EmptyInput { .. })
        ));
        let mut s = ActStats::new(4, false).unwrap();
        assert!(matches!(
            s.update(&[1.0; 8], 3),
            Err(QuantError::Incompatible { .. })
        ));
        assert!(matches!(
            s.update(&[], 4),
            Err(QuantError::EmptyInput { .. })
        ));
        assert!(matches!(
            s.update(&[1.0; 6], 4),
            Err(QuantError::ShapeMismatch { .. })
        ));
        assert!(matches!(
            s.update(&[f32::NAN; 4], 4),
            Err(QuantError::NonFinite { .. })
        ));
        assert_eq!(s.count(), 0);
        let g = ActStats::new(4, true).unwrap();
        assert!(matches!(s.merge(&g), Err(QuantError::Incompatible { .. })));
        assert!(s.hessian().is_none());
    }
}

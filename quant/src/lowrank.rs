//! Low-rank factorisation `W ≈ U·V` (`U`: `n x r`, `V`: `r x k`), from a truncated SVD.
//!
//! The singular values are folded into `U` (`U = U_r Σ_r`), so the runtime computes
//! `y = U (V x)` with `r (n + k)` multiply-adds instead of `n k`.
//!
//! Three variants, all returning a [`LowRank`]:
//!
//! * [`lowrank_svd`]: plain truncated SVD of `W`; optimal in `‖W − Ŵ‖_F` (Eckart–Young).
//! * [`lowrank_asvd`]: ASVD (Yuan et al. 2023). Columns are scaled by `d_c = (mean|x_c|)^α`,
//!   `W·D` is truncated, and the scaling is undone in `V` (`V ← V D⁻¹`). Input channels with
//!   large activations are reproduced more faithfully.
//! * [`lowrank_svdllm`]: SVD-LLM (Wang et al. 2024). With `G = XᵀX` (+ damping) `= L Lᵀ`
//!   (Cholesky), `‖(W − Ŵ)Xᵀ‖_F = ‖(W − Ŵ) L‖_F`, so truncating the SVD of `W·L` and setting
//!   `V ← V_rᵀ L⁻¹` gives the rank-`r` matrix that is optimal on the calibration activations.
//!
//! The rank is [`RankSelection::Fixed`], the smallest keeping an energy fraction of `Σσ²`
//! ([`RankSelection::Energy`]; for the activation-aware variants this is the energy of the
//! transformed matrix `W·D` or `W·L`, i.e. of the activation-weighted output), or the largest
//! fitting a parameter budget ([`RankSelection::ParamBudget`]).
//!
//! Linear algebra is done in f64 with `faer`; the factors are returned as f32.
//!
//! ```
//! use edgetune_quant::lowrank::{lowrank_svd, RankSelection};
//! // diag(3, 2, 1) padded to 3 x 4: rank 2 drops sigma = 1.
//! let w = [3.0, 0.0, 0.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0];
//! let lr = lowrank_svd(&w, 3, 4, RankSelection::Energy(0.9), None).unwrap();
//! assert_eq!(lr.rank, 2); // 13/14 of the energy
//! assert!((lr.rel_frobenius_error - (1.0f64 / 14.0).sqrt()).abs() < 1e-6);
//! ```

use faer::linalg::solvers::Svd;
use faer::{Accum, Mat, MatRef, Par, Side};

use crate::metrics::{rel_activation_error, rel_frobenius_error};
use crate::util::{check_fraction, check_matrix, check_square, check_weights};
use crate::{QuantError, Result};

/// How the rank is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RankSelection {
    /// Exactly this rank (`1..=min(n, k)`).
    Fixed(usize),
    /// The smallest rank whose kept energy `Σ_{i<r} σ_i² / Σ σ_i²` is `>= e` (`0 < e <= 1`).
    Energy(f64),
    /// The largest rank with `r (n + k) <= fraction · n · k` (`fraction > 0`); errors if that is 0.
    ParamBudget(f64),
}

/// A rank-`r` factorisation `Ŵ = U·V`.
#[derive(Debug, Clone, PartialEq)]
pub struct LowRank {
    /// Output rows.
    pub n: usize,
    /// Input columns.
    pub k: usize,
    /// Kept rank `r`.
    pub rank: usize,
    /// `n x r`, row-major, singular values folded in.
    pub u: Vec<f32>,
    /// `r x k`, row-major.
    pub v: Vec<f32>,
    /// All `min(n, k)` singular values (descending) of the matrix that was truncated: `W`,
    /// `W·D` (ASVD) or `W·L` (SVD-LLM).
    pub singular_values: Vec<f64>,
    /// `‖W − U V‖_F / ‖W‖_F` with the returned f32 factors.
    pub rel_frobenius_error: f64,
    /// `‖(W − U V) Xᵀ‖_F / ‖W Xᵀ‖_F` when a Gram matrix was available.
    pub rel_activation_error: Option<f64>,
}

impl LowRank {
    /// The reconstructed `n x k` matrix `U·V`.
    pub fn reconstruct(&self) -> Vec<f32> {
        let u = MatRef::from_row_major_slice(&self.u, self.n, self.rank);
        let v = MatRef::from_row_major_slice(&self.v, self.rank, self.k);
        let mut out = Mat::<f32>::zeros(self.n, self.k);
        faer::linalg::matmul::matmul(out.as_mut(), Accum::Replace, u, v, 1.0, Par::Seq);
        let mut w = Vec::with_capacity(self.n * self.k);
        for i in 0..self.n {
            for j in 0..self.k {
                w.push(out[(i, j)]);
            }
        }
        w
    }

    /// Number of stored parameters, `r (n + k)`.
    pub fn params(&self) -> usize {
        self.rank * (self.n + self.k)
    }
}

/// Rank chosen by `sel` for a matrix of shape `n x k` with singular values `sigma`
/// (descending).
pub fn select_rank(sigma: &[f64], n: usize, k: usize, sel: RankSelection) -> Result<usize> {
    let max = n.min(k);
    match sel {
        RankSelection::Fixed(r) => {
            if r == 0 || r > max {
                Err(QuantError::InvalidRank { rank: r, max })
            } else {
                Ok(r)
            }
        }
        RankSelection::Energy(e) => {
            check_fraction(e, "energy fraction", f64::MIN_POSITIVE, 1.0, "(0, 1]")?;
            let total: f64 = sigma.iter().map(|s| s * s).sum();
            if total <= 0.0 {
                return Ok(1);
            }
            let mut acc = 0.0;
            for (i, s) in sigma.iter().enumerate() {
                acc += s * s;
                // Relative slack so that e = 1 is reachable despite rounding.
                if acc >= e * total * (1.0 - 1e-12) {
                    return Ok((i + 1).min(max));
                }
            }
            Ok(max)
        }
        RankSelection::ParamBudget(f) => {
            check_fraction(
                f,
                "parameter budget fraction",
                f64::MIN_POSITIVE,
                f64::MAX,
                "(0, inf)",
            )?;
            let r = ((f * (n * k) as f64) / (n + k) as f64).floor();
            let r = if r >= max as f64 { max } else { r as usize };
            if r == 0 {
                Err(QuantError::InvalidRank { rank: 0, max })
            } else {
                Ok(r)
            }
        }
    }
}

fn to_mat(w: &[f32], n: usize, k: usize) -> Mat<f64> {
    Mat::from_fn(n, k, |i, j| w[i * k + j] as f64)
}

fn svd_of(a: &Mat<f64>) -> Result<Svd<f64>> {
    a.thin_svd().map_err(|_| QuantError::Linalg {
        what: "SVD did not converge",
    })
}

/// Truncates an SVD: returns `U_r Σ_r` (n x r) and `V_rᵀ` (r x k) in f64, plus all σ.
fn truncate(svd: &Svd<f64>, r: usize) -> (Mat<f64>, Mat<f64>) {
    let (u, s, v) = (svd.U(), svd.S(), svd.V());
    let s = s.column_vector();
    let us = Mat::from_fn(u.nrows(), r, |i, j| u[(i, j)] * s[j]);
    let vt = Mat::from_fn(r, v.nrows(), |i, j| v[(j, i)]);
    (us, vt)
}

fn finish(
    w: &[f32],
    n: usize,
    k: usize,
    us: Mat<f64>,
    vt: Mat<f64>,
    sigma: Vec<f64>,
    gram: Option<&[f64]>,
) -> Result<LowRank> {
    let r = us.ncols();
    let mut u = Vec::with_capacity(n * r);
    for i in 0..n {
        for j in 0..r {
            u.push(us[(i, j)] as f32);
        }
    }
    let mut v = Vec::with_capacity(r * k);
    for i in 0..r {
        for j in 0..k {
            v.push(vt[(i, j)] as f32);
        }
    }
    if u.iter().chain(&v).any(|x| !x.is_finite()) {
        return Err(QuantError::Linalg {
            what: "low-rank factors overflow f32",
        });
    }
    let mut lr = LowRank {
        n,
        k,
        rank: r,
        u,
        v,
        singular_values: sigma,
        rel_frobenius_error: 0.0,
        rel_activation_error: None,
    };
    let w_hat = lr.reconstruct();
    lr.rel_frobenius_error = rel_frobenius_error(w, &w_hat)?;
    if let Some(g) = gram {
        lr.rel_activation_error = Some(rel_activation_error(w, &w_hat, n, k, g)?);
    }
    Ok(lr)
}

/// Plain truncated SVD. `gram` (`XᵀX`, `k x k`), if given, is only used to report
/// [`LowRank::rel_activation_error`].
pub fn lowrank_svd(
    w: &[f32],
    n: usize,
    k: usize,
    sel: RankSelection,
    gram: Option<&[f64]>,
) -> Result<LowRank> {
    check_matrix(w, n, k, "weight matrix")?;
    if let Some(g) = gram {
        check_square(g, k, "Gram matrix")?;
    }
    let svd = svd_of(&to_mat(w, n, k))?;
    let sigma: Vec<f64> = svd.S().column_vector().iter().copied().collect();
    let r = select_rank(&sigma, n, k, sel)?;
    let (us, vt) = truncate(&svd, r);
    finish(w, n, k, us, vt, sigma, gram)
}

/// ASVD: SVD of `W·D` with `D = diag(max(mean|x_c|, ε)^α)`, `V ← V D⁻¹`.
///
/// * `mean_abs`: per-input-channel mean |x| (length `k`, `>= 0`), from
///   [`ActStats::mean_abs`](crate::stats::ActStats::mean_abs). `ε = 1e-6 · max(mean_abs)`
///   keeps dead channels invertible; if every entry is 0 the scaling is the identity.
/// * `alpha` in `[0, 2]` (ASVD uses about 0.5; 0 is plain SVD).
/// * `gram`: optional `XᵀX` to report the activation error.
pub fn lowrank_asvd(
    w: &[f32],
    n: usize,
    k: usize,
    sel: RankSelection,
    mean_abs: &[f32],
    alpha: f64,
    gram: Option<&[f64]>,
) -> Result<LowRank> {
    check_matrix(w, n, k, "weight matrix")?;
    check_weights(mean_abs, k, "mean |x|")?;
    check_fraction(alpha, "ASVD alpha", 0.0, 2.0, "[0, 2]")?;
    if let Some(g) = gram {
        check_square(g, k, "Gram matrix")?;
    }
    let mx = mean_abs.iter().fold(0.0f64, |a, &b| a.max(b as f64));
    let d: Vec<f64> = if mx > 0.0 {
        mean_abs
            .iter()
            .map(|&m| (m as f64).max(1e-6 * mx).powf(alpha))
            .collect()
    } else {
        vec![1.0; k]
    };
    let a = Mat::from_fn(n, k, |i, j| w[i * k + j] as f64 * d[j]);
    let svd = svd_of(&a)?;
    let sigma: Vec<f64> = svd.S().column_vector().iter().copied().collect();
    let r = select_rank(&sigma, n, k, sel)?;
    let (us, mut vt) = truncate(&svd, r);
    for j in 0..k {
        for i in 0..r {
            vt[(i, j)] /= d[j];
        }
    }
    finish(w, n, k, us, vt, sigma, gram)
}

/// SVD-LLM: with `G + λI = L Lᵀ` (Cholesky), SVD of `W·L`, truncate, `V ← V_rᵀ L⁻¹`.
///
/// * `gram`: `XᵀX` (or `XᵀX / count`), row-major `k x k`, symmetric positive semi-definite.
/// * `damp`: relative damping, `λ = damp · mean(diag G)`, `damp >= 0` (0.01 is a good
///   default). If the Cholesky factorisation still fails, `λ` is raised tenfold (at least to
///   `1e-6 · mean diag`) up to 6 times before giving up with [`QuantError::Linalg`].
///
/// The activation error reported is measured with the undamped `gram`.
pub fn lowrank_svdllm(
    w: &[f32],
    n: usize,
    k: usize,
    sel: RankSelection,
    gram: &[f64],
    damp: f64,
) -> Result<LowRank> {
    check_matrix(w, n, k, "weight matrix")?;
    check_square(gram, k, "Gram matrix")?;
    check_fraction(damp, "damping", 0.0, f64::MAX, "[0, inf)")?;
    let l = damped_cholesky_lower(gram, k, damp)?;
    let wm = to_mat(w, n, k);
    let mut a = Mat::<f64>::zeros(n, k);
    faer::linalg::matmul::matmul(
        a.as_mut(),
        Accum::Replace,
        wm.as_ref(),
        l.as_ref(),
        1.0,
        Par::Seq,
    );
    let svd = svd_of(&a)?;
    let sigma: Vec<f64> = svd.S().column_vector().iter().copied().collect();
    let r = select_rank(&sigma, n, k, sel)?;
    let (us, vt) = truncate(&svd, r);
    // V' = V_rᵀ L⁻¹  <=>  Lᵀ V'ᵀ = V_r: an upper-triangular solve with Lᵀ.
    let mut y = vt.transpose().to_owned(); // k x r
    faer::linalg::triangular_solve::solve_upper_triangular_in_place(
        l.transpose(),
        y.as_mut(),
        Par::Seq,
    );
    let vt = y.transpose().to_owned();
    finish(w, n, k, us, vt, sigma, Some(gram))
}

/// Lower Cholesky factor of `G + λI`, `λ = damp · mean(diag G)`, with escalating damping.
pub(crate) fn damped_cholesky_lower(gram: &[f64], k: usize, damp: f64) -> Result<Mat<f64>> {
    let mean_diag = (0..k).map(|i| gram[i * k + i]).sum::<f64>() / k as f64;
    if mean_diag <= 0.0 || !mean_diag.is_finite() {
        return Err(QuantError::Linalg {
            what: "Gram matrix has a zero (or negative) diagonal: no calibration activations?",
        });
    }
    let mut lambda = damp * mean_diag;
    for _ in 0..7 {
        let g = Mat::from_fn(k, k, |i, j| {
            gram[i * k + j] + if i == j { lambda } else { 0.0 }
        });
        if let Ok(llt) = g.llt(Side::Lower) {
            return Ok(llt.L().to_owned());
        }
        lambda = (lambda * 10.0).max(1e-6 * mean_diag);
    }
    Err(QuantError::Linalg {
        what: "Cholesky of the damped Gram matrix failed",
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::activation_error;
    use crate::rng::SplitMix64;
    use crate::stats::ActStats;

    fn diag_case() -> Vec<f32> {
        vec![3.0, 0.0, 0.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    }

    #[test]
    fn rank_selection_hand_cases() {
        let s = [3.0, 2.0, 1.0]; // energies 9, 4, 1 of 14
        assert_eq!(
            select_rank(&s, 3, 4, RankSelection::Energy(0.6)).unwrap(),
            1
        );
        assert_eq!(
            select_rank(&s, 3, 4, RankSelection::Energy(0.9)).unwrap(),
            2
        );
        assert_eq!(
            select_rank(&s, 3, 4, RankSelection::Energy(1.0)).unwrap(),
            3
        );
        // r * 7 <= f * 12
        assert_eq!(
            select_rank(&s, 3, 4, RankSelection::ParamBudget(1.0)).unwrap(),
            1
        );
        assert_eq!(
            select_rank(&s, 3, 4, RankSelection::ParamBudget(1.2)).unwrap(),
            2
        );
        assert_eq!(
            select_rank(&s, 3, 4, RankSelection::ParamBudget(10.0)).unwrap(),
            3
        );
        assert!(matches!(
            select_rank(&s, 3, 4, RankSelection::ParamBudget(0.5)),
            Err(QuantError::InvalidRank { rank: 0, max: 3 })
        ));
        assert!(matches!(
            select_rank(&s, 3, 4, RankSelection::Fixed(4)),
            Err(QuantError::InvalidRank { rank: 4, max: 3 })
        ));
        assert!(matches!(
            select_rank(&s, 3, 4, RankSelection::Energy(0.0)),
            Err(QuantError::OutOfRange { .. })
        ));
    }

    #[test]
    fn diagonal_known_answer() {
        let w = diag_case();
        let lr = lowrank_svd(&w, 3, 4, RankSelection::Fixed(2), None).unwrap();
        assert_eq!(lr.u.len(), 6);
        assert_eq!(lr.v.len(), 8);
        for (a, b) in lr.singular_values.iter().zip([3.0, 2.0, 1.0]) {
            assert!((a - b).abs() < 1e-12);
        }
        let wh = lr.reconstruct();
        let expect = [3.0, 0.0, 0.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        for (a, b) in wh.iter().zip(expect) {
            assert!((a - b).abs() < 1e-6);
        }
        assert_eq!(lr.params(), 14);
    }

    #[test]
    fn eckart_young_on_random_matrix() {
        let mut rng = SplitMix64::new(1);
        let (n, k, r) = (24, 40, 6);
        let w = rng.gaussian_vec(n * k);
        let lr = lowrank_svd(&w, n, k, RankSelection::Fixed(r), None).unwrap();
        let norm2: f64 = w.iter().map(|x| (*x as f64).powi(2)).sum();
        let sig2: f64 = lr.singular_values.iter().map(|s| s * s).sum();
        assert!((norm2 - sig2).abs() < 1e-9 * norm2);
        let tail: f64 = lr.singular_values[r..].iter().map(|s| s * s).sum();
        let expect = (tail / norm2).sqrt();
        assert!((lr.rel_frobenius_error - expect).abs() < 1e-5);
    }

    #[test]
    fn svdllm_beats_svd_and_asvd_on_activations() {
        let (n, k, m, r) = (32, 48, 400, 8);
        let mut rng = SplitMix64::new(2);
        let w = rng.gaussian_vec(n * k);
        let x = crate::util::test_support::correlated_activations(k, m, 3);
        let mut st = ActStats::new(k, true).unwrap();
        st.update(&x, k).unwrap();
        let g = st.gram().unwrap();
        let sel = RankSelection::Fixed(r);
        let plain = lowrank_svd(&w, n, k, sel, Some(g)).unwrap();
        let asvd = lowrank_asvd(&w, n, k, sel, &st.mean_abs(), 0.5, Some(g)).unwrap();
        let llm = lowrank_svdllm(&w, n, k, sel, g, 1e-6).unwrap();
        let (ep, ea, el) = (
            plain.rel_activation_error.unwrap(),
            asvd.rel_activation_error.unwrap(),
            llm.rel_activation_error.unwrap(),
        );
        // SVD-LLM is the optimum of the activation error (up to tiny damping).
        assert!(
            el <= ea + 1e-6 && el <= ep + 1e-6,
            "svdllm {el} asvd {ea} svd {ep}"
        );
        assert!(el < 0.8 * ep, "svdllm {el} svd {ep}");
        // And plain SVD is the optimum in weight space.
        assert!(plain.rel_frobenius_error <= llm.rel_frobenius_error + 1e-6);
        assert!(plain.rel_frobenius_error <= asvd.rel_frobenius_error + 1e-6);
        // The reported error is consistent with the metric.
        let e = activation_error(&w, &llm.reconstruct(), n, k, g).unwrap();
        let base = activation_error(&w, &vec![0.0; n * k], n, k, g).unwrap();
        assert!((e / base - el).abs() < 1e-9);
    }

    #[test]
    fn svdllm_with_identity_gram_is_plain_svd() {
        let (n, k) = (10, 12);
        let mut rng = SplitMix64::new(4);
        let w = rng.gaussian_vec(n * k);
        let mut g = vec![0.0; k * k];
        for i in 0..k {
            g[i * k + i] = 5.0;
        }
        let a = lowrank_svd(&w, n, k, RankSelection::Fixed(3), None)
            .unwrap()
            .reconstruct();
        let b = lowrank_svdllm(&w, n, k, RankSelection::Fixed(3), &g, 0.0)
            .unwrap()
            .reconstruct();
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-5);
        }
    }

    #[test]
    fn asvd_alpha_zero_is_plain_svd_and_full_rank_is_exact() {
        let (n, k) = (6, 9);
        let mut rng = SplitMix64::new(5);
        let w = rng.gaussian_vec(n * k);
        let ma: Vec<f32> = (0..k).map(|c| 0.1 + c as f32).collect();
        let a = lowrank_asvd(&w, n, k, RankSelection::Fixed(2), &ma, 0.0, None).unwrap();
        let p = lowrank_svd(&w, n, k, RankSelection::Fixed(2), None).unwrap();
        assert!((a.rel_frobenius_error - p.rel_frobenius_error).abs() < 1e-6);
        let full = lowrank_asvd(&w, n, k, RankSelection::Fixed(6), &ma, 1.0, None).unwrap();
        assert!(full.rel_frobenius_error < 1e-5);
    }

    #[test]
    fn errors() {
        let w = diag_case();
        assert!(matches!(
            lowrank_svd(&w, 3, 3, RankSelection::Fixed(1), None),
            Err(QuantError::ShapeMismatch { .. })
        ));
        assert!(matches!(
            lowrank_svd(&w, 3, 4, RankSelection::Fixed(0), None),
            Err(QuantError::InvalidRank { .. })
        ));
        assert!(matches!(
            lowrank_asvd(&w, 3, 4, RankSelection::Fixed(1), &[1.0; 4], -1.0, None),
            Err(QuantError::OutOfRange { .. })
        ));
        assert!(matches!(
            lowrank_svdllm(&w, 3, 4, RankSelection::Fixed(1), &[0.0; 16], 0.01),
            Err(QuantError::Linalg { .. })
        ));
        assert!(matches!(
            lowrank_svdllm(&w, 3, 4, RankSelection::Fixed(1), &[0.0; 15], 0.01),
            Err(QuantError::ShapeMismatch { .. })
        ));
        assert!(matches!(
            lowrank_svd(&[], 0, 4, RankSelection::Fixed(1), None),
            Err(QuantError::EmptyInput { .. })
        ));
    }
}

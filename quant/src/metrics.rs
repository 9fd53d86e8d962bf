//! Error measures shared by the encoders and their reports.
//!
//! * [`rel_frobenius_error`]: `‖W − Ŵ‖_F / ‖W‖_F`, the data-free measure.
//! * [`activation_error`] / [`rel_activation_error`]: `‖(W − Ŵ)Xᵀ‖_F` (and divided by
//!   `‖W Xᵀ‖_F`), the error on the layer's outputs over the calibration activations `X`,
//!   computed from the Gram matrix `G = XᵀX` as `sqrt(tr(E G Eᵀ))` with `E = W − Ŵ`, so `X`
//!   itself is never needed. With `G = XᵀX / count` (the GPTQ Hessian) the value is the RMS
//!   over samples instead of the sum; the relative error is the same either way.
//!
//! ```
//! use edgetune_quant::metrics::{activation_error, rel_frobenius_error};
//! let w = [3.0, 4.0];
//! let w_hat = [3.0, 0.0];
//! assert_eq!(rel_frobenius_error(&w, &w_hat).unwrap(), 0.8);
//! // X = [[1, 1], [0, 2]] -> G = XᵀX = [[1, 1], [1, 5]]; E = [0, 4]: EGEᵀ = 16 * 5 = 80.
//! let e = activation_error(&w, &w_hat, 1, 2, &[1.0, 1.0, 1.0, 5.0]).unwrap();
//! assert!((e - 80f64.sqrt()).abs() < 1e-12);
//! ```

use faer::{Accum, Mat, MatRef, Par};

use crate::util::{check_matrix, check_square};
use crate::{QuantError, Result};

/// `‖W − Ŵ‖_F / ‖W‖_F` (0 if both are zero, infinity if only `W` is).
pub fn rel_frobenius_error(w: &[f32], w_hat: &[f32]) -> Result<f64> {
    if w.is_empty() {
        return Err(QuantError::EmptyInput {
            what: "weight matrix",
        });
    }
    if w_hat.len() != w.len() {
        return Err(QuantError::ShapeMismatch {
            what: "reconstructed matrix",
            expected: w.len(),
            got: w_hat.len(),
        });
    }
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&a, &b) in w.iter().zip(w_hat) {
        let d = a as f64 - b as f64;
        num += d * d;
        den += (a as f64) * (a as f64);
    }
    Ok(ratio(num, den))
}

fn ratio(num: f64, den: f64) -> f64 {
    if den > 0.0 {
        (num / den).sqrt()
    } else if num == 0.0 {
        0.0
    } else {
        f64::INFINITY
    }
}

/// `Σ_r a_r G a_rᵀ` for the rows `a_r` of the `n x k` matrix `a` (= `tr(A G Aᵀ)`).
pub(crate) fn quad_form_rows(a: MatRef<'_, f64>, g: MatRef<'_, f64>) -> f64 {
    let mut ag = Mat::<f64>::zeros(a.nrows(), a.ncols());
    faer::linalg::matmul::matmul(ag.as_mut(), Accum::Replace, a, g, 1.0, Par::Seq);
    let mut s = 0.0;
    for j in 0..a.ncols() {
        for i in 0..a.nrows() {
            s += a[(i, j)] * ag[(i, j)];
        }
    }
    s
}

fn check_pair(w: &[f32], w_hat: &[f32], n: usize, k: usize, gram: &[f64]) -> Result<()> {
    check_matrix(w, n, k, "weight matrix")?;
    check_matrix(w_hat, n, k, "reconstructed matrix")?;
    check_square(gram, k, "Gram matrix")
}

/// Returns `(‖(W−Ŵ)Xᵀ‖², ‖WXᵀ‖²)` through the Gram matrix.
fn act_err_parts(w: &[f32], w_hat: &[f32], n: usize, k: usize, gram: &[f64]) -> (f64, f64) {
    let g = MatRef::from_row_major_slice(gram, k, k);
    let e = Mat::<f64>::from_fn(n, k, |i, j| w[i * k + j] as f64 - w_hat[i * k + j] as f64);
    let wm = Mat::<f64>::from_fn(n, k, |i, j| w[i * k + j] as f64);
    (
        quad_form_rows(e.as_ref(), g).max(0.0),
        quad_form_rows(wm.as_ref(), g).max(0.0),
    )
}

/// `‖(W − Ŵ)Xᵀ‖_F` from `gram = XᵀX` (row-major `k x k`).
pub fn activation_error(w: &[f32], w_hat: &[f32], n: usize, k: usize, gram: &[f64]) -> Result<f64> {
    check_pair(w, w_hat, n, k, gram)?;
    Ok(act_err_parts(w, w_hat, n, k, gram).0.sqrt())
}

/// `‖(W − Ŵ)Xᵀ‖_F / ‖W Xᵀ‖_F` from `gram = XᵀX` (any positive multiple works).
pub fn rel_activation_error(
    w: &[f32],
    w_hat: &[f32],
    n: usize,
    k: usize,
    gram: &[f64],
) -> Result<f64> {
    check_pair(w, w_hat, n, k, gram)?;
    let (num, den) = act_err_parts(w, w_hat, n, k, gram);
    Ok(ratio(num, den))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;
    use crate::stats::ActStats;

    #[test]
    fn gram_form_equals_explicit_product() {
        let (n, k, m) = (5, 7, 40);
        let mut r = SplitMix64::new(11);
        let w = r.gaussian_vec(n * k);
        let w_hat: Vec<f32> = w
            .iter()
            .map(|x| x + 0.1 * r.next_gaussian() as f32)
            .collect();
        let x = r.gaussian_vec(m * k);
        let mut s = ActStats::new(k, true).unwrap();
        s.update(&x, k).unwrap();
        // Explicit ‖(W−Ŵ)Xᵀ‖².
        let mut explicit = 0.0f64;
        for i in 0..n {
            for t in 0..m {
                let mut y = 0.0f64;
                for c in 0..k {
                    y += (w[i * k + c] as f64 - w_hat[i * k + c] as f64) * x[t * k + c] as f64;
                }
                explicit += y * y;
            }
        }
        let e = activation_error(&w, &w_hat, n, k, s.gram().unwrap()).unwrap();
        assert!((e * e - explicit).abs() < 1e-9 * explicit);
        let h = s.hessian().unwrap();
        let r1 = rel_activation_error(&w, &w_hat, n, k, s.gram().unwrap()).unwrap();
        let r2 = rel_activation_error(&w, &w_hat, n, k, &h).unwrap();
        assert!((r1 - r2).abs() < 1e-12);
    }

    #[test]
    fn errors_and_edges() {
        assert!(matches!(
            rel_frobenius_error(&[], &[]),
            Err(QuantError::EmptyInput { .. })
        ));
        assert!(matches!(
            rel_frobenius_error(&[1.0], &[]),
            Err(QuantError::ShapeMismatch { .. })
        ));
        assert_eq!(rel_frobenius_error(&[0.0], &[0.0]).unwrap(), 0.0);
        assert!(rel_frobenius_error(&[0.0], &[1.0]).unwrap().is_infinite());
        assert!(matches!(
            activation_error(&[1.0, 2.0], &[1.0, 2.0], 1, 2, &[1.0; 3]),
            Err(QuantError::ShapeMismatch { .. })
        ));
    }
}

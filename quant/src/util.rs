//! Shared parameter checks.

use crate::{QuantError, Result};

/// Checks that `w` is a finite, non-empty `n x k` matrix.
pub(crate) fn check_matrix(w: &[f32], n: usize, k: usize, what: &'static str) -> Result<()> {
    if n == 0 || k == 0 || w.is_empty() {
        return Err(QuantError::EmptyInput { what });
    }
    let expected = n.checked_mul(k).ok_or(QuantError::ShapeMismatch {
        what,
        expected: usize::MAX,
        got: w.len(),
    })?;
    if w.len() != expected {
        return Err(QuantError::ShapeMismatch {
            what,
            expected,
            got: w.len(),
        });
    }
    check_finite(w, what)
}

/// Checks that every value is finite.
pub(crate) fn check_finite(v: &[f32], what: &'static str) -> Result<()> {
    if v.iter().all(|x| x.is_finite()) {
        Ok(())
    } else {
        Err(QuantError::NonFinite { what })
    }
}

/// Checks an optional per-column importance vector: length `k`, finite, `>= 0`.
pub(crate) fn check_importance(imp: Option<&[f32]>, k: usize) -> Result<()> {
    if let Some(imp) = imp {
        check_weights(imp, k, "importance")?;
    }
    Ok(())
}

/// Checks a weight vector: length `len`, finite, `>= 0`.
pub(crate) fn check_weights(v: &[f32], len: usize, what: &'static str) -> Result<()> {
    if v.len() != len {
        return Err(QuantError::ShapeMismatch {
            what,
            expected: len,
            got: v.len(),
        });
    }
    if v.iter().all(|x| x.is_finite() && *x >= 0.0) {
        Ok(())
    } else {
        Err(QuantError::NonFinite { what })
    }
}

/// Checks that `group` is positive and divides `dim`.
pub(crate) fn check_group(group: usize, dim: usize) -> Result<()> {
    if group == 0 || !dim.is_multiple_of(group) {
        Err(QuantError::InvalidGroup { group, dim })
    } else {
        Ok(())
    }
}

/// Checks a fraction in `[lo, hi]` (and that it is not NaN).
pub(crate) fn check_fraction(
    value: f64,
    what: &'static str,
    lo: f64,
    hi: f64,
    allowed: &'static str,
) -> Result<()> {
    if value.is_finite() && value >= lo && value <= hi {
        Ok(())
    } else {
        Err(QuantError::OutOfRange {
            what,
            value,
            allowed,
        })
    }
}

/// Checks a `k x k` symmetric matrix slice (Gram / Hessian): length and finiteness.
pub(crate) fn check_square(g: &[f64], k: usize, what: &'static str) -> Result<()> {
    if g.len() != k * k {
        return Err(QuantError::ShapeMismatch {
            what,
            expected: k * k,
            got: g.len(),
        });
    }
    if g.iter().all(|x| x.is_finite()) {
        Ok(())
    } else {
        Err(QuantError::NonFinite { what })
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use crate::rng::SplitMix64;

    /// `m` activation rows of width `k` with strongly correlated, anisotropic channels:
    /// `x = z A`, `z ~ N(0, I)`, `A` random with column scales decaying as `1 / (1 + c/4)`.
    pub(crate) fn correlated_activations(k: usize, m: usize, seed: u64) -> Vec<f32> {
        let mut rng = SplitMix64::new(seed);
        let a: Vec<f64> = (0..k * k)
            .map(|i| rng.next_gaussian() * (1.0 / (1.0 + (i % k) as f64 / 4.0)))
            .collect();
        let mut x = vec![0f32; m * k];
        let mut z = vec![0f64; k];
        for t in 0..m {
            for v in z.iter_mut() {
                *v = rng.next_gaussian();
            }
            for c in 0..k {
                let mut s = 0.0;
                for (j, zj) in z.iter().enumerate() {
                    s += zj * a[j * k + c];
                }
                x[t * k + c] = s as f32;
            }
        }
        x
    }
}

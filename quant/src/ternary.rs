//! Ternary (`{−1, 0, +1}·s`) and binary (`{−1, +1}·s`) quantization, one scale per group of
//! `group` weights along `k`.
//!
//! # Ternary: two thresholds, keep the better per group
//!
//! A ternary group is defined by its *support* (which weights are non-zero); given the support,
//! the least-squares scale is the (importance-weighted) mean of `|x|` over it:
//! `s = Σ_S w_i |x_i| / Σ_S w_i`. Two published rules pick the support:
//!
//! * **TWN** (Li et al., *Ternary Weight Networks*, 2016): threshold `Δ = 0.7 · mean|x|`,
//!   support `|x| > Δ` (0.7 approximates the optimal threshold for Gaussian/uniform weights).
//! * **BitNet b1.58 absmean** (Ma et al., 2024): `γ = mean|x|`, `q = round(clip(x/γ, −1, 1))`,
//!   i.e. support `|x| ≥ γ/2`. BitNet uses `γ` itself as the scale; here the support is kept and
//!   the scale refitted by least squares, which can only lower the error.
//!
//! [`quantize_ternary`] evaluates both (with the f16-rounded scale) and keeps, per group, the one
//! with the lower importance-weighted squared error; [`TernaryChoice`] forces one rule.
//!
//! # Binary
//!
//! `q = sign(x)` (`+1` for 0) and `s = Σ w_i |x_i| / Σ w_i`, the least-squares scale
//! (XNOR-Net's mean |x| when unweighted).
//!
//! ```
//! use edgetune_quant::ternary::{quantize_ternary, TernaryMethod};
//! let t = quantize_ternary(&[2.0, 0.5, -0.5, 0.5], 1, 4, 4, None).unwrap();
//! assert_eq!(t.codes, vec![1, 0, 0, 0]);       // TWN support: |x| > 0.7 * 0.875
//! assert_eq!(t.scales, vec![2.0]);
//! assert_eq!(t.methods, vec![TernaryMethod::Twn]);
//! ```

use crate::scalar::round_to_f16;
use crate::util::{check_group, check_importance, check_matrix};
use crate::{QuantError, Result};

/// The rule that chose a ternary group's support.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TernaryMethod {
    /// TWN: support `|x| > 0.7 · mean|x|`.
    Twn,
    /// BitNet b1.58 absmean: support `|x| ≥ 0.5 · mean|x|`.
    AbsMean,
}

/// Which rule(s) [`quantize_ternary_with`] may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TernaryChoice {
    /// Always TWN.
    Twn,
    /// Always absmean.
    AbsMean,
    /// Per group, whichever has the lower weighted error (ties go to TWN).
    Best,
}

/// A ternary-encoded matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct Ternary {
    /// Output rows.
    pub n: usize,
    /// Input columns.
    pub k: usize,
    /// Weights per scale, along `k`.
    pub group: usize,
    /// Codes in `{-1, 0, 1}`, row-major `n x k`.
    pub codes: Vec<i8>,
    /// f16-representable scales `>= 0`, row-major `[n][k / group]`.
    pub scales: Vec<f32>,
    /// Rule used for each group (same layout as `scales`).
    pub methods: Vec<TernaryMethod>,
}

impl Ternary {
    /// The reconstructed `n x k` matrix.
    pub fn dequantize(&self) -> Vec<f32> {
        dequant(&self.codes, &self.scales, self.k, self.group)
    }
}

/// A binary-encoded matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct Binary {
    /// Output rows.
    pub n: usize,
    /// Input columns.
    pub k: usize,
    /// Weights per scale, along `k`.
    pub group: usize,
    /// Signs in `{-1, 1}`, row-major `n x k`.
    pub signs: Vec<i8>,
    /// f16-representable scales `>= 0`, row-major `[n][k / group]`.
    pub scales: Vec<f32>,
}

impl Binary {
    /// The reconstructed `n x k` matrix.
    pub fn dequantize(&self) -> Vec<f32> {
        dequant(&self.signs, &self.scales, self.k, self.group)
    }
}

fn dequant(codes: &[i8], scales: &[f32], k: usize, group: usize) -> Vec<f32> {
    let gpr = k / group;
    codes
        .iter()
        .enumerate()
        .map(|(i, &q)| scales[(i / k) * gpr + (i % k) / group] * q as f32)
        .collect()
}

/// Ternary quantization per group along `k`, choosing TWN or absmean per group.
///
/// `group` must divide `k`; `importance` (length `k`, `>= 0`) weights the squared error.
pub fn quantize_ternary(
    w: &[f32],
    n: usize,
    k: usize,
    group: usize,
    importance: Option<&[f32]>,
) -> Result<Ternary> {
    quantize_ternary_with(w, n, k, group, importance, TernaryChoice::Best)
}

/// Ternary quantization per group along `k` with an explicit rule choice.
pub fn quantize_ternary_with(
    w: &[f32],
    n: usize,
    k: usize,
    group: usize,
    importance: Option<&[f32]>,
    choice: TernaryChoice,
) -> Result<Ternary> {
    check_matrix(w, n, k, "weight matrix")?;
    check_group(group, k)?;
    check_importance(importance, k)?;
    let mut codes = vec![0i8; n * k];
    let mut scales = Vec::with_capacity(n * k / group);
    let mut methods = Vec::with_capacity(n * k / group);
    for r in 0..n {
        for g0 in (0..k).step_by(group) {
            let x = &w[r * k + g0..r * k + g0 + group];
            let imp = importance.map(|i| &i[g0..g0 + group]);
            let out = &mut codes[r * k + g0..r * k + g0 + group];
            let (s, m) = ternarize_group(x, imp, choice, out)?;
            scales.push(s);
            methods.push(m);
        }
    }
    Ok(Ternary {
        n,
        k,
        group,
        codes,
        scales,
        methods,
    })
}

/// Ternarizes one group: writes codes in `{-1, 0, 1}` and returns the f16-representable scale
/// and the rule used. `weights` (same length, `>= 0`) weight the error; all-zero weights count
/// as uniform. Building block of [`quantize_ternary_with`] and the GPTQ ternary quantizer.
pub fn ternarize_group(
    x: &[f32],
    weights: Option<&[f32]>,
    choice: TernaryChoice,
    codes: &mut [i8],
) -> Result<(f32, TernaryMethod)> {
    check_group_io(x, weights, codes.len())?;
    let wt = weight_fn(weights);
    let mean_abs = x.iter().map(|v| v.abs() as f64).sum::<f64>() / x.len() as f64;
    let candidates: &[TernaryMethod] = match choice {
        TernaryChoice::Twn => &[TernaryMethod::Twn],
        TernaryChoice::AbsMean => &[TernaryMethod::AbsMean],
        TernaryChoice::Best => &[TernaryMethod::Twn, TernaryMethod::AbsMean],
    };
    let mut best: Option<(f64, f32, TernaryMethod)> = None;
    let mut q = vec![0i8; x.len()];
    for &m in candidates {
        for (qi, &v) in q.iter_mut().zip(x) {
            let a = v.abs() as f64;
            let inside = match m {
                TernaryMethod::Twn => a > 0.7 * mean_abs,
                // round(clip(x/γ, -1, 1)) != 0  <=>  |x|/γ >= 0.5 (ties away from zero)
                TernaryMethod::AbsMean => mean_abs > 0.0 && a / mean_abs >= 0.5,
            };
            *qi = if inside {
                if v < 0.0 {
                    -1
                } else {
                    1
                }
            } else {
                0
            };
        }
        let s = ls_scale(x, &q, &wt)?;
        let e = sq_error(x, &q, s, &wt);
        if best.as_ref().is_none_or(|(be, _, _)| e < *be) {
            best = Some((e, s, m));
            codes.copy_from_slice(&q);
        }
    }
    let (_, s, m) = best.ok_or(QuantError::EmptyInput {
        what: "ternary candidates",
    })?;
    Ok((s, m))
}

/// Binary quantization per group along `k`: signs and the least-squares scale
/// (importance-weighted mean |x|), f16-rounded.
///
/// ```
/// use edgetune_quant::ternary::quantize_binary;
/// let b = quantize_binary(&[1.0, -3.0, 0.0, 2.0], 1, 4, 4, None).unwrap();
/// assert_eq!(b.signs, vec![1, -1, 1, 1]);
/// assert_eq!(b.scales, vec![1.5]);
/// ```
pub fn quantize_binary(
    w: &[f32],
    n: usize,
    k: usize,
    group: usize,
    importance: Option<&[f32]>,
) -> Result<Binary> {
    check_matrix(w, n, k, "weight matrix")?;
    check_group(group, k)?;
    check_importance(importance, k)?;
    let mut signs = vec![0i8; n * k];
    let mut scales = Vec::with_capacity(n * k / group);
    for r in 0..n {
        for g0 in (0..k).step_by(group) {
            let x = &w[r * k + g0..r * k + g0 + group];
            let imp = importance.map(|i| &i[g0..g0 + group]);
            let out = &mut signs[r * k + g0..r * k + g0 + group];
            scales.push(binarize_group(x, imp, out)?);
        }
    }
    Ok(Binary {
        n,
        k,
        group,
        signs,
        scales,
    })
}

/// Binarizes one group: writes signs (`+1` for zero) and returns the f16-representable
/// least-squares scale.
pub fn binarize_group(x: &[f32], weights: Option<&[f32]>, signs: &mut [i8]) -> Result<f32> {
    check_group_io(x, weights, signs.len())?;
    for (q, &v) in signs.iter_mut().zip(x) {
        *q = if v < 0.0 { -1 } else { 1 };
    }
    ls_scale(x, signs, &weight_fn(weights))
}

fn check_group_io(x: &[f32], weights: Option<&[f32]>, out_len: usize) -> Result<()> {
    if x.is_empty() {
        return Err(QuantError::EmptyInput { what: "group" });
    }
    if out_len != x.len() {
        return Err(QuantError::ShapeMismatch {
            what: "codes",
            expected: x.len(),
            got: out_len,
        });
    }
    if let Some(w) = weights {
        crate::util::check_weights(w, x.len(), "group weights")?;
    }
    crate::util::check_finite(x, "group values")
}

fn weight_fn(weights: Option<&[f32]>) -> impl Fn(usize) -> f64 + '_ {
    let uniform = weights.is_none_or(|w| w.iter().all(|&v| v == 0.0));
    move |i| match weights {
        Some(w) if !uniform => w[i] as f64,
        _ => 1.0,
    }
}

/// Weighted least-squares scale for codes in {-1,0,1}: Σ_S w|x| / Σ_S w, f16-rounded. Falls
/// back to the unweighted mean when the support has zero total weight.
fn ls_scale(x: &[f32], q: &[i8], wt: &impl Fn(usize) -> f64) -> Result<f32> {
    let (mut num, mut den, mut num_u, mut cnt) = (0.0f64, 0.0f64, 0.0f64, 0usize);
    for (i, (&v, &qi)) in x.iter().zip(q).enumerate() {
        if qi != 0 {
            num += wt(i) * v.abs() as f64;
            den += wt(i);
            num_u += v.abs() as f64;
            cnt += 1;
        }
    }
    let s = if den > 0.0 {
        num / den
    } else if cnt > 0 {
        num_u / cnt as f64
    } else {
        0.0
    };
    let s16 = round_to_f16(s as f32);
    if s16.is_finite() {
        Ok(s16)
    } else {
        Err(QuantError::ScaleOverflow { scale: s })
    }
}

fn sq_error(x: &[f32], q: &[i8], s: f32, wt: &impl Fn(usize) -> f64) -> f64 {
    x.iter()
        .zip(q)
        .enumerate()
        .map(|(i, (&v, &qi))| {
            let d = v as f64 - s as f64 * qi as f64;
            wt(i) * d * d
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kmeans::weighted_error;
    use crate::rng::SplitMix64;

    #[test]
    fn absmean_wins_hand_case() {
        // x = [1, 1, 2, 2]: mean|x| = 1.5.
        // TWN: Δ = 1.05 -> support {2, 2}, s = 2, error = 1 + 1 = 2.
        // absmean: |x| >= 0.75 -> all, s = 1.5, error = 4 * 0.25 = 1.  -> absmean.
        let t = quantize_ternary(&[1.0, 1.0, 2.0, -2.0], 1, 4, 4, None).unwrap();
        assert_eq!(t.methods, vec![TernaryMethod::AbsMean]);
        assert_eq!(t.codes, vec![1, 1, 1, -1]);
        assert_eq!(t.scales, vec![1.5]);
        let twn = quantize_ternary_with(&[1.0, 1.0, 2.0, -2.0], 1, 4, 4, None, TernaryChoice::Twn)
            .unwrap();
        assert_eq!(twn.codes, vec![0, 0, 1, -1]);
        assert_eq!(twn.scales, vec![2.0]);
    }

    #[test]
    fn importance_changes_the_scale() {
        // Support {3, 1} under both rules (mean|x| = 1, Δ = 0.7); weights 1 and 3:
        // s = (1*3 + 3*1) / 4 = 1.5 instead of the unweighted 2.
        let mut q = [0i8; 3];
        let (s, _) = ternarize_group(
            &[3.0, 1.0, 0.0],
            Some(&[1.0, 3.0, 5.0]),
            TernaryChoice::Best,
            &mut q,
        )
        .unwrap();
        assert_eq!(q, [1, 1, 0]);
        assert_eq!(s, 1.5);
    }

    #[test]
    fn best_is_min_of_both_on_random_data() {
        let mut rng = SplitMix64::new(5);
        let (n, k, g) = (16, 256, 64);
        let w = rng.gaussian_vec(n * k);
        let imp: Vec<f32> = (0..k).map(|_| rng.next_f64() as f32 * 2.0).collect();
        let best = quantize_ternary(&w, n, k, g, Some(&imp)).unwrap();
        let twn = quantize_ternary_with(&w, n, k, g, Some(&imp), TernaryChoice::Twn).unwrap();
        let abm = quantize_ternary_with(&w, n, k, g, Some(&imp), TernaryChoice::AbsMean).unwrap();
        let (db, dt, da) = (best.dequantize(), twn.dequantize(), abm.dequantize());
        for gi in 0..n * k / g {
            let (r, c0) = (gi / (k / g), (gi % (k / g)) * g);
            let sl = r * k + c0..r * k + c0 + g;
            let im = Some(&imp[c0..c0 + g]);
            let eb = weighted_error(&w[sl.clone()], &db[sl.clone()], g, im);
            let et = weighted_error(&w[sl.clone()], &dt[sl.clone()], g, im);
            let ea = weighted_error(&w[sl.clone()], &da[sl.clone()], g, im);
            assert!(eb <= et.min(ea) + 1e-12);
        }
        // Ternary with the LS scale on N(0,1): optimal relative MSE is about 0.19-0.27 (the
        // 1.58-bit Lloyd-Max ternary quantizer of a Gaussian reaches 0.19); check a sane range.
        let rel =
            weighted_error(&w, &db, k, None) / w.iter().map(|x| (*x as f64).powi(2)).sum::<f64>();
        assert!(rel > 0.15 && rel < 0.30, "rel {rel}");
    }

    #[test]
    fn binary_gaussian_error_matches_theory() {
        // For N(0,1) with scale E|x| = sqrt(2/pi): MSE = 1 - 2/pi ≈ 0.3634.
        let mut rng = SplitMix64::new(6);
        let (n, k) = (32, 512);
        let w = rng.gaussian_vec(n * k);
        let b = quantize_binary(&w, n, k, 128, None).unwrap();
        assert!(b.signs.iter().all(|&s| s == 1 || s == -1));
        let mse = weighted_error(&w, &b.dequantize(), k, None) / (n * k) as f64;
        assert!(
            (mse - (1.0 - 2.0 / std::f64::consts::PI)).abs() < 0.02,
            "mse {mse}"
        );
    }

    #[test]
    fn zero_group() {
        let t = quantize_ternary(&[0.0; 8], 1, 8, 4, None).unwrap();
        assert_eq!(t.scales, vec![0.0, 0.0]);
        assert!(t.codes.iter().all(|&c| c == 0));
        let b = quantize_binary(&[0.0; 4], 1, 4, 4, None).unwrap();
        assert_eq!(b.dequantize(), vec![0.0; 4]);
    }

    #[test]
    fn errors() {
        let w = [1.0f32; 12];
        assert!(matches!(
            quantize_ternary(&w, 1, 12, 5, None),
            Err(QuantError::InvalidGroup { .. })
        ));
        assert!(matches!(
            quantize_binary(&w, 1, 12, 0, None),
            Err(QuantError::InvalidGroup { .. })
        ));
        assert!(matches!(
            quantize_binary(&w, 2, 12, 4, None),
            Err(QuantError::ShapeMismatch { .. })
        ));
        assert!(matches!(
            quantize_ternary(&w, 1, 12, 4, Some(&[-1.0; 12])),
            Err(QuantError::NonFinite { .. })
        ));
        let mut q = [0i8; 2];
        assert!(matches!(
            ternarize_group(&[1.0; 3], None, TernaryChoice::Best, &mut q),
            Err(QuantError::ShapeMismatch { .. })
        ));
    }
}

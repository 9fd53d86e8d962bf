//! Scalar (uniform) quantization: int8 per output row and int2..int8 per group along `k`
//! (int4 groups of 32/64/128 being the main case).
//!
//! Scales are returned rounded to f16 ([`round_to_f16`]) because that is how the format stores
//! them, and the group scale search evaluates every candidate *after* f16 rounding, so the error
//! it minimises is the error the runtime will see.
//!
//! # Group scale search (llama.cpp `make_qx_quants` style)
//!
//! For a group `x` with per-element weights `w` (the importance of each input column, or all 1)
//! and signed levels `q ∈ [−2^(b−1), 2^(b−1)−1]` (−8..=7 for 4 bits), value = `s·q`:
//!
//! 1. Baseline: round-to-nearest with `s = max|x| / 7` (f16-rounded).
//! 2. Candidates: the element of largest magnitude `x_m` is mapped to level `±(L)` for `L` on a
//!    grid around the top level, on both sides (mapping `x_m` to −8 uses the extra negative
//!    level; the scale is then negative when `x_m > 0`, which is fine: value = `s·q`).
//! 3. Each candidate's codes get the weighted least-squares scale `s* = Σ w x q / Σ w q²`,
//!    rounded to f16, and the error `Σ w (x − s q)²` of that exact (scale, codes) pair is
//!    evaluated (in closed form: one sweep over the group per candidate).
//! 4. The best candidate is polished: codes re-rounded to the nearest level for its f16 scale,
//!    one more least-squares refit and re-rounding, each step kept only if it lowers the error.
//!
//! The result replaces the baseline only if its error is lower, so it is never worse than
//! round-to-nearest. This is what llama.cpp does with an imatrix (importance =
//! mean x² of the column).
//!
//! ```
//! use edgetune_quant::scalar::quantize_int4_groups;
//! // A group that fits the grid exactly, including the extra negative level.
//! let w = [-8.0, -3.0, 0.0, 7.0];
//! let q = quantize_int4_groups(&w, 1, 4, 4, None).unwrap();
//! assert_eq!(q.codes, vec![-8, -3, 0, 7]);
//! assert_eq!(q.scales, vec![1.0]);
//! assert_eq!(q.dequantize(), w.to_vec());
//! ```

use half::f16;

use crate::util::{check_group, check_importance, check_matrix};
use crate::{QuantError, Result};

/// Rounds an f32 to the nearest IEEE half-precision value (ties to even) and back.
///
/// Values beyond ±65504 become ±infinity, tiny values become f16 subnormals or zero.
///
/// ```
/// use edgetune_quant::scalar::round_to_f16;
/// assert_eq!(round_to_f16(1.0), 1.0);
/// assert_eq!(round_to_f16(0.1), 0.0999755859375);
/// ```
pub fn round_to_f16(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// Symmetric int8 quantization, one scale per output row.
#[derive(Debug, Clone, PartialEq)]
pub struct Int8Rows {
    /// Output rows.
    pub n: usize,
    /// Input columns.
    pub k: usize,
    /// Codes in `-127..=127`, row-major `n x k`.
    pub codes: Vec<i8>,
    /// One f16-representable scale per row; value = `scales[r] * codes[r*k + c]`.
    pub scales: Vec<f32>,
}

impl Int8Rows {
    /// The reconstructed `n x k` matrix.
    pub fn dequantize(&self) -> Vec<f32> {
        self.codes
            .iter()
            .enumerate()
            .map(|(i, &q)| self.scales[i / self.k] * q as f32)
            .collect()
    }
}

/// Symmetric int8 per output row: `scale = f16(max|w_r| / 127)`, round-to-nearest (ties away
/// from zero), codes clamped to `-127..=127`. An all-zero row gets scale 0.
///
/// ```
/// use edgetune_quant::scalar::quantize_int8_rows;
/// let q = quantize_int8_rows(&[254.0, -127.0, 63.0], 1, 3).unwrap();
/// assert_eq!(q.scales, vec![2.0]);
/// assert_eq!(q.codes, vec![127, -64, 32]); // -63.5 -> -64, 31.5 -> 32
/// ```
pub fn quantize_int8_rows(w: &[f32], n: usize, k: usize) -> Result<Int8Rows> {
    check_matrix(w, n, k, "weight matrix")?;
    let mut codes = Vec::with_capacity(n * k);
    let mut scales = Vec::with_capacity(n);
    for row in w.chunks_exact(k) {
        let amax = row.iter().fold(0.0f32, |a, x| a.max(x.abs()));
        let s = round_to_f16(amax / 127.0);
        if !s.is_finite() {
            return Err(QuantError::ScaleOverflow {
                scale: amax as f64 / 127.0,
            });
        }
        scales.push(s);
        for &x in row {
            codes.push(if s > 0.0 {
                (x / s).round().clamp(-127.0, 127.0) as i8
            } else {
                0
            });
        }
    }
    Ok(Int8Rows {
        n,
        k,
        codes,
        scales,
    })
}

/// Signed `bits`-bit codes with one scale per group of `group` consecutive weights along `k`.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupQuant {
    /// Bits per code (`2..=8`).
    pub bits: u32,
    /// Output rows.
    pub n: usize,
    /// Input columns.
    pub k: usize,
    /// Weights per scale, along `k`.
    pub group: usize,
    /// Codes in `−2^(bits−1) ..= 2^(bits−1) − 1`, row-major `n x k`.
    pub codes: Vec<i8>,
    /// f16-representable scales (possibly negative), row-major `[n][k / group]`;
    /// value = `scales[r * (k/group) + c / group] * codes[r*k + c]`.
    pub scales: Vec<f32>,
}

impl GroupQuant {
    /// Groups per row.
    pub fn groups_per_row(&self) -> usize {
        self.k / self.group
    }

    /// The reconstructed `n x k` matrix.
    pub fn dequantize(&self) -> Vec<f32> {
        let gpr = self.groups_per_row();
        self.codes
            .iter()
            .enumerate()
            .map(|(i, &q)| {
                let (r, c) = (i / self.k, i % self.k);
                self.scales[r * gpr + c / self.group] * q as f32
            })
            .collect()
    }
}

/// How [`quantize_groups`] picks each group's scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleSearch {
    /// Round-to-nearest with `s = f16(max|x| / qmax)`: the baseline.
    AbsMax,
    /// The importance-weighted grid search described in the module docs.
    Grid,
}

/// Int4 groups along `k` with the grid scale search (see module docs).
///
/// `group` must divide `k` (the format uses 32, 64 or 128); `importance` (length `k`, `>= 0`)
/// weights the squared error of each column.
pub fn quantize_int4_groups(
    w: &[f32],
    n: usize,
    k: usize,
    group: usize,
    importance: Option<&[f32]>,
) -> Result<GroupQuant> {
    quantize_groups(w, n, k, 4, group, importance, ScaleSearch::Grid)
}

/// Signed `bits`-bit (`2..=8`) group quantization along `k`, one f16 scale per group.
pub fn quantize_groups(
    w: &[f32],
    n: usize,
    k: usize,
    bits: u32,
    group: usize,
    importance: Option<&[f32]>,
    search: ScaleSearch,
) -> Result<GroupQuant> {
    check_matrix(w, n, k, "weight matrix")?;
    if !(2..=8).contains(&bits) {
        return Err(QuantError::BitsOutOfRange {
            bits,
            min: 2,
            max: 8,
        });
    }
    check_group(group, k)?;
    check_importance(importance, k)?;
    let mut codes = vec![0i8; n * k];
    let mut scales = Vec::with_capacity(n * (k / group));
    for r in 0..n {
        for g0 in (0..k).step_by(group) {
            let x = &w[r * k + g0..r * k + g0 + group];
            let imp = importance.map(|imp| &imp[g0..g0 + group]);
            let out = &mut codes[r * k + g0..r * k + g0 + group];
            scales.push(quantize_group(x, imp, bits, search, out)?);
        }
    }
    Ok(GroupQuant {
        bits,
        n,
        k,
        group,
        codes,
        scales,
    })
}

/// Quantizes one group `x` to signed `bits`-bit codes (written to `codes`, same length) and
/// returns its f16-representable scale. `weights` (same length, `>= 0`) weight the squared
/// error; all-zero weights count as uniform. Building block of [`quantize_groups`] and of the
/// GPTQ group quantizer.
///
/// Errors: `bits` outside `2..=8`, length mismatch, non-finite input, or a scale beyond f16.
pub fn quantize_group(
    x: &[f32],
    weights: Option<&[f32]>,
    bits: u32,
    search: ScaleSearch,
    codes: &mut [i8],
) -> Result<f32> {
    if x.is_empty() {
        return Err(QuantError::EmptyInput { what: "group" });
    }
    if !(2..=8).contains(&bits) {
        return Err(QuantError::BitsOutOfRange {
            bits,
            min: 2,
            max: 8,
        });
    }
    if codes.len() != x.len() {
        return Err(QuantError::ShapeMismatch {
            what: "codes",
            expected: x.len(),
            got: codes.len(),
        });
    }
    if let Some(w) = weights {
        crate::util::check_weights(w, x.len(), "group weights")?;
    }
    crate::util::check_finite(x, "group values")?;
    let qneg = -(1i32 << (bits - 1)) as f32;
    let qpos = ((1i32 << (bits - 1)) - 1) as f32;
    let uniform = weights.is_none_or(|w| w.iter().all(|&v| v == 0.0));
    let wt = |i: usize| -> f64 {
        match weights {
            Some(w) if !uniform => w[i] as f64,
            _ => 1.0,
        }
    };

    // Element of largest magnitude, with its sign.
    let xm = x
        .iter()
        .fold(0.0f32, |a, &v| if v.abs() > a.abs() { v } else { a });
    if xm == 0.0 {
        codes.fill(0);
        return Ok(0.0);
    }
    let rtn = round_to_f16(xm.abs() / qpos);
    if !rtn.is_finite() {
        return Err(QuantError::ScaleOverflow {
            scale: xm.abs() as f64 / qpos as f64,
        });
    }

    let quant = |s: f32, q: &mut [i8]| {
        for (qi, &v) in q.iter_mut().zip(x) {
            *qi = if s != 0.0 {
                (v / s).round().clamp(qneg, qpos) as i8
            } else {
                0
            };
        }
    };
    let error = |s: f32, q: &[i8]| -> f64 {
        q.iter()
            .zip(x)
            .enumerate()
            .map(|(i, (&qi, &v))| {
                let d = v as f64 - s as f64 * qi as f64;
                wt(i) * d * d
            })
            .sum()
    };

    let mut best_s = rtn;
    quant(rtn, codes);
    let best_err = error(rtn, codes);
    if search == ScaleSearch::AbsMax || best_err == 0.0 {
        return Ok(best_s);
    }

    // One sweep per candidate: codes from the candidate scale, then the weighted
    // least-squares scale for those codes, rounded to f16; the error of that (scale, codes)
    // pair is Σw x² − 2 s Σw x q + s² Σw q², in closed form.
    let sxx: f64 = x
        .iter()
        .enumerate()
        .map(|(i, &v)| wt(i) * (v as f64) * (v as f64))
        .sum();
    let mut cand: Option<(f32, f32, f64)> = None; // (1 / s0, f16 scale, error)
    for side in [qneg, qpos] {
        // x_m is mapped to level -(|qneg| + 0.1 j) or +(qpos + 0.1 j), j in -9..=9.
        for j in -9..=9 {
            let level = side + side.signum() * 0.1 * j as f32;
            let inv = level / xm;
            let (mut sxq, mut sqq) = (0.0f64, 0.0f64);
            for (i, &v) in x.iter().enumerate() {
                let q = (v * inv).round().clamp(qneg, qpos) as f64;
                let w = wt(i);
                sxq += w * v as f64 * q;
                sqq += w * q * q;
            }
            if sqq == 0.0 {
                continue;
            }
            let s = round_to_f16((sxq / sqq) as f32);
            if !s.is_finite() || s == 0.0 {
                continue;
            }
            let s64 = s as f64;
            let e = sxx - 2.0 * s64 * sxq + s64 * s64 * sqq;
            if cand.is_none_or(|(_, _, be)| e < be) {
                cand = Some((inv, s, e));
            }
        }
    }
    if let Some((inv, s, e)) = cand {
        if e < best_err {
            // Materialise the winner, then polish: nearest codes for its scale (never worse
            // for a fixed scale), one more least-squares refit, nearest codes again.
            let mut q: Vec<i8> = x
                .iter()
                .map(|&v| (v * inv).round().clamp(qneg, qpos) as i8)
                .collect();
            let mut cur_s = s;
            let mut cur_e = error(s, &q);
            let mut q2 = vec![0i8; x.len()];
            quant(s, &mut q2);
            let e2 = error(s, &q2);
            if e2 <= cur_e {
                cur_e = e2;
                q.copy_from_slice(&q2);
            }
            let (mut sxq, mut sqq) = (0.0f64, 0.0f64);
            for (i, (&qi, &v)) in q.iter().zip(x).enumerate() {
                sxq += wt(i) * v as f64 * qi as f64;
                sqq += wt(i) * (qi as f64) * (qi as f64);
            }
            if sqq > 0.0 {
                let s2 = round_to_f16((sxq / sqq) as f32);
                if s2.is_finite() && s2 != 0.0 {
                    quant(s2, &mut q2);
                    let e3 = error(s2, &q2);
                    if e3 < cur_e {
                        cur_e = e3;
                        cur_s = s2;
                        q.copy_from_slice(&q2);
                    }
                }
            }
            if cur_e < best_err {
                best_s = cur_s;
                codes.copy_from_slice(&q);
            }
        }
    }
    Ok(best_s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kmeans::weighted_error;
    use crate::rng::SplitMix64;

    #[test]
    fn f16_known_values() {
        assert_eq!(round_to_f16(1.0 / 3.0), 1365.0 / 4096.0); // 0x3555
        assert_eq!(round_to_f16(65504.0), 65504.0);
        assert!(round_to_f16(70000.0).is_infinite());
        assert_eq!(round_to_f16(1e-9), 0.0);
    }

    #[test]
    fn int8_error_bound_and_zero_row() {
        let mut rng = SplitMix64::new(1);
        let (n, k) = (8, 100);
        let mut w = rng.gaussian_vec(n * k);
        w[k..2 * k].fill(0.0); // row 1 all zero
        let q = quantize_int8_rows(&w, n, k).unwrap();
        assert_eq!(q.scales[1], 0.0);
        let d = q.dequantize();
        for r in 0..n {
            let s = q.scales[r];
            let amax = w[r * k..(r + 1) * k]
                .iter()
                .fold(0.0f32, |a, x| a.max(x.abs()));
            for c in 0..k {
                // Half a step, plus the clip caused by f16 rounding of the scale
                // (|amax - 127 s| <= 127 * |s - amax/127| <= 127 * 2^-11 * amax/127).
                let bound = s / 2.0 + amax * 2f32.powi(-11) + 1e-7;
                assert!((w[r * k + c] - d[r * k + c]).abs() <= bound);
            }
        }
    }

    #[test]
    fn negative_scale_uses_extra_level() {
        // Largest magnitude is +8: only reachable with s = -1 (q = -8).
        let mut codes = [0i8; 3];
        let s = quantize_group(&[8.0, 4.0, -7.0], None, 4, ScaleSearch::Grid, &mut codes).unwrap();
        assert_eq!(s, -1.0);
        assert_eq!(codes, [-8, -4, 7]);
        // Round-to-nearest instead: s = f16(8/7) and the group is not exact.
        let s =
            quantize_group(&[8.0, 4.0, -7.0], None, 4, ScaleSearch::AbsMax, &mut codes).unwrap();
        // f16(8/7) = 1170 * 2^-10 = 1.142578125; 8/s = 7.002, 4/s = 3.5009, -7/s = -6.13.
        assert_eq!(s, 1170.0 / 1024.0);
        assert_eq!(codes, [7, 4, -6]);
    }

    #[test]
    fn grid_never_worse_than_rtn_and_f16_scales() {
        let mut rng = SplitMix64::new(2);
        let (n, k) = (16, 256);
        let w = rng.gaussian_vec(n * k);
        let imp: Vec<f32> = (0..k)
            .map(|_| (rng.next_gaussian() as f32).powi(2))
            .collect();
        for group in [32, 64, 128] {
            for imp in [None, Some(&imp[..])] {
                let g = quantize_groups(&w, n, k, 4, group, imp, ScaleSearch::Grid).unwrap();
                let a = quantize_groups(&w, n, k, 4, group, imp, ScaleSearch::AbsMax).unwrap();
                assert!(g.codes.iter().all(|&q| (-8..=7).contains(&q)));
                assert!(g.scales.iter().all(|&s| s == round_to_f16(s)));
                let dg = g.dequantize();
                let da = a.dequantize();
                // Per group, never worse.
                for r in 0..n {
                    for g0 in (0..k).step_by(group) {
                        let rng_ = r * k + g0..r * k + g0 + group;
                        let ig = imp.map(|i| &i[g0..g0 + group]);
                        let eg = weighted_error(&w[rng_.clone()], &dg[rng_.clone()], group, ig);
                        let ea = weighted_error(&w[rng_.clone()], &da[rng_.clone()], group, ig);
                        assert!(eg <= ea, "group {group} row {r} col {g0}: {eg} > {ea}");
                    }
                }
                let eg = weighted_error(&w, &dg, k, imp);
                let ea = weighted_error(&w, &da, k, imp);
                // On Gaussian data the search gains clearly (llama.cpp sees ~10-20% MSE).
                assert!(eg < 0.95 * ea, "group {group}: {eg} vs {ea}");
            }
        }
    }

    #[test]
    fn int4_mse_close_to_theory() {
        // Uniform-step quantization error: each non-clipped weight has error <= |s|/2, so the
        // MSE is below mean(s^2)/4; for Gaussian data it is near mean(s^2)/12.
        let mut rng = SplitMix64::new(3);
        let (n, k) = (8, 512);
        let w = rng.gaussian_vec(n * k);
        let q = quantize_int4_groups(&w, n, k, 64, None).unwrap();
        let d = q.dequantize();
        let mse = weighted_error(&w, &d, k, None) / (n * k) as f64;
        let ms2 = q.scales.iter().map(|&s| (s as f64).powi(2)).sum::<f64>() / q.scales.len() as f64;
        assert!(mse < ms2 / 4.0, "{mse} vs {ms2}");
        assert!(mse > ms2 / 24.0, "{mse} vs {ms2}");
    }

    #[test]
    fn importance_lowers_weighted_error() {
        // Importance concentrated on a few columns: the weighted error of the imatrix search
        // must be lower than that of the unweighted search, summed over many groups.
        let mut rng = SplitMix64::new(4);
        let (n, k) = (32, 128);
        let w = rng.gaussian_vec(n * k);
        let imp: Vec<f32> = (0..k)
            .map(|c| if c % 8 == 0 { 50.0 } else { 0.1 })
            .collect();
        let a = quantize_int4_groups(&w, n, k, 32, None).unwrap();
        let b = quantize_int4_groups(&w, n, k, 32, Some(&imp)).unwrap();
        let ea = weighted_error(&w, &a.dequantize(), k, Some(&imp));
        let eb = weighted_error(&w, &b.dequantize(), k, Some(&imp));
        assert!(eb < 0.9 * ea, "{eb} vs {ea}");
    }

    #[test]
    fn errors() {
        let w = [1.0f32; 64];
        assert!(matches!(
            quantize_groups(&w, 1, 64, 9, 32, None, ScaleSearch::Grid),
            Err(QuantError::BitsOutOfRange { bits: 9, .. })
        ));
        assert!(matches!(
            quantize_int4_groups(&w, 1, 64, 48, None),
            Err(QuantError::InvalidGroup { group: 48, dim: 64 })
        ));
        assert!(matches!(
            quantize_int4_groups(&w, 1, 64, 0, None),
            Err(QuantError::InvalidGroup { group: 0, .. })
        ));
        assert!(matches!(
            quantize_int4_groups(&w, 2, 64, 32, None),
            Err(QuantError::ShapeMismatch { .. })
        ));
        assert!(matches!(
            quantize_int8_rows(&[], 0, 0),
            Err(QuantError::EmptyInput { .. })
        ));
        assert!(matches!(
            quantize_int8_rows(&[1e7, 0.0], 1, 2),
            Err(QuantError::ScaleOverflow { .. })
        ));
        assert!(matches!(
            quantize_int4_groups(&[f32::INFINITY; 32], 1, 32, 32, None),
            Err(QuantError::NonFinite { .. })
        ));
    }
}

//! Pruning: which weights (or whole output channels) to zero.
//!
//! Every mask is a `Vec<bool>` of length `n * k` in the weight's row-major layout, `true` =
//! kept. Masks are chosen from *scores* (higher = more important):
//!
//! * magnitude: `|W_ij|`, lowest fraction over the whole tensor ([`magnitude_mask`]);
//! * Wanda (Sun et al. 2023): `|W_ij| · ‖X_j‖₂`, lowest fraction **within each output row**
//!   ([`wanda_scores`], [`wanda_mask`]); `‖X_j‖₂` comes from
//!   [`ActStats::col_l2_norms`](crate::stats::ActStats::col_l2_norms). No weight update.
//! * N:M semi-structured: in every block of `M` consecutive weights along `k`, keep the `N`
//!   highest scores ([`nm_mask`], 2:4 being the common case; any `1 <= N <= M <= 16`), with
//!   magnitude or Wanda scores;
//! * structured: score each output channel by the (optionally column-weighted) L2 norm of its
//!   row ([`channel_scores`]) and return the channels to drop ([`channels_to_drop`]).
//!
//! Ties are broken deterministically: among equal scores the later index is pruned first.
//! A fraction `p` of `N` items prunes `round(p · N)` of them.
//!
//! ```
//! use edgetune_quant::prune::{nm_mask, apply_mask};
//! let mut w: Vec<f32> = vec![0.1, -3.0, 2.0, 0.5, 1.0, 0.0, -0.2, 4.0];
//! let scores: Vec<f32> = w.iter().map(|x| x.abs()).collect();
//! let mask = nm_mask(&scores, 1, 8, 2, 4).unwrap(); // 2:4
//! apply_mask(&mut w, &mask).unwrap();
//! assert_eq!(w, vec![0.0, -3.0, 2.0, 0.0, 1.0, 0.0, 0.0, 4.0]);
//! ```

use core::cmp::Ordering;

use crate::util::{check_fraction, check_matrix, check_weights};
use crate::{QuantError, Result};

/// Largest supported N:M block length.
pub const MAX_NM_BLOCK: usize = 16;

/// Pruning order: lowest score first; among equal scores, higher index first.
fn prune_order(scores: &[f32]) -> impl Fn(&usize, &usize) -> Ordering + '_ {
    move |&a, &b| scores[a].total_cmp(&scores[b]).then(b.cmp(&a))
}

/// Indices (into `idx`) of the `count` items to prune.
fn prune_lowest(scores: &[f32], idx: &mut [usize], count: usize) {
    if count == 0 || idx.is_empty() {
        return;
    }
    if count < idx.len() {
        idx.select_nth_unstable_by(count - 1, prune_order(scores));
    }
}

fn prune_count(fraction: f64, total: usize) -> usize {
    ((fraction * total as f64).round() as usize).min(total)
}

fn check_scores(scores: &[f32], n: usize, k: usize) -> Result<()> {
    check_matrix(scores, n, k, "scores")
}

/// Unstructured magnitude pruning: removes the `round(sparsity · n · k)` weights of smallest
/// `|w|` over the whole tensor. `sparsity` in `[0, 1]`.
pub fn magnitude_mask(w: &[f32], n: usize, k: usize, sparsity: f64) -> Result<Vec<bool>> {
    check_matrix(w, n, k, "weight matrix")?;
    check_fraction(sparsity, "sparsity", 0.0, 1.0, "[0, 1]")?;
    let scores: Vec<f32> = w.iter().map(|x| x.abs()).collect();
    let mut idx: Vec<usize> = (0..w.len()).collect();
    let count = prune_count(sparsity, w.len());
    prune_lowest(&scores, &mut idx, count);
    let mut mask = vec![true; w.len()];
    for &i in &idx[..count] {
        mask[i] = false;
    }
    Ok(mask)
}

/// Wanda scores `|W_ij| · ‖X_j‖₂` (`act_norms`: length `k`, finite, `>= 0`).
pub fn wanda_scores(w: &[f32], n: usize, k: usize, act_norms: &[f32]) -> Result<Vec<f32>> {
    check_matrix(w, n, k, "weight matrix")?;
    check_weights(act_norms, k, "activation norms")?;
    Ok(w.iter()
        .enumerate()
        .map(|(i, x)| x.abs() * act_norms[i % k])
        .collect())
}

/// Per-output-row pruning from scores: in each row, removes the `round(sparsity · k)` lowest.
pub fn row_mask(scores: &[f32], n: usize, k: usize, sparsity: f64) -> Result<Vec<bool>> {
    check_scores(scores, n, k)?;
    check_fraction(sparsity, "sparsity", 0.0, 1.0, "[0, 1]")?;
    let count = prune_count(sparsity, k);
    let mut mask = vec![true; n * k];
    let mut idx: Vec<usize> = Vec::with_capacity(k);
    for r in 0..n {
        let row = &scores[r * k..(r + 1) * k];
        idx.clear();
        idx.extend(0..k);
        prune_lowest(row, &mut idx, count);
        for &c in &idx[..count] {
            mask[r * k + c] = false;
        }
    }
    Ok(mask)
}

/// Wanda: per-row pruning of the `round(sparsity · k)` lowest `|W_ij| · ‖X_j‖₂`.
///
/// ```
/// use edgetune_quant::prune::wanda_mask;
/// // Column 0 sees large activations: its small weight survives, the larger one does not.
/// let mask = wanda_mask(&[1.0, 2.0], 1, 2, &[10.0, 1.0], 0.5).unwrap();
/// assert_eq!(mask, vec![true, false]);
/// ```
pub fn wanda_mask(
    w: &[f32],
    n: usize,
    k: usize,
    act_norms: &[f32],
    sparsity: f64,
) -> Result<Vec<bool>> {
    let s = wanda_scores(w, n, k, act_norms)?;
    row_mask(&s, n, k, sparsity)
}

/// N:M mask: in each block of `m` consecutive scores along `k`, keeps the `keep` highest.
///
/// Errors unless `1 <= keep <= m <= 16` and `m` divides `k`.
pub fn nm_mask(scores: &[f32], n: usize, k: usize, keep: usize, m: usize) -> Result<Vec<bool>> {
    if keep == 0 || keep > m || m > MAX_NM_BLOCK || !k.is_multiple_of(m) {
        return Err(QuantError::InvalidNm { n: keep, m, k });
    }
    check_scores(scores, n, k)?;
    let mut mask = vec![true; n * k];
    let mut idx = [0usize; MAX_NM_BLOCK];
    for (b, block) in scores.chunks_exact(m).enumerate() {
        let idx = &mut idx[..m];
        for (i, v) in idx.iter_mut().enumerate() {
            *v = i;
        }
        idx.sort_unstable_by(prune_order(block));
        for &i in &idx[..m - keep] {
            mask[b * m + i] = false;
        }
    }
    Ok(mask)
}

/// Zeroes `w[i]` wherever `mask[i]` is `false`.
pub fn apply_mask(w: &mut [f32], mask: &[bool]) -> Result<()> {
    if mask.len() != w.len() {
        return Err(QuantError::ShapeMismatch {
            what: "mask",
            expected: w.len(),
            got: mask.len(),
        });
    }
    for (x, &keep) in w.iter_mut().zip(mask) {
        if !keep {
            *x = 0.0;
        }
    }
    Ok(())
}

/// Fraction of `false` entries (0 for an empty mask).
pub fn mask_sparsity(mask: &[bool]) -> f64 {
    if mask.is_empty() {
        return 0.0;
    }
    mask.iter().filter(|&&m| !m).count() as f64 / mask.len() as f64
}

/// Output-channel scores: `sqrt(Σ_c cw[c] · w[r][c]²)`, the row's L2 norm, weighted per input
/// column by `col_weights` when given (e.g. mean x², which makes the score the RMS of the
/// channel's output over the calibration data if inputs were uncorrelated).
pub fn channel_scores(
    w: &[f32],
    n: usize,
    k: usize,
    col_weights: Option<&[f32]>,
) -> Result<Vec<f32>> {
    check_matrix(w, n, k, "weight matrix")?;
    if let Some(cw) = col_weights {
        check_weights(cw, k, "column weights")?;
    }
    Ok(w.chunks_exact(k)
        .map(|row| {
            row.iter()
                .enumerate()
                .map(|(c, &x)| col_weights.map_or(1.0, |cw| cw[c] as f64) * (x as f64) * (x as f64))
                .sum::<f64>()
                .sqrt() as f32
        })
        .collect())
}

/// The `round(fraction · n)` output channels with the lowest scores, as ascending indices.
///
/// `fraction` in `[0, 1]`; errors if it would drop every channel.
///
/// ```
/// use edgetune_quant::prune::{channel_scores, channels_to_drop};
/// let w = [3.0, 4.0, 1.0, 0.0, 0.0, 2.0]; // row norms 5, 1, 2
/// let s = channel_scores(&w, 3, 2, None).unwrap();
/// assert_eq!(s, vec![5.0, 1.0, 2.0]);
/// assert_eq!(channels_to_drop(&s, 0.34).unwrap(), vec![1]);
/// ```
pub fn channels_to_drop(scores: &[f32], fraction: f64) -> Result<Vec<usize>> {
    if scores.is_empty() {
        return Err(QuantError::EmptyInput {
            what: "channel scores",
        });
    }
    crate::util::check_finite(scores, "channel scores")?;
    check_fraction(fraction, "channel drop fraction", 0.0, 1.0, "[0, 1]")?;
    let count = prune_count(fraction, scores.len());
    if count == scores.len() {
        return Err(QuantError::OutOfRange {
            what: "channel drop fraction (would drop every channel)",
            value: fraction,
            allowed: "[0, 1) with at least one channel left",
        });
    }
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    prune_lowest(scores, &mut idx, count);
    let mut drop = idx[..count].to_vec();
    drop.sort_unstable();
    Ok(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::activation_error;
    use crate::rng::SplitMix64;
    use crate::stats::ActStats;

    #[test]
    fn magnitude_hand_case() {
        let w = [0.1, -3.0, 2.0, -0.5];
        assert_eq!(
            magnitude_mask(&w, 2, 2, 0.5).unwrap(),
            vec![false, true, true, false]
        );
        assert_eq!(magnitude_mask(&w, 2, 2, 0.0).unwrap(), vec![true; 4]);
        assert_eq!(magnitude_mask(&w, 2, 2, 1.0).unwrap(), vec![false; 4]);
        // 0.25 * 4 = 1 weight: the 0.1.
        assert_eq!(
            magnitude_mask(&w, 2, 2, 0.25).unwrap(),
            vec![false, true, true, true]
        );
    }

    #[test]
    fn nm_ties_and_hand_case() {
        // Block 1: keep 5 and 3. Block 2: keep 9 and the first 4 (tie -> later one pruned).
        let s = [1.0, 5.0, 3.0, 2.0, 4.0, 4.0, 0.0, 9.0];
        let m = nm_mask(&s, 1, 8, 2, 4).unwrap();
        assert_eq!(m, vec![false, true, true, false, true, false, false, true]);
    }

    #[test]
    fn nm_property_random() {
        let mut rng = SplitMix64::new(1);
        for (keep, m) in [(2, 4), (1, 4), (4, 8), (3, 16), (16, 16), (1, 1)] {
            let (n, k) = (7, 48);
            let s: Vec<f32> = (0..n * k).map(|_| rng.next_f64() as f32).collect();
            let mask = nm_mask(&s, n, k, keep, m).unwrap();
            for b in 0..n * k / m {
                let blk = b * m..(b + 1) * m;
                assert_eq!(mask[blk.clone()].iter().filter(|&&x| x).count(), keep);
                let min_kept = blk
                    .clone()
                    .filter(|&i| mask[i])
                    .map(|i| s[i])
                    .fold(f32::MAX, f32::min);
                let max_pruned = blk
                    .filter(|&i| !mask[i])
                    .map(|i| s[i])
                    .fold(f32::MIN, f32::max);
                assert!(min_kept >= max_pruned);
            }
        }
    }

    #[test]
    fn row_mask_counts_per_row() {
        let mut rng = SplitMix64::new(2);
        let (n, k) = (5, 30);
        let s: Vec<f32> = (0..n * k).map(|_| rng.next_f64() as f32).collect();
        let m = row_mask(&s, n, k, 0.3).unwrap(); // 9 per row
        for r in 0..n {
            assert_eq!(m[r * k..(r + 1) * k].iter().filter(|&&x| !x).count(), 9);
        }
        assert!((mask_sparsity(&m) - 0.3).abs() < 1e-12);
    }

    #[test]
    fn wanda_beats_magnitude_on_outlier_channels() {
        // Activations with a few large-norm channels (as in LLMs): Wanda's output error must be
        // clearly lower than magnitude pruning's at the same 50% / 2:4 sparsity.
        let mut rng = SplitMix64::new(3);
        let (n, k, samples) = (32, 64, 256);
        let w = rng.gaussian_vec(n * k);
        let col_scale: Vec<f32> = (0..k)
            .map(|c| if c % 8 == 0 { 20.0 } else { 1.0 })
            .collect();
        let x: Vec<f32> = (0..samples * k)
            .map(|i| rng.next_gaussian() as f32 * col_scale[i % k])
            .collect();
        let mut st = ActStats::new(k, true).unwrap();
        st.update(&x, k).unwrap();
        let norms = st.col_l2_norms();
        let g = st.gram().unwrap();
        let err = |mask: &[bool]| {
            let mut wp = w.clone();
            apply_mask(&mut wp, mask).unwrap();
            activation_error(&w, &wp, n, k, g).unwrap()
        };
        let e_mag = err(&magnitude_mask(&w, n, k, 0.5).unwrap());
        let e_wanda = err(&wanda_mask(&w, n, k, &norms, 0.5).unwrap());
        assert!(e_wanda < 0.7 * e_mag, "wanda {e_wanda} magnitude {e_mag}");
        let mag_scores: Vec<f32> = w.iter().map(|v| v.abs()).collect();
        let e_mag24 = err(&nm_mask(&mag_scores, n, k, 2, 4).unwrap());
        let e_wanda24 =
            err(&nm_mask(&wanda_scores(&w, n, k, &norms).unwrap(), n, k, 2, 4).unwrap());
        assert!(
            e_wanda24 < 0.7 * e_mag24,
            "2:4 wanda {e_wanda24} magnitude {e_mag24}"
        );
    }

    #[test]
    fn weighted_channel_scores() {
        let w = [3.0, 4.0, 1.0, 0.0, 0.0, 2.0];
        let s = channel_scores(&w, 3, 2, Some(&[0.0, 1.0])).unwrap();
        assert_eq!(s, vec![4.0, 0.0, 2.0]);
        assert_eq!(channels_to_drop(&s, 0.5).unwrap(), vec![1, 2]); // round(1.5) = 2
    }

    #[test]
    fn errors() {
        let w = [1.0f32; 8];
        assert!(matches!(
            nm_mask(&w, 1, 8, 2, 3),
            Err(QuantError::InvalidNm { .. })
        ));
        assert!(matches!(
            nm_mask(&w, 1, 8, 0, 4),
            Err(QuantError::InvalidNm { .. })
        ));
        assert!(matches!(
            nm_mask(&w, 1, 8, 5, 4),
            Err(QuantError::InvalidNm { .. })
        ));
        assert!(matches!(
            nm_mask(&[1.0; 32], 1, 32, 2, 32),
            Err(QuantError::InvalidNm { .. })
        ));
        assert!(matches!(
            magnitude_mask(&w, 1, 8, 1.5),
            Err(QuantError::OutOfRange { .. })
        ));
        assert!(matches!(
            magnitude_mask(&w, 1, 8, f64::NAN),
            Err(QuantError::OutOfRange { .. })
        ));
        assert!(matches!(
            wanda_mask(&w, 1, 8, &[1.0; 7], 0.5),
            Err(QuantError::ShapeMismatch { .. })
        ));
        assert!(matches!(
            channels_to_drop(&[1.0, 2.0], 1.0),
            Err(QuantError::OutOfRange { .. })
        ));
        assert!(matches!(
            channels_to_drop(&[], 0.5),
            Err(QuantError::EmptyInput { .. })
        ));
        let mut v = vec![1.0; 3];
        assert!(matches!(
            apply_mask(&mut v, &[true]),
            Err(QuantError::ShapeMismatch { .. })
        ));
    }
}

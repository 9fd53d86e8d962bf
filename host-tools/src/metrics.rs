//! Agreement and accuracy measures between two sets of outputs.

/// Largest `|a − b|`.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Largest `|a − b| / max(|b|, floor)`: relative error that ignores values near zero.
pub fn max_rel_diff(a: &[f32], b: &[f32], floor: f32) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / y.abs().max(floor))
        .fold(0.0, f32::max)
}

/// Cosine similarity of two vectors (1 for two zero vectors).
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let (mut dot, mut na, mut nb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        dot += x as f64 * y as f64;
        na += x as f64 * x as f64;
        nb += y as f64 * y as f64;
    }
    if na == 0.0 && nb == 0.0 {
        return 1.0;
    }
    (dot / (na.sqrt() * nb.sqrt()).max(f64::MIN_POSITIVE)) as f32
}

/// Index of the largest value (first on ties).
pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// Fraction of rows (each `classes` wide) whose argmax equals the label.
pub fn accuracy(logits: &[f32], classes: usize, labels: &[i64]) -> f64 {
    let hits = logits
        .chunks_exact(classes)
        .zip(labels)
        .filter(|(row, &l)| argmax(row) as i64 == l)
        .count();
    hits as f64 / labels.len().max(1) as f64
}

/// Per-row cosine similarities.
pub fn row_cosines(a: &[f32], b: &[f32], width: usize) -> Vec<f32> {
    a.chunks_exact(width)
        .zip(b.chunks_exact(width))
        .map(|(x, y)| cosine(x, y))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn measures() {
        assert_eq!(max_abs_diff(&[1.0, 2.0], &[1.5, 2.0]), 0.5);
        assert!((cosine(&[1.0, 0.0], &[0.0, 1.0])).abs() < 1e-7);
        assert!((cosine(&[1.0, 2.0], &[2.0, 4.0]) - 1.0).abs() < 1e-6);
        assert_eq!(argmax(&[0.1, 0.7, 0.2]), 1);
        assert_eq!(accuracy(&[0.9, 0.1, 0.2, 0.8], 2, &[0, 0]), 0.5);
    }
}

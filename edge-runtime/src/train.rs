//! Zeroth-order fine-tuning (MeZO / SPSA): learning from forward passes only.
//!
//! A step draws no random state: the perturbation of trainable `i` in direction `d` of step `t`
//! is regenerated from `(seed, t, d, i)` by a counter-based generator, so nothing but the
//! trainables and a few scalars is kept, and a whole run replays from `(seed, config, g per step)`.
//!
//! One two-sided step (MeZO's order): `θ += εz → L+`, `θ −= 2εz → L−`, then `g = (L+ − L−)/2ε`
//! and the restore and update in one pass, `θ += (ε − lr·g)·z`, then `θ −= lr·wd·θ`: `z` is
//! generated three times per step, not four. Both losses see the same minibatch. The arithmetic
//! is the same on every target, and [`replay_step`] repeats it, so replaying the log reproduces
//! the adapter bit for bit.

/// Most directions one step may average.
pub const MAX_DIRECTIONS: usize = 8;

/// The step rule (the variants of ZO-Bench that need no optimizer state).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// `θ −= lr · g · z`.
    Sgd,
    /// `θ −= lr · sign(g) · z`.
    SignSgd,
}

/// Distribution of the perturbation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Perturbation {
    /// Approximately standard normal: the sum of four 16-bit uniforms, centred and scaled to unit
    /// variance (Irwin–Hall, tails cut at ±3.46). What the estimator needs is `E[z] = 0` and
    /// `E[z zᵀ] = I`, which this has exactly; it costs one hash and four adds, where Box–Muller's
    /// logarithm, root and cosine made generating `z` a third of a small model's step.
    Gaussian,
    /// ±1 with equal probability.
    Rademacher,
}

/// Hyper-parameters of a zeroth-order run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ZoConfig {
    /// Base seed of every perturbation.
    pub seed: u64,
    /// Learning rate.
    pub lr: f32,
    /// Perturbation size ε.
    pub eps: f32,
    /// Decoupled weight decay (applied to LoRA values only: other trainables do not center on 0).
    pub weight_decay: f32,
    /// Projected gradients are clipped to `[-clip, clip]`.
    pub clip: f32,
    /// Directions per step (1..=MAX_DIRECTIONS), their updates averaged.
    pub directions: u32,
    /// One-sided differences `(L(θ+εz) − L(θ))/ε` (one shared `L(θ)` per step).
    pub one_sided: bool,
    /// Step rule.
    pub rule: Rule,
    /// Perturbation distribution.
    pub perturbation: Perturbation,
}

impl Default for ZoConfig {
    fn default() -> ZoConfig {
        ZoConfig {
            seed: 0,
            lr: 1e-2,
            eps: 1e-3,
            weight_decay: 0.0,
            clip: 100.0,
            directions: 1,
            one_sided: false,
            rule: Rule::Sgd,
            perturbation: Perturbation::Gaussian,
        }
    }
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The key of one direction of one step: perturbations of all trainables derive from it.
pub fn direction_key(seed: u64, step: u32, direction: u32) -> u64 {
    splitmix(splitmix(seed) ^ ((step as u64) << 32 | direction as u64))
}

/// Perturbation of trainable `index` under `key`.
///
/// ```
/// use edgetune_runtime::train::{direction_key, perturbation, Perturbation};
/// let k = direction_key(7, 3, 0);
/// // Regenerated, never stored: the same inputs give the same value.
/// assert_eq!(perturbation(k, 12, Perturbation::Gaussian), perturbation(k, 12, Perturbation::Gaussian));
/// assert!(perturbation(k, 12, Perturbation::Rademacher).abs() == 1.0);
/// ```
#[inline]
pub fn perturbation(key: u64, index: u32, dist: Perturbation) -> f32 {
    let r = splitmix(key ^ (index as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
    match dist {
        Perturbation::Rademacher => {
            if r & 1 == 0 {
                1.0
            } else {
                -1.0
            }
        }
        Perturbation::Gaussian => {
            let u = |i: u32| ((r >> (16 * i)) & 0xFFFF) as f32;
            // (Σ uᵢ/65536 − 2)·√3, with the constants folded.
            ((u(0) + u(1)) + (u(2) + u(3)) - 131_070.0) * (1.732_050_8 / 65_536.0)
        }
    }
}

/// `θ += scale · z` for every trainable.
pub fn perturb(values: &mut [f32], key: u64, scale: f32, dist: Perturbation) {
    for (i, v) in values.iter_mut().enumerate() {
        *v += scale * perturbation(key, i as u32, dist);
    }
}

/// Minibatch indices drawn with a seeded generator: the same sequence on every target, so a
/// board and a host run with the same seed see the same samples in the same order.
///
/// ```
/// use edgetune_runtime::train::Sampler;
/// let (mut a, mut b) = (Sampler::new(100, 7), Sampler::new(100, 7));
/// let first: Vec<usize> = (0..5).map(|_| a.next_index()).collect();
/// assert!(first.iter().all(|&i| i < 100));
/// assert_eq!(first, (0..5).map(|_| b.next_index()).collect::<Vec<_>>());
/// ```
#[derive(Debug, Clone)]
pub struct Sampler {
    n: u64,
    state: u64,
}

impl Sampler {
    /// Draws from `0..n` (`n` ≥ 1) with `seed` (the run's base seed).
    pub fn new(n: usize, seed: u64) -> Sampler {
        Sampler {
            n: n.max(1) as u64,
            state: seed ^ 0x5eed,
        }
    }

    /// The next sample index.
    pub fn next_index(&mut self) -> usize {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut x = self.state;
        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((x ^ (x >> 31)) % self.n) as usize
    }
}

/// What one step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepRecord {
    /// Step index.
    pub step: u32,
    /// Projected gradient per direction (after clipping); all zero when skipped.
    pub g: [f32; MAX_DIRECTIONS],
    /// Mean of the losses evaluated.
    pub loss: f32,
    /// True when a loss was NaN or infinite: the values were restored and not updated.
    pub skipped: bool,
}

/// The step's coefficient of direction `d` (its projected gradient, or the sign of it).
fn coefficient(cfg: &ZoConfig, g: f32) -> f32 {
    match cfg.rule {
        Rule::Sgd => g,
        Rule::SignSgd => {
            if g > 0.0 {
                1.0
            } else if g < 0.0 {
                -1.0
            } else {
                0.0
            }
        }
    }
}

/// Directions of a step (`cfg.directions` within 1..=MAX_DIRECTIONS).
fn directions(cfg: &ZoConfig) -> usize {
    cfg.directions.clamp(1, MAX_DIRECTIONS as u32) as usize
}

/// The perturbations a step makes while its losses are evaluated, in order, calling
/// `eval(values, direction, plus)` where a loss is due: for each direction `+εz` (L+), then
/// `−2εz` (L−; one-sided: `−εz` back to θ, no loss). Every direction but the last is restored;
/// the last one's restore is folded into [`finish_step`].
fn evaluate_directions<S: Trainable + ?Sized>(
    values: &mut S,
    cfg: &ZoConfig,
    step: u32,
    mut eval: impl FnMut(&mut S, usize, bool),
) {
    let dirs = directions(cfg);
    for d in 0..dirs {
        let key = direction_key(cfg.seed, step, d as u32);
        perturb(values.values_mut(), key, cfg.eps, cfg.perturbation);
        eval(values, d, true);
        if cfg.one_sided {
            if d + 1 < dirs {
                perturb(values.values_mut(), key, -cfg.eps, cfg.perturbation);
            }
        } else {
            perturb(values.values_mut(), key, -2.0 * cfg.eps, cfg.perturbation);
            eval(values, d, false);
            if d + 1 < dirs {
                perturb(values.values_mut(), key, cfg.eps, cfg.perturbation);
            }
        }
    }
}

/// The end of a step: the last direction's restore together with the update
/// `θ −= lr·(Σ_d coef_d·z_d)/D`, then decoupled weight decay on the values `decay(i)` says.
/// A skipped step only restores.
fn finish_step(
    values: &mut [f32],
    cfg: &ZoConfig,
    step: u32,
    g: &[f32],
    skipped: bool,
    decay: &dyn Fn(usize) -> bool,
) {
    let dirs = directions(cfg);
    let last = dirs - 1;
    // Where the last direction left θ: +εz one-sided, −εz two-sided.
    let restore = if cfg.one_sided { -cfg.eps } else { cfg.eps };
    let key_last = direction_key(cfg.seed, step, last as u32);
    if skipped {
        perturb(values, key_last, restore, cfg.perturbation);
        return;
    }
    let lr = cfg.lr / dirs as f32;
    for (d, &gd) in g.iter().enumerate().take(last) {
        let key = direction_key(cfg.seed, step, d as u32);
        perturb(values, key, -lr * coefficient(cfg, gd), cfg.perturbation);
    }
    perturb(
        values,
        key_last,
        restore - lr * coefficient(cfg, g[last]),
        cfg.perturbation,
    );
    if cfg.weight_decay != 0.0 {
        for (i, v) in values.iter_mut().enumerate() {
            if decay(i) {
                *v -= cfg.lr * cfg.weight_decay * *v;
            }
        }
    }
}

/// Repeats step `step` from its logged projected gradients (`g`, one per direction) and skip
/// flag, without data: the same arithmetic as [`zo_step`], so the values come out bit for bit.
pub fn replay_step(
    values: &mut [f32],
    cfg: &ZoConfig,
    step: u32,
    g: &[f32],
    skipped: bool,
    decay: &dyn Fn(usize) -> bool,
) {
    evaluate_directions(values, cfg, step, |_, _, _| {});
    finish_step(values, cfg, step, g, skipped, decay);
}

/// What a zeroth-order step perturbs: a flat array of trainable values.
pub trait Trainable {
    /// The values.
    fn values_mut(&mut self) -> &mut [f32];
}

impl Trainable for [f32] {
    fn values_mut(&mut self) -> &mut [f32] {
        self
    }
}

impl<const N: usize> Trainable for [f32; N] {
    fn values_mut(&mut self) -> &mut [f32] {
        self
    }
}

impl Trainable for crate::adapter::Adapter<'_> {
    fn values_mut(&mut self) -> &mut [f32] {
        crate::adapter::Adapter::values_mut(self)
    }
}

/// One zeroth-order step. `loss(state)` runs the forward passes on the step's minibatch with the
/// state's current (perturbed) values and returns the mean loss; it is called `2·directions`
/// times (or `directions + 1` one-sided).
pub fn zo_step<S: Trainable + ?Sized>(
    state: &mut S,
    cfg: &ZoConfig,
    step: u32,
    decay: &dyn Fn(usize) -> bool,
    mut loss: impl FnMut(&mut S) -> f32,
) -> StepRecord {
    let dirs = directions(cfg);
    let mut rec = StepRecord {
        step,
        g: [0.0; MAX_DIRECTIONS],
        loss: 0.0,
        skipped: false,
    };
    let (mut sum, mut count) = (0.0f32, 0usize);
    let base = if cfg.one_sided {
        let l0 = loss(state);
        sum += l0;
        count += 1;
        l0
    } else {
        0.0
    };
    let mut plus = [0.0f32; MAX_DIRECTIONS];
    let mut minus = [base; MAX_DIRECTIONS];
    evaluate_directions(state, cfg, step, |s, d, is_plus| {
        let l = loss(s);
        sum += l;
        count += 1;
        if is_plus {
            plus[d] = l;
        } else {
            minus[d] = l;
        }
    });
    let denom = if cfg.one_sided {
        cfg.eps
    } else {
        2.0 * cfg.eps
    };
    for d in 0..dirs {
        if !plus[d].is_finite() || !minus[d].is_finite() {
            rec.skipped = true;
        }
        rec.g[d] = ((plus[d] - minus[d]) / denom).clamp(-cfg.clip, cfg.clip);
    }
    rec.loss = sum / count as f32;
    if rec.skipped {
        rec.g = [0.0; MAX_DIRECTIONS];
    }
    finish_step(
        state.values_mut(),
        cfg,
        step,
        &rec.g[..dirs],
        rec.skipped,
        decay,
    );
    rec
}

/// Mean cross-entropy of `logits` (`[batch, classes]`) against class `labels`.
pub fn cross_entropy(
    logits: &[f32],
    classes: usize,
    labels: impl IntoIterator<Item = usize>,
) -> f32 {
    let mut total = 0.0f32;
    let mut n = 0;
    for (row, label) in logits.chunks_exact(classes).zip(labels) {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let lse = max + libm::logf(row.iter().map(|&v| libm::expf(v - max)).sum());
        total += lse - row[label.min(classes - 1)];
        n += 1;
    }
    total / n.max(1) as f32
}

/// Mean squared error between `out` and `target`.
pub fn mse(out: &[f32], target: &[f32]) -> f32 {
    let s: f32 = out.iter().zip(target).map(|(a, b)| (a - b) * (a - b)).sum();
    s / out.len().max(1) as f32
}

/// Fraction of rows whose largest logit is not the label: a loss zeroth-order methods can
/// minimise although it has no gradient.
pub fn error_rate(logits: &[f32], classes: usize, labels: impl IntoIterator<Item = usize>) -> f32 {
    let mut wrong = 0;
    let mut n = 0;
    for (row, label) in logits.chunks_exact(classes).zip(labels) {
        let mut best = 0;
        for (i, &v) in row.iter().enumerate() {
            if v > row[best] {
                best = i;
            }
        }
        wrong += (best != label) as usize;
        n += 1;
    }
    wrong as f32 / n.max(1) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaussian_perturbations_have_unit_moments() {
        let key = direction_key(1, 2, 0);
        let n = 200_000u32;
        let (mut s, mut s2) = (0.0f64, 0.0f64);
        for i in 0..n {
            let z = perturbation(key, i, Perturbation::Gaussian) as f64;
            s += z;
            s2 += z * z;
        }
        let mean = s / n as f64;
        let var = s2 / n as f64 - mean * mean;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.02, "variance {var}");
    }

    #[test]
    fn steps_descend_a_quadratic() {
        // L(θ) = |θ − t|²: the ZO estimate is unbiased for the gradient direction.
        let target = [1.0f32, -2.0, 0.5, 3.0];
        let mut theta = [0.0f32; 4];
        let cfg = ZoConfig {
            lr: 0.05,
            eps: 1e-3,
            ..ZoConfig::default()
        };
        let loss = |v: &mut [f32; 4]| {
            v.iter()
                .zip(&target)
                .map(|(a, b)| (a - b) * (a - b))
                .sum::<f32>()
        };
        let start = loss(&mut theta);
        for t in 0..400 {
            zo_step(&mut theta, &cfg, t, &|_| false, loss);
        }
        assert!(
            loss(&mut theta) < 0.01 * start,
            "loss {} from {start}",
            loss(&mut theta)
        );
    }

    #[test]
    fn replay_reproduces_bits() {
        // Every variant, with weight decay on some values and a step skipped for a NaN loss.
        let variants = [
            ZoConfig {
                directions: 2,
                ..ZoConfig::default()
            },
            ZoConfig {
                directions: 3,
                one_sided: true,
                weight_decay: 0.1,
                ..ZoConfig::default()
            },
            ZoConfig {
                rule: Rule::SignSgd,
                perturbation: Perturbation::Rademacher,
                ..ZoConfig::default()
            },
        ];
        for cfg in variants {
            let mut a = [0.3f32, -0.7, 1.1, 0.05];
            let decay = |i: usize| i % 2 == 0;
            let mut b = a;
            let mut log = [([0f32; MAX_DIRECTIONS], false); 50];
            for t in 0..50u32 {
                let loss = |v: &mut [f32; 4]| {
                    if t == 17 {
                        f32::NAN
                    } else {
                        v.iter().map(|x| (x - 0.25) * (x - 0.25)).sum::<f32>()
                    }
                };
                let r = zo_step(&mut a, &cfg, t, &decay, loss);
                log[t as usize] = (r.g, r.skipped);
            }
            assert!(log[17].1 && !log[16].1);
            let dirs = cfg.directions as usize;
            for t in 0..50 {
                let (g, skipped) = log[t as usize];
                replay_step(&mut b, &cfg, t, &g[..dirs], skipped, &decay);
            }
            assert_eq!(a.map(f32::to_bits), b.map(f32::to_bits), "{cfg:?}");
        }
    }

    #[test]
    fn nan_losses_skip_and_restore() {
        let mut v = [1.0f32, 2.0];
        let before = v;
        let r = zo_step(&mut v, &ZoConfig::default(), 0, &|_| false, |_| f32::NAN);
        assert!(r.skipped);
        for (a, b) in v.iter().zip(before) {
            assert!((a - b).abs() < 1e-6);
        }
    }

    #[test]
    fn losses() {
        let logits = [2.0, 0.0, 0.0, 3.0];
        assert_eq!(error_rate(&logits, 2, [0usize, 0]), 0.5);
        let ce = cross_entropy(&logits, 2, [0usize, 1]);
        let want = ((1.0 + (-2.0f32).exp()).ln() + (1.0 + (-3.0f32).exp()).ln()) / 2.0;
        assert!((ce - want).abs() < 1e-6);
        assert_eq!(mse(&[1.0, 2.0], &[0.0, 2.0]), 0.5);
    }
}

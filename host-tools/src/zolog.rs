//! The zeroth-order run log (`.ztl`): everything needed to rebuild an adapter without data.
//!
//! A run is its initial adapter, its configuration and, per step, the projected gradients and
//! two flags (the validation bookkeeping: snapshot the best values, roll back to them). Every
//! step record is self-contained given the base seed, so a fleet could exchange only step
//! records (a few bytes each) against a shared initial adapter — the federated mode the format
//! is ready for.
//!
//! Layout (little-endian): magic `EDGETUNE-ZTL1`, then `seed u64, lr f32, eps f32, wd f32,
//! clip f32, directions u32, flags u32` (bit 0 one-sided, bit 1 sign, bit 2 Rademacher, bit 3
//! the run saved its best snapshot), the
//! initial `.eta` (length u32, bytes), a step count u32, and per step `step u32, flags u8`
//! (bit 0 skipped, bit 1 snapshot best, bit 2 roll back to best) and `directions` f32.

use anyhow::{bail, Context, Result};
use edgetune_runtime::train::{Perturbation, Rule, ZoConfig, MAX_DIRECTIONS};

/// Magic bytes of a run log.
pub const MAGIC: &[u8; 13] = b"EDGETUNE-ZTL1";

/// Step flag: the step's losses were not finite; nothing was updated.
pub const SKIPPED: u8 = 1;
/// Step flag: after this step, the values became the best snapshot.
pub const SNAPSHOT: u8 = 2;
/// Step flag: after this step, the values were rolled back to the best snapshot.
pub const ROLLBACK: u8 = 4;

/// One step of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct StepEntry {
    /// Step index.
    pub step: u32,
    /// [`SKIPPED`], [`SNAPSHOT`], [`ROLLBACK`].
    pub flags: u8,
    /// Projected gradient per direction.
    pub g: Vec<f32>,
}

/// A whole run.
#[derive(Debug, Clone, PartialEq)]
pub struct RunLog {
    /// Step configuration.
    pub config: ZoConfig,
    /// The adapter before the first step (`.eta` bytes).
    pub initial: Vec<u8>,
    /// The run saved its best snapshot (validation) rather than its last values.
    pub keep_best: bool,
    /// Steps in order.
    pub steps: Vec<StepEntry>,
}

impl RunLog {
    /// Serialises the log.
    pub fn to_bytes(&self) -> Vec<u8> {
        let c = &self.config;
        let mut out = MAGIC.to_vec();
        out.extend(c.seed.to_le_bytes());
        for v in [c.lr, c.eps, c.weight_decay, c.clip] {
            out.extend(v.to_le_bytes());
        }
        out.extend(c.directions.to_le_bytes());
        let flags = c.one_sided as u32
            | ((c.rule == Rule::SignSgd) as u32) << 1
            | ((c.perturbation == Perturbation::Rademacher) as u32) << 2
            | (self.keep_best as u32) << 3;
        out.extend(flags.to_le_bytes());
        out.extend((self.initial.len() as u32).to_le_bytes());
        out.extend(&self.initial);
        out.extend((self.steps.len() as u32).to_le_bytes());
        for s in &self.steps {
            out.extend(s.step.to_le_bytes());
            out.push(s.flags);
            for d in 0..c.directions as usize {
                out.extend(s.g.get(d).copied().unwrap_or(0.0).to_le_bytes());
            }
        }
        out
    }

    /// Parses a log.
    pub fn parse(b: &[u8]) -> Result<RunLog> {
        let mut at = 0usize;
        let mut take = |n: usize| -> Result<&[u8]> {
            let s = b.get(at..at + n).context("run log truncated")?;
            at += n;
            Ok(s)
        };
        if take(MAGIC.len())? != MAGIC {
            bail!("not an edgetune run log (bad magic)");
        }
        let u32v = |s: &[u8]| u32::from_le_bytes(s.try_into().unwrap());
        let f32v = |s: &[u8]| f32::from_le_bytes(s.try_into().unwrap());
        let seed = u64::from_le_bytes(take(8)?.try_into().unwrap());
        let (lr, eps, wd, clip) = (
            f32v(take(4)?),
            f32v(take(4)?),
            f32v(take(4)?),
            f32v(take(4)?),
        );
        let directions = u32v(take(4)?);
        if directions == 0 || directions as usize > MAX_DIRECTIONS {
            bail!("run log: {directions} directions per step");
        }
        let flags = u32v(take(4)?);
        let config = ZoConfig {
            seed,
            lr,
            eps,
            weight_decay: wd,
            clip,
            directions,
            one_sided: flags & 1 != 0,
            rule: if flags & 2 != 0 {
                Rule::SignSgd
            } else {
                Rule::Sgd
            },
            perturbation: if flags & 4 != 0 {
                Perturbation::Rademacher
            } else {
                Perturbation::Gaussian
            },
        };
        let n = u32v(take(4)?) as usize;
        let initial = take(n)?.to_vec();
        let count = u32v(take(4)?) as usize;
        let mut steps = Vec::with_capacity(count.min(1 << 24));
        for _ in 0..count {
            let step = u32v(take(4)?);
            let fl = take(1)?[0];
            let g = (0..directions)
                .map(|_| take(4).map(f32v))
                .collect::<Result<Vec<_>>>()?;
            steps.push(StepEntry { step, flags: fl, g });
        }
        Ok(RunLog {
            config,
            initial,
            keep_best: flags & 8 != 0,
            steps,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_truncation() {
        let log = RunLog {
            config: ZoConfig {
                seed: 9,
                directions: 2,
                one_sided: true,
                ..ZoConfig::default()
            },
            initial: vec![1, 2, 3],
            keep_best: true,
            steps: vec![
                StepEntry {
                    step: 0,
                    flags: SNAPSHOT,
                    g: vec![0.5, -1.0],
                },
                StepEntry {
                    step: 1,
                    flags: 0,
                    g: vec![0.0, 2.0],
                },
            ],
        };
        let b = log.to_bytes();
        assert_eq!(RunLog::parse(&b).unwrap(), log);
        assert!(RunLog::parse(&b[..b.len() - 1]).is_err());
        assert!(RunLog::parse(b"nope").is_err());
    }
}

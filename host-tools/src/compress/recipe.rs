//! Compression recipes: which encoding each layer gets, from command-line flags or a TOML file of
//! per-layer rules matched by name pattern.
//!
//! ```toml
//! # The first matching rule wins; layers no rule matches keep f32.
//! int8_activations = false     # true: multiply with int8-quantized activations (faster GEMV)
//! keep_ends = "int8"           # first and last layer: "int8" (default), "f32", or "same"
//!
//! [[rule]]
//! match = "*attention*"        # glob on the node name (or the weight's name)
//! codebook = 4                 # bits
//! granularity = "row"          # "tensor", "row", or "rows:8"
//! scale_group = 64             # optional: an f16 scale per 64 inputs (with shared tables)
//!
//! [[rule]]
//! match = "*"
//! int4 = 64                    # group size
//! gptq = true                  # error-compensated (needs --calib)
//! ```

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;

/// How one weight is encoded.
#[derive(Debug, Clone, PartialEq)]
pub enum Method {
    /// f32 panels (no compression).
    F32,
    /// f16 panels.
    F16,
    /// Int8 per output channel.
    Int8,
    /// Int4 with an f16 scale per group of `group` inputs.
    Int4 {
        /// Inputs per scale (32, 64 or 128).
        group: usize,
    },
    /// k-bit indices into f16 centroid tables.
    Codebook {
        /// Index bits, 1..=8.
        bits: u32,
        /// Rows per table (0 = the whole tensor).
        rows_per_table: usize,
        /// Inputs per f16 scale (0: none for per-row tables, one per row for shared tables
        /// when it helps).
        scale_group: usize,
    },
    /// {−1, 0, +1} with a scale per group.
    Ternary {
        /// Inputs per scale.
        group: usize,
    },
    /// Signs with a scale per group.
    Binary {
        /// Inputs per scale.
        group: usize,
    },
    /// `W ≈ U·V`, the factors encoded by `factors`.
    LowRank {
        /// How the rank is chosen.
        rank: RankChoice,
        /// Plain SVD, or scaled by calibration statistics first.
        aware: LowRankKind,
        /// Encoding of both factors.
        factors: Box<Method>,
    },
    /// Keep `keep` of every `m` inputs (magnitude or Wanda scores), values in f16.
    Sparse {
        /// Kept per group.
        keep: usize,
        /// Group size.
        m: usize,
    },
    /// Zero the smallest `fraction` of weights (Wanda scores with calibration), then encode
    /// with `then`.
    Unstructured {
        /// Fraction pruned.
        fraction: f64,
        /// Encoding of what remains.
        then: Box<Method>,
    },
    /// Remove the least important `fraction` of output channels (and the matching inputs of
    /// the consumer), leaving smaller dense weights.
    Channels {
        /// Fraction removed.
        fraction: f64,
    },
}

/// Rank of a low-rank factorisation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RankChoice {
    /// Keep this fraction of the singular values' energy.
    Energy(f64),
    /// Spend at most this fraction of the original parameters.
    Params(f64),
    /// This rank.
    Fixed(usize),
}

/// Which low-rank variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LowRankKind {
    /// Truncated SVD of W.
    Svd,
    /// SVD of W scaled per input by mean |x| (ASVD), unscaled after.
    Asvd,
    /// SVD of W whitened by the calibration inputs' Cholesky factor (SVD-LLM).
    SvdLlm,
}

impl Method {
    /// Short description for reports.
    pub fn label(&self) -> String {
        match self {
            Method::F32 => "f32".into(),
            Method::F16 => "f16".into(),
            Method::Int8 => "int8".into(),
            Method::Int4 { group } => format!("int4 g{group}"),
            Method::Codebook {
                bits,
                rows_per_table,
                scale_group,
            } => {
                let tables = match rows_per_table {
                    0 => format!("codebook {bits}-bit/tensor"),
                    1 => format!("codebook {bits}-bit/row"),
                    r => format!("codebook {bits}-bit/{r} rows"),
                };
                match scale_group {
                    0 => tables,
                    g => format!("{tables} s{g}"),
                }
            }
            Method::Ternary { group } => format!("ternary g{group}"),
            Method::Binary { group } => format!("binary g{group}"),
            Method::LowRank {
                rank,
                aware,
                factors,
            } => format!("lowrank {rank:?} {aware:?} ({})", factors.label()),
            Method::Sparse { keep, m } => format!("sparse {keep}:{m}"),
            Method::Unstructured { fraction, then } => {
                format!("pruned {:.0}% ({})", fraction * 100.0, then.label())
            }
            Method::Channels { fraction } => format!("channels -{:.0}%", fraction * 100.0),
        }
    }

    /// True for encodings of 4 bits per weight or fewer (the ones that keep the ends at int8).
    pub fn is_aggressive(&self) -> bool {
        !matches!(self, Method::F32 | Method::F16 | Method::Int8)
    }
}

/// One rule: a name pattern and what matching layers get.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// Glob (`*` any run, `?` one character) on the node name or the weight's name.
    pub pattern: String,
    /// The encoding.
    pub method: Method,
    /// Error-compensated quantization (GPTQ) with calibration statistics.
    pub gptq: bool,
}

/// What the first and last compressible layers get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepEnds {
    /// Int8 when the recipe is more aggressive than int8 (the default).
    Int8,
    /// Stay f32.
    F32,
    /// Treat them like any layer.
    Same,
}

/// A whole recipe.
#[derive(Debug, Clone, PartialEq)]
pub struct Recipe {
    /// Rules, first match wins.
    pub rules: Vec<Rule>,
    /// First and last layer policy.
    pub keep_ends: KeepEnds,
    /// Quantize activations to int8 for block-quantized weights.
    pub int8_activations: bool,
    /// Seed for k-means.
    pub seed: u64,
}

impl Default for Recipe {
    fn default() -> Recipe {
        Recipe {
            rules: Vec::new(),
            keep_ends: KeepEnds::Int8,
            int8_activations: false,
            seed: 0,
        }
    }
}

/// Glob match with `*` and `?`.
pub fn glob(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni, mut star, mut mark) = (0, 0, None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RecipeFile {
    int8_activations: Option<bool>,
    keep_ends: Option<String>,
    seed: Option<u64>,
    #[serde(default)]
    rule: Vec<RuleFile>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    #[serde(rename = "match")]
    pattern: String,
    f32: Option<bool>,
    f16: Option<bool>,
    int8: Option<bool>,
    int4: Option<usize>,
    codebook: Option<u32>,
    granularity: Option<String>,
    scale_group: Option<usize>,
    ternary: Option<usize>,
    binary: Option<usize>,
    lowrank: Option<String>,
    lowrank_kind: Option<String>,
    lowrank_factors: Option<String>,
    sparse: Option<String>,
    prune: Option<f64>,
    channels: Option<f64>,
    gptq: Option<bool>,
}

/// Parses `tensor`, `row` or `rows:G` into rows per table (0 = tensor).
pub fn parse_granularity(s: &str) -> Result<usize> {
    Ok(match s {
        "tensor" => 0,
        "row" => 1,
        _ => s
            .strip_prefix("rows:")
            .and_then(|g| g.parse().ok())
            .filter(|&g: &usize| g > 0)
            .ok_or_else(|| anyhow!("granularity must be tensor, row or rows:G, not {s:?}"))?,
    })
}

/// Parses `energy=0.95`, `params=0.5` or `rank=32`.
pub fn parse_rank(s: &str) -> Result<RankChoice> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| anyhow!("low-rank choice is energy=E, params=F or rank=R, not {s:?}"))?;
    Ok(match k {
        "energy" => RankChoice::Energy(v.parse().with_context(|| format!("energy {v:?}"))?),
        "params" => RankChoice::Params(v.parse().with_context(|| format!("params {v:?}"))?),
        "rank" => RankChoice::Fixed(v.parse().with_context(|| format!("rank {v:?}"))?),
        _ => bail!("low-rank choice is energy=E, params=F or rank=R, not {s:?}"),
    })
}

/// Parses `svd`, `asvd` or `svdllm`.
pub fn parse_lowrank_kind(s: &str) -> Result<LowRankKind> {
    Ok(match s {
        "svd" => LowRankKind::Svd,
        "asvd" => LowRankKind::Asvd,
        "svdllm" | "svd-llm" => LowRankKind::SvdLlm,
        _ => bail!("low-rank kind must be svd, asvd or svdllm, not {s:?}"),
    })
}

/// Parses `N:M`.
pub fn parse_nm(s: &str) -> Result<(usize, usize)> {
    let (n, m) = s
        .split_once(':')
        .ok_or_else(|| anyhow!("sparsity pattern is N:M, not {s:?}"))?;
    let (n, m): (usize, usize) = (n.parse()?, m.parse()?);
    if n == 0 || n > m || !(2..=16).contains(&m) {
        bail!("sparsity pattern {s}: need 1 <= N <= M <= 16, M >= 2");
    }
    Ok((n, m))
}

/// Parses a simple method name used for low-rank factors and pruned remainders.
pub fn parse_simple(s: &str) -> Result<Method> {
    let s = s.trim();
    Ok(match s {
        "f32" => Method::F32,
        "f16" => Method::F16,
        "int8" => Method::Int8,
        _ if s.starts_with("int4") => Method::Int4 {
            group: s
                .strip_prefix("int4")
                .and_then(|g| g.trim_start_matches([':', 'g']).parse().ok())
                .unwrap_or(32),
        },
        _ if s.starts_with("codebook") => Method::Codebook {
            bits: s
                .trim_start_matches("codebook")
                .trim_start_matches(':')
                .parse()
                .map_err(|_| anyhow!("codebook bits in {s:?}"))?,
            rows_per_table: 1,
            scale_group: 0,
        },
        _ => bail!("unknown encoding {s:?} (f32, f16, int8, int4:G, codebookB)"),
    })
}

/// Parses a TOML recipe.
pub fn parse_toml(text: &str) -> Result<Recipe> {
    let f: RecipeFile = toml::from_str(text).context("recipe file")?;
    let mut r = Recipe::default();
    if let Some(v) = f.int8_activations {
        r.int8_activations = v;
    }
    if let Some(s) = f.seed {
        r.seed = s;
    }
    r.keep_ends = match f.keep_ends.as_deref() {
        None | Some("int8") => KeepEnds::Int8,
        Some("f32") => KeepEnds::F32,
        Some("same") => KeepEnds::Same,
        Some(o) => bail!("keep_ends must be int8, f32 or same, not {o:?}"),
    };
    for (i, rf) in f.rule.into_iter().enumerate() {
        let mut methods = Vec::new();
        if rf.f32 == Some(true) {
            methods.push(Method::F32);
        }
        if rf.f16 == Some(true) {
            methods.push(Method::F16);
        }
        if rf.int8 == Some(true) {
            methods.push(Method::Int8);
        }
        if let Some(g) = rf.int4 {
            methods.push(Method::Int4 { group: g });
        }
        if let Some(b) = rf.codebook {
            let rows = rf
                .granularity
                .as_deref()
                .map(parse_granularity)
                .transpose()?
                .unwrap_or(1);
            methods.push(Method::Codebook {
                bits: b,
                rows_per_table: rows,
                scale_group: rf.scale_group.unwrap_or(0),
            });
        }
        if let Some(g) = rf.ternary {
            methods.push(Method::Ternary { group: g });
        }
        if let Some(g) = rf.binary {
            methods.push(Method::Binary { group: g });
        }
        if let Some(s) = &rf.sparse {
            let (keep, m) = parse_nm(s)?;
            methods.push(Method::Sparse { keep, m });
        }
        if let Some(c) = rf.channels {
            methods.push(Method::Channels { fraction: c });
        }
        if let Some(s) = &rf.lowrank {
            methods.push(Method::LowRank {
                rank: parse_rank(s)?,
                aware: rf
                    .lowrank_kind
                    .as_deref()
                    .map(parse_lowrank_kind)
                    .transpose()?
                    .unwrap_or(LowRankKind::Svd),
                factors: Box::new(
                    rf.lowrank_factors
                        .as_deref()
                        .map(parse_simple)
                        .transpose()?
                        .unwrap_or(Method::F32),
                ),
            });
        }
        let method = match (methods.len(), rf.prune) {
            (0, Some(p)) => Method::Unstructured {
                fraction: p,
                then: Box::new(Method::F32),
            },
            (1, Some(p)) => Method::Unstructured {
                fraction: p,
                then: Box::new(methods.remove(0)),
            },
            (1, None) => methods.remove(0),
            (0, None) => bail!("rule {} ({}): no encoding given", i + 1, rf.pattern),
            _ => bail!(
                "rule {} ({}): give one encoding per rule",
                i + 1,
                rf.pattern
            ),
        };
        r.rules.push(Rule {
            pattern: rf.pattern,
            method,
            gptq: rf.gptq.unwrap_or(false),
        });
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob("*", "anything"));
        assert!(glob(
            "*attention*",
            "/m/encoder/layer.0/attention/self/query/MatMul"
        ));
        assert!(!glob("*attention", "/m/attention/x"));
        assert!(glob("Conv@?", "Conv@3"));
        assert!(!glob("Conv@?", "Conv@31"));
    }

    #[test]
    fn toml_rules() {
        let r = parse_toml(
            r#"
            keep_ends = "f32"
            [[rule]]
            match = "*query*"
            codebook = 3
            granularity = "rows:8"
            [[rule]]
            match = "*"
            int4 = 64
            gptq = true
            [[rule]]
            match = "x"
            lowrank = "params=0.5"
            lowrank_kind = "svdllm"
            lowrank_factors = "int8"
            "#,
        )
        .unwrap();
        assert_eq!(r.keep_ends, KeepEnds::F32);
        assert_eq!(
            r.rules[0].method,
            Method::Codebook {
                bits: 3,
                rows_per_table: 8,
                scale_group: 0
            }
        );
        assert!(r.rules[1].gptq);
        assert!(
            matches!(&r.rules[2].method, Method::LowRank { rank: RankChoice::Params(p), aware: LowRankKind::SvdLlm, factors } if *p == 0.5 && **factors == Method::Int8)
        );
        assert!(parse_toml("[[rule]]\nmatch = \"*\"\n").is_err());
        assert!(parse_toml("[[rule]]\nmatch = \"*\"\nint8 = true\nint4 = 32\n").is_err());
        assert!(parse_toml("bogus = 1").is_err());
    }
}

//! `edgetune compress`: a model (ONNX or `.etm`) in, a smaller `.etm` out.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;

use crate::compress::recipe::{self, KeepEnds, LowRankKind, Method, Recipe, Rule};
use crate::compress::{calib, compress, LayerReport};
use crate::import::{import, InputSpec, LowerOptions};
use crate::ir::Graph;
use crate::model_file::AlignedBytes;
use crate::npy;
use crate::pack::pack;
use crate::runner::Ours;

/// `edgetune compress`.
#[derive(Args, Debug, Clone, Default)]
pub struct CompressArgs {
    /// The model: ONNX (imported first) or `.etm`.
    pub model: PathBuf,
    /// Output `.etm` file.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Concrete input shape for ONNX models, `name=1x3x224x224`.
    #[arg(long = "input", value_name = "NAME=SHAPE")]
    pub inputs: Vec<InputSpec>,
    /// Int8 weights, one scale per output channel.
    #[arg(long)]
    pub int8: bool,
    /// Int4 weights with an f16 scale per GROUP inputs (32, 64 or 128).
    #[arg(long, value_name = "GROUP", num_args = 0..=1, default_missing_value = "32")]
    pub int4: Option<usize>,
    /// Codebook (palettization) with 2^BITS f16 centroids per table.
    #[arg(long, value_name = "BITS")]
    pub codebook: Option<u32>,
    /// Which rows share a codebook table: tensor, row, or rows:G.
    #[arg(long, value_name = "GRANULARITY", default_value = "row")]
    pub group: String,
    /// Codebooks: an f16 scale per this many inputs (a multiple of 32), so shared tables hold
    /// the shape of the weights and scales their local size.
    #[arg(long, value_name = "INPUTS")]
    pub scale_group: Option<usize>,
    /// Ternary weights {-1, 0, +1} with a scale per GROUP inputs.
    #[arg(long, value_name = "GROUP", num_args = 0..=1, default_missing_value = "64")]
    pub ternary: Option<usize>,
    /// Binary weights (signs) with a scale per GROUP inputs.
    #[arg(long, value_name = "GROUP", num_args = 0..=1, default_missing_value = "64")]
    pub binary: Option<usize>,
    /// f16 weights.
    #[arg(long)]
    pub f16: bool,
    /// Low-rank factorisation: energy=0.95, params=0.5 or rank=R (factors get the encoding above).
    #[arg(long, value_name = "CHOICE")]
    pub lowrank: Option<String>,
    /// Low-rank variant: svd, asvd (activation-aware), svdllm (whitened; needs --calib).
    #[arg(long, default_value = "svd")]
    pub lowrank_kind: String,
    /// Prune this fraction of weights (with --pattern).
    #[arg(long, value_name = "FRACTION")]
    pub prune: Option<f64>,
    /// Pruning pattern: N:M (e.g. 2:4), unstructured, or channels.
    #[arg(long, default_value = "2:4")]
    pub pattern: String,
    /// Error-compensated quantization (GPTQ) using the calibration data.
    #[arg(long)]
    pub gptq: bool,
    /// Per-layer rules (TOML); see `recipe` in the docs. Replaces the encoding flags.
    #[arg(long)]
    pub recipe: Option<PathBuf>,
    /// Calibration data for an input, `name=file.npy` (leading axis = samples).
    #[arg(long = "calib", value_name = "NAME=FILE")]
    pub calib: Vec<String>,
    /// Quantize activations to int8 (per block of 32) for block-quantized weights: integer dot
    /// products, faster at batch 1, slightly less accurate. Default: f32 activations.
    #[arg(long)]
    pub int8_activations: bool,
    /// First and last layer: int8 (default, or the recipe file's `keep_ends`), f32, or same (no
    /// exception).
    #[arg(long)]
    pub keep_ends: Option<String>,
    /// Seed for k-means.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// What `compress` reports.
#[derive(Debug, Serialize)]
pub struct CompressReport {
    /// Layers and what they got.
    pub layers: Vec<LayerReport>,
    /// Weight bytes before (as f32).
    pub weights_f32_bytes: usize,
    /// Weight bytes after.
    pub weights_bytes: usize,
    /// Output file bytes.
    pub file_bytes: usize,
    /// Calibration samples used.
    pub calibration_samples: usize,
}

/// The recipe the flags (or the recipe file) describe.
pub fn recipe_from_args(a: &CompressArgs) -> Result<Recipe> {
    let mut r = match &a.recipe {
        Some(p) => recipe::parse_toml(
            &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        )?,
        None => Recipe::default(),
    };
    let mut primary = Vec::new();
    if a.int8 {
        primary.push(Method::Int8);
    }
    if let Some(g) = a.int4 {
        primary.push(Method::Int4 { group: g });
    }
    if let Some(b) = a.codebook {
        if !(1..=8).contains(&b) {
            bail!("--codebook {b}: bits must be 1 to 8");
        }
        if let Some(g) = a.scale_group {
            if g == 0 || g % 32 != 0 {
                bail!("--scale-group {g}: must be a positive multiple of 32");
            }
        }
        primary.push(Method::Codebook {
            bits: b,
            rows_per_table: recipe::parse_granularity(&a.group)?,
            scale_group: a.scale_group.unwrap_or(0),
        });
    }
    if let Some(g) = a.ternary {
        primary.push(Method::Ternary { group: g });
    }
    if let Some(g) = a.binary {
        primary.push(Method::Binary { group: g });
    }
    if a.f16 {
        primary.push(Method::F16);
    }
    if primary.len() > 1 {
        bail!("give one encoding (--int8, --int4, --codebook, --ternary, --binary, --f16)");
    }
    for g in [a.int4, a.ternary, a.binary].into_iter().flatten() {
        if g == 0 || g % 32 != 0 {
            bail!("group size {g}: must be a multiple of 32 (32, 64, 128)");
        }
    }
    let mut method = primary.pop();
    if let Some(f) = a.prune {
        if !(0.0..1.0).contains(&f) {
            bail!("--prune {f}: the fraction must be in [0, 1)");
        }
        let then = Box::new(method.take().unwrap_or(Method::F32));
        method = Some(match a.pattern.as_str() {
            "unstructured" => Method::Unstructured { fraction: f, then },
            "channels" => {
                if *then != Method::F32 {
                    bail!(
                        "--pattern channels removes channels; compress the result in a second run"
                    );
                }
                Method::Channels { fraction: f }
            }
            p => {
                let (keep, m) = recipe::parse_nm(p)?;
                let implied = 1.0 - keep as f64 / m as f64;
                if (implied - f).abs() > 1e-6 {
                    bail!("--prune {f} with --pattern {p}: {p} prunes exactly {implied}");
                }
                if *then != Method::F32 {
                    bail!(
                        "N:M sparse weights are stored as f16 values; drop the other encoding flag"
                    );
                }
                Method::Sparse { keep, m }
            }
        });
    }
    if let Some(l) = &a.lowrank {
        method = Some(Method::LowRank {
            rank: recipe::parse_rank(l)?,
            aware: recipe::parse_lowrank_kind(&a.lowrank_kind)?,
            factors: Box::new(method.take().unwrap_or(Method::F32)),
        });
    }
    if let Some(m) = method {
        if a.recipe.is_some() {
            bail!("--recipe and encoding flags both given: put the flags' rule into the recipe");
        }
        r.rules.push(Rule {
            pattern: "*".into(),
            method: m,
            gptq: a.gptq,
        });
    } else if a.gptq {
        r.rules.iter_mut().for_each(|rule| rule.gptq = true);
    }
    if r.rules.is_empty() {
        bail!("nothing to do: give an encoding (e.g. --codebook 4) or --recipe");
    }
    if a.int8_activations {
        r.int8_activations = true;
    }
    // The flag overrides the recipe file, which overrides the default (int8).
    r.keep_ends = match a.keep_ends.as_deref() {
        None => r.keep_ends,
        Some("int8") => KeepEnds::Int8,
        Some("f32") => KeepEnds::F32,
        Some("same") => KeepEnds::Same,
        Some(o) => bail!("--keep-ends {o}: int8, f32 or same"),
    };
    r.seed = a.seed;
    Ok(r)
}

/// Loads a model as a graph: ONNX through the importer, `.etm` by lifting it back.
pub fn load_graph(path: &Path, inputs: &[InputSpec]) -> Result<Graph> {
    if path.extension().is_some_and(|e| e == "etm") {
        let ours = Ours::load(path)?;
        return Graph::from_model(&ours.model());
    }
    import(path, inputs, LowerOptions::default())
}

/// Whether a recipe needs Gram statistics for a layer (GPTQ or whitened low rank).
fn wants_gram(r: &Recipe) -> bool {
    r.rules.iter().any(|rule| {
        rule.gptq
            || matches!(
                &rule.method,
                Method::LowRank {
                    aware: LowRankKind::SvdLlm | LowRankKind::Asvd,
                    ..
                }
            )
    })
}

/// Compresses `g` by `recipe` with optional calibration data (run on `calib_graph`, the same
/// model possibly imported at the calibration data's shape); returns the packed bytes and report.
pub fn run_compress(
    mut g: Graph,
    recipe: &Recipe,
    calib_data: Option<(&Graph, &[npy::Array])>,
    progress: bool,
) -> Result<(Vec<u8>, CompressReport)> {
    let cal = match calib_data {
        Some((cg, d)) => {
            let gram = wants_gram(recipe);
            Some(calib::calibrate(cg, d, |_, k| gram && k <= 4096)?)
        }
        None => None,
    };
    if wants_gram(recipe) && cal.is_none() {
        bail!(
            "GPTQ and activation-aware low rank need calibration data: give --calib name=file.npy"
        );
    }
    let layers = compress(&mut g, recipe, cal.as_ref(), progress)?;
    let (bytes, _) = pack(&g)?;
    let report = CompressReport {
        weights_f32_bytes: layers.iter().map(|l| l.f32_bytes).sum(),
        weights_bytes: layers.iter().map(|l| l.bytes).sum(),
        file_bytes: bytes.len(),
        calibration_samples: cal.as_ref().map_or(0, |c| c.samples),
        layers,
    };
    Ok((bytes, report))
}

/// The calibration arrays (matched to inputs by name, like `eval --data`) and the graph to run
/// them through: the model itself, or — for an ONNX model whose calibration samples have another
/// shape (e.g. shorter sequences without padding) — the model imported at that shape.
fn calibration_graph(a: &CompressArgs, g: &Graph) -> Result<(Graph, Vec<npy::Array>)> {
    let (b, _) = pack(g)?;
    let ours = Ours::from_bytes(AlignedBytes::from(&b[..]))?;
    let data = super::load_data(&ours, &a.calib)?;
    let same = ours
        .inputs()
        .iter()
        .zip(&data)
        .all(|(i, d)| i.shape[1..] == d.shape[1..]);
    if same {
        return Ok((g.clone(), data));
    }
    if a.model.extension().is_some_and(|e| e == "etm") {
        bail!("calibration data shape differs from the model's inputs; give data of the model's shape, or compress the ONNX file");
    }
    let specs: Vec<InputSpec> = ours
        .inputs()
        .iter()
        .zip(&data)
        .map(|(i, d)| InputSpec {
            name: i.name.clone(),
            dims: [vec![d.shape[0].min(64)], d.shape[1..].to_vec()].concat(),
        })
        .collect();
    Ok((import(&a.model, &specs, LowerOptions::default())?, data))
}

/// Runs the command.
pub fn run(a: &CompressArgs) -> Result<()> {
    let recipe = recipe_from_args(a)?;
    let g = load_graph(&a.model, &a.inputs)?;
    let calib = if a.calib.is_empty() {
        None
    } else {
        Some(calibration_graph(a, &g)?)
    };
    let (bytes, report) = run_compress(
        g,
        &recipe,
        calib.as_ref().map(|(cg, d)| (cg, &d[..])),
        !a.quiet && !a.json,
    )?;
    std::fs::write(&a.output, &bytes).with_context(|| format!("writing {}", a.output.display()))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "{:<48} {:>11} {:<26} {:>10} {:>9}",
        "layer", "shape", "encoding", "bytes", "rel err"
    );
    for l in &report.layers {
        println!(
            "{:<48} {:>11} {:<26} {:>10} {:>9.4}{}",
            truncate(&l.name, 48),
            format!("{}x{}", l.shape.0, l.shape.1),
            truncate(&l.method, 26),
            l.bytes,
            l.rel_error,
            l.note
                .as_ref()
                .map(|n| format!("  ({n})"))
                .unwrap_or_default()
        );
    }
    println!(
        "weights {} -> {} bytes ({:.2}x smaller); file {} bytes; {} calibration samples used",
        report.weights_f32_bytes,
        report.weights_bytes,
        report.weights_f32_bytes as f64 / report.weights_bytes.max(1) as f64,
        report.file_bytes,
        report.calibration_samples
    );
    println!("wrote {}", a.output.display());
    Ok(())
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let tail: String = s
            .chars()
            .rev()
            .take(n - 1)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        format!("…{tail}")
    }
}

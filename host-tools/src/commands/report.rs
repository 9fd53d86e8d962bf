//! `edgetune report`: sweep compression recipes over a model and data, tabulate size against
//! quality, and plot the Pareto front so a recipe can be picked by looking.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;

use super::compress::{load_graph, recipe_from_args, run_compress, CompressArgs};
use crate::commands::eval::{collect, evaluate};
use crate::import::InputSpec;
use crate::metrics;
use crate::model_file::AlignedBytes;
use crate::npy;
use crate::pack::pack;
use crate::plot::{pareto, pareto_front, Point};
use crate::runner::{batches, Ours};

/// `edgetune report`.
#[derive(Args, Debug)]
pub struct ReportArgs {
    /// The model (ONNX or `.etm`).
    pub model: PathBuf,
    /// Concrete input shape for ONNX models, `name=1x3x224x224`.
    #[arg(long = "input", value_name = "NAME=SHAPE")]
    pub inputs: Vec<InputSpec>,
    /// Evaluation data for an input, `name=file.npy` (leading axis = samples).
    #[arg(long = "data", value_name = "NAME=FILE")]
    pub data: Vec<String>,
    /// Labels for top-1 accuracy; without them quality is the cosine of output 0 to the f32 model's.
    #[arg(long)]
    pub labels: Option<PathBuf>,
    /// Calibration data for an input, `name=file.npy` (used by every recipe).
    #[arg(long = "calib", value_name = "NAME=FILE")]
    pub calib: Vec<String>,
    /// Recipes: f32, f16, int8, int4[gG], codebookB[/tensor|/rows:G], ternary, binary, N:M,
    /// lowrankF (parameter fraction); suffix +gptq for error compensation.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "f32,f16,int8,int4,codebook4,codebook3,codebook2,ternary,binary,2:4,lowrank0.5"
    )]
    pub recipes: Vec<String>,
    /// Extra recipes from TOML files (named by file stem).
    #[arg(long = "recipe-file")]
    pub recipe_files: Vec<PathBuf>,
    /// Output folder for report.md, report.json and pareto.svg.
    #[arg(short, long, default_value = "report")]
    pub out: PathBuf,
    /// Print the rows as JSON.
    #[arg(long)]
    pub json: bool,
}

/// One recipe's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Recipe name.
    pub recipe: String,
    /// `.etm` bytes.
    pub file_bytes: usize,
    /// f32 `.etm` bytes / this.
    pub smaller: f64,
    /// Bits per compressed weight (tables and scales included).
    pub bits_per_weight: f64,
    /// Accuracy, or mean cosine to the f32 model.
    pub quality: f64,
    /// Worst per-sample cosine (when no labels).
    pub quality_min: Option<f64>,
}

/// Compress arguments for a recipe's short name.
pub fn short_recipe(name: &str, base: &CompressArgs) -> Result<CompressArgs> {
    let mut a = base.clone();
    let (body, gptq) = match name.strip_suffix("+gptq") {
        Some(b) => (b, true),
        None => (name, false),
    };
    a.gptq = gptq;
    match body {
        "int8" => a.int8 = true,
        "f16" => a.f16 = true,
        "ternary" => a.ternary = Some(64),
        "binary" => a.binary = Some(64),
        _ if body.starts_with("int4") => {
            a.int4 = Some(
                body.trim_start_matches("int4")
                    .trim_start_matches('g')
                    .parse()
                    .unwrap_or(32),
            )
        }
        _ if body.starts_with("codebook") => {
            let rest = body.trim_start_matches("codebook");
            let (bits, gran) = rest.split_once('/').unwrap_or((rest, "row"));
            a.codebook = Some(
                bits.parse()
                    .with_context(|| format!("recipe {name}: codebook bits"))?,
            );
            a.group = gran.to_string();
        }
        _ if body.starts_with("lowrank") => {
            a.lowrank = Some(format!("params={}", body.trim_start_matches("lowrank")))
        }
        _ if body.contains(':') => {
            let (n, m) = crate::compress::recipe::parse_nm(body)?;
            a.prune = Some(1.0 - n as f64 / m as f64);
            a.pattern = body.to_string();
        }
        _ => bail!("unknown recipe {name:?}"),
    }
    Ok(a)
}

/// Runs the command.
pub fn run(a: &ReportArgs) -> Result<()> {
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let graph = load_graph(&a.model, &a.inputs)?;
    let (f32_bytes, _) = pack(&graph)?;
    let mut base = Ours::from_bytes(AlignedBytes::from(&f32_bytes[..]))?;
    let data = super::load_data(&base, &a.data)?;
    let labels = a
        .labels
        .as_ref()
        .map(|p| npy::read(p).map(|l| l.to_i64()))
        .transpose()?;
    let calib = if a.calib.is_empty() {
        None
    } else {
        Some(super::load_data(&base, &a.calib)?)
    };
    // Reference outputs of the f32 model, for cosine quality without labels.
    let (bs, n) = batches(&base.inputs(), &data)?;
    let reference = collect(&bs, n, |b| base.run(b))?;
    let base_args = CompressArgs {
        model: a.model.clone(),
        quiet: true,
        group: "row".into(),
        pattern: "2:4".into(),
        lowrank_kind: "svd".into(),
        ..Default::default()
    };
    let mut named: Vec<(String, Option<crate::compress::Recipe>)> = Vec::new();
    for r in &a.recipes {
        if r == "f32" {
            named.push((r.clone(), None));
        } else {
            named.push((
                r.clone(),
                Some(recipe_from_args(&short_recipe(r, &base_args)?)?),
            ));
        }
    }
    for f in &a.recipe_files {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        let name = f
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default();
        named.push((name, Some(crate::compress::recipe::parse_toml(&text)?)));
    }
    let bar = indicatif::ProgressBar::new(named.len() as u64);
    let mut rows = Vec::new();
    for (name, recipe) in named {
        bar.set_message(name.clone());
        let (bytes, bpw) = match &recipe {
            None => (f32_bytes.clone(), 32.0),
            Some(r) => {
                let (b, rep) = run_compress(
                    graph.clone(),
                    r,
                    calib.as_deref().map(|d| (&graph, d)),
                    false,
                )
                .with_context(|| format!("recipe {name}"))?;
                let weights: usize = rep.layers.iter().map(|l| l.shape.0 * l.shape.1).sum();
                (b, 8.0 * rep.weights_bytes as f64 / weights.max(1) as f64)
            }
        };
        let mut ours = Ours::from_bytes(AlignedBytes::from(&bytes[..]))?;
        let (quality, quality_min) = match &labels {
            Some(l) => (
                evaluate(&mut ours, None, &data, Some(l), None)?
                    .accuracy
                    .unwrap_or(0.0),
                None,
            ),
            None => {
                let out = collect(&bs, n, |b| ours.run(b))?;
                let cos = metrics::row_cosines(&out[0].1, &reference[0].1, reference[0].0);
                let mean = cos.iter().map(|&c| c as f64).sum::<f64>() / cos.len().max(1) as f64;
                (
                    mean,
                    Some(cos.iter().fold(f64::INFINITY, |m, &c| m.min(c as f64))),
                )
            }
        };
        rows.push(Row {
            recipe: name,
            file_bytes: bytes.len(),
            smaller: f32_bytes.len() as f64 / bytes.len() as f64,
            bits_per_weight: bpw,
            quality,
            quality_min,
        });
        bar.inc(1);
    }
    bar.finish_and_clear();
    let metric = if labels.is_some() {
        "top-1 accuracy"
    } else {
        "cosine to f32 (mean)"
    };
    let points: Vec<Point> = rows
        .iter()
        .map(|r| Point {
            label: r.recipe.clone(),
            x: r.file_bytes as f64 / 1024.0,
            y: r.quality,
        })
        .collect();
    let front = pareto_front(&points);
    let mut md = format!("# Compression report: {}\n\n| recipe | file bytes | smaller | bits/weight | {metric} | worst | Pareto |\n|---|---|---|---|---|---|---|\n", a.model.display());
    for (i, r) in rows.iter().enumerate() {
        md += &format!(
            "| {} | {} | {:.2}x | {:.2} | {:.4} | {} | {} |\n",
            r.recipe,
            r.file_bytes,
            r.smaller,
            r.bits_per_weight,
            r.quality,
            r.quality_min.map(|q| format!("{q:.4}")).unwrap_or_default(),
            if front.contains(&i) { "yes" } else { "" }
        );
    }
    std::fs::write(a.out.join("report.md"), &md)?;
    std::fs::write(
        a.out.join("report.json"),
        serde_json::to_string_pretty(&rows)?,
    )?;
    let plot = a.out.join("pareto.svg");
    if let Err(e) = pareto(
        &plot,
        "size vs quality",
        "model file (KiB)",
        metric,
        &points,
    ) {
        eprintln!("warning: {e:#} (the table is written)");
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{md}");
        println!(
            "\nwrote {}/report.md, report.json, pareto.svg",
            a.out.display()
        );
    }
    Ok(())
}

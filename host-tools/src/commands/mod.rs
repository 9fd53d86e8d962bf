//! The `edgetune` subcommands.

pub mod bench;
pub mod compress;
pub mod eval;
pub mod finetune;
pub mod flash;
pub mod inspect;
pub mod report;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use edgetune_runtime::kernels::Kernels;
use serde::Serialize;

use crate::import::{import, InputSpec, LowerOptions};
use crate::model_file::AlignedBytes;
use crate::npy::{self, Array, ArrayData};
use crate::pack::pack;
use crate::runner::{Ours, Reference};

/// Compress trained models, run them in fixed memory on ARM boards, keep fine-tuning them there.
#[derive(Parser, Debug)]
#[command(name = "edgetune", version, about, propagate_version = true)]
pub struct Cli {
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Import an ONNX model into a `.etm` file (f32 weights, planned arena).
    Import(ImportArgs),
    /// Show what a `.etm` file holds: ops, tensors, bytes per encoding, arena, compute.
    Inspect(InspectArgs),
    /// Run a `.etm` model on `.npy` inputs and write its outputs.
    Run(RunArgs),
    /// Compare a `.etm` model with tract on the source ONNX, with labels, or with saved outputs.
    Eval(EvalArgs),
    /// Time our runtime against tract on the same model, alternating in one process.
    Bench(BenchArgs),
    /// Compress a model's weights (codebook, int8/int4, ternary/binary, low rank, pruning).
    Compress(compress::CompressArgs),
    /// Fine-tune an adapter on device-style: zeroth-order (forward passes only).
    Finetune(finetune::FinetuneArgs),
    /// Rebuild a fine-tuned adapter from its run log alone.
    Replay(finetune::ReplayArgs),
    /// Build firmware around a model and data, check it fits the board, run it (QEMU), and
    /// check its accuracy and fine-tuned adapter against the host.
    Flash(flash::FlashArgs),
    /// Sweep compression recipes over a model and data: size-vs-quality table and Pareto plot.
    Report(report::ReportArgs),
    /// Import the bundled digits CNN, run it on the bundled test set, print accuracy and sizes.
    Demo(DemoArgs),
}

/// `edgetune import`.
#[derive(Args, Debug)]
pub struct ImportArgs {
    /// The ONNX model.
    pub model: PathBuf,
    /// Output `.etm` file.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Concrete shape of an input, `name=1x3x224x224` (required for symbolic dimensions).
    #[arg(long = "input", value_name = "NAME=SHAPE")]
    pub inputs: Vec<InputSpec>,
    /// Bytes of arena one convolution's im2col tile may use (smaller for microcontrollers).
    #[arg(long, default_value_t = 64 * 1024)]
    pub im2col_bytes: usize,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `edgetune inspect`.
#[derive(Args, Debug)]
pub struct InspectArgs {
    /// The `.etm` model.
    pub model: PathBuf,
    /// List every op.
    #[arg(long)]
    pub ops: bool,
    /// List every weight: shape, encoding and its parameters, bytes, bits per weight.
    #[arg(long)]
    pub weights: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `edgetune run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// The `.etm` model.
    pub model: PathBuf,
    /// An input, `name=file.npy` (leading axis = samples; batches are run as the model's batch size allows).
    #[arg(long = "input", value_name = "NAME=FILE")]
    pub inputs: Vec<String>,
    /// Output `.npy` file for output 0 (further outputs go to `<stem>.<i>.npy`).
    #[arg(short, long)]
    pub output: PathBuf,
    /// Adapter (`.eta`) applied on top of the model.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Use the scalar reference kernels.
    #[arg(long)]
    pub reference_kernels: bool,
    /// Threads for large kernels (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

/// `edgetune eval`.
#[derive(Args, Debug)]
pub struct EvalArgs {
    /// The `.etm` model.
    pub model: PathBuf,
    /// The source ONNX model, run by tract on the same inputs.
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// Data for an input, `name=file.npy` (leading axis = samples); without it, one batch of
    /// deterministic pseudo-random inputs.
    #[arg(long = "data", value_name = "NAME=FILE")]
    pub data: Vec<String>,
    /// Class labels (`.npy` of integers) for top-1 accuracy of output 0.
    #[arg(long)]
    pub labels: Option<PathBuf>,
    /// Saved outputs (`.npy`) to compare output 0 with (e.g. the training framework's).
    #[arg(long)]
    pub expected: Option<PathBuf>,
    /// Adapter (`.eta`) applied on top of the model.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Use the scalar reference kernels.
    #[arg(long)]
    pub reference_kernels: bool,
    /// Threads for large kernels (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `edgetune bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// The `.etm` model.
    pub model: PathBuf,
    /// The source ONNX model, timed with tract in the same process.
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// Data for an input, `name=file.npy` (first batch is used); random otherwise.
    #[arg(long = "data", value_name = "NAME=FILE")]
    pub data: Vec<String>,
    /// Adapter (`.eta`) applied on top of the model.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Threads for both runtimes (comma-separated list to sweep, e.g. `1,2`).
    #[arg(long, default_value = "1", value_delimiter = ',')]
    pub threads: Vec<usize>,
    /// Timed runs of each runtime (at least).
    #[arg(long, default_value_t = 10)]
    pub runs: usize,
    /// Keep alternating until this many seconds have passed.
    #[arg(long, default_value_t = 2.0)]
    pub seconds: f64,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `edgetune demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

fn print_json<T: Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Parses `name=file.npy` arguments in the model's input order (a lone file may omit the name).
pub fn load_data(ours: &Ours, args: &[String]) -> Result<Vec<Array>> {
    let inputs = ours.inputs();
    let mut found: Vec<Option<Array>> = vec![None; inputs.len()];
    for a in args {
        let (name, path) = match a.split_once('=') {
            Some((n, p)) => (n.to_string(), p.to_string()),
            None if inputs.len() == 1 => (inputs[0].name.clone(), a.clone()),
            None => bail!(
                "give data as name=file.npy (inputs: {})",
                inputs
                    .iter()
                    .map(|i| i.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let i = inputs
            .iter()
            .position(|x| x.name == name)
            .ok_or_else(|| anyhow!("the model has no input {name}"))?;
        found[i] = Some(npy::read(Path::new(&path))?);
    }
    found
        .into_iter()
        .zip(&inputs)
        .map(|(a, i)| a.ok_or_else(|| anyhow!("no data for input {}", i.name)))
        .collect()
}

/// The kernels a command asked for.
fn kernels(reference: bool, threads: Option<usize>) -> Kernels {
    let k = if reference {
        Kernels::reference()
    } else {
        Kernels::best()
    };
    k.with_threads(
        threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
    )
}

/// Runs a command.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Import(a) => {
            let g = import(
                &a.model,
                &a.inputs,
                LowerOptions {
                    im2col_bytes: a.im2col_bytes,
                },
            )?;
            let (bytes, plan) = pack(&g)?;
            std::fs::write(&a.output, &bytes)
                .with_context(|| format!("writing {}", a.output.display()))?;
            let ours = Ours::from_bytes(AlignedBytes::from(&bytes[..]))?;
            let r = inspect::report(&ours.model(), false, false);
            if a.json {
                print_json(&r)?;
            } else {
                println!(
                    "wrote {} ({} ops, arena {} bytes, lower bound {})",
                    a.output.display(),
                    r.ops.values().sum::<usize>(),
                    plan.arena_bytes,
                    plan.lower_bound
                );
                inspect::print(&r);
            }
        }
        Command::Inspect(a) => {
            let ours = Ours::load(&a.model)?;
            let r = inspect::report(&ours.model(), a.ops, a.weights);
            if a.json {
                print_json(&r)?;
            } else {
                inspect::print(&r);
            }
        }
        Command::Run(a) => {
            let mut ours = Ours::load(&a.model)?;
            ours.kernels = kernels(a.reference_kernels, a.threads);
            if let Some(p) = &a.adapter {
                ours.load_adapter(p)?;
            }
            let data = load_data(&ours, &a.inputs)?;
            let (batches, n) = crate::runner::batches(&ours.inputs(), &data)?;
            let outs = eval::collect(&batches, n, |b| ours.run(b))?;
            let model_outs = ours.run(&batches[0])?;
            for (i, ((_, values), shape)) in outs
                .iter()
                .zip(model_outs.iter().map(|a| &a.shape))
                .enumerate()
            {
                let mut s = shape.clone();
                s[0] = n;
                let path = if i == 0 {
                    a.output.clone()
                } else {
                    a.output.with_extension(format!("{i}.npy"))
                };
                npy::write_f32(&path, &s, values)?;
                println!("wrote {} {:?}", path.display(), s);
            }
        }
        Command::Eval(a) => {
            let mut ours = Ours::load(&a.model)?;
            ours.kernels = kernels(a.reference_kernels, a.threads);
            if let Some(p) = &a.adapter {
                ours.load_adapter(p)?;
            }
            // Without data, one batch of deterministic pseudo-random inputs checks agreement.
            let data = if a.data.is_empty() {
                random_inputs(&ours)
            } else {
                load_data(&ours, &a.data)?
            };
            let reference = a
                .reference
                .as_ref()
                .map(|p| Reference::load(p, &ours.inputs()))
                .transpose()?;
            let labels = a
                .labels
                .as_ref()
                .map(|p| npy::read(p).map(|l| l.to_i64()))
                .transpose()?;
            let expected = a.expected.as_ref().map(|p| npy::read(p)).transpose()?;
            let r = eval::evaluate(
                &mut ours,
                reference.as_ref(),
                &data,
                labels.as_deref(),
                expected.as_ref(),
            )?;
            if a.json {
                print_json(&r)?;
            } else {
                eval::print(&r);
            }
        }
        Command::Bench(a) => {
            let mut ours = Ours::load(&a.model)?;
            if let Some(p) = &a.adapter {
                ours.load_adapter(p)?;
            }
            let inputs = if a.data.is_empty() {
                random_inputs(&ours)
            } else {
                let data = load_data(&ours, &a.data)?;
                crate::runner::batches(&ours.inputs(), &data)?
                    .0
                    .swap_remove(0)
            };
            let reference = a
                .reference
                .as_ref()
                .map(|p| Reference::load(p, &ours.inputs()))
                .transpose()?;
            let mut reports = Vec::new();
            for &t in &a.threads {
                let r = bench::bench(
                    &mut ours,
                    reference.as_ref(),
                    &inputs,
                    t.max(1),
                    a.runs,
                    Duration::from_secs_f64(a.seconds),
                )?;
                if !a.json {
                    bench::print(&r);
                }
                reports.push(r);
            }
            if a.json {
                print_json(&reports)?;
            }
        }
        Command::Compress(a) => compress::run(&a)?,
        Command::Report(a) => report::run(&a)?,
        Command::Finetune(a) => finetune::run(&a)?,
        Command::Replay(a) => finetune::run_replay(&a)?,
        Command::Flash(a) => flash::run(&a)?,
        Command::Demo(a) => demo(a.json)?,
    }
    Ok(())
}

/// Deterministic inputs for timing: f32 in [0, 1), integers 1.
pub fn random_inputs(ours: &Ours) -> Vec<Array> {
    let mut state = 0x9e3779b97f4a7c15u64;
    ours.inputs()
        .iter()
        .map(|i| {
            let n: usize = i.shape.iter().product();
            let data = match i.dtype {
                edgetune_core::DType::F32 => ArrayData::F32(
                    (0..n)
                        .map(|_| {
                            state ^= state << 13;
                            state ^= state >> 7;
                            state ^= state << 17;
                            (state >> 40) as f32 / (1u64 << 24) as f32
                        })
                        .collect(),
                ),
                edgetune_core::DType::Bool => ArrayData::Bool(vec![1; n]),
                _ => ArrayData::I64(vec![1; n]),
            };
            Array {
                shape: i.shape.clone(),
                data,
            }
        })
        .collect()
}

const DEMO_CNN: &[u8] = include_bytes!("../../../tests/fixtures/digits/cnn.onnx");
const DEMO_X: &[u8] = include_bytes!("../../../tests/fixtures/digits/x_test.npy");
const DEMO_Y: &[u8] = include_bytes!("../../../tests/fixtures/digits/y_test.npy");

/// What `demo` reports.
#[derive(Debug, Serialize)]
pub struct DemoReport {
    /// Test samples.
    pub samples: usize,
    /// Top-1 accuracy of our runtime.
    pub accuracy: f64,
    /// Top-1 accuracy of tract on the ONNX file.
    pub tract_accuracy: f64,
    /// Largest logit difference to tract.
    pub max_abs_vs_tract: f32,
    /// ONNX file bytes.
    pub onnx_bytes: usize,
    /// `.etm` file bytes.
    pub model_bytes: usize,
    /// Arena bytes.
    pub arena_bytes: u64,
    /// Arena lower bound.
    pub arena_lower_bound: u64,
    /// Kernel used.
    pub kernel: String,
}

fn demo(json: bool) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("edgetune-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let onnx = dir.join("cnn.onnx");
    std::fs::write(&onnx, DEMO_CNN)?;
    let spec: InputSpec = "x=1x1x8x8".parse()?;
    let g = import(&onnx, &[spec], LowerOptions::default())?;
    let (bytes, plan) = pack(&g)?;
    let mut ours = Ours::from_bytes(AlignedBytes::from(&bytes[..]))?;
    let x = npy::parse(DEMO_X)?;
    let y = npy::parse(DEMO_Y)?.to_i64();
    let reference = Reference::load(&onnx, &ours.inputs())?;
    let r = eval::evaluate(&mut ours, Some(&reference), &[x], Some(&y), None)?;
    let _ = std::fs::remove_dir_all(&dir);
    let report = DemoReport {
        samples: r.samples,
        accuracy: r.accuracy.unwrap_or(0.0),
        tract_accuracy: r.reference_accuracy.unwrap_or(0.0),
        max_abs_vs_tract: r.vs_reference[0].max_abs,
        onnx_bytes: DEMO_CNN.len(),
        model_bytes: bytes.len(),
        arena_bytes: plan.arena_bytes,
        arena_lower_bound: plan.lower_bound,
        kernel: ours.kernels.gemm.name.to_string(),
    };
    if json {
        return print_json(&report);
    }
    println!("edgetune demo: digits CNN (UCI handwritten digits, 8x8) imported from ONNX and run by the edgetune runtime");
    println!("  test samples       {}", report.samples);
    println!(
        "  top-1 accuracy     {:.2}% (tract on the ONNX file: {:.2}%)",
        100.0 * report.accuracy,
        100.0 * report.tract_accuracy
    );
    println!("  max |logit - tract| {:.2e}", report.max_abs_vs_tract);
    println!(
        "  model file         {} bytes (.onnx: {} bytes)",
        report.model_bytes, report.onnx_bytes
    );
    println!(
        "  arena              {} bytes (lower bound {} bytes)",
        report.arena_bytes, report.arena_lower_bound
    );
    println!("  gemm kernel        {}", report.kernel);
    Ok(())
}

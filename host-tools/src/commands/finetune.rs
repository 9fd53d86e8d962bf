//! `edgetune finetune` and `edgetune replay`: zeroth-order fine-tuning of an adapter with the
//! runtime's own trainer, on the host exactly as on a board.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use edgetune_core::adapter::{Entry, EntryKind};
use edgetune_core::{Encoding, Model, Op};
use edgetune_runtime::adapter::{lora_workspace, Adapter};
use edgetune_runtime::kernels::Kernels;
use edgetune_runtime::train::{self, Perturbation, Rule, ZoConfig};
use edgetune_runtime::Session;
use serde::Serialize;

use crate::ir::Graph;
use crate::model_file::AlignedBytes;
use crate::npy::{self, Array, ArrayData};
use crate::pack::pack_with;
use crate::runner::HostAdapter;
use crate::zolog::{RunLog, StepEntry, ROLLBACK, SKIPPED, SNAPSHOT};

/// `edgetune finetune`.
#[derive(Args, Debug, Clone)]
pub struct FinetuneArgs {
    /// The `.etm` model (frozen; only the adapter is trained).
    pub model: PathBuf,
    /// Training inputs, `name=file.npy` (or just the file for one-input models); leading axis =
    /// samples.
    #[arg(long = "train", value_name = "NAME=FILE", required = true)]
    pub train: Vec<String>,
    /// Training labels (class indices) for the cross-entropy and error-rate losses.
    #[arg(long)]
    pub labels: Option<PathBuf>,
    /// Training targets for the MSE loss (e.g. a teacher's logits), shaped like output 0 per sample.
    #[arg(long)]
    pub targets: Option<PathBuf>,
    /// Validation inputs, `name=file.npy` (the best adapter on them is kept; divergence rolls back
    /// to it).
    #[arg(long = "val", value_name = "NAME=FILE")]
    pub val: Vec<String>,
    /// Validation labels.
    #[arg(long)]
    pub val_labels: Option<PathBuf>,
    /// Hold out this fraction of the training samples (the last ones) for validation instead of
    /// --val (keep the test set for the final evaluation).
    #[arg(long)]
    pub val_fraction: Option<f64>,
    /// What trains: any of bias, scales, centroids, norm, head, lora:r=R[:alpha=A].
    #[arg(long, default_value = "bias,scales")]
    pub trainable: String,
    /// Name pattern (glob) of the layers that get LoRA adapters.
    #[arg(long, default_value = "*")]
    pub lora_targets: String,
    /// Loss: ce (cross-entropy), mse (against --targets), error (error rate, not differentiable).
    #[arg(long, default_value = "ce")]
    pub loss: String,
    /// Steps.
    #[arg(long, default_value_t = 4000)]
    pub steps: u32,
    /// Samples per step (both losses see the same ones); a multiple of the model's batch, which
    /// is the default. Above it, each loss runs several forward passes and the frozen prefix is
    /// not cached.
    #[arg(long)]
    pub batch: Option<usize>,
    /// Learning rate.
    #[arg(long, default_value_t = 1e-2)]
    pub lr: f32,
    /// Perturbation size.
    #[arg(long, default_value_t = 1e-3)]
    pub eps: f32,
    /// Weight decay (LoRA values only).
    #[arg(long, default_value_t = 0.0)]
    pub wd: f32,
    /// Clip projected gradients to ±CLIP (bounds a step to lr·CLIP per unit perturbation).
    #[arg(long, default_value_t = 5.0)]
    pub clip: f32,
    /// Directions per step.
    #[arg(long, default_value_t = 1)]
    pub directions: u32,
    /// One-sided differences.
    #[arg(long)]
    pub one_sided: bool,
    /// ZO-SGD-sign.
    #[arg(long)]
    pub sign: bool,
    /// Rademacher (±1) instead of Gaussian perturbations.
    #[arg(long)]
    pub rademacher: bool,
    /// Base seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Validate every this many steps.
    #[arg(long, default_value_t = 250)]
    pub eval_every: u32,
    /// Train the same adapter with backprop instead (host only, a baseline for zeroth-order):
    /// `adam` or `sgd`, with --lr, --steps, --wd and --seed; cross-entropy on --labels.
    #[arg(long, value_name = "OPTIMIZER")]
    pub first_order: Option<String>,
    /// Run the whole model for every loss instead of caching the frozen prefix.
    #[arg(long)]
    pub no_prefix_cache: bool,
    /// Use the scalar reference kernels (bit-identical to a board).
    #[arg(long)]
    pub reference_kernels: bool,
    /// Output adapter (`.eta`).
    #[arg(short, long)]
    pub output: PathBuf,
    /// Run log for `edgetune replay` (default: the output with `.ztl`).
    #[arg(long)]
    pub log: Option<PathBuf>,
    /// Loss curve (SVG; default: the output with `.svg`).
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `edgetune replay`.
#[derive(Args, Debug, Clone)]
pub struct ReplayArgs {
    /// The `.etm` model the run trained on.
    pub model: PathBuf,
    /// The run log (`.ztl`).
    pub log: PathBuf,
    /// Output adapter (`.eta`).
    #[arg(short, long)]
    pub output: PathBuf,
}

/// Writes `path` through a temporary file, fsynced and renamed over it: a crash or a full disk
/// leaves the previous adapter (or log) whole, never a torn one.
pub fn write_durably(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let name = path
        .file_name()
        .ok_or_else(|| anyhow!("{}: not a file path", path.display()))?;
    let tmp = path.with_file_name(format!(".{}.tmp", name.to_string_lossy()));
    let written = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing {}", path.display()));
    }
    Ok(())
}

/// Rebuilds a run's adapter from its log alone: the initial adapter, then per step the
/// perturbation arithmetic (regenerated from the seed) and the logged update.
pub fn replay(model: &Model<'_>, log: &RunLog) -> Result<HostAdapter> {
    let view = edgetune_core::adapter::AdapterView::from_bytes(&log.initial, model)
        .map_err(|e| anyhow!("initial adapter: {e}"))?;
    let entries: Vec<Entry> = (0..view.len()).map(|i| view.entry(i)).collect();
    let mut values: Vec<f32> = (0..view.value_count()).map(|i| view.value(i)).collect();
    let decay: Vec<bool> = {
        let mut v = vec![false; values.len()];
        for e in entries
            .iter()
            .filter(|e| matches!(e.kind, EntryKind::LoraA | EntryKind::LoraB))
        {
            v[e.range()].iter_mut().for_each(|d| *d = true);
        }
        v
    };
    let mut best = values.clone();
    for s in &log.steps {
        train::replay_step(
            &mut values,
            &log.config,
            s.step,
            &s.g,
            s.flags & SKIPPED != 0,
            &|i| decay[i],
        );
        if s.flags & SNAPSHOT != 0 {
            best.copy_from_slice(&values);
        }
        if s.flags & ROLLBACK != 0 {
            values.copy_from_slice(&best);
        }
    }
    if log.keep_best {
        values = best;
    }
    Ok(HostAdapter::new(model, entries, values))
}

/// Runs `edgetune replay`.
pub fn run_replay(a: &ReplayArgs) -> Result<()> {
    let bytes = AlignedBytes::read(&a.model)?;
    let model =
        Model::from_bytes(bytes.as_bytes()).map_err(|e| anyhow!("{}: {e}", a.model.display()))?;
    let log = RunLog::parse(
        &std::fs::read(&a.log).with_context(|| format!("reading {}", a.log.display()))?,
    )?;
    let host = replay(&model, &log)?;
    write_durably(&a.output, &host.to_bytes(&model)?)?;
    println!(
        "replayed {} steps into {} values; wrote {}",
        log.steps.len(),
        host.values.len(),
        a.output.display()
    );
    Ok(())
}

/// What a run reports.
#[derive(Debug, Clone, Serialize)]
pub struct FinetuneReport {
    /// Trainable values.
    pub trainables: usize,
    /// Steps run.
    pub steps: u32,
    /// Forward passes (each of a whole minibatch).
    pub forwards: u64,
    /// Validation accuracy before training.
    pub val_accuracy_before: Option<f64>,
    /// Best validation accuracy (the saved adapter's).
    pub val_accuracy_best: Option<f64>,
    /// Seconds of training.
    pub seconds: f64,
    /// Steps per second.
    pub steps_per_second: f64,
    /// Mean training loss of the first and the last 50 steps (perturbed evaluations).
    pub train_loss: (f64, f64),
    /// Steps skipped for non-finite losses.
    pub skipped: u32,
    /// Rollbacks to the best values.
    pub rollbacks: u32,
    /// Bytes: activation arena (training plan).
    pub arena_bytes: u64,
    /// Bytes: the model's own (inference) arena, for comparison.
    pub inference_arena_bytes: u64,
    /// Samples per step.
    pub batch: usize,
    /// Bytes: trainable values.
    pub adapter_values_bytes: usize,
    /// Bytes: adapter workspace (LoRA intermediates).
    pub adapter_workspace_bytes: usize,
    /// First op the adapter touches (the cached prefix ends there).
    pub prefix_ops: u32,
    /// Ops in the model.
    pub ops: u32,
}

/// The adapter entries a `--trainable` list asks for, with their initial values.
pub fn build_entries(
    model: &Model<'_>,
    spec: &str,
    lora_targets: &str,
    seed: u64,
) -> Result<(Vec<Entry>, Vec<f32>)> {
    let mut values = vec![0f32; 0];
    let mut work = vec![0f32; 0];
    // Sizes first: add to an adapter with a large enough buffer.
    let mut total = 0usize;
    let mut want: Vec<(EntryKind, u32, u16, f32)> = Vec::new();
    let n_ops = model.op_count();
    let last_dense = (0..n_ops)
        .rev()
        .find(|&i| matches!(model.op(i).op, Op::Dense(_)));
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (name, opts) = item.split_once(':').unwrap_or((item, ""));
        let mut found = false;
        for i in 0..n_ops {
            let op = model.op(i);
            let linear = matches!(
                op.op,
                Op::Dense(_) | Op::Conv(edgetune_core::ops::Conv { groups: 1, .. })
            );
            let qblock = linear && model.tensor(op.input(1)).meta.encoding == Encoding::QBlock;
            let add: Vec<(EntryKind, u16, f32)> = match name {
                "bias" if matches!(op.op, Op::Dense(_) | Op::Conv(_)) => {
                    vec![(EntryKind::Bias, 0, 0.0)]
                }
                "scales" if qblock => vec![(EntryKind::LogScale, 0, 0.0)],
                "centroids" if qblock => vec![(EntryKind::Centroids, 0, 0.0)],
                "norm" if matches!(op.op, Op::LayerNorm { .. }) => {
                    vec![(EntryKind::NormGain, 0, 0.0), (EntryKind::NormBias, 0, 0.0)]
                }
                "head" if Some(i) == last_dense => vec![(EntryKind::Head, 0, 0.0)],
                "lora" if linear && crate::compress::recipe::glob(lora_targets, op.name) => {
                    let mut r = 4u16;
                    let mut alpha = None;
                    for kv in opts.split(':').filter(|s| !s.is_empty()) {
                        match kv.split_once('=') {
                            Some(("r", v)) => {
                                r = v.parse().with_context(|| format!("lora rank {v:?}"))?
                            }
                            Some(("alpha", v)) => {
                                alpha =
                                    Some(v.parse().with_context(|| format!("lora alpha {v:?}"))?)
                            }
                            _ => bail!("lora options are r=R and alpha=A, not {kv:?}"),
                        }
                    }
                    let alpha = alpha.unwrap_or(2.0 * r as f32);
                    vec![(EntryKind::LoraA, r, alpha), (EntryKind::LoraB, r, alpha)]
                }
                "bias" | "scales" | "centroids" | "norm" | "head" | "lora" => vec![],
                other => bail!(
                    "unknown trainable {other:?} (bias, scales, centroids, norm, head, lora:r=R)"
                ),
            };
            for (kind, rank, alpha) in add {
                let (rows, cols) = edgetune_core::adapter::expected_shape(model, kind, i, rank)
                    .map_err(|w| anyhow!("{name} on op {i}: {w}"))?;
                total += (rows * cols) as usize;
                want.push((kind, i, rank, alpha));
                found = true;
            }
        }
        if !found {
            bail!("trainable {name:?} matches no op of this model (scales/centroids need block-quantized weights; lora needs --lora-targets to match)");
        }
    }
    values.resize(total, 0.0);
    let work_len = want
        .iter()
        .filter(|w| w.0 == EntryKind::LoraA)
        .map(|w| lora_workspace(model, w.1, w.2))
        .max()
        .unwrap_or(0);
    work.resize(work_len, 0.0);
    let mut ad = Adapter::empty(&mut values, &mut work);
    for (kind, op, rank, alpha) in want {
        let info = model.op(op);
        let init: Vec<f32> = match kind {
            EntryKind::Bias => match info.n_inputs() > 2 {
                true => read_f32(model, info.input(2)),
                false => vec![],
            },
            EntryKind::Centroids => {
                let w = model.tensor(info.input(1));
                let l = edgetune_core::layout::QBlockLayout::new(
                    w.meta.shape.dim(0),
                    w.meta.shape.dim(1),
                    w.params,
                )
                .unwrap();
                let b = model.const_bytes(info.input(1));
                (0..l.tables * l.entries())
                    .map(|i| {
                        half::f16::from_bits(u16::from_le_bytes([
                            b[l.lut_off + 2 * i],
                            b[l.lut_off + 2 * i + 1],
                        ]))
                        .to_f32()
                    })
                    .collect()
            }
            EntryKind::NormGain => match info.n_inputs() > 1 {
                true => read_f32(model, info.input(1)),
                false => vec![],
            },
            EntryKind::NormBias => match info.n_inputs() > 2 {
                true => read_f32(model, info.input(2)),
                false => vec![],
            },
            EntryKind::Head => decoded_weight(model, info.input(1))?,
            // LoRA: A small and random (seeded), B zero, so training starts from the model.
            EntryKind::LoraA => {
                let k = model.tensor(info.input(1)).meta.shape.dim(1);
                let key = train::direction_key(seed ^ 0x4c6f_5241, op, 0);
                let s = 1.0 / (k as f32).sqrt();
                (0..rank as usize * k)
                    .map(|i| s * train::perturbation(key, i as u32, Perturbation::Gaussian))
                    .collect()
            }
            _ => vec![],
        };
        let fill = if kind == EntryKind::NormGain {
            1.0
        } else {
            0.0
        };
        ad.add(model, kind, op, rank, alpha, |i| {
            init.get(i).copied().unwrap_or(fill)
        })
        .map_err(|e| anyhow!("{e}"))?;
    }
    let entries = ad.entries().to_vec();
    Ok((entries, ad.values().to_vec()))
}

fn read_f32(model: &Model<'_>, id: u32) -> Vec<f32> {
    model
        .const_bytes(id)
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// The f32 values of a weight as the model stores it (any encoding).
fn decoded_weight(model: &Model<'_>, id: u32) -> Result<Vec<f32>> {
    let t = model.tensor(id);
    let (n, k) = (t.meta.shape.dim(0), t.meta.shape.dim(1));
    let bytes = model.const_bytes(id);
    Ok(match t.meta.encoding {
        Encoding::Plain => read_f32(model, id),
        Encoding::PanelF32 => {
            let p = edgetune_core::PANEL;
            let f = |i: usize| f32::from_le_bytes(bytes[i * 4..i * 4 + 4].try_into().unwrap());
            (0..n * k)
                .map(|i| f((i / k / p * k + i % k) * p + (i / k) % p))
                .collect()
        }
        e => edgetune_quant::encode::decode(
            &edgetune_quant::encode::Encoded {
                encoding: e,
                bytes: bytes.to_vec(),
                params: t.params,
            },
            n,
            k,
        )?,
    })
}

/// Copies samples `idx` of `data` (`per` values each) into `out`.
fn gather_rows(data: &[f32], per: usize, idx: &[usize], out: &mut [f32]) {
    for (j, &i) in idx.iter().enumerate() {
        out[j * per..(j + 1) * per].copy_from_slice(&data[i * per..(i + 1) * per]);
    }
}

/// The zeroth-order hyper-parameters the flags give.
pub fn zo_config(a: &FinetuneArgs) -> ZoConfig {
    ZoConfig {
        seed: a.seed,
        lr: a.lr,
        eps: a.eps,
        weight_decay: a.wd,
        clip: a.clip,
        directions: a.directions,
        one_sided: a.one_sided,
        rule: if a.sign { Rule::SignSgd } else { Rule::Sgd },
        perturbation: if a.rademacher {
            Perturbation::Rademacher
        } else {
            Perturbation::Gaussian
        },
    }
}

/// Runs the command.
pub fn run(a: &FinetuneArgs) -> Result<()> {
    let bytes = AlignedBytes::read(&a.model)?;
    let model =
        Model::from_bytes(bytes.as_bytes()).map_err(|e| anyhow!("{}: {e}", a.model.display()))?;
    let (entries, values) = build_entries(&model, &a.trainable, &a.lora_targets, a.seed)?;
    let mut host = HostAdapter::new(&model, entries, values);
    if let Some(opt) = &a.first_order {
        return run_first_order(a, &model, &mut host, opt);
    }
    let initial = host.to_bytes(&model)?;
    let cfg = zo_config(a);
    let mut x = load_named(&model, &a.train)?;
    let mut labels = a
        .labels
        .as_ref()
        .map(|p| npy::read(p).map(|l| l.to_i64()))
        .transpose()?;
    let mut targets = a.targets.as_ref().map(|p| npy::read(p)).transpose()?;
    let val = match (a.val.is_empty(), &a.val_labels, a.val_fraction) {
        (false, Some(l), None) => Some((load_named(&model, &a.val)?, npy::read(l)?.to_i64())),
        (true, None, Some(f)) => {
            let Some(l) = labels.as_mut() else {
                bail!("--val-fraction needs --labels")
            };
            if !(0.0..1.0).contains(&f) {
                bail!("--val-fraction {f}: must be in [0, 1)");
            }
            let n = x[0].shape[0];
            let keep = n - ((n as f64 * f).round() as usize).min(n - 1);
            let (tx, vx): (Vec<Array>, Vec<Array>) =
                x.iter().map(|xi| split_rows(xi, keep)).unzip();
            let vl = l.split_off(keep);
            if let Some(t) = targets.as_mut() {
                *t = split_rows(t, keep).0;
            }
            x = tx;
            Some((vx, vl))
        }
        (true, None, None) => None,
        _ => bail!("give --val with --val-labels, or --val-fraction"),
    };
    let out = train_zo(
        &model,
        &mut host,
        &cfg,
        a,
        &x,
        labels.as_deref(),
        targets.as_ref(),
        val.as_ref(),
    )?;
    let _ = &mut targets;
    let (report, log_steps, curve) = out;
    let eta = host.to_bytes(&model)?;
    write_durably(&a.output, &eta)?;
    let log_path = a
        .log
        .clone()
        .unwrap_or_else(|| a.output.with_extension("ztl"));
    write_durably(
        &log_path,
        &RunLog {
            config: cfg,
            initial,
            keep_best: val.is_some(),
            steps: log_steps,
        }
        .to_bytes(),
    )?;
    let plot_path = a
        .plot
        .clone()
        .unwrap_or_else(|| a.output.with_extension("svg"));
    let (train_curve, val_curve) = curve;
    if let Err(e) = crate::plot::lines(
        &plot_path,
        "zeroth-order fine-tuning",
        "step",
        "loss",
        &[
            ("train loss (smoothed)", train_curve),
            ("validation loss", val_curve),
        ],
    ) {
        eprintln!("warning: {e:#}");
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "trained {} values for {} steps ({} forward passes) in {:.1} s ({:.0} steps/s); skipped {}, rollbacks {}",
            report.trainables, report.steps, report.forwards, report.seconds, report.steps_per_second, report.skipped, report.rollbacks
        );
        println!(
            "training loss {:.6} (first 50 steps) -> {:.6} (last 50)",
            report.train_loss.0, report.train_loss.1
        );
        if let (Some(b), Some(best)) = (report.val_accuracy_before, report.val_accuracy_best) {
            println!(
                "validation accuracy {:.2}% -> {:.2}% (best, saved)",
                100.0 * b,
                100.0 * best
            );
        }
        println!(
            "memory: arena {} B (inference: {} B) + adapter values {} B + workspace {} B; prefix of {} of {} ops cached",
            report.arena_bytes,
            report.inference_arena_bytes,
            report.adapter_values_bytes,
            report.adapter_workspace_bytes,
            report.prefix_ops,
            report.ops
        );
        println!(
            "wrote {}, {}, {}",
            a.output.display(),
            log_path.display(),
            plot_path.display()
        );
    }
    Ok(())
}

/// `edgetune finetune --first-order`: the same trainables by backprop through the tail.
fn run_first_order(
    a: &FinetuneArgs,
    model: &Model<'_>,
    host: &mut HostAdapter,
    opt: &str,
) -> Result<()> {
    use crate::finetune::backprop::{Backprop, FirstOrderConfig, Optimizer};
    let optimizer = match opt {
        "adam" => Optimizer::Adam { lr: a.lr },
        "sgd" => Optimizer::Sgd { lr: a.lr },
        o => bail!("--first-order {o:?}: adam or sgd"),
    };
    if a.loss != "ce" {
        bail!("--first-order trains with cross-entropy (--loss ce)");
    }
    let x = load_named(model, &a.train)?;
    if x.len() != 1 {
        bail!("--first-order takes models with one input");
    }
    let labels = npy::read(
        a.labels
            .as_ref()
            .ok_or_else(|| anyhow!("--first-order needs --labels"))?,
    )?
    .to_i64();
    let mut bp = Backprop::new(*model, &host.entries)?;
    let cfg = FirstOrderConfig {
        optimizer,
        steps: a.steps,
        seed: a.seed,
        weight_decay: a.wd,
    };
    let data = x[0].to_f32();
    let started = Instant::now();
    let log = bp.train(&mut host.values, &data, &labels, &cfg)?;
    let seconds = started.elapsed().as_secs_f64();
    write_durably(&a.output, &host.to_bytes(model)?)?;
    let tail = log.len().saturating_sub(20);
    let last =
        log[tail..].iter().map(|l| l.1 as f64).sum::<f64>() / (log.len() - tail).max(1) as f64;
    println!(
        "first-order ({opt}) trained {} values for {} steps ({} forward + {} backward passes) in {seconds:.1} s; final train loss {last:.4}; wrote {}",
        host.values.len(),
        a.steps,
        a.steps,
        a.steps,
        a.output.display()
    );
    Ok(())
}

/// Data arrays for the model's inputs, in input order, from `name=file` arguments.
pub fn load_named(model: &Model<'_>, args: &[String]) -> Result<Vec<Array>> {
    let names: Vec<String> = model.inputs().map(|i| i.name.to_string()).collect();
    let mut found: Vec<Option<Array>> = vec![None; names.len()];
    for arg in args {
        let (name, path) = match arg.split_once('=') {
            Some((n, p)) => (n.to_string(), p.to_string()),
            None if names.len() == 1 => (names[0].clone(), arg.clone()),
            None => bail!(
                "give inputs as name=file.npy (inputs: {})",
                names.join(", ")
            ),
        };
        let i = names
            .iter()
            .position(|n| *n == name)
            .ok_or_else(|| anyhow!("the model has no input {name}"))?;
        found[i] = Some(npy::read(Path::new(&path))?);
    }
    let arrays: Vec<Array> = found
        .into_iter()
        .zip(&names)
        .map(|(a, n)| a.ok_or_else(|| anyhow!("no data for input {n}")))
        .collect::<Result<_>>()?;
    if arrays
        .iter()
        .any(|a| a.shape.first() != arrays[0].shape.first())
    {
        bail!("input arrays hold different sample counts");
    }
    Ok(arrays)
}

/// A minibatch buffer for every input, filled from sample indices.
struct Batcher {
    data: Vec<Array>,
    per: Vec<usize>,
    f32s: Vec<Vec<f32>>,
    i64s: Vec<Vec<i64>>,
}

impl Batcher {
    fn new(model: &Model<'_>, data: &[Array], batch: usize) -> Result<Batcher> {
        let mut per = Vec::new();
        for (io, a) in model.inputs().zip(data) {
            let t = model.tensor(io.tensor);
            let p = t.meta.shape.numel() / batch;
            if a.shape[1..].iter().product::<usize>() != p {
                bail!(
                    "data for {} is {:?}, the model takes {} (batch {batch})",
                    io.name,
                    a.shape,
                    t.meta.shape
                );
            }
            per.push(p);
        }
        Ok(Batcher {
            f32s: per.iter().map(|p| vec![0.0; p * batch]).collect(),
            i64s: per.iter().map(|p| vec![0; p * batch]).collect(),
            data: data.to_vec(),
            per,
        })
    }

    /// Copies samples `idx` into the buffers and sets them as the session's inputs.
    fn load(&mut self, session: &mut Session<'_, '_>, idx: &[usize]) -> Result<()> {
        for (k, a) in self.data.iter().enumerate() {
            let p = self.per[k];
            match &a.data {
                ArrayData::F32(v) => {
                    for (j, &i) in idx.iter().enumerate() {
                        self.f32s[k][j * p..(j + 1) * p].copy_from_slice(&v[i * p..(i + 1) * p]);
                    }
                    session.set_input(k, &self.f32s[k])?;
                }
                ArrayData::I64(v) => {
                    for (j, &i) in idx.iter().enumerate() {
                        self.i64s[k][j * p..(j + 1) * p].copy_from_slice(&v[i * p..(i + 1) * p]);
                    }
                    session.set_input(k, &self.i64s[k])?;
                }
                ArrayData::Bool(_) => bail!("bool inputs are not supported for training"),
            }
        }
        Ok(())
    }
}

/// Splits an array's samples at `at`.
fn split_rows(a: &Array, at: usize) -> (Array, Array) {
    let per: usize = a.shape[1..].iter().product();
    let v = a.to_f32();
    let shape = |n: usize| [vec![n], a.shape[1..].to_vec()].concat();
    match &a.data {
        ArrayData::I64(v) => (
            Array {
                shape: shape(at),
                data: ArrayData::I64(v[..at * per].to_vec()),
            },
            Array {
                shape: shape(a.shape[0] - at),
                data: ArrayData::I64(v[at * per..].to_vec()),
            },
        ),
        _ => (
            Array {
                shape: shape(at),
                data: ArrayData::F32(v[..at * per].to_vec()),
            },
            Array {
                shape: shape(a.shape[0] - at),
                data: ArrayData::F32(v[at * per..].to_vec()),
            },
        ),
    }
}

type Curves = (Vec<(f64, f64)>, Vec<(f64, f64)>);

fn mean<'a>(v: impl ExactSizeIterator<Item = &'a f64>) -> f64 {
    let n = v.len().max(1) as f64;
    v.sum::<f64>() / n
}

/// The training loop (also used by tests and benchmarks).
#[allow(clippy::too_many_arguments)]
pub fn train_zo(
    model: &Model<'_>,
    host: &mut HostAdapter,
    cfg: &ZoConfig,
    a: &FinetuneArgs,
    x: &[Array],
    labels: Option<&[i64]>,
    targets: Option<&Array>,
    val: Option<&(Vec<Array>, Vec<i64>)>,
) -> Result<(FinetuneReport, Vec<StepEntry>, Curves)> {
    let input = model.tensor(model.input(0).unwrap().tensor);
    // Samples per forward pass, and forward passes per loss.
    let batch = input.meta.shape.dim(0);
    let step_batch = a.batch.unwrap_or(batch);
    if step_batch == 0 || step_batch % batch != 0 {
        bail!("--batch {step_batch}: must be a multiple of the model's batch of {batch} (import with another --input shape to change it)");
    }
    let passes = step_batch / batch;
    let n = x[0].shape[0];
    let mut batcher = Batcher::new(model, x, batch)?;
    let out0 = model.tensor(model.output(0).unwrap().tensor);
    let classes = out0.meta.shape.numel() / batch;
    let loss_kind = a.loss.as_str();
    match (loss_kind, labels, targets) {
        ("ce" | "error", Some(l), _) if l.len() == n => {}
        ("mse", _, Some(t)) if t.shape[0] == n => {}
        _ => bail!("--loss {loss_kind} needs --labels (ce, error) or --targets (mse) for every training sample"),
    }
    let target_data = targets.map(|t| t.to_f32());
    // A training plan: the prefix before the first adapted op is computed once per minibatch.
    let first = host.entries.iter().map(|e| e.op).min().unwrap_or(0);
    // The cached prefix holds one forward pass's samples.
    let prefix = if a.no_prefix_cache || passes > 1 {
        0
    } else {
        first
    };
    let train_bytes = {
        let g = Graph::from_model(model)?;
        let (b, _) = pack_with(&g, (prefix > 0).then_some(prefix as usize))?;
        AlignedBytes::from(&b[..])
    };
    let tmodel =
        Model::from_bytes(train_bytes.as_bytes()).map_err(|e| anyhow!("training plan: {e}"))?;
    let mut arena = AlignedBytes::zeroed(tmodel.arena_bytes() as usize);
    let kernels = if a.reference_kernels {
        Kernels::reference()
    } else {
        Kernels::best()
    };
    let mut session = Session::with_kernels(&tmodel, arena.as_bytes_mut(), kernels)?;
    let ops = tmodel.op_count();
    let decay_from: Vec<bool> = {
        let mut v = vec![false; host.values.len()];
        for e in &host.entries {
            if matches!(e.kind, EntryKind::LoraA | EntryKind::LoraB) {
                v[e.range()].iter_mut().for_each(|d| *d = true);
            }
        }
        v
    };
    let decay = |i: usize| decay_from[i];
    let mut sampler = train::Sampler::new(n, cfg.seed);
    let mut idx = vec![0usize; step_batch];
    let mut lb = vec![0usize; step_batch];
    let mut tb = vec![0f32; step_batch * classes];
    let work_len = host.work.len();
    let mut best = host.values.clone();
    let mut best_loss = f32::INFINITY;
    let (mut val_before, mut val_best) = (None, None);
    let mut log = Vec::with_capacity(a.steps as usize);
    let mut train_curve = Vec::new();
    let mut val_curve = Vec::new();
    let mut smooth = f32::NAN;
    let (mut loss_head, mut loss_tail) = (
        Vec::with_capacity(50),
        std::collections::VecDeque::with_capacity(50),
    );
    let (mut skipped, mut rollbacks) = (0, 0);
    let bar = (!a.quiet && !a.json).then(|| {
        let b = indicatif::ProgressBar::new(a.steps as u64);
        b.set_style(indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}").unwrap());
        b
    });
    let entries = host.entries.clone();
    let validate = |session: &mut Session<'_, '_>, values: &[f32]| -> Result<(f32, f64)> {
        let Some((vx, vy)) = val else {
            return Ok((f32::NAN, f64::NAN));
        };
        let mut vb = Batcher::new(model, vx, batch)?;
        let mut vals = values.to_vec();
        let mut work = vec![0f32; work_len];
        let mut ad = Adapter::from_parts(model, &entries, &mut vals, &mut work)
            .map_err(|e| anyhow!("{e}"))?;
        let (mut loss, mut hits, mut count) = (0f64, 0usize, 0usize);
        for start in (0..vy.len()).step_by(batch) {
            let idx: Vec<usize> = (0..batch).map(|j| (start + j).min(vy.len() - 1)).collect();
            vb.load(session, &idx)?;
            session.run_with(Some(&mut ad))?;
            let out = session.output::<f32>(0)?;
            let real = (vy.len() - start).min(batch);
            let labs = idx[..real].iter().map(|&i| vy[i] as usize);
            loss += train::cross_entropy(&out[..real * classes], classes, labs.clone()) as f64
                * real as f64;
            hits += real
                - (train::error_rate(&out[..real * classes], classes, labs) * real as f32).round()
                    as usize;
            count += real;
        }
        Ok(((loss / count as f64) as f32, hits as f64 / count as f64))
    };
    if val.is_some() {
        let (l, acc) = validate(&mut session, &host.values)?;
        val_before = Some(acc);
        val_best = Some(acc);
        best_loss = l;
        val_curve.push((0.0, l as f64));
    }
    let started = Instant::now();
    let mut forwards = 0u64;
    {
        let mut ad = Adapter::from_parts(model, &entries, &mut host.values, &mut host.work)
            .map_err(|e| anyhow!("{e}"))?;
        for step in 0..a.steps {
            for i in idx.iter_mut() {
                *i = sampler.next_index();
            }
            if let Some(l) = labels {
                for (o, &i) in lb.iter_mut().zip(&idx) {
                    *o = l[i] as usize;
                }
            }
            if let Some(t) = &target_data {
                gather_rows(t, classes, &idx, &mut tb);
            }
            if passes == 1 {
                batcher.load(&mut session, &idx)?;
            }
            if prefix > 0 {
                session.run_range(0..prefix, None)?;
            }
            let mut failure = None;
            let rec = train::zo_step(&mut ad, cfg, step, &decay, |ad| {
                let mut total = 0.0f32;
                for p in 0..passes {
                    let part = p * batch..(p + 1) * batch;
                    if passes > 1 {
                        if let Err(e) = batcher.load(&mut session, &idx[part.clone()]) {
                            failure = Some(e);
                            return f32::NAN;
                        }
                    }
                    forwards += 1;
                    if let Err(e) = session.run_range(prefix..ops, Some(ad)) {
                        failure = Some(e.into());
                        return f32::NAN;
                    }
                    let out = session.output::<f32>(0).expect("f32 output");
                    total += match loss_kind {
                        "mse" => train::mse(out, &tb[part.start * classes..part.end * classes]),
                        "error" => train::error_rate(out, classes, lb[part].iter().copied()),
                        _ => train::cross_entropy(out, classes, lb[part].iter().copied()),
                    };
                }
                total / passes as f32
            });
            if let Some(e) = failure {
                return Err(e);
            }
            let mut flags = if rec.skipped { SKIPPED } else { 0 };
            skipped += rec.skipped as u32;
            smooth = if smooth.is_nan() {
                rec.loss
            } else {
                0.98 * smooth + 0.02 * rec.loss
            };
            if rec.loss.is_finite() {
                if loss_head.len() < 50 {
                    loss_head.push(rec.loss as f64);
                }
                if loss_tail.len() == 50 {
                    loss_tail.pop_front();
                }
                loss_tail.push_back(rec.loss as f64);
            }
            if step % 10 == 0 && smooth.is_finite() {
                train_curve.push((step as f64, smooth as f64));
            }
            if val.is_some() && ((step + 1) % a.eval_every == 0 || step + 1 == a.steps) {
                let values = ad.values().to_vec();
                let (l, acc) = validate(&mut session, &values)?;
                val_curve.push(((step + 1) as f64, l as f64));
                if l < best_loss {
                    best_loss = l;
                    best.copy_from_slice(&values);
                    val_best = Some(acc);
                    flags |= SNAPSHOT;
                } else if !l.is_finite() || l > 2.0 * best_loss + 1.0 {
                    // Divergence: back to the best values seen.
                    ad.values_mut().copy_from_slice(&best);
                    flags |= ROLLBACK;
                    rollbacks += 1;
                }
            }
            log.push(StepEntry {
                step,
                flags,
                g: rec.g[..cfg.directions as usize].to_vec(),
            });
            if let Some(b) = &bar {
                b.inc(1);
                if step % 20 == 0 {
                    let sps = (step + 1) as f64 / started.elapsed().as_secs_f64();
                    b.set_message(format!(
                        "loss {smooth:.4} val acc {} {sps:.0} steps/s",
                        val_best
                            .map(|v| format!("{:.2}%", 100.0 * v))
                            .unwrap_or("-".into())
                    ));
                }
            }
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    // The saved adapter is the best on validation (the final values without validation data).
    if val.is_some() {
        host.values.copy_from_slice(&best);
    }
    let seconds = started.elapsed().as_secs_f64();
    let report = FinetuneReport {
        trainables: host.values.len(),
        steps: a.steps,
        forwards,
        val_accuracy_before: val_before,
        val_accuracy_best: val_best,
        seconds,
        steps_per_second: a.steps as f64 / seconds.max(1e-9),
        train_loss: (mean(loss_head.iter()), mean(loss_tail.iter())),
        skipped,
        rollbacks,
        arena_bytes: tmodel.arena_bytes(),
        inference_arena_bytes: model.arena_bytes(),
        batch: step_batch,
        adapter_values_bytes: host.values.len() * 4,
        adapter_workspace_bytes: host.work.len() * 4,
        prefix_ops: prefix,
        ops,
    };
    Ok((report, log, (train_curve, val_curve)))
}

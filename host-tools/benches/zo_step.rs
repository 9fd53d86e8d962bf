//! Zeroth-order training cost on the digits models: the time of one ZO step (two forward passes
//! on the step's minibatch, perturbation and update regenerated from the seed, minibatch loading)
//! against one forward pass of the same model with the same adapter, and what caching the frozen
//! prefix saves when only the tail trains.
//!
//! `cargo bench -p edgetune-cli --bench zo_step` prints a table (one thread, best kernels).

use std::path::PathBuf;
use std::time::Instant;

use edgetune_cli::commands::finetune::{build_entries, train_zo, FinetuneArgs};
use edgetune_cli::compress::{compress, KeepEnds, Method, Recipe, Rule};
use edgetune_cli::import::{import, LowerOptions};
use edgetune_cli::model_file::AlignedBytes;
use edgetune_cli::npy;
use edgetune_cli::pack::pack;
use edgetune_cli::runner::HostAdapter;
use edgetune_core::Model;
use edgetune_runtime::adapter::Adapter;
use edgetune_runtime::kernels::Kernels;
use edgetune_runtime::train::ZoConfig;
use edgetune_runtime::Session;

const BATCH: usize = 64;
const STEPS: u32 = 400;

fn digits(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/digits")
        .join(name)
}

/// The digits model at batch 64, compressed to ternary weights (one scale per row) when asked.
fn model(file: &str, ternary: bool) -> Vec<u8> {
    let mut g = import(
        &digits(file),
        &[format!("x={BATCH}x1x8x8").parse().unwrap()],
        LowerOptions::default(),
    )
    .unwrap();
    if ternary {
        let rule = Rule {
            pattern: "*".into(),
            method: Method::Ternary { group: 256 },
            gptq: false,
        };
        let recipe = Recipe {
            rules: vec![rule],
            keep_ends: KeepEnds::Same,
            ..Recipe::default()
        };
        compress(&mut g, &recipe, None, false).unwrap();
    }
    pack(&g).unwrap().0
}

fn args(trainable: &str, prefix_cache: bool) -> FinetuneArgs {
    FinetuneArgs {
        model: PathBuf::new(),
        train: vec![],
        labels: None,
        targets: None,
        val: vec![],
        val_labels: None,
        val_fraction: None,
        trainable: trainable.into(),
        lora_targets: "*".into(),
        loss: "ce".into(),
        steps: STEPS,
        batch: None,
        lr: 1e-2,
        eps: 1e-3,
        wd: 0.0,
        clip: 5.0,
        directions: 1,
        one_sided: false,
        sign: false,
        rademacher: false,
        seed: 1,
        eval_every: 250,
        first_order: None,
        no_prefix_cache: !prefix_cache,
        reference_kernels: false,
        output: PathBuf::new(),
        log: None,
        plot: None,
        quiet: true,
        json: false,
    }
}

/// Median seconds of one forward pass with the adapter applied.
fn forward_seconds(model: &Model<'_>, host: &HostAdapter, x: &[f32]) -> f64 {
    let mut values = host.values.clone();
    let mut work = host.work.clone();
    let mut adapter = Adapter::from_parts(model, &host.entries, &mut values, &mut work).unwrap();
    let mut arena = AlignedBytes::zeroed(model.arena_bytes() as usize);
    let mut session = Session::with_kernels(model, arena.as_bytes_mut(), Kernels::best()).unwrap();
    session.set_input(0, &x[..BATCH * 64]).unwrap();
    let mut times: Vec<f64> = (0..15)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..50 {
                session.run_with(Some(&mut adapter)).unwrap();
            }
            t.elapsed().as_secs_f64() / 50.0
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[7]
}

/// Seconds per step of a short zeroth-order run (median of three runs).
fn step_seconds(
    model: &Model<'_>,
    host: &HostAdapter,
    a: &FinetuneArgs,
    x: &[npy::Array],
    y: &[i64],
) -> (f64, u32) {
    let cfg = ZoConfig {
        seed: a.seed,
        lr: a.lr,
        eps: a.eps,
        clip: a.clip,
        ..ZoConfig::default()
    };
    let mut runs: Vec<(f64, u32)> = (0..3)
        .map(|_| {
            let mut h = host.clone();
            let (report, _, _) = train_zo(model, &mut h, &cfg, a, x, Some(y), None, None).unwrap();
            (report.seconds / report.steps as f64, report.prefix_ops)
        })
        .collect();
    runs.sort_by(|p, q| p.0.total_cmp(&q.0));
    runs[1]
}

fn main() {
    let xa = npy::read(&digits("x_train.npy")).unwrap();
    let x = xa.to_f32();
    let y = npy::read(&digits("y_train.npy")).unwrap().to_i64();
    println!(
        "Zeroth-order step vs one forward pass, batch {BATCH}, {STEPS} steps, kernels {:?}",
        Kernels::best()
    );
    println!(
        "{:<10} {:<8} {:<26} {:>10} {:>10} {:>12} {:>9}",
        "model", "weights", "trainables", "values", "fwd ms", "step ms", "step/fwd"
    );
    let cases = [
        ("mlp.onnx", true, "bias,scales"),
        ("cnn.onnx", true, "bias,scales"),
        ("mlp.onnx", true, "bias,scales,lora:r=4"),
        ("cnn.onnx", true, "bias,scales,lora:r=4"),
        ("cnn.onnx", false, "bias"),
    ];
    for (file, ternary, trainable) in cases {
        let bytes = model(file, ternary);
        let ab = AlignedBytes::from(&bytes[..]);
        let m = Model::from_bytes(ab.as_bytes()).unwrap();
        let (entries, values) = build_entries(&m, trainable, "*", 1).unwrap();
        let host = HostAdapter::new(&m, entries, values);
        let fwd = forward_seconds(&m, &host, &x);
        let (step, _) = step_seconds(
            &m,
            &host,
            &args(trainable, true),
            std::slice::from_ref(&xa),
            &y,
        );
        let name = file.trim_end_matches(".onnx");
        let w = if ternary { "ternary" } else { "f32" };
        println!(
            "{name:<10} {w:<8} {trainable:<26} {:>10} {:>10.3} {:>12.3} {:>9.2}",
            host.values.len(),
            fwd * 1e3,
            step * 1e3,
            step / fwd
        );
    }
    println!("\nPrefix caching: only the tail trains, the frozen prefix runs once per minibatch.");
    println!(
        "{:<10} {:<26} {:>8} {:>14} {:>14} {:>9}",
        "model", "trainables", "prefix", "step ms (off)", "step ms (on)", "speed-up"
    );
    for (file, trainable) in [
        ("cnn.onnx", "head"),
        ("mlp.onnx", "head"),
        ("cnn.onnx", "lora:r=4"),
    ] {
        let bytes = model(file, false);
        let ab = AlignedBytes::from(&bytes[..]);
        let m = Model::from_bytes(ab.as_bytes()).unwrap();
        let targets = if trainable.starts_with("lora") {
            "*Gemm*"
        } else {
            "*"
        };
        let (entries, values) = build_entries(&m, trainable, targets, 1).unwrap();
        let host = HostAdapter::new(&m, entries, values);
        let mut off_args = args(trainable, false);
        off_args.lora_targets = targets.into();
        let mut on_args = args(trainable, true);
        on_args.lora_targets = targets.into();
        let (off, _) = step_seconds(&m, &host, &off_args, std::slice::from_ref(&xa), &y);
        let (on, prefix) = step_seconds(&m, &host, &on_args, std::slice::from_ref(&xa), &y);
        let what = if trainable.starts_with("lora") {
            "lora:r=4 on dense layers"
        } else {
            trainable
        };
        println!(
            "{:<10} {what:<26} {:>8} {:>14.3} {:>14.3} {:>9.2}",
            file.trim_end_matches(".onnx"),
            format!("{prefix}/{}", m.op_count()),
            off * 1e3,
            on * 1e3,
            off / on
        );
    }
}

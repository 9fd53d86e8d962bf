//! `edgetune bench`: latency of our runtime and tract, alternated in one process.

use std::time::{Duration, Instant};

use anyhow::Result;
use serde::Serialize;
use tract_onnx::prelude::multithread::{multithread_tract_scope, Executor};

use crate::npy::Array;
use crate::runner::{Ours, Reference};

/// What `bench` reports.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Threads both runtimes used.
    pub threads: usize,
    /// Timed runs of each.
    pub runs: usize,
    /// Median latency of ours, milliseconds.
    pub ours_ms: f64,
    /// Median latency of tract, milliseconds.
    pub tract_ms: Option<f64>,
    /// ours / tract (below 1: we are faster).
    pub ratio: Option<f64>,
    /// GEMM kernel ours used.
    pub kernel: String,
}

fn median(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1e3
}

/// Times `runs` runs of each, alternating, after one warm-up of each, with `threads` threads.
pub fn bench(
    ours: &mut Ours,
    reference: Option<&Reference>,
    inputs: &[Array],
    threads: usize,
    runs: usize,
    min_time: Duration,
) -> Result<BenchReport> {
    let executor = if threads > 1 {
        Executor::multithread(threads)
    } else {
        Executor::SingleThread
    };
    // Our runtime splits big kernels across the rayon pool when given a thread budget.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    let budget = ours.kernels;
    ours.kernels = budget.with_threads(threads);
    let mut mine = Vec::new();
    let mut theirs = Vec::new();
    let start = Instant::now();
    let mut i = 0;
    // One warm-up each, then alternate until both the run count and the time budget are met.
    while i < runs + 1 || start.elapsed() < min_time {
        let t = Instant::now();
        pool.install(|| ours.run(inputs))?;
        if i > 0 {
            mine.push(t.elapsed());
        }
        if let Some(r) = reference {
            let t = Instant::now();
            multithread_tract_scope(executor.clone(), || r.run(inputs))?;
            if i > 0 {
                theirs.push(t.elapsed());
            }
        }
        i += 1;
        if i > 10_000 {
            break;
        }
    }
    ours.kernels = budget;
    let ours_ms = median(mine.clone());
    let tract_ms = (!theirs.is_empty()).then(|| median(theirs));
    Ok(BenchReport {
        threads,
        runs: mine.len(),
        ours_ms,
        tract_ms,
        ratio: tract_ms.map(|t| ours_ms / t),
        kernel: ours.kernels.gemm.name.to_string(),
    })
}

/// Prints the report as text.
pub fn print(r: &BenchReport) {
    print!(
        "threads {}  runs {}  edgetune {:.3} ms ({})",
        r.threads, r.runs, r.ours_ms, r.kernel
    );
    if let (Some(t), Some(q)) = (r.tract_ms, r.ratio) {
        print!("  tract {t:.3} ms  ratio ours/tract {q:.2}");
    }
    println!();
}

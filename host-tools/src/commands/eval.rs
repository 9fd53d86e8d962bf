//! `edgetune eval`: our runtime against tract, labels, or saved outputs.

use anyhow::{bail, Result};
use serde::Serialize;

use crate::metrics;
use crate::npy::Array;
use crate::runner::{batches, Ours, Reference};

/// Agreement of one output with the reference.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Agreement {
    /// Largest absolute difference.
    pub max_abs: f32,
    /// Largest relative difference (values below 1e-3 in magnitude count as 1e-3).
    pub max_rel: f32,
    /// Smallest per-sample cosine similarity.
    pub cosine_min: f32,
    /// Mean per-sample cosine similarity.
    pub cosine_mean: f32,
}

/// What `eval` reports.
#[derive(Debug, Clone, Serialize, Default)]
pub struct EvalReport {
    /// Samples evaluated.
    pub samples: usize,
    /// Per output: agreement with tract on the same inputs.
    pub vs_reference: Vec<Agreement>,
    /// Agreement of output 0 with `--expected`.
    pub vs_expected: Option<Agreement>,
    /// Top-1 accuracy of output 0 against labels (ours).
    pub accuracy: Option<f64>,
    /// Top-1 accuracy of tract's output 0 against labels.
    pub reference_accuracy: Option<f64>,
}

/// Per-sample outputs of a whole data set: output -> (width, values for the first `n` samples).
pub type Outputs = Vec<(usize, Vec<f32>)>;

/// Runs all batches through `run` and keeps the first `n` samples of each output.
pub fn collect(
    batches: &[Vec<Array>],
    n: usize,
    mut run: impl FnMut(&[Array]) -> Result<Vec<Array>>,
) -> Result<Outputs> {
    let mut outs: Outputs = Vec::new();
    for b in batches {
        let res = run(b)?;
        if outs.is_empty() {
            outs = res
                .iter()
                .map(|a| (a.shape[1..].iter().product::<usize>().max(1), Vec::new()))
                .collect();
        }
        for ((w, acc), a) in outs.iter_mut().zip(&res) {
            acc.extend_from_slice(&a.to_f32()[..a.to_f32().len().min(a.shape[0] * *w)]);
        }
    }
    for (w, acc) in &mut outs {
        acc.truncate(n * *w);
    }
    Ok(outs)
}

fn agreement(ours: &[f32], reference: &[f32], width: usize) -> Agreement {
    let cos = metrics::row_cosines(ours, reference, width);
    Agreement {
        max_abs: metrics::max_abs_diff(ours, reference),
        max_rel: metrics::max_rel_diff(ours, reference, 1e-3),
        cosine_min: cos.iter().copied().fold(f32::INFINITY, f32::min),
        cosine_mean: cos.iter().sum::<f32>() / cos.len().max(1) as f32,
    }
}

/// Evaluates `ours` on `data` (leading axis = samples).
pub fn evaluate(
    ours: &mut Ours,
    reference: Option<&Reference>,
    data: &[Array],
    labels: Option<&[i64]>,
    expected: Option<&Array>,
) -> Result<EvalReport> {
    let inputs = ours.inputs();
    let (batches, n) = batches(&inputs, data)?;
    let mine = collect(&batches, n, |b| ours.run(b))?;
    let mut report = EvalReport {
        samples: n,
        ..Default::default()
    };
    let (w0, out0) = &mine[0];
    if let Some(r) = reference {
        let theirs = collect(&batches, n, |b| r.run(b))?;
        for ((w, a), (_, b)) in mine.iter().zip(&theirs) {
            report.vs_reference.push(agreement(a, b, *w));
        }
        if let Some(l) = labels {
            report.reference_accuracy = Some(metrics::accuracy(&theirs[0].1, theirs[0].0, l));
        }
    }
    if let Some(e) = expected {
        let e = e.to_f32();
        if e.len() != out0.len() {
            bail!(
                "--expected holds {} values, output 0 has {}",
                e.len(),
                out0.len()
            );
        }
        report.vs_expected = Some(agreement(out0, &e, *w0));
    }
    if let Some(l) = labels {
        if l.len() != n {
            bail!("{} labels for {n} samples", l.len());
        }
        report.accuracy = Some(metrics::accuracy(out0, *w0, l));
    }
    Ok(report)
}

/// Prints the report as text.
pub fn print(r: &EvalReport) {
    println!("samples      {}", r.samples);
    for (i, a) in r.vs_reference.iter().enumerate() {
        println!(
            "output {i} vs tract: max abs {:.3e}, max rel {:.3e}, cosine min {:.7} mean {:.7}",
            a.max_abs, a.max_rel, a.cosine_min, a.cosine_mean
        );
    }
    if let Some(a) = &r.vs_expected {
        println!(
            "output 0 vs expected: max abs {:.3e}, cosine min {:.7} mean {:.7}",
            a.max_abs, a.cosine_min, a.cosine_mean
        );
    }
    if let Some(acc) = r.accuracy {
        print!("top-1 accuracy {:.2}%", 100.0 * acc);
        if let Some(t) = r.reference_accuracy {
            print!(" (tract {:.2}%)", 100.0 * t);
        }
        println!();
    }
}

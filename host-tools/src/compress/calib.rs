//! Calibration: run the float model in our runtime on sample inputs and collect, for every dense
//! and convolution layer, statistics of the rows its weights multiply (inputs, or im2col patches).

use std::collections::HashMap;

use anyhow::Result;
use edgetune_core::ops::Conv;
use edgetune_core::Op;
use edgetune_quant::stats::ActStats;

use crate::ir::Graph;
use crate::model_file::AlignedBytes;
use crate::npy::Array;
use crate::pack::pack;
use crate::runner::{batches, Ours};

/// Per-layer input statistics, by node name.
#[derive(Debug, Default)]
pub struct Calibration {
    /// Statistics of each layer's input rows.
    pub stats: HashMap<String, ActStats>,
    /// Samples run: all of them, or those until every layer had its rows ([`MAX_ROWS`]).
    pub samples: usize,
}

/// Rows each layer's statistics stop at. GPTQ on 1536 inputs (MiniLM's widest layers) still
/// gained from 16K to 64K rows and from 64K to 256K; calibration time grows with the rows used
/// (only as many as the calibration data holds).
pub const MAX_ROWS: u64 = 262_144;

/// Unrolls one image `[C, H, W]` into `(ci, ky, kx)` patch rows, as the runtime's im2col does.
pub fn patches(
    c: &Conv,
    x: &[f32],
    cin: usize,
    h: usize,
    w: usize,
    ho: usize,
    wo: usize,
) -> Vec<f32> {
    let (kh, kw) = (c.kernel[0] as usize, c.kernel[1] as usize);
    let k = cin * kh * kw;
    let mut out = vec![0.0; ho * wo * k];
    for oy in 0..ho {
        for ox in 0..wo {
            let row = &mut out[(oy * wo + ox) * k..(oy * wo + ox + 1) * k];
            let y0 = (oy * c.stride[0] as usize) as isize - c.pads[0] as isize;
            let x0 = (ox * c.stride[1] as usize) as isize - c.pads[1] as isize;
            let mut j = 0;
            for ci in 0..cin {
                for ky in 0..kh {
                    let iy = y0 + (ky * c.dilation[0] as usize) as isize;
                    for kx in 0..kw {
                        let ix = x0 + (kx * c.dilation[1] as usize) as isize;
                        if iy >= 0 && iy < h as isize && ix >= 0 && ix < w as isize {
                            row[j] = x[(ci * h + iy as usize) * w + ix as usize];
                        }
                        j += 1;
                    }
                }
            }
        }
    }
    out
}

/// The input that marks padding tokens: a `[batch, seq]` integer input named `attention_mask`
/// (the Hugging Face convention). Rows of padding tokens are computed but never used (masked in
/// attention and pooling); in short sentences padded to a long sequence they are most rows, and
/// statistics that count them fit the weights to activations that do not matter.
fn token_mask(ours: &Ours) -> Option<usize> {
    ours.inputs()
        .iter()
        .position(|i| i.name == "attention_mask" && i.shape.len() == 2)
}

/// Runs `g` (uncompressed) on `data` (leading axis = samples) and gathers statistics for the
/// layers `super::layers` finds, up to [`MAX_ROWS`] rows each; `gram(name, k)` says which layers
/// also keep `XᵀX`. With an `attention_mask` input, rows of padding tokens are left out.
pub fn calibrate(
    g: &Graph,
    data: &[Array],
    gram: impl Fn(&str, usize) -> bool,
) -> Result<Calibration> {
    calibrate_rows(g, data, gram, MAX_ROWS)
}

/// [`calibrate`] with statistics that stop at `max_rows` rows per layer (those of the batch
/// that reaches it included); the run stops once every layer has them.
pub fn calibrate_rows(
    g: &Graph,
    data: &[Array],
    gram: impl Fn(&str, usize) -> bool,
    max_rows: u64,
) -> Result<Calibration> {
    let (bytes, _) = pack(g)?;
    let mut ours = Ours::from_bytes(AlignedBytes::from(&bytes[..]))?;
    let mask_input = token_mask(&ours);
    let layers = super::layers(g);
    let mut stats: HashMap<usize, (String, ActStats)> = HashMap::new();
    for l in layers.iter().filter(|l| !l.embedding) {
        stats.insert(
            l.node,
            (l.name.clone(), ActStats::new(l.k, gram(&l.name, l.k))?),
        );
    }
    let (bs, n) = batches(&ours.inputs(), data)?;
    let per_batch = ours.inputs()[0].shape[0];
    let mut seen = 0;
    for b in &bs {
        let real = per_batch.min(n - seen);
        seen += real;
        // Per token of the batch: does it count?
        let keep: Option<Vec<bool>> =
            mask_input.map(|m| b[m].to_i64().iter().map(|&v| v != 0).collect());
        ours.run_observed(b, |i, session| {
            let Some((_, st)) = stats.get_mut(&(i as usize)) else {
                return;
            };
            if st.count() >= max_rows {
                return;
            }
            let op = session.model().op(i);
            let xid = op.input(0);
            let Some(x) = session.tensor_f32(xid) else {
                return;
            };
            let xs = session.model().tensor(xid).meta.shape;
            let k = st.k();
            let rows: Vec<f32> = match op.op {
                Op::Conv(c) => {
                    let (cin, h, w) = (xs.dim(1), xs.dim(2), xs.dim(3));
                    let ys = session.model().tensor(op.output(0)).meta.shape;
                    let (ho, wo) = (ys.dim(2), ys.dim(3));
                    // Only the real (unpadded) images of the batch.
                    let per = cin * h * w;
                    (0..real.min(xs.dim(0)))
                        .flat_map(|img| {
                            patches(&c, &x[img * per..(img + 1) * per], cin, h, w, ho, wo)
                        })
                        .collect()
                }
                _ => {
                    let rows = x.len() / k;
                    let rows_per_image = rows / xs.dim(0).max(1);
                    let take = if xs.rank() >= 2 && xs.dim(0) == per_batch {
                        real * rows_per_image
                    } else {
                        rows
                    };
                    match &keep {
                        // One row per token (however the batch is flattened): real tokens only,
                        // of the real samples only.
                        Some(keep) if keep.len() == rows => {
                            let tokens = keep.len() / per_batch;
                            x.chunks_exact(k)
                                .zip(keep)
                                .take(real * tokens)
                                .filter(|(_, &kept)| kept)
                                .flat_map(|(row, _)| row.iter().copied())
                                .collect()
                        }
                        _ => x[..take * k].to_vec(),
                    }
                }
            };
            let _ = st.update(&rows, k);
        })?;
        // Every layer has its rows: the samples left would change nothing.
        if stats.values().all(|(_, st)| st.count() >= max_rows) {
            break;
        }
    }
    Ok(Calibration {
        stats: stats.into_values().collect(),
        samples: seen,
    })
}

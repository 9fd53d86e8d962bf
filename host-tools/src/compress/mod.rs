//! Compression of a graph's dense and convolution weights by a [`Recipe`], using calibration
//! statistics collected by running the model in our runtime.

pub mod calib;
pub mod recipe;
pub mod surgery;

use anyhow::{anyhow, bail, Context, Result};
use edgetune_core::layout::QBlockLayout;
use edgetune_core::{Encoding, Op};
use edgetune_quant::encode::{self, padded_k, Encoded};
use edgetune_quant::gptq::{
    gptq, refit_codebook, CodebookQuantizer, GptqConfig, GroupQuantizer, TernaryQuantizer,
};
use edgetune_quant::kmeans::{codebook_quantize_with, CodebookOptions, Granularity, KMeansConfig};
use edgetune_quant::lowrank::{lowrank_asvd, lowrank_svd, lowrank_svdllm, RankSelection};
use edgetune_quant::prune;
use edgetune_quant::scalar::{quantize_groups, quantize_int8_rows, ScaleSearch};
use edgetune_quant::stats::ActStats;
use edgetune_quant::ternary::{quantize_binary, quantize_ternary, TernaryChoice};
use serde::Serialize;

pub use calib::Calibration;
pub use recipe::{KeepEnds, LowRankKind, Method, RankChoice, Recipe, Rule};

use crate::ir::{ConstData, Graph, TensorId};

/// What happened to one layer.
#[derive(Debug, Clone, Serialize)]
pub struct LayerReport {
    /// Node name.
    pub name: String,
    /// Outputs × inputs.
    pub shape: (usize, usize),
    /// Encoding applied.
    pub method: String,
    /// Bytes as f32.
    pub f32_bytes: usize,
    /// Bytes as stored.
    pub bytes: usize,
    /// Relative Frobenius error of the stored weight.
    pub rel_error: f64,
    /// Why the layer got something other than its rule, if it did.
    pub note: Option<String>,
}

/// A compressible layer: a dense or convolution node with constant `[N, K]` f32 weights.
#[derive(Debug, Clone)]
pub struct Layer {
    /// Node index.
    pub node: usize,
    /// Node name.
    pub name: String,
    /// Weight tensor.
    pub weight: TensorId,
    /// Outputs.
    pub n: usize,
    /// Inputs.
    pub k: usize,
    /// An embedding table read by a gather (rows decoded on demand) rather than a weight.
    pub embedding: bool,
}

/// The compressible layers in execution order: dense layers, ungrouped convolutions, and
/// embedding tables gathered by row.
pub fn layers(g: &Graph) -> Vec<Layer> {
    g.nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| match n.op {
            Op::Dense(_) => true,
            Op::Conv(c) => c.groups == 1,
            Op::Gather { axis: 0 } => true,
            _ => false,
        })
        .filter_map(|(i, n)| {
            let embedding = matches!(n.op, Op::Gather { .. });
            let w = n.inputs[if embedding { 0 } else { 1 }];
            let t = &g.tensors[w];
            (t.value.as_ref().and_then(|v| v.as_f32()).is_some()
                && t.shape.len() == 2
                && t.encoded.is_none())
            .then(|| Layer {
                node: i,
                name: n.name.clone(),
                weight: w,
                n: t.shape[0],
                k: t.shape[1],
                embedding,
            })
        })
        .collect()
}

/// The method each layer gets, with the reason when it differs from its rule. Errors when a
/// rule matches no layer (a typo would otherwise silently compress nothing).
pub fn assign(
    layers: &[Layer],
    g: &Graph,
    recipe: &Recipe,
) -> Result<Vec<(Method, bool, Option<String>)>> {
    for r in &recipe.rules {
        let hit = layers.iter().any(|l| {
            recipe::glob(&r.pattern, &l.name) || recipe::glob(&r.pattern, &g.tensors[l.weight].name)
        });
        if !hit {
            let names: Vec<&str> = layers.iter().map(|l| l.name.as_str()).collect();
            bail!(
                "rule {:?} matches no layer; layers are: {}",
                r.pattern,
                names.join(", ")
            );
        }
    }
    let last = layers.len().saturating_sub(1);
    Ok(layers
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let rule = recipe.rules.iter().find(|r| {
                recipe::glob(&r.pattern, &l.name)
                    || recipe::glob(&r.pattern, &g.tensors[l.weight].name)
            });
            let (m, gptq) = rule
                .map(|r| (r.method.clone(), r.gptq))
                .unwrap_or((Method::F32, false));
            let end = (i == 0 || i == last) && layers.len() > 1;
            match recipe.keep_ends {
                KeepEnds::Int8 if end && m.is_aggressive() => (
                    Method::Int8,
                    false,
                    Some("first/last layer kept at int8".into()),
                ),
                KeepEnds::F32 if end && m != Method::F32 => (
                    Method::F32,
                    false,
                    Some("first/last layer kept at f32".into()),
                ),
                _ => (m, gptq, None),
            }
        })
        .collect())
}

/// Compresses the graph's weights in place and reports per layer.
pub fn compress(
    g: &mut Graph,
    recipe: &Recipe,
    calib: Option<&Calibration>,
    progress: bool,
) -> Result<Vec<LayerReport>> {
    let all = layers(g);
    let plan = assign(&all, g, recipe)?;
    let bar = progress.then(|| {
        let b = indicatif::ProgressBar::new(all.len() as u64);
        b.set_style(indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}").unwrap());
        b
    });
    let mut reports = Vec::new();
    // Channel pruning changes neighbours' shapes: it runs first, as graph surgery.
    for (l, (m, _, _)) in all.iter().zip(&plan) {
        if let Method::Channels { fraction } = m {
            let stats = calib.and_then(|c| c.stats.get(&l.name));
            let removed = surgery::prune_channels(g, &l.name, *fraction, stats)?;
            reports.push(LayerReport {
                name: l.name.clone(),
                shape: (l.n, l.k),
                method: m.label(),
                f32_bytes: l.n * l.k * 4,
                bytes: (l.n - removed) * l.k * 4,
                rel_error: f64::NAN,
                note: Some(format!("removed {removed} of {} output channels", l.n)),
            });
        }
    }
    let current = layers(g);
    for (l, (m, use_gptq, note)) in all.iter().zip(plan) {
        if let Some(b) = &bar {
            b.set_message(l.name.clone());
            b.inc(1);
        }
        if matches!(m, Method::Channels { .. }) {
            continue;
        }
        // Surgery (channels, low rank) changes shapes and node positions: look the layer up again.
        let Some(mut l) = current.iter().find(|c| c.name == l.name).cloned() else {
            continue;
        };
        let Some(node) = g
            .nodes
            .iter()
            .position(|n| n.name == l.name && n.inputs.contains(&l.weight))
        else {
            continue;
        };
        l.node = node;
        let l = &l;
        let stats = calib.and_then(|c| c.stats.get(&l.name));
        let ctx = Ctx {
            recipe,
            stats,
            gptq: use_gptq,
        };
        let r = apply(g, l, &m, &ctx).with_context(|| format!("layer {}", l.name))?;
        reports.push(LayerReport {
            note: r.note.or(note),
            ..r
        });
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(reports)
}

struct Ctx<'a> {
    recipe: &'a Recipe,
    stats: Option<&'a ActStats>,
    gptq: bool,
}

impl Ctx<'_> {
    /// Mean x² per input (importance), padded with zeros to `kp`.
    fn importance(&self, k: usize, kp: usize) -> Option<Vec<f32>> {
        self.stats.filter(|s| s.k() == k).map(|s| {
            let mut v = s.mean_sq();
            v.resize(kp, 0.0);
            v
        })
    }

    /// The input covariance `XᵀX / count − μμᵀ` padded with zero rows and columns to `kp`, when
    /// GPTQ is asked for.
    fn hessian(&self, k: usize, kp: usize) -> Result<Option<Vec<f64>>> {
        if !self.gptq {
            return Ok(None);
        }
        let s = self
            .stats
            .ok_or_else(|| anyhow!("GPTQ needs calibration data (--calib)"))?;
        // The covariance, not XᵀX: the bias takes the mean error (`apply`), GPTQ the rest.
        let h = s
            .covariance()
            .ok_or_else(|| anyhow!("GPTQ needs Gram statistics"))?;
        if s.k() != k {
            bail!(
                "calibration statistics have {} inputs, the weight {k}",
                s.k()
            );
        }
        let mut out = vec![0.0; kp * kp];
        for r in 0..k {
            out[r * kp..r * kp + k].copy_from_slice(&h[r * k..(r + 1) * k]);
        }
        Ok(Some(out))
    }
}

fn weight(g: &Graph, t: TensorId) -> Vec<f32> {
    g.tensors[t]
        .value
        .as_ref()
        .and_then(|v| v.as_f32())
        .expect("f32 weight")
        .to_vec()
}

/// A 4-bit weight with int8 activations whose tiles each take one table, rows interleaved by 16
/// (the runtime's row-tiled 4-bit GEMVs); any other weight as it is.
fn tiled_if_4bit(e: Encoded, n: usize, k: usize) -> Result<Encoded> {
    let l =
        QBlockLayout::new(n, k, e.params).ok_or_else(|| anyhow!("bad block-quantized layout"))?;
    if l.bits == 4 && l.int8_activations() && l.one_table_per_tile() {
        return Ok(encode::row_tiles(&e, n, k)?);
    }
    Ok(e)
}

/// The largest of 128, 64, 32 that divides `kp`, at most `want`.
fn fit_group(want: usize, kp: usize) -> usize {
    [want, 128, 64, 32]
        .into_iter()
        .find(|&g| g <= want && g % 32 == 0 && kp % g == 0)
        .unwrap_or(32)
}

fn store(g: &mut Graph, t: TensorId, e: Encoded) {
    g.tensors[t].encoded = Some(crate::ir::Encoded {
        encoding: e.encoding,
        bytes: e.bytes,
        params: e.params,
    });
}

/// The stored weight decoded back to f32 (`None` when it is stored as f32).
fn decoded(e: &Encoded, n: usize, k: usize) -> Option<Vec<f32>> {
    match e.encoding {
        Encoding::PanelF32 | Encoding::Plain => None,
        _ => Some(encode::decode(e, n, k).expect("decodes what we encoded")),
    }
}

/// Bias correction (Nagel et al. 2019): the weight error moves each output's mean by
/// `(W − Ŵ)μ` over the calibration inputs; the bias takes it back. Needs calibration data.
fn correct_bias(g: &mut Graph, l: &Layer, w: &[f32], back: &[f32], ctx: &Ctx<'_>) {
    let k = l.k;
    let Some(mu) = ctx.stats.filter(|s| s.k() == k).map(|s| s.mean()) else {
        return;
    };
    let shift: Vec<f32> = w
        .chunks_exact(k)
        .zip(back.chunks_exact(k))
        .map(|(wr, br)| {
            wr.iter()
                .zip(br)
                .zip(&mu)
                .map(|((a, b), m)| (a - b) as f64 * m)
                .sum::<f64>() as f32
        })
        .collect();
    crate::passes::add_bias(g, l.node, &shift, 1.0);
}

/// Relative Frobenius error of the stored weight (0 when it is stored as f32).
fn rel_error(w: &[f32], back: Option<&[f32]>) -> f64 {
    back.map_or(0.0, |b| {
        edgetune_quant::metrics::rel_frobenius_error(w, b).unwrap_or(f64::NAN)
    })
}

/// Encodes an `n × k` matrix with a (non-structural) method.
fn encode_matrix(
    w: &[f32],
    n: usize,
    k: usize,
    m: &Method,
    ctx: &Ctx<'_>,
) -> Result<(Encoded, Option<String>)> {
    let kp = padded_k(k);
    let int8 = ctx.recipe.int8_activations;
    let mut note = None;
    let e = match m {
        Method::F32 => Encoded {
            encoding: Encoding::PanelF32,
            bytes: crate::pack::pack_panels(w, n, k),
            params: [0; 4],
        },
        Method::F16 => encode::encode_panel_f16(w, n, k),
        Method::Int8 => encode::encode_int8_rows(&quantize_int8_rows(w, n, k)?, int8)?,
        Method::Int4 { group } | Method::Ternary { group } | Method::Binary { group } => {
            let grp = fit_group(*group, kp);
            if grp != *group {
                note = Some(format!(
                    "group {group} does not divide the padded row of {kp}: used {grp}"
                ));
            }
            let wp = encode::pad_columns(w, n, k);
            let imp = ctx.importance(k, kp);
            let h = ctx.hessian(k, kp)?;
            let cfg = GptqConfig::default();
            match m {
                Method::Int4 { .. } => {
                    let q = match &h {
                        Some(h) => {
                            let mut qz = GroupQuantizer::new(
                                n,
                                kp,
                                4,
                                grp,
                                imp.as_deref(),
                                ScaleSearch::Grid,
                            )?;
                            gptq(&wp, n, kp, h, &cfg, &mut qz)?;
                            qz.into_group_quant()
                        }
                        None => {
                            quantize_groups(&wp, n, kp, 4, grp, imp.as_deref(), ScaleSearch::Grid)?
                        }
                    };
                    tiled_if_4bit(encode::encode_groups(&q, int8)?, n, k)?
                }
                Method::Ternary { .. } => {
                    let t = match &h {
                        Some(h) => {
                            let mut qz = TernaryQuantizer::new(
                                n,
                                kp,
                                grp,
                                imp.as_deref(),
                                TernaryChoice::Best,
                            )?;
                            gptq(&wp, n, kp, h, &cfg, &mut qz)?;
                            qz.into_ternary()
                        }
                        None => quantize_ternary(&wp, n, kp, grp, imp.as_deref())?,
                    };
                    let rows = encode::encode_ternary(&t, int8)?;
                    if int8 {
                        // Rows interleaved by 16: the runtime's row-tiled ternary GEMVs.
                        encode::row_tiles(&rows, n, k)?
                    } else {
                        rows
                    }
                }
                _ => {
                    if h.is_some() {
                        note = Some("GPTQ not used for binary weights".into());
                    }
                    encode::encode_binary(&quantize_binary(&wp, n, kp, grp, imp.as_deref())?, int8)?
                }
            }
        }
        Method::Codebook {
            bits,
            rows_per_table,
            scale_group,
        } => {
            let imp = ctx.importance(k, k);
            let gran = match rows_per_table {
                0 => Granularity::PerTensor,
                1 => Granularity::PerRow,
                r => Granularity::PerGroupOfRows(*r),
            };
            let mut opts = CodebookOptions::new(*bits, gran, imp.as_deref());
            if *scale_group > 0 {
                let g = fit_group(*scale_group, kp);
                if g != *scale_group {
                    note = Some(format!("scale group {scale_group} does not divide the padded row of {kp}: used {g}"));
                }
                opts.scale_group = Some(g);
            } else if *rows_per_table != 1 {
                // Tables shared by several rows fit each row's range better with a row scale.
                opts.row_scaling = edgetune_quant::kmeans::RowScaling::Auto;
            }
            opts.kmeans = KMeansConfig {
                seed: ctx.recipe.seed,
                ..KMeansConfig::default()
            };
            let mut cb = codebook_quantize_with(w, n, k, &opts)?;
            if let Some(h) = ctx.hessian(k, k)? {
                // GPTQ re-assigns indices against the fixed tables and scales, pushing errors
                // forward; the columns with the largest input energy go first ("act-order"),
                // which matters for transformers' outlier channels.
                let mut order: Vec<usize> = (0..k).collect();
                order.sort_by(|&a, &b| h[b * k + b].total_cmp(&h[a * k + a]));
                let wp: Vec<f32> = (0..n * k).map(|i| w[i / k * k + order[i % k]]).collect();
                let hp: Vec<f64> = (0..k * k)
                    .map(|i| h[order[i / k] * k + order[i % k]])
                    .collect();
                let mut qz = CodebookQuantizer::new(cb)?.with_column_order(order)?;
                gptq(&wp, n, k, &hp, &GptqConfig::default(), &mut qz)?;
                cb = qz.into_codebook();
                // With the indices chosen, tables and scales fitted to the layer's output.
                refit_codebook(&mut cb, w, &h)?;
            }
            tiled_if_4bit(encode::encode_codebook(&cb, int8)?, n, k)?
        }
        Method::Sparse { keep, m } => {
            if k % m != 0 {
                note = Some(format!(
                    "{keep}:{m} needs inputs in multiples of {m}, this layer has {k}: kept int8"
                ));
                encode::encode_int8_rows(&quantize_int8_rows(w, n, k)?, int8)?
            } else {
                let scores = match ctx.stats.filter(|s| s.k() == k) {
                    Some(s) => prune::wanda_scores(w, n, k, &s.col_l2_norms())?,
                    None => w.iter().map(|v| v.abs()).collect(),
                };
                let mask = prune::nm_mask(&scores, n, k, *keep, *m)?;
                encode::encode_sparse(w, &mask, n, k, *keep, *m)?
            }
        }
        Method::Unstructured { fraction, then } => {
            let scores = match ctx.stats.filter(|s| s.k() == k) {
                Some(s) => prune::wanda_scores(w, n, k, &s.col_l2_norms())?,
                None => w.iter().map(|v| v.abs()).collect(),
            };
            let mask = prune::row_mask(&scores, n, k, *fraction)?;
            let mut wm = w.to_vec();
            prune::apply_mask(&mut wm, &mask)?;
            let (e, n2) = encode_matrix(&wm, n, k, then, ctx)?;
            note = n2.or(Some(format!(
                "{:.0}% of weights zeroed, stored as {}",
                fraction * 100.0,
                then.label()
            )));
            e
        }
        Method::LowRank { .. } | Method::Channels { .. } => {
            bail!("{} is a graph rewrite, not an encoding", m.label())
        }
    };
    Ok((e, note))
}

fn apply(g: &mut Graph, l: &Layer, m: &Method, ctx: &Ctx<'_>) -> Result<LayerReport> {
    let w = weight(g, l.weight);
    let (n, k) = (l.n, l.k);
    if l.embedding {
        return embedding(g, l, &w, m, ctx);
    }
    if let Method::LowRank {
        rank,
        aware,
        factors,
    } = m
    {
        return low_rank(g, l, &w, *rank, *aware, factors, ctx);
    }
    let (e, note) = encode_matrix(&w, n, k, m, ctx)?;
    let back = decoded(&e, n, k);
    let rel = rel_error(&w, back.as_deref());
    if let Some(back) = &back {
        correct_bias(g, l, &w, back, ctx);
    }
    let bytes = e.bytes.len();
    if e.encoding == Encoding::PanelF32 {
        g.tensors[l.weight].encoding = Encoding::PanelF32;
    } else {
        store(g, l.weight, e);
    }
    fix_conv_tile(g, l.node)?;
    Ok(LayerReport {
        name: l.name.clone(),
        shape: (n, k),
        method: m.label(),
        f32_bytes: n * k * 4,
        bytes,
        rel_error: rel,
        note,
    })
}

/// Embedding tables take the block-quantized encodings (rows decoded when gathered); other
/// methods fall back to int8.
fn embedding(
    g: &mut Graph,
    l: &Layer,
    w: &[f32],
    m: &Method,
    ctx: &Ctx<'_>,
) -> Result<LayerReport> {
    let (n, k) = (l.n, l.k);
    let report = |method: &Method, bytes, rel, note| LayerReport {
        name: l.name.clone(),
        shape: (n, k),
        method: format!("{} (embedding)", method.label()),
        f32_bytes: n * k * 4,
        bytes,
        rel_error: rel,
        note,
    };
    if *m == Method::F32 {
        return Ok(report(m, n * k * 4, 0.0, None));
    }
    let (method, note) = match m {
        Method::Int8
        | Method::Int4 { .. }
        | Method::Codebook { .. }
        | Method::Ternary { .. }
        | Method::Binary { .. } => (m.clone(), None),
        other => (
            Method::Int8,
            Some(format!(
                "{} does not apply to an embedding table: int8",
                other.label()
            )),
        ),
    };
    // Gathered rows are decoded in f32: the int8-activation flag does not apply.
    let recipe = Recipe {
        int8_activations: false,
        ..ctx.recipe.clone()
    };
    let inner = Ctx {
        recipe: &recipe,
        stats: None,
        gptq: false,
    };
    let (e, n2) = encode_matrix(w, n, k, &method, &inner)?;
    let rel = rel_error(w, decoded(&e, n, k).as_deref());
    let bytes = e.bytes.len();
    store(g, l.weight, e);
    Ok(report(&method, bytes, rel, note.or(n2)))
}

/// Compressed convolution weights read contiguous rows: give pointwise convolutions an im2col
/// tile too (the kernel contract in core/FORMAT.md).
fn fix_conv_tile(g: &mut Graph, node: usize) -> Result<()> {
    if !matches!(g.nodes[node].op, Op::Conv(_)) {
        return Ok(());
    }
    let w = g.nodes[node].inputs[1];
    let needs_rows = matches!(
        g.tensors[w].encoded.as_ref().map(|e| e.encoding),
        Some(Encoding::QBlock | Encoding::SparseNM)
    );
    let out = &g.tensors[g.nodes[node].output];
    let pixels = out.shape[2] * out.shape[3];
    let k = g.tensors[w].shape[1];
    if let Op::Conv(c) = &mut g.nodes[node].op {
        if needs_rows && c.col_tile == 0 {
            c.col_tile = ((64 * 1024) / (4 * k)).clamp(1, pixels) as u32;
        }
    }
    Ok(())
}

fn low_rank(
    g: &mut Graph,
    l: &Layer,
    w: &[f32],
    rank: RankChoice,
    aware: LowRankKind,
    factors: &Method,
    ctx: &Ctx<'_>,
) -> Result<LayerReport> {
    let (n, k) = (l.n, l.k);
    let sel = match rank {
        RankChoice::Energy(e) => RankSelection::Energy(e),
        RankChoice::Params(f) => RankSelection::ParamBudget(f),
        RankChoice::Fixed(r) => RankSelection::Fixed(r),
    };
    let stats = ctx.stats.filter(|s| s.k() == k);
    let lr = match aware {
        LowRankKind::Svd => lowrank_svd(w, n, k, sel, stats.and_then(|s| s.gram()))?,
        LowRankKind::Asvd => {
            let s = stats
                .ok_or_else(|| anyhow!("activation-aware SVD needs calibration data (--calib)"))?;
            lowrank_asvd(w, n, k, sel, &s.mean_abs(), 0.5, s.gram())?
        }
        LowRankKind::SvdLlm => {
            let s = stats.ok_or_else(|| anyhow!("SVD-LLM needs calibration data (--calib)"))?;
            let gram = s
                .gram()
                .ok_or_else(|| anyhow!("SVD-LLM needs Gram statistics"))?;
            lowrank_svdllm(w, n, k, sel, gram, 0.01)?
        }
    };
    let r = lr.singular_values.len().min(lr.v.len() / k);
    // W ≈ U·V: y = U (V x). V is [r, K] (same geometry as W), U is [N, r] (pointwise).
    let inner = Ctx {
        recipe: ctx.recipe,
        stats: None,
        gptq: false,
    };
    let (ev, _) = encode_matrix(&lr.v, r, k, factors, &inner)?;
    let (eu, _) = encode_matrix(&lr.u, n, r, factors, &inner)?;
    let bytes = ev.bytes.len() + eu.bytes.len();
    surgery::split_low_rank(g, l.node, (r, lr.v.clone(), ev), (lr.u.clone(), eu))?;
    let approx = lr.reconstruct();
    let rel = edgetune_quant::metrics::rel_frobenius_error(w, &approx).unwrap_or(f64::NAN);
    Ok(LayerReport {
        name: l.name.clone(),
        shape: (n, k),
        method: format!("lowrank r={r} {aware:?} ({})", factors.label()),
        f32_bytes: n * k * 4,
        bytes,
        rel_error: rel,
        note: None,
    })
}

/// Replaces a constant's values (used by surgery).
pub(crate) fn set_f32(g: &mut Graph, t: TensorId, shape: Vec<usize>, v: Vec<f32>) {
    g.tensors[t].shape = shape;
    g.tensors[t].value = Some(ConstData::F32(v));
    g.tensors[t].encoded = None;
}

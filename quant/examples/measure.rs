//! Prints reconstruction errors of every encoder on synthetic matrices.
//!
//! `cargo run --release -p edgetune-quant --example measure`
//!
//! Matrices are 384 x 1536 (a small transformer's FFN), Gaussian and Student-t (ν = 3, heavy
//! tails). Calibration activations are correlated (x = z A with a random mixing matrix).

use std::time::Instant;

use edgetune_quant::gptq::{gptq, CodebookQuantizer, GptqConfig, GroupQuantizer, TernaryQuantizer};
use edgetune_quant::kmeans::{codebook_quantize_with, CodebookOptions, Granularity, RowScaling};
use edgetune_quant::lowrank::{lowrank_asvd, lowrank_svd, lowrank_svdllm, RankSelection};
use edgetune_quant::metrics::{rel_activation_error, rel_frobenius_error};
use edgetune_quant::prune::{apply_mask, magnitude_mask, nm_mask, wanda_mask, wanda_scores};
use edgetune_quant::rng::SplitMix64;
use edgetune_quant::scalar::{quantize_groups, quantize_int8_rows, ScaleSearch};
use edgetune_quant::stats::ActStats;
use edgetune_quant::ternary::{quantize_binary, quantize_ternary_with, TernaryChoice};

fn student_t(rng: &mut SplitMix64, nu: usize) -> f32 {
    let z = rng.next_gaussian();
    let chi2: f64 = (0..nu).map(|_| rng.next_gaussian().powi(2)).sum();
    (z / (chi2 / nu as f64).sqrt()) as f32
}

fn correlated(k: usize, m: usize, seed: u64) -> Vec<f32> {
    // Low-rank structure (rank 32) plus isotropic noise, and outlier channels (x20 on every
    // 97th channel), as seen in transformer activations.
    let mut rng = SplitMix64::new(seed);
    let rank = 32;
    let b: Vec<f64> = (0..rank * k).map(|_| rng.next_gaussian()).collect();
    let mut x = vec![0f32; m * k];
    let mut z = vec![0f64; rank];
    for t in 0..m {
        for v in z.iter_mut() {
            *v = rng.next_gaussian() / (rank as f64).sqrt();
        }
        for c in 0..k {
            let mut s = 0.3 * rng.next_gaussian();
            for (j, zj) in z.iter().enumerate() {
                s += zj * b[j * k + c];
            }
            x[t * k + c] = (s * if c % 97 == 0 { 20.0 } else { 1.0 }) as f32;
        }
    }
    x
}

fn main() {
    let (n, k) = (384usize, 1536usize);
    let mut rng = SplitMix64::new(42);
    let gauss = rng.gaussian_vec(n * k);
    let heavy: Vec<f32> = (0..n * k).map(|_| student_t(&mut rng, 3)).collect();
    println!("calibration: 2048 correlated activation rows of width {k} ...");
    let x = correlated(k, 2048, 7);
    let t = Instant::now();
    let mut st = ActStats::new(k, true).unwrap();
    st.update(&x, k).unwrap();
    let h = st.hessian().unwrap();
    let imp = st.mean_sq();
    println!("  ActStats::update (with Gram) in {:.2?}", t.elapsed());
    let t = Instant::now();
    let km =
        edgetune_quant::kmeans::kmeans_1d(&x[..n * k], None, 256, &Default::default()).unwrap();
    println!(
        "  kmeans_1d 256 clusters on {} values: {:.2?} ({} iterations)",
        n * k,
        t.elapsed(),
        km.iterations
    );

    for (name, w) in [("gaussian", &gauss), ("student-t3", &heavy)] {
        println!("\n== {name} {n}x{k}: relative Frobenius error | relative activation error ==");
        let rep = |label: &str, bpw: f64, wh: &[f32], secs: f64| {
            let f = rel_frobenius_error(w, wh).unwrap();
            let a = rel_activation_error(w, wh, n, k, &h).unwrap();
            println!("{label:<44} {bpw:>6.3} b/w   frob {f:.4}   act {a:.4}   ({secs:.2}s)");
        };
        macro_rules! time {
            ($e:expr) => {{
                let t = Instant::now();
                let v = $e;
                (v, t.elapsed().as_secs_f64())
            }};
        }
        let (q8, s) = time!(quantize_int8_rows(w, n, k).unwrap());
        rep("int8 per row", 8.0 + 16.0 / k as f64, &q8.dequantize(), s);
        for g in [32usize, 64, 128] {
            let (a, s) = time!(quantize_groups(w, n, k, 4, g, None, ScaleSearch::AbsMax).unwrap());
            rep(
                &format!("int4 g{g} absmax RTN"),
                4.0 + 16.0 / g as f64,
                &a.dequantize(),
                s,
            );
            let (b, s) = time!(quantize_groups(w, n, k, 4, g, None, ScaleSearch::Grid).unwrap());
            rep(
                &format!("int4 g{g} grid search"),
                4.0 + 16.0 / g as f64,
                &b.dequantize(),
                s,
            );
        }
        let (b, s) = time!(quantize_groups(w, n, k, 4, 64, Some(&imp), ScaleSearch::Grid).unwrap());
        rep("int4 g64 grid + imatrix", 4.25, &b.dequantize(), s);
        for (gran, label, tables) in [
            (Granularity::PerTensor, "per tensor", 1usize),
            (Granularity::PerGroupOfRows(16), "per 16 rows", n / 16),
            (Granularity::PerRow, "per row", n),
        ] {
            for rs in [RowScaling::Off, RowScaling::Auto] {
                let mut o = CodebookOptions::new(4, gran, None);
                o.row_scaling = rs;
                let (cb, s) = time!(codebook_quantize_with(w, n, k, &o).unwrap());
                let extra = (tables * 16 * 16) as f64 / (n * k) as f64
                    + if cb.scales.is_some() {
                        16.0 / k as f64
                    } else {
                        0.0
                    };
                let l = format!(
                    "codebook 4b {label}{}",
                    match (rs, cb.scales.is_some()) {
                        (RowScaling::Off, _) => "",
                        (_, true) => " auto: row scale",
                        (_, false) => " auto: no row scale",
                    }
                );
                rep(&l, 4.0 + extra, &cb.dequantize(), s);
            }
        }
        let mut o = CodebookOptions::new(4, Granularity::PerRow, Some(&imp));
        let (cb, s) = time!(codebook_quantize_with(w, n, k, &o).unwrap());
        rep(
            "codebook 4b per row + imatrix",
            4.0 + 256.0 / k as f64,
            &cb.dequantize(),
            s,
        );
        o.importance = None;
        for bits in [2u32, 3] {
            o.bits = bits;
            let (cb, s) = time!(codebook_quantize_with(w, n, k, &o).unwrap());
            rep(
                &format!("codebook {bits}b per row"),
                bits as f64 + (16 << bits) as f64 / k as f64,
                &cb.dequantize(),
                s,
            );
            let (a, s) =
                time!(quantize_groups(w, n, k, bits, 64, None, ScaleSearch::Grid).unwrap());
            rep(
                &format!("int{bits} g64 grid search"),
                bits as f64 + 0.25,
                &a.dequantize(),
                s,
            );
        }
        for (ch, l) in [
            (TernaryChoice::Twn, "TWN"),
            (TernaryChoice::AbsMean, "absmean"),
            (TernaryChoice::Best, "best-of"),
        ] {
            let (t, s) = time!(quantize_ternary_with(w, n, k, 64, None, ch).unwrap());
            let frac = t
                .methods
                .iter()
                .filter(|m| matches!(m, edgetune_quant::ternary::TernaryMethod::Twn))
                .count() as f64
                / t.methods.len() as f64;
            rep(
                &format!("ternary g64 {l} (TWN chosen {:.0}%)", frac * 100.0),
                1.58 + 0.25,
                &t.dequantize(),
                s,
            );
        }
        let (b, s) = time!(quantize_binary(w, n, k, 64, None).unwrap());
        rep("binary g64", 1.25, &b.dequantize(), s);

        // GPTQ vs RTN
        let cfg = GptqConfig::default();
        let (out, s) = time!({
            let mut q = GroupQuantizer::new(n, k, 4, 64, None, ScaleSearch::Grid).unwrap();
            gptq(w, n, k, &h, &cfg, &mut q).unwrap()
        });
        rep("GPTQ int4 g64 (grid)", 4.25, &out.w_hat, s);
        let (out, s) = time!({
            let mut q = GroupQuantizer::new(n, k, 4, 64, Some(&imp), ScaleSearch::Grid).unwrap();
            gptq(w, n, k, &h, &cfg, &mut q).unwrap()
        });
        rep("GPTQ int4 g64 (grid + imatrix)", 4.25, &out.w_hat, s);
        let (out, s) = time!({
            let mut q = GroupQuantizer::new(n, k, 3, 64, None, ScaleSearch::Grid).unwrap();
            gptq(w, n, k, &h, &cfg, &mut q).unwrap()
        });
        rep("GPTQ int3 g64 (grid)", 3.25, &out.w_hat, s);
        let (out, s) = time!({
            let mut q = TernaryQuantizer::new(n, k, 64, None, TernaryChoice::Best).unwrap();
            gptq(w, n, k, &h, &cfg, &mut q).unwrap()
        });
        rep("GPTQ ternary g64", 1.83, &out.w_hat, s);
        let cb =
            codebook_quantize_with(w, n, k, &CodebookOptions::new(4, Granularity::PerRow, None))
                .unwrap();
        let (out, s) = time!({
            let mut q = CodebookQuantizer::new(cb).unwrap();
            gptq(w, n, k, &h, &cfg, &mut q).unwrap()
        });
        rep(
            "GPTQ codebook 4b per row (plain tables)",
            4.0 + 256.0 / k as f64,
            &out.w_hat,
            s,
        );
        let o = CodebookOptions::new(4, Granularity::PerRow, Some(&imp));
        let cb = codebook_quantize_with(w, n, k, &o).unwrap();
        let (out, s) = time!({
            let mut q = CodebookQuantizer::new(cb).unwrap();
            gptq(w, n, k, &h, &cfg, &mut q).unwrap()
        });
        rep(
            "GPTQ codebook 4b per row (imatrix tables)",
            4.0 + 256.0 / k as f64,
            &out.w_hat,
            s,
        );

        // Low rank at 50% parameters.
        let sel = RankSelection::ParamBudget(0.5);
        let (lr, s) = time!(lowrank_svd(w, n, k, sel, None).unwrap());
        rep(
            &format!("SVD rank {} (50% params)", lr.rank),
            16.0,
            &lr.reconstruct(),
            s,
        );
        let (lr, s) = time!(lowrank_asvd(w, n, k, sel, &st.mean_abs(), 0.5, None).unwrap());
        rep(
            &format!("ASVD a=0.5 rank {}", lr.rank),
            16.0,
            &lr.reconstruct(),
            s,
        );
        let (lr, s) = time!(lowrank_svdllm(w, n, k, sel, st.gram().unwrap(), 0.01).unwrap());
        rep(
            &format!("SVD-LLM rank {}", lr.rank),
            16.0,
            &lr.reconstruct(),
            s,
        );

        // Pruning 50%
        let prune = |mask: Vec<bool>| {
            let mut wp = w.clone();
            apply_mask(&mut wp, &mask).unwrap();
            wp
        };
        let norms = st.col_l2_norms();
        let (m, s) = time!(magnitude_mask(w, n, k, 0.5).unwrap());
        rep("prune 50% magnitude", 16.0, &prune(m), s);
        let (m, s) = time!(wanda_mask(w, n, k, &norms, 0.5).unwrap());
        rep("prune 50% wanda", 16.0, &prune(m), s);
        let mags: Vec<f32> = w.iter().map(|v| v.abs()).collect();
        let (m, s) = time!(nm_mask(&mags, n, k, 2, 4).unwrap());
        rep("prune 2:4 magnitude", 16.0, &prune(m), s);
        let (m, s) = time!(nm_mask(&wanda_scores(w, n, k, &norms).unwrap(), n, k, 2, 4).unwrap());
        rep("prune 2:4 wanda", 16.0, &prune(m), s);
    }
}

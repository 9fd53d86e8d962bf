//! Compression end to end, through the `edgetune compress` command: real models come out smaller
//! and still right, compressed weights are never expanded at run time, and recipes that cannot
//! apply say so.

use std::path::{Path, PathBuf};

use clap::Parser;
use edgetune_cli::commands::{self, eval, Cli};
use edgetune_cli::compress::{calib, compress, KeepEnds, Method, Recipe, Rule};
use edgetune_cli::ir::{ConstData, Graph};
use edgetune_cli::model_file::AlignedBytes;
use edgetune_cli::npy::{self, Array, ArrayData};
use edgetune_cli::pack::pack;
use edgetune_cli::runner::Ours;
use edgetune_core::ops::Dense;
use edgetune_core::{Activation, DType, Encoding, Model, Op};
use edgetune_tests::{digits, shared};

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("edgetune-compress-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// Runs `edgetune COMMAND MODEL -o OUT FLAGS...`.
fn edgetune(command: &str, model: &Path, out: &Path, flags: &[&str]) -> anyhow::Result<()> {
    let mut argv = vec![
        "edgetune".to_string(),
        command.into(),
        model.display().to_string(),
        "-o".into(),
        out.display().to_string(),
    ];
    argv.extend(flags.iter().map(|s| s.to_string()));
    commands::run(Cli::try_parse_from(argv)?)
}

/// Runs `edgetune compress MODEL -o OUT --quiet FLAGS...`.
fn edgetune_compress(model: &Path, out: &Path, flags: &[&str]) -> anyhow::Result<()> {
    edgetune("compress", model, out, &[&["--quiet"], flags].concat())
}

fn accuracy(etm: &Path, x: &Array, y: &[i64]) -> f64 {
    let mut ours = Ours::load(etm).unwrap();
    eval::evaluate(&mut ours, None, std::slice::from_ref(x), Some(y), None)
        .unwrap()
        .accuracy
        .unwrap()
}

#[test]
fn digits_cnn_stays_accurate_compressed() {
    let x = npy::read(&digits("x_test.npy")).unwrap();
    let y = npy::read(&digits("y_test.npy")).unwrap().to_i64();
    let calib = format!("x={}", digits("x_train.npy").display());
    let onnx = digits("cnn.onnx");
    let f32_etm = tmp("cnn-f32.etm");
    edgetune("import", &onnx, &f32_etm, &["--input", "x=50x1x8x8"]).unwrap();
    let base = accuracy(&f32_etm, &x, &y);
    let f32_bytes = std::fs::metadata(&f32_etm).unwrap().len();
    // The torch model's accuracy (99.56%), reproduced by the uncompressed file.
    assert!((base - 448.0 / 450.0).abs() < 1e-9, "f32 accuracy {base}");
    // (flags, largest accuracy drop in points, at least this many times smaller than f32)
    let cases: [(&[&str], f64, f64); 3] = [
        (&["--int8"], 0.2, 2.9),
        (&["--codebook", "4"], 0.5, 3.5),
        (&["--prune", "0.5", "--pattern", "2:4"], 1.0, 2.5),
    ];
    for (flags, max_drop, smaller) in cases {
        let out = tmp("cnn-c.etm");
        let mut all = vec!["--input", "x=50x1x8x8", "--calib", &calib];
        all.extend_from_slice(flags);
        edgetune_compress(&onnx, &out, &all).unwrap();
        let acc = accuracy(&out, &x, &y);
        let bytes = std::fs::metadata(&out).unwrap().len();
        println!(
            "{flags:?}: accuracy {:.2}% (f32 {:.2}%), {bytes} bytes ({:.2}x smaller)",
            acc * 100.0,
            base * 100.0,
            f32_bytes as f64 / bytes as f64
        );
        assert!(
            (base - acc) * 100.0 <= max_drop + 1e-9,
            "{flags:?}: accuracy {acc} vs {base}"
        );
        assert!(
            f32_bytes as f64 / bytes as f64 >= smaller,
            "{flags:?}: {bytes} bytes vs {f32_bytes}"
        );
    }
}

#[test]
fn minilm_int8_embeddings_match_the_float_model() {
    let onnx = shared("minilm-l6/model.onnx");
    let shapes = [
        "--input",
        "input_ids=32x16",
        "--input",
        "attention_mask=32x16",
        "--input",
        "token_type_ids=32x16",
    ];
    let names = ["input_ids", "attention_mask", "token_type_ids"];
    let data: Vec<Array> = names
        .iter()
        .map(|n| npy::read(&shared(&format!("minilm-l6/seq16_{n}.npy"))).unwrap())
        .collect();
    let run = |etm: &Path| -> Vec<f32> {
        let mut ours = Ours::load(etm).unwrap();
        ours.run(&data).unwrap()[0].to_f32()
    };
    let (f32_etm, int8_etm) = (tmp("minilm-f32.etm"), tmp("minilm-int8.etm"));
    edgetune("import", &onnx, &f32_etm, &shapes).unwrap();
    edgetune_compress(&onnx, &int8_etm, &[&shapes[..], &["--int8"]].concat()).unwrap();
    let (a, b) = (run(&f32_etm), run(&int8_etm));
    let worst = a
        .chunks(384)
        .zip(b.chunks(384))
        .map(|(p, q)| edgetune_cli::metrics::cosine(p, q) as f64)
        .fold(1.0f64, f64::min);
    let (fa, fb) = (
        std::fs::metadata(&f32_etm).unwrap().len(),
        std::fs::metadata(&int8_etm).unwrap().len(),
    );
    println!(
        "MiniLM int8 (32 sentences, seq 16): worst cosine to f32 {worst:.5}; {fb} bytes vs {fa}"
    );
    assert!(worst >= 0.999, "worst cosine {worst}");
    assert!((fb as f64) < fa as f64 / 3.5, "{fb} vs {fa}");
}

/// A `[1, k] → [1, n]` dense layer with a deterministic weight.
fn one_layer(n: usize, k: usize) -> Graph {
    let mut g = Graph::default();
    let x = g.activation("x", DType::F32, vec![1, k]);
    g.inputs.push(("x".into(), x));
    let w: Vec<f32> = (0..n * k)
        .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.05)
        .collect();
    let wt = g.constant("w", DType::F32, vec![n, k], ConstData::F32(w));
    let y = g.push(
        "fc",
        Op::Dense(Dense {
            act: Activation::NONE,
        }),
        vec![x, wt],
        DType::F32,
        vec![1, n],
    );
    g.outputs.push(("y".into(), y));
    g
}

#[test]
fn compressed_weights_are_never_expanded() {
    // A 1024×1024 layer is 4 MiB as f32. The runtime has no heap (no_std, no alloc): all it can
    // write is the arena and the stack. The arena here is a few KiB, and the run happens on a
    // thread with a 256 KiB stack, so there is nowhere to put an f32 copy of the weight; the
    // result still matches the weight's decoded values.
    let (n, k) = (1024, 1024);
    let methods = [
        Method::Int8,
        Method::Int4 { group: 32 },
        Method::Codebook {
            bits: 4,
            rows_per_table: 1,
            scale_group: 0,
        },
        Method::Ternary { group: 64 },
        Method::Binary { group: 64 },
        Method::Sparse { keep: 2, m: 4 },
    ]
    .map(|m| (m, false));
    // Ternary, and a 4-bit codebook with a table per 16 rows and a scale per 64 inputs (MiniLM's
    // recipe), with int8 activations: the row-tiled layouts and their integer kernels.
    let cb_tiles = Method::Codebook {
        bits: 4,
        rows_per_table: 16,
        scale_group: 64,
    };
    let methods = methods
        .into_iter()
        .chain([(Method::Ternary { group: 64 }, true), (cb_tiles, true)]);
    let x: Vec<f32> = (0..k).map(|i| ((i * 31 % 17) as f32 - 8.0) / 8.0).collect();
    for (m, int8_activations) in methods {
        let mut g = one_layer(n, k);
        let rule = Rule {
            pattern: "*".into(),
            method: m.clone(),
            gptq: false,
        };
        compress(
            &mut g,
            &Recipe {
                rules: vec![rule],
                keep_ends: KeepEnds::Same,
                int8_activations,
                ..Recipe::default()
            },
            None,
            false,
        )
        .unwrap();
        let enc = g.tensors[1].encoded.clone().expect("weight encoded");
        assert_eq!(
            enc.params[3] & edgetune_core::layout::QFLAG_ROW_TILES != 0,
            int8_activations,
            "{}: rows are tiled exactly when activations are int8",
            m.label()
        );
        let decoded = edgetune_quant::encode::decode(
            &edgetune_quant::encode::Encoded {
                encoding: enc.encoding,
                bytes: enc.bytes.clone(),
                params: enc.params,
            },
            n,
            k,
        )
        .unwrap();
        // With int8 activations the kernels multiply the tables' int8 copies.
        let decoded = if int8_activations {
            int8_table_weights(&enc.bytes, enc.params, n, k)
        } else {
            decoded
        };
        let (bytes, _) = pack(&g).unwrap();
        let ab = AlignedBytes::from(&bytes[..]);
        let model = Model::from_bytes(ab.as_bytes()).unwrap();
        let w = model.tensor(model.op(0).input(1));
        assert_ne!(w.meta.encoding, Encoding::Plain);
        assert_ne!(w.meta.encoding, Encoding::PanelF32);
        let arena = model.arena_bytes() as usize;
        assert!(
            arena * 256 < n * k * 4,
            "{}: arena of {arena} bytes",
            m.label()
        );
        let xs = x.clone();
        let y = std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(move || {
                let mut ours = Ours::from_bytes(AlignedBytes::from(&bytes[..])).unwrap();
                ours.run(&[Array {
                    shape: vec![1, k],
                    data: ArrayData::F32(xs),
                }])
                .unwrap()[0]
                    .to_f32()
            })
            .unwrap()
            .join()
            .unwrap();
        // With int8 activations the kernel sees x as its Q8 blocks decode.
        let mut xq = x.clone();
        if int8_activations {
            let mut q8 = vec![0u8; edgetune_runtime::kernels::qgemm::q8_row_bytes(k)];
            edgetune_runtime::kernels::qgemm::quantize_q8(&x, &mut q8);
            let (codes, scales) = q8.split_at(k);
            for (i, v) in xq.iter_mut().enumerate() {
                let d = &scales[4 * (i / 32)..4 * (i / 32) + 4];
                *v = codes[i] as i8 as f32 * f32::from_le_bytes(d.try_into().unwrap());
            }
        }
        let want: Vec<f64> = (0..n)
            .map(|j| {
                (0..k)
                    .map(|i| decoded[j * k + i] as f64 * xq[i] as f64)
                    .sum()
            })
            .collect();
        let worst = y
            .iter()
            .zip(&want)
            .map(|(&y, w)| (y as f64 - w).abs())
            .fold(0.0, f64::max);
        let largest = want.iter().fold(0.0f64, |a, w| a.max(w.abs()));
        let acts = if int8_activations {
            ", int8 activations"
        } else {
            ""
        };
        println!("{}{acts}: {} weight bytes (f32: {}), arena {arena} bytes, max |y - decoded·x| {worst:.2e} (max |y| {largest:.2})", m.label(), w.len, n * k * 4);
        assert!(
            largest > 0.1,
            "{}: a trivial output proves nothing",
            m.label()
        );
        // Equal to the decoded weight's product (with f32 activations, or with the activations'
        // int8 blocks) up to f32 summation and scaling (x is dyadic here, so most f32 sums are
        // exact).
        assert!(
            worst < 1e-5 * largest.max(1.0),
            "{}{acts}: {worst}",
            m.label()
        );
    }
}

/// The weights a block-quantized tensor with int8 activations multiplies:
/// `scale · lut_i8[code] · lut_scale`, row-major `n × k`.
fn int8_table_weights(bytes: &[u8], params: [u32; 4], n: usize, k: usize) -> Vec<f32> {
    let l = edgetune_core::layout::QBlockLayout::new(n, k, params).unwrap();
    let f16_at = |o: usize| half::f16::from_le_bytes([bytes[o], bytes[o + 1]]).to_f32();
    let mut w = vec![0f32; n * k];
    for r in 0..n {
        let t = r / l.rows_per_table;
        let o = l.lut_scale_off + 4 * t;
        let lut_scale = f32::from_le_bytes(bytes[o..o + 4].try_into().unwrap());
        for i in 0..k {
            let block = l.read_block(bytes, r, i / 32);
            let code = edgetune_core::layout::block_code(&block, l.bits, i % 32) as usize;
            let v = bytes[l.lut_i8_off + t * l.entries() + code] as i8 as f32;
            w[r * k + i] = f16_at(l.scale_offset(r, i / l.group)) * v * lut_scale;
        }
    }
    w
}

/// Mean output per channel of `g` over `x`'s rows (run one row at a time).
fn mean_outputs(g: &Graph, x: &Array) -> Vec<f64> {
    let (bytes, _) = pack(g).unwrap();
    let mut ours = Ours::from_bytes(AlignedBytes::from(&bytes[..])).unwrap();
    let (rows, k) = (x.shape[0], x.shape[1]);
    let xs = x.to_f32();
    let mut sum = Vec::new();
    for r in 0..rows {
        let row = Array {
            shape: vec![1, k],
            data: ArrayData::F32(xs[r * k..(r + 1) * k].to_vec()),
        };
        let y = ours.run(&[row]).unwrap()[0].to_f32();
        sum.resize(y.len(), 0.0);
        for (s, v) in sum.iter_mut().zip(y) {
            *s += v as f64;
        }
    }
    sum.iter().map(|s| s / rows as f64).collect()
}

#[test]
fn calibrated_compression_keeps_each_outputs_mean() {
    // Inputs sit on large per-channel offsets, so binary weights' error moves every output's
    // mean by (W − Ŵ)μ. With calibration data the bias takes that back: over the calibration
    // rows each output's mean is the f32 layer's. Without it, the means move.
    let (n, k, rows) = (16, 64, 300);
    let mut r = 1u64;
    let x: Vec<f32> = (0..rows * k)
        .map(|i| {
            r = r
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (1.0 + (i % k % 5) as f32) + ((r >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
        })
        .collect();
    let x = Array {
        shape: vec![rows, k],
        data: ArrayData::F32(x),
    };
    let want = mean_outputs(&one_layer(n, k), &x);
    let recipe = Recipe {
        rules: vec![Rule {
            pattern: "*".into(),
            method: Method::Binary { group: 64 },
            gptq: false,
        }],
        keep_ends: KeepEnds::Same,
        ..Recipe::default()
    };
    let shift = |calibrated: bool| {
        let mut g = one_layer(n, k);
        let cal = calib::calibrate(&g, std::slice::from_ref(&x), |_, _| false).unwrap();
        compress(&mut g, &recipe, calibrated.then_some(&cal), false).unwrap();
        let got = mean_outputs(&g, &x);
        got.iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max)
    };
    let scale = want.iter().map(|v| v.abs()).fold(0.0, f64::max);
    let (with, without) = (shift(true), shift(false));
    println!("largest mean shift: {with:.2e} with calibration, {without:.2e} without (outputs up to {scale:.2})");
    assert!(with < 1e-4 * scale, "{with} of {scale}");
    assert!(without > 1e-2 * scale, "{without} of {scale}");
}

#[test]
fn recipes_that_cannot_apply_say_so() {
    let onnx = digits("cnn.onnx");
    let out = tmp("cnn-bad.etm");
    let shape = ["--input", "x=1x1x8x8"];
    // Bits out of range, and a rule that matches no layer: errors that say why.
    let e =
        edgetune_compress(&onnx, &out, &[&shape[..], &["--codebook", "9"]].concat()).unwrap_err();
    assert!(format!("{e:#}").contains("bits must be 1 to 8"), "{e:#}");
    let recipe = tmp("typo.toml");
    std::fs::write(&recipe, "[[rule]]\nmatch = \"*Gemmm*\"\nint4 = 32\n").unwrap();
    let e = edgetune_compress(
        &onnx,
        &out,
        &[&shape[..], &["--recipe", recipe.to_str().unwrap()]].concat(),
    )
    .unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("matches no layer") && msg.contains("/8/Gemm"),
        "{msg}"
    );
    // 2:4 on the first convolution (9 inputs, not a multiple of 4): kept at int8, and the report
    // says so, rather than a silently different model.
    let g =
        edgetune_cli::import::import(&onnx, &["x=1x1x8x8".parse().unwrap()], Default::default())
            .unwrap();
    let mut g2 = g.clone();
    let rule = Rule {
        pattern: "*".into(),
        method: Method::Sparse { keep: 2, m: 4 },
        gptq: false,
    };
    let reports = compress(
        &mut g2,
        &Recipe {
            rules: vec![rule],
            keep_ends: KeepEnds::Same,
            ..Recipe::default()
        },
        None,
        false,
    )
    .unwrap();
    let first = &reports[0];
    assert_eq!(first.shape, (16, 9));
    assert!(
        first.note.as_deref().unwrap_or("").contains("kept int8"),
        "{first:?}"
    );
    assert!(
        reports[1..].iter().all(|r| r.method.contains("sparse")),
        "{reports:?}"
    );
}

#[test]
fn calibration_stops_once_every_layer_has_its_rows() {
    let onnx = digits("cnn.onnx");
    let g =
        edgetune_cli::import::import(&onnx, &["x=50x1x8x8".parse().unwrap()], Default::default())
            .unwrap();
    let x = npy::read(&digits("x_train.npy")).unwrap();
    let n = x.shape[0];
    let all = calib::calibrate(&g, std::slice::from_ref(&x), |_, _| false).unwrap();
    // The dense layers see one row per image: far below the cap, so every sample runs.
    assert_eq!(all.samples, n);
    assert!(all.stats.values().any(|s| s.count() == n as u64));
    // A cap of 120 rows: the last dense layer has them after 3 batches of 50.
    let few = calib::calibrate_rows(&g, std::slice::from_ref(&x), |_, _| false, 120).unwrap();
    assert_eq!(few.samples, 150, "of {n}");
    assert_eq!(few.stats.len(), all.stats.len());
    assert!(few.stats.values().all(|s| s.count() >= 120));
}

#[test]
fn a_recipe_files_keep_ends_holds_unless_the_flag_overrides_it() {
    let onnx = digits("cnn.onnx");
    let recipe = tmp("same.toml");
    std::fs::write(
        &recipe,
        "keep_ends = \"same\"\n[[rule]]\nmatch = \"*\"\nternary = 64\n",
    )
    .unwrap();
    let first_weight = |flags: &[&str]| {
        let out = tmp("cnn-keep.etm");
        edgetune_compress(
            &onnx,
            &out,
            &[
                &["--input", "x=1x1x8x8", "--recipe", recipe.to_str().unwrap()],
                flags,
            ]
            .concat(),
        )
        .unwrap();
        let bytes = AlignedBytes::read(&out).unwrap();
        let model = Model::from_bytes(bytes.as_bytes()).unwrap();
        let w = model.tensor(model.op(0).input(1));
        (w.meta.encoding, w.len)
    };
    // The file says "same": the first layer (16×9) is ternary like the rest, 2 bits a weight.
    let (same, int8) = (first_weight(&[]), first_weight(&["--keep-ends", "int8"]));
    assert_eq!(same.0, Encoding::QBlock);
    // The flag wins over the file: the first layer is kept at int8, 8 bits a weight.
    assert!(
        int8.1 > 2 * same.1,
        "first layer {} bytes with the file's setting, {} with --keep-ends int8",
        same.1,
        int8.1
    );
}

#[test]
fn inspect_names_each_weights_encoding() {
    // `inspect --weights` reads each weight's encoding back from the file: what `compress` was
    // asked for, with the bytes the file really holds.
    let onnx = digits("cnn.onnx");
    let cases: [(&[&str], &str); 3] = [
        (&["--int8"], "int8 (8-bit codes), scale per"),
        (
            &["--ternary", "32", "--int8-activations"],
            "ternary (2-bit codes), scale per 32, int8 activations, rows tiled by 16",
        ),
        (&["--binary", "32"], "binary (1-bit codes), scale per 32"),
    ];
    for (flags, want) in cases {
        let out = tmp("cnn-inspect.etm");
        let args = [&["--input", "x=1x1x8x8", "--keep-ends", "same"], flags].concat();
        edgetune_compress(&onnx, &out, &args).unwrap();
        let ours = Ours::load(&out).unwrap();
        let model = ours.model();
        let r = commands::inspect::report(&model, false, true);
        let file = std::fs::metadata(&out).unwrap().len();
        let mut dense = 0;
        for id in 0..model.tensor_count() {
            let t = model.tensor(id);
            let (name, meta) = (t.name.to_string(), t.meta);
            if meta.encoding != Encoding::QBlock {
                continue;
            }
            dense += 1;
            let line = r.weights.iter().find(|w| w.name == name).expect("listed");
            assert!(line.encoding.starts_with(want), "{flags:?}: {line:?}");
            let numel = meta.shape.numel() as f64;
            assert_eq!(line.bits_per_weight, 8.0 * line.bytes as f64 / numel);
        }
        assert_eq!(
            dense, 4,
            "{flags:?}: the CNN's two convolutions and two dense layers"
        );
        let listed: u64 = r.weights.iter().map(|w| w.bytes).sum();
        assert!(
            listed < file,
            "{flags:?}: {listed} bytes of weights in a {file}-byte file"
        );
    }
}
